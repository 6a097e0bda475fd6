"""The settings of one generation, as a plain record the bot can store and send."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from generator.prompts import Prompt, PromptError, check_prompt_count

# Bounds that catch typos. Memory is checked against the device in generate().
MIN_SIDE = 16
MAX_SIDE = 4096
MAX_ITERATIONS = 100_000
MAX_CUTN = 256
# Midjourney's seed range, so seeds copied from Midjourney prompts work. The bot and
# the command line share it, so a seed from one reproduces a picture in the other.
MAX_SEED = 2**32 - 1

# torch.optim classes that work as ``optimizer.step()`` without a closure on a
# dense tensor (LBFGS needs a closure, SparseAdam sparse gradients).
OPTIMIZERS = (
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "ASGD",
    "Rprop",
)


class RequestError(ValueError):
    """A generation request with an invalid value; the message explains the fix."""


def canonical_optimizer(name: str) -> str:
    """Return the torch.optim spelling of ``name``, matched case-insensitively.

    Raises:
        RequestError: ``name`` is not one of ``OPTIMIZERS``.
    """
    for known in OPTIMIZERS:
        if known.lower() == str(name).strip().lower():
            return known
    raise RequestError(
        f"Unknown optimizer '{name}': use one of {', '.join(OPTIMIZERS)} (default Adam)."
    )


@dataclass
class GenerationRequest:
    """Everything that decides the picture: prompts, seed, size (pixels) and optimisation settings.

    ``prompts`` contains positive and negative prompts together (negatives have
    weight < 0). ``vqgan`` is a registry name or the path of a ``.ckpt`` with its
    ``.yaml`` beside it; each ``clip`` entry is ``MODEL/PRETRAINED``, where
    PRETRAINED is an open_clip tag or a local weights path. ``image_prompts``
    are ``(path, weight)`` pairs. ``progress_every`` is the number of iterations
    between progress images and saved states (0 turns both off).
    """

    prompts: list[Prompt]
    seed: int
    width: int = 256
    height: int = 256
    iterations: int = 300
    cutn: int = 32
    cut_pow: float = 1.0
    lr: float = 0.1
    optimizer: str = "Adam"
    vqgan: str = "vqgan_imagenet_f16_16384"
    clip: tuple[str, ...] = ("ViT-B-32/openai",)
    init_image: str | None = None
    image_prompts: list[tuple[str, float]] = field(default_factory=list)
    progress_every: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the request as JSON-safe values (no infinities, lists for tuples)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["prompts"] = [
            {
                "text": p.text,
                "weight": p.weight,
                "stop": None if p.stop == float("-inf") else p.stop,
            }
            for p in self.prompts
        ]
        data["clip"] = list(self.clip)
        data["image_prompts"] = [[path, weight] for path, weight in self.image_prompts]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """Build a request from ``to_dict()`` output; missing keys take their defaults.

        Raises:
            RequestError: a key is unknown or a required key (prompts, seed) is missing.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(
                f"Unknown request field(s) {', '.join(unknown)}: "
                f"expected only {', '.join(sorted(known))}."
            )
        missing = [name for name in ("prompts", "seed") if name not in data]
        if missing:
            raise RequestError(f"The request has no {' or '.join(missing)}.")

        values = dict(data)
        values["prompts"] = [_prompt_from_value(value) for value in data["prompts"]]
        if "clip" in data:
            clip = data["clip"]
            values["clip"] = (clip,) if isinstance(clip, str) else tuple(clip)
        if "image_prompts" in data:
            values["image_prompts"] = [(str(path), float(w)) for path, w in data["image_prompts"]]
        return cls(**values)

    @property
    def positive_prompts(self) -> list[Prompt]:
        """The prompts with a positive weight."""
        return [p for p in self.prompts if p.weight > 0]

    @property
    def negative_prompts(self) -> list[Prompt]:
        """The prompts with a negative weight."""
        return [p for p in self.prompts if p.weight < 0]

    def validate(self) -> None:
        """Check every value and raise on the first invalid one.

        This checks types and ranges only. Files, model names and the memory a
        size needs are checked when generation starts.

        Raises:
            RequestError: naming the field, its value and the allowed range.
        """
        self._validate_prompts()
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("width", self.width, MIN_SIDE, MAX_SIDE, unit=" pixels")
        _check_int("height", self.height, MIN_SIDE, MAX_SIDE, unit=" pixels")
        _check_int("iterations", self.iterations, 1, MAX_ITERATIONS)
        _check_int("cutn", self.cutn, 1, MAX_CUTN)
        _check_positive("cut_pow", self.cut_pow)
        _check_positive("lr", self.lr)
        canonical_optimizer(self.optimizer)
        _check_int("progress_every", self.progress_every, 0, MAX_ITERATIONS)
        self._validate_models()

    def _validate_prompts(self) -> None:
        if not isinstance(self.prompts, list) or not all(
            isinstance(p, Prompt) for p in self.prompts
        ):
            raise RequestError("prompts must be a list of Prompt objects (see parse_prompts).")
        try:
            check_prompt_count(self.prompts)
        except PromptError as error:
            raise RequestError(str(error)) from None
        for prompt in self.prompts:
            if not prompt.text.strip():
                raise RequestError("A prompt has empty text: every prompt needs words.")
            _check_weight(f"the weight of prompt '{prompt.text}'", prompt.weight)
            if math.isnan(prompt.stop):
                raise RequestError(f"The stop value of prompt '{prompt.text}' is NaN.")

        for item in self.image_prompts:
            if len(item) != 2 or not isinstance(item[0], str) or not item[0]:
                raise RequestError(
                    f"Invalid image prompt {item!r}: expected a (path, weight) pair."
                )
            _check_weight(f"the weight of image prompt '{item[0]}'", item[1])

        has_positive = any(p.weight > 0 for p in self.prompts) or any(
            w > 0 for _, w in self.image_prompts
        )
        if not has_positive:
            raise RequestError(
                "The request has no positive prompt: add a text or image prompt with a "
                "positive weight."
            )

    def _validate_models(self) -> None:
        if not isinstance(self.vqgan, str) or not self.vqgan.strip():
            raise RequestError("vqgan is empty: give a registry name or a .ckpt path.")
        if not isinstance(self.clip, tuple) or not self.clip:
            raise RequestError("clip must be a non-empty tuple of 'MODEL/PRETRAINED' strings.")
        for spec in self.clip:
            model, slash, pretrained = str(spec).partition("/")
            if not slash or not model or not pretrained:
                raise RequestError(
                    f"Invalid CLIP model '{spec}': write MODEL/PRETRAINED, e.g. 'ViT-B-32/openai'."
                )
        if self.init_image is not None and (
            not isinstance(self.init_image, str) or not self.init_image
        ):
            raise RequestError("init_image must be a file path or None.")


def _prompt_from_value(value: Any) -> Prompt:
    if isinstance(value, Prompt):
        return value
    if not isinstance(value, dict) or "text" not in value:
        raise RequestError(f"Invalid prompt {value!r}: expected {{'text', 'weight', 'stop'}}.")
    stop = value.get("stop")
    return Prompt(
        str(value["text"]),
        float(value.get("weight", 1.0)),
        float("-inf") if stop is None else float(stop),
    )


def _check_int(name: str, value: Any, low: int, high: int, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number, not {value!r}.")
    if not low <= value <= high:
        raise RequestError(f"{name} is {value}{unit}: use a value from {low} to {high}.")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, not {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise RequestError(f"{name} is {value}: use a finite number above 0.")


def _check_weight(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, not {value!r}.")
    if not math.isfinite(value) or value == 0:
        raise RequestError(f"{name} is {value}: use a finite, non-zero number.")
