"""Parse what a user typed into /imagine: the prompt with inline flags plus the command's options.

The prompt accepts Midjourney-style flags that the bot handles itself::

    a lighthouse at dusk::2 | oil painting --ar 16:9 --seed 42 --iter 200 --no fog, people

``--seed``, ``--ar`` (alias ``--aspect``) and ``--iter`` are taken out here. The rest, with
weights, ``|`` parts and ``--no``, goes to :func:`generator.parse_prompts`, which rejects any
other ``--flag``. Every mistake raises :class:`OptionsError` with one sentence saying what was
wrong and an example that works.

Text is cleaned before anything reads it (:func:`clean_text`): invisible formatting characters
go, so a zero-width space cannot hide a banned word, and control characters are refused.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from generator.prompts import (
    CLIP_CONTEXT_LENGTH,
    Prompt,
    PromptError,
    check_prompt_count,
    merge_repeated_negatives,
    parse_prompts,
)

# The submodule, not the package: the bot process never imports torch.
from generator.request import MAX_SEED

__all__ = [
    "MAX_SEED",
    "ImagineOptions",
    "Limits",
    "OptionsError",
    "clean_text",
    "estimate_min_tokens",
    "parse_imagine",
]

# Wider ratios leave too few pixels on the short side to show anything.
MAX_ASPECT = 4.0
EXAMPLE = "/imagine prompt: a lighthouse at dusk, oil painting"

# A flag of ours at the start of the prompt or after whitespace, with its value if there is
# one. Phones turn "--" into an em dash, so "—seed" counts too (as in generator.prompts).
_FLAG_RE = re.compile(
    r"(?:^|(?<=\s))(?:--|\u2014)(?P<name>seed|ar|aspect|iter|iterations)\b"
    r"(?:[ \t]*=?[ \t]*(?P<value>[^\s-][^\s]*|-\d\S*))?",
    re.IGNORECASE,
)
_FLAG_ALIASES = {"seed": "seed", "ar": "ar", "aspect": "ar", "iter": "iter", "iterations": "iter"}
_RATIO_RE = re.compile(r"\s*(\d+)\s*[:x]\s*(\d+)\s*")
# CLIP's word splitting (open_clip's SimpleTokenizer) written with the standard library's re:
# contractions, letter runs, single digits, runs of other symbols. Its runs of letters also take
# in non-decimal numerals that CLIP counts apart, so it never finds more pieces than CLIP does.
_CLIP_PIECE_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")
ZERO_WIDTH_JOINER = "\u200d"
# Maximum length of a user value quoted back in an error message, in characters.
ECHO_LIMIT = 40
_LONG_QUOTE_RE = re.compile(rf"'([^']{{{ECHO_LIMIT + 1},}})'")
T = TypeVar("T")


class OptionsError(ValueError):
    """An invalid /imagine input. The message is written for the user who typed it."""


@dataclass(frozen=True)
class Limits:
    """Sizes (pixels, longest side) and iteration counts allowed where the command runs.

    ``multiple`` is the step that widths and heights are rounded to, because the VQGAN
    encodes the image in cells of that many pixels.
    """

    default_size: int
    max_size: int
    default_iterations: int
    max_iterations: int
    multiple: int = 16


@dataclass(frozen=True)
class ImagineOptions:
    """A validated /imagine request. ``seed`` is None when the user left it to chance."""

    prompts: tuple[Prompt, ...]
    seed: int | None
    width: int
    height: int
    iterations: int

    @property
    def negatives(self) -> tuple[Prompt, ...]:
        """The prompts the picture is pushed away from (negative weight)."""
        return tuple(p for p in self.prompts if p.weight < 0)


def parse_imagine(
    prompt: str,
    limits: Limits,
    *,
    negative: str | None = None,
    seed: int | None = None,
    aspect: str | None = None,
    size: int | None = None,
    iterations: int | None = None,
) -> ImagineOptions:
    """Combine the prompt text, its inline flags and the slash command options.

    Args:
        prompt: the ``prompt`` option as typed, flags included.
        limits: the sizes and iteration counts allowed in this guild.
        negative: the ``negative`` option, comma-separated things to avoid.
        seed, aspect, size, iterations: the other command options, None when not given.
            ``aspect`` is ``W:H``; ``size`` is the longest side in pixels.

    Raises:
        OptionsError: a value is given twice, out of range or malformed, a flag is unknown,
            the prompt is empty or longer than CLIP reads, or the text has control characters.
    """
    prompt = clean_text(prompt or "", "prompt")
    negative = clean_text(negative, "negative") if negative is not None else None
    text, flags = _extract_flags(prompt)
    seed = _merge("seed", seed, flags.get("seed"), _parse_seed_flag, "--seed 42")
    aspect = _merge("aspect", aspect, flags.get("ar"), str, "--ar 16:9")
    iterations = _merge("iterations", iterations, flags.get("iter"), _parse_iter_flag, "--iter 200")

    prompts = _parse_text(text)
    prompts += _parse_negative_option(negative)
    prompts = merge_repeated_negatives(prompts)
    _check_prompt_count(prompts)
    _check_token_counts(prompts)
    _check_seed(seed)
    width, height = _image_size(aspect, size, limits)
    iterations = _check_iterations(iterations, limits)
    return ImagineOptions(tuple(prompts), seed, width, height, iterations)


def clean_text(text: str, name: str) -> str:
    """Return ``text`` without invisible formatting characters and with plain spaces.

    Zero-width spaces, bidirectional controls, soft hyphens and other format characters
    (Unicode category Cf) are removed; the zero-width joiner stays, as emoji sequences need
    it. Every run of whitespace becomes one space. ``name`` is the option named in errors.

    Raises:
        OptionsError: the text contains a control character or a lone surrogate, which no
            picture can show and the database cannot store.
    """
    for character in text:
        if unicodedata.category(character) in ("Cc", "Cs") and not character.isspace():
            raise OptionsError(
                f"The {name} contains the control character U+{ord(character):04X}, which "
                f"cannot be drawn: retype it without that character, for example `{EXAMPLE}`."
            )
    visible = "".join(
        character
        for character in text
        if unicodedata.category(character) != "Cf" or character == ZERO_WIDTH_JOINER
    )
    return " ".join(visible.split())


def estimate_min_tokens(text: str) -> int:
    """Return a lower bound of the CLIP tokens ``text`` takes, start and end tokens included.

    Counts the pieces CLIP's tokenizer splits text into before byte-pair encoding; every
    piece is at least one token. Needs no torch, so the bot can refuse long prompts before
    queueing them. The generator counts exactly when the job starts.
    """
    # CLIP's text cleaning unescapes HTML twice and composes accents (NFC) before splitting.
    plain = unicodedata.normalize("NFC", html.unescape(html.unescape(text))).lower()
    return len(_CLIP_PIECE_RE.findall(plain)) + 2


def _is_blank(text: str) -> bool:
    """Return whether ``text`` shows nothing: only spaces, joiners and combining marks."""
    return all(
        character.isspace() or unicodedata.category(character) in ("Cf", "Mn", "Me")
        for character in text
    )


def _quote(value: object) -> str:
    """Return a user's value as inline code, shortened and without backticks that break it."""
    text = str(value).replace("`", "'")
    if len(text) > ECHO_LIMIT:
        text = text[: ECHO_LIMIT - 1] + "…"
    return f"`{text}`"


