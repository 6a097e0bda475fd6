"""Many members sending /imagine at once: acknowledgement latency, event-loop lag, memory.

The real bot runs under simcord with tiny random-weight models. Each member sends
``--jobs-per-user`` /imagine commands, and all of them reach the bot before it handles
any. Meanwhile a long "blocker" job keeps the executor and its worker busy, so no queued
job starts during the burst. Then the blocker is cancelled, ``--run-jobs`` jobs run to the
end, and the members cancel the rest with /cancel. A second wave repeats the burst, with
``tracemalloc`` tracing, to see whether memory returns to where it was.

Figures:

- acknowledgement latency: from dispatching an interaction to the end of the bot's
  ``defer()`` call, in wall-clock time. Discord rejects a response after 3 s (10062).
  simcord enforces that on its own virtual clock, which does not advance in real time, so
  the 3 s limit is checked here against these measurements.
- event-loop lag: how late a 20 ms ``asyncio.sleep`` wakes up, sampled through the burst
  and while jobs run.
- memory: resident set of the bot process (which also hosts simcord) and of the worker,
  Python allocations still alive after the second wave, and the sizes of the presenter's
  per-job tables.

Run from the repository root::

    python benchmarks/bot_load.py --users 50 --jobs-per-user 5 --json load.json

The test ``tests/test_load.py`` runs the same scenario at 50 × 5 and checks the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import discord
import simcord

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bot.client import ImagineBot, create_bot  # noqa: E402
from bot.jobs import Job  # noqa: E402
from bot.settings import Settings  # noqa: E402

QUEUED_RE = re.compile(r"Queued as #(\d+), position (\d+), about (\d+) min\.")
QUEUE_LINE_RE = re.compile(r"#(\d+) · position (\d+) · about \d+ min · (.*)")
# Per-guild settings that keep a job to a fraction of a second on tiny models.
TINY_CONFIG = {"cutn": 1, "default_iterations": 2, "default_size": 32, "progress_interval": 2}
BLOCKER_PROMPT = "a blocker that keeps the executor busy --iter 100000"
LAG_INTERVAL_S = 0.02
# Seconds one simcord settle may take: a burst of 250 commands takes a few seconds.
SETTLE_TIMEOUT_S = 120.0


@dataclass
class LoadWorld:
    """The bot under simcord, with one channel, an admin and the members who send commands."""

    env: simcord.Env
    bot: ImagineBot
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    admin: simcord.MemberActor
    members: list[simcord.MemberActor]


@dataclass
class Submission:
    """One /imagine of the burst: who sent it, the reply, and when it was acknowledged."""

    member: simcord.MemberActor
    prompt: str
    sent_at: float
    result: simcord.InteractionResult
    acknowledged_at: float | None = None

    @property
    def latency_s(self) -> float | None:
        """Seconds from dispatch to the end of the bot's ``defer()``; None if never deferred."""
        if self.acknowledged_at is None:
            return None
        return self.acknowledged_at - self.sent_at

    def queued(self) -> tuple[int, int] | None:
        """Return the job id and the position from the "Queued as" reply, or None."""
        response = self.result.response
        match = QUEUED_RE.fullmatch(response.content) if response is not None else None
        return (int(match[1]), int(match[2])) if match else None


@dataclass
class WaveFigures:
    """Figures of one burst. Times in milliseconds unless the name says otherwise."""

    commands: int
    accepted: int
    # From the first dispatch to the last, and from the first dispatch until the bot settled.
    dispatch_s: float
    burst_s: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    # Event-loop lag while the bot handled the burst (after the dispatch loop), with the
    # blocker job running, and while jobs ran and members cancelled the rest.
    burst_lag: dict[str, float]
    drain_lag: dict[str, float]
    jobs_done: int = 0
    jobs_cancelled: int = 0
    jobs_lost: int = 0
    drain_s: float = 0.0


@dataclass
class MemoryFigures:
    """Memory at the start, after the first wave and after the second, in MiB."""

    bot_rss_mib: list[float] = field(default_factory=list)
    worker_rss_mib: list[float] = field(default_factory=list)
    # Python allocations made during the second wave and still alive after it, in KiB.
    traced_growth_kib: float = 0.0
    traced_growth_bot_kib: float = 0.0
    traced_top: list[str] = field(default_factory=list)
    # Sizes of the presenter's tables after each wave (per-job entries should be gone).
    presenter_tables: list[dict[str, int]] = field(default_factory=list)


# -- the world ---------------------------------------------------------------------------------


