"""The channel messages that show each job, and the executor's events that update them.

Each job gets one ordinary bot message in the channel where it was requested (not the
interaction response, whose token expires after 15 minutes). Progress edits of that message
go through :class:`ProgressEditor`, which keeps Discord's edit rate limits and drops stale
frames. When the picture is done, a new message with the image, an embed and buttons
replaces the progress message, and mentions the requester.

When Discord keeps refusing the channel post (server errors, missing permissions), the picture
goes to the requester instead: as an ephemeral followup of their /imagine while its token is
valid, else as a direct message, each with the reason. Every message allows a ping of the
requester and no one else.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import discord
from asyncio_throttle import Throttler
from PIL import Image

from bot import views
from bot.jobs import FINAL_STATES, Job
from generator.prompts import format_prompts
from generator.request import GenerationRequest

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = [
    "DM_FILESIZE_LIMIT",
    "Presenter",
    "ProgressEditor",
    "encode_for_upload",
    "retry_after_seconds",
]

log = logging.getLogger(__name__)

FrameT = TypeVar("FrameT")

# Discord's upload limit in direct messages and in guilds without boosts.
DM_FILESIZE_LIMIT = 10 * 1024 * 1024
# Discord allows about 5 message edits per 5 s in one channel. One edit per 2 s per message
# keeps two running jobs in one channel under that, and the channel throttle covers more.
MESSAGE_EDIT_INTERVAL = 2.0
CHANNEL_EDITS = 5
CHANNEL_EDIT_PERIOD = 5.0
# Used when a 429 response carries no usable retry_after.
DEFAULT_RETRY_AFTER = 5.0
MAX_RATE_LIMIT_RETRIES = 5
# How long a finished job waits for its last progress edit in flight, in seconds.
EDIT_FINISH_TIMEOUT = 10.0
# Attempts at posting a finished picture when Discord returns a server error, and the pause
# before attempt n + 1 (n times the backoff), in seconds.
FINAL_POST_ATTEMPTS = 4
FINAL_POST_BACKOFF = 2.0
# The maximum rate limit, in seconds, that a finished picture waits out before it goes to
# its requester instead.
MAX_FINAL_RETRY_AFTER = 60.0
PROMPT_DISPLAY_LIMIT = 300

UNKNOWN_MESSAGE = 10008
MISSING_PERMISSIONS = 50013
# Permissions the bot needs in a channel to show a job there.
REQUIRED_PERMISSIONS = ("view_channel", "send_messages", "attach_files", "embed_links")


def retry_after_seconds(error: Exception) -> float | None:
    """Return how long Discord asked the bot to wait, or None if ``error`` is no rate limit."""
    if isinstance(error, discord.RateLimited):
        return max(0.0, float(error.retry_after))
    if isinstance(error, discord.HTTPException) and error.status == 429:
        headers = getattr(error.response, "headers", None) or {}
        try:
            return max(0.0, float(headers.get("Retry-After", DEFAULT_RETRY_AFTER)))
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER
    return None


class ProgressEditor(Generic[FrameT]):
    """Send the newest submitted frame through ``edit`` under two throttles.

    ``message_throttler`` limits the edits of one message and ``channel_throttler`` is shared
    by every editor in one channel. Frames that arrive while the editor waits for its turn
    replace each other, so only the newest is sent. Rate limits (429) are waited out for
    ``retry_after`` seconds and the newest frame is retried. Any other exception goes to
    ``on_error`` and the frame is dropped, so a failed edit never stops the job it shows.
    """

    def __init__(
        self,
        edit: Callable[[FrameT], Awaitable[None]],
        message_throttler: Throttler,
        channel_throttler: Throttler,
        on_error: Callable[[Exception], Awaitable[None]],
    ) -> None:
        self._edit = edit
        self._message_throttler = message_throttler
        self._channel_throttler = channel_throttler
        self._on_error = on_error
        self._latest: FrameT | None = None
        self._task: asyncio.Task[None] | None = None
        self._editing = False
        self._closed = False
        self.sent: int = 0
        self.dropped: int = 0

    def submit(self, frame: FrameT) -> None:
        """Queue ``frame`` for the next edit, replacing a frame that was not sent yet.

        Frames submitted after :meth:`aclose` are ignored.
        """
        if self._closed:
            return
        if self._latest is not None:
            self.dropped += 1
        self._latest = frame
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def wait_idle(self) -> None:
        """Wait until every submitted frame is sent or dropped."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def aclose(self, timeout: float = EDIT_FINISH_TIMEOUT) -> None:
        """Stop editing: drop a frame not sent yet and let an edit in flight finish.

        An edit still running after ``timeout`` seconds, or a wait for a rate limit, is
        cancelled.
        """
        self._closed = True
        self._latest = None
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if not self._editing:
            task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _drain(self) -> None:
        rate_limits = 0
        while self._latest is not None:
            await self._message_throttler.acquire()
            await self._channel_throttler.acquire()
            frame, self._latest = self._latest, None
            if frame is None:
                continue  # aclose() dropped it while this task waited for its turn

            delay = await self._send(frame)
            if delay is None:
                rate_limits = 0
                continue
            rate_limits += 1
            if rate_limits > MAX_RATE_LIMIT_RETRIES:
                log.warning("Dropped a progress frame after %d rate limits", rate_limits - 1)
                rate_limits = 0
                continue
            log.info("Progress edit rate limited, retrying in %.2f s", delay)
            if self._latest is None and not self._closed:
                self._latest = frame
            await asyncio.sleep(delay)

    async def _send(self, frame: FrameT) -> float | None:
        """Edit with ``frame``; return the seconds to wait if rate limited, else None."""
        self._editing = True
        try:
            await self._edit(frame)
        except Exception as error:
            delay = retry_after_seconds(error)
            if delay is None:
                await self._on_error(error)
            return delay
        else:
            self.sent += 1
            return None
        finally:
            self._editing = False


