"""A bot crash under simcord: the process dies without its graceful shutdown, a new bot starts.

``crash`` leaves things as a SIGKILL of the bot process would: the worker is killed, the
executor stops at whatever await it was in, and the database connection goes away without
another write. A second bot then starts on the same database through ``env.restart_bot``.
Queued jobs must all complete, and the interrupted job must resume with its message showing
the iteration. Every picture must be posted exactly once, also one whose post the crash
interrupted, and buttons on messages of the first bot must still work.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import simcord

from bot.client import ImagineBot, create_bot
from bot.settings import Settings
from tests import simworld
from tests.simworld import (
    RESUMED_RE,
    TINY_CONFIG,
    apply_guild_config,
    final_messages,
    queued_job_id,
    texts_about,
    tiny_settings,
)

pytestmark = pytest.mark.asyncio



async def wait_for(condition, what: str, timeout: float = 90.0):
    """Call ``simworld.wait_for`` with a default timeout of 90 s instead of 60 s."""
    return await simworld.wait_for(condition, what, timeout)


async def crash(bot: ImagineBot) -> None:
    """Stop ``bot`` as SIGKILL would: no requeue, no final edits, no more database writes."""
    executor = bot.executor
    pid = executor.info().worker_pid
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    # The dispatcher and the final posts in flight, which run in tasks of their own.
    tasks = [executor._task, *executor._deliveries.values()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await bot.store.close()


@pytest.fixture
def settings(tiny_models, tmp_path) -> Settings:
    return tiny_settings(tiny_models, tmp_path)


@pytest.fixture
async def world(settings):
    """The first bot, its simulated guild, and a holder for the bot that replaces it."""
    first = create_bot(settings)
    env = simcord.Env(first)
    await env.start()
    bots = [first]
    try:
        guild = env.create_guild()
        channel = guild.create_text_channel("art")
        alice = guild.add_member(env.create_user("alice"))
        bob = guild.add_member(env.create_user("bob"))
        await apply_guild_config(first, guild.id, TINY_CONFIG)
        yield env, bots, channel, alice, bob
    finally:
        await bots[-1].close()
        await env.shutdown()


async def restart(env: simcord.Env, bots: list[ImagineBot], settings: Settings) -> ImagineBot:
    bot = create_bot(settings)
    await env.restart_bot(bot)
    bots.append(bot)
    return bot


async def imagine(member, channel, prompt: str) -> int:
    return queued_job_id(await member.slash(channel, "imagine", prompt=prompt))


async def wait_state(bot: ImagineBot, job_id: int, state: str):
    """Call ``simworld.wait_state`` on ``bot``'s store with a timeout of 90 s."""
    return await simworld.wait_state(bot.store, job_id, state, timeout=90.0)


async def test_crash_mid_job_resumes(world, settings):
    env, bots, channel, alice, bob = world
    first = bots[0]
    finished = await imagine(alice, channel, "a quiet pond")
    await wait_state(first, finished, "done")
    await wait_for(lambda: final_messages(channel, finished), "the first picture")
    running = await imagine(alice, channel, "a slow lighthouse --iter 400")
    waiting = [await imagine(bob, channel, f"a waiting bird {n}") for n in range(3)]

    async def saved_state():
        job = await first.store.get(running)
        return job.saved_iteration if job.state == "running" else None

    saved = await wait_for(saved_state, "a saved state of the running job")
    await crash(first)
    second = await restart(env, bots, settings)

    job = await wait_state(second, running, "done")
    assert job.attempts == 1
    resumed = [RESUMED_RE.search(text) for text in texts_about(env, running)]
    resumed_at = [int(match[1]) for match in resumed if match]
    assert len(resumed_at) == 1
    assert resumed_at[0] >= saved
    for job_id in waiting:
        await wait_state(second, job_id, "done")

    # Every picture is in the channel exactly once, the one from before the crash included.
    for job_id in (finished, running, *waiting):
        await wait_for(lambda job_id=job_id: final_messages(channel, job_id), f"job {job_id}")
        assert len(final_messages(channel, job_id)) == 1, f"job {job_id}"
    await wait_for(lambda: not second.executor.info().posting_job_ids, "the final posts")
    assert await second.store.undelivered() == []

    # A button of a message the crashed bot posted works with the new one.
    old_message = final_messages(channel, finished)[0]
    reproduced = await bob.click(old_message, label="Reproduce")
    copy = queued_job_id(reproduced)
    await wait_state(second, copy, "done")
    assert env.errors == []


async def test_crash_while_posting_picture(world, settings):
    env, bots, channel, alice, _ = world
    first = bots[0]
    job_id = await imagine(alice, channel, "a lighthouse --iter 150")
    await wait_for(
        lambda: next((m for m in channel.history() if f"#{job_id} ·" in m.content), None),
        "the job's message",
    )

    # Discord fails every new message, so the finished picture waits for a retry.
    env.inject_error("POST", f"/channels/{channel.id}/messages", status=500, times=None)
    await wait_state(first, job_id, "done")
    await wait_for(
        lambda: any("done in" in text for text in texts_about(env, job_id)),
        "a failed post of the picture",
    )
    await crash(first)
    env.backend.faults.clear()
    assert final_messages(channel, job_id) == []

    second = await restart(env, bots, settings)

    await wait_for(lambda: final_messages(channel, job_id), "the picture posted after restart")
    await asyncio.sleep(1.0)  # a second post would come right after the first
    assert len(final_messages(channel, job_id)) == 1
    assert await second.store.undelivered() == []
    progress = [m for m in channel.history() if f"#{job_id} ·" in m.content and not m.embeds]
    assert progress == []  # the progress message was replaced by the picture