async def start_world(settings: Settings, users: int, jobs_per_user: int) -> LoadWorld:
    """Start the bot under simcord with a guild of ``users`` members and an admin.

    The guild lets each member queue ``jobs_per_user`` jobs; ``settings`` must allow that
    many per user and all of them in the queue.
    """
    bot = create_bot(settings)
    env = simcord.Env(bot, settle_timeout=SETTLE_TIMEOUT_S)
    await env.start()
    guild = env.create_guild("Load test")
    channel = guild.create_text_channel("art")
    admins = guild.create_role("Admins", permissions=discord.Permissions(manage_guild=True))
    admin = guild.add_member(env.create_user("admin"), roles=[admins])
    members = [guild.add_member(env.create_user(f"member{n}")) for n in range(users)]
    for key, value in {**TINY_CONFIG, "max_jobs_per_user": jobs_per_user}.items():
        await bot.store.set_guild_setting(guild.id, key, value)
    return LoadWorld(env, bot, guild, channel, admin, members)


async def stop_world(world: LoadWorld) -> None:
    await world.bot.close()
    await world.env.shutdown()


async def wait_for(condition: Any, what: str, timeout: float = 120.0) -> Any:
    """Poll ``condition`` (a function, maybe async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_state(world: LoadWorld, job_id: int, *states: str) -> Job:
    async def reached() -> Job | None:
        job = await world.bot.store.get(job_id)
        return job if job is not None and job.state in states else None

    return await wait_for(reached, f"job {job_id} to be {'/'.join(states)}")


# -- the burst ---------------------------------------------------------------------------------


async def _no_settle(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def unsettled(env: simcord.Env) -> Iterator[None]:
    """Let simcord verbs dispatch without waiting for the bot, to send many commands at once.

    simcord runs one verb at a time and waits for the bot to settle after each. Inside this
    block, verbs only dispatch. Call ``env.settle`` afterwards.
    """
    # NOTE: replaces a private method of simcord 3.2.1, the version pinned in pyproject.toml.
    env._settle_internal = _no_settle  # type: ignore[method-assign]
    try:
        yield
    finally:
        del env._settle_internal


@contextlib.contextmanager
def timed_defers(acknowledged: dict[str, float]) -> Iterator[None]:
    """Record when each /imagine's ``defer()`` returns, keyed by its prompt."""
    original = discord.InteractionResponse.defer

    async def timed_defer(self: discord.InteractionResponse, **kwargs: Any) -> Any:
        result = await original(self, **kwargs)
        prompt = getattr(self._parent.namespace, "prompt", None)
        if prompt is not None:
            acknowledged[prompt] = time.perf_counter()
        return result

    discord.InteractionResponse.defer = timed_defer  # type: ignore[method-assign]
    try:
        yield
    finally:
        discord.InteractionResponse.defer = original  # type: ignore[method-assign]


def burst_order(
    members: list[simcord.MemberActor], jobs_per_user: int, wave: int, seed: int = 7
) -> list[tuple[simcord.MemberActor, str]]:
    """Return every member's commands in a shuffled arrival order, with unique prompts."""
    requests = [
        (member, f"wave {wave} member {index} picture {number}")
        for index, member in enumerate(members)
        for number in range(jobs_per_user)
    ]
    random.Random(seed + wave).shuffle(requests)
    return requests


@dataclass
class BurstTimes:
    """``time.perf_counter`` marks of a burst: start, all dispatched, bot settled."""

    started: float
    dispatched: float
    settled: float


async def burst_imagine(
    world: LoadWorld, requests: list[tuple[simcord.MemberActor, str]]
) -> tuple[list[Submission], BurstTimes]:
    """Dispatch every /imagine before the bot handles any; return them and the timing marks.

    The dispatch loop blocks the event loop until it ends, as a burst of gateway events would.
    """
    acknowledged: dict[str, float] = {}
    submissions = []
    with timed_defers(acknowledged):
        started = time.perf_counter()
        with unsettled(world.env):
            for member, prompt in requests:
                sent_at = time.perf_counter()
                result = await member.slash(world.channel, "imagine", prompt=prompt)
                submissions.append(Submission(member, prompt, sent_at, result))
        dispatched = time.perf_counter()
        await world.env.settle(timeout=SETTLE_TIMEOUT_S)
        times = BurstTimes(started, dispatched, time.perf_counter())
    for submission in submissions:
        submission.acknowledged_at = acknowledged.get(submission.prompt)
    return submissions, times


# -- measuring ---------------------------------------------------------------------------------


