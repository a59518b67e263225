"""The rate Gemini calls may leave at, learnt from 429s (AIMD), and how it is measured.

Pure arithmetic on a clock the caller passes in: no asyncio, no sleeping, so that the unit
tests and bench/fleet_sim.py drive it in simulated time.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateSettings:
    """The constants of the rate's AIMD (chosen in bench/fleet_sim.py, see the package doc).

    - ``decrease``: at a 429 the rate drops to this share of the rate the service was
      accepting (the ceiling), so that what the quota holds back drains;
    - ``recover``: then climbs back within ``recovery`` seconds to this share of it;
    - ``creep``: from there, a step the same for every instance of a fleet, in calls a
      second gained per second of pacing, plus ``creep_share`` times the ceiling squared
      (see the package docstring for why the square);
    - past ``probe_from`` times the ceiling without a 429, the step doubles every second,
      up to ``probe_growth`` of the rate a second (a quota that was raised is found again
      in seconds); a ceiling measured over less than ``min_window`` (a fresh instance's
      first calls) is a guess, and the rate grows so from ``recover`` of it;
    - ``window``: the seconds over which the accepted rate is measured at a 429 (at least
      ``min_window``, and never across a pause);
    - ``held``: the ceiling is at least this share of what was sent meanwhile. A few calls
      measured over a second or two say little: an instance of a fleet whose opening calls
      were all refused (the others' took the quota's first second) would read a share of
      nothing and stop calling;
    - ``min_calls``: fewer calls than this in the window measure nothing: the rate is cut by
      one step of ``decrease`` instead; before any rate, fewer than ``first_calls`` set
      none (a fresh instance's first call refused says nothing of its share).
    """

    decrease: float = 0.85
    recover: float = 0.95
    recovery: float = 1.0
    creep: float = 0.005
    creep_share: float = 0.0005
    held: float = 0.25
    min_calls: int = 10
    first_calls: int = 3
    probe_from: float = 1.1
    probe_growth: float = 0.5
    guess_growth: float = 0.2
    window: float = 3.0
    min_window: float = 1.0
    minimum: float = 1 / 30

    def __post_init__(self) -> None:
        if not 0 < self.decrease <= self.recover <= 1:
            raise ValueError("need 0 < decrease <= recover <= 1")
        if self.creep < 0 or self.creep_share < 0 or self.creep + self.creep_share <= 0:
            raise ValueError("need creep >= 0, creep_share >= 0, and one of them > 0")
        if self.recovery <= 0 or self.probe_from < 1 or self.minimum <= 0 or self.probe_growth <= 0:
            raise ValueError("need recovery > 0, probe_from >= 1, minimum > 0, probe_growth > 0")
        if not 0 < self.min_window <= self.window:
            raise ValueError("need 0 < min_window <= window")
        if not 0 <= self.held <= 1 or self.min_calls < 1 or self.first_calls < 1:
            raise ValueError("need 0 <= held <= 1, min_calls >= 1, first_calls >= 1")


class RateControl:
    """The learnt rate (calls a second; None until the first 429) and its AIMD."""

    def __init__(self, settings: RateSettings | None = None) -> None:
        self.settings = settings or RateSettings()
        self.rate: float | None = None
        # The rate the service accepted when it last refused a call: the instance's share.
        self.ceiling: float | None = None
        self.cuts = 0
        self._last_cut = -math.inf
        # The last cut's measurement: [start, end], its length, the lowest it may fall to.
        self._measured: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 0.0)
        self._starts: deque[float] = deque()
        self._refusals: deque[float] = deque()  # start times of the calls refused
        self._since = -math.inf  # no measurement reaches back past this (a pause's end)
        self._first_start: float | None = None
        self._probe_since: float | None = None
        # The last ceiling came from less than ``min_window`` of calls (a fresh instance's
        # first few): a guess, which the rate grows away from as a probe, not a creep.
        self._provisional = False
        self._held_back = -math.inf  # when a refusal was last let pass without a cut

    # -- what happened --------------------------------------------------------------------

    def started(self, now: float) -> None:
        if self._first_start is None:
            self._first_start = now
        self._starts.append(now)
        horizon = now - self.settings.window - 1.0
        while self._starts and self._starts[0] < horizon:
            self._starts.popleft()
        while self._refusals and self._refusals[0] < horizon:
            self._refusals.popleft()

    def paused_until(self, resume_at: float) -> None:
        """Nothing is sent before ``resume_at``: the rate after it is measured from it on."""
        self._since = max(self._since, resume_at)

    def refused(self, started_at: float, now: float, paced: bool = False) -> bool:
        """A 429 for a call started at ``started_at`` (``paced``: it left at the rate, the
        pace holding it back); True when it lowered the rate."""
        s = self.settings
        self._refusals.append(started_at)
        if started_at <= self._last_cut:
            # Sent under the rate before the cut, so it says nothing new (TCP's one cut per
            # window), except that the cut's measurement counted it as let through.
            start, end, length, floor = self._measured
            if self.ceiling is not None and start <= started_at <= end:
                self.ceiling = max(floor, self.ceiling - 1 / length)
                self._lower_to(self.settings.decrease * self.ceiling)
            return False
        if self.rate is not None and started_at - self._since < self._spacing():
            # The first call after a pause, refused: the pause was too short (a 429 names
            # whole seconds, rounded down), not the rate too high. It pauses again.
            return False
        if now - self._last_cut < self.settings.min_window:
            # A cut takes a window to show: a quota that counts per second still holds the
            # calls sent before it. (With RetryInfo the pause covers this; without, as on
            # Vertex AI, three cuts in a row would take the rate to a third.) Nor is the call
            # measured at the next cut: it was refused for what was sent before this one.
            self._refusals.pop()
            with contextlib.suppress(ValueError):
                self._starts.remove(started_at)
            self._held_back = now
            return False
        if self.rate is None and self._counts(now)[0] < s.first_calls:
            # A fresh instance's first call or two, refused: no rate to learn from one
            # call (it would read a quota of a call every few seconds). The pause it names,
            # or the next refusals, tell more.
            return False
        self._cut(now, paced)
        return True

    def succeeded(self, now: float, started_at: float, paced: bool) -> None:
        """A call that started paced (at the rate, not below it) grows the rate."""
        rate, ceiling = self.rate, self.ceiling
        if rate is None or ceiling is None or not paced:
            return
        if now - self._held_back < self.settings.min_window:
            # Refused again inside a cut's hold-off: the cut has not shown yet, and climbing
            # back now would undo it (a quota halved took four cuts so).
            return
        s = self.settings
        if self._provisional and rate >= s.recover * ceiling and s.guess_growth > 0:
            gain = rate * s.guess_growth
        elif rate < s.recover * ceiling:
            gain = (s.recover - s.decrease) * ceiling / s.recovery
        elif rate < s.probe_from * ceiling:
            gain = s.creep + s.creep_share * ceiling**2
            self._probe_since = None
        else:
            # Past the share without a 429: double the step every second.
            if self._probe_since is None:
                self._probe_since = now
            doublings = math.floor(min(now - self._probe_since, 20.0))
            base = s.creep + s.creep_share * ceiling**2
            gain = min(base * 2**doublings, rate * s.probe_growth)
        # Gained per call, so per second of pacing at ``rate`` it is ``gain``.
        self.rate = rate + gain / rate

    # -- measuring ------------------------------------------------------------------------

    def accepted_rate(self, now: float) -> tuple[float, float, float]:
        """(calls a second the service let through, the window's start, its length)."""
        sent, refused, start, length = self._counts(now)
        return max(0, sent - refused) / length, start, length

    def _counts(self, now: float, since: float = -math.inf) -> tuple[int, int, float, float]:
        s = self.settings
        first = self._first_start if self._first_start is not None else now
        start = max(now - s.window, first, self._since, since)  # never across a pause
        length = max(s.min_window, now - start)
        sent = sum(1 for t in self._starts if t >= start)
        refused = sum(1 for t in self._refusals if t >= start)
        return sent, refused, start, length

    def _spacing(self) -> float:
        return 1.0 / self.rate if self.rate else 0.0

    def _measure(
        self, now: float, paced: bool, since: float = -math.inf
    ) -> tuple[float, float, int, float, float]:
        """(ceiling, its floor, calls measured, window start, window length)."""
        s = self.settings
        sent, refused, start, length = self._counts(now, since)
        floor = max(s.minimum, s.held * sent / length)
        ceiling = max(floor, (sent - refused) / length)
        if paced and self.rate is not None and sent:
            # Sent at the rate: the service refuses a little of it. The window's average
            # reads low while the rate was still climbing back.
            ceiling = max(ceiling, self.rate * (sent - refused) / sent)
        return ceiling, floor, sent, start, length

    def _cut(self, now: float, paced: bool) -> None:
        s = self.settings
        ceiling, floor, sent, start, length = self._measure(now, paced)
        self._provisional = now - start < s.min_window
        if self.rate is not None and sent < s.min_calls:
            # Too few calls to measure by: a small share sends two or three a second, and
            # one refusal among them is no measure of it (cut after cut, an instance of
            # eight at 20/s fell to one call in 14 s). The cut is then one step of
            # ``decrease`` below the rate.
            ceiling = max(ceiling, s.decrease * self.rate)
        else:
            # Enough calls since the last cut measure what the service takes now (a quota
            # that was halved), without the calls sent before it.
            recent = self._measure(now, paced, since=self._last_cut)
            if recent[2] >= s.min_calls and recent[0] < ceiling:
                ceiling, floor, sent, start, length = recent
        self.ceiling = ceiling
        self._measured = (start, now, length, floor)
        current = self.rate if self.rate is not None else math.inf
        self.rate = max(s.minimum, min(current, ceiling) * s.decrease)
        self._last_cut = now
        self._probe_since = None
        self.cuts += 1

    def _lower_to(self, rate: float) -> None:
        if self.rate is not None:
            self.rate = max(self.settings.minimum, min(self.rate, rate))
