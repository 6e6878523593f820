"""Remote kinds: a client's own task kinds, with JSON Schema 2020-12 contracts checked here.

Validators are compiled once per (client, kind, registration, schema version) and kept; the kinds
of a client are cached for a few seconds (a change on this process is seen at once, on another
replica within KINDS_TTL_S) and re-read at once when an unknown name is asked for, so a kind
registered a moment ago can be enqueued right away.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pydantic_core
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from pydantic_core import SchemaValidator, core_schema
from referencing import Registry
from referencing.exceptions import Unresolvable

from app.src.api.errors import Conflict, NotFound, Unprocessable
from app.src.database import workers as store
from app.src.database.workers import RemoteKindRow
from app.src.utils import json_text

if TYPE_CHECKING:
    from app.database import Database
    from app.src.api.engine.task_engine import KindLookup

KINDS_TTL_S = 5.0
MAX_ERRORS = 50
_MAX_VALIDATORS = 10_000

# Every $ref resolves inside the schema itself. (The validator's default registry downloads what it
# cannot resolve, with urllib, no timeout, on the event loop: a schema could make the server fetch
# any URL, past HTTP_ALLOWED_NETWORKS, while every request waited.)
_NOTHING_FETCHED = Registry()
_REFERENCES = ("$ref", "$dynamicRef")
_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # their values are data, not schemas

# Patterns (`pattern`, `patternProperties`) are matched by the linear-time engine pydantic-core
# brings (Rust's regex crate), never by Python's backtracking `re`: with `re`, a pattern such as
# ^(a+)+$ held the event loop for about 40 s on a string of 30 characters (four times as long for
# each two more), and every request of every client on that process waited. Patterns that engine
# cannot run (look-around, back-references) are refused when the kind is registered.


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> SchemaValidator:
    return SchemaValidator(core_schema.str_schema(pattern=pattern))


def _matches(pattern: str, text: str) -> bool:
    """Whether `pattern` matches anywhere in `text` (JSON Schema's `pattern`: not anchored).

    Within the check's budget (see CHECK_BUDGET_S): one keyword matches every key of an object
    against each of its patterns, thousands times thousands of matches in one call."""
    if time.monotonic() > _deadline.get():
        raise _OverBudget
    try:
        _regex(pattern).validate_python(text)
    except pydantic_core.ValidationError:
        return False
    return True


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterable[ValidationError]:
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterable[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterable[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [key for key in instance
              if key not in properties and not any(_matches(p, key) for p in patterns)]  # fmt: skip
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        listed = ", ".join(repr(extra) for extra in sorted(extras))
        verb = "was" if len(extras) == 1 else "were"
        yield ValidationError(f"Additional properties are not allowed ({listed} {verb} unexpected)")


def _comparable(value: Any) -> Any:
    """`value` as JSON Schema compares it: numbers by value (1 equals 1.0), booleans apart from
    numbers (JSON writes them apart), objects whatever the order of their keys."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_comparable(item) for item in value]
    return value


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterable[ValidationError]:
    """jsonschema compares items that cannot be sorted (objects, arrays) each with every other: an
    array of 4,000 objects held the event loop for 19 s. One pass over canonical JSON instead."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[str] = set()
    for item in instance:
        if time.monotonic() > _deadline.get():  # the budget, inside the loop (see _matches)
            raise _OverBudget
        text = json.dumps(_comparable(item), sort_keys=True)
        if text in seen:
            yield ValidationError("the array has non-unique elements")
            return
        seen.add(text)


# Checks run on the event loop, and a schema's keywords can multiply (an anyOf of references to
# anyOfs of references...: 2^depth for one value, 6.5 s at a depth of 16 for {"x": 1}). Every
# keyword looks at this deadline first, so no value is checked for longer than the budget.
CHECK_BUDGET_S = 1.0
_deadline: ContextVar[float] = ContextVar("schema_check_deadline", default=math.inf)
# A budget for all the checks of one call together (checks_within): with the budget per value
# alone, a batch of 1,000 payloads, or a completion of 1,000 results, that each cost just under it
# held the event loop (every request of every client) for up to 1,000 s. Twice a value's, so that a
# value alone always meets its own budget first (and is told it is the one that costs too much).
SHARED_CHECK_BUDGET_S = 2 * CHECK_BUDGET_S
_shared_deadline: ContextVar[float] = ContextVar("schema_checks_deadline", default=math.inf)


class _OverBudget(Exception):
    """A schema check ran past CHECK_BUDGET_S."""


class _SharedOverBudget(_OverBudget):
    """The checks of one call together ran past their shared budget (checks_within)."""


@contextlib.contextmanager
def checks_within(seconds: float = SHARED_CHECK_BUDGET_S) -> Iterator[None]:
    """Every schema check inside (in this task) shares one budget of `seconds` (or what is left of
    an enclosing one); past it a check raises as over budget, its message saying to send fewer."""
    token = _shared_deadline.set(min(_shared_deadline.get(), time.monotonic() + seconds))
    try:
        yield
    finally:
        _shared_deadline.reset(token)


class ChecksOverBudget(Exception):
    """The checks of one call (checks_within) ran past their shared budget: the fault of no value."""


Keyword = Callable[[Any, Any, Any, Any], Iterable[ValidationError] | None]


def _bounded(keyword: Keyword) -> Keyword:
    def check(validator: Any, value: Any, instance: Any, schema: Any) -> Iterable[ValidationError]:
        if time.monotonic() > _deadline.get():
            raise _OverBudget
        found = keyword(validator, value, instance, schema)
        if found is not None:
            yield from found

    return check


def _checked(validator: Any, instance: Any) -> list[ValidationError]:
    """Every error of `instance`, found within CHECK_BUDGET_S and what is left of a shared budget
    (else _OverBudget, or _SharedOverBudget when the shared one ended first)."""
    own = time.monotonic() + CHECK_BUDGET_S
    shared = _shared_deadline.get()
    token = _deadline.set(min(own, shared))
    try:
        return sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    except _OverBudget:
        if shared < own:
            raise _SharedOverBudget from None
        raise
    finally:
        _deadline.reset(token)


_KEYWORDS: dict[str, Keyword] = {
    **Draft202012Validator.VALIDATORS,
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}
_Validator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {name: _bounded(keyword) for name, keyword in _KEYWORDS.items()}
)

_kinds: dict[UUID, tuple[float, dict[str, RemoteKindRow]]] = {}
_validators: dict[tuple[UUID, str, datetime, int, str], Any] = {}


def forget(client_id: UUID) -> None:
    _kinds.pop(client_id, None)


async def kinds_of(db: Database, *, client_id: UUID, fresh: bool = False) -> dict[str, RemoteKindRow]:
    hit = _kinds.get(client_id)
    if hit is not None and not fresh and time.monotonic() - hit[0] < KINDS_TTL_S:
        return hit[1]
    async with db.driver() as conn:
        rows = await store.list_kinds(conn, client_id=client_id)
    kinds = {row.name: row for row in rows}
    _kinds[client_id] = (time.monotonic(), kinds)
    return kinds


async def page_of_kinds(
    db: Database, *, client_id: UUID, after: str | None, limit: int
) -> list[RemoteKindRow]:
    """Up to `limit` of the client's remote kinds named after `after`, in name order (GET
    /api/catalog/kinds pages them: a client may register any number)."""
    async with db.driver() as conn:
        return await store.list_kinds(conn, client_id=client_id, after=after, limit=limit)


async def lookup(db: Database, *, client_id: UUID, names: Iterable[str]) -> dict[str, RemoteKindRow]:
    """The remote kinds among `names` (in-process names are never looked up here)."""
    wanted = set(names)
    if not wanted:
        return {}
    kinds = await kinds_of(db, client_id=client_id)
    if not wanted <= kinds.keys():
        kinds = await kinds_of(db, client_id=client_id, fresh=True)
    return {name: kinds[name] for name in wanted if name in kinds}


def _validator(kind: RemoteKindRow, which: str) -> Any:
    schema = kind.payload_schema if which == "payload" else kind.result_schema
    if schema is None:
        return None
    key = (kind.client_id, kind.name, kind.created_at, kind.version, which)
    validator = _validators.get(key)
    if validator is None:
        if len(_validators) >= _MAX_VALIDATORS:
            _validators.clear()
        # no format checker and no remote $ref retrieval: a schema cannot make the server fetch URLs
        validator = _validators[key] = _Validator(schema, registry=_NOTHING_FETCHED)
    return validator


def schema_errors(
    kind: RemoteKindRow, which: str, instance: Any, *, prefix: tuple[str | int, ...]
) -> list[dict[str, Any]]:
    """[{field, message, type}] as for pydantic errors (app/src/api/errors.py field_errors)."""
    validator = _validator(kind, which)
    if validator is None:
        return []
    out: list[dict[str, Any]] = []
    try:
        errors = _checked(validator, instance)
    except (RecursionError, Unresolvable, pydantic_core.SchemaError, _OverBudget) as exc:
        # a kind registered before references (or patterns, or its cost) were checked, or a
        # reference that loops, or alternatives that multiply, for this value
        reason = _reason(exc)
        kind_of = "over_budget" if isinstance(exc, _SharedOverBudget) else "invalid_schema"
        return [{"field": ".".join(map(str, prefix)), "message": f"the {which} schema of kind "
                 f"{kind.name!r} cannot be applied: {reason}", "type": kind_of}]  # fmt: skip
    for error in errors[:MAX_ERRORS]:
        out.extend(_field_errors(error, prefix))
    return out


def _field_errors(error: ValidationError, prefix: tuple[str | int, ...]) -> list[dict[str, Any]]:
    path = (*prefix, *error.absolute_path)
    required = error.validator_value
    if error.validator == "required" and isinstance(error.instance, Mapping) and isinstance(required, list):
        missing = [name for name in required if name not in error.instance]
        return [
            {"field": ".".join(map(str, (*path, name))), "message": "Field required", "type": "missing"}
            for name in missing
        ]
    return [
        {
            "field": ".".join(map(str, path)) or None,
            "message": error.message if len(error.message) <= 300 else error.message[:299] + "…",
            "type": str(error.validator),
        }
    ]


def validate_remote_payload(kind: RemoteKindRow, payload: Any, *, at: tuple[str | int, ...]) -> None:
    """The enqueue check of a remote kind's payload: a 422 naming the failing fields."""
    errors = schema_errors(kind, "payload", payload, prefix=(*at, "payload"))
    if errors:
        raise Unprocessable(f"The payload does not match the contract of kind {kind.name!r}.", errors=errors)