class LoopLagSampler:
    """Measure how late ``asyncio.sleep(LAG_INTERVAL_S)`` wakes up.

    Each sample is (start, end, lag) in ``time.perf_counter`` seconds.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(LAG_INTERVAL_S)
            after = time.perf_counter()
            self.samples.append((before, after, after - before - LAG_INTERVAL_S))

    def start(self) -> None:
        self.samples = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def lags_between(self, start: float, end: float) -> list[float]:
        """Return the lags of the samples that began at or after ``start`` and ended by ``end``."""
        return [lag for before, after, lag in self.samples if before >= start and after <= end]


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values`` (``fraction`` in 0..1)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def rss_mib(pid: int | str = "self") -> float:
    """Return the resident set size of a process in MiB, from /proc (Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def presenter_tables(bot: ImagineBot) -> dict[str, int]:
    """Return the size of every dict the presenter keeps (most are keyed by job id)."""
    return {
        name: len(value) for name, value in vars(bot.presenter).items() if isinstance(value, dict)
    }


def lag_summary(lags: list[float]) -> dict[str, float]:
    """Return the count, median, 99th percentile and maximum of lags, in milliseconds."""
    if not lags:
        return {"samples": 0}
    return {
        "samples": len(lags),
        "p50_ms": round(statistics.median(lags) * 1000, 1),
        "p99_ms": round(percentile(lags, 0.99) * 1000, 1),
        "max_ms": round(max(lags) * 1000, 1),
    }


def wave_figures(
    submissions: list[Submission], times: BurstTimes, burst_lags: list[float]
) -> WaveFigures:
    latencies = [s.latency_s for s in submissions if s.latency_s is not None]
    return WaveFigures(
        commands=len(submissions),
        accepted=sum(1 for s in submissions if s.queued() is not None),
        dispatch_s=round(times.dispatched - times.started, 3),
        burst_s=round(times.settled - times.started, 3),
        ack_p50_ms=round(statistics.median(latencies) * 1000, 1),
        ack_p99_ms=round(percentile(latencies, 0.99) * 1000, 1),
        ack_max_ms=round(max(latencies) * 1000, 1),
        burst_lag=lag_summary(burst_lags),
        drain_lag={},
    )


# -- the scenario ------------------------------------------------------------------------------


async def start_blocker(world: LoadWorld) -> int:
    """Queue a long job for the admin and wait until it runs, so the executor stays busy."""
    result = await world.admin.slash(world.channel, "imagine", prompt=BLOCKER_PROMPT)
    match = QUEUED_RE.fullmatch(result.response.content)
    assert match, result.response.content
    job_id = int(match[1])
    await wait_state(world, job_id, "running")
    return job_id


async def warm_up(world: LoadWorld) -> None:
    """Run one job to the end, so the worker has loaded the models."""
    result = await world.admin.slash(world.channel, "imagine", prompt="a warm-up picture")
    match = QUEUED_RE.fullmatch(result.response.content)
    assert match, result.response.content
    await wait_state(world, int(match[1]), "done")


async def drain(world: LoadWorld, blocker: int, job_ids: list[int], run_jobs: int) -> list[Job]:
    """Cancel the blocker, let ``run_jobs`` jobs finish, and have their owners cancel the rest.

    Returns the jobs in the order they started.
    """
    store = world.bot.store
    result = await world.admin.slash(world.channel, "cancel", job=blocker)
    assert result.response.content == f"Cancelled #{blocker}.", result.response.content
    await wait_state(world, blocker, "cancelled")

    async def enough_done() -> bool:
        done = await store.job_ids(["done"])
        return len(done & set(job_ids)) >= run_jobs

    await wait_for(enough_done, f"{run_jobs} jobs to finish")

    members = {member.id: member for member in world.members}
    for job in await store.queue(limit=len(job_ids) + 1):
        member = members[job.user_id]
        result = await member.slash(world.channel, "cancel", job=job.id)
        content = result.response.content
        # A job may have started or ended between the listing and the command.
        if content != f"Cancelled #{job.id}.":
            assert "has already ended" in content, content

    await wait_for(lambda: world.bot.executor.info().busy_job_id is None, "the executor idle")
    jobs = [await store.get(job_id) for job_id in job_ids]
    started = [job for job in jobs if job is not None and job.started_at is not None]
    return sorted(started, key=lambda job: job.started_at)


async def count_outcomes(world: LoadWorld, job_ids: list[int], figures: WaveFigures) -> None:
    for job_id in job_ids:
        job = await world.bot.store.get(job_id)
        if job is not None and job.state == "done":
            figures.jobs_done += 1
        elif job is not None and job.state == "cancelled":
            figures.jobs_cancelled += 1
        else:
            figures.jobs_lost += 1


@dataclass
class Wave:
    """A burst in progress: the blocker job, the lag sampler and the commands sent."""

    blocker: int
    sampler: LoopLagSampler
    submissions: list[Submission]
    times: BurstTimes

    @property
    def job_ids(self) -> list[int]:
        """The ids of the accepted jobs, in dispatch order."""
        return [queued[0] for s in self.submissions if (queued := s.queued()) is not None]


async def start_wave(world: LoadWorld, jobs_per_user: int, wave: int) -> Wave:
    """Keep the executor busy with a blocker job and send every member's commands at once."""
    blocker = await start_blocker(world)
    sampler = LoopLagSampler()
    sampler.start()
    submissions, times = await burst_imagine(world, burst_order(world.members, jobs_per_user, wave))
    return Wave(blocker, sampler, submissions, times)


async def finish_wave(world: LoadWorld, wave: Wave, run_jobs: int) -> tuple[WaveFigures, list[Job]]:
    """Drain the queue (see :func:`drain`); return the figures and the jobs that started."""
    drain_started = time.perf_counter()
    started = await drain(world, wave.blocker, wave.job_ids, run_jobs)
    drain_ended = time.perf_counter()
    await wave.sampler.stop()

    burst_lags = wave.sampler.lags_between(wave.times.dispatched, wave.times.settled)
    figures = wave_figures(wave.submissions, wave.times, burst_lags)
    figures.drain_lag = lag_summary(wave.sampler.lags_between(drain_started, drain_ended))
    figures.drain_s = round(drain_ended - drain_started, 3)
    await count_outcomes(world, wave.job_ids, figures)
    return figures, started


def memory_point(world: LoadWorld, memory: MemoryFigures) -> None:
    gc.collect()
    memory.bot_rss_mib.append(round(rss_mib(), 1))
    pid = world.bot.executor.info().worker_pid
    memory.worker_rss_mib.append(round(rss_mib(pid), 1) if pid else 0.0)
    memory.presenter_tables.append(presenter_tables(world.bot))


def traced_growth(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, memory: MemoryFigures
) -> None:
    """Record the Python allocations made between the snapshots that are still alive."""
    differences = after.compare_to(before, "filename")
    growth = [d for d in differences if d.size_diff > 0]
    memory.traced_growth_kib = round(sum(d.size_diff for d in differences) / 1024, 1)
    bot_dir = str(ROOT / "bot")
    memory.traced_growth_bot_kib = round(
        sum(d.size_diff for d in differences if d.traceback[0].filename.startswith(bot_dir)) / 1024,
        1,
    )
    memory.traced_top = [
        f"{d.traceback[0].filename}: {d.size_diff / 1024:+.1f} KiB"
        for d in sorted(growth, key=lambda d: d.size_diff, reverse=True)[:5]
    ]


async def run_scenario(
    settings: Settings, users: int, jobs_per_user: int, run_jobs: int
) -> dict[str, Any]:
    """Run two waves and return every figure as plain data."""
    world = await start_world(settings, users, jobs_per_user)
    try:
        await warm_up(world)
        memory = MemoryFigures()
        memory_point(world, memory)

        wave = await start_wave(world, jobs_per_user, wave=1)
        first, _ = await finish_wave(world, wave, run_jobs)
        memory_point(world, memory)

        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        wave = await start_wave(world, jobs_per_user, wave=2)
        second, started = await finish_wave(world, wave, run_jobs)
        # The started jobs are this function's references, not the bot's.
        del wave, started
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        traced_growth(before, after, memory)
        memory_point(world, memory)
    finally:
        await stop_world(world)
    return {
        "users": users,
        "jobs_per_user": jobs_per_user,
        "run_jobs": run_jobs,
        "first_wave": asdict(first),
        "second_wave_traced": asdict(second),
        "memory": asdict(memory),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50, help="members sending commands")
    parser.add_argument("--jobs-per-user", type=int, default=5, help="/imagine per member")
    parser.add_argument("--run-jobs", type=int, default=5, help="jobs run to the end per wave")
    parser.add_argument("--json", type=Path, help="write the figures to this file as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    from generator.testing import build_tiny_models

    with tempfile.TemporaryDirectory(prefix="imagine-load-") as directory:
        tiny = build_tiny_models(Path(directory) / "models")
        jobs = arguments.users * arguments.jobs_per_user
        settings = Settings(
            data_dir=Path(directory) / "data",
            vqgan_model=tiny.vqgan,
            clip_models=(tiny.clip,),
            device="cpu",
            max_size=64,
            max_iterations=100_000,
            max_queue=jobs + 10,
            max_jobs_per_user=arguments.jobs_per_user + 1,
            threads=1,
        )
        figures = asyncio.run(
            run_scenario(settings, arguments.users, arguments.jobs_per_user, arguments.run_jobs)
        )
    text = json.dumps(figures, indent=2)
    print(text)
    if arguments.json:
        arguments.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
