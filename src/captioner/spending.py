"""What a run, and a day, may spend on Gemini: admitted before an image is described,
settled with what it cost. Pure of vendor imports (the ledger's storage is a protocol).

- **A cap per run** (``--max-cost``, HTTP ``"max_cost"``): no image is started once what
  was spent plus what is in flight (estimated) plus its own estimate would pass the cap.
- **A daily budget per bucket** (``CAPTION_DAILY_BUDGET_USD``): every instance and every
  path (uploads, HTTP, the CLI) draws from one ledger object per UTC day in the bucket
  (``<CAPTION_BUDGET_PREFIX><YYYY-MM-DD>.json``). An instance reserves a block of the budget
  at a time (a fiftieth of it) with a read, then a write under ``ifGenerationMatch``, so
  the ledger sees a write every few blocks' worth of captions, never one per image, and
  spends from its block. What a block has left when an instance ends is lost, never
  spent twice: the day stops within a block per instance of its budget, and never past it.
  A ledger that cannot be read, or that disappears during the day, means the budget is
  spent (a log line says so), never that it is unlimited. A write whose outcome is unknown
  (a timeout) grants nothing.

Budget-free paths stay as fast as before: without a cap or a budget nothing is awaited.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from captioner.domain import Usage
from captioner.errors import PreconditionFailedError, TransientError
from captioner.pricing import Rate, dollars

log = logging.getLogger("captioner")

BLOCKS_PER_DAY = 50  # an instance reserves a fiftieth of the daily budget at a time
_LEDGER_ATTEMPTS = 8  # read-modify-write rounds lost to other writers before giving up


class Refused(Exception):
    """An image not started: the run's cap or the day's budget has no room for it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "cost-cap" | "budget-exhausted"


# ---------------------------------------------------------------- a cap per run


@dataclass
class CostCap:
    """``--max-cost``: one run's spending, admitted image by image. An image waits while
    what is in flight might still leave room for it (its estimate is a bound, and real
    costs come in lower); it is refused, and the run stops taking images, once even
    what was spent leaves no room."""

    limit: float
    each: float  # the estimated cost of one image, with a margin
    spent: float = 0.0
    in_flight: float = 0.0
    stopped: bool = False
    _settled: asyncio.Condition | None = None

    def full(self) -> bool:
        """Is there no room for one more image, whatever the images in flight cost?"""
        if self.spent + self.each > self.limit + 1e-12:
            self.stopped = True
        return self.stopped

    async def admit(self) -> float:
        if self._settled is None:
            self._settled = asyncio.Condition()
        async with self._settled:
            while not self.full() and self.spent + self.in_flight + self.each > self.limit:
                await self._settled.wait()  # an image in flight will say what it cost
            if self.stopped:
                raise Refused(
                    "cost-cap",
                    f"the next image would take this run past its cap of {dollars(self.limit)} "
                    f"({dollars(self.spent)} spent)",
                )
            self.in_flight += self.each
        return self.each

    def settle(self, reserved: float, cost: float) -> None:
        self.in_flight -= reserved
        self.spent += cost
        if self._settled is not None:
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        assert self._settled is not None
        async with self._settled:
            self._settled.notify_all()


# The cap of the run being carried out: set by BatchRun for its images (tasks inherit it).
CURRENT_CAP: contextvars.ContextVar[CostCap | None] = contextvars.ContextVar(
    "captioner_cost_cap", default=None
)


@contextmanager
def capped(cap: CostCap | None) -> Iterator[None]:
    token = CURRENT_CAP.set(cap)
    try:
        yield
    finally:
        try:
            CURRENT_CAP.reset(token)
        except ValueError:  # closed from another context (an abandoned generator)
            CURRENT_CAP.set(None)


# ---------------------------------------------------------------- a budget per day


class LedgerStore(Protocol):
    async def read_small(self, bucket: str, name: str, max_bytes: int) -> tuple[bytes, int] | None:
        """The object's bytes and generation, or None when there is none."""
        ...

    async def write_small(
        self, bucket: str, name: str, data: bytes, *, if_generation_match: int
    ) -> int:
        """Write under ``ifGenerationMatch`` (0: only if absent); the new generation.
        PreconditionFailedError (412) when another writer got there first."""
        ...


@dataclass
class _Day:
    day: str
    granted: float = 0.0  # reserved in the ledger by this instance, today
    used: float = 0.0  # spent from it
    in_flight: float = 0.0
    seen_generation: int | None = None  # the ledger existed: its disappearance is a fault
    exhausted: str | None = None  # why no more is granted today


