"""The bot token never reaches a log line, a traceback or an error message.

``python -m bot`` runs as a subprocess with a fake token and ``IMAGINE_LOG_LEVEL=DEBUG``,
against a fake Discord API and gateway served by this test on 127.0.0.1. Each start-up fails
in a different place: the API rejects the token, the API refuses the command sync in
``setup_hook``, or the gateway closes the connection after IDENTIFY. The test scans
everything the process wrote (stderr, stdout, the worker's output and tracebacks) and a
second log file that a handler without the token filter wrote, so the check does not
depend on ``TokenRedactor``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web

from bot.__main__ import TOKEN_REJECTED
from bot.settings import Settings, SettingsError, TokenRedactor, configure_logging

ROOT = Path(__file__).resolve().parents[1]

# Shaped like a real token: base64 user id, timestamp, HMAC.
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.sEcReT-hmac_part-0123456789abcdefghijkl"
SECRET_PART = TOKEN.rsplit(".", 1)[1]
APPLICATION_ID = "123456789012345678"

# Runs the real entry point with discord.py aimed at the fake server, and adds a raw
# DEBUG file handler before the ones configure_logging sets up (which filter the token).
LAUNCHER = """
import logging, sys
import discord.gateway, discord.http, yarl
import bot.__main__ as entry_point
from bot.settings import configure_logging

api, gateway, raw_log = sys.argv[1:4]
discord.http.Route.BASE = api
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)

def configure_with_raw_log(settings):
    configure_logging(settings)
    handler = logging.FileHandler(raw_log)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # First in line: the token filter rewrites the shared record for every later handler.
    logging.getLogger().handlers.insert(0, handler)

