"""The prompt grammar, the request record, and the light import of the package."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from generator import (
    GenerationRequest,
    Prompt,
    PromptError,
    RequestError,
    check_prompt_length,
    parse_prompts,
)
from generator.prompts import (
    MAX_PROMPTS,
    check_prompt_count,
    count_tokens,
    format_prompts,
    merge_repeated_negatives,
)

INF = float("-inf")

GRAMMAR = [
    ("a lighthouse at dusk", [("a lighthouse at dusk", 1.0, INF)]),
    ("  spaced   out  ", [("spaced out", 1.0, INF)]),
    ("cat:2", [("cat", 2.0, INF)]),
    ("cat:0.5:0.8", [("cat", 0.5, 0.8)]),
    ("cat:-1:0.8 | dog", [("cat", -1.0, 0.8), ("dog", 1.0, INF)]),
    ("cat | dog:1.5 | fog:-0.5", [("cat", 1.0, INF), ("dog", 1.5, INF), ("fog", -0.5, INF)]),
    ("cat:1e-1", [("cat", 0.1, INF)]),
    ("cat:.5", [("cat", 0.5, INF)]),
    ("photo: a cat", [("photo: a cat", 1.0, INF)]),
    ("a 16:9 photo", [("a 16:9 photo", 1.0, INF)]),
    ("note:abc:0.5", [("note:abc", 0.5, INF)]),
    ("cat::2", [("cat", 2.0, INF)]),
    ("fog::-0.5 | sun", [("fog", -0.5, INF), ("sun", 1.0, INF)]),
    ("space::2 ship", [("space", 2.0, INF), ("ship", 1.0, INF)]),
    ("hot:: dog", [("hot", 1.0, INF), ("dog", 1.0, INF)]),
    ("a cat::2 a hat::-0.5", [("a cat", 2.0, INF), ("a hat", -0.5, INF)]),
    ("a forest --no fog", [("a forest", 1.0, INF), ("fog", -1.0, INF)]),
    (
        "a lighthouse at dusk --no fog, people",
        [("a lighthouse at dusk", 1.0, INF), ("fog", -1.0, INF), ("people", -1.0, INF)],
    ),
    (
        "a forest --no fog:0.5 | rain:-2",
        [("a forest", 1.0, INF), ("fog", -0.5, INF), ("rain", -2.0, INF)],
    ),
    ("a forest \u2014no fog", [("a forest", 1.0, INF), ("fog", -1.0, INF)]),
    (
        "a forest --NO fog --no rain",
        [("a forest", 1.0, INF), ("fog", -1.0, INF), ("rain", -1.0, INF)],
    ),
    ("rock--and--roll", [("rock--and--roll", 1.0, INF)]),
]


@pytest.mark.parametrize(("text", "expected"), GRAMMAR)
def test_grammar_parses(text: str, expected: list[tuple[str, float, float]]) -> None:
    assert parse_prompts(text) == [Prompt(*item) for item in expected]


ERRORS = [
    ("", "empty"),
    ("   ", "empty"),
    ("cat || dog", "Part 2"),
    ("cat |", "Part 2"),
    ("cat:0", "is 0"),
    ("cat::0", "is 0"),
    ("cat:inf", "finite"),
    ("cat:nan", "finite"),
    ("cat::-inf", "finite"),
    ("cat:1.2.3", "'1.2.3'"),
    ("cat:2x", "'2x'"),
    ("cat:", "not a valid weight"),
    (":2", "no text"),
    ("::2", "no text"),
    ("cat:1:nan", "stop"),
    ("fog:-1", "only negative"),
    ("--no fog", "only negative"),
    ("a forest --no", "needs something"),
    ("a forest --no fog,,rain", "is empty"),
    ("a forest --no fog,", "is empty"),
    ("a forest --seed 4", "'--seed'"),
    ("a forest --ar 16:9", "'--ar'"),
]


@pytest.mark.parametrize(("text", "fragment"), ERRORS)
def test_grammar_rejects(text: str, fragment: str) -> None:
    with pytest.raises(PromptError) as caught:
        parse_prompts(text)
    assert fragment in str(caught.value)


def test_prompt_error_is_value_error() -> None:
    assert issubclass(PromptError, ValueError)


def test_format_prompts_splits_sides() -> None:
    prompts = parse_prompts("a cat:2 | a hat --no fog, sun:0.5")
    assert format_prompts(prompts) == ("a cat:2 | a hat", "fog, sun:0.5")


def test_repeated_negatives_count_once() -> None:
    prompts = parse_prompts("a cat | a cat --no fog, Fog,  fog , rain:0.5 --no rain:0.5")

    merged = merge_repeated_negatives(prompts)

    assert [(p.text, p.weight) for p in merged] == [
        ("a cat", 1.0),
        ("a cat", 1.0),
        ("fog", -1.0),
        ("rain", -0.5),
    ]


def test_negatives_with_other_weights_stay() -> None:
    prompts = parse_prompts("a cat --no fog, fog:2")

    assert merge_repeated_negatives(prompts) == prompts


def test_prompt_count_limit() -> None:
    check_prompt_count([Prompt(f"part {n}") for n in range(MAX_PROMPTS)])
    with pytest.raises(PromptError, match=rf"has {MAX_PROMPTS + 1} prompts.*at most {MAX_PROMPTS}"):
        check_prompt_count([Prompt(f"part {n}") for n in range(MAX_PROMPTS + 1)])


def test_token_count_includes_start_and_end() -> None:
    assert count_tokens("a lighthouse at dusk") == 6


def test_long_prompt_rejected_with_count() -> None:
    text = " ".join(["lighthouse"] * 80)
    with pytest.raises(PromptError) as caught:
        check_prompt_length([Prompt("short one"), Prompt(text)])
    message = str(caught.value)
    assert "82 tokens" in message
    assert "77" in message


def test_prompt_of_77_tokens_accepted() -> None:
    check_prompt_length([Prompt(" ".join(["lighthouse"] * 75))])


def make_request(**changes: object) -> GenerationRequest:
    values: dict[str, object] = {"prompts": parse_prompts("a cat --no fog"), "seed": 7}
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def test_request_dict_round_trip_is_json_safe() -> None:
    request = make_request(
        prompts=[Prompt("a cat", 2.0, 0.5), Prompt("fog", -1.0)],
        clip=("ViT-B-32/openai", "RN50/openai"),
        image_prompts=[("ref.png", 0.5)],
        init_image="init.png",
    )
    data = json.loads(json.dumps(request.to_dict(), allow_nan=False))
    assert data["prompts"][1]["stop"] is None
    assert GenerationRequest.from_dict(data) == request


def test_request_from_dict_defaults_and_errors() -> None:
    request = GenerationRequest.from_dict({"prompts": [{"text": "cat"}], "seed": 1})
    assert request.width == 256
    assert request.clip == ("ViT-B-32/openai",)
    with pytest.raises(RequestError, match="colour"):
        GenerationRequest.from_dict({"prompts": [], "seed": 1, "colour": "red"})
    with pytest.raises(RequestError, match="seed"):
        GenerationRequest.from_dict({"prompts": []})


def test_request_default_validates() -> None:
    make_request().validate()
    make_request(optimizer="adamw").validate()


INVALID_REQUESTS = [
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**32}, "use a value from 0 to 4294967295"),
    ({"seed": 1.5}, "whole number"),
    ({"width": 8}, "width is 8 pixels"),
    ({"height": 10_000}, "height"),
    ({"iterations": 0}, "iterations"),
    ({"cutn": 0}, "cutn"),
    ({"cut_pow": 0.0}, "cut_pow"),
    ({"lr": math.nan}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"optimizer": "LBFGS"}, "Unknown optimizer 'LBFGS'"),
    ({"progress_every": -1}, "progress_every"),
    ({"vqgan": ""}, "vqgan"),
    ({"clip": ()}, "clip"),
    ({"clip": ("ViT-B-32",)}, "MODEL/PRETRAINED"),
    ({"prompts": [Prompt("fog", -1.0)]}, "no positive prompt"),
    ({"prompts": [Prompt("cat", 0.0)]}, "non-zero"),
    ({"prompts": [Prompt("  ")]}, "empty text"),
    ({"image_prompts": [("ref.png", math.inf)]}, "image prompt"),
    ({"prompts": [Prompt(f"part {n}") for n in range(MAX_PROMPTS + 1)]}, "33 prompts"),
]


@pytest.mark.parametrize(("changes", "fragment"), INVALID_REQUESTS)
def test_request_validate_rejects(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(RequestError) as caught:
        make_request(**changes).validate()
    assert fragment in str(caught.value)


def test_image_prompt_alone_is_positive() -> None:
    make_request(prompts=[Prompt("fog", -1.0)], image_prompts=[("ref.png", 1.0)]).validate()


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, generator\n"
        "generator.parse_prompts('a cat')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(generator.__version__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == generator_version()


def generator_version() -> str:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    # tomllib only exists from Python 3.11, and the project supports 3.10.
    match = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)