@dataclass(frozen=True)
class Frame:
    """One progress update of a job's message: the state line and an optional picture."""

    status: str
    png: bytes | None = None


def encode_for_upload(png: bytes, limit: int) -> tuple[bytes, str]:
    """Return ``(data, extension)`` of a file no larger than ``limit`` bytes.

    The PNG is returned unchanged when it fits. Otherwise it becomes a JPEG, at lower
    quality and then smaller dimensions until it fits.
    """
    if len(png) <= limit:
        return png, "png"

    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        for quality in (95, 85, 75, 60, 45):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality, optimize=True)
            if buffer.tell() <= limit:
                return buffer.getvalue(), "jpg"
        if min(image.size) <= 16:
            raise ValueError(f"cannot fit the picture into {limit} bytes")
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)


def escape_text(text: str, limit: int = PROMPT_DISPLAY_LIMIT) -> str:
    """Return user text safe to show in a message: no markdown, no mentions, bounded length."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def mention_only(user_id: int) -> discord.AllowedMentions:
    """Allowed mentions that ping the requester and no one else."""
    return discord.AllowedMentions(
        everyone=False, roles=False, users=[discord.Object(user_id)], replied_user=False
    )


def format_duration(seconds: float) -> str:
    """Return a duration such as ``45 s`` or ``3 min 20 s``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def job_content(job: Job, status: str) -> str:
    """Return the text of a job's channel message: prompt, requester, id and ``status``."""
    return f"**{escape_text(job.prompt)}**\n<@{job.user_id}> · #{job.id} · {status}"


