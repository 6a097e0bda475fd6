"""/imagine and the Re-roll and Reproduce buttons: validate a request and queue it."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import guild_config
from bot.jobs import Job, NewJob
from bot.options import MAX_SEED, OptionsError, clean_text, parse_imagine
from bot.presenter import REQUIRED_PERMISSIONS
from bot.start_images import (
    StartImageRejected,
    remove_if_unused,
    save_start_image,
    start_images_dir,
)
from bot.store import QueueFull
from generator.request import GenerationRequest, RequestError

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = ["ImagineCog", "estimate_seconds_per_iteration", "resubmit", "setup"]

log = logging.getLogger(__name__)

# Discord's limit on a message's text, in characters.
MESSAGE_LIMIT = 2000
# Attempts at acknowledging an interaction when Discord returns a server error. They
# must all fit in Discord's 3 seconds.
ACKNOWLEDGE_ATTEMPTS = 3
ACKNOWLEDGE_BACKOFF = 0.25

ASPECT_CHOICES = [
    app_commands.Choice(name="1:1 square", value="1:1"),
    app_commands.Choice(name="3:2 landscape", value="3:2"),
    app_commands.Choice(name="2:3 portrait", value="2:3"),
    app_commands.Choice(name="16:9 wide", value="16:9"),
    app_commands.Choice(name="9:16 tall", value="9:16"),
    app_commands.Choice(name="4:3", value="4:3"),
    app_commands.Choice(name="3:4", value="3:4"),
]


class RequestRejected(Exception):
    """A request the bot will not queue; the message is the sentence shown to the user."""


class ImagineCog(commands.Cog):
    """The /imagine command."""

    def __init__(self, bot: ImagineBot) -> None:
        self.bot: ImagineBot = bot

    @app_commands.command(name="imagine")
    @app_commands.describe(
        prompt="What to draw. Inline flags work: --no fog, --seed 42, --ar 16:9, --iter 200, "
        "weights like cat::2",
        negative="Comma-separated things the picture should avoid",
        seed="Random seed (0 to 4294967295): the same seed and settings give the same picture",
        aspect="Width to height ratio",
        size="Longest side in pixels",
        iterations="Optimisation steps: more take longer and add detail",
        image="A starting picture (PNG, JPEG, WebP or GIF)",
    )
    @app_commands.choices(aspect=ASPECT_CHOICES)
    async def imagine(
        self,
        interaction: discord.Interaction[ImagineBot],
        prompt: app_commands.Range[str, 1, 1000],
        negative: app_commands.Range[str, 1, 500] | None = None,
        seed: int | None = None,
        aspect: str | None = None,
        size: int | None = None,
        iterations: int | None = None,
        image: discord.Attachment | None = None,
    ) -> None:
        """Turn a text prompt into a picture."""
        await acknowledge(interaction)
        try:
            prompt = clean_text(prompt, "prompt")
            negative = clean_text(negative, "negative") if negative is not None else None
            config = await self.bot.guild_config(interaction.guild_id)
            check_channel_and_words(interaction, config, prompt, negative)
            options = parse_imagine(
                prompt,
                self.bot.limits(config),
                negative=negative,
                seed=seed,
                aspect=aspect,
                size=size,
                iterations=iterations,
            )
            init_image = None
            if image is not None:
                directory = start_images_dir(self.bot.settings.data_dir)
                init_image = await save_start_image(image, directory)
            request = GenerationRequest(
                prompts=list(options.prompts),
                seed=options.seed if options.seed is not None else random_seed(),
                width=options.width,
                height=options.height,
                iterations=options.iterations,
                cutn=config["cutn"],
                vqgan=self.bot.settings.vqgan_model,
                clip=tuple(self.bot.settings.clip_models),
                init_image=init_image,
                progress_every=config["progress_interval"],
            )
        except (OptionsError, RequestRejected, StartImageRejected) as error:
            log.info("Rejected /imagine of user %d: %s", interaction.user.id, error)
            await reply(interaction, str(error))
            return
        await queue_request(interaction, request, prompt, config)


async def acknowledge(interaction: discord.Interaction[Any]) -> None:
    """Defer the interaction ephemerally, retrying Discord server errors within 3 seconds.

    discord.py retries server errors of interaction callbacks itself against the real
    Discord; this covers the errors it passes on.

    Raises:
        discord.HTTPException: the last error, when every attempt failed.
    """
    for attempt in range(1, ACKNOWLEDGE_ATTEMPTS + 1):
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
            return
        except discord.HTTPException as error:
            if error.status < 500 or attempt == ACKNOWLEDGE_ATTEMPTS:
                raise
            log.warning(
                "Acknowledging an interaction of user %d failed (HTTP %s, attempt %d); retrying",
                interaction.user.id,
                error.status,
                attempt,
            )
            await asyncio.sleep(ACKNOWLEDGE_BACKOFF * attempt)


async def reply(interaction: discord.Interaction[Any], text: str) -> bool:
    """Send ``text`` to the user as an ephemeral followup; return whether Discord took it.

    Text over Discord's 2000 characters is shortened. A failure is logged, not raised: the
    caller has nothing better to tell the user.
    """
    if len(text) > MESSAGE_LIMIT:
        text = text[: MESSAGE_LIMIT - 1] + "…"
    try:
        await interaction.followup.send(text, ephemeral=True)
    except discord.HTTPException as error:
        log.warning(
            "Could not reply to user %d (HTTP %s, code %s): %s",
            interaction.user.id,
            error.status,
            error.code,
            text[:100],
        )
        return False
    return True


async def resubmit(
    interaction: discord.Interaction[ImagineBot], job_id: int, *, same_seed: bool
) -> None:
    """Queue a finished job's request again for the user who pressed the button.

    ``same_seed`` reproduces the picture; otherwise a new seed gives a variation.
    """
    bot = interaction.client
    await acknowledge(interaction)
    job = await bot.store.get(job_id)
    if job is None:
        await reply(
            interaction,
            f"Picture #{job_id} was deleted, so it cannot be made again. "
            "Use /imagine with its prompt instead.",
        )
        return

    request = GenerationRequest.from_dict(job.request)
    if not same_seed:
        request = replace(request, seed=random_seed())
    config = await bot.guild_config(interaction.guild_id)
    try:
        check_channel_and_words(interaction, config, job.prompt, None)
    except RequestRejected as error:
        await reply(interaction, str(error))
        return
    await queue_request(interaction, request, job.prompt, config)


def check_channel_and_words(
    interaction: discord.Interaction[Any],
    config: dict[str, Any],
    prompt: str,
    negative: str | None,
) -> None:
    """Raise RequestRejected when /imagine is off in this channel or the text has a banned word."""
    if interaction.guild_id is not None and not guild_config.is_channel_allowed(
        config, interaction.channel_id
    ):
        channels = guild_config.format_value("allowed_channels", config["allowed_channels"])
        raise RequestRejected(f"/imagine is not enabled in this channel. Try {channels}.")
    for field, text in (("prompt", prompt), ("negative", negative or "")):
        word = guild_config.find_banned_word(config, text)
        if word is not None:
            raise RequestRejected(
                f"The {field} contains {discord.utils.escape_markdown(word)!r}, which this "
                "server does not allow. Remove it and try again."
            )


async def queue_request(
    interaction: discord.Interaction[ImagineBot],
    request: GenerationRequest,
    prompt: str,
    config: dict[str, Any],
) -> Job | None:
    """Store the job, reply "Queued as #id" and post the job's channel message.

    The interaction must already be deferred. Returns the job, or None when it was rejected,
    after an ephemeral message that gives the reason. A rejected request's start image is
    deleted unless another job uses it.
    """
    job = await _queue_checked(interaction, request, prompt, config)
    if job is None:
        await remove_if_unused(interaction.client.store, request.init_image)
    return job


async def _queue_checked(
    interaction: discord.Interaction[ImagineBot],
    request: GenerationRequest,
    prompt: str,
    config: dict[str, Any],
) -> Job | None:
    bot = interaction.client
    missing = missing_channel_permissions(interaction)
    if missing:
        log.warning(
            "Refused /imagine of user %d in channel %d: missing permission(s) %s",
            interaction.user.id,
            interaction.channel_id,
            ", ".join(missing),
        )
        await reply(
            interaction,
            "I can't show pictures in this channel: I need the "
            f"{', '.join(missing)} permission(s) here. Ask a server admin to grant them.",
        )
        return None
    try:
        request.validate()
    except RequestError as error:
        log.info("Rejected a request of user %d: %s", interaction.user.id, error)
        await reply(interaction, str(error))
        return None

    new_job = NewJob(
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        user_id=interaction.user.id,
        prompt=prompt,
        request=request.to_dict(),
    )
    try:
        job, position = await bot.store.enqueue(
            new_job,
            per_user_limit=config["max_jobs_per_user"],
            queue_limit=bot.settings.max_queue,
        )
    except QueueFull as error:
        log.info("Rejected a job of user %d: %s", interaction.user.id, error.limit_name)
        await reply(interaction, str(error))
        return None
    bot.executor.wake()
    bot.presenter.remember_interaction(job.id, interaction)

    # From here on the job is stored: a failed reply must not make the user think otherwise,
    # and the job's channel message mentions them in any case.
    minutes = math.ceil(await estimate_wait_seconds(bot, job) / 60)
    await reply(
        interaction, f"Queued as #{job.id}, position {position}, about {max(minutes, 1)} min."
    )
    message_id = await bot.presenter.show_job(
        job, f"queued, position {position}", replace=False
    )
    if message_id is None:
        await reply(interaction, bot.presenter.cannot_post_text(job))
    return job


def missing_channel_permissions(interaction: discord.Interaction[Any]) -> list[str]:
    """Return the permissions the bot lacks in the interaction's guild channel."""
    if interaction.guild_id is None:
        return []
    permissions = interaction.app_permissions
    return [
        name.replace("_", " ").title()
        for name in REQUIRED_PERMISSIONS
        if not getattr(permissions, name)
    ]


