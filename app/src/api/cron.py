"""Cron expressions with crontab semantics, computed by APScheduler 3 in the schedule's time zone.

APScheduler's `CronTrigger.from_crontab` differs from crontab(5) in three ways this module fixes:
- day-of-week numbers: crontab counts 0 (or 7) as Sunday, APScheduler 3 as Monday (its issue
  #286); the field is rewritten to weekday names, so "1-5" means Monday to Friday;
- restricted day-of-month *and* day-of-week fields match when either matches (crontab), not both;
- a wall-clock time that occurs twice when clocks go back fires once, at its first occurrence,
  for jobs at fixed times ("30 2 * * *"); jobs whose minute or hour field starts with `*` keep
  their cadence through the repeated hour, as Vixie cron does.
A wall-clock time skipped when clocks go forward fires once, shifted by the gap (02:30 in a
02:00→03:00 change fires at 03:30 local time), as PEP 495 and java.time resolve it.

Jobs at fixed times are planned on the wall clock: the next matching local time is found as if the
zone had no changes, then read in the zone (fold 0: the first occurrence of a repeated time, and
a skipped time moved on by the gap). Computed on the zone's real instants instead, a skipped time
is not there to match (a daily job at a skipped midnight lost its day) and the repeated hour
has to be stepped through fire by fire.

Every time returned is UTC. Five fields, or six with seconds first where the caller allows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
FIELDS_5 = ("minute", "hour", "day", "month", "day_of_week")
FIELDS_6 = ("second", *FIELDS_5)
_ITEM = re.compile(r"^(\*|[0-9]{1,2}|[A-Za-z]{3})(-([0-9]{1,2}|[A-Za-z]{3}))?(/[0-9]{1,2})?$")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 = Sunday
_MICROSECOND = timedelta(microseconds=1)
_MAX_REPEATED_FIRES = 2 * 3600 + 1  # one per second of the longest repeated period (2 h)
MAX_TIMEZONE_LENGTH = 64


class CronError(ValueError):
    """The expression or the time zone is not valid; `field` names which ("cron" or "timezone")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# What ZoneInfo opens beyond the IANA zones: the server's own `localtime` (each replica's may differ)
# and the `posix/` and `right/` trees (`right/` counts leap seconds: its fires come 27 s late).
@cache
def _iana_names() -> frozenset[str]:
    return frozenset(available_timezones() - {"localtime"})


def check_iana(name: str) -> None:
    """CronError naming the timezone field unless `name` is an IANA zone (for schedules written
    from now on; stored ones keep firing in whatever zone they were accepted in)."""
    if name not in _iana_names():
        raise CronError("timezone", f"unknown time zone {name!r} (use an IANA name like Europe/Berlin)")


def zone(name: str) -> ZoneInfo:
    """An IANA time zone, or CronError naming the timezone field."""
    if not name or len(name) > MAX_TIMEZONE_LENGTH:
        raise CronError("timezone", "not an IANA time zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise CronError(
            "timezone", f"unknown time zone {name!r} (use an IANA name like Europe/Berlin)"
        ) from None


def _weekday(token: str) -> int:
    if token.isdigit():
        number = int(token)
        if not 0 <= number <= 7:
            raise CronError("cron", f"day-of-week {number} is out of range 0-7")
        return number % 7
    try:
        return _WEEKDAYS.index(token.lower())
    except ValueError:
        raise CronError("cron", f"unknown day-of-week {token!r}") from None


