"""The baselines of the enqueue benchmark: bare Quart endpoints under Taskgate's own uvicorn setup.

`python -m bench.bare_app json|insert DB_URI PORT CERT KEY`: POST /json parses the body and answers
JSON; POST /insert also writes one row with SQLAlchemy (a naive endpoint, as most services start).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from quart import Quart, request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.__main__ import serve_forever, uvicorn_config
from app.settings import load_settings


def bare_app(db_uri: str) -> Quart:
    app = Quart("bare")
    engine: dict[str, AsyncEngine] = {}

    @app.before_serving
    async def connect() -> None:
        engine["db"] = create_async_engine(db_uri, pool_size=10)
        async with engine["db"].begin() as conn:
            await conn.execute(
                text("CREATE TABLE IF NOT EXISTS bare_items (id bigserial PRIMARY KEY, body jsonb)")
            )

    @app.after_serving
    async def disconnect() -> None:
        await engine["db"].dispose()

    @app.post("/json")
    async def json_endpoint() -> Any:
        body = await request.get_json()
        return {"ok": True, "kind": body.get("kind")}, 201

    @app.post("/insert")
    async def insert_endpoint() -> Any:
        body = await request.get_data(as_text=True)
        async with engine["db"].begin() as conn:
            row = await conn.execute(
                text("INSERT INTO bare_items (body) VALUES (CAST(:b AS jsonb)) RETURNING id"), {"b": body}
            )
        return {"id": row.scalar_one()}, 201

    return app


def main() -> None:
    db_uri, port, cert, key = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    settings = load_settings(
        APP_ENV="prod", DB_URI=db_uri, SECRET_KEYS=["zOyp1OqHZ8zvcfnAaflu0J1z4Jx0pcXOm8ZNjPzVumI="], SSL_CERTFILE=cert, SSL_KEYFILE=key, PORT=port,
        HOST="127.0.0.1", LOG_LEVEL="WARNING",
    )  # fmt: skip
    serve_forever(uvicorn_config(bare_app(db_uri), settings, certfile=cert, keyfile=key))


if __name__ == "__main__":
    main()
