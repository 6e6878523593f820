"""One definition per kind: a second declaration of a name fails and names both places."""

import pytest
from pydantic import BaseModel

from app.src.api.kinds import DuplicateKind, KindRegistry, TaskContext


class P(BaseModel):
    x: int


def test_declaring_a_name_twice_names_both_locations() -> None:
    registry = KindRegistry()

    @registry.declare("reports.build", payload=P)
    async def first(ctx: TaskContext, payload: P) -> None: ...

    with pytest.raises(DuplicateKind) as caught:

        @registry.declare("reports.build", payload=P)
        async def second(ctx: TaskContext, payload: P) -> None: ...

    message = str(caught.value)
    assert "reports.build" in message
    assert message.count("test_kinds_registry.py:") == 2


def test_aliases_resolve_to_the_kind_and_cannot_collide() -> None:
    registry = KindRegistry()

    @registry.declare("reports.build", payload=P, aliases=("build_report",))
    async def build(ctx: TaskContext, payload: P) -> None: ...

    assert registry.get("build_report") is registry.get("reports.build")
    assert [k.name for k in registry.all()] == ["reports.build"]
    with pytest.raises(DuplicateKind):

        @registry.declare("build_report", payload=P)
        async def clash(ctx: TaskContext, payload: P) -> None: ...
