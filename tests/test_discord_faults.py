"""Discord failing the bot: REST errors on every call kind, rate limits, lost permissions.

Under simcord, ``env.inject_error`` makes one kind of REST call fail once or always while a
real job runs on tiny models: the interaction response (the deferral), the followup
("Queued as …"), the job's first channel message, its progress edits, the final picture's
upload and the deletion of the progress message. In every case the picture reaches the
channel, or the requester gets it privately with the reason, or (when Discord never took
the interaction) nothing was queued and the failure is logged.

simcord replaces discord.py's HTTP client, so its own handling of 429 responses and server
errors never runs there. The last tests run discord.py 2.7's real HTTP client and webhook
adapter against a small Discord stand-in on 127.0.0.1 to show what it does with 429s.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio
import simcord
from aiohttp import web
from simcord.backend.models.channel import Overwrite
from simcord.enums import OverwriteType
from simcord.http.client import FakeWebhookAdapter

from bot.client import ImagineBot, create_bot
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

SHORT_JOB = "a stormy sea --iter 30"


@dataclass
class World:
    env: simcord.Env
    bot: ImagineBot
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    # Where hold_queue's blocker runs, away from the faults injected in ``channel``.
    other_channel: simcord.ChannelHandle
    admin: simcord.MemberActor
    alice: simcord.MemberActor
    error_cursor: int = 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tiny_models, tmp_path_factory):
    settings = tiny_settings(tiny_models, tmp_path_factory.mktemp("faults-data"))
    bot = create_bot(settings)
    fast_progress_edits(bot)
    # Retries of the final post wait 0.05 s, 0.1 s, … here instead of 2 s, 4 s, …
    bot.presenter.final_post_backoff = 0.05
    env = simcord.Env(bot)
    await env.start()

    guild = env.create_guild("Fault club")
    channel = guild.create_text_channel("art")
    other_channel = guild.create_text_channel("queue-holder")
    admins = create_admins_role(guild)
    admin = guild.add_member(env.create_user("ada"), roles=[admins])
    alice = guild.add_member(env.create_user("alice"))
    await apply_guild_config(bot, guild.id, TINY_CONFIG)

    restore = route_detached_webhooks(env)
    yield World(env, bot, guild, channel, other_channel, admin, alice)

    restore()
    await bot.close()
    await env.shutdown()


def route_detached_webhooks(env: simcord.Env) -> Callable[[], None]:
    """Send webhook calls made outside simcord's context to simcord too; return an undo.

    discord.py picks its webhook adapter from a context variable, and simcord sets it only
    in its own context. The executor's tasks start from an empty context (``run_detached``),
    so a followup the presenter sends from there would reach discord.py's default adapter,
    which talks to the real Discord. This sends that adapter's requests to simcord.
    """
    default = contextvars.Context().run(discord.webhook.async_.async_context.get)
    default.request = FakeWebhookAdapter(env.backend).request
    return lambda: vars(default).pop("request", None)


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def clean_slate(world, caplog):
    """Clear faults after each test and fail one that leaves active jobs behind."""
    caplog.set_level(logging.INFO)
    world.error_cursor = world.env.error_cursor
    yield
    world.env.backend.faults.clear()
    leftovers = await cancel_leftovers(world.bot)
    assert leftovers == []


# -- helpers ---------------------------------------------------------------------------------



async def imagine(world: World, prompt: str = SHORT_JOB) -> int:
    return queued_job_id(await world.alice.slash(world.channel, "imagine", prompt=prompt))


async def hold_queue(world: World) -> int:
    """Run a long job in the other channel, so the next jobs wait in the queue; return its id.

    A test then injects its fault while its job is queued with its message posted, and calls
    :func:`release_queue`, so the fault meets the job whatever the machine's speed.
    """
    # The admin's job, so the requester's own job list shows only the job under test.
    blocker = queued_job_id(
        await world.admin.slash(world.other_channel, "imagine", prompt=BLOCKER)
    )
    await wait_state(world.bot.store, blocker, "running")
    return blocker


async def release_queue(world: World, blocker: int) -> None:
    """Cancel the job of :func:`hold_queue`; the jobs behind it start."""
    result = await world.admin.slash(world.other_channel, "cancel", job=blocker)
    assert result.response.content == f"Cancelled #{blocker}."


def job_messages(world: World, job_id: int, channel=None) -> list[discord.Message]:
    channel = channel or world.channel
    return [message for message in channel.history() if f"#{job_id} ·" in message.content]


async def final_message(world: World, job_id: int, channel=None) -> discord.Message:
    await wait_state(world.bot.store, job_id, "done")

    def posted() -> discord.Message | None:
        for message in job_messages(world, job_id, channel):
            if message.attachments and message.attachments[0].filename.startswith("imagine-"):
                return message
        return None

    message = await wait_for(posted, f"the picture of job {job_id}")
    # The progress message goes after the picture is posted.
    await wait_for(
        lambda: job_id not in world.bot.executor.info().posting_job_ids,
        f"the final post of job {job_id} to finish",
    )
    assert message.attachments[0].filename == f"imagine-{job_id}.png"
    assert (await message.attachments[0].read()).startswith(b"\x89PNG")
    return message


async def private_picture(world: World, job_id: int) -> dict[str, Any]:
    """Return the body of the followup that carried job ``job_id``'s picture to its requester."""
    await wait_state(world.bot.store, job_id, "done")

    def sent() -> dict[str, Any] | None:
        for request in world.env.http_requests:
            body = request.json if isinstance(request.json, dict) else {}
            if (
                request.method == "POST"
                and request.path.startswith("/webhooks/")
                and f"your picture #{job_id}" in body.get("content", "")
            ):
                return body
        return None

    body = await wait_for(sent, f"the private picture of job {job_id}")
    assert body["flags"] & 64  # ephemeral
    assert [item["filename"] for item in body["attachments"]] == [f"imagine-{job_id}.png"]
    return body


