"""JSON helpers hold up against values nested far deeper than the interpreter's stack."""

import random
from datetime import UTC, datetime, timedelta, timezone
from uuid import uuid4

import pytest

from app.src.database.tasks import Debounce, NewTask
from app.src.utils import json_provider, json_text


def deep(levels: int, leaf: object) -> object:
    value = leaf
    for _ in range(levels):
        value = {"k": [value]}
    return value


def test_contains_nul_walks_100_000_levels_without_recursion() -> None:
    assert json_text.contains_nul(deep(100_000, "a\x00b")) is True
    assert json_text.contains_nul(deep(100_000, "ab")) is False
    assert json_text.contains_nul({"key\x00": 1}) is True


def test_a_value_too_deep_to_write_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        json_text.dumps(deep(100_000, 1))


@pytest.mark.parametrize(
    ("raw", "exceeds"),
    [
        (b"[[[1]]]", False),
        (b"[[[[1]]]]", True),
        (b'["[[[[[[", {"a": "}}}}\\"[[[["}]', False),
        (b'[[[["\\\\"]]]]', True),
        (b"[1], [2], [3], [4], [5]", False),
        (b'["[[[[[[", {"a": "}}}}[[[["}]', False),  # no escapes: the quick path
        (b'[{"a": "]]]]"}, [[["x"]]]]', True),
        (b'["]]]]", "a"b", [[[1]]]]', True),  # an odd number of quotes: the regex path
    ],
)
def test_nesting_is_measured_outside_strings(raw: bytes, exceeds: bool) -> None:
    assert json_provider.nesting_exceeds(raw, 3) is exceeds


def test_the_quick_path_finds_what_the_regex_finds() -> None:
    """Without escapes the strings are found by splitting at quotes; it must agree with the
    regex on any body, JSON or not."""

    rng = random.Random(7)
    for _ in range(20_000):
        raw = bytes(rng.choice(b'[]{}"a,') for _ in range(rng.randint(0, 40)))
        regex = json_provider._STRING.sub(b"", raw).translate(None, json_provider._NOT_BRACKETS)
        assert json_provider._outside_strings(raw) == regex, raw


@pytest.mark.parametrize(
    "body",
    [{"b": 1, "a": [{"z": None, "y": "é"}]}, {"big": 2**70}, {1: "int key"}, {"deep": deep(300, 1)}],
    ids=["nested keys", "beyond 64 bits", "non-string key", "beyond orjson's depth"],
)
def test_answers_built_from_request_bodies_read_as_every_other_answer(body: dict[object, object]) -> None:
    assert json_provider.dumps_parsed(body) == json_provider.dumps(body).encode()


@pytest.mark.parametrize(
    ("values", "free"),
    [
        ([{"a": "b"}, {"c": [1, {"d": None}]}], True),
        ([{"a": "b"}, {"c": ["x\x00"]}], False),
        ([{"a\x00": 1}], False),  # in a key
        ([{"a": "\\u0000"}], False),  # the escape's text, no NUL: the walk tells
        ([{"n": 2**70}], False),  # beyond orjson: the walk tells
    ],
)
def test_free_of_nul_never_misses_one(values: list[object], free: bool) -> None:
    assert json_text.free_of_nul(values) is free
    if free:
        assert not any(json_text.contains_nul(value) for value in values)


def test_rows_are_written_alike_by_orjson_and_by_the_standard_library() -> None:
    """dumps_rows writes dataclass rows with orjson; values orjson refuses send the whole list
    through the standard library, which must write the same values (times as UTC)."""

    def row(payload: dict[str, object], run_at: datetime | None) -> NewTask:
        return NewTask(
            uuid4(), uuid4(), 1, "q", "k", payload, 5, 3, run_at, 1.5, None, "key", Debounce("d", 2.0, None)
        )

    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    quick = json_text.loads(json_text.dumps_rows([row({"a": [1, None]}, at), row({}, None)]))
    slow = json_text.loads(json_text.dumps_rows([row({"a": [1, None]}, at), row({"big": 2**70}, None)]))
    assert quick[0].keys() == slow[0].keys()
    assert {k: v for k, v in quick[0].items() if k not in ("id", "client_id")} == {
        k: v for k, v in slow[0].items() if k not in ("id", "client_id")
    }
    assert datetime.fromisoformat(slow[0]["run_at"]) == at.astimezone(UTC)
    assert slow[1]["payload"] == {"big": 2**70}
