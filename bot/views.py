"""Buttons under job messages that keep working after the bot restarts.

Every button is a :class:`JobButton`, a ``discord.ui.DynamicItem`` whose ``custom_id``
(``imagine:<action>:<job id>``) carries everything its callback needs. No view has to be
restored from memory. The bot registers the class once in ``setup_hook``, and clicks on
messages of any age reach it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = ["ACTIONS", "JobButton", "finished_view", "running_view"]

# Action -> (label, style).
ACTIONS: dict[str, tuple[str, discord.ButtonStyle]] = {
    "reroll": ("Re-roll", discord.ButtonStyle.primary),
    "reproduce": ("Reproduce", discord.ButtonStyle.secondary),
    "delete": ("Delete", discord.ButtonStyle.danger),
    "cancel": ("Cancel", discord.ButtonStyle.danger),
}


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"imagine:(?P<action>reroll|reproduce|delete|cancel):(?P<job_id>[0-9]+)",
):
    """One action on one job: re-roll, reproduce, delete or cancel."""

    def __init__(self, action: str, job_id: int) -> None:
        label, style = ACTIONS[action]
        super().__init__(
            discord.ui.Button(label=label, style=style, custom_id=f"imagine:{action}:{job_id}")
        )
        self.action: str = action
        self.job_id: int = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> JobButton:
        return cls(match["action"], int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction[ImagineBot]) -> None:  # type: ignore[override]
        # Imported here: the cogs import this module for the views they send.
        from bot.cogs.imagine import resubmit
        from bot.cogs.queue import cancel_job, delete_job

        if self.action == "reroll":
            await resubmit(interaction, self.job_id, same_seed=False)
        elif self.action == "reproduce":
            await resubmit(interaction, self.job_id, same_seed=True)
        elif self.action == "delete":
            await delete_job(interaction, self.job_id)
        else:
            await cancel_job(interaction, self.job_id)


def running_view(job_id: int) -> discord.ui.View:
    """Return the buttons of a queued or running job: Cancel."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("cancel", job_id))
    return view


def finished_view(job_id: int) -> discord.ui.View:
    """Return the buttons of a finished picture: Re-roll, Reproduce and Delete."""
    view = discord.ui.View(timeout=None)
    for action in ("reroll", "reproduce", "delete"):
        view.add_item(JobButton(action, job_id))
    return view
