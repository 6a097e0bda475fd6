"""Who may do what: /config, cancel, delete, /queue and guild isolation under simcord.

One bot serves two simulated guilds. In the first, members hold different roles: the guild
owner, a manager (Manage Server), an administrator (Administrator), a moderator (Manage
Messages only), two plain members, and a plain member whose id is in ``IMAGINE_OWNER_IDS``.
The second guild has its own manager and shares one plain member with the first.

Discord hides /config from members without Manage Server (its ``default_permissions``), and
simcord does the same: ``member.slash`` raises ``SetupError``. To reach the command's own
check, a test grants the member a server override with ``guild.set_command_permissions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import discord
import pytest
import pytest_asyncio
import simcord

from bot.client import ImagineBot, create_bot
from bot.store import JobStore, NewJob
from tests import simworld
from tests.simworld import (
    BLOCKER,
    apply_guild_config,
    cancel_leftovers,
    queued_job_id,
    tiny_settings,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TINY_CONFIG = {**simworld.TINY_CONFIG, "default_iterations": 2}
NOT_YOURS = "Only the person who asked for picture #{id} or a server admin can {action} it."
NOT_HERE = "There is no picture #{id} here."
CONFIG_REJECTED = "Changing imagine's settings needs the Manage Server permission."


@dataclass
class World:
    env: simcord.Env
    bot: ImagineBot
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    other_guild: simcord.GuildHandle
    other_channel: simcord.ChannelHandle
    actors: dict[str, simcord.MemberActor]
    config_command: discord.app_commands.AppCommand

    def __getattr__(self, name: str) -> simcord.MemberActor:
        try:
            return self.actors[name]
        except KeyError:
            raise AttributeError(name) from None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tiny_models, tmp_path_factory):
    settings = tiny_settings(tiny_models, tmp_path_factory.mktemp("permissions-data"))
    bot = create_bot(settings)
    env = simcord.Env(bot)
    await env.start()

    owner_user = env.create_user("olga")
    guild = env.create_guild("Art club", owner=owner_user)
    channel = guild.create_text_channel("art")
    managers = guild.create_role("Managers", permissions=discord.Permissions(manage_guild=True))
    administrators = guild.create_role(
        "Administrators", permissions=discord.Permissions(administrator=True)
    )
    moderators = guild.create_role(
        "Moderators", permissions=discord.Permissions(manage_messages=True)
    )
    alice_user = env.create_user("alice")
    bot_owner_user = env.create_user("bea")
    actors = {
        "owner": guild.add_member(owner_user),
        "manager": guild.add_member(env.create_user("max"), roles=[managers]),
        "administrator": guild.add_member(env.create_user("ada"), roles=[administrators]),
        "moderator": guild.add_member(env.create_user("mo"), roles=[moderators]),
        "alice": guild.add_member(alice_user),
        "bob": guild.add_member(env.create_user("bob")),
        "bot_owner": guild.add_member(bot_owner_user),
    }

    other_guild = env.create_guild("Photo club")
    other_channel = other_guild.create_text_channel("photos")
    other_managers = other_guild.create_role(
        "Managers", permissions=discord.Permissions(manage_guild=True)
    )
    actors["carol"] = other_guild.add_member(env.create_user("carol"), roles=[other_managers])
    actors["alice_elsewhere"] = other_guild.add_member(alice_user)

    # Operator settings are read at start-up; simcord assigns user ids only now.
    bot.settings = bot.settings.replace(owner_ids=frozenset({bot_owner_user.id}))
    for guild_id in (guild.id, other_guild.id):
        await apply_guild_config(bot, guild_id, TINY_CONFIG)

    commands = await bot.tree.fetch_commands()
    config_command = next(command for command in commands if command.name == "config")
    yield World(env, bot, guild, channel, other_guild, other_channel, actors, config_command)

    await bot.close()
    await env.shutdown()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def clean_slate(world):
    """Fail a test that leaves unexpected bot errors or active jobs behind."""
    cursor = world.env.error_cursor
    yield
    leftovers = await cancel_leftovers(world.bot)
    assert leftovers == []
    assert world.env.errors_since(cursor) == ()


# -- helpers ---------------------------------------------------------------------------------


async def imagine(member: simcord.MemberActor, channel: simcord.ChannelHandle, prompt: str) -> int:
    return queued_job_id(await member.slash(channel, "imagine", prompt=prompt))



def job_message(channel: simcord.ChannelHandle, job_id: int) -> discord.Message | None:
    """Return the channel message that shows the job, or None."""
    for message in channel.history():
        if f"#{job_id} ·" in message.content:
            return message
    return None


async def final_message(world: World, job_id: int) -> discord.Message:
    await wait_state(world.bot.store, job_id, "done")

    def posted() -> discord.Message | None:
        message = job_message(world.channel, job_id)
        if message is not None and message.embeds:
            return message
        return None

    return await wait_for(posted, f"the picture of job {job_id}")


@contextlib.asynccontextmanager
async def command_override(world: World, member: simcord.MemberActor) -> AsyncIterator[None]:
    """Let ``member`` see /config through a server override, as a server admin can set."""
    world.guild.set_command_permissions(world.config_command, {member: True})
    try:
        yield
    finally:
        world.guild.set_command_permissions(world.config_command, {})


# -- /config -----------------------------------------------------------------------------------

# Actor -> whether Discord shows /config to them, and whether the bot lets them change settings.
CONFIG_MATRIX = [
    ("owner", True, True),
    ("manager", True, True),
    ("administrator", True, True),
    ("moderator", False, False),
    ("alice", False, False),
    ("bot_owner", False, True),
]


@pytest.mark.parametrize(("actor", "visible", "allowed"), CONFIG_MATRIX)
async def test_config_permission_matrix(world, caplog, actor, visible, allowed):
    caplog.set_level(logging.INFO)
    member = world.actors[actor]
    before = await world.bot.store.guild_settings(world.guild.id)

    if not visible:
        with pytest.raises(simcord.SetupError, match="default-member-permissions"):
            await member.slash(world.channel, "config show")
        assert "config show" not in member.available_commands(world.channel)

    override = contextlib.nullcontext() if visible else command_override(world, member)
    async with override:
        shown = await member.slash(world.channel, "config show")
        changed = await member.slash(world.channel, "config set", key="cutn", value="5")
        changed_settings = await world.bot.store.guild_settings(world.guild.id)
        reset = await member.slash(world.channel, "config reset", key="cutn")

    for result in (shown, changed, reset):
        assert result.ephemeral
    if allowed:
        assert "**cutn**: 2 (changed)" in shown.response.content
        assert changed.response.content == "**cutn** is now 5."
        assert changed_settings["cutn"] == 5
        assert reset.response.content == "**cutn** is back to its default, 16."
        await world.bot.store.set_guild_setting(world.guild.id, "cutn", TINY_CONFIG["cutn"])
    else:
        for result in (shown, changed, reset):
            assert result.response.content == CONFIG_REJECTED
            assert result.followups == []
        assert changed_settings == before
        assert f"Rejected /config from user {member.id}" in caplog.text
    assert await world.bot.store.guild_settings(world.guild.id) == before
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_config_in_other_guild_separate(world):
    await world.manager.slash(world.channel, "config set", key="banned_words", value="dragon")
    try:
        # /config show in the second guild lists only that guild's settings.
        shown = await world.carol.slash(world.other_channel, "config show")
        assert "**banned_words**: none." in shown.response.content
        assert "dragon" not in shown.response.content

        changed = await world.carol.slash(
            world.other_channel, "config set", key="progress_interval", value="7"
        )
        assert changed.response.content == "**progress_interval** is now 7."
        first = await world.bot.store.guild_settings(world.guild.id)
        assert first["progress_interval"] == TINY_CONFIG["progress_interval"]

        # The first guild's banned word does not apply in the second.
        rejected = await world.alice.slash(world.channel, "imagine", prompt="a red dragon")
        assert "'dragon'" in rejected.response.content
        accepted = await imagine(world.alice_elsewhere, world.other_channel, "a red dragon")
        job = await world.bot.store.get(accepted)
        assert job.guild_id == world.other_guild.id
        assert job.request["progress_every"] == 7
        await world.bot.store.cancel(accepted, world.alice.id, admin=False, guild_id=job.guild_id)
        await world.bot.executor.cancel(accepted)
    finally:
        await world.manager.slash(world.channel, "config reset", key="banned_words")
        await world.carol.slash(
            world.other_channel,
            "config set",
            key="progress_interval",
            value=str(TINY_CONFIG["progress_interval"]),
        )


# -- cancel --------------------------------------------------------------------------------------

# Actor -> whether they may cancel a picture that alice asked for in the first guild.
CANCEL_MATRIX = [
    ("alice", True),
    ("owner", True),
    ("manager", True),
    ("administrator", True),
    ("bot_owner", True),
    ("moderator", False),
    ("bob", False),
]


async def test_cancel_permission_matrix(world):
    blocker = await imagine(world.alice, world.channel, BLOCKER)
    await wait_state(world.bot.store, blocker, "running")

    for actor, allowed in CANCEL_MATRIX:
        member = world.actors[actor]
        queued = await imagine(world.alice, world.channel, f"a queued tree for {actor}")
        before = await world.bot.store.get(queued)

        by_command = await member.slash(world.channel, "cancel", job=queued)
        assert by_command.ephemeral, actor
        if allowed:
            assert by_command.response.content == f"Cancelled #{queued}.", actor
            assert (await world.bot.store.get(queued)).state == "cancelled", actor
            continue
        assert by_command.response.content == NOT_YOURS.format(id=queued, action="cancel")
        assert await world.bot.store.get(queued) == before, actor

        by_button = await member.click(job_message(world.channel, queued), label="Cancel")
        assert by_button.response.content == NOT_YOURS.format(id=queued, action="cancel")
        assert await world.bot.store.get(queued) == before, actor
        await world.alice.slash(world.channel, "cancel", job=queued)

    # The running job: strangers are rejected by command and button, the manager may stop it.
    running = await world.bot.store.get(blocker)
    message = job_message(world.channel, blocker)
    for actor in ("bob", "moderator"):
        rejected = await world.actors[actor].click(message, label="Cancel")
        assert rejected.response.content == NOT_YOURS.format(id=blocker, action="cancel")
        rejected = await world.actors[actor].slash(world.channel, "cancel", job=blocker)
        assert rejected.response.content == NOT_YOURS.format(id=blocker, action="cancel")
        assert (await world.bot.store.get(blocker)).state == "running"
    assert world.bot.executor.info().busy_job_id == running.id

    stopped = await world.manager.click(message, label="Cancel")
    assert stopped.response.content == f"Cancelled #{blocker}."
    await wait_state(world.bot.store, blocker, "cancelled")


async def test_cancel_from_other_guild_rejected(world):
    # The blocker keeps the job queued, so nothing but a cancel could change its row.
    blocker = await imagine(world.bob, world.channel, BLOCKER)
    await wait_state(world.bot.store, blocker, "running")
    job_id = await imagine(world.alice, world.channel, "a queued hill")
    before = await world.bot.store.get(job_id)

    # An admin of another guild cannot reach the job, and the reply does not reveal that it exists.
    by_admin = await world.carol.slash(world.other_channel, "cancel", job=job_id)
    assert by_admin.response.content == NOT_HERE.format(id=job_id)
    # Its owner, in a guild where the job was not made, cannot either.
    by_owner = await world.alice_elsewhere.slash(world.other_channel, "cancel", job=job_id)
    assert by_owner.response.content == NOT_HERE.format(id=job_id)
    # /cancel without a number picks the latest job in this guild only.
    latest = await world.alice_elsewhere.slash(world.other_channel, "cancel")
    assert "no queued or running pictures here" in latest.response.content
    assert await world.bot.store.get(job_id) == before

    await world.alice.slash(world.channel, "cancel", job=job_id)
    await world.bob.slash(world.channel, "cancel", job=blocker)
    await wait_state(world.bot.store, blocker, "cancelled")


# -- delete ----------------------------------------------------------------------------------

DELETE_ALLOWED = ["alice", "owner", "manager", "administrator", "bot_owner"]
DELETE_REJECTED = ["bob", "moderator"]


async def test_delete_permission_matrix(world):
    job_ids = [
        await imagine(world.alice, world.channel, f"a small boat {n}")
        for n in range(len(DELETE_ALLOWED))
    ]
    messages = [await final_message(world, job_id) for job_id in job_ids]

    for job_id, message, actor in zip(job_ids, messages, DELETE_ALLOWED, strict=True):
        before = await world.bot.store.get(job_id)
        for stranger in DELETE_REJECTED:
            rejected = await world.actors[stranger].click(message, label="Delete")
            assert rejected.ephemeral
            assert rejected.response.content == NOT_YOURS.format(id=job_id, action="delete")
            assert await world.bot.store.get(job_id) == before, stranger
            assert job_message(world.channel, job_id) is not None, stranger

        deleted = await world.actors[actor].click(message, label="Delete")
        assert deleted.response.content == f"Deleted #{job_id}.", actor
        assert await world.bot.store.get(job_id) is None, actor
        assert job_message(world.channel, job_id) is None, actor


# -- /queue ----------------------------------------------------------------------------------


async def test_queue_shows_only_callers_prompts(world):
    blocker = await imagine(world.alice, world.channel, BLOCKER)
    await wait_state(world.bot.store, blocker, "running")
    alices = await imagine(world.alice, world.channel, "alice private garden")
    bobs = await imagine(world.bob, world.channel, "bob private harbour")
    elsewhere = await imagine(world.alice_elsewhere, world.other_channel, "alice private desert")

    views = {
        actor: (await world.actors[actor].slash(channel, "queue"))
        for actor, channel in [
            ("alice", world.channel),
            ("bob", world.channel),
            ("manager", world.channel),
            ("bot_owner", world.channel),
            ("carol", world.other_channel),
            ("alice_elsewhere", world.other_channel),
        ]
    }
    for result in views.values():
        assert result.ephemeral

    texts = {actor: result.response.content for actor, result in views.items()}
    assert "alice private garden" in texts["alice"]
    assert f"#{blocker} · running" in texts["alice"]
    assert "bob private harbour" in texts["bob"]
    assert "alice private desert" in texts["alice_elsewhere"]
    expected_own = {
        "alice": {blocker, alices},
        "bob": {bobs},
        "manager": set(),
        "bot_owner": set(),
        "carol": set(),
        "alice_elsewhere": {elsewhere},
    }
    prompts = {
        blocker: "slow lighthouse",
        alices: "alice private garden",
        bobs: "bob private harbour",
        elsewhere: "alice private desert",
    }
    for actor, text in texts.items():
        for job_id, prompt in prompts.items():
            if job_id in expected_own[actor]:
                continue
            assert prompt not in text, actor
            assert f"#{job_id} " not in text, actor

    for job_id in (alices, bobs, elsewhere, blocker):
        job = await world.bot.store.get(job_id)
        await world.bot.store.cancel(job_id, 0, admin=True, guild_id=job.guild_id)
        await world.bot.executor.cancel(job_id)
    await wait_state(world.bot.store, blocker, "cancelled")


# -- ownership in the SQL statement ------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def store(tmp_path):
    store = await JobStore.open(tmp_path / "imagine.sqlite3")
    yield store
    await store.close()


def read_row(path, job_id: int) -> tuple[Any, ...] | None:
    """Read the job's row through a second connection, bypassing the store."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        connection.close()


