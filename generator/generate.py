"""CLIP-guided VQGAN optimisation: turn a GenerationRequest into a picture.

The method is Katherine Crowson's 2021 VQGAN+CLIP notebook. A VQGAN latent z
starts from random codebook vectors (or an encoded init image). Each iteration
quantises z with a straight-through gradient, decodes it and cuts random
augmented crops. Each CLIP model embeds the crops, and an optimiser step moves
those embeddings toward the positive prompts and away from the negative ones
(spherical distance). After the step z is clamped to the codebook's
per-channel range.

Determinism: all randomness comes from torch's generators, seeded from
``request.seed`` inside ``torch.random.fork_rng``, and the caller's generator
state is restored afterwards. On the CPU the same request, models, thread count
and torch build give identical pixels (the tests check this). On CUDA the
result is not guaranteed bit for bit, because some CUDA kernels used here
(cuDNN convolution backward, adaptive max pooling backward) are
nondeterministic according to PyTorch's reproducibility notes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from generator.cutouts import MakeCutouts, normalize
from generator.losses import PromptTarget, clamp_with_grad, quantize_latent
from generator.prompts import check_prompt_length
from generator.request import GenerationRequest, RequestError, canonical_optimizer

if TYPE_CHECKING:
    from generator.models import Clip, Models

logger = logging.getLogger(__name__)

STATE_FORMAT = 1

# Init and image prompts over this many pixels are rejected before decoding. Pillow raises
# DecompressionBombError at twice its MAX_IMAGE_PIXELS, so a small file that claims huge
# dimensions is refused without allocating them.
MAX_INPUT_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS // 2

# An estimate of the memory one fp32 optimisation step needs beyond the loaded
# models. The decoder's activations kept for the backward pass grow with the
# pixel count, and CLIP's grow with the cutouts times the square of its input
# side. The constants fit the peak resident memory of vqgan_imagenet_f16_16384
# with CLIP ViT-B/32 on a 2-core CPU: 4.1 GB at 256x256 with 32 cutouts and
# 2.6 GB at 128x128 with 16 cutouts, leaving about 1.9 GB for models and runtime.
# NOTE: two measurements cannot separate the three terms, so the per-cutout cost
# is an assumed value and the GPU figures are not measured.
BYTES_PER_PIXEL = 25_000
BYTES_PER_CUTOUT_224 = 16_000_000


class CancelEvent(Protocol):
    """Anything with ``is_set()``, such as ``threading.Event``."""

    def is_set(self) -> bool: ...


@dataclass
class Progress:
    """The state of a generation after an iteration.

    ``iteration`` counts the iterations done (1-based) out of ``total``.
    ``losses`` maps each prompt's label (its text, or ``image:PATH`` for an
    image prompt) to its loss, summed over CLIP models. ``image`` is set every
    ``request.progress_every`` iterations and after the last one.
    """

    iteration: int
    total: int
    losses: dict[str, float]
    image: Image.Image | None = None


class GenerationCancelled(Exception):
    """Raised by ``generate`` when its cancel event is set; ``iteration`` is the number done."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"Generation cancelled after {iteration} iterations.")
        self.iteration = iteration


@dataclass
class _Guide:
    """One CLIP model with its cutout maker and the targets embedded by it."""

    clip: Clip
    cutouts: MakeCutouts
    targets: list[PromptTarget] = field(default_factory=list)