def result_problem(kind: RemoteKindRow | None, result: Any) -> str | None:
    """Why a remote worker's result cannot complete its task, or None when it can; raises
    ChecksOverBudget when a shared budget (checks_within) ended before it was checked."""
    if json_text.contains_nul(result):
        return f"the handler's result cannot be stored: {json_text.NUL_MESSAGE}"
    if kind is None:
        return None
    errors = schema_errors(kind, "result", result, prefix=("result",))
    if not errors:
        return None
    if any(e["type"] == "over_budget" for e in errors):
        raise ChecksOverBudget(errors[0]["message"])  # not this result's fault: no attempt fails for it
    listed = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:10])
    return f"result does not match the result schema of kind {kind.name!r}: {listed}"


def _check_schema(schema: dict[str, Any] | None, field: str) -> list[dict[str, Any]]:
    if schema is None:
        return []
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = ".".join(map(str, ("body", field, *exc.absolute_path)))
        return [{"field": path, "message": exc.message, "type": "invalid_schema"}]
    embedded = any(key == "$id" for key, _, _ in _walk(schema, ()))
    errors = [
        {"field": ".".join(map(str, ("body", field, *path, key))),
         "message": "only references inside the schema (#...) are supported: nothing is fetched",
         "type": "invalid_schema"}
        for key, value, path in _walk(schema, ())
        if key in _REFERENCES and isinstance(value, str) and not value.startswith("#") and not embedded
    ]  # fmt: skip
    errors += _pattern_errors(schema, field)
    if errors:
        return errors
    try:  # a schema that refers to itself without end (or costs too much) fails every value: refuse it now
        _checked(_Validator(schema, registry=_NOTHING_FETCHED), {})
    except (RecursionError, Unresolvable, _OverBudget) as exc:
        reason = _reason(exc)
        return [{"field": f"body.{field}", "message": f"the schema cannot be applied: {reason}",
                 "type": "invalid_schema"}]  # fmt: skip
    return []


