"""``python -m bot --sandbox``: the real bot against simcord's simulated Discord.

The sandbox builds a guild with an #imagine channel, an admin (Manage Server) and a member,
and serves simcord's browser preview on 127.0.0.1, where anyone can type /imagine as one of
them. Nothing reaches Discord and no token is needed. The database and any tiny models live
in a new temporary directory, so the operator's data directory is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from pathlib import Path

import discord

from bot.settings import Settings

__all__ = ["real_weights_present", "run_sandbox"]

log = logging.getLogger(__name__)

# How often the preview page is republished, so progress edits made by the executor in the
# background show up without a click (seconds).
REFRESH_INTERVAL = 1.0
# Tiny models make noise pictures at any size; larger sizes only make the sandbox slower.
TINY_MAX_SIZE = 128
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
    settings: Settings, *, port: int | None = None, tiny: bool = False, prompt: str | None = None
) -> int:
    """Run the sandbox until the preview page is closed, Ctrl-C or SIGTERM; return 0.

    ``prompt`` is sent as /imagine by the admin at start (default: ``DEMO_PROMPT`` with tiny
    models, nothing otherwise). A signal closes the bot gracefully, as ``python -m bot`` does.
    """
    try:
        import simcord  # noqa: F401
        from simcord.preview import Preview  # noqa: F401
    except ImportError as error:
        print(
            f"The sandbox needs simcord with its preview ({error}). "
            "Install it with: pip install 'simcord[preview]==3.2.1'"
        )
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(settings, port=port, tiny=tiny, prompt=prompt))
    return 0


async def _run(settings: Settings, *, port: int | None, tiny: bool, prompt: str | None) -> None:

    from bot.client import on_shutdown_signals

    stop_requested = asyncio.Event()

    def stop(signal_name: str) -> None:
        log.info("Received %s, closing the sandbox", signal_name)
        stop_requested.set()

    restore_signals = on_shutdown_signals(stop)
    try:
        await _run_bot(settings, port=port, tiny=tiny, prompt=prompt, stop_requested=stop_requested)
    finally:
        restore_signals()


async def _run_bot(
    settings: Settings,
    *,
    port: int | None,
    tiny: bool,
    prompt: str | None,
    stop_requested: asyncio.Event,
) -> None:
    import simcord

    from bot.client import create_bot

    workdir = Path(tempfile.mkdtemp(prefix="imagine-sandbox-"))
    tiny = tiny or not real_weights_present(settings)
    settings = await _sandbox_settings(settings, workdir, tiny)
    bot = create_bot(settings)
    print(f"Sandbox data in {workdir}", flush=True)

    # Errors the bot handles are logged; the sandbox does not fail on them as a test would.
    async with simcord.run(bot, check_errors=False) as env:
        try:
            guild = env.create_guild("imagine sandbox")
            admins = guild.create_role(
                "Admins", permissions=discord.Permissions(manage_guild=True)
            )
            channel = guild.create_text_channel("imagine")
            ada = guild.add_member(
                env.create_user("ada", global_name="Ada (admin)"), roles=[admins]
            )
            bob = guild.add_member(env.create_user("bob", global_name="Bob"))
            if prompt is None and tiny:
                # Tiny models finish in seconds, so the page opens on a finished example.
                prompt = DEMO_PROMPT
            if prompt is not None:
                await ada.slash(channel, "imagine", prompt=prompt)

            preview = env.preview(channel, viewers=[ada, bob], layout="channel", port=port)
            async with preview:
                print(f"Sandbox ready: open {preview.url}", flush=True)
                print("Type /imagine in the page; press Ctrl-C here to stop.", flush=True)
                await _refresh_until_closed(preview, stop_requested)
        finally:
            await bot.close()
            log.info("Sandbox closed")


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