def _extract_flags(prompt: str) -> tuple[str, dict[str, list[str]]]:
    """Remove ``--seed``, ``--ar`` and ``--iter`` from the prompt, keeping every value seen."""
    flags: dict[str, list[str]] = {}
    for match in _FLAG_RE.finditer(prompt):
        name = _FLAG_ALIASES[match.group("name").lower()]
        value = match.group("value")
        if value is None:
            raise OptionsError(
                f"`--{match.group('name')}` needs a value after it: "
                f"write for example `{EXAMPLE} {_FLAG_EXAMPLES[name]}`."
            )
        flags.setdefault(name, []).append(value)
    return _FLAG_RE.sub(" ", prompt), flags


_FLAG_EXAMPLES = {"seed": "--seed 42", "ar": "--ar 16:9", "iter": "--iter 200"}


def _merge(
    name: str,
    option: T | None,
    flag_values: list[str] | None,
    convert: Callable[[str], T],
    example: str,
) -> T | None:
    """Return the one value given for ``name``, from its option or its inline flag."""
    sources = [] if option is None else [_quote(f"{name}:{option}")]
    sources += [_quote(f"{example.split()[0]} {value}") for value in flag_values or []]
    if len(sources) > 1:
        raise OptionsError(
            f"The {name} is given {len(sources)} times ({', '.join(sources)}): give it once, "
            f"for example `{EXAMPLE} {example}`."
        )
    if option is not None:
        return option
    if flag_values:
        return convert(flag_values[0])
    return None


