"""Cron expressions: crontab semantics, time zones across DST changes, and fire planning."""

from datetime import UTC, datetime, timedelta

import pytest

from app.src.api import cron
from app.src.api.schedules import MAX_COALESCED_COUNT, plan_fires


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires(
    expression: str, timezone: str, after: datetime, n: int, *, seconds: bool = False
) -> list[datetime]:
    parsed = cron.parse(expression, timezone, allow_seconds=seconds)
    out: list[datetime] = []
    moment = after
    for _ in range(n):
        found = parsed.next_after(moment)
        assert found is not None
        out.append(found)
        moment = found
    return out


def test_berlin_spring_forward_fires_once_shifted_by_the_gap() -> None:
    # 2025-03-30 02:00 CET → 03:00 CEST: 02:30 does not exist that night; it fires at 03:30 CEST
    assert fires("30 2 * * *", "Europe/Berlin", utc(2025, 3, 28, 12), 4) == [
        utc(2025, 3, 29, 1, 30),  # 02:30 CET
        utc(2025, 3, 30, 1, 30),  # the missing 02:30, as 03:30 CEST
        utc(2025, 3, 31, 0, 30),  # 02:30 CEST
        utc(2025, 4, 1, 0, 30),
    ]


def test_berlin_fall_back_fires_a_fixed_time_once() -> None:
    # 2025-10-26 03:00 CEST → 02:00 CET: 02:30 happens twice; a daily job runs at the first one
    assert fires("30 2 * * *", "Europe/Berlin", utc(2025, 10, 24, 12), 4) == [
        utc(2025, 10, 25, 0, 30),  # 02:30 CEST
        utc(2025, 10, 26, 0, 30),  # 02:30 CEST, first occurrence; not again at 01:30 UTC
        utc(2025, 10, 27, 1, 30),  # 02:30 CET
        utc(2025, 10, 28, 1, 30),
    ]


def test_four_fixed_times_in_the_repeated_hour_fire_once_each_and_the_schedule_goes_on() -> None:
    # every fire time of the repeated hour has a second occurrence to step over: the schedule
    # once came out of that hour with no next fire time at all, and never fired again
    assert fires("0,15,30,45 2 * * *", "Europe/Berlin", utc(2025, 10, 25, 12), 6) == [
        utc(2025, 10, 26, 0, 0),  # 02:00 CEST
        utc(2025, 10, 26, 0, 15),
        utc(2025, 10, 26, 0, 30),
        utc(2025, 10, 26, 0, 45),  # 02:45 CEST; not again in CET
        utc(2025, 10, 27, 1, 0),  # 02:00 CET, the next day
        utc(2025, 10, 27, 1, 15),
    ]
    # asked from inside the repeated hour (a scheduler that was down), it finds the next day
    assert fires("0,15,30,45 2 * * *", "Europe/Berlin", utc(2025, 10, 26, 1, 20), 1) == [
        utc(2025, 10, 27, 1, 0)
    ]


def test_a_daily_job_at_a_skipped_midnight_fires_that_day_shifted_by_the_gap() -> None:
    # Chile, 2025-09-07 00:00 -04 → 01:00 -03: midnight does not exist that day
    assert fires("0 0 * * *", "America/Santiago", utc(2025, 9, 5, 12), 3) == [
        utc(2025, 9, 6, 4, 0),  # 00:00 -04
        utc(2025, 9, 7, 4, 0),  # the missing 00:00, as 01:00 -03
        utc(2025, 9, 8, 3, 0),  # 00:00 -03
    ]


def test_a_wildcard_schedule_keeps_its_cadence_through_the_repeated_hour() -> None:
    assert fires("*/30 * * * *", "Europe/Berlin", utc(2025, 10, 26, 0, 0), 5) == [
        utc(2025, 10, 26, 0, 30),  # 02:30 CEST
        utc(2025, 10, 26, 1, 0),  # 02:00 CET (again, on the wall clock)
        utc(2025, 10, 26, 1, 30),  # 02:30 CET
        utc(2025, 10, 26, 2, 0),
        utc(2025, 10, 26, 2, 30),
    ]


def test_new_york_nine_am_in_utc_across_both_changes() -> None:
    assert fires("0 9 * * *", "America/New_York", utc(2025, 3, 7, 15), 3) == [
        utc(2025, 3, 8, 14),  # EST, UTC-5
        utc(2025, 3, 9, 13),  # EDT from this morning, UTC-4
        utc(2025, 3, 10, 13),
    ]
    assert fires("0 9 * * *", "America/New_York", utc(2025, 11, 1, 14), 3) == [
        utc(2025, 11, 2, 14),  # EST again, UTC-5
        utc(2025, 11, 3, 14),
        utc(2025, 11, 4, 14),
    ]