class Presenter:
    """Show jobs in their channels; implements the executor's ``JobEvents``."""

    def __init__(
        self,
        bot: ImagineBot,
        *,
        edit_interval: float = MESSAGE_EDIT_INTERVAL,
        channel_edits: int = CHANNEL_EDITS,
        channel_period: float = CHANNEL_EDIT_PERIOD,
    ) -> None:
        self._bot = bot
        self._edit_interval = edit_interval
        self._channel_edits = channel_edits
        self._channel_period = channel_period
        # Job id -> id of the message that shows it; the store has the same, but an event's
        # Job may have been read before the message was posted.
        self._messages: dict[int, int] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._editors: dict[int, ProgressEditor[Frame]] = {}
        self._channel_throttlers: dict[int, Throttler] = {}
        # Job id -> last iteration reported, for estimates of the time left.
        self.iterations_done: dict[int, int] = {}
        # Job id -> the followup webhook of the /imagine that queued it. Its token expires
        # after 15 minutes, and then Discord rejects the followup and a DM is sent instead.
        self._followups: dict[int, discord.Webhook] = {}
        self.final_post_backoff: float = FINAL_POST_BACKOFF

    def remember_interaction(self, job_id: int, interaction: discord.Interaction[Any]) -> None:
        """Keep the followup of the interaction that queued ``job_id``, to reach its requester.

        Used only when the channel rejects the job's messages. It is kept in memory only, so
        after a restart the requester is reached by direct message.
        """
        self._followups[job_id] = interaction.followup

    def cannot_post_text(self, job: Job) -> str:
        """Tell the requester that the job's channel message could not be posted, and why."""
        return (
            f"Job #{job.id} is queued, but I could not post its message in this channel"
            f"{self._permission_hint(job)}. I will still try to post the picture when it is "
            "done, and send it to you if I cannot."
        )

    def _permission_hint(self, job: Job) -> str:
        missing = self.missing_permissions(job.channel_id)
        if not missing:
            return ""
        names = ", ".join(name.replace("_", " ").title() for name in missing)
        return f": I need the {names} permission(s) there, which a server admin can grant"

    # -- the job's message ---------------------------------------------------------------

    async def show_job(self, job: Job, status: str, *, replace: bool = True) -> int | None:
        """Post the job's message if it has none yet, else edit it to show ``status``.

        With ``replace=False`` an existing message is left as it is: the executor may have
        started the job and shown a newer state. Returns the message id, or None when
        Discord rejected the post (logged).
        """
        async with self._lock(job.id):
            if not replace:
                # A tiny job can end before its requester's message is posted.
                stored = await self._bot.store.get(job.id)
                if stored is None or stored.state in FINAL_STATES:
                    return stored.message_id if stored else None
            message_id = self._message_id(job)
            if message_id is None:
                return await self._post(job, status)
            if replace:
                await self._edit_now(job, message_id, status)
            return self._message_id(job)

    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def _message_id(self, job: Job) -> int | None:
        return self._messages.get(job.id, job.message_id)

    async def _post(
        self, job: Job, status: str, png: bytes | None = None, *, active: bool = True
    ) -> int | None:
        """Post the job's message; ``active`` adds the Cancel button."""
        channel = self._bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        files = [discord.File(io.BytesIO(png), f"progress-{job.id}.png")] if png else []
        try:
            message = await channel.send(
                job_content(job, status),
                files=files,
                view=views.running_view(job.id) if active else discord.utils.MISSING,
                allowed_mentions=mention_only(job.user_id),
            )
        except (discord.HTTPException, discord.RateLimited) as error:
            self._log_http_error(job, "post the job message", error)
            return None
        await self._remember(job, message.id)
        return message.id

    async def _remember(self, job: Job, message_id: int) -> None:
        self._messages[job.id] = message_id
        await self._bot.store.set_message(job.id, job.channel_id, message_id)

    async def _edit_now(
        self, job: Job, message_id: int, status: str, *, active: bool = True
    ) -> bool:
        """Edit the job's message to show ``status`` at once; a deleted message is posted again.

        An inactive job (ended) loses its progress picture and its Cancel button. Returns
        whether a message in the channel shows ``status`` now.
        """
        message = self._bot.get_partial_messageable(
            job.channel_id, guild_id=job.guild_id
        ).get_partial_message(message_id)
        fields: dict[str, object] = {"content": job_content(job, status)}
        if not active:
            fields.update(view=None, attachments=[])
        try:
            await message.edit(allowed_mentions=mention_only(job.user_id), **fields)
        except discord.NotFound:
            log.info("Message of job %d was deleted; posting a new one", job.id)
            self._messages.pop(job.id, None)
            return await self._post(job, status, active=active) is not None
        except (discord.HTTPException, discord.RateLimited) as error:
            self._log_http_error(job, "edit the job message", error)
            return False
        return True

    def _log_http_error(
        self, job: Job, action: str, error: discord.HTTPException | discord.RateLimited
    ) -> None:
        if isinstance(error, discord.RateLimited):
            log.error(
                "Job %d: cannot %s: rate limited for %.1f s", job.id, action, error.retry_after
            )
        elif error.code == MISSING_PERMISSIONS:
            missing = self.missing_permissions(job.channel_id)
            log.error(
                "Job %d: cannot %s in channel %d, missing permission(s): %s",
                job.id,
                action,
                job.channel_id,
                ", ".join(missing) or "unknown",
            )
        else:
            log.error(
                "Job %d: cannot %s (HTTP %s, code %s): %s",
                job.id,
                action,
                error.status,
                error.code,
                error.text,
            )

    def missing_permissions(self, channel_id: int) -> list[str]:
        """Return the permissions the bot lacks to show jobs in a guild channel."""
        channel = self._bot.get_channel(channel_id)
        guild = getattr(channel, "guild", None)
        if channel is None or guild is None or guild.me is None:
            return []
        permissions = channel.permissions_for(guild.me)
        return [name for name in REQUIRED_PERMISSIONS if not getattr(permissions, name)]

    # -- progress ---------------------------------------------------------------------------

    def _editor(self, job: Job) -> ProgressEditor[Frame]:
        editor = self._editors.get(job.id)
        if editor is None:
            throttler = self._channel_throttlers.setdefault(
                job.channel_id, Throttler(self._channel_edits, self._channel_period)
            )

            async def edit(frame: Frame) -> None:
                await self._edit_progress(job, frame)

            async def on_error(error: Exception) -> None:
                if isinstance(error, discord.HTTPException):
                    self._log_http_error(job, "show progress", error)
                else:
                    log.exception("Job %d: progress edit failed", job.id, exc_info=error)

            editor = ProgressEditor(edit, Throttler(1, self._edit_interval), throttler, on_error)
            self._editors[job.id] = editor
        return editor

    async def _edit_progress(self, job: Job, frame: Frame) -> None:
        async with self._lock(job.id):
            message_id = self._message_id(job)
            if message_id is None:
                await self._post(job, frame.status, frame.png)
                return
            fields: dict[str, object] = {"content": job_content(job, frame.status)}
            if frame.png is not None:
                fields["attachments"] = [
                    discord.File(io.BytesIO(frame.png), f"progress-{job.id}.png")
                ]
            message = self._bot.get_partial_messageable(
                job.channel_id, guild_id=job.guild_id
            ).get_partial_message(message_id)
            try:
                await message.edit(allowed_mentions=mention_only(job.user_id), **fields)
            except discord.NotFound as error:
                if error.code != UNKNOWN_MESSAGE:
                    raise
                log.info("Progress message of job %d was deleted; posting a new one", job.id)
                self._messages.pop(job.id, None)
                await self._post(job, frame.status, frame.png)

    async def _stop_editor(self, job_id: int) -> None:
        editor = self._editors.pop(job_id, None)
        if editor is not None:
            await editor.aclose()

    async def wait_idle(self, job_id: int) -> None:
        """Wait until the progress frames submitted for a job are sent or dropped."""
        editor = self._editors.get(job_id)
        if editor is not None:
            await editor.wait_idle()

    # -- JobEvents ------------------------------------------------------------------------

    async def job_started(self, job: Job, resumed_at: int | None) -> None:
        """Show that the job runs, and from which iteration if it resumed a saved state."""
        total = job.iterations
        if resumed_at:
            status = f"resumed at iteration {resumed_at}/{total} after an interruption"
        else:
            status = f"running, 0/{total} iterations"
        self.iterations_done[job.id] = resumed_at or 0
        await self.show_job(job, status)

    async def job_progress(self, job: Job, iteration: int, total: int, png: bytes | None) -> None:
        """Queue a progress edit; only frames with a picture are worth an edit of their own."""
        self.iterations_done[job.id] = iteration
        if png is None:
            return
        percent = 100 * iteration // max(total, 1)
        status = f"running, {iteration}/{total} iterations ({percent}%)"
        self._editor(job).submit(Frame(status, png))

    async def job_finished(self, job: Job, png: bytes, duration_s: float) -> None:
        """Post the picture with its embed and buttons, then remove the progress message.

        A picture the channel refuses goes to the requester, and the progress message
        then states where it went.
        """
        await self._stop_editor(job.id)
        self.iterations_done.pop(job.id, None)
        async with self._lock(job.id):
            old_message_id = self._message_id(job)
            posted = await self._post_final(job, png, duration_s)
            if posted == "channel" and old_message_id is not None:
                await self._delete_message(job, old_message_id)
            elif old_message_id is not None:
                where = "I sent it to the requester" if posted else "the bot owner has it"
                status = f"done, but Discord refused the picture here; {where}"
                await self._edit_now(job, old_message_id, status, active=False)
        self._forget(job.id)

    async def job_failed(self, job: Job, message: str) -> None:
        """Show the user-facing reason of the failure in the job's message."""
        await self._stop_editor(job.id)
        self.iterations_done.pop(job.id, None)
        await self._show_final_state(job, f"failed: {message}")

    async def job_cancelled(self, job: Job) -> None:
        """Show that the job was cancelled."""
        await self._stop_editor(job.id)
        self.iterations_done.pop(job.id, None)
        await self._show_final_state(job, "cancelled")

    async def _show_final_state(self, job: Job, status: str) -> None:
        """Show how the job ended in its message, a new message, or else to its requester."""
        async with self._lock(job.id):
            message_id = self._message_id(job)
            shown = message_id is not None and await self._edit_now(
                job, message_id, status, active=False
            )
            if not shown:
                shown = await self._post(job, status, active=False) is not None
            if not shown:
                await self._send_to_requester(job, f"Your picture #{job.id} is {status}.")
        self._forget(job.id)

    def _forget(self, job_id: int) -> None:
        self._messages.pop(job_id, None)
        self._locks.pop(job_id, None)
        self._followups.pop(job_id, None)

    # -- the finished picture ---------------------------------------------------------------

    async def _post_final(self, job: Job, png: bytes, duration_s: float) -> str | None:
        """Post the finished picture in the channel, retrying server errors and rate limits.

        When the channel keeps refusing it, the picture goes to the requester with the
        reason. Returns where it went, ``"channel"`` or ``"requester"``, or None.
        """
        data, extension = encode_for_upload(png, self.upload_limit(job))
        filename = f"imagine-{job.id}.{extension}"
        embed = finished_embed(job, duration_s, filename)
        content = f"<@{job.user_id}> · #{job.id} · done in {format_duration(duration_s)}"
        if extension != "png":
            content += " (sent as JPEG because the PNG is over this channel's upload limit)"
        channel = self._bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)

        error: discord.HTTPException | discord.RateLimited | None = None
        for attempt in range(1, FINAL_POST_ATTEMPTS + 1):
            try:
                message = await channel.send(
                    content,
                    embed=embed,
                    file=discord.File(io.BytesIO(data), filename),
                    view=views.finished_view(job.id),
                    allowed_mentions=mention_only(job.user_id),
                )
            except (discord.HTTPException, discord.RateLimited) as caught:
                error = caught
                self._log_http_error(job, f"post the picture (attempt {attempt})", error)
                delay = self._final_retry_delay(error, attempt)
                if delay is None or attempt == FINAL_POST_ATTEMPTS:
                    break
                await asyncio.sleep(delay)
            else:
                await self._remember(job, message.id)
                return "channel"

        reason = self._failure_reason(job, error)
        delivered = await self._send_to_requester(
            job,
            f"I could not post your picture #{job.id} in <#{job.channel_id}>: {reason}. "
            "Here it is.",
            (data, filename),
        )
        if delivered:
            return "requester"
        log.error("Job %d: gave up posting the picture; it stays in %s", job.id, job.result_path)
        return None

    def _final_retry_delay(
        self, error: discord.HTTPException | discord.RateLimited, attempt: int
    ) -> float | None:
        """Return the seconds to wait before posting a picture again, or None to give up."""
        retry_after = retry_after_seconds(error)
        if retry_after is not None:
            return retry_after if retry_after <= MAX_FINAL_RETRY_AFTER else None
        if isinstance(error, discord.HTTPException) and error.status >= 500:
            return self.final_post_backoff * attempt
        return None

    def _failure_reason(
        self, job: Job, error: discord.HTTPException | discord.RateLimited | None
    ) -> str:
        """Say in words why Discord refused a post in the job's channel."""
        if isinstance(error, discord.HTTPException) and error.code == MISSING_PERMISSIONS:
            missing = self.missing_permissions(job.channel_id) or list(REQUIRED_PERMISSIONS)
            names = ", ".join(name.replace("_", " ").title() for name in missing)
            return f"I need the {names} permission(s) there; a server admin can grant them"
        if isinstance(error, discord.RateLimited):
            return f"Discord asked me to wait {error.retry_after:.0f} s before posting there"
        if isinstance(error, discord.HTTPException):
            return f"Discord answered with an error (HTTP {error.status}), so try again later"
        return "Discord did not take it"

    async def _send_to_requester(
        self, job: Job, text: str, attachment: tuple[bytes, str] | None = None
    ) -> bool:
        """Reach the requester privately: their /imagine followup, else a direct message.

        ``attachment`` is ``(data, filename)``. Returns whether either was delivered; each
        failure is logged.
        """

        def file() -> discord.File:
            if attachment is None:
                return discord.utils.MISSING
            return discord.File(io.BytesIO(attachment[0]), attachment[1])

        followup = self._followups.get(job.id)
        if followup is not None:
            try:
                await followup.send(
                    text,
                    file=file(),
                    ephemeral=True,
                    allowed_mentions=discord.AllowedMentions.none(),
                )
                return True
            except (discord.HTTPException, discord.RateLimited) as error:
                self._log_http_error(job, "send the followup to the requester", error)
        try:
            user = self._bot.get_user(job.user_id) or await self._bot.fetch_user(job.user_id)
            await user.send(text, file=file(), allowed_mentions=discord.AllowedMentions.none())
        except (discord.HTTPException, discord.RateLimited) as error:
            self._log_http_error(job, "send a direct message to the requester", error)
            return False
        return True

    async def _delete_message(self, job: Job, message_id: int) -> None:
        """Delete the progress message; if Discord refuses, edit it to point at the picture."""
        message = self._bot.get_partial_messageable(
            job.channel_id, guild_id=job.guild_id
        ).get_partial_message(message_id)
        try:
            await message.delete()
            return
        except discord.NotFound:
            return
        except (discord.HTTPException, discord.RateLimited) as error:
            self._log_http_error(job, "delete the progress message", error)
        try:
            await message.edit(
                content=job_content(job, "done, the picture is posted below"),
                view=None,
                attachments=[],
                allowed_mentions=mention_only(job.user_id),
            )
        except (discord.HTTPException, discord.RateLimited) as error:
            self._log_http_error(job, "mark the progress message done", error)

    def upload_limit(self, job: Job) -> int:
        """Return the largest file, in bytes, the bot may upload in the job's channel."""
        guild = self._bot.get_guild(job.guild_id) if job.guild_id is not None else None
        return guild.filesize_limit if guild is not None else DM_FILESIZE_LIMIT

    # -- start-up -----------------------------------------------------------------------------

    async def announce_recovered(self, jobs: list[Job]) -> None:
        """Update the messages of jobs that were running when the bot stopped unexpectedly."""
        for job in jobs:
            if job.id in self.iterations_done:
                continue  # already running again, and its message shows that
            if job.state == "queued":
                status = "interrupted by a restart, back at the front of the queue"
                await self.show_job(job, status)
            else:
                await self._show_final_state(job, f"failed: {job.error}")