entry_point.configure_logging = configure_with_raw_log
sys.exit(entry_point.main([]))
"""


@dataclass
class FakeDiscord:
    """A fake Discord API and gateway on 127.0.0.1 that records what the bot sent."""

    accept_token: bool
    sync_status: int = 200
    port: int = 0
    authorizations: list[str] = field(default_factory=list)
    identify_tokens: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v10/users/@me", self.current_user)
        app.router.add_get("/api/v10/oauth2/applications/@me", self.application_info)
        app.router.add_put(f"/api/v10/applications/{APPLICATION_ID}/commands", self.sync)
        app.router.add_get("/gateway", self.websocket)
        return app

    async def current_user(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization", ""))
        if not self.accept_token:
            return json_reply({"message": "401: Unauthorized", "code": 0}, status=401)
        return json_reply(bot_user())

    async def application_info(self, request: web.Request) -> web.Response:
        return json_reply(
            {
                "id": APPLICATION_ID,
                "name": "imagine",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": {**bot_user(), "id": "42", "bot": False},
                "verify_key": "0" * 64,
                "flags": 0,
            }
        )

    async def sync(self, request: web.Request) -> web.Response:
        if self.sync_status != 200:
            return json_reply({"message": "Missing Access", "code": 50001}, self.sync_status)
        return json_reply([])

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 45000}}))
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                break
            payload = json.loads(message.data)
            if payload["op"] == 2:
                self.identify_tokens.append(payload["d"]["token"])
                # 4004 is Discord's close code for an invalid token.
                await socket.close(code=4004, message=b"Authentication failed.")
                break
        return socket


def json_reply(data: object, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only for exactly "application/json", without charset.
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def bot_user() -> dict[str, object]:
    return {
        "id": APPLICATION_ID,
        "username": "imagine",
        "discriminator": "0",
        "global_name": None,
        "avatar": None,
        "bot": True,
    }


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[object]:
    runners: list[web.AppRunner] = []

    async def start(fake: FakeDiscord) -> FakeDiscord:
        runner = web.AppRunner(fake.application())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        fake.port = runner.addresses[0][1]
        return fake

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Run:
    returncode: int
    output: str
    raw_log: str


async def run_bot(fake: FakeDiscord, environment: dict[str, str], tmp_path: Path) -> Run:
    raw_log = tmp_path / "raw.log"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LAUNCHER,
        fake.api,
        fake.gateway,
        str(raw_log),
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DISCORD_TOKEN": TOKEN,
            "IMAGINE_LOG_LEVEL": "DEBUG",
            "IMAGINE_DEVICE": "cpu",
            "IMAGINE_THREADS": "1",
            **environment,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    raw = raw_log.read_text() if raw_log.exists() else ""
    return Run(process.returncode, output.decode(errors="replace"), raw)


def assert_no_token(text: str) -> None:
    assert TOKEN not in text
    assert SECRET_PART not in text


def model_environment(tiny_models, data_dir: Path) -> dict[str, str]:
    return {
        "IMAGINE_DATA_DIR": str(data_dir),
        "IMAGINE_VQGAN_MODEL": tiny_models.vqgan,
        "IMAGINE_CLIP_MODEL": tiny_models.clip,
    }


async def test_rejected_token_not_logged(serve, tiny_models, tmp_path):
    fake = await serve(FakeDiscord(accept_token=False))

    run = await run_bot(fake, model_environment(tiny_models, tmp_path / "data"), tmp_path)

    assert run.returncode == 1, run.output
    assert fake.authorizations == [f"Bot {TOKEN}"]
    assert f"error: {TOKEN_REJECTED}" in run.output
    assert "Traceback" not in run.output
    assert "/users/@me with None has returned 401" in run.raw_log
    assert_no_token(run.output)
    assert_no_token(run.raw_log)


async def test_failing_setup_hook_not_logged(serve, tiny_models, tmp_path):
    fake = await serve(FakeDiscord(accept_token=True, sync_status=403))

    run = await run_bot(fake, model_environment(tiny_models, tmp_path / "data"), tmp_path)

    # An unexpected failure keeps its traceback, which must not hold the token either.
    assert run.returncode == 1, run.output
    assert fake.authorizations == [f"Bot {TOKEN}"]
    assert "in setup_hook" in run.output
    assert "Forbidden: 403 Forbidden (error code: 50001): Missing Access" in run.output
    assert "has returned 200" in run.raw_log
    assert_no_token(run.output)
    assert_no_token(run.raw_log)


async def test_gateway_rejection_not_logged(serve, tiny_models, tmp_path):
    fake = await serve(FakeDiscord(accept_token=True))

    run = await run_bot(fake, model_environment(tiny_models, tmp_path / "data"), tmp_path)

    # The token went out over HTTP and in IDENTIFY, and the whole start-up ran at DEBUG.
    assert run.returncode == 1, run.output
    assert fake.authorizations == [f"Bot {TOKEN}"]
    assert fake.identify_tokens == [TOKEN]
    assert "Synced 0 slash commands" in run.raw_log
    assert "has sent the IDENTIFY payload" in run.raw_log
    assert "Started generator worker pid" in run.raw_log
    # Close code 4004: the gateway rejected the token.
    assert f"error: {TOKEN_REJECTED}" in run.output
    assert "Traceback" not in run.output
    assert_no_token(run.output)
    assert_no_token(run.raw_log)


async def test_invalid_setting_error_hides_token(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DISCORD_TOKEN": TOKEN,
            "IMAGINE_MAX_SIZE": "huge",
            "IMAGINE_DATA_DIR": str(tmp_path),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)

    assert process.returncode == 2
    assert "IMAGINE_MAX_SIZE='huge' is invalid" in output.decode()
    assert_no_token(output.decode())


def test_settings_errors_hide_token():
    settings = Settings(token=TOKEN)
    assert_no_token(repr(settings))
    assert_no_token(str(settings))

    for changes in ({"max_size": 0}, {"device": "tpu"}, {"log_level": "LOUD"}):
        with pytest.raises(SettingsError) as raised:
            settings.replace(**changes)
        assert_no_token(str(raised.value))
        assert_no_token(repr(raised.value))


def test_redactor_masks_token_in_traceback(tmp_path):
    log_file = tmp_path / "bot.log"
    handler = logging.FileHandler(log_file)
    handler.addFilter(TokenRedactor(TOKEN))
    logger = logging.getLogger("tests.token_secrecy")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"a library put the token {TOKEN} into its error")
        except RuntimeError:
            logger.exception("Request failed")
    finally:
        logger.removeHandler(handler)
        handler.close()

    assert_no_token(log_file.read_text())


def test_configure_logging_filters_every_root_handler(monkeypatch):
    root = logging.getLogger()
    level = root.level
    monkeypatch.setattr(root, "handlers", [])
    try:
        configure_logging(Settings(token=TOKEN, log_level="DEBUG"))

        assert root.handlers
        for handler in root.handlers:
            assert any(isinstance(f, TokenRedactor) for f in handler.filters)
            handler.close()
    finally:
        root.setLevel(level)
