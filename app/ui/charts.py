"""Inline SVG charts drawn on the server: no chart library, no script, nothing fetched."""

from __future__ import annotations

from dataclasses import dataclass

from app.src.database.console import Series

WIDTH = 360
HEIGHT = 48
PAD = 2


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class Chart:
    """Bars: completions per minute; line: the longest start delay per minute (own scale)."""

    width: int
    height: int
    bars: list[Bar]
    lag_points: str  # SVG polyline points, empty when no minute had completions
    peak: int
    peak_lag_s: float
    label: str


def throughput_chart(series: Series) -> Chart:
    n = max(len(series.completed), 1)
    step = WIDTH / n
    inner = HEIGHT - 2 * PAD
    peak = max(series.completed, default=0)
    bars = []
    for i, value in enumerate(series.completed):
        if value <= 0:
            continue
        h = max(1.0, inner * value / peak)
        bars.append(Bar(x=round(i * step, 2), y=round(HEIGHT - PAD - h, 2), width=round(step * 0.8, 2),
                        height=round(h, 2)))  # fmt: skip
    lags = [lag for lag in series.max_lag_s if lag is not None]
    peak_lag = max(lags, default=0.0)
    points = []
    if lags:
        scale = peak_lag or 1.0
        for i, lag in enumerate(series.max_lag_s):
            if lag is not None:
                x = round(i * step + step * 0.4, 2)
                y = round(HEIGHT - PAD - inner * lag / scale, 2)
                points.append(f"{x},{y}")
    total = sum(series.completed)
    label = (
        f"{total} completed in the last {n} minutes, peak {peak} per minute, "
        f"longest start delay {peak_lag:.1f} s"
    )
    return Chart(WIDTH, HEIGHT, bars, " ".join(points), peak, peak_lag, label)
