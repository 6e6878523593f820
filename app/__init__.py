"""Taskgate: durable background work on PostgreSQL, served over HTTPS.

Importing this package or calling create_app() opens no connection and starts no thread or task:
the database, workers and scheduler start in the serving lifecycle (seed 000).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quart import Quart

    from app.runtime import Runtime
    from app.settings import Settings


def create_app(settings: Settings | None = None) -> Quart:
    """Build the Quart app; nothing starts until it is served."""
    # The web stack is imported here, not with the package: `python -m app` imports this package
    # first, and commands that serve nothing (migrate, admin, worker, --help) should not pay for
    # Quart, the routes and the console on every start.
    from quart import Quart
    from quart_cors import cors
    from quart_schema import Info, QuartSchema

    from app import middlewares, ui
    from app.openapi import TaskgateOpenAPI
    from app.routes.adapter import register_blueprints
    from app.runtime import Runtime
    from app.settings import MAX_REQUEST_BODY_BYTES, load_settings
    from app.src.api.kinds import load_kinds
    from app.src.utils import json_provider, schema_adapters
    from app.version import __version__

    settings = settings or load_settings()
    schema_adapters.install()
    app = Quart("app", static_folder=None)
    app.config.update(
        TASKGATE_SETTINGS=settings,
        MAX_CONTENT_LENGTH=MAX_REQUEST_BODY_BYTES,
        # the server cuts a body not complete this long after its head (app/server.py); Quart's
        # own deadline (60 s from the first read) would otherwise cut a longer one it allows
        BODY_TIMEOUT=settings.SERVER_BODY_TIMEOUT_S,
        QUART_SCHEMA_CONVERSION_PREFERENCE="pydantic",
        # Swagger UI from the package, not a CDN: /docs works offline
        QUART_SCHEMA_SWAGGER_JS_URL=ui.SWAGGER_JS_URL,
        QUART_SCHEMA_SWAGGER_CSS_URL=ui.SWAGGER_CSS_URL,
    )
    QuartSchema(
        app,
        info=Info(title="Taskgate", version=__version__),
        openapi_path="/openapi.json",
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        security=[{"bearer": []}],
        openapi_provider_class=TaskgateOpenAPI,
    )
    json_provider.install(app)
    if settings.CORS_ORIGINS:  # without allowed origins there is nothing to add (and it costs per request)
        app = cors(
            app,
            allow_origin=settings.CORS_ORIGINS,
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            expose_headers=["X-Request-Id", "Retry-After", "Location"],
            max_age=600,
        )
    middlewares.install(app)
    register_blueprints(app)
    load_kinds(settings.TASK_KIND_MODULES)
    runtime = Runtime(settings)
    app.extensions["taskgate"] = runtime
    app.while_serving(_lifecycle(runtime))
    return app


def _lifecycle(runtime: Runtime) -> Callable[[], AsyncGenerator[None, None]]:
    async def serve() -> AsyncGenerator[None, None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    return serve