@dataclass
class DailyBudget:
    """One bucket's budget for the day, as this instance draws from its ledger."""

    store: LedgerStore
    bucket: str
    prefix: str
    budget: float
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _today: _Day | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def block(self) -> float:
        return self.budget / BLOCKS_PER_DAY

    def ledger_name(self, day: str) -> str:
        return f"{self.prefix}{day}.json"

    def _day(self) -> _Day:
        day = self.clock().strftime("%Y-%m-%d")
        if self._today is None or self._today.day != day:
            self._today = _Day(day)  # a new day: a new ledger, nothing granted yet
        return self._today

    def known_exhausted(self) -> str | None:
        """Why today is known to be spent, without asking the ledger (cheap; None if not)."""
        return self._day().exhausted

    async def admit(self, each: float) -> float:
        today = self._day()
        async with self._lock:
            if self._room(today) < each and not today.exhausted:
                await self._reserve(today, each)
            if self._room(today) < each:
                spent = (
                    f"the daily budget of {dollars(self.budget)} for gs://{self.bucket} is spent"
                )
                raise Refused("budget-exhausted", today.exhausted or spent)
            today.in_flight += each
        return each

    @staticmethod
    def _room(today: _Day) -> float:
        # Sums of cents in binary floating point: a millionth of a cent is no room.
        return round(today.granted - today.used - today.in_flight, 12)

    def settle(self, reserved: float, cost: float) -> None:
        today = self._day()
        today.in_flight = max(0.0, today.in_flight - reserved)
        today.used += cost

    async def _reserve(self, today: _Day, each: float) -> None:
        """Take another block (or what is left of the budget) from the ledger."""
        name = self.ledger_name(today.day)
        for _ in range(_LEDGER_ATTEMPTS):
            read = await self.store.read_small(self.bucket, name, 64 * 1024)
            if read is None:
                if today.seen_generation is not None:
                    return self._spent(today, f"the budget ledger gs://{self.bucket}/{name} "
                                       "disappeared during the day")  # fmt: skip
                reserved, generation = 0.0, 0
            else:
                data, generation = read
                today.seen_generation = generation
                reserved_or_none = _reserved(data, today.day)
                if reserved_or_none is None:
                    return self._spent(today, f"the budget ledger gs://{self.bucket}/{name} "
                                       "cannot be read")  # fmt: skip
                reserved = reserved_or_none
            grant = round(min(max(self.block, each), self.budget - reserved), 12)
            if grant < each:
                today.exhausted = (
                    f"the daily budget of {dollars(self.budget)} for gs://{self.bucket} is spent "
                    f"({dollars(reserved)} reserved by every instance today)"
                )
                return None
            body = {"day": today.day, "budget_usd": self.budget, "reserved_usd": reserved + grant,
                    "updated": self.clock().isoformat(timespec="seconds")}  # fmt: skip
            try:
                today.seen_generation = await self.store.write_small(
                    self.bucket, name, json.dumps(body).encode(), if_generation_match=generation
                )
            except PreconditionFailedError:
                continue  # another instance reserved meanwhile: read again
            except TransientError:
                # Written or not, we cannot tell: grant nothing (the ledger may count a
                # block nobody spends; it never lets a block be spent twice).
                raise
            today.granted += grant
            return None
        raise TransientError(f"the budget ledger gs://{self.bucket}/{name} is too busy to reserve")

    def _spent(self, today: _Day, why: str) -> None:
        today.exhausted = f"{why}: the budget is taken as spent for today"
        log.error(
            "budget-exhausted: %s", today.exhausted,
            extra={"fields": {"reason": "budget-ledger-fault", "bucket": self.bucket}},
        )  # fmt: skip


def _reserved(data: bytes, day: str) -> float | None:
    """What the ledger says is reserved today, or None when it is not a ledger of ours."""
    try:
        ledger = json.loads(data)
        reserved = ledger["reserved_usd"]
        if ledger["day"] != day or isinstance(reserved, bool):
            return None
        value = float(reserved)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


# ---------------------------------------------------------------- both, for one configuration


@dataclass
class Spending:
    """What the pipeline asks before describing an image, and tells after."""

    rate: Rate
    estimate: Usage  # one image
    budgets: Callable[[str], DailyBudget] | None = None  # per bucket, when there is one

    @property
    def each(self) -> float:
        cost = self.rate.cost(self.estimate)
        return 0.0 if cost is None else cost

    def refusal(self, bucket: str | None) -> Refused | None:
        """A reason not to start an image now, known without waiting (None: go on)."""
        cap = CURRENT_CAP.get()
        if cap is not None and cap.full():
            return Refused("cost-cap", f"this run reached its cap of {dollars(cap.limit)}")
        if bucket is not None and self.budgets is not None:
            why = self.budgets(bucket).known_exhausted()
            if why is not None:
                return Refused("budget-exhausted", why)
        return None

    async def admit(self, bucket: str | None) -> Ticket:
        cap = CURRENT_CAP.get()
        ticket = Ticket(self)
        if cap is not None:
            ticket.cap, ticket.cap_reserved = cap, await cap.admit()
        if bucket is not None and self.budgets is not None:
            budget = self.budgets(bucket)
            try:
                ticket.budget_reserved = await budget.admit(self.each)
            except BaseException:
                ticket.settle(None)
                raise
            ticket.budget = budget
        return ticket


@dataclass
class Ticket:
    spending: Spending
    cap: CostCap | None = None
    cap_reserved: float = 0.0
    budget: DailyBudget | None = None
    budget_reserved: float = 0.0

    def settle(self, usage: Usage | None) -> None:
        """``usage`` of the calls made, or None when unknown (a failure): then what was
        reserved counts as spent, never as free."""
        cost = self.spending.rate.cost(usage) if usage is not None else None
        if self.cap is not None:
            self.cap.settle(self.cap_reserved, self.cap_reserved if cost is None else cost)
        if self.budget is not None:
            self.budget.settle(self.budget_reserved, self.budget_reserved if cost is None else cost)
        self.cap = self.budget = None
