"""Slash commands, one module per area; each module has an async ``setup(bot)``."""
