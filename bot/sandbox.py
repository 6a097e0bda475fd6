"""``python -m bot --sandbox``: the real bot against simcord's simulated Discord.

The sandbox builds a guild with an #imagine channel, an admin (Manage Server) and a member,
and serves simcord's browser preview on 127.0.0.1, where anyone can type /imagine as one of
them. Nothing reaches Discord and no token is needed. The database, the pictures and any
tiny models live in a new temporary directory that is removed on exit (or in the directory
given with ``--data-dir``, which is kept), so the operator's data directory is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot.settings import Settings

if TYPE_CHECKING:
    from bot.client import ImagineBot

__all__ = ["real_weights_present", "run_sandbox"]

log = logging.getLogger(__name__)

# How often the preview page is republished, so progress edits made by the executor in the
# background show up without a click (seconds).
REFRESH_INTERVAL = 1.0
# Tiny models make noise pictures at any size; larger sizes only make the sandbox slower.
TINY_MAX_SIZE = 128
# How long the demo request waits for the executor's start-up speed measurement (seconds).
WARM_UP_WAIT_S = 60.0
DEMO_PROMPT = "a lighthouse at dusk, oil painting --no fog --iter 30"


def real_weights_present(settings: Settings) -> bool:
    """Return whether the configured VQGAN checkpoint is already on disk.

    CLIP weights are not checked: open_clip keeps them in its own cache.
    """
    configured = Path(settings.vqgan_model).expanduser()
    if configured.suffix == ".ckpt":
        return configured.is_file()
    assert settings.models_dir is not None
    return (settings.models_dir / f"{settings.vqgan_model}.ckpt").is_file()


def run_sandbox(
    settings: Settings,
    *,
    port: int | None = None,
    tiny: bool = False,
    prompt: str | None = None,
    data_dir: Path | None = None,
) -> int:
    """Run the sandbox until the preview page is closed, Ctrl-C or SIGTERM; return 0.

    ``prompt`` is sent as /imagine by the admin at start (default: ``DEMO_PROMPT`` with tiny
    models, nothing otherwise). A signal closes the bot gracefully, as ``python -m bot`` does.
    ``data_dir`` keeps the sandbox's files; without it they go to a temporary directory that
    is removed on exit. Returns 1 after one line on stderr if the bot cannot start.
    """
    try:
        # The preview renders messages with linkify_it and markdown_it, which simcord
        # imports only once it serves the page.
        import linkify_it  # noqa: F401
        import markdown_it  # noqa: F401
        import simcord  # noqa: F401
        from simcord.preview import Preview  # noqa: F401
    except ImportError as error:
        print(
            f"The sandbox needs simcord with its preview ({error}). "
            "Install it with: pip install 'simcord[preview]==3.2.1'"
        )
        return 2
    from bot.client import StartupError

    # Checked before the models load, which takes seconds to minutes.
    if port is not None and not _port_free(port):
        print(
            f"error: Port {port} on 127.0.0.1 is in use or not allowed. Choose another with "
            "--port, or leave --port out to use a free one.",
            file=sys.stderr,
        )
        return 1

    workdir = Path(data_dir) if data_dir is not None else None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="imagine-sandbox-"))
        note = "a temporary directory, removed on exit; keep it with --data-dir DIR"
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        note = "kept on exit"
    print(f"Sandbox data in {workdir} ({note})", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run(settings, workdir, port=port, tiny=tiny, prompt=prompt))
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _port_free(port: int) -> bool:
    """Return whether a server could listen on ``port`` of 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # asyncio servers set SO_REUSEADDR on Unix, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _run(
    settings: Settings, workdir: Path, *, port: int | None, tiny: bool, prompt: str | None
) -> None:
    from bot.client import on_shutdown_signals

    stop_requested = asyncio.Event()

    def stop(signal_name: str) -> None:
        log.info("Received %s, closing the sandbox", signal_name)
        stop_requested.set()

    restore_signals = on_shutdown_signals(stop)
    try:
        await _run_bot(
            settings, workdir, port=port, tiny=tiny, prompt=prompt, stop_requested=stop_requested
        )
    finally:
        restore_signals()