def test_weekdays_count_from_sunday_as_crontab_does() -> None:
    friday = utc(2025, 11, 21, 12)
    assert [d.strftime("%a") for d in fires("0 9 * * 1-5", "UTC", friday, 5)] == [
        "Mon", "Tue", "Wed", "Thu", "Fri",
    ]  # fmt: skip
    assert [d.strftime("%a") for d in fires("0 9 * * 0", "UTC", friday, 2)] == ["Sun", "Sun"]
    assert [d.strftime("%a") for d in fires("0 9 * * 7", "UTC", friday, 1)] == ["Sun"]
    assert [d.strftime("%a") for d in fires("0 9 * * 5-7", "UTC", friday - timedelta(days=1), 3)] == [
        "Fri", "Sat", "Sun",
    ]  # fmt: skip
    assert [d.strftime("%a") for d in fires("0 9 * * */2", "UTC", friday, 4)] == [
        "Sat", "Sun", "Tue", "Thu",
    ]  # fmt: skip
    assert [d.strftime("%a") for d in fires("0 9 * * mon,FRI", "UTC", friday, 2)] == ["Mon", "Fri"]


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # crontab: the 13th, and every Friday
    assert fires("0 0 13 * 5", "UTC", utc(2025, 1, 1), 4) == [
        utc(2025, 1, 3), utc(2025, 1, 10), utc(2025, 1, 13), utc(2025, 1, 17),
    ]  # fmt: skip


def test_macros_and_seconds() -> None:
    assert fires("@hourly", "UTC", utc(2025, 1, 1, 0, 0, 1), 2) == [utc(2025, 1, 1, 1), utc(2025, 1, 1, 2)]
    assert fires("*/20 * * * * *", "UTC", utc(2025, 1, 1), 3, seconds=True) == [
        utc(2025, 1, 1, 0, 0, 20), utc(2025, 1, 1, 0, 0, 40), utc(2025, 1, 1, 0, 1),
    ]  # fmt: skip
    with pytest.raises(cron.CronError) as refused:
        cron.parse("* * * * * *", "UTC", allow_seconds=False)
    assert refused.value.field == "cron"


@pytest.mark.parametrize(
    "expression",
    ["61 * * * *", "* * *", "every day", "*/0 * * * *", "0 0 * * 8", "0 0 * * 5-2", "L * * * *",
     "0 0 30 2 *", "0 0 31 4,6 *", "@reboot", "* * * * * * *"],
)  # fmt: skip
def test_bad_expressions_name_the_cron_field(expression: str) -> None:
    with pytest.raises(cron.CronError) as error:
        cron.parse(expression, "UTC", allow_seconds=True)
    assert error.value.field == "cron"


@pytest.mark.parametrize("timezone", ["Mars/Olympus", "../../etc/passwd", "", "Europe/Berlin ", "x" * 65])
def test_bad_time_zones_name_the_timezone_field(timezone: str) -> None:
    with pytest.raises(cron.CronError) as error:
        cron.parse("* * * * *", timezone, allow_seconds=False)
    assert error.value.field == "timezone"


def test_a_date_that_exists_only_in_leap_years_is_accepted() -> None:
    assert fires("0 0 29 2 *", "UTC", utc(2025, 1, 1), 2) == [utc(2028, 2, 29), utc(2032, 2, 29)]


# --- planning fires --------------------------------------------------------------------------------

EVERY_SECOND = cron.parse("* * * * * *", "UTC", allow_seconds=True)
DAILY = cron.parse("0 3 * * *", "UTC", allow_seconds=False)


def test_fires_within_the_grace_each_make_their_own_task() -> None:
    now = utc(2025, 1, 1, 12, 0, 10, 500_000)
    plan = plan_fires(EVERY_SECOND, due_at=utc(2025, 1, 1, 12, 0, 7), now=now, grace_s=60)
    assert [(f.time.second, f.coalesced, f.on_time) for f in plan.fires] == [
        (7, 0, True), (8, 0, True), (9, 0, True), (10, 0, True),
    ]  # fmt: skip
    assert plan.next_run_at == utc(2025, 1, 1, 12, 0, 11)


def test_fires_missed_beyond_the_grace_are_coalesced_into_one() -> None:
    now = utc(2025, 1, 4, 5)
    plan = plan_fires(DAILY, due_at=utc(2025, 1, 1, 3), now=now, grace_s=60)
    assert [(f.time, f.coalesced, f.on_time) for f in plan.fires] == [(utc(2025, 1, 1, 3), 3, False)]
    assert plan.next_run_at == utc(2025, 1, 5, 3)


def test_missed_and_on_time_fires_together() -> None:
    now = utc(2025, 1, 1, 12, 1, 0)
    plan = plan_fires(EVERY_SECOND, due_at=utc(2025, 1, 1, 12, 0, 0), now=now, grace_s=2)
    assert (plan.fires[0].time, plan.fires[0].coalesced, plan.fires[0].on_time) == (
        utc(2025, 1, 1, 12, 0, 0), 57, False,
    )  # fmt: skip  # 12:00:00 stands for itself and 12:00:01..12:00:57
    assert [(f.time.second, f.on_time) for f in plan.fires[1:]] == [(58, True), (59, True), (0, True)]
    assert plan.next_run_at == utc(2025, 1, 1, 12, 1, 1)


def test_counting_missed_fires_is_bounded() -> None:
    now = utc(2025, 1, 2)
    plan = plan_fires(EVERY_SECOND, due_at=utc(2025, 1, 1), now=now, grace_s=0)
    assert plan.fires[0].coalesced == MAX_COALESCED_COUNT
    assert [f.time for f in plan.fires[1:]] == [now]  # skipped ahead to the grace window
    assert plan.next_run_at == now + timedelta(seconds=1)