SEND_FEWER = "send fewer at once"


def _reason(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "it refers to itself without end"
    if isinstance(error, _SharedOverBudget):
        return (
            f"checking the values of this request takes longer than {CHECK_BUDGET_S:g} s in all: {SEND_FEWER}"
        )
    if isinstance(error, _OverBudget):
        return (
            f"checking a value against it takes longer than {CHECK_BUDGET_S:g} s (its alternatives multiply)"
        )
    return str(error)


def _pattern_errors(schema: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """Patterns the linear-time engine cannot run, and `unevaluatedProperties` beside
    `patternProperties` (which the validator would match with Python's `re`)."""
    errors = []
    keywords = set()
    for key, value, path in _walk(schema, ()):
        keywords.add(key)
        if key == "pattern" and isinstance(value, str):
            found = [((*path, key), value)]
        elif key == "patternProperties" and isinstance(value, dict):
            found = [((*path, key, pattern), pattern) for pattern in value]
        else:
            continue
        for at, pattern in found:
            try:
                _regex(pattern)
            except pydantic_core.SchemaError:
                errors.append({"field": ".".join(map(str, ("body", field, *at))),
                               "message": "a pattern may not use look-around or back-references "
                                          "(patterns are matched in linear time)",
                               "type": "invalid_schema"})  # fmt: skip
    if {"patternProperties", "unevaluatedProperties"} <= keywords:
        errors.append({"field": f"body.{field}", "message": "unevaluatedProperties cannot be combined "
                       "with patternProperties", "type": "invalid_schema"})  # fmt: skip
    return errors


def _walk(node: Any, path: tuple[str | int, ...]) -> Iterable[tuple[str, Any, tuple[str | int, ...]]]:
    """(keyword, value, path of the object holding it) for every keyword of a schema, iteratively,
    leaving out the values of keywords that hold data."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(node, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value, at
                if key not in _DATA_KEYWORDS:
                    stack.append((value, (*at, key)))
        elif isinstance(item, list):
            stack.extend((value, (*at, index)) for index, value in enumerate(item))


async def register(
    db: Database,
    in_process: KindLookup,
    *,
    client_id: UUID,
    name: str,
    payload_schema: dict[str, Any],
    result_schema: dict[str, Any] | None,
    description: str | None,
    max_attempts: int | None,
) -> tuple[RemoteKindRow, bool]:
    """Create or update a remote kind of this client; (kind, created)."""
    _check_name(name)
    if in_process.get(name) is not None:
        raise Conflict(f"{name!r} is a kind this deployment runs itself; a remote kind needs another name.")
    errors = _check_schema(payload_schema, "payload_schema") + _check_schema(result_schema, "result_schema")
    if errors:
        raise Unprocessable("The schema is not valid JSON Schema (draft 2020-12).", errors=errors)
    async with db.driver() as conn:
        kind, created = await store.upsert_kind(
            conn,
            client_id=client_id,
            name=name,
            payload_schema=payload_schema,
            result_schema=result_schema,
            description=description,
            max_attempts=max_attempts,
        )
    forget(client_id)
    return kind, created


async def delete(db: Database, *, client_id: UUID, name: str) -> int:
    """Remove a remote kind; its unstarted tasks are discarded (how many is returned)."""
    async with db.driver() as conn:
        existed, discarded = await store.delete_kind(conn, client_id=client_id, name=name)
    forget(client_id)
    if not existed:
        raise NotFound(f"No remote kind {name!r}.")
    return discarded


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", name):
        raise Unprocessable(
            "A kind name is 1 to 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit.",
            errors=[{"field": "path.name", "message": "invalid kind name", "type": "value_error"}],
        )
