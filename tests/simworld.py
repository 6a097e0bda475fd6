"""Scaffolding shared by the simcord bot tests: settings for tiny models, guild setup, polling.

Plain functions and constants only; the fixtures that use them stay in the test modules.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
import simcord

from bot.client import ImagineBot
from bot.jobs import Job
from bot.presenter import Presenter
from bot.settings import Settings

if TYPE_CHECKING:
    from bot.store import JobStore
    from generator.testing import TinyModels

# Per-guild settings that keep test jobs tiny: 32² pictures, 2 cutouts, a frame every 2 steps.
TINY_CONFIG: Mapping[str, int] = {
    "cutn": 2,
    "default_iterations": 4,
    "default_size": 32,
    "progress_interval": 2,
    "max_jobs_per_user": 10,
}
# A job that keeps the executor busy until the test cancels it.
BLOCKER = "a slow lighthouse --iter 100000"
QUEUED_RE = re.compile(r"Queued as #(\d+), position (\d+), about (\d+) min\.")
RESUMED_RE = re.compile(r"resumed at iteration (\d+)/(\d+)")


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]], what: str, timeout: float = 60.0
) -> Any:
    """Poll ``condition`` until it returns something truthy, and raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_state(
    store: JobStore, job_id: int, *states: str, timeout: float = 60.0
) -> Job:
    """Wait until job ``job_id`` is in one of ``states``; return it."""

    async def reached() -> Job | None:
        job = await store.get(job_id)
        return job if job is not None and job.state in states else None

    return await wait_for(reached, f"job {job_id} to be {'/'.join(states)}", timeout)


def queued_job_id(result: simcord.InteractionResult) -> int:
    """Return the job id of an /imagine reply "Queued as #id, …", failing on any other reply."""
    match = QUEUED_RE.fullmatch(result.response.content)
    assert match, result.response.content
    return int(match[1])


def final_messages(channel: simcord.ChannelHandle, job_id: int) -> list[discord.Message]:
    """Return the messages in ``channel`` that carry job ``job_id``'s finished picture."""
    return [
        message
        for message in channel.history()
        if message.embeds and message.embeds[0].footer.text == f"Job #{job_id}"
    ]


def texts_about(env: simcord.Env, job_id: int) -> list[str]:
    """Return every message text the bot posted or edited in for ``job_id``, in order."""
    texts = []
    for request in env.http_requests:
        json = request.json if isinstance(request.json, dict) else {}
        content = json.get("content")
        if request.method in ("POST", "PATCH") and content and f"#{job_id} ·" in content:
            texts.append(content)
    return texts


def tiny_settings(tiny_models: TinyModels, data_dir: Path) -> Settings:
    """Build settings that run the tiny models on one CPU thread and keep data in ``data_dir``."""
    return Settings(
        data_dir=data_dir,
        vqgan_model=tiny_models.vqgan,
        clip_models=(tiny_models.clip,),
        device="cpu",
        max_size=64,
        max_iterations=100_000,
        threads=1,
    )


def fast_progress_edits(bot: ImagineBot) -> None:
    """Give ``bot`` a presenter whose throttles let nearly every progress frame through.

    The real throttles allow one edit of a message every 2 s and five edits in a channel
    every 5 s, and one module's tests share that channel budget. A tiny job can then end
    before its first frame gets a turn, with no progress edit at all.
    Call this before the bot starts: the executor keeps the presenter it starts with.
    """
    bot.presenter = Presenter(bot, edit_interval=0.05, channel_edits=1000, channel_period=1.0)


def create_admins_role(guild: simcord.GuildHandle) -> simcord.RoleHandle:
    """Create an "Admins" role with Manage Server and Manage Messages in ``guild``."""
    return guild.create_role(
        "Admins", permissions=discord.Permissions(manage_guild=True, manage_messages=True)
    )


async def apply_guild_config(bot: ImagineBot, guild_id: int, config: Mapping[str, Any]) -> None:
    """Store each key of ``config`` as a per-guild setting of ``guild_id``."""
    for key, value in config.items():
        await bot.store.set_guild_setting(guild_id, key, value)


async def cancel_leftovers(bot: ImagineBot) -> list[Job]:
    """Cancel every queued or running job, wait until the executor is idle, return the jobs."""
    leftovers = await bot.store.queue()
    for job in leftovers:
        await bot.store.cancel(job.id, 0, admin=True, guild_id=job.guild_id)
        await bot.executor.cancel(job.id)
    await wait_for(lambda: bot.executor.info().busy_job_id is None, "executor idle")
    return leftovers