def _parse_seed_flag(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OptionsError(
            f"The seed {_quote(value)} is not a whole number: use one from 0 to {MAX_SEED}, "
            f"for example `{EXAMPLE} --seed 42`."
        ) from None


def _parse_iter_flag(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OptionsError(
            f"The iteration count {_quote(value)} is not a whole number: "
            f"write for example `{EXAMPLE} --iter 200`."
        ) from None


def _parse_text(text: str) -> list[Prompt]:
    if _is_blank(text):
        raise OptionsError(f"The prompt is empty: describe the picture, for example `{EXAMPLE}`.")
    try:
        return parse_prompts(text)
    except PromptError as error:
        message = _shorten_quotes(str(error), text)
        raise OptionsError(f"{message} A prompt that works: `{EXAMPLE} --no fog`.") from None


def _parse_negative_option(negative: str | None) -> list[Prompt]:
    """Turn the ``negative`` option into one negative prompt per comma-separated item."""
    if negative is None:
        return []
    items = [" ".join(item.split()) for item in negative.split(",")]
    if not all(items) or any(_is_blank(item) for item in items):
        raise OptionsError(
            f"The negative {_quote(negative)} has an empty item: list the things to avoid "
            f"separated by single commas, for example `{EXAMPLE} negative: fog, people`."
        )
    return [Prompt(item, -1.0) for item in items]


def _check_prompt_count(prompts: list[Prompt]) -> None:
    try:
        check_prompt_count(prompts)
    except PromptError as error:
        raise OptionsError(f"{error} For example: `{EXAMPLE} --no fog, people`.") from None


def _shorten_quotes(message: str, text: str) -> str:
    """Shorten the long pieces of ``text`` that a grammar error quotes in single quotes."""

    def shorten(match: re.Match[str]) -> str:
        quoted = match[1]
        if quoted not in text:
            return match[0]  # the span between two quotes of the message itself
        return f"'{quoted[: ECHO_LIMIT - 1]}…'"

    return _LONG_QUOTE_RE.sub(shorten, message)


def _check_token_counts(prompts: Iterable[Prompt]) -> None:
    for prompt in prompts:
        count = estimate_min_tokens(prompt.text)
        if count > CLIP_CONTEXT_LENGTH:
            raise OptionsError(
                f"The prompt {_quote(prompt.text)} is at least {count} tokens long, but CLIP "
                f"reads at most {CLIP_CONTEXT_LENGTH}: shorten it by about "
                f"{count - CLIP_CONTEXT_LENGTH} word(s), for example `{EXAMPLE}`."
            )


def _check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise OptionsError(
            f"The seed {seed} is out of range: use a whole number from 0 to {MAX_SEED}, "
            f"for example `{EXAMPLE} --seed 42`."
        )


def _check_iterations(iterations: int | None, limits: Limits) -> int:
    if iterations is None:
        return limits.default_iterations
    if not 1 <= iterations <= limits.max_iterations:
        raise OptionsError(
            f"{iterations} iterations is out of range: use 1 to {limits.max_iterations} "
            f"here, for example `{EXAMPLE} --iter {min(200, limits.max_iterations)}`."
        )
    return iterations


def _image_size(aspect: str | None, size: int | None, limits: Limits) -> tuple[int, int]:
    """Return (width, height) in pixels: the longest side is ``size``, the ratio ``aspect``."""
    longest = limits.default_size if size is None else size
    step = limits.multiple
    if size is not None and not step <= size <= limits.max_size:
        raise OptionsError(
            f"The size {size} is out of range: the longest side can be {step} to "
            f"{limits.max_size} pixels here, "
            f"for example `{EXAMPLE} size: {min(256, limits.max_size)}`."
        )
    longest = max(step, longest // step * step)
    if aspect is None:
        return longest, longest

    ratio_w, ratio_h = _parse_ratio(aspect)
    short = longest * min(ratio_w, ratio_h) / max(ratio_w, ratio_h)
    short_side = max(step, round(short / step) * step)
    return (longest, short_side) if ratio_w >= ratio_h else (short_side, longest)


def _parse_ratio(aspect: str) -> tuple[int, int]:
    match = _RATIO_RE.fullmatch(aspect)
    example = f"for example `{EXAMPLE} --ar 16:9`"
    if match is None:
        raise OptionsError(
            f"The aspect ratio {_quote(aspect)} is invalid: write it as `W:H`, {example}."
        )
    ratio_w, ratio_h = int(match.group(1)), int(match.group(2))
    if ratio_w == 0 or ratio_h == 0:
        raise OptionsError(f"The aspect ratio {_quote(aspect)} has a zero side: {example}.")
    if max(ratio_w, ratio_h) / min(ratio_w, ratio_h) > MAX_ASPECT:
        raise OptionsError(
            f"The aspect ratio {_quote(aspect)} is too narrow: use one between 1:4 and 4:1, "
            f"{example}."
        )
    return ratio_w, ratio_h
