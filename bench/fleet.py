"""Fleet benchmark: many function instances, each with its own limiter, against one quota.

    .venv/bin/python -m bench.fleet                       # every shape, 1-8 × 20, 50/s (hours)
    .venv/bin/python -m bench.fleet --shapes vertex --instances 4,8 --quota 50
    .venv/bin/python -m bench.fleet --halve               # the quota halves mid-run
    .venv/bin/python -m bench.fleet --single              # one instance over HTTP
    .venv/bin/python -m bench.fleet --smoke               # 2 instances, 20 images, seconds

Deployed, the function is N Cloud Run instances at once, each running ``caption_on_upload``
with its own AdaptiveLimiter, all drawing on one project quota. Here:

- N ``functions-framework --target caption_on_upload`` processes (as
  ``captioner_dev.functions.FunctionServer`` runs them), started together (a cold fleet);
- one Gemini stand-in with one quota of the shape asked (``--shapes``, see
  captioner_dev/gemini_server/quota.py: a token bucket, a sliding second, the Gemini API's
  requests or input tokens per synchronized minute, Vertex AI's tokens with second-level
  spikes throttled and no RetryInfo), of ``--quota`` requests a second (for the token shapes,
  the input tokens of that many calls), and a lognormal latency;
- a feeder that delivers ``object.v1.finalized`` events as Eventarc does (binary-mode
  CloudEvents, see ``captioner_dev.eventarc``): every instance serves up to
  ``--request-concurrency`` deliveries at once (Cloud Run's per-instance concurrency) and
  takes the next pending event when one ends, so a slow instance gets fewer; a non-2xx
  answer is delivered again after ``REDELIVERY_DELAY`` (Eventarc waits longer).

Images are small JPEG thumbnails (≤ 320 px, 6–24 KB) so that decoding does not make the
2-core machine the bottleneck: the subject is the quota, not prepare's CPU. Each instance
tags its prompt with its number so the stand-in's request log tells the instances apart.

The single-instance part (``--single``): 210 images under a prefix, one ``caption_http``
backfill request, ``CAPTION_MAX_CONCURRENCY=32``: without a quota at a fixed 0.5 s latency,
the first request of a fresh instance and later ones on the warm instance (issue 16); then,
on each shape, a fresh instance's backfill at a fixed 0.2 s latency under 20/s (issue 23).

A per-minute quota (``minute``, ``tpm``) is met over minutes, so those runs caption at
least 80 seconds of quota (4,000 images at 50/s). ``of Q`` is counted in the quota's own
unit (input tokens for the token shapes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp

from bench import data, report
from bench.data import BENCH, Planned
from bench.stack import Stack, StubProcess
from captioner.captions import DEFAULT_PROMPT
from captioner.settings import Settings
from captioner_dev.eventarc import binary_event
from captioner_dev.functions import FunctionServer
from captioner_dev.gcs import FakeGcs
from captioner_dev.gemini_server import LatencyModel
from captioner_dev.gemini_server.quota import QUOTA_SHAPES, QuotaShape
from captioner_dev.gemini_server.tokens import text_tokens
from captioner_dev.proctree import descendants

BUCKET = "bench-fleet"
PREFIX = "fleet/"
SINGLE_PREFIX = "single/"
# Gemini Flash describing one image, as in bench.run: median 1.2 s, p99 about 4.9 s.
LATENCY = LatencyModel(median=1.2, sigma=0.6, seed=16, cap=8.0)
REDELIVERY_DELAY = 1.0
TAG = " [fleet instance {}]"
OUT = BENCH / "out" / "fleet"
# Input tokens of one call: a thumbnail is one tile (258 tokens, Gemini 2.x) and the prompt
# the default rule sends (structured: the JSON fields asked for); a token quota of Q
# "requests a second" is the tokens of Q such calls.
TOKENS_PER_CALL = 258 + text_tokens(
    Settings.from_env({"CAPTION_PROMPT": DEFAULT_PROMPT + TAG.format(0)})
    .rule_book()
    .default.full_prompt()
)


def quota_config(shape: str, quota: float | None) -> dict[str, Any]:
    """The stand-in's quota settings for ``quota`` calls a second of ``shape``."""
    if quota is None:
        return {"quota_shape": shape, "quota_rps": None, "quota_tpm": None}
    if QuotaShape(shape).counts_tokens:
        return {"quota_shape": shape, "quota_rps": None, "quota_tpm": quota * 60 * TOKENS_PER_CALL}
    return {"quota_shape": shape, "quota_rps": quota, "quota_tpm": None}


