"""The forecast and the chart geometry: pure functions, no database."""
from __future__ import annotations

from datetime import date, datetime, timezone as dt_timezone
from decimal import Decimal

from console.charts import daily_chart, nice_ceiling
from metering.selectors import usage_forecast
from console.templatetags.usage_format import cents_usd, rate, signed, thousands, usd

START = datetime(2026, 11, 1, tzinfo=dt_timezone.utc)
END = datetime(2026, 12, 1, tzinfo=dt_timezone.utc)


def test_forecast_at_the_current_pace():
    # 10 days in, 20,000 of 50,000 used: 2,000 a day, limit on day 25, 60,000 by the end
    f = usage_forecast(used=20_000, limit=50_000, cap=100_000, overage_rate=Decimal("0.001"), period_start=START,
                       period_end=END, now=datetime(2026, 11, 11, tzinfo=dt_timezone.utc))
    assert f.pace_per_day == 2000 and f.projected_used == 60_000 and f.days_left == 20
    assert f.limit_reached_at == datetime(2026, 11, 26, tzinfo=dt_timezone.utc) and not f.already_reached
    assert f.projected_overage_tokens == 10_000 and f.projected_overage_charge == Decimal("10.00")


def test_forecast_is_capped_and_knows_a_reached_limit():
    f = usage_forecast(used=90_000, limit=50_000, cap=100_000, overage_rate=Decimal("0.0008"), period_start=START,
                       period_end=END, now=datetime(2026, 11, 16, tzinfo=dt_timezone.utc))
    assert f.already_reached and f.limit_reached_at is None
    assert f.projected_used == 100_000 and f.projected_overage_charge == Decimal("40.00")


def test_forecast_is_quiet_in_the_first_hour_and_without_use():
    f = usage_forecast(used=500, limit=10_000, cap=15_000, overage_rate=Decimal("0.001"), period_start=START,
                       period_end=END, now=datetime(2026, 11, 1, 0, 30, tzinfo=dt_timezone.utc))
    assert f.pace_per_day == 0 and f.limit_reached_at is None and f.projected_used == 500
    f = usage_forecast(used=0, limit=10_000, cap=10_000, overage_rate=Decimal("0.001"), period_start=START,
                       period_end=END, now=datetime(2026, 11, 20, tzinfo=dt_timezone.utc))
    assert f.projected_overage_charge == Decimal("0.00") and f.days_left == 11


def test_chart_has_a_bar_per_day_and_the_previous_period_aligned_by_day():
    chart = daily_chart(first_day=date(2026, 11, 1), days=30, current={date(2026, 11, 3): (1200, 4)},
                        previous_first_day=date(2026, 10, 1), previous={date(2026, 10, 3): (600, 2)},
                        through=date(2026, 11, 20))
    assert len(chart.bars) == 30 and chart.bars[2].tokens == 1200 and chart.bars[2].requests == 4
    assert chart.previous[2] == (2, 600) and len(chart.previous_points.split()) == 30
    tallest = chart.bars[2]
    assert tallest.height > 0 and all(b.height == 0 for b in chart.bars if b.index != 2)
    assert chart.ticks[-1].value == 2000 and chart.ticks[0].value == 0  # 1,200 rounds up to a nice 2,000


def test_nice_ceiling():
    assert [nice_ceiling(v) for v in (0, 7, 11, 199, 201, 2400, 2600, 9001)] == [10, 10, 20, 200, 250, 2500, 5000, 10000]


def test_number_formats():
    assert thousands(1234567) == "1,234,567" and signed(-300) == "\u2212300" and signed(1200) == "+1,200"
    assert usd(Decimal("1234.565")) == "$1,234.57" and usd("0.234") == "$0.23" and cents_usd(4900) == "$49.00"
    assert rate(Decimal("0.001000")) == "$0.001" and thousands(None) == ""
