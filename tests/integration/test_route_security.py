"""Meta-test: every /api route is authenticated with declared scopes or explicitly public."""

from quart import Quart


def test_every_api_route_declares_scopes_or_is_public(app: Quart) -> None:
    undeclared = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        view = app.view_functions[rule.endpoint]
        public = getattr(view, "taskgate_public", False)
        scopes = getattr(view, "taskgate_scopes", None)
        # an explicit @requires_scopes() (any authenticated principal) is a declaration too
        if not public and scopes is None:
            undeclared.append(rule.rule)
    assert not undeclared, f"routes with neither @public nor @requires_scopes: {undeclared}"
