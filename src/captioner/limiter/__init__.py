"""Gemini calls paced at a rate learnt from the service's 429s, whatever shape its quota has.

A quota is a rate. Calls that leave together are a burst, and a quota counted per second
(or one that throttles "second-level spikes", as Google says of Vertex AI's Standard
PayGo) refuses a burst even when the average is under it; Google asks clients to spread
their traffic evenly. So the limiter controls two things:

- **Calls in flight**, at most ``maximum`` (CAPTION_MAX_CONCURRENCY): the capacity of one
  instance (Little's law: rate x latency). A new instance opens at a quarter of it
  (``slow_start_initial``) and, until the first 429, adds ``slow_start_gain`` (2) calls per
  success: the window triples per round. Instances start together, and each opening with
  its maximum would spend the quota's first second on 429s.
- **The pace** calls leave at, evenly spaced by a token bucket holding ``burst`` (0.05)
  seconds of the rate (at least one call). Before any answer, the opening window leaves
  over ``opening`` (0.1) seconds; in slow start the pace is ``slow_start_pace`` (2) times
  the window per latency, a round spread over half a latency, so that the first 429 (back
  within milliseconds) stops an instance a few calls past the quota, not a round past it.
  From the first 429 on the pace is a rate learnt by AIMD (rate.py), and the window stays
  at the cap.

The rate's AIMD (``RateSettings``, rate.py): a 429 for a call sent after the last cut
measures the *ceiling*, the calls a second the service let through over the last
``window`` (3) seconds, never across a pause (for paced calls, the rate times the share
let through; enough calls since the last cut measure a quota that changed), and cuts the
rate to ``decrease`` (0.85) of it; the rate climbs back within ``recovery`` (1 s) to
``recover`` (0.95) of the ceiling, then creeps. The creep is ``creep`` (0.005) calls a
second per second, the same for every instance of a fleet (equal additive steps and
proportional cuts even out shares: the instance sending more meets more 429s and gives
up more at each), plus ``creep_share`` (0.0005) times the ceiling squared: with a step in
the square of its share, the share of calls refused, cuts a second times what each cut
gives up, is the same for a lone instance at 50/s as for one of eight at 2.5/s, so a lone
instance gets back to its quota in seconds, not minutes. Past 1.1 times the ceiling the
step doubles every second (a raised quota, a fleet that shrank). Only calls that left at
the pace grow the rate: an instance with little to send does not promise itself a rate it
never tried.

What a measurement may say is bounded: the ceiling is at least ``held`` (0.25) of what was
sent (an instance whose opening calls were all refused, the others having taken the
quota's first second, must not read a share of nothing); fewer than ``min_calls`` (10)
calls measure nothing, and the cut is then one step below the rate (a share of two calls
a second, cut on one refusal in two, fell to a call in 14 s); a ceiling measured over less
than a second (a fresh instance's first calls) is a guess the rate grows away from by
``guess_growth`` (20 %) a second. After a cut, refusals for a second more are the quota
still holding what was sent before it: they neither cut again (TCP's one cut per window)
nor count in the next measurement, and while they come the rate does not climb back. A
refusal of a call sent before the cut lowers the ceiling by the one call the measurement
counted as let through.

A 429 that names a delay (RetryInfo) holds every new call until it is over, plus up to
half as long again at random (``pause_jitter``) so that the instances of a fleet told the
same delay at the same moment do not come back together; never for longer than
``max_pause`` (CAPTION_RETRY_MAX_WAIT), and when capped the jitter spreads them below the
cap instead. The first call after a pause, refused, does not cut the rate: the pause was
short (the Gemini API names whole seconds, rounded down), not the rate high. A per-minute
quota thus costs an instance one or two refusals a minute and no lasting cut: the burst
at the start of a minute passes, the 429 at its end pauses the instance until the next.

Why it should hold on quotas nobody modelled: the rate is learnt from what the service
let through, over seconds, whatever unit the service counts in; sending evenly at that
rate meets any quota counted over a second or longer without a burst to refuse; and a
window that must refill (a minute's) is waited out by the pause it names, not learnt as a
lower rate. The constants were chosen in bench/fleet_sim.py on the five shapes of the
stand-in (captioner_dev/gemini_server/quota.py) and checked on two it was not tuned on;
bench/RESULTS.md "Pacing" has the figures, and where no sender can do better.
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
