"""/info: models, device, measured speed and queue statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.presenter import clip_label, vqgan_label

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = ["InfoCog", "setup"]


class InfoCog(commands.Cog):
    """The /info command."""

    def __init__(self, bot: ImagineBot) -> None:
        self.bot: ImagineBot = bot

    @app_commands.command(name="info")
    async def info(self, interaction: discord.Interaction[ImagineBot]) -> None:
        """Show the models, the device, the speed and the queue of this bot."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        executor = self.bot.executor.info()
        stats = await self.bot.store.stats()
        settings = self.bot.settings

        models = ", ".join(
            [vqgan_label(settings.vqgan_model), *map(clip_label, settings.clip_models)]
        )
        device = executor.device
        if self.bot.on_cpu:
            device += " (no GPU: pictures take minutes, and defaults use the small draft preset)"
        if executor.iterations_per_s:
            speed = f"{executor.iterations_per_s:.2f} iterations/s, measured on this host"
        else:
            speed = "not measured yet (no picture finished since start-up)"

        embed = discord.Embed(title="imagine")
        embed.add_field(name="Models", value=models, inline=False)
        embed.add_field(name="Device", value=device, inline=False)
        embed.add_field(name="Speed", value=speed, inline=False)
        queue = f"{stats['queued']} waiting, {stats['running']} running"
        embed.add_field(name="Queue", value=queue)
        embed.add_field(name="Pictures made", value=str(stats["done"]))
        await interaction.followup.send(embed=embed, ephemeral=True)


async def setup(bot: ImagineBot) -> None:
    """Add /info to ``bot``."""
    await bot.add_cog(InfoCog(bot))
