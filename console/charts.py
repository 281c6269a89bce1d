"""Server-drawn SVG charts for the dashboard: geometry only, no database and no
JavaScript, so they work offline and in any browser. Templates draw the shapes."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 14, 30


@dataclass(frozen=True)
class Bar:
    day: date
    index: int
    tokens: int
    requests: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Tick:
    value: int
    y: float


@dataclass(frozen=True)
class Label:
    text: str
    x: float


@dataclass(frozen=True)
class DailyChart:
    width: int
    height: int
    bars: list[Bar]
    previous_points: str  # an SVG polyline's points
    previous: list[tuple[int, int]]  # (day index, tokens) of the period before
    ticks: list[Tick]
    labels: list[Label]
    plot_left: int
    plot_bottom: float
    plot_right: int
    top: int

    @property
    def has_data(self) -> bool:
        return any(b.tokens for b in self.bars) or any(t for _, t in self.previous)


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2, 2.5 or 5 × 10^n at or above `value` (at least 10)."""
    if value <= 10:
        return 10
    magnitude = 10 ** (len(str(value)) - 1)
    for step in (1, 2, 2.5, 5, 10):
        candidate = int(step * magnitude)
        if candidate >= value:
            return candidate
    return 10 * magnitude


def daily_chart(*, first_day: date, days: int, current: dict[date, tuple[int, int]],
                previous_first_day: date | None, previous: dict[date, tuple[int, int]],
                through: date | None = None) -> DailyChart:
    """Bars for each day of the period from `first_day` (`days` of them; days after
    `through` are left empty), and the period before as a line aligned by day of
    period. `current`/`previous` map a day to (tokens, requests)."""
    days = max(days, 1)
    series = []
    for i in range(days):
        day = first_day + timedelta(days=i)
        tokens, requests = current.get(day, (0, 0)) if through is None or day <= through else (0, 0)
        series.append((i, day, tokens, requests))
    before = []
    if previous_first_day is not None:
        for i in range(days):
            day = previous_first_day + timedelta(days=i)
            before.append((i, previous.get(day, (0, 0))[0]))
    top_value = nice_ceiling(max([t for _, _, t, _ in series] + [t for _, t in before] + [0]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / days
    bar_w = max(2.0, step * 0.7)
    bottom = TOP + plot_h

    def y_of(value: int) -> float:
        return round(bottom - plot_h * max(0, value) / top_value, 1)

    bars = [Bar(day, i, tokens, requests, round(LEFT + i * step + (step - bar_w) / 2, 1), y_of(tokens),
                round(bar_w, 1), round(bottom - y_of(tokens), 1)) for i, day, tokens, requests in series]
    points = " ".join(f"{round(LEFT + i * step + step / 2, 1)},{y_of(t)}" for i, t in before)
    ticks = [Tick(top_value * k // 4, y_of(top_value * k // 4)) for k in range(5)]
    every = 1 if days <= 10 else 5 if days <= 45 else 30
    labels = [Label(f"{day:%b} {day.day}", round(LEFT + i * step + step / 2, 1))
              for i, day, _, _ in series if i % every == 0]
    return DailyChart(WIDTH, HEIGHT, bars, points, before, ticks, labels, LEFT, bottom, WIDTH - RIGHT, TOP)


@dataclass(frozen=True)
class BreakdownRow:
    label: str
    tokens: int
    requests: int
    share: float  # 0..100, for the bar's width only


def breakdown_rows(items, *, total: int) -> list[BreakdownRow]:
    return [BreakdownRow(i.label, i.tokens, i.requests, round(100 * i.tokens / total, 1) if total > 0 else 0.0)
            for i in items]
