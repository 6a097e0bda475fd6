"""The presenter's throttled progress editor and upload encoding, below the Discord layer.

The editor runs with real asyncio-throttle throttlers on short intervals; the edit call is a
recorder that can raise discord.py's rate-limit and server errors.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from types import SimpleNamespace

import discord
import pytest
from asyncio_throttle import Throttler
from PIL import Image

from bot.presenter import ProgressEditor, encode_for_upload, retry_after_seconds


class Recorder:
    """An edit call that records (time, frame) and raises the queued errors first."""

    def __init__(self, errors: list[Exception] | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple[float, int]] = []
        self.errors = list(errors or [])
        self.delay = delay

    async def __call__(self, frame: int) -> None:
        self.calls.append((time.monotonic(), frame))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.errors:
            raise self.errors.pop(0)


def http_error(status: int, headers: dict[str, str] | None = None) -> discord.HTTPException:
    response = SimpleNamespace(status=status, reason="test", headers=headers or {})
    return discord.HTTPException(response, {"message": "test", "code": 0})


def make_editor(edit, interval=0.2, channel: Throttler | None = None, errors=None):
    errors = errors if errors is not None else []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    return ProgressEditor(
        edit, Throttler(1, interval), channel or Throttler(100, 1.0), on_error
    )


async def test_stale_frames_dropped():
    edit = Recorder()
    # Ten submissions take about 0.1 s, well inside one interval even on a loaded machine.
    editor = make_editor(edit, interval=1.0)

    for frame in range(10):
        editor.submit(frame)
        await asyncio.sleep(0.01)
    await editor.wait_idle()

    frames = [frame for _, frame in edit.calls]
    assert frames[0] == 0
    assert frames[-1] == 9
    assert len(frames) == 2
    assert editor.dropped == 8


async def test_message_interval_respected():
    edit = Recorder()
    editor = make_editor(edit, interval=0.15)

    for frame in range(6):
        editor.submit(frame)
        await asyncio.sleep(0.1)
    await editor.wait_idle()

    times = [moment for moment, _ in edit.calls]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) >= 3
    assert min(gaps) >= 0.14
    assert edit.calls[-1][1] == 5


async def test_channel_throttle_shared():
    edit_a, edit_b = Recorder(), Recorder()
    channel = Throttler(2, 0.5)
    editor_a = make_editor(edit_a, interval=0.01, channel=channel)
    editor_b = make_editor(edit_b, interval=0.01, channel=channel)

    start = time.monotonic()
    for frame in range(3):
        editor_a.submit(frame)
        editor_b.submit(frame)
        await asyncio.sleep(0.05)
    await asyncio.gather(editor_a.wait_idle(), editor_b.wait_idle())

    times = sorted(moment - start for moment, _ in edit_a.calls + edit_b.calls)
    in_first_period = [moment for moment in times if moment < 0.45]
    assert len(in_first_period) <= 2
    assert len(times) >= 3


async def test_rate_limited_retries_after():
    edit = Recorder(errors=[discord.RateLimited(0.3)])
    editor = make_editor(edit, interval=0.01)

    editor.submit(1)
    await editor.wait_idle()

    assert [frame for _, frame in edit.calls] == [1, 1]
    assert edit.calls[1][0] - edit.calls[0][0] >= 0.29
    assert editor.sent == 1


async def test_http_429_retries_newest_frame():
    edit = Recorder(errors=[http_error(429, {"Retry-After": "0.2"})])
    editor = make_editor(edit, interval=0.01)

    editor.submit(1)
    await asyncio.sleep(0.05)
    editor.submit(2)
    await editor.wait_idle()

    assert [frame for _, frame in edit.calls] == [1, 2]
    assert edit.calls[1][0] - edit.calls[0][0] >= 0.19


async def test_server_error_drops_frame_only():
    errors: list[Exception] = []
    edit = Recorder(errors=[http_error(503)])
    editor = make_editor(edit, interval=0.01, errors=errors)

    editor.submit(1)
    await editor.wait_idle()
    editor.submit(2)
    await editor.wait_idle()

    assert [frame for _, frame in edit.calls] == [1, 2]
    assert len(errors) == 1
    assert errors[0].status == 503
    assert editor.sent == 1


async def test_aclose_lets_edit_finish():
    edit = Recorder(delay=0.2)
    editor = make_editor(edit, interval=0.01)

    editor.submit(1)
    await asyncio.sleep(0.05)
    editor.submit(2)
    await editor.aclose()
    editor.submit(3)
    await asyncio.sleep(0.05)

    assert [frame for _, frame in edit.calls] == [1]
    assert editor.sent == 1


def test_retry_after_values():
    assert retry_after_seconds(discord.RateLimited(1.5)) == 1.5
    assert retry_after_seconds(http_error(429, {"Retry-After": "2"})) == 2.0
    assert retry_after_seconds(http_error(429)) == 5.0
    assert retry_after_seconds(http_error(500)) is None
    assert retry_after_seconds(ValueError()) is None


def noise_png(side: int) -> bytes:
    image = Image.effect_noise((side, side), 100).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_upload_keeps_small_png():
    png = noise_png(32)

    data, extension = encode_for_upload(png, 10 * 2**20)

    assert extension == "png"
    assert data == png


def test_upload_shrinks_large_png():
    png = noise_png(256)
    limit = len(png) // 4

    data, extension = encode_for_upload(png, limit)

    assert extension == "jpg"
    assert len(data) <= limit
    assert Image.open(io.BytesIO(data)).format == "JPEG"


def test_upload_impossible_limit():
    with pytest.raises(ValueError):
        encode_for_upload(noise_png(64), 100)