def inject(world: World, method: str, path: str, mode: str, **error: Any) -> None:
    world.env.inject_error(method, path, times=1 if mode == "once" else None, **error)


def take_errors(world: World) -> tuple[BaseException, ...]:
    errors = world.env.errors_since(world.error_cursor)
    world.error_cursor = world.env.error_cursor
    return errors


# -- 5xx on each REST call kind ---------------------------------------------------------------

MODES = ["once", "always"]


@pytest.mark.parametrize("mode", MODES)
async def test_interaction_response_fault(world, caplog, mode):
    jobs_before = await world.bot.store.stats()
    inject(world, "POST", "/interactions/*/callback", mode)

    result = await world.alice.slash(world.channel, "imagine", prompt=SHORT_JOB)

    if mode == "once":
        # The deferral is retried within Discord's 3 seconds, and the job goes on.
        match = QUEUED_RE.fullmatch(result.response.content)
        assert match, result.response.content
        await final_message(world, int(match[1]))
        assert "Acknowledging an interaction of user" in caplog.text
        return

    # Discord never took the interaction: the user sees Discord's own "did not respond".
    assert not result.acknowledged
    assert await world.bot.store.stats() == jobs_before
    assert "/imagine failed for user" in caplog.text
    assert "Could not report the failure of /imagine" in caplog.text


@pytest.mark.parametrize("mode", MODES)
async def test_followup_fault(world, caplog, mode):
    blocker = await hold_queue(world)
    inject(world, "POST", "/webhooks/*", mode)

    result = await world.alice.slash(world.channel, "imagine", prompt=SHORT_JOB)
    world.env.backend.faults.clear()

    # The "Queued as" reply was lost, but the job's channel message names the requester.
    assert "Queued as" not in (result.response.content if result.response else "")
    assert f"Could not reply to user {world.alice.id}" in caplog.text
    job_id = (await world.bot.store.user_jobs(world.guild.id, world.alice.id))[0].id
    await release_queue(world, blocker)
    message = await final_message(world, job_id)
    assert message.content.startswith(world.alice.mention)


