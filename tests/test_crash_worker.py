"""SIGKILL of the generator worker under simcord: the bot keeps serving, the job resumes.

The worker is a separate process, so killing it mid-job (as the kernel's out-of-memory
killer would) must not disturb the bot: commands are still answered while a new worker
starts, the job resumes from its last saved state and its message says so, and the finished
picture is the same as an uninterrupted run with the same seed. A job whose worker dies
three times is failed with a message in its channel, and the queue goes on.
"""

from __future__ import annotations

import os
import signal

import discord
import pytest
import simcord

from bot.client import create_bot
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


@pytest.fixture
async def world(tiny_models, tmp_path):
    settings = tiny_settings(tiny_models, tmp_path)
    bot = create_bot(settings)
    env = simcord.Env(bot)
    await env.start()
    try:
        guild = env.create_guild()
        channel = guild.create_text_channel("art")
        alice = guild.add_member(env.create_user("alice"))
        bob = guild.add_member(env.create_user("bob"))
        await apply_guild_config(bot, guild.id, TINY_CONFIG)
        yield env, bot, channel, alice, bob
    finally:
        await bot.close()
        await env.shutdown()


async def imagine(member, channel, prompt: str) -> int:
    return queued_job_id(await member.slash(channel, "imagine", prompt=prompt))


async def wait_state(bot, job_id: int, *states: str):
    """Call ``simworld.wait_state`` on ``bot``'s store with a timeout of 90 s."""
    return await simworld.wait_state(bot.store, job_id, *states, timeout=90.0)


async def kill_worker_of(bot, job_id: int) -> int:
    """SIGKILL the worker once it runs ``job_id``; return the killed pid."""

    def running_job():
        info = bot.executor.info()
        return info.worker_pid if info.busy_job_id == job_id and info.worker_pid else None

    pid = await wait_for(running_job, f"a worker running job {job_id}")
    os.kill(pid, signal.SIGKILL)
    return pid


async def test_worker_sigkill_resumes_job(world):
    env, bot, channel, alice, bob = world
    prompt = "a lighthouse at dusk --seed 5 --iter 120"
    job_id = await imagine(alice, channel, prompt)

    async def saved_iteration():
        job = await bot.store.get(job_id)
        return job.saved_iteration if job.state == "running" else None

    saved = await wait_for(saved_iteration, "a saved state")
    killed = await kill_worker_of(bot, job_id)

    # The bot answers while the worker is down and a new one starts.
    queue = await bob.slash(channel, "queue")
    info = await bob.slash(channel, "info")
    assert queue.response is not None
    assert "alice" not in str(queue.response.content).lower()
    assert info.response is not None
    assert not bot.is_closed()

    job = await wait_state(bot, job_id, "done")
    assert job.attempts == 1
    assert bot.executor.info().worker_restarts == 1
    assert bot.executor.info().worker_pid not in (None, killed)
    state_file = bot.executor.state_dir / f"job-{job_id}.pt"
    await wait_for(lambda: not state_file.exists(), "the job's state file to be deleted")

    # The job's message said where it resumed, and the picture was posted once.
    resumed = [RESUMED_RE.search(text) for text in texts_about(env, job_id)]
    resumed_at = [int(match[1]) for match in resumed if match]
    assert resumed_at, "no message said 'resumed at iteration N'"
    assert resumed_at[0] >= saved
    pictures = await wait_for(lambda: final_messages(channel, job_id), "the picture")
    assert len(pictures) == 1

    # The resumed picture is the one an uninterrupted run with the same seed makes.
    again = await imagine(bob, channel, prompt)
    await wait_state(bot, again, "done")
    reference = await wait_for(lambda: final_messages(channel, again), "the reference picture")
    resumed_png = await pictures[0].attachments[0].read()
    reference_png = await reference[0].attachments[0].read()
    assert resumed_png == reference_png


async def test_three_worker_deaths_fail_job(world):
    _, bot, channel, alice, bob = world
    job_id = await imagine(alice, channel, "a cursed lighthouse --iter 3000")
    after = await imagine(bob, channel, "a calm sea")

    killed = []
    for _ in range(3):
        killed.append(await kill_worker_of(bot, job_id))
        await wait_for(lambda: bot.executor.info().worker_pid not in (None, killed[-1]), "restart")

    job = await wait_state(bot, job_id, "failed")
    assert job.attempts == 3
    assert "interrupted 3 times" in job.error
    assert "Try again" in job.error

    def failed_message() -> discord.Message | None:
        for message in channel.history():
            if message.id == job.message_id and "failed: This picture was" in message.content:
                return message
        return None

    message = await wait_for(failed_message, "the job's message to say it failed")
    assert "failed: This picture was interrupted 3 times" in message.content
    assert message.components == []  # no Cancel button on a failed job
    state_file = bot.executor.state_dir / f"job-{job_id}.pt"
    await wait_for(lambda: not state_file.exists(), "the job's state file to be deleted")
    assert len(set(killed)) == 3

    await wait_state(bot, after, "done")
    await wait_for(lambda: final_messages(channel, after), "the next job's picture")
    assert final_messages(channel, job_id) == []
    assert bot.executor.info().worker_restarts == 3
