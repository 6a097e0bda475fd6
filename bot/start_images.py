"""Start images uploaded with /imagine: checked, converted to PNG, kept while a job needs them.

An upload is saved under ``IMAGINE_DATA_DIR/inputs`` before its job is queued, and the job's
request stores the file's path. Re-roll and Reproduce copy that path into new jobs, so a file
stays as long as any stored job names it. It is deleted with the last such job, when the
request that uploaded it is not queued after all, and at start-up when no job names it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import discord
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from bot.store import JobStore

__all__ = [
    "MAX_INIT_IMAGE_BYTES",
    "MAX_INIT_IMAGE_SIDE",
    "StartImageRejected",
    "remove_if_unused",
    "remove_unused",
    "save_start_image",
    "start_images_dir",
]

log = logging.getLogger(__name__)

# Largest start image accepted, in bytes and in pixels.
MAX_INIT_IMAGE_BYTES = 8 * 1024 * 1024
MAX_INIT_IMAGE_SIDE = 4096
MAX_INIT_IMAGE_PIXELS = MAX_INIT_IMAGE_SIDE * MAX_INIT_IMAGE_SIDE
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
# Pillow opens only these formats here: others (EPS runs Ghostscript) are never tried.
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Pillow refuses to open images over twice this many pixels (DecompressionBombError) before
# decoding anything, so a small file that claims huge dimensions costs no memory. Set here
# rather than left to Pillow's default, which is 89 megapixels.
Image.MAX_IMAGE_PIXELS = MAX_INIT_IMAGE_PIXELS


class StartImageRejected(ValueError):
    """An upload that cannot be a start image; the message is the sentence for the user."""


def start_images_dir(data_dir: Path) -> Path:
    """Return the directory of the start images under ``data_dir``."""
    return Path(data_dir) / "inputs"


async def save_start_image(attachment: discord.Attachment, directory: Path) -> str:
    """Download, check and save an uploaded start image in ``directory``; return its path.

    Raises:
        StartImageRejected: the file is empty, too large, not a PNG, JPEG, WebP or GIF
            picture, over 4096×4096 pixels, damaged, or cannot be downloaded.
    """
    if attachment.size == 0:
        raise StartImageRejected(
            f"The image {attachment.filename!r} is an empty file. Upload the picture again."
        )
    if attachment.size > MAX_INIT_IMAGE_BYTES:
        raise StartImageRejected(
            f"The image {attachment.filename!r} is {attachment.size / 2**20:.1f} MiB; the limit "
            f"is {MAX_INIT_IMAGE_BYTES // 2**20} MiB. Upload a smaller PNG or JPEG."
        )
    content_type = (attachment.content_type or "").split(";")[0].strip()
    # Files without a known type come as octet-stream: Pillow decides for those.
    if content_type not in ("", "application/octet-stream", *IMAGE_TYPES):
        raise StartImageRejected(
            f"{attachment.filename!r} is not a picture ({content_type}). "
            "Upload a PNG, JPEG, WebP or GIF file."
        )
    try:
        data = await attachment.read()
    except discord.HTTPException as error:
        log.warning("Could not download attachment %s: %s", attachment.id, error)
        raise StartImageRejected(
            f"I could not download {attachment.filename!r}. Upload it again."
        ) from None

    path = directory / f"{uuid.uuid4().hex}.png"
    await asyncio.to_thread(_convert_to_png, data, attachment.filename, path)
    return str(path)


def _convert_to_png(data: bytes, filename: str, path: Path) -> None:
    """Decode the first frame of an uploaded picture and save it as an RGB PNG at ``path``."""
    too_large = StartImageRejected(
        f"The image {filename!r} is over {MAX_INIT_IMAGE_SIDE}×{MAX_INIT_IMAGE_SIDE} pixels, "
        "the most I accept. Upload a smaller picture."
    )
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except Image.DecompressionBombError:
        raise too_large from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise StartImageRejected(
            f"{filename!r} is not a picture I can read. Upload a PNG, JPEG, WebP or GIF file."
        ) from None

    with image:
        if image.width * image.height > MAX_INIT_IMAGE_PIXELS:
            raise StartImageRejected(
                f"The image {filename!r} is {image.width}×{image.height} pixels; the limit is "
                f"{MAX_INIT_IMAGE_SIDE}×{MAX_INIT_IMAGE_SIDE}. Upload a smaller picture."
            )
        try:
            image.seek(0)
            rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as error:
            log.info("Could not decode the uploaded image %r: %s", filename, error)
            raise StartImageRejected(
                f"The image {filename!r} is damaged or cut short, so I cannot read it. "
                "Save it again and upload the new file."
            ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(path, "PNG")


async def remove_if_unused(store: JobStore, path: str | None) -> bool:
    """Delete the start image at ``path`` unless a stored job names it; return whether it did.

    A Re-roll that copies the path in the moment between the check and the deletion gets a
    job whose start image is missing, and that job fails with a message.
    """
    if path is None or await store.start_image_in_use(path):
        return False
    await asyncio.to_thread(Path(path).unlink, missing_ok=True)
    log.info("Removed the start image %s, which no job uses any more", path)
    return True


async def remove_unused(store: JobStore, directory: Path) -> int:
    """Delete the files in ``directory`` that no stored job names; return how many it deleted.

    Meant for start-up, before the bot takes requests: a request being queued at the same
    time would lose its upload.
    """
    in_use = await store.start_images_in_use()
    removed = await asyncio.to_thread(_remove_files_except, directory, in_use)
    if removed:
        log.info("Removed %d start image(s) in %s that no job uses", removed, directory)
    return removed


def _remove_files_except(directory: Path, keep: set[str]) -> int:
    if not directory.is_dir():
        return 0
    keep_resolved = {Path(path).resolve() for path in keep}
    removed = 0
    for path in directory.iterdir():
        if path.is_file() and path.resolve() not in keep_resolved:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