@pytest.mark.parametrize("mode", MODES)
async def test_message_send_fault(world, caplog, mode):
    blocker = await hold_queue(world)
    inject(world, "POST", f"/channels/{world.channel.id}/messages", mode)

    result = await world.alice.slash(world.channel, "imagine", prompt=SHORT_JOB)
    job_id = int(QUEUED_RE.match(result.response.content)[1])

    assert f"Job #{job_id} is queued, but I could not post its message" in (
        result.followups[0].content
    )
    assert f"Job {job_id}: cannot post the job message (HTTP 500" in caplog.text
    await release_queue(world, blocker)
    if mode == "once":
        await final_message(world, job_id)
        return
    body = await private_picture(world, job_id)
    assert "Discord answered with an error (HTTP 500)" in body["content"]
    assert job_messages(world, job_id) == []


@pytest.mark.parametrize("mode", MODES)
async def test_file_upload_fault(world, caplog, mode):
    blocker = await hold_queue(world)
    job_id = await imagine(world)
    # The job's message is posted; the next post to the channel is the picture's upload.
    inject(world, "POST", f"/channels/{world.channel.id}/messages", mode)
    await release_queue(world, blocker)

    if mode == "once":
        await final_message(world, job_id)
        assert f"Job {job_id}: cannot post the picture (attempt 1) (HTTP 500" in caplog.text
        assert len(job_messages(world, job_id)) == 1
        return
    body = await private_picture(world, job_id)
    assert "Discord answered with an error (HTTP 500)" in body["content"]
    assert "(attempt 4) (HTTP 500" in caplog.text
    await wait_for(
        lambda: "refused the picture here; I sent it to the requester"
        in job_messages(world, job_id)[0].content,
        "the progress message to say where the picture went",
    )
    assert job_messages(world, job_id)[0].components == []


@pytest.mark.parametrize("mode", MODES)
async def test_edit_fault(world, caplog, mode):
    blocker = await hold_queue(world)
    job_id = await imagine(world)
    inject(world, "PATCH", f"/channels/{world.channel.id}/messages/*", mode)
    await release_queue(world, blocker)

    message = await final_message(world, job_id)

    assert message.embeds[0].footer.text == f"Job #{job_id}"
    assert re.search(rf"Job {job_id}: cannot (edit the job message|show progress) \(HTTP 500",
                     caplog.text)


@pytest.mark.parametrize("mode", MODES)
async def test_delete_fault(world, caplog, mode):
    blocker = await hold_queue(world)
    job_id = await imagine(world)
    inject(world, "DELETE", f"/channels/{world.channel.id}/messages/*", mode)
    await release_queue(world, blocker)

    await final_message(world, job_id)

    # The progress message stays, but points at the picture and has no Cancel button.
    def marked_done() -> discord.Message | None:
        for message in job_messages(world, job_id):
            if "done, the picture is posted below" in message.content:
                return message
        return None

    leftover = await wait_for(marked_done, "the old progress message to be marked done")
    assert leftover.components == []
    assert f"Job {job_id}: cannot delete the progress message (HTTP 500" in caplog.text


# -- specific Discord errors ----------------------------------------------------------------------


async def test_unknown_message_on_edit_reposts(world, caplog):
    blocker = await hold_queue(world)
    job_id = await imagine(world)
    first = job_messages(world, job_id)[0]
    world.env.inject_error(
        "PATCH",
        f"/channels/{world.channel.id}/messages/{first.id}",
        status=404,
        code=10008,
        message="Unknown Message",
        times=1,
    )
    await release_queue(world, blocker)

    await final_message(world, job_id)

    assert re.search(rf"(Progress message|Message) of job {job_id} was deleted", caplog.text)


async def test_missing_permission_mid_job(world, caplog):
    """A moderator takes Send Messages away while the job runs: the requester gets the reason.

    simcord 3.2.1 checks Attach Files only on forwards, so this test takes Send Messages.
    """
    blocker = await hold_queue(world)
    job_id = await imagine(world)
    deny = Overwrite(
        world.bot.user.id, OverwriteType.MEMBER,
        deny=discord.Permissions(send_messages=True).value,
    )
    world.env.backend.edit_channel(world.channel.id, {}, overwrites=[deny])
    try:
        await release_queue(world, blocker)
        body = await private_picture(world, job_id)
    finally:
        world.env.backend.edit_channel(world.channel.id, {}, overwrites=[])

    # Without Send Messages, Discord also withholds Attach Files and Embed Links.
    assert "I need the Send Messages, Attach Files, Embed Links permission(s)" in body["content"]
    assert (
        f"Job {job_id}: cannot post the picture (attempt 1) in channel {world.channel.id}, "
        "missing permission(s): send_messages, attach_files, embed_links"
    ) in caplog.text


