"""Start images: kept while a stored job names them, deleted when none does."""

import io

import pytest
from PIL import Image

from bot.start_images import (
    StartImageRejected,
    _convert_to_png,
    remove_if_unused,
    remove_unused,
)
from bot.store import JobStore, NewJob

GUILD = 100


def new_job(init_image: str | None) -> NewJob:
    request = {"prompts": [{"text": "a lighthouse", "weight": 1.0}], "init_image": init_image}
    return NewJob(guild_id=GUILD, channel_id=10, user_id=1, prompt="a lighthouse", request=request)


@pytest.fixture
async def store(tmp_path):
    store = await JobStore.open(tmp_path / "imagine.sqlite3")
    yield store
    await store.close()


@pytest.fixture
def inputs(tmp_path):
    directory = tmp_path / "inputs"
    directory.mkdir()
    return directory


async def test_remove_if_unused_keeps_named_file(store, inputs):
    used = inputs / "used.png"
    used.write_bytes(b"png")
    await store.enqueue(new_job(str(used)), 5, 100)

    assert not await remove_if_unused(store, str(used))
    assert used.exists()


async def test_remove_if_unused_deletes_orphan(store, inputs):
    orphan = inputs / "orphan.png"
    orphan.write_bytes(b"png")
    await store.enqueue(new_job(None), 5, 100)

    assert await remove_if_unused(store, str(orphan))
    assert not orphan.exists()
    assert not await remove_if_unused(store, None)


async def test_remove_unused_at_start_up(store, inputs):
    in_use = [inputs / "queued.png", inputs / "done.png"]
    orphans = [inputs / "rejected.png", inputs / "deleted-job.png"]
    for path in in_use + orphans:
        path.write_bytes(b"png")
    await store.enqueue(new_job(str(in_use[0])), 5, 100)
    finished, _ = await store.enqueue(new_job(str(in_use[1])), 5, 100)
    await store.cancel(finished.id, 1, admin=False, guild_id=GUILD)

    removed = await remove_unused(store, inputs)

    assert removed == len(orphans)
    assert all(path.exists() for path in in_use)
    assert not any(path.exists() for path in orphans)


async def test_remove_unused_without_directory(store, tmp_path):
    assert await remove_unused(store, tmp_path / "missing") == 0


def test_convert_keeps_first_frame_as_rgb(tmp_path):
    frames = [Image.new("P", (8, 6), colour) for colour in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    path = tmp_path / "inputs" / "start.png"

    _convert_to_png(buffer.getvalue(), "anim.gif", path)

    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.mode == "RGB"
        assert saved.size == (8, 6)


def test_convert_rejects_text(tmp_path):
    with pytest.raises(StartImageRejected, match=r"'notes\.txt' is not a picture I can read"):
        _convert_to_png(b"hello", "notes.txt", tmp_path / "start.png")
    assert not (tmp_path / "start.png").exists()