async def _run_bot(
    settings: Settings,
    workdir: Path,
    *,
    port: int | None,
    tiny: bool,
    prompt: str | None,
    stop_requested: asyncio.Event,
) -> None:
    import simcord

    from bot.client import create_bot

    tiny = tiny or not real_weights_present(settings)
    settings = await _sandbox_settings(settings, workdir, tiny)
    bot = create_bot(settings)

    # Errors the bot handles are logged; the sandbox does not fail on them as a test would.
    try:
        async with simcord.run(bot, check_errors=False) as env:
            try:
                await _open_page(env, bot, port, tiny, prompt, stop_requested)
            finally:
                await bot.close()
    finally:
        # A start-up failure raises from simcord.run itself, and the bot still needs closing
        # then: its store and worker are open. A second close() waits for the first.
        await bot.close()
        log.info("Sandbox closed")


async def _open_page(
    env: Any,
    bot: ImagineBot,
    port: int | None,
    tiny: bool,
    prompt: str | None,
    stop_requested: asyncio.Event,
) -> None:
    """Build the guild, send the first /imagine and serve the preview until it is closed."""
    guild = env.create_guild("imagine sandbox")
    admins = guild.create_role("Admins", permissions=discord.Permissions(manage_guild=True))
    channel = guild.create_text_channel("imagine")
    ada = guild.add_member(env.create_user("ada", global_name="Ada (admin)"), roles=[admins])
    bob = guild.add_member(env.create_user("bob", global_name="Bob"))
    if prompt is None and tiny:
        # Tiny models finish in seconds, so the page opens on a finished example.
        prompt = DEMO_PROMPT
    if prompt is not None:
        # Measured speed first, so the demo's "Queued ... about N min" fits this machine.
        await bot.executor.wait_warmed_up(WARM_UP_WAIT_S)
        await ada.slash(channel, "imagine", prompt=prompt)

    preview = env.preview(channel, viewers=[ada, bob], layout="channel", port=port)
    async with preview:
        print(ready_text(preview.url, prompt), flush=True)
        await _refresh_until_closed(preview, stop_requested)


def ready_text(url: str, prompt: str | None) -> str:
    """Return what the sandbox prints once its page is up: the URL, set apart from the log."""
    lines = [
        "",
        "Sandbox ready. Open this address in a browser, all of it: the part after # is the",
        "page's key, and without it the page shows an empty 'Unavailable channel'.",
        "",
        f"    {url}",
        "",
    ]
    if prompt is not None:
        lines.append(f"Ada (admin) has asked for a first picture: /imagine prompt:{prompt}")
    lines += ["Type /imagine in the page as Ada or Bob.", "Press Ctrl-C here to stop.", ""]
    return "\n".join(lines)


async def _sandbox_settings(settings: Settings, workdir: Path, tiny: bool) -> Settings:
    """Return the settings of the sandbox bot: data in ``workdir``, tiny models if ``tiny``."""
    if not tiny:
        return settings.replace(data_dir=workdir, models_dir=settings.models_dir)

    from generator.testing import build_tiny_models

    print("Using tiny random-weight models: pictures are noise, but take seconds.")
    models = await asyncio.to_thread(build_tiny_models, workdir / "models")
    return settings.replace(
        data_dir=workdir,
        models_dir=workdir / "models",
        vqgan_model=models.vqgan,
        clip_models=(models.clip,),
        device="cpu",
        max_size=min(settings.max_size, TINY_MAX_SIZE),
    )


async def _refresh_until_closed(preview: object, stop_requested: asyncio.Event) -> None:
    from simcord import SetupError

    closed = asyncio.ensure_future(preview.wait_closed())  # type: ignore[attr-defined]
    stopping = asyncio.ensure_future(stop_requested.wait())
    try:
        while not closed.done() and not stopping.done():
            await asyncio.wait({closed, stopping}, timeout=REFRESH_INTERVAL)
            if closed.done() or stopping.done():
                break
            try:
                await preview.refresh()  # type: ignore[attr-defined]
            except SetupError:
                # A click or command from the page is running; the page updates after it.
                continue
            except TimeoutError as error:
                log.warning("Preview refresh timed out: %s", error)
    finally:
        closed.cancel()
        stopping.cancel()
