"""Prompt grammar shared by the command line and the Discord bot.

A prompt text is a list of weighted parts::

    a lighthouse at dusk | oil painting:0.5 | text:-1:0.8 --no fog, people

* Parts are separated by ``|``. Each part is ``text``, ``text:weight`` or
  ``text:weight:stop`` (the notation of the 2021 VQGAN+CLIP notebooks). A
  colon-separated tail counts as a weight only when it is a number, so
  ``photo: a cat`` stays plain text.
* Midjourney's multi-prompts also work: ``cat::2 hat::-0.5`` gives ``cat``
  weight 2 and ``hat`` weight -0.5, and ``hot:: dog`` gives two parts of weight 1.
* ``--no a, b`` adds one negative prompt of weight -1 per comma-separated item
  (``--no fog:0.5`` sets weight -0.5). A negative weight anywhere means the
  same as ``--no``.

Weights are finite, non-zero floats, and at least one prompt must be positive.
Other ``--flags`` are rejected here: callers strip their own flags first.

A negative given twice counts once (:func:`merge_repeated_negatives`), and one
request takes at most :data:`MAX_PROMPTS` prompts (:func:`check_prompt_count`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# CLIP's text context, start and end tokens included.
CLIP_CONTEXT_LENGTH = 77
# Positive and negative prompts of one request together. CLIP encodes each one
# before the first step; the number is a judgement that leaves room for real
# prompts, not a measured quality limit.
MAX_PROMPTS = 32

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf(?:inity)?|nan"
_NUMBER_RE = re.compile(rf"\s*(?:{_NUMBER})\s*", re.IGNORECASE)
# A tail that starts like a number but is not one ("1.2.3", "-0.5x") is a typo
# in a weight rather than part of the text.
_NUMBER_LIKE_RE = re.compile(r"\s*[+-]?[\d.]\S*\s*")
_MIDJOURNEY_RE = re.compile(rf"::\s*({_NUMBER})?", re.IGNORECASE)
# "--flag" at the start or after whitespace. Phones often turn "--" into an em
# dash, so "—no" counts as "--no".
_FLAG_RE = re.compile(r"(?:^|(?<=\s))(?:--|\u2014)([A-Za-z][\w-]*)")


@dataclass(frozen=True)
class Prompt:
    """One weighted text prompt.

    ``weight`` scales the prompt's loss; a negative weight pushes the image away
    from the text. Once the spherical distance to the prompt falls below
    ``stop``, the prompt stops pulling the image closer.
    """

    text: str
    weight: float = 1.0
    stop: float = float("-inf")


class PromptError(ValueError):
    """A prompt text that does not follow the grammar, with a message for its author."""


def parse_prompts(text: str) -> list[Prompt]:
    """Parse a prompt text into weighted prompts, negatives (weight < 0) included.

    Raises:
        PromptError: the text is empty, has an empty part, a weight that is not a
            finite non-zero number, an unknown ``--flag``, or no positive prompt.

    Examples:
        >>> parse_prompts("a cat:2 | fog:-0.5")
        [Prompt(text='a cat', weight=2.0, stop=-inf), Prompt(text='fog', weight=-0.5, stop=-inf)]
    """
    if not text or not text.strip():
        raise PromptError("The prompt is empty: describe the picture, e.g. 'a lighthouse at dusk'.")

    main, negatives = _split_flags(text)
    prompts: list[Prompt] = []
    if main.strip():
        for index, part in enumerate(main.split("|"), start=1):
            prompts.extend(_parse_part(part, index))
    prompts.extend(negatives)

    if not any(prompt.weight > 0 for prompt in prompts):
        raise PromptError(
            "The prompt has only negative parts: add what the picture should show, "
            "e.g. 'a forest --no fog'."
        )
    return prompts


def merge_repeated_negatives(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Return ``prompts`` without repeats of a negative prompt, keeping the first.

    Texts compare without case and runs of whitespace, so ``--no fog`` given
    with ``--no Fog`` counts once. Repeated positive prompts stay: writing one
    twice is a way to weight it.
    """
    seen: set[tuple[str, float, float]] = set()
    unique = []
    for prompt in prompts:
        key = (" ".join(prompt.text.split()).casefold(), prompt.weight, prompt.stop)
        if prompt.weight < 0 and key in seen:
            continue
        seen.add(key)
        unique.append(prompt)
    return unique


def check_prompt_count(prompts: Iterable[Prompt]) -> None:
    """Reject a request with more than :data:`MAX_PROMPTS` prompts, negatives included.

    Raises:
        PromptError: naming the number of prompts and the limit.
    """
    count = sum(1 for _ in prompts)
    if count > MAX_PROMPTS:
        raise PromptError(
            f"The request has {count} prompts, counting the negatives, but at most "
            f"{MAX_PROMPTS} are allowed: merge or remove some."
        )