async def test_expired_token_keeps_picture(world):
    blocker = await imagine(world, BLOCKER)
    await wait_state(world.bot.store, blocker, "running")
    job_id = await imagine(world, "a late lighthouse")

    await world.env.advance_time(16 * 60)
    await world.admin.slash(world.channel, "cancel", job=blocker)

    message = await final_message(world, job_id)
    assert message.content.startswith(world.alice.mention)


async def test_expired_token_and_refused_channel(world, caplog):
    blocker = await imagine(world, BLOCKER)
    await wait_state(world.bot.store, blocker, "running")
    job_id = await imagine(world, "a lost lighthouse")
    await world.env.advance_time(16 * 60)
    world.env.inject_error("POST", f"/channels/{world.channel.id}/messages", times=None)

    await world.admin.slash(world.channel, "cancel", job=blocker)
    await wait_state(world.bot.store, job_id, "done")

    def direct_message() -> discord.Message | None:
        for message in world.alice.user.dm_channel.history():
            if f"your picture #{job_id}" in message.content:
                return message
        return None

    message = await wait_for(direct_message, f"the direct message with job {job_id}")
    assert "HTTP 500" in message.content
    assert message.attachments[0].filename == f"imagine-{job_id}.png"
    assert f"Job {job_id}: cannot send the followup to the requester" in caplog.text


# -- rate limits ------------------------------------------------------------------------------


def rate_limit_final_post(world: World, monkeypatch, retry_after: float, times: int) -> list:
    """Make discord.py raise RateLimited for the next ``times`` picture uploads.

    discord.py waits out 429s of up to ``max_ratelimit_timeout`` (30 s) itself and raises
    RateLimited for longer ones; simcord never returns 429, so this raises it at the client.
    """
    original = world.bot.http.request
    raised: list[float] = []

    async def request(route, *, files=None, **kwargs):
        if (
            route.method == "POST"
            and route.path == "/channels/{channel_id}/messages"
            and files
            and len(raised) < times
        ):
            raised.append(time.monotonic())
            raise discord.RateLimited(retry_after)
        return await original(route, files=files, **kwargs)

    monkeypatch.setattr(world.bot.http, "request", request)
    return raised


async def test_rate_limited_upload_waits(world, monkeypatch):
    raised = rate_limit_final_post(world, monkeypatch, retry_after=0.5, times=1)
    job_id = await imagine(world)

    await final_message(world, job_id)

    assert len(raised) == 1
    posted = await world.bot.store.get(job_id)
    assert posted.finished_at is not None


async def test_long_rate_limit_goes_private(world, monkeypatch):
    rate_limit_final_post(world, monkeypatch, retry_after=120.0, times=10)
    job_id = await imagine(world)

    body = await private_picture(world, job_id)

    assert "Discord asked me to wait 120 s" in body["content"]


# -- discord.py's own rate-limit handling, below simcord -----------------------------------------