def generate(
    request: GenerationRequest,
    progress: Callable[[Progress], None] | None = None,
    cancel: CancelEvent | None = None,
    *,
    models: Models | None = None,
    device: str | torch.device | None = None,
    resume: dict[str, Any] | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
    threads: int | None = None,
    models_dir: str | os.PathLike[str] | None = None,
) -> Image.Image:
    """Generate the picture described by ``request`` and return it as an RGB image.

    Args:
        request: prompts, seed and settings. The size is rounded to a multiple
            of the VQGAN's factor (with a logged warning).
        progress: called after every iteration with a ``Progress``.
        cancel: checked before every iteration. Once set, ``GenerationCancelled``
            is raised before the next step starts.
        models: models from ``load_models``, kept loaded by the caller. When
            None, the models named in the request are loaded from ``models_dir``.
        device: "cpu", "cuda:N" or "auto". Defaults to the device of ``models``.
        resume: a state passed to ``on_state`` by an earlier run of the same
            request. The run continues from that iteration, and on the CPU the
            result is byte-identical to an uninterrupted run.
        on_state: called every ``request.progress_every`` iterations (not after
            the last), and once more when ``cancel`` stops the run between two
            of those, with a dict that ``save_state`` can store.
        threads: CPU threads for torch. Defaults to the cores this process may
            use; the previous setting is restored afterwards.
        models_dir: where models are looked up when ``models`` is None.

    Raises:
        RequestError: invalid settings, unreadable images, a resume state of
            another request, or a size that does not fit in the device's memory.
        PromptError: a prompt longer than CLIP's context.
        ModelError: a model could not be loaded.
        GenerationCancelled: ``cancel`` was set.
    """
    request.validate()
    optimizer_name = canonical_optimizer(request.optimizer)
    if threads is not None and threads < 1:
        raise ValueError(f"threads is {threads}: use 1 or more, or None for all usable cores.")
    torch_device = _pick_device(models, device)
    if models is None:
        from generator.models import load_models

        models = load_models(request.vqgan, request.clip, torch_device, models_dir=models_dir)

    for clip in models.clips:
        check_prompt_length(request.prompts, clip.tokenizer)
    width, height = round_size(request.width, request.height, models.vqgan.factor)
    check_memory(width, height, request.cutn, [c.input_size for c in models.clips], torch_device)

    with _cpu_threads(torch_device, threads), _seeded(request.seed, torch_device):
        run = _Run(request, models, torch_device, width, height, optimizer_name)
        run.start(resume)
        return run.loop(progress, cancel, on_state)


def _pick_device(models: Models | None, device: str | torch.device | None) -> torch.device:
    """Resolve ``device``, which must match the device of ``models`` when both are given."""
    from generator.models import resolve_device

    if models is None:
        return resolve_device(str(device) if device is not None else "auto")
    loaded = torch.device(models.device)
    if device is not None and resolve_device(str(device)) != loaded:
        raise RequestError(
            f"The models are loaded on {loaded}, but device {device} was requested: "
            "load the models on that device or leave out the device."
        )
    return loaded


def round_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """Round a size in pixels to the nearest multiples of ``factor`` (at least one cell).

    The VQGAN decodes one latent cell into ``factor`` x ``factor`` pixels, so
    other sizes cannot be made. A changed size is logged as a warning.
    """
    rounded = tuple(max(factor, round(side / factor) * factor) for side in (width, height))
    if rounded != (width, height):
        logger.warning(
            "Size %dx%d is not a multiple of %d pixels: generating %dx%d instead.",
            width,
            height,
            factor,
            *rounded,
        )
    return rounded[0], rounded[1]


def estimate_memory(width: int, height: int, cutn: int, clip_input_sizes: list[int]) -> int:
    """Estimate the bytes one step needs beyond the loaded models (see BYTES_PER_PIXEL)."""
    pixels = width * height * BYTES_PER_PIXEL
    cutouts = sum(cutn * BYTES_PER_CUTOUT_224 * (size / 224) ** 2 for size in clip_input_sizes)
    return int(pixels + cutouts)


def check_memory(
    width: int, height: int, cutn: int, clip_input_sizes: list[int], device: torch.device
) -> None:
    """Reject a size whose estimated memory exceeds what ``device`` has free.

    On the CPU the limit is the kernel's MemAvailable (and the cgroup's limit
    in a container); on CUDA it is the device's free memory. Where neither can
    be read, nothing is checked.

    Raises:
        RequestError: with the estimate, the free memory and what to change.
    """
    needed = estimate_memory(width, height, cutn, clip_input_sizes)
    available = available_memory(device)
    if available is None or needed <= available:
        return
    raise RequestError(
        f"{width}x{height} pixels with {cutn} cutouts needs about {needed / 2**30:.1f} GiB of "
        f"memory, but only {available / 2**30:.1f} GiB is free on {device}: use a smaller "
        "size or fewer cutouts."
    )


