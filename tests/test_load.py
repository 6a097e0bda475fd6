"""Load: 50 members each send 5 /imagine commands at once while the executor is busy.

The scenario lives in ``benchmarks/bot_load.py``, which runs it at any size. Here it runs at
50 × 5 and checks that every interaction is acknowledged within Discord's 3 s and that all
250 jobs are accepted, because the test raises the queue and per-member limits to fit them.
The jobs take turns in the store's queue, every reply and /queue gives the right position,
and memory held for jobs is released. Only a few jobs run to the end, and the members
cancel the rest with /cancel. The figures are printed (run with ``-s``) and written to
``load-figures.json`` in the test's temporary directory.
"""

from __future__ import annotations

import collections
import gc
import json
from dataclasses import asdict

import pytest

from benchmarks.bot_load import (
    QUEUE_LINE_RE,
    LoadWorld,
    MemoryFigures,
    Submission,
    Wave,
    finish_wave,
    memory_point,
    start_wave,
    start_world,
    stop_world,
    warm_up,
)
from bot.jobs import Job
from bot.settings import Settings

pytestmark = pytest.mark.asyncio

USERS = 50
JOBS_PER_USER = 5
RUN_JOBS = 5
ACK_LIMIT_S = 3.0
# Growth of the bot process over the second wave that the test accepts. simcord keeps every
# message, interaction and request of the run in this process: 10 to 25 MiB per wave in our
# runs.
MAX_SECOND_WAVE_RSS_GROWTH_MIB = 64.0
MAX_WORKER_RSS_GROWTH_MIB = 16.0


def check_acknowledged(submissions: list[Submission]) -> None:
    for submission in submissions:
        assert submission.result.acknowledged, submission.prompt
        assert submission.latency_s is not None, submission.prompt
        assert submission.latency_s < ACK_LIMIT_S, (submission.prompt, submission.latency_s)
        assert submission.queued() is not None, submission.result.response.content


def check_turns(queued: list[Job]) -> None:
    """Check that members take turns: every run of USERS jobs has each member once."""
    assert len(queued) == USERS * JOBS_PER_USER
    for start in range(0, len(queued), USERS):
        turn = [job.user_id for job in queued[start : start + USERS]]
        assert len(set(turn)) == USERS, f"turn starting at {start} repeats a member"

    by_user: dict[int, list[int]] = collections.defaultdict(list)
    for job in queued:
        by_user[job.user_id].append(job.id)
    for user_id, job_ids in by_user.items():
        assert job_ids == sorted(job_ids), f"member {user_id}'s jobs are out of order"


def expected_positions(queued: list[Job]) -> dict[int, int]:
    """Return each job's position when it was enqueued, computed from the rows.

    No job started during the burst, so the jobs queued when job J arrived are those with a
    smaller id, and J's position counts those among them that run before it, plus J.
    """
    order = {job.id: (-job.priority, job.round, job.id) for job in queued}
    positions = {}
    for job in queued:
        ahead = [other for other in queued if other.id <= job.id]
        positions[job.id] = sum(1 for other in ahead if order[other.id] <= order[job.id])
    return positions


async def check_queue_views(world: LoadWorld, queued: list[Job]) -> None:
    """Check every member's /queue against the queue order and for other members' prompts."""
    position = {job.id: index for index, job in enumerate(queued, start=1)}
    for member in world.members:
        own = {job.id: job.prompt for job in queued if job.user_id == member.id}
        result = await member.slash(world.channel, "queue")
        assert result.ephemeral

        lines = result.response.content.splitlines()
        listed = {}
        for line in lines[:-1]:
            match = QUEUE_LINE_RE.fullmatch(line)
            assert match, line
            listed[int(match[1])] = (int(match[2]), match[3])
        assert set(listed) == set(own), member.name
        for job_id, (shown_position, prompt) in listed.items():
            assert shown_position == position[job_id], (member.name, job_id)
            assert prompt == own[job_id]
        assert lines[-1] == f"Queue: {len(queued)} waiting, 1 running."


def object_census() -> collections.Counter[str]:
    """Count live objects of the bot's own types and of discord.py's, by qualified name."""
    gc.collect()
    census: collections.Counter[str] = collections.Counter()
    for item in gc.get_objects():
        module = type(item).__module__
        # A metaclass can expose __module__ as a descriptor rather than a string.
        if isinstance(module, str) and module.startswith(("bot.", "discord.")):
            census[f"{module}.{type(item).__qualname__}"] += 1
    return census