def random_seed() -> int:
    """Return a seed for a user who left it to chance."""
    return secrets.randbelow(MAX_SEED + 1)


def estimate_seconds_per_iteration(request: dict[str, Any], cpu: bool) -> float:
    """Return a rough time per iteration before the executor has measured one, in seconds.

    NOTE: an estimate from ViT-B/32 and the f16 VQGAN on a 2-core CPU (about 0.33 s per
    crop plus 9.5 s per 256×256 decoder pass); GPUs are assumed 50 times faster.
    """
    crops = float(request.get("cutn", 32))
    pixels = float(request.get("width", 256)) * float(request.get("height", 256))
    seconds = 0.33 * crops + 9.5 * pixels / (256 * 256)
    return seconds if cpu else seconds / 50


async def estimate_wait_seconds(bot: ImagineBot, job: Job) -> float:
    """Estimate the seconds until ``job`` is done: the iterations ahead of it plus its own.

    Uses the executor's estimate from its measured speed, or before the first measurement,
    :func:`estimate_seconds_per_iteration`.
    """
    measured = await bot.executor.eta_seconds(job.id)
    if measured is not None:
        return measured
    seconds = 0.0
    for queued in await bot.store.queue(limit=1000):
        remaining = queued.iterations
        if queued.state == "running":
            remaining -= bot.presenter.iterations_done.get(queued.id, 0)
        seconds += max(remaining, 0) * estimate_seconds_per_iteration(queued.request, bot.on_cpu)
        if queued.id == job.id:
            break
    return seconds


async def setup(bot: ImagineBot) -> None:
    """Add the /imagine command to ``bot``."""
    await bot.add_cog(ImagineCog(bot))
