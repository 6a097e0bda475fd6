"""End-to-end tests of the bot under simcord: real discord.py, SQLite, worker and tiny models.

One bot, one simulated guild and one worker process serve the whole module; each test makes
its own jobs and leaves the queue empty. Generation runs in the worker process, outside
simcord's settling, so tests poll the store and the channel with bounded waits.
"""

from __future__ import annotations

import asyncio
import io
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import pytest
import pytest_asyncio
import simcord
from PIL import Image

from bot.client import ImagineBot, create_bot
from bot.start_images import start_images_dir
from generator.png import read_png_metadata
from tests.simworld import (
    BLOCKER,
    QUEUED_RE,
    TINY_CONFIG,
    apply_guild_config,
    cancel_leftovers,
    create_admins_role,
    fast_progress_edits,
    queued_job_id,
    tiny_settings,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEFERRED_CHANNEL_MESSAGE = 5


@dataclass
class World:
    env: simcord.Env
    bot: ImagineBot
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    other_channel: simcord.ChannelHandle
    admin: simcord.MemberActor
    alice: simcord.MemberActor
    bob: simcord.MemberActor
    edits: list[dict[str, Any]] = field(default_factory=list)
    error_cursor: int = 0

    def take_errors(self) -> tuple[BaseException, ...]:
        """Return the errors simcord recorded since the last call, marking them as expected."""
        errors = self.env.errors_since(self.error_cursor)
        self.error_cursor = self.env.error_cursor
        return errors


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tiny_models, tmp_path_factory):
    settings = tiny_settings(tiny_models, tmp_path_factory.mktemp("bot-data"))
    bot = create_bot(settings)
    fast_progress_edits(bot)
    env = simcord.Env(bot)
    await env.start()

    guild = env.create_guild("Art club")
    channel = guild.create_text_channel("art")
    other_channel = guild.create_text_channel("chat")
    admins = create_admins_role(guild)
    admin = guild.add_member(env.create_user("ada"), roles=[admins])
    alice = guild.add_member(env.create_user("alice"))
    bob = guild.add_member(env.create_user("bob"))
    await apply_guild_config(bot, guild.id, TINY_CONFIG)

    state = World(env, bot, guild, channel, other_channel, admin, alice, bob)

    async def record_edit(payload: discord.RawMessageUpdateEvent) -> None:
        state.edits.append(payload.data)

    bot.add_listener(record_edit, "on_raw_message_edit")
    yield state

    await bot.close()
    await env.shutdown()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def clean_slate(world):
    """Fail a test that leaves unexpected bot errors or active jobs behind."""
    world.error_cursor = world.env.error_cursor
    yield
    leftovers = await cancel_leftovers(world.bot)
    assert leftovers == []
    assert world.env.errors_since(world.error_cursor) == ()


# -- helpers ---------------------------------------------------------------------------------



def job_messages(channel: simcord.ChannelHandle, job_id: int) -> list[discord.Message]:
    return [message for message in channel.history() if f"#{job_id} ·" in message.content]


async def final_message(world: World, channel: simcord.ChannelHandle, job_id: int):
    await wait_state(world.bot.store, job_id, "done")

    def posted() -> discord.Message | None:
        for message in job_messages(channel, job_id):
            if message.embeds and message.embeds[0].footer.text == f"Job #{job_id}":
                return message
        return None

    message = await wait_for(posted, f"the picture of job {job_id}")
    # The progress message goes after the picture is posted.
    await wait_for(
        lambda: job_id not in world.bot.executor.info().posting_job_ids,
        f"the final post of job {job_id} to finish",
    )
    return message


async def imagine(world: World, member, prompt: str, channel=None, **options) -> int:
    result = await member.slash(channel or world.channel, "imagine", prompt=prompt, **options)
    return queued_job_id(result)


async def start_blocker(world: World, member) -> int:
    job_id = await imagine(world, member, BLOCKER)
    await wait_state(world.bot.store, job_id, "running")
    return job_id


async def cancel_as_admin(world: World, job_id: int) -> None:
    result = await world.admin.slash(world.channel, "cancel", job=job_id)
    assert result.response.content == f"Cancelled #{job_id}."
    await wait_state(world.bot.store, job_id, "cancelled")


