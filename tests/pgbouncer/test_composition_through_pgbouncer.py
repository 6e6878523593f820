"""Durable composition, flow control by key, cancels, event streams and remote workers' long-polls
behind PgBouncer (transaction mode with and without a LISTEN connection, and session mode): the
integration suite's own tests, run here against the overridden fixtures of
tests/pgbouncer/conftest.py. Without LISTEN nothing wakes a wait: each of these still ends, and a
remote worker's long-poll takes a task enqueued meanwhile within its poll. An operator's TOTP
re-enrolment stores its recovery codes with asyncpg's executemany (one statement, many rows)."""

from __future__ import annotations

import pytest

from tests.integration.auth.test_login import test_reenrolment_issues_single_use_recovery_codes
from tests.integration.flow.test_keyed_claim import (
    test_key_concurrency_caps_each_key_and_other_keys_still_run,
)
from tests.integration.flow.test_keys_everywhere import (
    test_a_python_enqueue_inside_a_transaction_carries_the_key,
    test_remote_workers_claim_under_the_same_key_limits_and_fairly,
)
from tests.integration.test_durable import (
    test_a_signal_sent_before_the_wait_and_one_sent_after_are_both_delivered,
    test_cancelling_a_parent_cancels_its_unfinished_children,
    test_depends_on_runs_a_diamond_in_order_and_cancels_after_a_discard,
    test_fan_out_and_gather_and_a_failing_child_raises_child_failed,
    test_steps_run_once_and_are_listed,
    test_the_events_stream_tells_steps_suspensions_signals_and_children,
)
from tests.integration.test_remote_workers import (
    test_claim_heartbeat_complete_and_stale_completions,
    test_the_long_poll_wakes_on_enqueue,
)
from tests.integration.test_tasks_api import test_cancel_and_retry

pytestmark = pytest.mark.pgbouncer

__all__ = [
    "test_a_python_enqueue_inside_a_transaction_carries_the_key",
    "test_a_signal_sent_before_the_wait_and_one_sent_after_are_both_delivered",
    "test_cancel_and_retry",
    "test_cancelling_a_parent_cancels_its_unfinished_children",
    "test_claim_heartbeat_complete_and_stale_completions",
    "test_depends_on_runs_a_diamond_in_order_and_cancels_after_a_discard",
    "test_fan_out_and_gather_and_a_failing_child_raises_child_failed",
    "test_key_concurrency_caps_each_key_and_other_keys_still_run",
    "test_reenrolment_issues_single_use_recovery_codes",
    "test_remote_workers_claim_under_the_same_key_limits_and_fairly",
    "test_steps_run_once_and_are_listed",
    "test_the_events_stream_tells_steps_suspensions_signals_and_children",
    "test_the_long_poll_wakes_on_enqueue",
]
