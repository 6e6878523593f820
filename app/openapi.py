"""The OpenAPI document as client generators need it (openapi-python-client and the like).

quart-schema's provider, refined: named component schemas instead of per-route inline copies,
every operation's error answers as problem+json, public routes without security, UUID path
parameters, the Idempotency-Key header, the event stream's content type, and required bodies.
"""

from __future__ import annotations

import copy
from typing import Any

from quart_schema.openapi import OpenAPIProvider
from werkzeug.routing import BaseConverter, Rule
from werkzeug.routing.converters import UUIDConverter

PROBLEM_JSON = "application/problem+json"
ERRORS = {
    "400": "Malformed request (problem+json)",
    "401": "Authentication required (problem+json)",
    "403": "Missing scope (problem+json)",
    "404": "Not found (problem+json)",
    "409": "Conflict (problem+json)",
    "415": "The body is not JSON: send `Content-Type: application/json` (problem+json)",
    "422": "Invalid request: `errors` names the failing fields (problem+json)",
    "429": "Over a quota or rate limit; retry after `Retry-After` (problem+json)",
    "503": "Saturated or storage unavailable; retry after `Retry-After` (problem+json)",
}
PUBLIC_ERRORS = ("400", "404", "503")
# a public route that takes a body (the logins) also refuses credentials, bodies and floods
PUBLIC_BODY_ERRORS = ("401", "415", "422", "429")
# 415 only where there is a body to be of the wrong type
BODY_ERRORS = ("415",)
IDEMPOTENT_ENQUEUE = {"create_task", "create_batch"}
EVENT_STREAMS = {"task_events"}

PROBLEM_SCHEMAS: dict[str, Any] = {
    "ProblemFieldError": {
        "type": "object",
        "title": "ProblemFieldError",
        "properties": {
            "field": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Field"},
            "message": {"type": "string", "title": "Message"},
            "type": {"type": "string", "title": "Type"},
        },
        "required": ["field", "message", "type"],
    },
    "Problem": {
        "type": "object",
        "title": "Problem",
        "description": "An RFC 9457 problem details object.",
        "properties": {
            "type": {"type": "string", "title": "Type"},
            "title": {"type": "string", "title": "Title"},
            "status": {"type": "integer", "title": "Status"},
            "detail": {"type": "string", "title": "Detail"},
            "instance": {"type": "string", "title": "Instance"},
            "errors": {"type": "array", "items": {"$ref": "#/components/schemas/ProblemFieldError"}},
        },
        "required": ["type", "title", "status"],
    },
}


class TaskgateOpenAPI(OpenAPIProvider):
    def schema(self) -> dict[str, Any]:
        document = super().schema()
        components: dict[str, Any] = document["components"]["schemas"]
        components.update(copy.deepcopy(PROBLEM_SCHEMAS))
        for operations in document["paths"].values():
            for operation in operations.values():
                _name_inline_schemas(operation, components)
        return document

    def build_path_parameter(self, name: str, converter: BaseConverter) -> dict[str, Any]:
        parameter = super().build_path_parameter(name, converter)
        if isinstance(converter, UUIDConverter):
            parameter["schema"] = {"type": "string", "format": "uuid"}
        return parameter

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        public = bool(getattr(view, "taskgate_public", False))
        endpoint = rule.endpoint.rsplit(".", 1)[-1]
        for operations in paths.values():
            for method, operation in list(operations.items()):
                operation = operations[method] = copy.deepcopy(operation)
                if public:
                    operation["security"] = []
                if "requestBody" in operation:
                    operation["requestBody"]["required"] = True
                if endpoint in IDEMPOTENT_ENQUEUE:
                    operation["parameters"].append(_IDEMPOTENCY_KEY)
                # quart-schema keys responses by int: one key per status, as JSON will write it
                answers = operation["responses"].items()
                operation["responses"] = {str(code): answer for code, answer in answers}
                if endpoint in EVENT_STREAMS:
                    ok = operation["responses"].get("200") or {}
                    ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
                    ok.setdefault("description", "A text/event-stream of `event: task` messages")
                responses = operation["responses"]
                statuses = list(PUBLIC_ERRORS if public else ERRORS)
                if "requestBody" in operation:
                    statuses += PUBLIC_BODY_ERRORS if public else ()
                else:
                    statuses = [status for status in statuses if status not in BODY_ERRORS]
                for status in statuses:
                    responses.setdefault(status, _problem(ERRORS[status]))
        return paths, components


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Replays the original answer (200) for a repeat of the same request; 1-255 characters.",
    "schema": {"type": "string", "maxLength": 255},
}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _name_inline_schemas(operation: dict[str, Any], components: dict[str, Any]) -> None:
    """Move each titled inline object schema to components (once per title) and refer to it."""
    holders = []
    body = operation.get("requestBody")
    if body:
        holders.extend(body.get("content", {}).values())
    for response in operation.get("responses", {}).values():
        holders.extend(response.get("content", {}).values())
    for holder in holders:
        schema = holder.get("schema")
        if not isinstance(schema, dict) or "$ref" in schema:
            continue
        title = schema.get("title")
        if not isinstance(title, str) or schema.get("type") != "object":
            continue
        existing = components.get(title)
        if existing is None:
            components[title] = schema
        elif existing != schema:
            continue  # two different shapes share a name: keep this one inline
        holder["schema"] = {"$ref": f"#/components/schemas/{title}"}