def last_callback_type(world: World) -> int:
    """Return the type of the bot's latest interaction callback (5: deferred message)."""
    callbacks = [r for r in world.env.http_requests if r.path.endswith("/callback")]
    return callbacks[-1].json["type"]


def button_labels(message: discord.Message) -> list[str]:
    return [child.label for row in message.components for child in row.children]


# -- the main flow -------------------------------------------------------------------------


async def test_imagine_end_to_end(world):
    acknowledged: list[float] = []
    original_defer = discord.InteractionResponse.defer

    async def timed_defer(self, **kwargs):
        acknowledged.append(time.perf_counter())
        return await original_defer(self, **kwargs)

    discord.InteractionResponse.defer = timed_defer
    try:
        started = time.perf_counter()
        result = await world.alice.slash(
            world.channel,
            "imagine",
            prompt="a **red** cat @everyone --no fog --seed 7 --iter 6",
            negative="rain",
        )
    finally:
        discord.InteractionResponse.defer = original_defer
    latency = acknowledged[0] - started
    print(f"\nacknowledgement latency: {latency * 1000:.1f} ms")

    assert latency < 3.0
    assert last_callback_type(world) == DEFERRED_CHANNEL_MESSAGE
    assert result.ephemeral
    job_id = queued_job_id(result)
    assert QUEUED_RE.fullmatch(result.response.content)[2] == "1"

    message = await final_message(world, world.channel, job_id)

    # Progress edits carried PNG frames.
    progress_files = [
        attachment["filename"]
        for data in world.edits
        for attachment in data.get("attachments", [])
        if f"#{job_id} ·" in data.get("content", "")
    ]
    assert f"progress-{job_id}.png" in progress_files

    # The progress message made way for the final one.
    assert [m.id for m in job_messages(world.channel, job_id)] == [message.id]
    assert message.content.startswith(world.alice.mention)
    assert button_labels(message) == ["Re-roll", "Reproduce", "Delete"]

    embed = message.embeds[0]
    assert "\\*\\*red\\*\\*" in embed.title
    assert "@everyone" not in embed.title
    fields = {item.name: item.value for item in embed.fields}
    assert fields["Negative"] == "fog, rain"
    assert fields["Seed"] == "7"
    assert fields["Size"] == "32×32"
    assert fields["Iterations"] == "6"
    assert "tiny-vqgan" in fields["Models"]
    assert "imagine-tiny-clip" in fields["Models"]
    assert embed.image.url.endswith(f"imagine-{job_id}.png")

    png = await message.attachments[0].read()
    metadata = read_png_metadata(png)
    assert metadata["prompt"] == "a **red** cat @everyone"
    assert metadata["negative"] == "fog, rain"
    assert metadata["seed"] == "7"
    assert metadata["size"] == "32x32"
    assert metadata["iterations"] == "6"

    # Channel messages ping the requester and no one else.
    posts = [
        request.json
        for request in world.env.http_requests
        if request.method == "POST" and request.path == f"/channels/{world.channel.id}/messages"
    ]
    assert posts
    for body in posts:
        mentions = body["allowed_mentions"]
        assert mentions["parse"] == []
        assert [int(user) for user in mentions["users"]] == [world.alice.id]


async def test_event_loop_lag_during_job(world):
    blocker = await start_blocker(world, world.alice)
    lags: list[float] = []

    # Two seconds of samples while the job runs and its progress frames are posted.
    deadline = time.perf_counter() + 2.0
    while time.perf_counter() < deadline:
        before = time.perf_counter()
        await asyncio.sleep(0.05)
        lags.append(time.perf_counter() - before - 0.05)
    still_running = (await world.bot.store.get(blocker)).state == "running"
    await cancel_as_admin(world, blocker)

    print(
        f"\nevent-loop lag over {len(lags)} samples: "
        f"median {statistics.median(lags) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms"
    )
    assert still_running
    assert len(lags) >= 10
    assert max(lags) < 1.0