async def check_first_wave(world: LoadWorld, wave: Wave) -> None:
    """Check a burst in progress: acknowledgements, turns, positions, /queue and limits."""
    store = world.bot.store
    check_acknowledged(wave.submissions)

    everything = await store.queue(limit=1000)
    assert everything[0].id == wave.blocker
    assert everything[0].state == "running"
    queued = everything[1:]
    assert sorted(job.id for job in queued) == sorted(wave.job_ids)
    assert queued == sorted(queued, key=lambda job: (-job.priority, job.round, job.id))
    check_turns(queued)

    expected = expected_positions(queued)
    for submission in wave.submissions:
        job_id, reported = submission.queued()
        assert reported == expected[job_id], (submission.prompt, reported)

    await check_queue_views(world, queued)

    # One command more than the per-member limit allows.
    extra = await world.members[0].slash(world.channel, "imagine", prompt="one too many")
    assert extra.ephemeral
    assert "the limit is 5 per person" in extra.response.content
    assert len(await store.queue(limit=1000)) == len(everything)


async def test_burst_of_imagine_commands(tiny_models, tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        vqgan_model=tiny_models.vqgan,
        clip_models=(tiny_models.clip,),
        device="cpu",
        max_size=64,
        max_iterations=100_000,
        max_queue=USERS * JOBS_PER_USER + 10,
        max_jobs_per_user=JOBS_PER_USER + 1,
        threads=1,
    )
    world = await start_world(settings, USERS, JOBS_PER_USER)
    try:
        await warm_up(world)
        memory = MemoryFigures()
        memory_point(world, memory)

        # The burst, while the blocker job keeps the executor busy.
        wave = await start_wave(world, JOBS_PER_USER, wave=1)
        await check_first_wave(world, wave)
        queue_order = [job.id for job in await world.bot.store.queue(limit=1000)][1:]

        # A few jobs run in queue order, the members cancel the rest.
        first, started = await finish_wave(world, wave, RUN_JOBS)
        assert [job.id for job in started[:RUN_JOBS]] == queue_order[:RUN_JOBS]
        assert first.jobs_lost == 0
        assert first.jobs_done >= RUN_JOBS
        assert first.jobs_done + first.jobs_cancelled == USERS * JOBS_PER_USER
        del wave, started
        memory_point(world, memory)
        census_after_first = object_census()
        cached_after_first = len(world.bot.cached_messages)

        # A second wave of the same size: memory held for jobs must come back.
        wave = await start_wave(world, JOBS_PER_USER, wave=2)
        check_acknowledged(wave.submissions)
        second, started = await finish_wave(world, wave, RUN_JOBS)
        assert second.jobs_lost == 0
        del wave, started
        memory_point(world, memory)
        census_after_second = object_census()
        cached_after_second = len(world.bot.cached_messages)

        assert world.env.errors == []
    finally:
        await stop_world(world)

    grown = {
        name: census_after_second[name] - census_after_first[name]
        for name in census_after_second
        if census_after_second[name] > census_after_first[name]
    }
    figures = {
        "users": USERS,
        "jobs_per_user": JOBS_PER_USER,
        "first_wave": asdict(first),
        "second_wave": asdict(second),
        "memory": asdict(memory),
        "objects_grown_in_second_wave": grown,
        "cached_messages": [cached_after_first, cached_after_second],
    }
    text = json.dumps(figures, indent=2)
    (tmp_path / "load-figures.json").write_text(text + "\n")
    print(f"\nload figures:\n{text}")

    # Memory held for jobs is released: the presenter's tables and the bot's own objects.
    assert memory.presenter_tables[2] == memory.presenter_tables[1] == memory.presenter_tables[0]
    assert {name: count for name, count in grown.items() if name.startswith("bot.")} == {}
    # discord.py keeps the last max_messages (1000 by default) messages it saw, with their
    # authors, flags, embeds and components. Every new Message object must be in that cache.
    assert grown.get("discord.message.Message", 0) == cached_after_second - cached_after_first
    assert cached_after_second <= 1000
    rss_growth = memory.bot_rss_mib[2] - memory.bot_rss_mib[1]
    assert rss_growth < MAX_SECOND_WAVE_RSS_GROWTH_MIB
    worker_growth = memory.worker_rss_mib[2] - memory.worker_rss_mib[0]
    assert worker_growth < MAX_WORKER_RSS_GROWTH_MIB