def available_memory(device: torch.device) -> int | None:
    """Return the free memory of ``device`` in bytes, or None where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None

    candidates = []
    meminfo = _read_text("/proc/meminfo")
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            candidates.append(int(line.split()[1]) * 1024)
    limit = _read_text("/sys/fs/cgroup/memory.max")
    usage = _read_text("/sys/fs/cgroup/memory.current")
    if limit and usage and limit.strip().isdigit():
        candidates.append(int(limit) - int(usage))
    return min(candidates) if candidates else None


def request_fingerprint(request: GenerationRequest) -> str:
    """Return a hash of every setting that changes the result (all but ``progress_every``)."""
    data = request.to_dict()
    data.pop("progress_every")
    encoded = json.dumps(data, sort_keys=True, allow_nan=False).encode()
    return hashlib.sha256(encoded).hexdigest()


class _Run:
    """The tensors and settings of one generation between ``start`` and the end of ``loop``."""

    def __init__(
        self,
        request: GenerationRequest,
        models: Models,
        device: torch.device,
        width: int,
        height: int,
        optimizer_name: str,
    ) -> None:
        self.request = request
        self.vqgan = models.vqgan
        self.device = device
        self.width = width
        self.height = height
        self.optimizer_name = optimizer_name
        self.codebook = self.vqgan.codebook.detach()
        self.z_min = self.codebook.min(dim=0).values.view(1, -1, 1, 1)
        self.z_max = self.codebook.max(dim=0).values.view(1, -1, 1, 1)
        self.guides = [
            _Guide(clip, MakeCutouts(clip.input_size, request.cutn, request.cut_pow))
            for clip in models.clips
        ]
        self.iteration = 0
        self.z: Tensor
        self.optimizer: torch.optim.Optimizer

    def start(self, resume: dict[str, Any] | None) -> None:
        """Embed the prompts and set up z and the optimiser, fresh or from ``resume``."""
        self._embed_targets()
        z = self._initial_latent() if resume is None else self._check_resume(resume)
        self.z = z.to(self.device).requires_grad_(True)
        optimizer_class = getattr(torch.optim, self.optimizer_name)
        self.optimizer = optimizer_class([self.z], lr=self.request.lr)
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.iteration = int(resume["iteration"])
            _set_rng_states(resume, self.device)

    def loop(
        self,
        progress: Callable[[Progress], None] | None,
        cancel: CancelEvent | None,
        on_state: Callable[[dict[str, Any]], None] | None,
    ) -> Image.Image:
        """Run the remaining iterations and return the final image."""
        total = self.request.iterations
        every = self.request.progress_every
        final: Image.Image | None = None
        started = time.perf_counter()
        first = self.iteration
        saved = self.iteration

        while self.iteration < total:
            if cancel is not None and cancel.is_set():
                # Hand over the work done since the last periodic state, so that a job
                # stopped for a shutdown resumes where it stopped.
                if on_state is not None and self.iteration != saved:
                    on_state(self.state())
                raise GenerationCancelled(self.iteration)
            losses = self._step()
            self.iteration += 1

            done = self.iteration == total
            if progress is not None:
                show = done or (every > 0 and self.iteration % every == 0)
                image = self.decode() if show else None
                final = image if done else None
                progress(Progress(self.iteration, total, losses, image))
            if on_state is not None and every > 0 and self.iteration % every == 0 and not done:
                on_state(self.state())
                saved = self.iteration

        elapsed = time.perf_counter() - started
        logger.info(
            "Generated %dx%d in %d iterations (%.2f s/iteration).",
            self.width,
            self.height,
            self.iteration - first,
            elapsed / max(1, self.iteration - first),
        )
        return final if final is not None else self.decode()

    def _step(self) -> dict[str, float]:
        """Take one optimiser step and return each prompt's loss before it."""
        self.optimizer.zero_grad(set_to_none=True)
        image = self._render(self.z)

        terms: dict[str, Tensor] = {}
        for guide in self.guides:
            batch = normalize(guide.cutouts(image), guide.clip.mean, guide.clip.std)
            embeddings = guide.clip.encode_image(batch)
            for target in guide.targets:
                loss = target.loss(embeddings)
                if target.label in terms:
                    loss = terms[target.label] + loss
                terms[target.label] = loss
        total = torch.stack(list(terms.values())).sum()
        total.backward()
        self.optimizer.step()

        # Keep z inside the box spanned by the codebook, where decoding is meaningful.
        with torch.no_grad():
            self.z.copy_(torch.maximum(torch.minimum(self.z, self.z_max), self.z_min))
        values = torch.stack(list(terms.values())).detach().cpu().tolist()
        return dict(zip(terms, values, strict=True))

    def _render(self, z: Tensor) -> Tensor:
        """Decode z into an image (1, 3, H, W) in [0, 1], differentiably."""
        decoded = self.vqgan.decode(quantize_latent(z, self.codebook))
        return clamp_with_grad(decoded.add(1).div(2), 0.0, 1.0)

    def decode(self) -> Image.Image:
        """Return the current z as an RGB image."""
        with torch.no_grad():
            pixels = self._render(self.z.detach())[0]
        array = pixels.mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array, "RGB")

    def state(self) -> dict[str, Any]:
        """Return a detached CPU copy of everything needed to continue this run."""
        return {
            "format": STATE_FORMAT,
            "iteration": self.iteration,
            "fingerprint": request_fingerprint(self.request),
            "z": self.z.detach().cpu().clone(),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device)
            if self.device.type == "cuda"
            else None,
        }

    def _embed_targets(self) -> None:
        text_prompts = self.request.prompts
        image_prompts = [
            (path, weight, _load_rgb(path, "image prompt"))
            for path, weight in self.request.image_prompts
        ]
        for guide in self.guides:
            with torch.no_grad():
                if text_prompts:
                    embeddings = guide.clip.encode_text([p.text for p in text_prompts])
                    for prompt, embedding in zip(text_prompts, embeddings, strict=True):
                        guide.targets.append(
                            PromptTarget(prompt.text, embedding.float(), prompt.weight, prompt.stop)
                        )
                for path, weight, image in image_prompts:
                    embedding = self._embed_image(guide.clip, image)
                    guide.targets.append(PromptTarget(f"image:{path}", embedding, weight))

    def _embed_image(self, clip: Clip, image: Image.Image) -> Tensor:
        """Embed the centre square of ``image``, resized to CLIP's input size."""
        side = clip.input_size
        square = _resize_cover(image, side, side)
        batch = normalize(_to_tensor(square, self.device), clip.mean, clip.std)
        return clip.encode_image(batch)[0].float()

    def _initial_latent(self) -> Tensor:
        """Return z from the init image, or from random codebook vectors (seeded)."""
        cells = (self.height // self.vqgan.factor, self.width // self.vqgan.factor)
        if self.request.init_image is not None:
            image = _load_rgb(self.request.init_image, "init image")
            pixels = _to_tensor(_resize_cover(image, self.width, self.height), self.device)
            with torch.no_grad():
                encoded = self.vqgan.encode(pixels.mul(2).sub(1))
            z = encoded[0] if isinstance(encoded, tuple) else encoded
            return z.detach().clone()

        # Indices are drawn on the CPU so that a seed picks the same start on every device.
        indices = torch.randint(self.codebook.shape[0], (cells[0] * cells[1],))
        vectors = self.codebook.index_select(0, indices.to(self.codebook.device))
        return vectors.view(1, *cells, -1).permute(0, 3, 1, 2).contiguous()

    def _check_resume(self, state: dict[str, Any]) -> Tensor:
        if state.get("format") != STATE_FORMAT:
            raise RequestError(
                f"The saved state has format {state.get('format')!r}, but this version reads "
                f"format {STATE_FORMAT}: start the generation again without it."
            )
        if state.get("fingerprint") != request_fingerprint(self.request):
            raise RequestError(
                "The saved state belongs to a different request (prompts, seed or settings "
                "changed): start the generation again without it."
            )
        z = state["z"]
        expected = (
            1,
            self.codebook.shape[1],
            self.height // self.vqgan.factor,
            self.width // self.vqgan.factor,
        )
        if tuple(z.shape) != expected:
            raise RequestError(
                f"The saved state's latent has shape {tuple(z.shape)}, but this request needs "
                f"{expected} (was another VQGAN model loaded?): start again without it."
            )
        return z.detach().clone()


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch, random and numpy for the block, then restore the caller's generators."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda_devices = [device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            # Only the generators this run uses are seeded, so other CUDA devices keep theirs.
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            elif device.type == "mps":
                # NOTE: the MPS generator is seeded but neither forked nor saved in
                # resume states, so resumed MPS runs may differ from uninterrupted ones.
                torch.mps.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """Set torch's CPU thread count for the block (cores usable by this process by default)."""
    if device.type != "cpu" and threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or _usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # sched_getaffinity does not exist on macOS and Windows.
        return os.cpu_count() or 1


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _set_rng_states(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def _to_cpu(value: Any) -> Any:
    """Copy every tensor in a nested dict/list structure to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(item) for item in value)
    return value


def _load_rgb(path: str, role: str) -> Image.Image:
    try:
        with Image.open(Path(path)) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise RequestError(f"The {role} '{path}' was not found: check the path.") from None
    except Image.DecompressionBombError:
        raise RequestError(
            f"The {role} '{path}' is too large: use a picture of at most {MAX_INPUT_PIXELS:,} "
            "pixels."
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise RequestError(
            f"The {role} '{path}' could not be read as an image ({error}): use a PNG or JPEG file."
        ) from None


def _resize_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` to cover width x height pixels, then crop the centre."""
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(scaled, Image.Resampling.LANCZOS)
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _to_tensor(image: Image.Image, device: torch.device) -> Tensor:
    """Convert an RGB image to a (1, 3, H, W) float tensor in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device)
