"""/imagine and the Re-roll and Reproduce buttons: validate a request and queue it."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import secrets
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands
from PIL import Image, UnidentifiedImageError

from bot import guild_config
from bot.jobs import Job, NewJob
from bot.options import MAX_SEED, OptionsError, parse_imagine
from bot.presenter import REQUIRED_PERMISSIONS
from bot.store import QueueFull
from generator.request import GenerationRequest, RequestError

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = ["ImagineCog", "estimate_seconds_per_iteration", "resubmit", "setup"]

log = logging.getLogger(__name__)

# Largest init image accepted, in bytes and in pixels.
MAX_INIT_IMAGE_BYTES = 8 * 1024 * 1024
MAX_INIT_IMAGE_PIXELS = 4096 * 4096
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")

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
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
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
            init_image = await save_init_image(self.bot, image) if image is not None else None
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
        except (OptionsError, RequestRejected) as error:
            await interaction.followup.send(str(error), ephemeral=True)
            return
        await queue_request(interaction, request, prompt, config)


async def resubmit(
    interaction: discord.Interaction[ImagineBot], job_id: int, *, same_seed: bool
) -> None:
    """Queue a finished job's request again for the user who pressed the button.

    ``same_seed`` reproduces the picture; otherwise a new seed gives a variation.
    """
    bot = interaction.client
    await interaction.response.defer(ephemeral=True, thinking=True)
    job = await bot.store.get(job_id)
    if job is None:
        await interaction.followup.send(
            f"Picture #{job_id} was deleted, so it cannot be made again. "
            "Use /imagine with its prompt instead.",
            ephemeral=True,
        )
        return

    request = GenerationRequest.from_dict(job.request)
    if not same_seed:
        request = replace(request, seed=random_seed())
    config = await bot.guild_config(interaction.guild_id)
    try:
        check_channel_and_words(interaction, config, job.prompt, None)
    except RequestRejected as error:
        await interaction.followup.send(str(error), ephemeral=True)
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
    for text in (prompt, negative or ""):
        word = guild_config.find_banned_word(config, text)
        if word is not None:
            raise RequestRejected(
                f"The prompt contains {discord.utils.escape_markdown(word)!r}, which this "
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
    after an ephemeral message that gives the reason.
    """
    bot = interaction.client
    missing = missing_channel_permissions(interaction)
    if missing:
        await interaction.followup.send(
            "I can't show pictures in this channel: I need the "
            f"{', '.join(missing)} permission(s) here. Ask a server admin to grant them.",
            ephemeral=True,
        )
        return None
    try:
        request.validate()
    except RequestError as error:
        await interaction.followup.send(f"{error}", ephemeral=True)
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
        await interaction.followup.send(str(error), ephemeral=True)
        return None
    bot.executor.wake()

    minutes = math.ceil(await estimate_wait_seconds(bot, job) / 60)
    await interaction.followup.send(
        f"Queued as #{job.id}, position {position}, about {max(minutes, 1)} min.",
        ephemeral=True,
    )
    message_id = await bot.presenter.show_job(
        job, f"queued, position {position}", replace=False
    )
    if message_id is None:
        await interaction.followup.send(
            f"Job #{job.id} is queued, but I could not post its progress message here; "
            "the picture will still be posted when it is done, if I can.",
            ephemeral=True,
        )
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


async def save_init_image(bot: ImagineBot, attachment: discord.Attachment) -> str:
    """Download, check and save an uploaded starting picture; return the saved PNG's path.

    Raises:
        RequestRejected: the file is too large or not a picture the bot can read.
    """
    if attachment.size > MAX_INIT_IMAGE_BYTES:
        raise RequestRejected(
            f"The image {attachment.filename!r} is {attachment.size / 2**20:.1f} MiB; the limit "
            f"is {MAX_INIT_IMAGE_BYTES // 2**20} MiB. Upload a smaller PNG or JPEG."
        )
    content_type = (attachment.content_type or "").split(";")[0].strip()
    if content_type and content_type not in IMAGE_TYPES:
        raise RequestRejected(
            f"{attachment.filename!r} is not a picture ({content_type}). "
            "Upload a PNG, JPEG, WebP or GIF file."
        )
    try:
        data = await attachment.read()
    except discord.HTTPException as error:
        log.warning("Could not download attachment %s: %s", attachment.id, error)
        raise RequestRejected(
            f"I could not download {attachment.filename!r}. Upload it again."
        ) from None

    # NOTE: nothing deletes these files yet, not even when their job is deleted.
    directory = bot.settings.data_dir / "inputs"
    path = directory / f"{uuid.uuid4().hex}.png"
    await asyncio.to_thread(_convert_to_png, data, attachment.filename, path)
    return str(path)


def _convert_to_png(data: bytes, filename: str, path: Path) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_INIT_IMAGE_PIXELS:
                raise RequestRejected(
                    f"The image {filename!r} is {image.width}×{image.height} pixels; the limit "
                    "is 4096×4096. Upload a smaller picture."
                )
            image.seek(0)
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise RequestRejected(
            f"{filename!r} is not a picture I can read. Upload a PNG, JPEG, WebP or GIF file."
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(path, "PNG")


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