def images_for(shape: str, quota: float, images: int) -> int:
    """A per-minute quota is met over minutes: at least 80 seconds of quota."""
    if shape in (QuotaShape.MINUTE, QuotaShape.TPM):
        return max(images, int(80 * quota))
    return images


@dataclass(frozen=True, slots=True)
class FleetRun:
    instances: int
    quota: float
    images: int
    halve: bool = False
    concurrency: int = 32  # CAPTION_MAX_CONCURRENCY per instance
    request_concurrency: int = 32  # deliveries one instance serves at once
    shape: str = "bucket"

    @property
    def key(self) -> str:
        halved = "-halved" if self.halve else ""
        return f"{self.shape}-n{self.instances}-q{self.quota:g}{halved}-{self.images}"

    @property
    def in_tokens(self) -> bool:
        return QuotaShape(self.shape).counts_tokens


@dataclass(slots=True)
class Delivery:
    instance: int
    name: str
    sent: float
    done: float
    status: int


@dataclass(slots=True)
class Feed:
    first_event: float = 0.0
    last_done: float = 0.0
    # When the last event was handed to an instance: after it, only queued ones drain.
    backlog_empty: float = 0.0
    halved_at: float | None = None
    deliveries: list[Delivery] = field(default_factory=list)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _thumbnails(catalogue: data.Catalogue, prefix: str, count: int) -> list[Planned]:
    pool = catalogue.of("thumbnail")
    return [
        Planned(f"{prefix}{i:05d}-{pool[i % len(pool)].path.name}", pool[i % len(pool)])
        for i in range(count)
    ]


def _list_resources(stack: Stack, prefix: str) -> list[dict[str, Any]]:
    """Object resources under ``prefix``, as a finalized event carries them."""
    items: list[dict[str, Any]] = []
    token = ""
    while True:
        url = f"{stack.gcs.url}/storage/v1/b/{BUCKET}/o?prefix={prefix}&maxResults=1000"
        if token:
            url += f"&pageToken={token}"
        with urllib.request.urlopen(url, timeout=60) as response:
            page = json.load(response)
        items.extend(page.get("items", []))
        token = page.get("nextPageToken", "")
        if not token:
            return sorted(items, key=lambda item: str(item["name"]))


