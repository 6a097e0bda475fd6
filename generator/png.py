"""PNG files with the generation settings stored as text chunks.

Besides readable keys (``prompt``, ``seed``, ``lr`` ...), a PNG contains the
whole request as JSON, so ``request_from_png`` can rebuild the request and
generate the same picture again. File paths of input images are left out of
the file: only whether an init image was used and the image prompts' weights
are stored, and the caller passes the images back when rebuilding.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from generator.prompts import format_prompts
from generator.request import GenerationRequest, RequestError

# The text keys written by generation_metadata, in file order.
METADATA_KEYS = (
    "prompt",
    "negative",
    "seed",
    "size",
    "iterations",
    "cutn",
    "cut_pow",
    "lr",
    "optimizer",
    "vqgan",
    "clip",
    "version",
    "request",
    "image_inputs",
)
# Request fields that hold file paths, kept out of the ``request`` JSON.
PATH_FIELDS = ("init_image", "image_prompts")


def generation_metadata(request: GenerationRequest, width: int, height: int) -> dict[str, str]:
    """Return the PNG text metadata of a ``width`` x ``height`` image made by ``request``.

    ``prompt`` and ``negative`` use the prompt grammar (``text:weight`` parts),
    ``size`` is ``WIDTHxHEIGHT`` and ``clip`` is comma-separated. ``request``
    is ``request.to_dict()`` as JSON without the fields in PATH_FIELDS, and
    ``image_inputs`` is JSON ``{"init_image": bool, "image_prompt_weights": [...]}``.
    """
    from generator import __version__

    positive, negative = format_prompts(request.prompts)
    settings = {k: v for k, v in request.to_dict().items() if k not in PATH_FIELDS}
    image_inputs = {
        "init_image": request.init_image is not None,
        "image_prompt_weights": [weight for _path, weight in request.image_prompts],
    }
    return {
        "prompt": positive,
        "negative": negative,
        "seed": str(request.seed),
        "size": f"{width}x{height}",
        "iterations": str(request.iterations),
        "cutn": str(request.cutn),
        "cut_pow": repr(float(request.cut_pow)),
        "lr": repr(float(request.lr)),
        "optimizer": request.optimizer,
        "vqgan": request.vqgan,
        "clip": ",".join(request.clip),
        "version": __version__,
        "request": json.dumps(settings, ensure_ascii=False, sort_keys=True),
        "image_inputs": json.dumps(image_inputs, sort_keys=True),
    }


def request_from_metadata(
    metadata: dict[str, str],
    init_image: str | None = None,
    image_prompts: Sequence[str] = (),
) -> GenerationRequest:
    """Rebuild the GenerationRequest stored in a PNG's metadata by generation_metadata.

    Args:
        metadata: the PNG's text chunks, as read_png_metadata returns them.
        init_image: path of the init image, required when the picture had one.
        image_prompts: paths of the image prompts, one per stored weight, in
            the original order.

    Returns:
        A validated request equal to the original one, apart from the paths
        of input images, which are those passed here.

    Raises:
        RequestError: the metadata has no readable ``request`` entry, its values
            are invalid, or the images passed do not match the stored ones.
    """
    settings = _read_json(metadata, "request")
    inputs = _read_json(metadata, "image_inputs")
    if not isinstance(settings, dict) or not isinstance(inputs, dict):
        raise RequestError("The PNG's 'request' and 'image_inputs' entries must be JSON objects.")

    had_init_image = bool(inputs.get("init_image", False))
    if had_init_image and init_image is None:
        raise RequestError(
            "The picture was made from an init image, which the PNG does not contain: "
            "pass its path as init_image."
        )
    if not had_init_image and init_image is not None:
        raise RequestError("The picture was made without an init image: pass init_image=None.")

    try:
        weights = [float(weight) for weight in inputs.get("image_prompt_weights", [])]
    except (TypeError, ValueError) as error:
        raise RequestError(f"The PNG's image prompt weights are invalid: {error}") from error
    if len(image_prompts) != len(weights):
        raise RequestError(
            f"The picture was made with {len(weights)} image prompt(s), which the PNG does "
            f"not contain, but {len(image_prompts)} path(s) were given: pass one path per "
            "image prompt, in the original order."
        )

    values: dict[str, Any] = dict(settings)
    values["init_image"] = init_image
    pairs = zip(image_prompts, weights, strict=True)
    values["image_prompts"] = [[path, weight] for path, weight in pairs]
    try:
        request = GenerationRequest.from_dict(values)
    except (TypeError, ValueError) as error:
        raise RequestError(f"The PNG's 'request' entry is invalid: {error}") from error
    request.validate()
    return request


def request_from_png(
    path_or_bytes: str | os.PathLike[str] | bytes | IO[bytes],
    init_image: str | None = None,
    image_prompts: Sequence[str] = (),
) -> GenerationRequest:
    """Read a PNG written by save_png and rebuild its request; see request_from_metadata."""
    return request_from_metadata(read_png_metadata(path_or_bytes), init_image, image_prompts)


def _read_json(metadata: dict[str, str], key: str) -> Any:
    if key not in metadata:
        raise RequestError(
            f"The PNG has no '{key}' metadata, so its request cannot be rebuilt: it was "
            "written by another program or an older imagine version."
        )
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise RequestError(f"The PNG's '{key}' metadata is not valid JSON: {error}") from error


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
