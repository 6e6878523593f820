"""Every (source, target) pair of statuses: legal moves pass, everything else raises."""

import itertools

import pytest

from app.src.api.state_machine import (
    TERMINAL,
    IllegalTransition,
    Status,
    sources,
    transition,
)

LEGAL = {
    (Status.SCHEDULED, Status.AVAILABLE),
    (Status.SCHEDULED, Status.CANCELLED),
    (Status.AVAILABLE, Status.RUNNING),
    (Status.AVAILABLE, Status.CANCELLED),
    (Status.RUNNING, Status.COMPLETED),
    (Status.RUNNING, Status.RETRYABLE),
    (Status.RUNNING, Status.DISCARDED),
    (Status.RUNNING, Status.CANCELLED),
    (Status.RUNNING, Status.WAITING),
    (Status.RUNNING, Status.AVAILABLE),
    (Status.RUNNING, Status.SCHEDULED),  # durable sleep
    (Status.WAITING, Status.AVAILABLE),  # signal, children, dependencies, or a signal's timeout
    (Status.WAITING, Status.COMPLETED),
    (Status.WAITING, Status.RETRYABLE),
    (Status.WAITING, Status.DISCARDED),
    (Status.WAITING, Status.CANCELLED),
    (Status.RETRYABLE, Status.AVAILABLE),
    (Status.RETRYABLE, Status.CANCELLED),
    (Status.DISCARDED, Status.AVAILABLE),
    (Status.CANCELLED, Status.AVAILABLE),
}
ALL_PAIRS = list(itertools.product(Status, Status))


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS, ids=[f"{s}->{t}" for s, t in ALL_PAIRS])
def test_transition_table(source: Status, target: Status) -> None:
    if (source, target) in LEGAL:
        assert transition(source, target) is target
        assert str(source) in sources(target)
    else:
        with pytest.raises(IllegalTransition):
            transition(source, target)
        assert str(source) not in sources(target)


def test_completed_is_final_and_spec_statuses_are_exact() -> None:
    assert {str(s) for s in Status} == {
        "scheduled",
        "available",
        "running",
        "waiting",
        "retryable",
        "completed",
        "discarded",
        "cancelled",
    }
    assert {str(s) for s in TERMINAL} == {"completed", "discarded", "cancelled"}
    assert sources(Status.COMPLETED) == ["running", "waiting"]
