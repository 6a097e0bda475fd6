"""``python -m bot``: run the bot, or try it in a local sandbox without a token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from bot.settings import Settings, SettingsError, configure_logging

DESCRIPTION = """\
Run the imagine Discord bot. Configuration comes from environment variables
(DISCORD_TOKEN, IMAGINE_DATA_DIR, IMAGINE_DEVICE, ...; see the README).

With --sandbox, the real bot runs against simcord's simulated Discord instead, with
a browser page on 127.0.0.1 where you can type /imagine as one of a few simulated
members. No token and no network are needed.

SIGTERM or Ctrl-C (SIGINT) stops the bot gracefully within 10 seconds: it takes no new
job, puts the running job back at the front of the queue with its last saved state, and
stops the generator process.
"""


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
        "--prompt",
        default=None,
        help="sandbox only: the /imagine prompt the admin sends at start, flags included "
        "(default: a 30-iteration example with tiny models, nothing otherwise)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for invalid settings or arguments)."""
    arguments = build_parser().parse_args(argv)
    sandbox_only = arguments.port is not None or arguments.tiny or arguments.prompt is not None
    if not arguments.sandbox and sandbox_only:
        print("--port, --tiny and --prompt only apply with --sandbox.", file=sys.stderr)
        return 2

    try:
        settings = Settings.from_env()
        if not arguments.sandbox:
            token = settings.require_token()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)

    if arguments.sandbox:
        from bot.sandbox import run_sandbox

        return run_sandbox(
            settings, port=arguments.port, tiny=arguments.tiny, prompt=arguments.prompt
        )

    from bot.client import create_bot, serve

    bot = create_bot(settings)
    # A Ctrl-C before serve() installs its handlers interrupts asyncio.run instead.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(bot, token))
    logging.getLogger(__name__).info("Bot stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
