"""`record`: an immutable row type that costs what a plain dataclass costs to build.

A frozen dataclass's generated `__init__` sets each field through `object.__setattr__`: three
times the cost of a plain one (3 ms for the 1,000 `Task`s of one batch enqueue, a tenth of the
server's time for it). The enqueue and claim paths build one or more such rows per task, so they
use `record`: a slotted dataclass that type checkers treat as frozen (PEP 681 `frozen_default`),
so mypy refuses an assignment to a field just as it would for `frozen=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


# (Python 3.11's dataclass_transform takes frozen_default through **kwargs; type checkers read it)
@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    return dataclass(slots=True)(cls)
