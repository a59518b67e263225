"""Gemini calls paced at a rate learnt from the service's 429s, whatever shape its quota has.

A quota is a rate. Calls that leave together are a burst, and a quota counted per second
(or one that throttles "second-level spikes", as Google says of Vertex AI's Standard
PayGo) refuses a burst even when the average is under it; Google asks clients to spread
their traffic evenly. So the limiter controls two things:

- **Calls in flight**, at most ``maximum`` (CAPTION_MAX_CONCURRENCY): the capacity of one
  instance (Little's law: rate x latency). A new instance opens at a quarter of it
  (``slow_start_initial``) and, until the first 429, adds ``slow_start_gain`` calls per
  success (the window triples per round); instances start together, and each opening with
  its maximum would spend the quota's first second on 429s.
- **The pace** calls leave at, evenly spaced by a token bucket holding ``burst`` seconds of
  the rate (at least one call). In slow start the pace is ``slow_start_pace`` times the
  window per latency, so a round is spread over a quarter of a latency and the first 429
  comes back (within milliseconds) before the rest of the round has left. From the first
  429 on, the pace is a rate learnt by AIMD (rate.py), and the window stays at the cap.

The rate's AIMD (``RateSettings``): a 429 for a call sent after the last cut measures the
*ceiling*, the calls a second the service let through over the last ``window`` seconds
(never across a pause), and cuts the rate to ``decrease`` (0.7) of it, so the excess
drains; the rate then climbs back within ``recovery`` (1 s) to ``recover`` (0.9) of the
ceiling, and from there creeps by ``creep`` calls a second per second, the same step for
every instance of a fleet (equal additive steps and proportional cuts even shares out:
the instance sending more is the likelier to meet the next 429), plus ``creep_share`` of
its own ceiling per second, so that a lone instance with a large quota gets back to it in
seconds, not minutes. Past 1.1 times the ceiling the step doubles each second without a
429 (a raised quota, or a fleet that shrank). Only paced calls grow the rate: an instance
that has little to send does not promise itself a rate it never tried. A refusal of a call
sent before the cut does not cut again (TCP's one cut per window) but lowers the ceiling
by the one call the measurement took for accepted.

A 429 that names a delay (RetryInfo) holds every new call until it is over, plus up to
half as long again at random (``pause_jitter``) so that the instances of a fleet told the
same delay at the same moment do not come back together; never for longer than
``max_pause`` (CAPTION_RETRY_MAX_WAIT), and when capped the jitter spreads them below it.
The first call after a pause, refused, does not cut the rate: the pause was short (the
Gemini API names whole seconds, rounded down), not the rate high. A per-minute quota thus
costs an instance one or two refusals a minute and no lasting cut: the burst at the start
of a minute passes, the 429 at its end pauses the instance until the next.

Why it should hold on quotas nobody modelled: the rate is measured from what the service
let through, in whatever unit it counts, over a few seconds; sending evenly at that rate
meets any quota whose window is a second or longer without a burst to refuse; and the
pause, not the rate, absorbs a window that must refill (a minute's). The constants were
chosen in bench/fleet_sim.py on the five shapes of the stand-in (quota.py) and checked on
two it was not tuned on; bench/RESULTS.md "Pacing" has the figures.
"""

from captioner.limiter.core import AdaptiveLimiter, LimiterStats, Slot, slow_start_initial
from captioner.limiter.rate import RateControl, RateSettings

__all__ = [
    "AdaptiveLimiter",
    "LimiterStats",
    "RateControl",
    "RateSettings",
    "Slot",
    "slow_start_initial",
]