def check_prompt_length(prompts: Iterable[Prompt], tokenizer: Any = None) -> None:
    """Reject prompts longer than CLIP's text context instead of letting CLIP truncate them.

    ``tokenizer`` is an open_clip tokenizer (the default is ViT-B-32's BPE
    tokenizer, shared by OpenAI's CLIP models). The limit is the tokenizer's
    ``context_length`` (77 for CLIP), start and end tokens included. Importing
    open_clip imports torch, so this check is not free in a light process.

    Raises:
        PromptError: naming the prompt, its token count and the limit.
    """
    if tokenizer is None:
        tokenizer = _default_tokenizer()
    limit = int(getattr(tokenizer, "context_length", CLIP_CONTEXT_LENGTH))

    for prompt in prompts:
        count = count_tokens(prompt.text, tokenizer)
        if count > limit:
            raise PromptError(
                f"The prompt '{_shorten(prompt.text)}' is {count} tokens long, but CLIP reads at "
                f"most {limit} (start and end tokens included): shorten it by about "
                f"{count - limit} tokens."
            )


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Return the number of CLIP tokens ``text`` takes, start and end tokens included."""
    if tokenizer is None:
        tokenizer = _default_tokenizer()
    if not hasattr(tokenizer, "encode"):
        # Hugging Face tokenizers wrapped by open_clip count their special tokens themselves.
        return len(tokenizer.tokenizer(text)["input_ids"])
    clean = getattr(tokenizer, "clean_fn", None)
    cleaned = clean(text) if clean is not None else text
    return len(tokenizer.encode(cleaned)) + 2


def format_prompts(prompts: Iterable[Prompt]) -> tuple[str, str]:
    """Return the positive and the negative prompts as ``(positive, negative)`` text.

    Each side uses the ``text:weight`` notation, weights of the negatives as
    positive numbers; the result is meant for people (PNG metadata, messages).
    """
    positive: list[str] = []
    negative: list[str] = []
    for prompt in prompts:
        side = positive if prompt.weight > 0 else negative
        weight = abs(prompt.weight)
        label = prompt.text if weight == 1 else f"{prompt.text}:{weight:g}"
        side.append(label)
    return " | ".join(positive), ", ".join(negative)


def _split_flags(text: str) -> tuple[str, list[Prompt]]:
    """Split ``text`` into the part before the first flag and the ``--no`` prompts."""
    matches = list(_FLAG_RE.finditer(text))
    if not matches:
        return text, []

    negatives: list[Prompt] = []
    for position, match in enumerate(matches):
        name = match.group(1)
        if name.lower() != "no":
            raise PromptError(
                f"Unknown option '--{name}' in the prompt: only '--no' is understood here "
                "(e.g. 'a forest --no fog, people')."
            )
        end = matches[position + 1].start() if position + 1 < len(matches) else len(text)
        negatives.extend(_parse_negatives(text[match.end() : end]))
    return text[: matches[0].start()], negatives


def _parse_negatives(items: str) -> list[Prompt]:
    """Parse the items after ``--no``; a weight there sets the strength, its sign is ignored."""
    if not items.strip():
        raise PromptError("'--no' needs something after it, e.g. '--no fog, people'.")
    negatives = []
    for index, item in enumerate(re.split(r"[,|]", items), start=1):
        if not item.strip():
            raise PromptError(
                f"Item {index} of '--no {items.strip()}' is empty: separate the things to "
                "avoid with single commas, e.g. '--no fog, people'."
            )
        for prompt in _parse_part(item, index):
            negatives.append(Prompt(prompt.text, -abs(prompt.weight), prompt.stop))
    return negatives


def _parse_part(part: str, index: int) -> list[Prompt]:
    """Parse one ``|``-separated part, which may hold several Midjourney prompts."""
    if not part.strip():
        raise PromptError(
            f"Part {index} of the prompt is empty: remove the extra '|' or put text between them."
        )
    if "::" in part:
        return _parse_midjourney(part)

    pieces = part.rsplit(":", 2)
    if len(pieces) == 3 and _is_number(pieces[1]) and _is_number(pieces[2]):
        text, weight, stop = pieces
        return [_make_prompt(text, _weight(weight, part), _stop(stop, part), part)]
    head, colon, tail = part.rpartition(":")
    if colon and _is_number(tail):
        return [_make_prompt(head, _weight(tail, part), float("-inf"), part)]
    if colon and (not tail.strip() or _NUMBER_LIKE_RE.fullmatch(tail)):
        raise PromptError(
            f"'{tail.strip()}' in '{part.strip()}' is not a valid weight: write "
            "'text:weight' with a number, e.g. 'a cat:0.5', or leave out the colon."
        )
    return [_make_prompt(part, 1.0, float("-inf"), part)]


def _parse_midjourney(part: str) -> list[Prompt]:
    """Parse ``a::2 b::-1 c``: each text takes the weight written after its ``::``."""
    prompts = []
    start = 0
    for match in _MIDJOURNEY_RE.finditer(part):
        text = part[start : match.start()]
        weight = _weight(match.group(1), part) if match.group(1) else 1.0
        prompts.append(_make_prompt(text, weight, float("-inf"), part))
        start = match.end()
    if part[start:].strip():
        prompts.append(_make_prompt(part[start:], 1.0, float("-inf"), part))
    return prompts


def _make_prompt(text: str, weight: float, stop: float, part: str) -> Prompt:
    text = " ".join(text.split())
    if not text:
        raise PromptError(
            f"'{part.strip()}' has a weight but no text: write the text before the weight, "
            "e.g. 'a cat:0.5'."
        )
    return Prompt(text, weight, stop)


def _is_number(value: str) -> bool:
    return _NUMBER_RE.fullmatch(value) is not None


def _weight(value: str, part: str) -> float:
    weight = float(value)
    if not math.isfinite(weight):
        raise PromptError(
            f"The weight '{value.strip()}' in '{part.strip()}' is not a finite number: "
            "use a number such as 2 or -0.5."
        )
    if weight == 0:
        raise PromptError(
            f"The weight in '{part.strip()}' is 0, which would ignore the prompt: "
            "remove the part or give it a non-zero weight."
        )
    return weight


def _stop(value: str, part: str) -> float:
    stop = float(value)
    if math.isnan(stop):
        raise PromptError(
            f"The stop value in '{part.strip()}' is not a number: write 'text:weight:stop', "
            "e.g. 'a cat:1:0.8'."
        )
    return stop


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Any:
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")
