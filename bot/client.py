"""The Discord client: wires the job store, the executor, the presenter and the commands."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from bot import guild_config
from bot.executor import Executor, WorkerError
from bot.jobs import Job
from bot.options import Limits
from bot.presenter import Presenter
from bot.settings import Settings
from bot.start_images import remove_unused, start_images_dir
from bot.store import JobStore
from bot.views import JobButton

__all__ = [
    "SHUTDOWN_SIGNALS",
    "ImagineBot",
    "StartupError",
    "create_bot",
    "on_shutdown_signals",
    "serve",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# discord.py waits out rate limits up to this many seconds itself, and raises RateLimited
# for longer ones so that progress edits can drop a frame instead of stalling.
MAX_RATELIMIT_TIMEOUT = 30.0
# The bot stops gracefully on these instead of dying: see ImagineBot.close.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How long close() waits for a start-up in progress (prepare() waits for the models).
SETUP_WAIT_TIMEOUT_S = 30.0


class StartupError(RuntimeError):
    """A start-up failure. The message states what is wrong and what the operator can do."""


class ImagineBot(commands.Bot):
    """The imagine bot: slash commands in front of a persistent job queue.

    ``prepare`` opens the store (applying migrations) and starts the executor (which requeues
    jobs a previous run left running, and waits for the worker's device and models).
    :func:`serve` calls it before logging in, so a wrong device or missing models stop
    start-up before any traffic to Discord. ``setup_hook`` calls it too, a no-op by then.
    ``setup_hook`` then registers the persistent buttons, loads the cogs, syncs the slash
    commands and updates the messages of the requeued jobs. ``close`` stops the executor
    (requeueing the running job with its last saved state) and closes the store; calling it
    again waits for the first call.
    """

    def __init__(self, settings: Settings, *, store_path: Path | None = None) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            # Nothing pings anyone unless a message names its requester explicitly.
            allowed_mentions=discord.AllowedMentions.none(),
            max_ratelimit_timeout=MAX_RATELIMIT_TIMEOUT,
        )
        self.settings: Settings = settings
        self.store_path: Path = Path(store_path) if store_path else settings.database_path
        self.store: JobStore
        self.executor: Executor
        self.presenter: Presenter = Presenter(self)
        # Cleared while prepare() or setup_hook() opens things, which close() waits for.
        self._setup_idle: asyncio.Event = asyncio.Event()
        self._setup_idle.set()
        self._shutdown: asyncio.Task[None] | None = None
        self._recovered: list[Job] | None = None

    async def prepare(self) -> None:
        """Open the store and start the executor, once; later calls return at once.

        Raises:
            StartupError: the database cannot be opened, ``IMAGINE_DEVICE`` names a device
                this machine lacks, the models cannot be loaded, or the generator worker
                does not start. ``close()`` still cleans up what was opened.
        """
        self._setup_idle.clear()
        try:
            await self._prepare()
        finally:
            self._setup_idle.set()

    async def _prepare(self) -> None:
        if self._recovered is not None:
            return
        self.store = await self._open_store()
        await remove_unused(self.store, start_images_dir(self.settings.data_dir))
        self.executor = Executor(self.store, self.settings, self.presenter)
        try:
            self._recovered = await run_detached(self.executor.start())
        except WorkerError as error:
            raise StartupError(str(error)) from error

    async def _open_store(self) -> JobStore:
        try:
            return await JobStore.open(self.store_path)
        except (OSError, sqlite3.Error) as error:
            raise StartupError(
                f"Cannot open the database {self.store_path} (IMAGINE_DATA_DIR="
                f"{str(self.settings.data_dir)!r}): {error}. Point IMAGINE_DATA_DIR at a "
                "directory the bot may create and write."
            ) from error

    async def setup_hook(self) -> None:
        self._setup_idle.clear()
        try:
            await self._prepare()
            assert self._recovered is not None
            recovered, self._recovered = self._recovered, []

            self.add_dynamic_items(JobButton)
            await self._load_cogs()
            self.tree.on_error = self.on_app_command_error
            synced = await self.tree.sync()
            log.info("Synced %d slash commands", len(synced))
            await self.presenter.announce_recovered(recovered)
        finally:
            self._setup_idle.set()

    async def _load_cogs(self) -> None:
        from bot.cogs import config, imagine, info, queue

        for module in (imagine, queue, info, config):
            await module.setup(self)

    async def close(self) -> None:
        """Stop the executor, close the store and disconnect; later calls wait for the first."""
        if self._shutdown is None:
            # Shielded, so a caller cancelled mid-way (Ctrl-C in asyncio.run) does not cut
            # the shutdown short.
            self._shutdown = asyncio.ensure_future(self._close_once())
        await asyncio.shield(self._shutdown)

    async def _close_once(self) -> None:
        started = asyncio.get_running_loop().time()
        if not self._setup_idle.is_set():
            # prepare() or setup_hook is running (close() during start-up): let it finish
            # opening things. serve() cancels a prepare() that waits for the models.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._setup_idle.wait(), SETUP_WAIT_TIMEOUT_S)
        executor = getattr(self, "executor", None)
        if executor is not None:
            await executor.stop()
        store = getattr(self, "store", None)
        if store is not None:
            await store.close()
        await super().close()
        log.info("Closed in %.1f s", asyncio.get_running_loop().time() - started)

    # -- helpers the cogs share -------------------------------------------------------------

    def is_admin(self, interaction: discord.Interaction[Any]) -> bool:
        """Return whether the user may act on other people's jobs and change settings.

        Bot owners (``IMAGINE_OWNER_IDS``) always may; in a guild, so may members with the
        Manage Server permission.
        """
        if interaction.user.id in self.settings.owner_ids:
            return True
        return interaction.guild is not None and interaction.permissions.manage_guild

    @property
    def on_cpu(self) -> bool:
        """Whether the generator runs on a CPU, where defaults drop to the draft preset."""
        return self.executor.info().is_cpu

    async def guild_config(self, guild_id: int | None) -> dict[str, Any]:
        """Return the effective per-guild settings (operator defaults in direct messages)."""
        stored = await self.store.guild_settings(guild_id) if guild_id is not None else {}
        return guild_config.effective(stored, self.settings, self.on_cpu)

    def limits(self, config: dict[str, Any]) -> Limits:
        """Return the /imagine size and iteration limits of an effective guild config."""
        return Limits(
            default_size=config["default_size"],
            max_size=config["max_size"],
            default_iterations=config["default_iterations"],
            max_iterations=config["max_iterations"],
        )

    async def on_app_command_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError
    ) -> None:
        """Log an unexpected command failure and tell the user in one sentence."""
        command = interaction.command.qualified_name if interaction.command else "?"
        if isinstance(error, app_commands.CheckFailure) and interaction.response.is_done():
            # The check has already sent the user the reason, so this is no failure of the bot.
            log.info("/%s rejected for user %d: %s", command, interaction.user.id, error)
            return
        log.error(
            "/%s failed for user %d in guild %s",
            command,
            interaction.user.id,
            interaction.guild_id,
            exc_info=error,
        )
        message = "Something went wrong on the bot's side; the error is logged. Try again later."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(message, ephemeral=True)
            else:
                await interaction.response.send_message(message, ephemeral=True)
        except discord.HTTPException as reply_error:
            log.warning("Could not report the failure of /%s: %s", command, reply_error)


async def run_detached(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` as a task that starts from an empty ``contextvars`` context.

    The executor's tasks live as long as the bot and wait on the worker process. Started
    from the empty context, they inherit no context variables of the hook that created
    them. Test harnesses such as simcord mark the work of a bot's event handlers with a
    context variable and wait for it to settle, which these tasks never do.
    """
    loop = asyncio.get_running_loop()
    task = contextvars.Context().run(loop.create_task, coroutine)
    return await task


def on_shutdown_signals(stop: Callable[[str], None]) -> Callable[[], None]:
    """Call ``stop(signal_name)`` on SIGTERM and SIGINT instead of the default handlers.

    Must run inside the event loop; ``stop`` runs in it. Returns a function that restores
    the previous handlers. Where the loop cannot handle signals (Windows), nothing changes
    and a warning is logged: Ctrl-C then interrupts asyncio.run as usual.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in SHUTDOWN_SIGNALS:
        try:
            loop.add_signal_handler(signum, stop, signum.name)
        except (NotImplementedError, RuntimeError) as error:
            log.warning("Cannot handle %s for a graceful shutdown: %s", signum.name, error)
            continue
        installed.append(signum)

    def restore() -> None:
        for signum in installed:
            loop.remove_signal_handler(signum)

    return restore


async def serve(bot: ImagineBot, token: str) -> None:
    """Prepare ``bot``, log in and run until it is closed or gets SIGTERM or SIGINT.

    The store, the worker and the models are ready before the first request to Discord, so
    a start-up problem on this machine shows without a login. A signal during that stops the
    start-up. A later signal starts ``bot.close()``, so the executor takes no new job, the
    running job is requeued with its last saved state, the worker process exits and the
    gateway closes.

    Raises:
        StartupError: see :meth:`ImagineBot.prepare`.
        discord.LoginFailure, aiohttp.ClientError, discord.ConnectionClosed, ...: logging in
            or connecting failed in a way discord.py does not retry.
    """
    closing: list[asyncio.Task[None]] = []
    preparing: asyncio.Future[None] | None = None

    def stop(signal_name: str) -> None:
        if closing:
            log.info("Received %s again; the shutdown is already running", signal_name)
            return
        log.info("Received %s, shutting down", signal_name)
        if preparing is not None and not preparing.done():
            preparing.cancel()  # for example while models download
        closing.append(asyncio.ensure_future(bot.close()))

    restore = on_shutdown_signals(stop)
    try:
        async with bot:
            preparing = asyncio.ensure_future(bot.prepare())
            try:
                await preparing
            except asyncio.CancelledError:
                if not closing:
                    raise
                log.info("Start-up stopped")
                return
            await bot.start(token)
    finally:
        restore()


def create_bot(settings: Settings, *, store_path: Path | None = None) -> ImagineBot:
    """Build the bot. ``store_path`` overrides the database file in ``settings.data_dir``."""
    return ImagineBot(settings, store_path=store_path)
