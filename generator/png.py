"""PNG files with the generation settings stored as text chunks."""

from __future__ import annotations

import io
import os
from typing import IO, TYPE_CHECKING

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from generator.prompts import format_prompts

if TYPE_CHECKING:
    from generator.request import GenerationRequest

# The text keys written by generation_metadata, in file order.
METADATA_KEYS = (
    "prompt",
    "negative",
    "seed",
    "size",
    "iterations",
    "cutn",
    "vqgan",
    "clip",
    "version",
)


def generation_metadata(request: GenerationRequest, width: int, height: int) -> dict[str, str]:
    """Return the PNG text metadata of a ``width`` x ``height`` image made by ``request``.

    ``prompt`` and ``negative`` use the prompt grammar (``text:weight`` parts),
    ``size`` is ``WIDTHxHEIGHT`` and ``clip`` is comma-separated.
    """
    from generator import __version__

    positive, negative = format_prompts(request.prompts)
    return {
        "prompt": positive,
        "negative": negative,
        "seed": str(request.seed),
        "size": f"{width}x{height}",
        "iterations": str(request.iterations),
        "cutn": str(request.cutn),
        "vqgan": request.vqgan,
        "clip": ",".join(request.clip),
        "version": __version__,
    }


def save_png(
    image: Image.Image,
    path_or_file: str | os.PathLike[str] | IO[bytes],
    metadata: dict[str, str],
) -> None:
    """Write ``image`` as PNG with each metadata item as a text chunk.

    Latin-1 values become tEXt chunks; other text (emoji, CJK) becomes
    UTF-8 iTXt chunks, which ``read_png_metadata`` reads back the same way.
    The file contains no time stamp, so equal images and metadata give equal bytes.
    """
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    image.save(path_or_file, format="PNG", pnginfo=info)


def png_bytes(image: Image.Image, metadata: dict[str, str]) -> bytes:
    """Return ``image`` encoded as PNG with ``metadata``, as ``save_png`` writes it."""
    buffer = io.BytesIO()
    save_png(image, buffer, metadata)
    return buffer.getvalue()


def read_png_metadata(path_or_bytes: str | os.PathLike[str] | bytes | IO[bytes]) -> dict[str, str]:
    """Return the text chunks (tEXt, zTXt and iTXt) of a PNG file or its bytes."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        image.load()
        return {str(key): str(value) for key, value in image.text.items()}
