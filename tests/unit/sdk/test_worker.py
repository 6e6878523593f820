"""The SDK's remote Worker against an in-memory Taskgate that holds it to the server's contract:
what a handler's outcome becomes, and that nothing one task does stalls the others."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel

from tests.conftest import ROOT
from tests.unit.sdk.fake_taskgate import FakeTaskgate, until

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate


class Number(BaseModel):
    n: int


async def test_a_validation_error_the_handler_raises_is_not_blamed_on_its_result() -> None:
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)

        @worker.kind("parse", result=Number)
        async def parse(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> Number:
            if payload.get("raw") is not None:
                Number.model_validate({"n": payload["raw"]})  # the handler's own parsing fails
            return {"n": "not a number"}  # type: ignore[return-value]

        own = server.add("parse", {"raw": "x"})
        wrong = server.add("parse")
        async with server.serving(worker):
            await until(lambda: {own, wrong} <= server.completed.keys())
    assert server.completed[own]["outcome"] == "failed"
    assert server.completed[own]["error"].startswith("ValidationError: ")
    assert "traceback" in server.completed[own]
    assert server.completed[wrong]["error"].startswith("result does not match the result model of 'parse'")