def finished_embed(job: Job, duration_s: float, filename: str) -> discord.Embed:
    """Return the embed of a finished picture: prompts, seed, size, iterations, models, time."""
    request = GenerationRequest.from_dict(job.request)
    positive, negative = format_prompts(request.prompts)
    embed = discord.Embed(title=escape_text(positive, 256) or "Untitled")
    embed.add_field(name="Negative", value=escape_text(negative, 1000) or "none", inline=False)
    embed.add_field(name="Seed", value=str(request.seed))
    embed.add_field(name="Size", value=f"{request.width}×{request.height}")
    embed.add_field(name="Iterations", value=str(request.iterations))
    models = ", ".join([vqgan_label(request.vqgan), *map(clip_label, request.clip)])
    embed.add_field(name="Models", value=escape_text(models, 1000), inline=False)
    embed.add_field(name="Duration", value=format_duration(duration_s))
    embed.set_image(url=f"attachment://{filename}")
    embed.set_footer(text=f"Job #{job.id}")
    return embed


def vqgan_label(spec: str) -> str:
    """Return a VQGAN registry name as is, and a checkpoint path as its file name's stem."""
    path = PurePath(spec)
    return path.stem if path.suffix else spec


def clip_label(spec: str) -> str:
    """Return ``MODEL/PRETRAINED`` with a local weights path shortened to its file name."""
    model, _, pretrained = spec.partition("/")
    return f"{model}/{PurePath(pretrained).name}" if pretrained else model