class FakeDiscord:
    """A stand-in for Discord's REST API on 127.0.0.1 that rate-limits each route once."""

    def __init__(self, retry_after: float, via: bool = True) -> None:
        self.retry_after = retry_after
        self.via = via
        self.seen: dict[str, list[float]] = {}
        self.app = web.Application()
        self.app.router.add_route("*", "/api/v10/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        key = f"{request.method} {request.path}"
        await request.read()
        self.seen.setdefault(key, []).append(time.monotonic())
        if request.path.endswith("/users/@me"):
            return json_reply(USER)
        if len(self.seen[key]) == 1:
            headers = {
                "Retry-After": str(self.retry_after),
                "X-RateLimit-Scope": "user",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset-After": str(self.retry_after),
                "X-RateLimit-Bucket": key,
            }
            if self.via:
                headers["Via"] = "1.1 google"
            body = {"message": "You are being rate limited.", "retry_after": self.retry_after,
                    "global": False}
            return json_reply(body, status=429, headers=headers)
        if request.method == "DELETE" or request.path.endswith("/callback"):
            return web.Response(status=204)
        return json_reply(MESSAGE)


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    # discord.py parses a body as JSON only when the content type is exactly this.
    headers = {**(headers or {}), "Content-Type": "application/json"}
    return web.Response(body=json.dumps(body).encode(), status=status, headers=headers)


USER = {"id": "1", "username": "imagine", "discriminator": "0", "avatar": None}
MESSAGE = {
    "id": "10", "channel_id": "20", "author": USER, "content": "x", "timestamp":
    "2024-01-01T00:00:00+00:00", "edited_timestamp": None, "tts": False,
    "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
    "embeds": [], "pinned": False, "type": 0,
}


@pytest_asyncio.fixture(loop_scope="module")
async def fake_discord(monkeypatch):
    servers: list[web.AppRunner] = []

    async def start(retry_after: float, via: bool = True) -> FakeDiscord:
        fake = FakeDiscord(retry_after, via)
        runner = web.AppRunner(fake.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        servers.append(runner)
        port = runner.addresses[0][1]
        monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
        return fake

    yield start
    for runner in servers:
        await runner.cleanup()


async def real_client(max_ratelimit_timeout: float = 30.0) -> discord.http.HTTPClient:
    client = discord.http.HTTPClient(
        asyncio.get_running_loop(), max_ratelimit_timeout=max_ratelimit_timeout
    )
    await client.static_login("not-a-token")
    return client


def message_params(**fields: Any) -> discord.http.MultipartParameters:
    return discord.http.handle_message_parameters(
        allowed_mentions=discord.AllowedMentions.none(), **fields
    )


CALLS = {
    "message send": lambda http: http.send_message(20, params=message_params(content="x")),
    "file upload": lambda http: http.send_message(
        20, params=message_params(file=discord.File(__file__))
    ),
    "edit": lambda http: http.edit_message(20, 10, params=message_params(content="y")),
    "delete": lambda http: http.delete_message(20, 10),
}


@pytest.mark.parametrize("kind", list(CALLS))
async def test_discordpy_waits_out_429(fake_discord, kind):
    fake = await fake_discord(retry_after=0.3)
    http = await real_client()
    try:
        await CALLS[kind](http)
    finally:
        await http.close()

    attempts = next(times for key, times in fake.seen.items() if "/users/@me" not in key)
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 0.29


async def test_discordpy_raises_long_429(fake_discord):
    fake = await fake_discord(retry_after=45.0)
    http = await real_client(max_ratelimit_timeout=30.0)
    started = time.monotonic()
    try:
        with pytest.raises(discord.RateLimited) as caught:
            await CALLS["file upload"](http)
    finally:
        await http.close()

    assert caught.value.retry_after == 45.0
    assert time.monotonic() - started < 5
    assert sum(len(times) for times in fake.seen.values()) == 2  # login and one upload


@pytest.mark.parametrize("kind", ["interaction response", "followup"])
async def test_webhook_adapter_waits_out_429(fake_discord, kind):
    fake = await fake_discord(retry_after=0.3)
    adapter = discord.webhook.async_.AsyncWebhookAdapter()
    async with aiohttp.ClientSession() as session:
        if kind == "interaction response":
            params = discord.webhook.async_.interaction_response_params(5, {"flags": 64})
            await adapter.create_interaction_response(1, "token", session=session, params=params)
        else:
            params = message_params(content="Queued")
            await adapter.execute_webhook(
                1, "token", session=session, payload=params.payload, wait=True
            )

    attempts = next(iter(fake.seen.values()))
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 0.29


async def test_webhook_429_without_via_raises(fake_discord):
    await fake_discord(retry_after=0.3, via=False)
    adapter = discord.webhook.async_.AsyncWebhookAdapter()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(discord.HTTPException) as caught:
            await adapter.execute_webhook(
                1, "token", session=session, payload={"content": "x"}, wait=True
            )
    assert caught.value.status == 429
