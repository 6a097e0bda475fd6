"""A bot restart under simcord: jobs left in the database resume, and old buttons still work.

The first bot stops while one job runs and another waits. The running job is then marked
running again in the database, as a crash would leave it, before a second bot starts on the
same file with ``env.restart_bot``.
"""

from __future__ import annotations

import discord
import pytest
import simcord

from bot.client import create_bot
from bot.store import JobStore
from tests.simworld import (
    TINY_CONFIG,
    apply_guild_config,
    queued_job_id,
    tiny_settings,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.asyncio



async def imagine(member, channel, prompt: str) -> int:
    return queued_job_id(await member.slash(channel, "imagine", prompt=prompt))


def edits_of(env: simcord.Env, message_id: int) -> list[str]:
    return [
        request.json.get("content", "")
        for request in env.http_requests
        if request.method == "PATCH" and request.path.endswith(f"/messages/{message_id}")
    ]


async def test_restart_resumes_jobs_and_keeps_buttons(tiny_models, tmp_path):
    settings = tiny_settings(tiny_models, tmp_path)
    first_bot = create_bot(settings)
    env = simcord.Env(first_bot)
    await env.start()
    second_bot = None
    try:
        guild = env.create_guild()
        channel = guild.create_text_channel("art")
        admins = guild.create_role("Admins", permissions=discord.Permissions(manage_guild=True))
        admin = guild.add_member(env.create_user("ada"), roles=[admins])
        alice = guild.add_member(env.create_user("alice"))
        bob = guild.add_member(env.create_user("bob"))
        await apply_guild_config(first_bot, guild.id, TINY_CONFIG)

        # A finished picture, a running job with saved states and a queued job.
        finished = await imagine(alice, channel, "a quiet pond")
        await wait_state(first_bot.store, finished, "done")
        running = await imagine(alice, channel, "a slow lighthouse --iter 3000")
        await wait_state(first_bot.store, running, "running")
        waiting = await imagine(bob, channel, "a waiting bird")

        async def state_saved():
            job = await first_bot.store.get(running)
            return job.saved_iteration

        await wait_for(state_saved, "a saved state of the running job")
        await first_bot.close()

        # Leave the job as a crash would: running in the database.
        store = await JobStore.open(settings.database_path)
        crashed = await store.next_job()
        await store.close()
        assert crashed.id == running
        running_message = crashed.message_id

        second_bot = create_bot(settings)
        await env.restart_bot(second_bot)
        store = second_bot.store

        # The job resumes from its state, and its message shows that. A "back at the front of the
        # queue" notice comes first, unless the job was running again before the bot was ready.
        await wait_for(
            lambda: any("resumed at iteration" in text for text in edits_of(env, running_message)),
            "the resumed job's message",
        )
        texts = edits_of(env, running_message)
        resumed_at = next(n for n, text in enumerate(texts) if "resumed at iteration" in text)
        interrupted = [n for n, text in enumerate(texts) if "interrupted by a restart" in text]
        assert all(n < resumed_at for n in interrupted), texts
        resumed = await store.get(running)
        assert resumed.state == "running"
        assert resumed.attempts == 1

        cancelled = await admin.slash(channel, "cancel", job=running)
        assert cancelled.response.content == f"Cancelled #{running}."
        await wait_state(store, running, "cancelled")
        await wait_state(store, waiting, "done")

        # Buttons of a message the first bot posted work with the second.
        old_message = next(
            message
            for message in channel.history()
            if message.embeds and message.embeds[0].footer.text == f"Job #{finished}"
        )
        reproduced = await bob.click(old_message, label="Reproduce")
        copy = queued_job_id(reproduced)
        await wait_state(store, copy, "done")
        assert (await store.get(copy)).user_id == bob.id

        refused = await bob.click(old_message, label="Delete")
        assert "Only the person who asked" in refused.response.content
        deleted = await alice.click(old_message, label="Delete")
        assert deleted.response.content == f"Deleted #{finished}."
        assert await store.get(finished) is None
        assert env.errors == []
    finally:
        if second_bot is not None:
            await second_bot.close()
        elif not first_bot.is_closed():
            await first_bot.close()
        await env.shutdown()