GUILD, OTHER_GUILD, OWNER, STRANGER = 1, 2, 10, 20


async def test_store_refusals_change_no_row(store):
    new = NewJob(GUILD, 5, OWNER, "a lake", {"seed": 1})
    finished, _ = await store.enqueue(new, per_user_limit=10, queue_limit=10)
    assert (await store.next_job()).id == finished.id
    await store.mark_done(finished.id, None)
    queued, _ = await store.enqueue(new, per_user_limit=10, queue_limit=10)

    # (action, job, caller, admin, guild) that must not touch any row.
    rejected_calls = [
        ("cancel", queued.id, STRANGER, False, GUILD),
        ("cancel", queued.id, OWNER, False, OTHER_GUILD),
        ("cancel", queued.id, STRANGER, True, OTHER_GUILD),
        ("cancel", queued.id, OWNER, False, None),
        ("cancel", finished.id, OWNER, True, GUILD),  # already done: nothing to cancel
        ("delete", finished.id, STRANGER, False, GUILD),
        ("delete", finished.id, OWNER, False, OTHER_GUILD),
        ("delete", finished.id, STRANGER, True, OTHER_GUILD),
        ("delete", queued.id, OWNER, True, GUILD),  # still queued: cancel it first
    ]
    for action, job_id, caller, admin, guild_id in rejected_calls:
        row_before = read_row(store.path, job_id)
        changes_before = store._db.total_changes

        method = store.cancel if action == "cancel" else store.delete
        result = await method(job_id, caller, admin=admin, guild_id=guild_id)

        case = (action, job_id, caller, admin, guild_id)
        assert result is None, case
        # total_changes counts every row an INSERT, UPDATE or DELETE touched on the store's
        # connection, so 0 shows that the WHERE clause itself matched nothing.
        assert store._db.total_changes == changes_before, case
        assert read_row(store.path, job_id) == row_before, case

    # The rightful calls change exactly one row each.
    changes_before = store._db.total_changes
    assert (await store.cancel(queued.id, OWNER, admin=False, guild_id=GUILD)).state == "cancelled"
    assert (await store.delete(finished.id, STRANGER, admin=True, guild_id=GUILD)).id == finished.id
    assert store._db.total_changes == changes_before + 2
    assert read_row(store.path, finished.id) is None


async def test_store_concurrent_cancels_one_wins(store):
    job, _ = await store.enqueue(
        NewJob(GUILD, 5, OWNER, "a lake", {"seed": 1}), per_user_limit=10, queue_limit=10
    )

    results = await asyncio.gather(
        store.cancel(job.id, OWNER, admin=False, guild_id=GUILD),
        store.cancel(job.id, STRANGER, admin=True, guild_id=GUILD),
        store.cancel(job.id, STRANGER, admin=False, guild_id=GUILD),
    )

    assert [result is not None for result in results].count(True) == 1
    assert results[2] is None
    assert (await store.get(job.id)).state == "cancelled"
