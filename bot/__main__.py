"""``python -m bot``: run the bot, or try it in a local sandbox without a token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
from pathlib import Path

import aiohttp
import discord

from bot.settings import Settings, SettingsError, configure_logging

DESCRIPTION = """\
Run the imagine Discord bot. Configuration comes from environment variables
(DISCORD_TOKEN, IMAGINE_DATA_DIR, IMAGINE_DEVICE, ...; see the README).

With --sandbox, the real bot runs against simcord's simulated Discord instead, with
a browser page on 127.0.0.1 where you can type /imagine as one of a few simulated
members. No token and no network are needed.

Before it logs in, the bot starts the generator and loads the models, downloading
registered ones that are missing. A device this machine lacks or a model that cannot be
loaded stops start-up with one line saying what to change, as do a rejected token and a
network that cannot reach Discord (exit status 1).

SIGTERM or Ctrl-C (SIGINT) stops the bot gracefully within 10 seconds: it takes no new
job, puts the running job back at the front of the queue with its last saved state, and
stops the generator process.
"""

DEVELOPER_PORTAL = "https://discord.com/developers/applications"
TOKEN_REJECTED = (
    "Discord rejected the token in DISCORD_TOKEN. Open " + DEVELOPER_PORTAL + ", choose the "
    "application, press 'Reset Token' on its Bot page and put the new token in DISCORD_TOKEN."
)
INTENTS_REJECTED = (
    "Discord rejected the bot's gateway intents. Enable them under 'Privileged Gateway "
    "Intents' on the application's Bot page at " + DEVELOPER_PORTAL + "."
)
NETWORK_HINT = "Check this machine's network connection, DNS, firewall and proxy settings."
# Gateway close codes that mean Discord rejected the token or the intents.
TOKEN_CLOSE_CODES = frozenset({4004})
INTENTS_CLOSE_CODES = frozenset({4013, 4014})
# Failures to reach Discord besides aiohttp.ClientConnectorError, which names the host.
NETWORK_ERRORS = (
    aiohttp.ClientError,
    discord.GatewayNotFound,
    ConnectionError,
    socket.gaierror,
    TimeoutError,
)
# Libraries whose INFO lines the sandbox hides at the default log level.
SANDBOX_QUIET_LOGGERS = ("discord",)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``python -m bot``."""
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="run against a simulated Discord with a browser preview instead of the real one",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="sandbox only: port of the preview page on 127.0.0.1 (default: a free port)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="sandbox only: use tiny random-weight models (the default when the VQGAN "
        "checkpoint is not in the models directory); pictures are noise, but fast",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="sandbox only: keep the database, pictures and tiny models in this directory "
        "(default: a temporary directory, removed on exit)",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="sandbox only: the /imagine prompt the admin sends at start, flags included "
        "(default: a 30-iteration example with tiny models, nothing otherwise)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for invalid settings or arguments)."""
    arguments = build_parser().parse_args(argv)
    sandbox_only = (
        arguments.port is not None
        or arguments.tiny
        or arguments.prompt is not None
        or arguments.data_dir is not None
    )
    if not arguments.sandbox and sandbox_only:
        print("--port, --tiny, --prompt and --data-dir only apply with --sandbox.", file=sys.stderr)
        return 2

    try:
        settings = Settings.from_env()
        if not arguments.sandbox:
            token = settings.require_token()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    quiet_library_logs(settings, sandbox=arguments.sandbox)

    if arguments.sandbox:
        from bot.sandbox import run_sandbox

        return run_sandbox(
            settings,
            port=arguments.port,
            tiny=arguments.tiny,
            prompt=arguments.prompt,
            data_dir=arguments.data_dir,
        )
    return run_bot(settings, token)


def run_bot(settings: Settings, token: str) -> int:
    """Run the bot until it stops; return 0, or 1 after one line on stderr saying why not."""
    from bot.client import create_bot, serve

    bot = create_bot(settings)
    try:
        # A Ctrl-C before serve() installs its handlers interrupts asyncio.run instead.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(bot, token))
    except Exception as error:
        reason = start_failure_message(error)
        if reason is None:
            raise
        print(f"error: {reason.replace(token, '[token]')}", file=sys.stderr)
        return 1
    logging.getLogger(__name__).info("Bot stopped")
    return 0


def start_failure_message(error: BaseException) -> str | None:
    """Return one line for the operator about a failure that stopped the bot.

    Covers start-up problems on this machine (``StartupError``), a rejected token, rejected
    intents and a network that cannot reach Discord. Returns None for anything else, which
    is a bug to report with its traceback.
    """
    from bot.client import StartupError

    if isinstance(error, StartupError):
        return str(error)
    if isinstance(error, discord.LoginFailure):
        return TOKEN_REJECTED
    if isinstance(error, discord.PrivilegedIntentsRequired):
        return INTENTS_REJECTED
    if isinstance(error, discord.ConnectionClosed):
        return _close_code_message(error)
    if isinstance(error, discord.DiscordServerError):
        return (
            f"Discord answered the bot's start-up with a server error ({error.status}). "
            "Try again in a few minutes; https://discordstatus.com shows outages."
        )
    if isinstance(error, aiohttp.ClientConnectorError):
        reason = error.os_error.strerror or error.os_error
        return f"Cannot reach Discord at {error.host}:{error.port} ({reason}). {NETWORK_HINT}"
    if isinstance(error, NETWORK_ERRORS):
        detail = str(error) or type(error).__name__
        return f"Cannot reach Discord ({detail}). {NETWORK_HINT}"
    return None


def _close_code_message(error: discord.ConnectionClosed) -> str:
    if error.code in TOKEN_CLOSE_CODES:
        return TOKEN_REJECTED
    if error.code in INTENTS_CLOSE_CODES:
        return INTENTS_REJECTED
    reason = f": {error.reason}" if error.reason else ""
    return (
        f"Discord closed the gateway connection with code {error.code}{reason}. The codes are "
        "listed at https://discord.com/developers/docs/topics/opcodes-and-status-codes."
    )


class _DropMessages(logging.Filter):
    """Drop records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self._fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self._fragments)


def quiet_library_logs(settings: Settings, *, sandbox: bool) -> None:
    """Hide library log lines that do not apply to this bot.

    discord.py warns at start when the voice libraries are missing. The bot has no voice
    features, so those two lines go. In the sandbox, simcord builds a probe client without
    intents, and discord.py warns that the guilds intent is disabled (the bot's own intents
    include it). At the default INFO level, the sandbox also hides discord.py's INFO lines,
    which describe logging in to a simulated Discord; ``IMAGINE_LOG_LEVEL=DEBUG`` shows them.
    """
    logging.getLogger("discord.client").addFilter(_DropMessages("voice will NOT be supported"))
    if not sandbox:
        return
    logging.getLogger("discord.state").addFilter(_DropMessages("Guilds intent seems"))
    if settings.log_level == "INFO":
        for name in SANDBOX_QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
