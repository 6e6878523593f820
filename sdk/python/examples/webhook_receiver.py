"""A receiver of Taskgate's signed `http` deliveries (Quart; FastAPI reads the same way).

Run: `pip install quart && WEBHOOK_SECRETS=whsec_... python webhook_receiver.py`. During a
rotation list every secret you know, comma-separated: one matching signature is enough.
"""

from __future__ import annotations

import os

from quart import Quart, request

from taskgate import webhooks

app = Quart(__name__)
SECRETS = [s for s in os.environ.get("WEBHOOK_SECRETS", "").split(",") if s]


@app.post("/hooks/taskgate")
async def receive() -> tuple[dict[str, str], int]:
    body = await request.get_data()  # the raw bytes: the signature covers them exactly
    try:
        webhooks.verify(SECRETS, body, dict(request.headers), tolerance_s=300)
    except webhooks.InvalidSignature as exc:
        return {"error": str(exc)}, 401
    # webhook-id is stable across retries of one delivery: use it to drop duplicates
    return {"received": request.headers["webhook-id"]}, 200


# FastAPI:
#   @app.post("/hooks/taskgate")
#   async def receive(request: Request):
#       webhooks.verify(SECRETS, await request.body(), request.headers)

if __name__ == "__main__":
    app.run(port=9000)
