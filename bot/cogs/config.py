"""/config show | set | reset: per-guild settings for members with Manage Server."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import guild_config
from bot.guild_config import CONFIG_KEYS, ConfigError

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = ["ConfigCog", "setup"]

log = logging.getLogger(__name__)

NOT_ALLOWED = "Changing imagine's settings needs the Manage Server permission."


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class ConfigCog(
    commands.GroupCog,
    group_name="config",
    group_description="Show or change imagine's settings for this server",
):
    """Per-guild settings, hidden from members without Manage Server.

    The permission is checked again here, because a server can override who may use a command.
    """

    def __init__(self, bot: ImagineBot) -> None:
        self.bot: ImagineBot = bot
        super().__init__()

    async def _reject_non_admin(self, interaction: discord.Interaction[ImagineBot]) -> bool:
        """Reply to a caller who may not configure this server; return True if rejected.

        Each command calls this itself rather than through ``interaction_check``: a failed
        ``interaction_check`` raises ``CheckFailure``, which the bot's error handler would
        report as a bot failure after the rejection was already sent.
        """
        if interaction.guild_id is not None and self.bot.is_admin(interaction):
            return False
        log.info(
            "Rejected /config from user %d in guild %s: missing Manage Server",
            interaction.user.id,
            interaction.guild_id,
        )
        await interaction.response.send_message(NOT_ALLOWED, ephemeral=True)
        return True

    @app_commands.command(name="show")
    async def show(self, interaction: discord.Interaction[ImagineBot]) -> None:
        """Show every setting of this server and its allowed values."""
        if await self._reject_non_admin(interaction):
            return
        assert interaction.guild_id is not None
        stored = await self.bot.store.guild_settings(interaction.guild_id)
        config = guild_config.effective(stored, self.bot.settings, self.bot.on_cpu)
        lines = []
        for name, key in CONFIG_KEYS.items():
            marker = " (changed)" if name in stored else ""
            value = guild_config.format_value(name, config[name])
            lines.append(f"**{name}**: {value}{marker}. {self._allowed(key)}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="set")
    @app_commands.describe(key="The setting to change", value="Its new value")
    async def set(
        self,
        interaction: discord.Interaction[ImagineBot],
        key: str,
        value: app_commands.Range[str, 1, 2000],
    ) -> None:
        """Change one setting of this server."""
        if await self._reject_non_admin(interaction):
            return
        assert interaction.guild_id is not None
        try:
            parsed = guild_config.parse_value(key, value, self.bot.settings)
        except ConfigError as error:
            await interaction.response.send_message(self._with_allowed(key, error), ephemeral=True)
            return
        name = key.strip().lower()
        unknown = self._unknown_channels(interaction, name, parsed)
        if unknown:
            await interaction.response.send_message(
                f"{unknown} is not a channel of this server, so /imagine would work nowhere. "
                "Mention channels of this server with #, e.g. `/config set allowed_channels "
                "#art #bots`.",
                ephemeral=True,
            )
            return
        old = await self.bot.store.set_guild_setting(interaction.guild_id, name, parsed)
        self._log_change(interaction, name, old, parsed)
        shown = guild_config.format_value(name, parsed)
        note = await self._capped_default_note(interaction.guild_id)
        await interaction.response.send_message(
            f"**{name}** is now {shown}.{note}", ephemeral=True
        )

    async def _capped_default_note(self, guild_id: int) -> str:
        """Return a note for each stored default above this server's own maximum."""
        stored = await self.bot.store.guild_settings(guild_id)
        config = await self.bot.guild_config(guild_id)
        notes = []
        for default, maximum in (
            ("default_size", "max_size"),
            ("default_iterations", "max_iterations"),
        ):
            if default in stored and stored[default] > config[maximum]:
                notes.append(
                    f"\nNote: **{default}** is {stored[default]} but **{maximum}** is "
                    f"{config[maximum]}, so pictures use {config[maximum]} until you raise "
                    f"{maximum} or lower {default}."
                )
        return "".join(notes)

    @staticmethod
    def _unknown_channels(
        interaction: discord.Interaction[ImagineBot], name: str, value: Any
    ) -> str:
        """Return the mentions of ``allowed_channels`` entries the guild does not have."""
        if name != "allowed_channels" or interaction.guild is None:
            return ""
        missing = [f"<#{channel_id}>" for channel_id in value
                   if interaction.guild.get_channel_or_thread(channel_id) is None]
        return ", ".join(missing)

    @app_commands.command(name="reset")
    @app_commands.describe(key="The setting to return to its default")
    async def reset(self, interaction: discord.Interaction[ImagineBot], key: str) -> None:
        """Return one setting of this server to its default."""
        if await self._reject_non_admin(interaction):
            return
        assert interaction.guild_id is not None
        name = key.strip().lower()
        if name not in CONFIG_KEYS:
            await interaction.response.send_message(
                f"Unknown setting {key!r}. Settings you can reset: {', '.join(CONFIG_KEYS)}.",
                ephemeral=True,
            )
            return
        old = await self.bot.store.reset_guild_setting(interaction.guild_id, name)
        default = guild_config.default_values(self.bot.settings, self.bot.on_cpu)[name]
        self._log_change(interaction, name, old, default)
        shown = guild_config.format_value(name, default)
        await interaction.response.send_message(
            f"**{name}** is back to its default, {shown}.", ephemeral=True
        )

    @set.autocomplete("key")
    @reset.autocomplete("key")
    async def key_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return [
            app_commands.Choice(name=name, value=name)
            for name in CONFIG_KEYS
            if current.lower() in name
        ][:25]

    def _allowed(self, key: guild_config.ConfigKey) -> str:
        if key.kind == "int":
            low, high = key.bounds(self.bot.settings)
            unit = f" {key.unit}" if key.unit else ""
            return f"{key.description} Allowed: {low} to {high}{unit}."
        return key.description

    def _with_allowed(self, key: str, error: ConfigError) -> str:
        config_key = CONFIG_KEYS.get(key.strip().lower())
        if config_key is None or config_key.kind != "int":
            return str(error)
        return f"{error} {config_key.description}"

    def _log_change(
        self, interaction: discord.Interaction[ImagineBot], key: str, old: Any, new: Any
    ) -> None:
        log.info(
            "Guild %d: user %d changed %s from %r to %r",
            interaction.guild_id,
            interaction.user.id,
            key,
            old,
            new,
        )


async def setup(bot: ImagineBot) -> None:
    """Add /config to ``bot``, visible by default only to members with Manage Server."""
    await bot.add_cog(ConfigCog(bot))
