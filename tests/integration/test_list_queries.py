"""List endpoints take the query parameters they document and refuse others (one model: ListQuery)."""

import pytest
from pydantic import BaseModel
from quart import Quart
from quart.typing import TestClientProtocol as Client
from quart_schema.validation import QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, QUART_SCHEMA_RESPONSE_ATTRIBUTE

from app.src.api.models.auth import IssuedKey
from app.src.api.models.common import ListQuery
from tests.task_harness import enqueue

PROBLEM = "application/problem+json"


def _list_routes(app: Quart) -> list[str]:
    """GET /api routes that answer a list ({items: [...]})."""
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/") or "GET" not in (rule.methods or ()):
            continue
        view = app.view_functions[rule.endpoint]
        model = getattr(view, QUART_SCHEMA_RESPONSE_ATTRIBUTE, {}).get(200, (None,))[0]
        if isinstance(model, type) and issubclass(model, BaseModel) and "items" in model.model_fields:
            found.append(rule.rule)
    return found


def test_every_list_route_refuses_parameters_it_does_not_take(app: Quart) -> None:
    """Meta-test: each list route validates its query string with a ListQuery (extra="forbid")."""
    routes = _list_routes(app)
    assert "/api/queues" in routes
    assert "/api/tasks/<uuid:task_id>/attempts" in routes
    lax = [
        rule
        for rule in routes
        if not issubclass(
            getattr(app.view_functions[_endpoint(app, rule)], QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, object),
            ListQuery,
        )
    ]
    assert not lax, f"list routes that ignore unknown query parameters: {lax}"


def _endpoint(app: Quart, rule: str) -> str:
    return next(r.endpoint for r in app.url_map.iter_rules() if r.rule == rule and "GET" in (r.methods or ()))


@pytest.mark.parametrize(
    "path",
    [
        "/api/tasks",
        "/api/queues",
        "/api/schedules",
        "/api/hosts",
        "/api/workers",
        "/api/catalog/kinds",
        "/api/auth/clients",
        "/api/auth/clients/{client}/keys",
        "/api/auth/clients/{client}/signing-secrets",
        "/api/tasks/{task}/attempts",
        "/api/tasks/{task}/steps",
    ],
)
async def test_an_unknown_query_parameter_is_a_422_naming_it(
    client: Client, auth_headers: dict[str, str], api_client: IssuedKey, path: str
) -> None:
    # a typo'd filter (`queu` for `queue`) was ignored, and the answer listed everything
    task = await enqueue(client, auth_headers, kind="noop")
    url = path.format(client=api_client.client_id, task=task["id"])
    assert (await client.get(url, headers=auth_headers)).status_code == 200
    response = await client.get(url, query_string={"queu": "reports"}, headers=auth_headers)
    assert response.status_code == 422, url
    assert response.mimetype == PROBLEM
    body = await response.get_json()
    assert [e["field"] for e in body["errors"]] == ["query.queu"]
