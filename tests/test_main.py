"""``python -m bot`` as an operator meets it: start-up failures and the sandbox's first screen.

Each start-up failure must end in one ``error:`` line that states what to change, exit with
status 1, print no traceback and never the token. A wrong device or missing models must stop
the bot before it logs in: the launcher used for those replaces ``discord.Client.login`` with
a function that prints a marker and fails, so an attempt shows in the output.

The network test runs the real entry point with a fake token and lets discord.py do what it
does with it: without network it cannot resolve discord.com, and with network Discord
rejects the token. Either answer is accepted.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import discord
import pytest
from aiohttp.client_reqrep import ConnectionKey

from bot.__main__ import INTENTS_REJECTED, TOKEN_REJECTED, start_failure_message
from bot.client import StartupError

ROOT = Path(__file__).resolve().parents[1]
# Shaped like a real token; Discord rejects it.
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.fAkE-hmac_part-0123456789abcdefghijkl"
LOGIN_MARKER = "LOGIN ATTEMPTED"
NO_LOGIN_LAUNCHER = f"""
import sys
import discord
import bot.__main__ as entry_point

async def login(self, token):
    print({LOGIN_MARKER!r}, flush=True)
    raise RuntimeError("this test allows no login")

discord.Client.login = login
sys.exit(entry_point.main([]))
"""
START_TIMEOUT_S = 180.0


def bot_environment(tiny_models, tmp_path: Path, **changes: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DISCORD_TOKEN": TOKEN,
        "IMAGINE_DATA_DIR": str(tmp_path / "data"),
        "IMAGINE_DEVICE": "cpu",
        "IMAGINE_THREADS": "1",
        "IMAGINE_VQGAN_MODEL": tiny_models.vqgan,
        "IMAGINE_CLIP_MODEL": tiny_models.clip,
        **changes,
    }


def run(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> str:
    """Check status 1, no traceback, no token; return the text after ``error: ``."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert TOKEN not in output
    lines = error_lines(result)
    assert len(lines) == 1, output
    return lines[0].removeprefix("error: ")


# -- start-up failures, end to end ----------------------------------------------------------


def test_unreachable_discord_or_rejected_token_is_one_line(tiny_models, tmp_path):
    started = time.monotonic()
    result = run(["-m", "bot"], bot_environment(tiny_models, tmp_path))
    print(f"\nexit {result.returncode} after {time.monotonic() - started:.1f} s")

    message = assert_clean_failure(result)
    assert message == TOKEN_REJECTED or message.startswith(
        "Cannot reach Discord at discord.com:443"
    ), message
    # The worker stopped with the bot.
    assert "The executor stopped" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_missing_device_stops_before_login(tiny_models, tmp_path):
    environment = bot_environment(tiny_models, tmp_path, IMAGINE_DEVICE="cuda:7")
    result = run(["-c", NO_LOGIN_LAUNCHER], environment)

    message = assert_clean_failure(result)
    assert LOGIN_MARKER not in result.stdout
    assert message.startswith("IMAGINE_DEVICE='cuda:7' cannot be used: "), message
    assert re.search(r"Devices on this machine: cpu(, cuda:\d)*\.$", message), message


def test_missing_vqgan_stops_before_login(tiny_models, tmp_path):
    missing = tmp_path / "nowhere" / "vqgan.ckpt"
    environment = bot_environment(tiny_models, tmp_path, IMAGINE_VQGAN_MODEL=str(missing))
    result = run(["-c", NO_LOGIN_LAUNCHER], environment)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert LOGIN_MARKER not in result.stdout
    # The generator's message, which lists the registered names, follows on the same line.
    [line] = error_lines(result)
    assert line.startswith(
        f"error: The models could not be loaded: VQGAN checkpoint not found: {missing}"
    )
    assert "registered names" in line


def test_unusable_data_directory_stops_before_login(tiny_models, tmp_path):
    not_a_directory = tmp_path / "data"
    not_a_directory.write_text("a file where the data directory should be")
    result = run(["-c", NO_LOGIN_LAUNCHER], bot_environment(tiny_models, tmp_path))

    message = assert_clean_failure(result)
    assert LOGIN_MARKER not in result.stdout
    assert message.startswith(
        f"Cannot open the database {not_a_directory / 'imagine.sqlite3'} "
        f"(IMAGINE_DATA_DIR={str(not_a_directory)!r}): "
    ), message