def _instance_env(stack: Stack, index: int, concurrency: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    env.update(stack.env())
    env["CAPTION_MAX_CONCURRENCY"] = str(concurrency)
    env["CAPTION_LOG_FORMAT"] = "text"
    env["CAPTION_PROMPT"] = DEFAULT_PROMPT + TAG.format(index)
    env.update(extra)
    return env


def _start_all(servers: Sequence[FunctionServer]) -> list[float]:
    """Start every server at once (a cold fleet); seconds from spawn to listening, each."""
    with ThreadPoolExecutor(len(servers)) as pool:
        started = list(pool.map(lambda server: server.start(timeout=60), servers))
    return [time.monotonic() - server.started_at for server in started]


def _cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _tree_pids(servers: Sequence[FunctionServer]) -> list[int]:
    return [pid for server in servers for pid in [server.pid, *descendants(server.pid)]]


async def feed(
    urls: Sequence[str],
    events: Sequence[tuple[str, dict[str, str], bytes]],
    *,
    request_concurrency: int,
    halve: tuple[str, dict[str, Any]] | None = None,
) -> Feed:
    """Deliver every event to some instance, at most ``request_concurrency`` at a time on
    each; when ``halve`` is (stand-in URL, quota settings), set them once half are done.

    Times are ``time.time()``, the clock of the stand-in's request log."""
    pending: asyncio.Queue[tuple[str, dict[str, str], bytes]] = asyncio.Queue()
    for event in events:
        pending.put_nowait(event)
    result = Feed(first_event=time.time())
    done = 0
    remaining = len(events)
    finished = asyncio.Event()
    if not events:
        finished.set()

    async def change_quota(session: aiohttp.ClientSession) -> None:
        assert halve is not None
        stub_url, settings = halve
        async with session.post(f"{stub_url}/_stub/config", json=settings) as answer:
            answer.raise_for_status()
        result.halved_at = time.time()

    async def redeliver(event: tuple[str, dict[str, str], bytes]) -> None:
        await asyncio.sleep(REDELIVERY_DELAY)
        pending.put_nowait(event)

    background: set[asyncio.Task[None]] = set()

    async def worker(session: aiohttp.ClientSession, instance: int, url: str) -> None:
        nonlocal done, remaining
        while not finished.is_set():
            get = asyncio.ensure_future(pending.get())
            stop = asyncio.ensure_future(finished.wait())
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                stop.cancel()
                return
            stop.cancel()
            name, headers, body = get.result()
            sent = time.time()
            if pending.empty():
                result.backlog_empty = sent
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
            result.deliveries.append(Delivery(instance, name, sent, time.time(), status))
            if status // 100 != 2:
                task = asyncio.create_task(redeliver((name, headers, body)))
                background.add(task)
                task.add_done_callback(background.discard)
                continue
            done += 1
            remaining -= 1
            if halve is not None and done == len(events) // 2:
                task = asyncio.create_task(change_quota(session))
                background.add(task)
                task.add_done_callback(background.discard)
            if remaining == 0:
                result.last_done = time.time()
                finished.set()

    connector = aiohttp.TCPConnector(limit=len(urls) * request_concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        workers = [
            worker(session, index, url)
            for index, url in enumerate(urls)
            for _ in range(request_concurrency)
        ]
        await asyncio.gather(*workers)
        for task in list(background):
            task.cancel()
    return result


def _weighed_rate(points: Sequence[tuple[float, float]], start: float, end: float) -> float:
    if end <= start:
        return 0.0
    return sum(w for t, w in points if start <= t < end) / (end - start)


def _rate_at(times: Sequence[float], start: float, end: float) -> float:
    if end <= start:
        return 0.0
    return sum(1 for t in times if start <= t < end) / (end - start)


def _time_to_reach(
    accepted: Sequence[float], target: float, since: float, until: float, *, hold: float = 5.0
) -> float | None:
    """Seconds from ``since`` to the first moment (0.1 s steps) when the accepted rate over
    the second before it is ≥ ``target`` and stays so on average over the next ``hold``
    seconds (or until ``until``): a burst the full bucket let through does not count."""
    step = 0.1
    t = since + step
    while t < until:
        if _rate_at(accepted, t - 1.0, t) >= target:
            after_end = min(t + hold, until)
            if after_end - t < 0.5 or _rate_at(accepted, t, after_end) >= target:
                return t - since
        t += step
    return None


def analyse(run: FleetRun, fed: Feed, records: list[dict[str, Any]]) -> dict[str, Any]:
    calls = [r for r in records if r.get("action") == "generateContent"]
    accepted = [r for r in calls if r["status"] == 200]
    refused = [r for r in calls if r["status"] == 429]
    other = Counter(r["status"] for r in calls if r["status"] not in (200, 429))
    ok = [d for d in fed.deliveries if d.status // 100 == 2]
    t0, t_end = fed.first_event, fed.last_done
    wall = t_end - t0
    if fed.halved_at is None:
        allowed = run.quota * wall
    else:
        allowed = run.quota * (fed.halved_at - t0) + run.quota / 2 * (t_end - fed.halved_at)
    last_sent = max((r["received_at"] for r in accepted), default=t_end)

    per_instance: list[dict[str, Any]] = []
    for index in range(run.instances):
        tag = TAG.format(index)
        mine = [r for r in calls if tag in r.get("prompt", "")]
        per_instance.append(
            {
                "instance": index,
                "captioned": sum(1 for d in ok if d.instance == index),
                "accepted": sum(1 for r in mine if r["status"] == 200),
                "refused": sum(1 for r in mine if r["status"] == 429),
            }
        )
    share = len(accepted) / run.instances
    counts = [p["accepted"] for p in per_instance]
    accepted_at = sorted(r["received_at"] for r in accepted)
    # In the quota's unit, as calls: a token quota's calls weigh their tokens over a
    # nominal call's (the stand-in charged what it reports as prompt tokens).
    weighed = [
        (r["received_at"], r["prompt_tokens"] / TOKENS_PER_CALL if run.in_tokens else 1.0)
        for r in accepted
    ]
    until = fed.backlog_empty if fed.backlog_empty > t0 else t_end
    latency = sum(r["latency"] for r in accepted) / len(accepted) if accepted else 0.0
    # What the fleet could carry at all: calls in flight over their mean latency.
    capacity = run.instances * run.concurrency / latency if latency else float("inf")
    gaps = []
    for index in range(run.instances):
        tag = TAG.format(index)
        sent = sorted(r["received_at"] for r in calls if tag in r.get("prompt", ""))
        sent = [t for t in sent if t <= until]
        gap = max(((b - a, a) for a, b in pairwise(sent)), default=(0.0, t0))
        gaps.append(gap[0])
        per_instance[index]["longest_gap"] = {"seconds": gap[0], "from_s": gap[1] - t0}
        # When each call of this instance arrived (s from the first event), to look into.
        per_instance[index]["sent_s"] = [round(t - t0, 3) for t in sent]
    refused_at = sorted(r["received_at"] for r in refused)
    first_quota = run.quota
    reach_until = fed.halved_at if fed.halved_at is not None else last_sent
    figures: dict[str, Any] = {
        "run": asdict(run) | {"key": run.key},
        "images": len({d.name for d in ok}),
        "wall_s": wall,
        "throughput": len(ok) / wall if wall > 0 else 0.0,
        "of_quota": sum(w for _, w in weighed) / allowed if allowed > 0 else 0.0,
        # The quota used while every instance still had events waiting: the limiters'
        # sharing, without the drain at the end (each instance finishing the up to 32
        # deliveries it holds, and the last answers' latency).
        "of_quota_while_backlog": _weighed_rate(weighed, t0, fed.backlog_empty) / run.quota
        if fed.halved_at is None and fed.backlog_empty > t0
        else None,
        "capacity_per_s": capacity,
        "of_reachable_while_backlog": _weighed_rate(weighed, t0, fed.backlog_empty)
        / min(run.quota, capacity)
        if fed.halved_at is None and fed.backlog_empty > t0
        else None,
        "longest_gap_s": max(gaps, default=0.0),
        "drain_s": t_end - fed.backlog_empty if fed.backlog_empty else None,
        "calls": len(calls),
        "accepted": len(accepted),
        "refused_429": len(refused),
        "refused_fraction": len(refused) / len(calls) if calls else 0.0,
        "other_statuses": {str(k): v for k, v in other.items()},
        "redeliveries": sum(1 for d in fed.deliveries if d.status // 100 != 2),
        "delivery_statuses": {
            str(k): v for k, v in Counter(d.status for d in fed.deliveries).items()
        },
        "per_instance": per_instance,
        "share_min_over_fair": min(counts) / share if share else 0.0,
        "share_max_over_fair": max(counts) / share if share else 0.0,
        "time_to_90pct_s": _time_to_reach(accepted_at, 0.9 * first_quota, t0, reach_until),
        "refused_first_5s": sum(1 for t in refused_at if t < t0 + 5),
        "timeline": [
            {
                "second": second,
                "accepted": sum(1 for t in accepted_at if t0 + second <= t < t0 + second + 1),
                "refused": sum(1 for t in refused_at if t0 + second <= t < t0 + second + 1),
            }
            for second in range(int(wall) + 1)
        ],
    }
    if fed.halved_at is not None:
        h = fed.halved_at
        new_quota = run.quota / 2
        after = [t for t in accepted_at if h <= t < last_sent]
        figures |= {
            "halved_at_s": h - t0,
            "time_to_settle_after_halving_s": _settle_time(
                accepted_at, refused_at, new_quota, h, last_sent
            ),
            "of_quota_after_halving": _rate_at(after, h, last_sent) / new_quota
            if last_sent > h
            else None,
            "refused_after_halving": sum(1 for t in refused_at if t >= h),
            "calls_after_halving": sum(1 for r in calls if r["received_at"] >= h),
        }
    return figures


def _settle_time(
    accepted: Sequence[float], refused: Sequence[float], quota: float, since: float, until: float
) -> float | None:
    """Seconds after ``since`` until, over the second before, 429s are ≤ 5 % of calls and the
    accepted rate is ≥ 0.9 of ``quota``, and both hold over the next 5 s (or to ``until``)."""
    step = 0.1
    t = since + step
    while t < until:
        ok = _rate_at(accepted, t - 1, t)
        no = _rate_at(refused, t - 1, t)
        if ok >= 0.9 * quota and no <= 0.05 * (ok + no):
            end = min(t + 5, until)
            ok5 = _rate_at(accepted, t, end) if end - t >= 0.5 else ok
            no5 = _rate_at(refused, t, end) if end - t >= 0.5 else no
            if ok5 >= 0.9 * quota and no5 <= 0.05 * (ok5 + no5):
                return t - since
        t += step
    return None


def run_fleet(stack: Stack, run: FleetRun, planned: list[Planned], latency: Any) -> dict[str, Any]:
    # Fresh generations: a finalized event for an object captioned before is a new upload.
    stack.upload(BUCKET, planned, concurrency=16)
    resources = {r["name"]: r for r in _list_resources(stack, PREFIX)}
    events = []
    for item in planned:
        headers, body = binary_event(resources[item.name])
        events.append((item.name, headers, body))
    stack.stub.configure(latency=latency, **quota_config(run.shape, run.quota))
    servers = [
        FunctionServer(
            "caption_on_upload",
            env=_instance_env(stack, index, run.concurrency),
            signature_type="cloudevent",
        )
        for index in range(run.instances)
    ]
    load = os.getloadavg()
    try:
        listening = _start_all(servers)
        pids = _tree_pids(servers)
        stack_pids = list(stack.pids().values())
        cpu_before = _cpu_seconds(pids), _cpu_seconds(stack_pids)
        # The stand-in's quota starts afresh at the first event (a full bucket, an empty
        # window, a minute that begins), as after any quiet spell.
        stack.stub.configure(latency=latency, **quota_config(run.shape, run.quota))
        halve = (stack.stub.base_url, quota_config(run.shape, run.quota / 2)) if run.halve else None
        fed = asyncio.run(
            feed(
                [f"{server.url}/" for server in servers],
                events,
                request_concurrency=run.request_concurrency,
                halve=halve,
            )
        )
        cpu_after = _cpu_seconds(pids), _cpu_seconds(stack_pids)
        peak = _peak_rss(servers)
    finally:
        for server in servers:
            server.stop()
    figures = analyse(run, fed, stack.stub.requests())
    wall = figures["wall_s"]
    figures |= {
        "listening_s": {"min": min(listening), "max": max(listening)},
        "load_average_at_start": load,
        "cores_used": {
            "fleet": (cpu_after[0] - cpu_before[0]) / wall,
            "stack": (cpu_after[1] - cpu_before[1]) / wall,
        },
        "peak_rss_mib_per_instance": peak,
    }
    return figures


def _peak_rss(servers: Sequence[FunctionServer]) -> float:
    """The largest instance's peak RSS (a process of a tree that ended between listing it
    and reading its /proc status, as happened once in 40 runs, counts as 0)."""
    return max(server.peak_rss_mib() for server in servers)


def _maybe(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _summary_line(f: dict[str, Any]) -> str:
    t90 = f["time_to_90pct_s"]
    line = (
        f"{f['run']['key']}: {f['throughput']:.1f}/s = {f['of_quota']:.2f} of Q "
        f"({_maybe(f.get('of_quota_while_backlog'))} while the backlog lasted, drain "
        f"{_maybe(f.get('drain_s'), '.1f')} s), "
        f"429s {f['refused_429']}/{f['calls']} ({100 * f['refused_fraction']:.1f} %), "
        f"share min/max {f['share_min_over_fair']:.2f}/{f['share_max_over_fair']:.2f} of fair, "
        f"90 % of Q after {'never' if t90 is None else f'{t90:.1f} s'}, "
        f"redeliveries {f['redeliveries']}, longest gap {f['longest_gap_s']:.1f} s, "
        f"cores fleet/stack {f['cores_used']['fleet']:.2f}/{f['cores_used']['stack']:.2f}, "
        f"load {f['load_average_at_start'][0]:.2f}"
    )
    if "halved_at_s" in f:
        settle = f["time_to_settle_after_halving_s"]
        line += (
            f"; halved at {f['halved_at_s']:.1f} s, settled after "
            f"{'never' if settle is None else f'{settle:.1f} s'}, "
            f"{f['refused_after_halving']}/{f['calls_after_halving']} 429s after, "
            f"{f['of_quota_after_halving'] or 0:.2f} of the new Q"
        )
    return line


# ---------------------------------------------------------------------------------------------
# One instance over HTTP
# ---------------------------------------------------------------------------------------------


def _http_backfill(
    url: str, prefix: str, timeout: float = 600
) -> tuple[float, dict[str, Any], float]:
    """Wall time, answer and start (``time.time()``) of one backfill request."""
    body = json.dumps({"bucket": BUCKET, "prefix": prefix, "overwrite": True, "limit": 1000})
    request = urllib.request.Request(
        url, data=body.encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    started, at = time.monotonic(), time.time()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.load(response)
    return time.monotonic() - started, answer, at


def _single_figures(
    label: str,
    wall: float,
    answer: dict[str, Any],
    records: list[dict[str, Any]],
    concurrency: int,
    started: float,
) -> dict[str, Any]:
    calls = [r for r in records if r.get("action") == "generateContent"]
    accepted = [r for r in calls if r["status"] == 200]
    refused = sum(1 for r in calls if r["status"] == 429)
    ideal = sum(r["latency"] for r in accepted) / concurrency
    captioned = answer.get("totals", {}).get("ok", 0)
    return {
        "label": label,
        "wall_s": wall,
        "captioned": captioned,
        "totals": answer.get("totals"),
        "ideal_s": ideal,
        "efficiency": ideal / wall if wall else 0.0,
        "throughput": captioned / wall if wall else 0.0,
        "calls": len(calls),
        "refused_429": refused,
        "refused_fraction": refused / len(calls) if calls else 0.0,
        # Before the first Gemini call (listing, first fetches) and after the last answer.
        "lead_s": min((r["received_at"] for r in calls), default=started) - started,
        "tail_s": started
        + wall
        - max((r["answered_at"] or 0 for r in accepted), default=started + wall),
    }


def run_single(
    stack: Stack,
    planned: list[Planned],
    *,
    later: int = 3,
    quota: float = 20.0,
    shapes: Sequence[str] = QUOTA_SHAPES,
) -> list[dict[str, Any]]:
    """210 images over HTTP at concurrency 32: without a quota at a fixed 0.5 s latency, a
    fresh instance's first request and ``later`` warm ones; then on each shape a fresh
    instance's request at a fixed 0.2 s latency under ``quota``."""
    concurrency = 32
    results = []
    stack.upload(BUCKET, planned, concurrency=16)
    env = _instance_env(stack, 0, concurrency, CAPTION_ALLOWED_BUCKETS=BUCKET)
    with FunctionServer("caption_http", env=env) as server:
        for call in range(1 + later):
            stack.stub.configure(latency=0.5)
            label = "first request" if call == 0 else f"warm request {call}"
            results.append(_single_request(stack, server.url, label, concurrency, None))
    for shape in shapes:
        with FunctionServer("caption_http", env=env) as server:
            stack.stub.configure(latency=0.2, **quota_config(shape, quota))
            label = f"first request, {shape} {quota:g}/s, 0.2 s"
            results.append(_single_request(stack, server.url, label, concurrency, quota, shape))
    return results


def _single_request(
    stack: Stack,
    url: str,
    label: str,
    concurrency: int,
    quota: float | None,
    shape: str | None = None,
) -> dict[str, Any]:
    load = os.getloadavg()
    wall, answer, started = _http_backfill(url, SINGLE_PREFIX)
    records = stack.stub.requests()
    figures = _single_figures(label, wall, answer, records, concurrency, started)
    figures["load_average_at_start"] = load
    if quota:
        figures["shape"] = shape
        figures["of_quota"] = figures["throughput"] / quota
        if shape is not None and QuotaShape(shape).counts_tokens:
            accepted = [
                r for r in records if r.get("action") == "generateContent" and r["status"] == 200
            ]
            tokens = sum(r["prompt_tokens"] for r in accepted)
            figures["of_quota"] = tokens / TOKENS_PER_CALL / wall / quota
    _progress(
        f"{label}: {wall:.2f} s, efficiency {figures['efficiency']:.2f}, "
        f"{figures['throughput']:.1f}/s, 429s {figures['refused_429']}/"
        f"{figures['calls']}, captioned {figures['captioned']}, "
        f"{figures.get('of_quota', 0):.2f} of Q, lead "
        f"{figures['lead_s']:.2f} s, tail {figures['tail_s']:.2f} s, load {load[0]:.2f}"
    )
    return figures


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--shapes", default=",".join(QUOTA_SHAPES), help="comma-separated quota shapes"
    )
    parser.add_argument("--instances", default="1,2,4,8", help="comma-separated fleet sizes")
    parser.add_argument("--quota", default="20,50", help="comma-separated quotas (requests/s)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--halve", action="store_true", help="halve the quota mid-run instead")
    parser.add_argument("--single", action="store_true", help="the one-instance HTTP runs only")
    parser.add_argument("--smoke", action="store_true", help="2 instances, 20 images, short")
    parser.add_argument("--concurrency", type=int, default=32, help="CAPTION_MAX_CONCURRENCY")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/out/fleet/)")
    args = parser.parse_args(argv)

    shapes = [QuotaShape(shape).value for shape in args.shapes.split(",")]
    if args.smoke:
        runs = [FleetRun(2, 20.0, 20, concurrency=8, request_concurrency=8, shape=shapes[0])]
        latency: Any = 0.05
    else:
        latency = asdict(LATENCY)
        runs = [
            FleetRun(
                n,
                float(q),
                images_for(shape, float(q), args.images),
                args.halve,
                args.concurrency,
                args.concurrency,
                shape,
            )
            for shape in shapes
            for q in args.quota.split(",")
            for n in (int(x) for x in args.instances.split(","))
        ]
    out: Path = args.out or OUT / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "machine": report.machine(),
        "latency": latency,
        "argv": sys.argv[1:] if argv is None else argv,
        "fleet": [],
        "single": [],
    }
    catalogue = data.build(log=False)
    with FakeGcs() as gcs, StubProcess() as stub:
        stack = Stack(gcs, stub)
        stack.create_bucket(BUCKET)
        if args.single:
            document["single"] = run_single(
                stack, _thumbnails(catalogue, SINGLE_PREFIX, 210), shapes=shapes
            )
        else:
            planned = _thumbnails(catalogue, PREFIX, max(run.images for run in runs))
            for run in runs:
                _progress(f"{run.key}: {run.instances} instances, quota {run.quota:g}/s")
                figures = run_fleet(stack, run, planned[: run.images], latency)
                document["fleet"].append(figures)
                out.write_text(json.dumps(document, indent=2) + "\n")  # so far
                _progress("  " + _summary_line(figures))
    out.write_text(json.dumps(document, indent=2) + "\n")
    _progress(f"written {out}")
    for shape in shapes:
        mine = [f for f in document["fleet"] if f["run"]["shape"] == shape]
        if mine:
            print(f"\n{shape}\n")
            print(markdown_table(mine))
    return 0


def markdown_table(fleet: list[dict[str, Any]]) -> str:
    """One row a run; ``of reachable`` is the rate while the backlog lasted over the lower of
    the quota and what the fleet's calls in flight can carry at the measured latency."""
    rows = [
        "| instances | quota | images | wall (s) | images/s | of Q | of Q while backlog "
        "| of reachable | drain (s) | 429s (of calls) "
        "| share min / max of fair | 90 % of Q after | after halving: settled, 429s, of Q/2 "
        "| longest gap (s) | cores fleet / stack | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in fleet:
        r = f["run"]
        t90 = f["time_to_90pct_s"]
        halving = "–"
        if "halved_at_s" in f:
            settle = f["time_to_settle_after_halving_s"]
            halving = (
                f"{'never' if settle is None else f'{settle:.1f} s'}, "
                f"{f['refused_after_halving']}/{f['calls_after_halving']}, "
                f"{f['of_quota_after_halving'] or 0:.2f}"
            )
        quota = f"{r['quota']:g}/s" + (f" → {r['quota'] / 2:g}/s" if r["halve"] else "")
        rows.append(
            f"| {r['instances']} | {quota} | {r['images']} | {f['wall_s']:.1f} | "
            f"{f['throughput']:.1f} | {f['of_quota']:.2f} | "
            f"{_maybe(f.get('of_quota_while_backlog'))} | "
            f"{_maybe(f.get('of_reachable_while_backlog'))} | "
            f"{_maybe(f.get('drain_s'), '.1f')} | {f['refused_429']} "
            f"({100 * f['refused_fraction']:.1f} %) | {f['share_min_over_fair']:.2f} / "
            f"{f['share_max_over_fair']:.2f} | {'never' if t90 is None else f'{t90:.1f} s'} | "
            f"{halving} | {f['longest_gap_s']:.1f} | {f['cores_used']['fleet']:.2f} / "
            f"{f['cores_used']['stack']:.2f} | {f['load_average_at_start'][0]:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
