"""Every (source, target) pair of statuses: legal moves pass, everything else raises."""

import itertools
import random

import pytest

from app.src.api.state_machine import (
    RESCUE_STATUS_SQL,
    TERMINAL,
    IllegalTransition,
    Status,
    after_failure,
    backoff_seconds,
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


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "permanent", "expected"),
    [
        (1, 3, False, Status.RETRYABLE),
        (2, 3, False, Status.RETRYABLE),
        (3, 3, False, Status.DISCARDED),
        (1, 3, True, Status.DISCARDED),
        (1, 1, False, Status.DISCARDED),
    ],
)
def test_after_failure(attempt: int, max_attempts: int, permanent: bool, expected: Status) -> None:
    assert after_failure(attempt=attempt, max_attempts=max_attempts, permanent=permanent) is expected


def test_rescue_sql_agrees_with_after_failure() -> None:
    # the rescuer decides in SQL for a batch; it must say what after_failure says
    assert "t.attempts >= t.max_attempts THEN 'discarded'" in RESCUE_STATUS_SQL
    assert "ELSE 'retryable'" in RESCUE_STATUS_SQL
    assert after_failure(attempt=3, max_attempts=3, permanent=False) is Status.DISCARDED
    assert after_failure(attempt=2, max_attempts=3, permanent=False) is Status.RETRYABLE


def test_backoff_grows_exponentially_within_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(1, 20):
        delay = backoff_seconds(attempt=attempt, min_backoff_s=1, max_backoff_s=60, rng=rng)
        assert 1 <= delay <= min(60, 2 ** (attempt - 1))
    ceilings = [
        max(backoff_seconds(attempt=a, min_backoff_s=1, max_backoff_s=1000, rng=rng) for _ in range(200))
        for a in (1, 4, 8)
    ]
    assert ceilings[0] == 1
    assert 4 < ceilings[1] <= 8
    assert 64 < ceilings[2] <= 128


def test_backoff_honours_retry_after_but_not_past_the_maximum() -> None:
    assert backoff_seconds(attempt=1, min_backoff_s=1, max_backoff_s=60, retry_after_s=30) >= 30
    assert backoff_seconds(attempt=1, min_backoff_s=1, max_backoff_s=60, retry_after_s=600) == 60
