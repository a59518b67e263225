"""Fleets of limiters against one quota of every shape, in simulated time (bench/fleet_sim.py:
the real AdaptiveLimiter with its clock replaced, the stand-in's own quotas, the describer's
waits after a 429). Fast and deterministic: one seed a case, no sleeping.

The issue's targets, while events wait: >= 0.90 of the quota and <= 5 % of calls refused
(<= 8 % at 8 instances x 20/s); the short HTTP backfill >= 0.85 of the quota and <= 10 %
refused; no instance stops calling for longer than CAPTION_RETRY_MAX_WAIT. Two kinds of case
are held to what can be had instead, each said where it is:

- 1 and 2 instances at 50/s: 32 calls in flight at a mean latency of 1.44 s carry 22 calls a
  second an instance (Little's law), so the quota is out of reach; held to what they carry.
- a quota counted over one second without a burst (``sliding-second``, ``vertex``) shared by
  four or eight instances: evenly paced senders that cannot see each other still collide in
  some seconds. Eight senders at random phases into 20/s let through at most about 18.0
  calls a second with 5 % refused, 18.3 with 8 % (bench/RESULTS.md "Pacing"); the limiter
  is held to 0.87 of the quota there.
"""

from __future__ import annotations

import asyncio

import pytest
from bench.fleet_sim import (
    HELD_OUT,
    MAX_WAIT,
    Scenario,
    images_for,
    limiter_factory,
    simulate,
)

from captioner_dev.gemini_server.quota import QUOTA_SHAPES

MAKE = limiter_factory({})
FLEETS = [(1, 20.0), (2, 20.0), (4, 20.0), (8, 20.0), (4, 50.0), (8, 50.0)]
STRICT = ("sliding-second", "vertex")  # counted per second, no burst allowed


def _run(scenario: Scenario, seed: int = 1) -> dict[str, float]:
    return asyncio.run(simulate(MAKE, scenario, seed=seed))


def _fleet(shape: str, instances: int, quota: float, **kwargs: bool) -> Scenario:
    return Scenario(shape, instances, quota, images=images_for(shape, quota, 2000), **kwargs)


def _targets(shape: str, instances: int, quota: float) -> tuple[float, float]:
    """(least share of the quota used while events wait, most share of calls refused)."""
    refused = 0.08 if (instances, quota) == (8, 20.0) else 0.05
    if shape in STRICT and instances >= 4 and quota == 20.0:
        return 0.87, refused
    return 0.90, refused


@pytest.mark.parametrize("shape", QUOTA_SHAPES)
@pytest.mark.parametrize(("instances", "quota"), FLEETS)
def test_a_fleet_uses_the_quota_of_every_shape_with_few_429s(
    shape: str, instances: int, quota: float
) -> None:
    figures = _run(_fleet(shape, instances, quota))
    used, refused = _targets(shape, instances, quota)
    assert figures["while_backlog"] >= used, figures
    assert figures["refused"] <= refused, figures
    assert figures["gap"] <= MAX_WAIT + 0.5, figures


@pytest.mark.parametrize("shape", QUOTA_SHAPES)
def test_a_lone_instance_under_a_quota_it_cannot_reach_runs_at_its_capacity(shape: str) -> None:
    # 32 calls in flight over a mean latency of 1.2 x e^(0.6^2 / 2) = 1.44 s: 22.3 a second.
    figures = _run(_fleet(shape, 1, 50.0))
    assert figures["while_backlog"] * 50.0 >= 0.9 * 32 / 1.44, figures
    assert figures["refused"] <= 0.01, figures


@pytest.mark.parametrize("shape", QUOTA_SHAPES)
def test_the_short_http_backfill_uses_the_quota_on_every_shape(shape: str) -> None:
    # 210 images at once, concurrency 32, 0.2 s latency, 20/s: ten seconds of quota.
    scenario = Scenario(shape, 1, 20.0, images=210, hold=210, latency=0.2, prepare=0.01)
    figures = _run(scenario)
    assert figures["of_q"] >= 0.85, figures
    assert figures["refused"] <= 0.10, figures


@pytest.mark.parametrize("shape", QUOTA_SHAPES)
@pytest.mark.parametrize(("instances", "quota"), [(4, 50.0), (8, 20.0)])
def test_a_quota_halved_mid_run_is_followed_without_stopping(
    shape: str, instances: int, quota: float
) -> None:
    figures = _run(_fleet(shape, instances, quota, halve=True))
    assert figures["of_q"] >= 0.70, figures  # the drain included, against the quota as it was
    assert figures["refused"] <= (0.10 if instances == 8 else 0.06), figures
    assert figures["gap"] <= MAX_WAIT + 0.5, figures


def test_a_fresh_instance_without_a_quota_fills_its_pool_as_before() -> None:
    # The first request of issue 16: 210 images, 0.5 s latency, 32 slots; the limiter before
    # pacing (2a89276) took 4.01 s here against a perfect pool's 3.28 s (0.82).
    scenario = Scenario("bucket", 1, 1e9, images=210, hold=210, latency=0.5, prepare=0.01)
    figures = _run(scenario)
    assert 210 * 0.5 / 32 / figures["wall"] >= 0.78, figures
    assert figures["refused"] == 0


# -- shapes the constants were not chosen on -------------------------------------------------


@pytest.mark.parametrize(("instances", "quota"), FLEETS)
def test_held_out_a_rolling_minute_is_met_as_the_synchronized_one_is(
    instances: int, quota: float
) -> None:
    figures = _run(_fleet(HELD_OUT[0], instances, quota))
    used, refused = _targets(HELD_OUT[0], instances, quota)
    assert figures["while_backlog"] >= used, figures
    assert figures["refused"] <= refused, figures
    assert figures["gap"] <= MAX_WAIT + 0.5, figures


def test_held_out_spike_arrest_a_lone_instance_paces_itself_under_it() -> None:
    # One request per 1/Q s and no burst at all (Apigee's Spike Arrest): only even pacing
    # gets through it.
    figures = _run(_fleet(HELD_OUT[1], 1, 20.0))
    assert figures["while_backlog"] >= 0.80, figures
    assert figures["refused"] <= 0.02, figures


@pytest.mark.parametrize("instances", [2, 4, 8])
def test_held_out_spike_arrest_a_fleet_keeps_calling(instances: int) -> None:
    # Several senders that cannot see each other collide under a gate of one call per
    # interval whatever they do (a loss system: at best half the gate with half refused);
    # what is asked here is only that no instance gives up for longer than the cap.
    figures = _run(_fleet(HELD_OUT[1], instances, 20.0))
    assert figures["gap"] <= MAX_WAIT + 0.5, figures
    assert figures["while_backlog"] > 0.15, figures