def test_sigterm_during_start_up_exits_cleanly(tiny_models, tmp_path):
    """A stop while the worker still starts (or downloads models) ends start-up, no login."""
    log_path = tmp_path / "bot.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", NO_LOGIN_LAUNCHER],
            cwd=ROOT,
            env={**bot_environment(tiny_models, tmp_path), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (
            match := re.search(r"Started generator worker pid (\d+)", log_path.read_text())
        ) is None:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()

    assert returncode == 0, log
    assert "Start-up stopped" in log
    assert LOGIN_MARKER not in log
    assert "Traceback" not in log
    worker = Path(f"/proc/{match[1]}")
    assert not worker.exists() or "zombie" in (worker / "status").read_text(), log


# -- the messages themselves ----------------------------------------------------------------


class _ClosedSocket:
    close_code = None


def dns_error() -> aiohttp.ClientConnectorDNSError:
    key = ConnectionKey("discord.com", 443, True, True, None, None, None)
    return aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (discord.LoginFailure("Improper token has been passed."), TOKEN_REJECTED),
        (discord.ConnectionClosed(_ClosedSocket(), shard_id=None, code=4004), TOKEN_REJECTED),
        (discord.PrivilegedIntentsRequired(shard_id=None), INTENTS_REJECTED),
        (discord.ConnectionClosed(_ClosedSocket(), shard_id=None, code=4014), INTENTS_REJECTED),
        (
            dns_error(),
            "Cannot reach Discord at discord.com:443 (Name or service not known). Check this "
            "machine's network connection, DNS, firewall and proxy settings.",
        ),
        (
            StartupError("IMAGINE_DEVICE='cuda:7' cannot be used"),
            "IMAGINE_DEVICE='cuda:7' cannot be used",
        ),
    ],
    ids=["login", "close-4004", "intents", "close-4014", "dns", "startup"],
)
def test_failure_messages(error, expected):
    assert start_failure_message(error) == expected


def test_other_close_codes_and_bugs():
    closed = discord.ConnectionClosed(_ClosedSocket(), shard_id=None, code=4011)
    assert start_failure_message(closed).startswith(
        "Discord closed the gateway connection with code 4011."
    )
    assert start_failure_message(ZeroDivisionError("a bug")) is None


# -- the sandbox's first screen ---------------------------------------------------------------


def test_sandbox_prints_url_last_and_cleans_up(tmp_path):
    """Start the sandbox, read what it printed once ready, stop it with Ctrl-C."""
    environment = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "IMAGINE_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    environment.pop("IMAGINE_LOG_LEVEL", None)
    log_path = tmp_path / "sandbox.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "--sandbox", "--tiny", "--prompt", "a test --iter 2"],
            cwd=ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Press Ctrl-C here to stop." not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log = log_path.read_text()

    assert returncode == 0, log
    # The URL is on a line of its own, after every start-up line, with the key explained.
    ready = log.index("Sandbox ready.")
    assert re.search(r"\n\n    http://127\.0\.0\.1:\d+/#\S+\n\n", log[ready:]), log
    assert "the part after # is" in log[ready:]
    assert "has asked for a first picture: /imagine prompt:a test --iter 2" in log[ready:]
    startup = log[:ready]
    assert "Synced 5 slash commands" in startup
    # Library noise is gone; a warning or error of ours would still show.
    for noise in ("PyNaCl", "davey", "Guilds intent", " root ", "logging in using static token"):
        assert noise not in log, noise
    # The temporary data directory is gone.
    data_dir = Path(re.search(r"Sandbox data in (\S+)", log)[1])
    assert data_dir.parent == tmp_path
    assert not data_dir.exists(), log


def test_sandbox_start_up_failure_is_one_line(tiny_models, tmp_path):
    missing = tmp_path / "nowhere" / "clip.pt"
    environment = bot_environment(
        tiny_models, tmp_path, IMAGINE_CLIP_MODEL=f"ViT-B-32/{missing}", TMPDIR=str(tmp_path)
    )
    del environment["DISCORD_TOKEN"]
    result = run(["-m", "bot", "--sandbox"], environment)

    message = assert_clean_failure(result)
    assert message.startswith(
        f"The models could not be loaded: CLIP weights file not found: {missing}"
    )
    assert "Sandbox closed" in result.stderr
    assert list(tmp_path.glob("imagine-sandbox-*")) == []


def test_sandbox_busy_port_is_one_line(tiny_models, tmp_path):
    environment = bot_environment(tiny_models, tmp_path, TMPDIR=str(tmp_path))
    del environment["DISCORD_TOKEN"]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = run(["-m", "bot", "--sandbox", "--tiny", "--port", str(port)], environment)
        seconds = time.monotonic() - started

    message = assert_clean_failure(result)
    assert message.startswith(f"Port {port} on 127.0.0.1 is in use or not allowed.")
    # Refused before the models load or the data directory is made.
    assert "Loading the models" not in result.stderr
    assert list(tmp_path.glob("imagine-sandbox-*")) == []
    print(f"\nbusy port refused in {seconds:.1f} s")