async def test_reproduce_and_reroll(world):
    original = await imagine(world, world.alice, "a green field --seed 11 --iter 4")
    original_message = await final_message(world, world.channel, original)
    original_png = await original_message.attachments[0].read()

    reproduce = await world.bob.click(original_message, label="Reproduce")
    assert reproduce.ephemeral
    copy_id = queued_job_id(reproduce)
    copy_message = await final_message(world, world.channel, copy_id)

    copy = await world.bot.store.get(copy_id)
    assert copy.user_id == world.bob.id
    assert copy.request["seed"] == 11
    copy_png = await copy_message.attachments[0].read()
    assert same_pixels(copy_png, original_png)
    assert copy_message.content.startswith(world.bob.mention)

    reroll = await world.bob.click(original_message, label="Re-roll")
    variation_id = queued_job_id(reroll)
    await final_message(world, world.channel, variation_id)
    variation = await world.bot.store.get(variation_id)
    assert variation.request["seed"] != 11
    assert variation.prompt == "a green field --seed 11 --iter 4"


def same_pixels(first: bytes, second: bytes) -> bool:
    return Image.open(io.BytesIO(first)).tobytes() == Image.open(io.BytesIO(second)).tobytes()


async def test_delete_owner_only(world):
    job_id = await imagine(world, world.alice, "a small boat")
    message = await final_message(world, world.channel, job_id)

    refused = await world.bob.click(message, label="Delete")
    assert refused.ephemeral
    assert "Only the person who asked" in refused.response.content
    assert await world.bot.store.get(job_id) is not None
    assert [m.id for m in job_messages(world.channel, job_id)] == [message.id]

    deleted = await world.alice.click(message, label="Delete")
    assert deleted.ephemeral
    assert deleted.response.content == f"Deleted #{job_id}."
    assert await world.bot.store.get(job_id) is None
    assert job_messages(world.channel, job_id) == []


async def test_admin_deletes_any_picture(world):
    job_id = await imagine(world, world.bob, "a blue kite")
    message = await final_message(world, world.channel, job_id)

    deleted = await world.admin.click(message, label="Delete")

    assert deleted.response.content == f"Deleted #{job_id}."
    assert await world.bot.store.get(job_id) is None


# -- queue, cancel and fairness ------------------------------------------------------------


async def test_queue_shows_own_jobs_only(world):
    blocker = await start_blocker(world, world.alice)
    first = await imagine(world, world.alice, "alice first")
    second = await imagine(world, world.alice, "alice second")
    bobs = await imagine(world, world.bob, "bob's secret prompt")

    result = await world.alice.slash(world.channel, "queue")

    assert result.ephemeral
    text = result.response.content
    # Bob's first job goes before Alice's second and third: users take turns.
    assert f"#{blocker} · running, " in text
    assert f"#{first} · position 2 · about " in text
    assert f"#{second} · position 3 · about " in text
    assert "Queue: 3 waiting, 1 running." in text
    assert "secret" not in text
    assert f"#{bobs}" not in text

    for job_id in (first, second, bobs, blocker):
        await cancel_as_admin(world, job_id)


async def test_cancel_queued_and_running(world):
    blocker = await start_blocker(world, world.alice)
    queued = await imagine(world, world.alice, "a queued tree")
    latest = await imagine(world, world.alice, "a queued flower")

    refused = await world.bob.slash(world.channel, "cancel", job=queued)
    assert refused.ephemeral
    assert "Only the person who asked" in refused.response.content
    assert (await world.bot.store.get(queued)).state == "queued"

    named = await world.alice.slash(world.channel, "cancel", job=queued)
    assert named.response.content == f"Cancelled #{queued}."
    await wait_for(
        lambda: any("cancelled" in m.content for m in job_messages(world.channel, queued)),
        "the cancelled message",
    )

    default = await world.alice.slash(world.channel, "cancel")
    assert default.response.content == f"Cancelled #{latest}."

    message = job_messages(world.channel, blocker)[0]
    stranger = await world.bob.click(message, label="Cancel")
    assert "Only the person who asked" in stranger.response.content
    owner = await world.alice.click(message, label="Cancel")
    assert owner.response.content == f"Cancelled #{blocker}."
    await wait_state(world.bot.store, blocker, "cancelled")
    await wait_for(
        lambda: "cancelled" in job_messages(world.channel, blocker)[0].content,
        "the running job's message to say cancelled",
    )
    assert job_messages(world.channel, blocker)[0].components == []

    nothing = await world.alice.slash(world.channel, "cancel")
    assert "no queued or running" in nothing.response.content


