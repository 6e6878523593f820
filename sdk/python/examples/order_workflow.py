"""A durable order workflow: charge → wait for the signal "shipped" → fan out notifications → gather.

    python -m taskgate worker order_workflow:worker
    tg.enqueue("orders.fulfil", {"order_id": 7, "amount_cents": 1999, "recipients": ["a@x", "b@x"]})
    tg.signal(task_id, "shipped", {"tracking": "1Z999"})   # before or after the task reaches its wait

Resuming re-runs the handler from the top with what Taskgate stored: the charge step returns its
recorded result (it is never run twice), the signal its data, the children their results. Code
between steps must take the same path every time: anything non-deterministic goes in a step.

Environment: TASKGATE_URL (https://localhost:8080), TASKGATE_API_KEY, TASKGATE_CA (a CA bundle
path; unset means the system's).
"""

from __future__ import annotations

import os
import uuid

from pydantic import BaseModel

from taskgate import ChildFailed, Client, PermanentError, TaskContext, Worker

tg = Client(
    os.environ.get("TASKGATE_URL", "https://localhost:8080"),
    api_key=os.environ["TASKGATE_API_KEY"],
    verify=os.environ.get("TASKGATE_CA", True),
)
worker = Worker(tg, queues=["orders"], concurrency=50, version="orders-1.0")


class Order(BaseModel):
    order_id: int
    amount_cents: int
    recipients: list[str]


class Notification(BaseModel):
    to: str
    order_id: int


def charge(order: Order) -> dict[str, object]:
    # your payment provider here; an idempotency key makes even a retried step safe to repeat
    return {"charge_id": f"ch_{uuid.uuid4().hex[:12]}", "amount_cents": order.amount_cents}


@worker.kind("orders.fulfil", payload=Order)
async def fulfil(ctx: TaskContext, order: Order) -> dict[str, object]:
    charged = await ctx.step("charge", charge, order)
    shipment = await ctx.wait_signal("shipped", timeout_s=7 * 86_400)
    notes = [
        await ctx.spawn("orders.notify", Notification(to=who, order_id=order.order_id), key=f"notify-{who}")
        for who in order.recipients
    ]
    try:
        sent = await ctx.gather(notes)
    except ChildFailed as exc:
        raise PermanentError(f"could not notify: {exc}") from exc
    return {"charge": charged, "tracking": shipment["tracking"], "notified": len(sent)}


@worker.kind("orders.notify", payload=Notification)
async def notify(ctx: TaskContext, note: Notification) -> dict[str, str]:
    # send the e-mail here
    return {"sent_to": note.to}