def _day_of_week(field: str) -> str:
    """A crontab day-of-week field as APScheduler weekday names (it counts Monday as 0)."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for item in field.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise CronError("cron", f"invalid day-of-week item {item!r}")
        start, _, end, step = match.groups()
        if start == "*":
            if end is not None:
                raise CronError("cron", f"invalid day-of-week item {item!r}")
            low, high = 0, 6
        else:
            low = 7 if start == "7" else _weekday(start)  # "7-7" is Sunday alone
            high = low if end is None else _weekday(end)
            if end is not None and end.isdigit() and int(end) == 7:
                high = 7  # "5-7": Friday to Sunday
            if high < low:
                raise CronError("cron", f"day-of-week range {item!r} runs backwards")
            if step is not None and end is None:
                high = max(low, 6)  # "1/2": from Monday, every second day, as crontab reads it
        stride = int(step[1:]) if step else 1
        if stride < 1:
            raise CronError("cron", f"step in {item!r} must be at least 1")
        days.update(day % 7 for day in range(low, high + 1, stride))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


@dataclass(frozen=True)
class Cron:
    """A parsed schedule: `next_after(moment)` gives the next fire time in UTC."""

    expression: str
    timezone: ZoneInfo
    trigger: Any  # CronTrigger or OrTrigger in the zone; APScheduler ships no type hints
    wall_clock: Any  # the same fields on a clock without changes (UTC), for fixed times
    fixed_time: bool  # no `*` in the second, minute or hour field: fires once per wall time

    def next_after(self, moment: datetime) -> datetime | None:
        """The first fire time strictly after `moment` (UTC), or None if there is none."""
        if not self.fixed_time:
            candidate = self.trigger.get_next_fire_time(
                None, (moment + _MICROSECOND).astimezone(self.timezone)
            )
            return None if candidate is None else candidate.astimezone(UTC)
        wall = moment.astimezone(self.timezone).replace(tzinfo=UTC, fold=0)
        # In a repeated hour, the wall times after `moment`'s were first passed an hour ago: their
        # first occurrences lie before `moment` and are stepped over (at most one per fire time
        # in that hour).
        for _ in range(_MAX_REPEATED_FIRES):
            candidate = self.wall_clock.get_next_fire_time(None, wall + _MICROSECOND)
            if candidate is None:
                return None
            fire: datetime = candidate.replace(tzinfo=self.timezone, fold=0).astimezone(UTC)
            if fire > moment:
                return fire
            wall = candidate
        return None  # pragma: no cover - more fire times than seconds in a repeated hour

    def next_at_or_after(self, moment: datetime) -> datetime | None:
        return self.next_after(moment - _MICROSECOND)


def parse(expression: str, timezone: str, *, allow_seconds: bool) -> Cron:
    """Parse a crontab expression in an IANA time zone; CronError names the failing field."""
    return _parse(expression.strip(), timezone, allow_seconds)


@lru_cache(maxsize=2048)
def _parse(expression: str, timezone: str, allow_seconds: bool) -> Cron:
    tz = zone(timezone)
    text = MACROS.get(expression.lower(), expression)
    values = text.split()
    names: tuple[str, ...]
    if len(values) == 6 and allow_seconds:
        names = FIELDS_6
    elif len(values) == 5:
        names = FIELDS_5
    else:
        expected = "5 (or 6 with seconds first)" if allow_seconds else "5"
        raise CronError(
            "cron",
            f"expected {expected} fields: minute hour day-of-month month day-of-week; got {len(values)}",
        )
    fields = dict(zip(names, values, strict=True))
    for name, value in fields.items():
        for item in value.split(","):
            if _ITEM.match(item) is None:
                raise CronError("cron", f"invalid {name.replace('_', '-')} field {value!r}")
    # crontab: with both day fields restricted (neither starts with `*`), either one matching fires
    # (decided on the field as written, before day-of-week names replace numbers)
    either_day = not fields["day"].startswith("*") and not fields["day_of_week"].startswith("*")
    fields["day_of_week"] = _day_of_week(fields["day_of_week"])
    variants = [{**fields, "day_of_week": "*"}, {**fields, "day": "*"}] if either_day else [fields]
    # A date that never exists ("0 0 30 2 *") would send APScheduler year by year to 9999 at
    # every computation: drop such variants, probing over a bounded span of years that holds
    # every weekday/leap-year combination (the Gregorian 28-year cycle).
    now = datetime.now(UTC)
    span = {"year": f"{now.year}-{now.year + 29}"}
    firing = [v for v in variants if _fires(_cron_trigger({**v, **span}, tz), now)]
    if not firing:
        raise CronError("cron", "the expression never fires")
    fixed = not any(fields.get(name, "0").startswith("*") for name in ("second", "minute", "hour"))
    return Cron(expression, tz, _either(firing, tz), _either(firing, UTC), fixed)


def _either(variants: list[dict[str, str]], tz: Any) -> Any:
    triggers = [_cron_trigger(v, tz) for v in variants]
    return triggers[0] if len(triggers) == 1 else OrTrigger(triggers)


def _cron_trigger(fields: dict[str, str], tz: Any) -> Any:
    try:
        return CronTrigger(**fields, timezone=tz)
    except ValueError as exc:
        raise CronError("cron", str(exc)) from None


def _fires(trigger: Any, now: datetime) -> bool:
    return trigger.get_next_fire_time(None, now) is not None