async def test_fair_turns_between_users(world):
    blocker = await start_blocker(world, world.admin)
    alice_jobs = [await imagine(world, world.alice, f"alice turn {n}") for n in range(3)]
    bob_job = await imagine(world, world.bob, "bob turn")

    order = [job.id for job in await world.bot.store.queue()]
    assert order == [blocker, alice_jobs[0], bob_job, alice_jobs[1], alice_jobs[2]]

    await cancel_as_admin(world, blocker)
    store = world.bot.store
    finished = [await wait_state(store, job_id, "done") for job_id in [*alice_jobs, bob_job]]
    started = {job.id: job.started_at for job in finished}
    assert started[alice_jobs[0]] < started[bob_job] < started[alice_jobs[1]]


async def test_per_user_limit(world):
    result = await world.admin.slash(
        world.channel, "config set", key="max_jobs_per_user", value="2"
    )
    assert "is now 2" in result.response.content
    try:
        blocker = await start_blocker(world, world.alice)
        queued = await imagine(world, world.alice, "one more")
        rejected = await world.alice.slash(world.channel, "imagine", prompt="too many")

        assert rejected.ephemeral
        assert "Queued as" not in rejected.response.content
        assert "2" in rejected.response.content
        assert len(await world.bot.store.user_jobs(world.guild.id, world.alice.id)) == 2
    finally:
        await world.admin.slash(
            world.channel, "config set", key="max_jobs_per_user", value="10"
        )
    await cancel_as_admin(world, queued)
    await cancel_as_admin(world, blocker)


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"prompt": "a cat --iter 200000"}, "200000 iterations is out of range"),
        ({"prompt": "a cat", "size": 1000}, "The size 1000 is out of range"),
        ({"prompt": "a cat --seed 1", "seed": 2}, "The seed is given 2 times"),
        ({"prompt": "a cat --stylize 5"}, "--stylize"),
        ({"prompt": "--no fog"}, "only negative parts"),
    ],
)
async def test_invalid_requests_rejected(world, options, expected):
    before = await world.bot.store.stats()

    result = await world.alice.slash(world.channel, "imagine", **options)

    assert last_callback_type(world) == DEFERRED_CHANNEL_MESSAGE
    assert result.ephemeral
    assert expected in result.response.content
    assert "/imagine prompt:" in result.response.content
    assert await world.bot.store.stats() == before


async def test_banned_words_and_channels(world):
    await world.admin.slash(world.channel, "config set", key="banned_words", value="Dragon, war")
    try:
        banned = await world.alice.slash(world.channel, "imagine", prompt="a red DRAGON")
        assert "'dragon'" in banned.response.content
        assert banned.response.content.startswith("The prompt contains")
        in_negative = await world.alice.slash(
            world.channel, "imagine", prompt="a castle", negative="war"
        )
        assert "'war'" in in_negative.response.content
        assert in_negative.response.content.startswith("The negative contains")
    finally:
        await world.admin.slash(world.channel, "config reset", key="banned_words")

    await world.admin.slash(
        world.channel, "config set", key="allowed_channels", value=world.other_channel.mention
    )
    try:
        elsewhere = await world.alice.slash(world.channel, "imagine", prompt="a castle")
        assert "not enabled in this channel" in elsewhere.response.content
        assert world.other_channel.mention in elsewhere.response.content
    finally:
        await world.admin.slash(world.channel, "config reset", key="allowed_channels")
    assert await world.bot.store.queue() == []


