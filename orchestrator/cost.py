"""What the instance costs: its hourly price (deploy.yaml's ec2.hourly_price, else the spot
price EC2 reports for a spot instance, else the on-demand table shipped in prices.json, dated)
and, from its uptime since it last started, an estimate of the cost so far."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from orchestrator.config import Ec2Config
from orchestrator.ec2 import Instance

PRICES = Path(__file__).with_name("prices.json")


@cache
def price_table() -> dict[str, Any]:
    return json.loads(PRICES.read_text())


def table_price(instance_type: str | None) -> float | None:
    """The on-demand USD per hour prices.json gives the type (None: not in it)."""
    return price_table()["usd_per_hour"].get(instance_type or "")


@dataclass(frozen=True)
class Cost:
    hourly_usd: float | None
    source: str  # where the price comes from
    uptime_hours: float | None  # since the instance last started (None: not running)
    so_far_usd: float | None

    def describe(self) -> str:
        if self.hourly_usd is None:
            return f"price unknown ({self.source})"
        # spot prices can be fractions of a cent
        text = f"${self.hourly_usd:.3f}/hour" if self.hourly_usd >= 0.01 else f"${self.hourly_usd:.5f}/hour"
        text += f" ({self.source})"
        if self.uptime_hours is not None and self.so_far_usd is not None:
            text += f"; up {self.uptime_hours:.1f} h since it started: about ${self.so_far_usd:.2f} so far"
        return text


def estimate(cfg: Ec2Config, inst: Instance, spot_price: Callable[[], float | None],
             now: datetime | None = None) -> Cost:
    """The price per hour and the cost so far; ``spot_price`` asks EC2 (only for a spot instance
    without ec2.hourly_price)."""
    hourly, source = _hourly(cfg, inst, spot_price)
    uptime = None
    if inst.state == "running" and inst.launch_time is not None:
        now = now or datetime.now(timezone.utc)
        uptime = max(0.0, (now - inst.launch_time).total_seconds() / 3600)
    so_far = hourly * uptime if hourly is not None and uptime is not None else None
    return Cost(hourly, source, uptime, so_far)


def _hourly(cfg: Ec2Config, inst: Instance, spot_price: Callable[[], float | None]) -> tuple[float | None, str]:
    if cfg.hourly_price is not None:
        return cfg.hourly_price, "ec2.hourly_price"
    if inst.spot:
        price = spot_price()
        if price is not None:
            return price, f"current spot price in {inst.zone or cfg.region}"
    table = price_table()
    price = table_price(inst.instance_type)
    if price is None:
        return None, f"{inst.instance_type} is not in orch's price table: set ec2.hourly_price"
    what = "no spot price from EC2: its on-demand price" if inst.spot else "on-demand"
    return price, f"{what}, {table['region']} prices of {table['date']}; ec2.hourly_price overrides"
