"""/queue and /cancel, and the Cancel and Delete buttons."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.imagine import estimate_wait_seconds
from bot.jobs import Job
from bot.presenter import escape_text
from bot.start_images import remove_if_unused

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = ["QueueCog", "cancel_job", "delete_job", "setup"]

log = logging.getLogger(__name__)

NOT_YOURS = (
    "Only the person who asked for picture #{id} or a server admin can {action} it."
)


class QueueCog(commands.Cog):
    """Commands about the caller's place in the queue."""

    def __init__(self, bot: ImagineBot) -> None:
        self.bot: ImagineBot = bot

    @app_commands.command(name="queue")
    async def queue(self, interaction: discord.Interaction[ImagineBot]) -> None:
        """Show your queued and running pictures and how long the queue is."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        jobs = await self.bot.store.user_jobs(interaction.guild_id, interaction.user.id)
        total = await self.bot.store.queue_length()

        lines = [await self._describe(job) for job in jobs]
        if not lines:
            lines.append("You have no queued or running pictures here.")
        busy = self.bot.executor.info().busy_job_id is not None
        lines.append(
            f"Queue: {total} waiting" + (", 1 running." if busy else ", none running.")
        )
        await interaction.followup.send("\n".join(lines), ephemeral=True)

    async def _describe(self, job: Job) -> str:
        minutes = max(1, math.ceil(await estimate_wait_seconds(self.bot, job) / 60))
        if job.state == "running":
            done = self.bot.presenter.iterations_done.get(job.id, 0)
            where = f"running, {done}/{job.iterations} iterations"
        else:
            position = await self.bot.store.position(job.id)
            where = f"position {position}"
        return f"#{job.id} · {where} · about {minutes} min · {escape_text(job.prompt, 80)}"

    @app_commands.command(name="cancel")
    @app_commands.describe(job="The job number from 'Queued as #…' (default: your latest)")
    async def cancel(
        self, interaction: discord.Interaction[ImagineBot], job: int | None = None
    ) -> None:
        """Cancel one of your queued or running pictures (admins: anyone's)."""
        if job is None:
            latest = await self.bot.store.latest_active(interaction.guild_id, interaction.user.id)
            if latest is None:
                await interaction.response.send_message(
                    "You have no queued or running pictures here to cancel.", ephemeral=True
                )
                return
            job = latest.id
        await cancel_job(interaction, job)


async def cancel_job(interaction: discord.Interaction[ImagineBot], job_id: int) -> None:
    """Cancel a queued or running job for its owner or an admin, and reply ephemerally."""
    bot = interaction.client
    admin = bot.is_admin(interaction)
    job = await bot.store.cancel(
        job_id, interaction.user.id, admin=admin, guild_id=interaction.guild_id
    )
    if job is None:
        await interaction.response.send_message(
            await _why_not(bot, interaction, job_id, "cancel"), ephemeral=True
        )
        return

    await interaction.response.send_message(f"Cancelled #{job.id}.", ephemeral=True)
    log.info(
        "User %d cancelled job %d of user %d in guild %s",
        interaction.user.id,
        job.id,
        job.user_id,
        job.guild_id,
    )
    if job.started_at is not None:
        # The executor stops the worker and reports job_cancelled.
        await bot.executor.cancel(job.id)
    else:
        await bot.presenter.job_cancelled(job)


async def delete_job(interaction: discord.Interaction[ImagineBot], job_id: int) -> None:
    """Delete a finished picture and its message for its owner or an admin."""
    bot = interaction.client
    admin = bot.is_admin(interaction)
    job = await bot.store.delete(
        job_id, interaction.user.id, admin=admin, guild_id=interaction.guild_id
    )
    if job is None:
        await interaction.response.send_message(
            await _why_not(bot, interaction, job_id, "delete"), ephemeral=True
        )
        return

    await interaction.response.send_message(f"Deleted #{job.id}.", ephemeral=True)
    log.info("User %d deleted job %d of user %d", interaction.user.id, job.id, job.user_id)
    await remove_if_unused(bot.store, job.request.get("init_image"))
    if interaction.message is not None:
        try:
            await interaction.message.delete()
        except discord.NotFound:
            pass
        except discord.HTTPException as error:
            log.warning("Job %d: could not delete its message: %s", job.id, error)


async def _why_not(
    bot: ImagineBot, interaction: discord.Interaction[ImagineBot], job_id: int, action: str
) -> str:
    """Return why the caller cannot ``action`` the job, in one sentence."""
    job = await bot.store.get(job_id)
    if job is None or job.guild_id != interaction.guild_id:
        return f"There is no picture #{job_id} here."
    if job.user_id != interaction.user.id and not bot.is_admin(interaction):
        return NOT_YOURS.format(id=job_id, action=action)
    if action == "cancel":
        return f"Picture #{job_id} has already ended ({job.state}), so there is nothing to cancel."
    return f"Picture #{job_id} is still {job.state}: cancel it before deleting it."


async def setup(bot: ImagineBot) -> None:
    """Add /queue and /cancel to ``bot``."""
    await bot.add_cog(QueueCog(bot))