def png_bytes(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_attachment_checks(world):
    too_large = await world.alice.slash(
        world.channel, "imagine", prompt="a cat", image=("big.png", b"\0" * (9 * 2**20))
    )
    assert "is 9.0 MiB; the limit is 8 MiB" in too_large.response.content

    text = await world.alice.slash(
        world.channel, "imagine", prompt="a cat", image=("notes.txt", b"hello")
    )
    assert "'notes.txt' is not a picture (text/plain)" in text.response.content

    broken = await world.alice.slash(
        world.channel, "imagine", prompt="a cat", image=("fake.png", b"not a png at all")
    )
    assert "'fake.png' is not a picture I can read" in broken.response.content
    assert await world.bot.store.queue() == []

    job_id = await imagine(world, world.alice, "a red square", image=("start.png", png_bytes(40)))
    await final_message(world, world.channel, job_id)
    job = await world.bot.store.get(job_id)
    with Image.open(job.request["init_image"]) as saved:
        assert saved.size == (40, 40)


async def test_start_image_goes_with_last_job(world):
    job_id = await imagine(
        world, world.alice, "a red square --iter 4", image=("start.png", png_bytes(40))
    )
    message = await final_message(world, world.channel, job_id)
    start_image = Path((await world.bot.store.get(job_id)).request["init_image"])

    reproduce = await world.alice.click(message, label="Reproduce")
    copy_id = queued_job_id(reproduce)
    copy_message = await final_message(world, world.channel, copy_id)
    assert (await world.bot.store.get(copy_id)).request["init_image"] == str(start_image)

    # The copy still needs the file after the original is deleted.
    deleted = await world.alice.click(message, label="Delete")
    assert deleted.response.content == f"Deleted #{job_id}."
    assert await asyncio.to_thread(start_image.exists)

    deleted = await world.alice.click(copy_message, label="Delete")
    assert deleted.response.content == f"Deleted #{copy_id}."
    await wait_for(lambda: not start_image.exists(), "the start image to be deleted")


async def test_rejected_request_keeps_no_start_image(world):
    inputs = start_images_dir(world.bot.settings.data_dir)
    before = set(inputs.iterdir()) if inputs.is_dir() else set()
    channel = world.guild.create_text_channel(
        "no-embeds", overwrites={world.bot.user: discord.PermissionOverwrite(embed_links=False)}
    )

    result = await world.alice.slash(
        channel, "imagine", prompt="a cat", image=("start.png", png_bytes(40))
    )

    assert "I need the Embed Links permission(s) here" in result.response.content
    await wait_for(lambda: set(inputs.iterdir()) == before, "the upload to be deleted")


async def test_missing_permission_named(world):
    channel = world.guild.create_text_channel(
        "no-files", overwrites={world.bot.user: discord.PermissionOverwrite(attach_files=False)}
    )

    result = await world.alice.slash(channel, "imagine", prompt="a cat")

    assert result.ephemeral
    assert "I need the Attach Files permission(s) here" in result.response.content
    assert channel.history() == []
    assert await world.bot.store.queue() == []


# -- configuration -----------------------------------------------------------------------------


async def test_config_by_admin(world, caplog):
    caplog.set_level(logging.INFO, logger="bot.cogs.config")

    changed = await world.admin.slash(world.channel, "config set", key="cutn", value="3")
    assert changed.ephemeral
    assert changed.response.content == "**cutn** is now 3."
    assert f"Guild {world.guild.id}: user {world.admin.id} changed cutn from 2 to 3" in caplog.text

    shown = await world.admin.slash(world.channel, "config show")
    assert "**cutn**: 3 (changed)" in shown.response.content
    assert "**max_size**: 64 pixels." in shown.response.content

    unknown = await world.admin.slash(world.channel, "config set", key="colour", value="red")
    assert "Unknown setting 'colour'" in unknown.response.content
    assert "default_iterations" in unknown.response.content

    invalid = await world.admin.slash(world.channel, "config set", key="cutn", value="many")
    assert "from 1 to 128" in invalid.response.content
    assert "'many' is not a whole number" in invalid.response.content

    too_big = await world.admin.slash(world.channel, "config set", key="default_size", value="999")
    assert "from 32 to 64 pixels" in too_big.response.content

    await world.admin.slash(world.channel, "config set", key="max_size", value="48")
    capped = await world.admin.slash(world.channel, "config set", key="default_size", value="64")
    assert capped.response.content.startswith("**default_size** is now 64 pixels.")
    assert "**max_size** is 48, so pictures use 48" in capped.response.content
    await world.admin.slash(world.channel, "config reset", key="max_size")
    await world.bot.store.set_guild_setting(
        world.guild.id, "default_size", TINY_CONFIG["default_size"]
    )

    reset = await world.admin.slash(world.channel, "config reset", key="cutn")
    assert reset.response.content == "**cutn** is back to its default, 16."
    assert "changed cutn from 3 to 16" in caplog.text
    await world.bot.store.set_guild_setting(world.guild.id, "cutn", TINY_CONFIG["cutn"])

    choices = await world.admin.autocomplete(world.channel, "config set", "key", "iter")
    assert [choice["value"] for choice in choices] == ["default_iterations", "max_iterations"]


async def test_config_refused_for_member(world):
    with pytest.raises(simcord.SetupError):
        await world.alice.slash(world.channel, "config show")

    commands = await world.bot.tree.fetch_commands()
    config_command = next(command for command in commands if command.name == "config")
    world.guild.set_command_permissions(config_command, {world.alice: True})
    try:
        refused = await world.alice.slash(world.channel, "config set", key="cutn", value="1")
    finally:
        world.guild.set_command_permissions(config_command, {world.alice: False})

    assert refused.ephemeral
    assert "needs the Manage Server permission" in refused.response.content
    assert (await world.bot.store.guild_settings(world.guild.id))["cutn"] == TINY_CONFIG["cutn"]


async def test_info_reports_cpu(world):
    job_id = await imagine(world, world.alice, "a measured speed")
    await final_message(world, world.channel, job_id)

    result = await world.alice.slash(world.channel, "info")

    assert result.ephemeral
    fields = {item.name: item.value for item in result.response.embeds[0].fields}
    assert fields["Device"].startswith("cpu (no GPU")
    assert "iterations/s, measured on this host" in fields["Speed"]
    assert int(fields["Pictures made"]) >= 1
    assert "tiny-vqgan" in fields["Models"]


# -- Discord failures ------------------------------------------------------------------------


async def test_server_error_on_edit_keeps_job(world, caplog):
    # The first two edits fail: "running" and the first progress frame.
    world.env.inject_error("PATCH", f"/channels/{world.channel.id}/messages/*", status=500, times=2)
    try:
        job_id = await imagine(world, world.alice, "a stormy sea --iter 80")
        message = await final_message(world, world.channel, job_id)
    finally:
        world.env.backend.faults.clear()

    assert message.attachments[0].filename == f"imagine-{job_id}.png"
    assert f"Job {job_id}: cannot edit the job message (HTTP 500" in caplog.text
    assert f"Job {job_id}: cannot show progress (HTTP 500" in caplog.text


async def test_deleted_progress_message_reposted(world):
    blocker = await start_blocker(world, world.alice)
    first = await wait_for(lambda: job_messages(world.channel, blocker), "the job message")
    await world.admin.delete(first[0])

    async def reposted() -> bool:
        job = await world.bot.store.get(blocker)
        return job.message_id not in (None, first[0].id)

    await wait_for(reposted, "a new progress message", timeout=30)
    job = await world.bot.store.get(blocker)
    assert [m.id for m in job_messages(world.channel, blocker)] == [job.message_id]
    await cancel_as_admin(world, blocker)


async def test_direct_message_uses_defaults(world):
    user = world.alice.user
    result = await user.slash("imagine", prompt="a lonely moon --iter 3")
    job_id = queued_job_id(result)

    message = await final_message(world, user.dm_channel, job_id)

    job = await world.bot.store.get(job_id)
    assert job.guild_id is None
    assert job.request["width"] == 64
    assert job.request["cutn"] == 16
    assert message.attachments[0].filename == f"imagine-{job_id}.png"

    queue = await user.slash("queue")
    assert "You have no queued or running pictures here." in queue.response.content
    assert "config" not in user.available_commands()
