"""Prices as data, the cap per run and the daily budget's ledger (captioner.pricing and
captioner.spending), with an in-memory ledger store that keeps generations and refuses a
write whose ifGenerationMatch no longer holds, as Cloud Storage does."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner.domain import Usage
from captioner.errors import PreconditionFailedError, SettingsError, TransientError
from captioner.pricing import PriceBook, Rate
from captioner.settings import Settings
from captioner.spending import BLOCKS_PER_DAY, CostCap, DailyBudget, Refused, Spending, capped

DAY = datetime(2026, 12, 3, 12, tzinfo=UTC)


@dataclass
class MemoryLedger:
    objects: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    writes: int = 0
    generation: int = 100
    lose_next_write: int = 0  # the write happens, its answer is lost (a timeout)
    race_next_write: int = 0  # another writer gets there just before

    async def read_small(self, bucket: str, name: str, max_bytes: int) -> tuple[bytes, int] | None:
        await asyncio.sleep(0)
        return self.objects.get(name)

    async def write_small(
        self, bucket: str, name: str, data: bytes, *, if_generation_match: int
    ) -> int:
        await asyncio.sleep(0)
        if self.race_next_write:
            self.race_next_write -= 1
            current = json.loads(self.objects[name][0]) if name in self.objects else None
            before = (current or {"reserved_usd": 0})["reserved_usd"]
            other = {"day": "2026-12-03", "budget_usd": 1.0, "reserved_usd": before + 0.02}
            self._put(name, json.dumps(other).encode())
        current_generation = self.objects[name][1] if name in self.objects else 0
        if current_generation != if_generation_match:
            raise PreconditionFailedError(name)
        generation = self._put(name, data)
        self.writes += 1
        if self.lose_next_write:
            self.lose_next_write -= 1
            raise TransientError("the answer was lost")
        return generation

    def _put(self, name: str, data: bytes) -> int:
        self.generation += 1
        self.objects[name] = (data, self.generation)
        return self.generation

    def reserved(self) -> float:
        ((data, _),) = self.objects.values()
        return float(json.loads(data)["reserved_usd"])


def budget(store: MemoryLedger, amount: float = 1.0) -> DailyBudget:
    return DailyBudget(store, "photos", "captioner-budget/", amount, clock=lambda: DAY)


# ---------------------------------------------------------------- prices


def test_list_prices_per_family_and_tier_and_none_for_a_model_not_known() -> None:
    book = PriceBook()
    usage = Usage(prompt_tokens=1_000_000, output_tokens=1_000_000, calls=1)
    assert book.cost("gemini-2.5-flash", "standard", usage) == pytest.approx(0.30 + 2.50)
    assert book.cost("models/gemini-2.5-flash", "flex", usage) == pytest.approx(1.40)
    assert book.cost("gemini-2.5-flash", "batch", usage) == pytest.approx(1.40)
    assert book.cost("gemini-2.5-flash", "priority", usage) == pytest.approx(5.60)  # the upper end
    assert book.cost("gemini-3-flash-preview", "standard", usage) == pytest.approx(3.50)
    thinking = Usage(prompt_tokens=0, output_tokens=0, thoughts_tokens=1_000_000, calls=1)
    assert book.cost("gemini-2.5-pro", "standard", thinking) == pytest.approx(10.0)  # as output
    for unknown in ("gemini-1.5-flash", "gemini-2.0-flash", "my-tuned-model", "gemini-3-ultra"):
        assert book.price(unknown, "standard") is None, unknown


def test_caption_prices_replaces_a_price_and_each_tier_follows_unless_given() -> None:
    book = Settings.from_env(
        {
            "CAPTION_PRICES": json.dumps(
                {
                    "gemini-2.5-flash": {
                        "input": 0.2,
                        "output": 2.0,
                        "flex": {"input": 0.05, "output": 0.5},
                    },
                    "my-tuned-model": {"input": 1, "output": 4},
                }
            )
        }
    ).price_book()
    assert book.price("gemini-2.5-flash", "standard").input == 0.2  # type: ignore[union-attr]
    assert book.price("gemini-2.5-flash", "flex").output == 0.5  # type: ignore[union-attr]
    assert book.price("gemini-2.5-flash", "batch").input == pytest.approx(0.1)  # type: ignore[union-attr]
    assert book.price("my-tuned-model", "standard").output == 4  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("{", "is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"m": 3}', "must map to an object"),
        ('{"m": {"input": -1, "output": 1}}', "from 0 to 10000"),
        ('{"m": {"input": "cheap", "output": 1}}', "must be a number"),
        ('{"m": {"input": 1, "output": 1, "flux": {}}}', "unknown key"),
        ('{"m": {"input": NaN, "output": 1}}', "from 0 to 10000"),
    ],
)
def test_a_bad_caption_prices_fails_at_start_naming_the_variable(value: str, says: str) -> None:
    with pytest.raises(SettingsError, match="CAPTION_PRICES") as caught:
        Settings.from_env({"CAPTION_PRICES": value})
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("CAPTION_SERVICE_TIER", "cheap"), ("CAPTION_DAILY_BUDGET_USD", "-5"),
     ("CAPTION_DAILY_BUDGET_USD", "0"), ("CAPTION_BUDGET_PREFIX", "no-slash")],
)  # fmt: skip
def test_bad_tier_budget_and_prefix_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


# ---------------------------------------------------------------- a cap per run


async def test_a_cap_waits_for_images_in_flight_then_refuses_once_nothing_fits() -> None:
    cap = CostCap(limit=1.0, each=0.3)
    reserved = [await cap.admit() for _ in range(3)]  # 0.9 in flight: a fourth must wait
    fourth = asyncio.ensure_future(cap.admit())
    await asyncio.sleep(0.01)
    assert not fourth.done()
    cap.settle(reserved[0], 0.1)  # cheaper than estimated: room for the fourth
    assert await fourth == 0.3
    for r in reserved[1:]:
        cap.settle(r, 0.3)
    cap.settle(0.3, 0.3)  # spent 1.0 - 0.3... = 0.1 + 0.3 * 3 = 1.0
    with pytest.raises(Refused, match=r"past its cap of \$1\.00 \(\$1\.00 spent\)"):
        await cap.admit()
    assert cap.full()


@given(st.lists(st.floats(0, 0.5), min_size=1, max_size=40), st.floats(0.01, 3))
def test_whatever_the_captions_cost_the_admitted_estimates_never_pass_the_cap(
    costs: list[float], limit: float
) -> None:
    async def run() -> CostCap:
        cap = CostCap(limit=limit, each=0.25)
        for cost in costs:
            try:
                reserved = await cap.admit()
            except Refused:
                break
            assert cap.spent + cap.in_flight <= limit + 1e-9
            cap.settle(reserved, min(cost, reserved))  # within the estimate's margin
        return cap

    assert asyncio.run(run()).spent <= limit + 1e-9


async def test_spending_reads_the_run_cap_of_the_context_it_runs_in() -> None:
    rate = Rate("gemini-2.5-flash", "standard", PriceBook().price("gemini-2.5-flash", "standard"))
    spending = Spending(rate, Usage(600, 80, 0, 258, 1))
    assert spending.refusal(None) is None
    with capped(CostCap(limit=spending.each * 1.5, each=spending.each)):
        ticket = await spending.admit(None)
        assert spending.refusal(None) is None  # in flight: it may still cost less
        ticket.settle(Usage(600, 80, 0, 258, 1))
        assert spending.refusal(None) is not None  # spent: one more would pass the cap
    assert spending.refusal(None) is None  # another run: no cap


# ---------------------------------------------------------------- a budget per day


async def test_instances_reserve_blocks_and_stop_within_one_block_each_of_the_budget() -> None:
    store = MemoryLedger()
    instances = [budget(store) for _ in range(3)]
    each = 0.003
    spent = 0.0

    async def caption(instance: DailyBudget) -> None:
        nonlocal spent
        while True:
            try:
                reserved = await instance.admit(each)
            except Refused:
                return
            await asyncio.sleep(0)
            instance.settle(reserved, each)
            spent += each

    await asyncio.gather(*(caption(i) for i in instances))
    assert store.reserved() <= 1.0 + 1e-9
    assert spent <= 1.0 + 1e-9
    assert spent >= 1.0 - len(instances) * instances[0].block
    assert store.writes <= BLOCKS_PER_DAY + len(instances)  # a write per block, not per image


async def test_a_race_for_the_ledger_is_read_again_and_never_grants_past_the_budget() -> None:
    store = MemoryLedger(race_next_write=5)
    day = budget(store)
    reserved = await day.admit(0.001)
    assert reserved == 0.001
    assert store.reserved() == pytest.approx(5 * 0.02 + day.block)


async def test_a_write_whose_answer_is_lost_grants_nothing() -> None:
    store = MemoryLedger(lose_next_write=1)
    day = budget(store)
    with pytest.raises(TransientError):
        await day.admit(0.001)
    assert store.reserved() == pytest.approx(day.block)  # the ledger counted it ...
    reserved = await day.admit(0.001)  # ... and this instance never spends it
    assert reserved == 0.001
    assert store.reserved() == pytest.approx(2 * day.block)


@pytest.mark.parametrize(
    "planted",
    [b"not json", b'{"day": "2026-12-03"}', b'{"day": "2026-12-03", "reserved_usd": -1}',
     b'{"day": "2026-12-03", "reserved_usd": "NaN"}', b'{"day": "2026-12-02", "reserved_usd": 0}',
     b"[" * 10000],
)  # fmt: skip
async def test_a_ledger_that_cannot_be_read_means_the_budget_is_spent(
    planted: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryLedger()
    store.objects["captioner-budget/2026-12-03.json"] = (planted, 7)
    day = budget(store)
    with caplog.at_level(logging.ERROR), pytest.raises(Refused, match="cannot be read"):
        await day.admit(0.001)
    assert "budget-exhausted" in caplog.text
    assert day.known_exhausted() is not None
    assert store.writes == 0


async def test_a_ledger_deleted_during_the_day_means_the_budget_is_spent() -> None:
    store = MemoryLedger()
    day = budget(store)
    for _ in range(round(day.block / 0.001)):  # the first block, spent
        day.settle(await day.admit(0.001), 0.001)
    store.objects.clear()  # someone deleted it
    with pytest.raises(Refused, match="disappeared"):
        await day.admit(0.001)


async def test_a_new_day_starts_a_new_ledger() -> None:
    store = MemoryLedger()
    now = [DAY]
    day = DailyBudget(store, "photos", "captioner-budget/", 0.01, clock=lambda: now[0])
    while True:
        try:
            day.settle(await day.admit(0.004), 0.004)
        except Refused:
            break
    now[0] = datetime(2026, 12, 4, 0, 0, 1, tzinfo=UTC)
    assert day.known_exhausted() is None
    assert await day.admit(0.004) == 0.004
    assert set(store.objects) == {
        "captioner-budget/2026-12-03.json", "captioner-budget/2026-12-04.json"
    }  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.sampled_from(["race", "lose", "ok"]), max_size=12),
    st.floats(0.0005, 0.01),
)
def test_whatever_races_and_lost_writes_the_sum_granted_never_passes_the_budget(
    instances: int, faults: list[str], each: float
) -> None:
    async def scenario() -> tuple[float, float]:
        store = MemoryLedger()
        days = [budget(store, 0.05) for _ in range(instances)]
        spent = 0.0
        for step, fault in enumerate(faults * 20):
            store.race_next_write += fault == "race"
            store.lose_next_write += fault == "lose"
            day = days[step % instances]
            try:
                reserved = await day.admit(each)
            except (Refused, TransientError):
                continue
            day.settle(reserved, each)
            spent += each
        return spent, store.reserved() if store.objects else 0.0

    spent, reserved = asyncio.run(scenario())
    assert spent <= 0.05 + 1e-9
    assert reserved <= 0.05 + 1e-9 + 0.02 * 20 * 12  # planted races add others' reservations
