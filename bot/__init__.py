"""imagine's Discord bot: slash commands, the SQLite job queue and the generator executor.

``bot.Settings`` contains the operator's configuration and ``bot.create_bot(settings)`` builds the
bot for production, tests and the sandbox.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.settings import Settings, SettingsError

if TYPE_CHECKING:
    from bot.client import create_bot

__all__ = ["Settings", "SettingsError", "create_bot"]


def __getattr__(name: str) -> Any:
    # discord.py is imported only when the bot itself is needed, so that tools that only read
    # settings (and the worker process) start quickly.
    if name == "create_bot":
        from bot.client import create_bot

        return create_bot
    raise AttributeError(f"module 'bot' has no attribute {name!r}")
