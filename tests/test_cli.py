"""The command line, through main() in-process and end to end as ``python -m generator``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants
from PIL import Image

from generator.cli import build_parser, build_request, main, parse_image_prompt
from generator.png import read_png_metadata
from generator.prompts import PromptError
from generator.request import RequestError
from generator.testing import TinyModels

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*arguments: str, models_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    if models_dir is not None:
        environment["IMAGINE_MODELS_DIR"] = str(models_dir)
    return subprocess.run(
        [sys.executable, "-m", "generator", *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=120,
    )


def tiny_arguments(tiny: TinyModels) -> list[str]:
    return [
        "--vqgan", tiny.vqgan,
        "--clip", tiny.clip,
        "--size", "32", "32",
        "--cutn", "2",
        "--threads", "1",
    ]  # fmt: skip


def test_cli_writes_png_with_metadata(tiny_models: TinyModels, tmp_path: Path) -> None:
    output = tmp_path / "out.png"
    result = run_cli(
        "a lighthouse at dusk --no fog",
        "-o", str(output),
        "--seed", "5",
        "--iterations", "4",
        "--save-every", "2",
        *tiny_arguments(tiny_models),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "seed 5" in result.stdout

    with Image.open(output) as image:
        assert image.size == (32, 32)
    metadata = read_png_metadata(output)
    assert metadata["prompt"] == "a lighthouse at dusk"
    assert metadata["negative"] == "fog"
    assert metadata["seed"] == "5"
    assert metadata["size"] == "32x32"
    assert metadata["iterations"] == "4"
    assert metadata["cutn"] == "2"
    assert metadata["clip"] == tiny_models.clip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0002.png", "out.png"]


def test_cli_tiny_needs_no_weights(tmp_path: Path) -> None:
    output = tmp_path / "tiny.png"
    result = run_cli(
        "a lighthouse", "--tiny", "-o", str(output), "--iterations", "2",
        "--size", "32", "32", "--cutn", "2", "--threads", "1", "--device", "cpu",
        models_dir=tmp_path / "empty-models",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.size == (32, 32)
    assert "imagine-tiny-clip" in read_png_metadata(output)["clip"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.png"]


def test_cli_repeats_with_seed(
    tiny_models: TinyModels, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = [tmp_path / "first.png", tmp_path / "second.png"]
    for output in outputs:
        status = main(
            [
                "a red apple", "--no", "fog", "-o", str(output), "--seed", "9",
                "--iterations", "2", "-q", *tiny_arguments(tiny_models),
            ]
        )  # fmt: skip
        assert status == 0, capsys.readouterr().err
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


ERRORS = [
    (["cat:0"], "is 0"),
    (["a cat --seed 4"], "Unknown option '--seed'"),
    (["a cat", "--size", "8", "8"], "width is 8 pixels"),
    (["a cat", "--iterations", "0"], "iterations is 0"),
    (["a cat", "--optimizer", "Lion"], "Unknown optimizer 'Lion'"),
    (["a cat", "--clip", "ViT-B-32"], "MODEL/PRETRAINED"),
    (["a cat", "--image-prompt", "ref.png:inf"], "image prompt 'ref.png'"),
    (["a cat", "-o", "missing-folder/out.png"], "does not exist"),
    (["a cat", "-o", "."], "is a folder: give a file name"),
    (["a cat", "--threads", "0"], "--threads is 0"),
    (["a cat", "--device", "tpu"], "'tpu'"),
    (["a cat", "--vqgan", "no-such-model", "--clip", "x/y"], "no-such-model"),
    (["a cat", "--tiny", "--clip", "x/y"], "--tiny replaces --vqgan and --clip"),
    (["a cat", "--tiny", "--vqgan", "my.ckpt"], "--tiny replaces --vqgan and --clip"),
    ([" ".join(["word"] * 80)], "82 tokens"),
]


@pytest.mark.parametrize(("arguments", "fragment"), ERRORS)
def test_cli_error_one_line(
    arguments: list[str],
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IMAGINE_MODELS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(arguments) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]


def test_cli_error_exit_status(tmp_path: Path) -> None:
    result = run_cli("--no fog", models_dir=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "error: The prompt has only negative parts: add what the picture should show, "
        "e.g. 'a forest --no fog'.\n"
    )


def test_cli_missing_init_image(
    tiny_models: TinyModels, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "a cat", "-o", str(tmp_path / "out.png"), "--init-image", str(tmp_path / "none.png"),
            *tiny_arguments(tiny_models),
        ]
    )  # fmt: skip
    assert status == 2
    assert capsys.readouterr().err.startswith("error: The init image")


def test_cli_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "usage: python -m generator" in result.stdout
    assert "--image-prompt PATH[:WEIGHT]" in result.stdout
    assert "download" in result.stdout


def test_download_help() -> None:
    result = run_cli("download", "--help")
    assert result.returncode == 0
    assert "usage: python -m generator download" in result.stdout


def test_build_request_from_options() -> None:
    options = build_parser().parse_args(
        [
            "a", "cat:2", "--no", "fog, rain", "--seed", "1", "--size", "64", "48",
            "--optimizer", "adamw", "--clip", "A/x", "--clip", "B/y",
            "--image-prompt", "style.png:0.5", "--image-prompt", "C:/pictures/ref.png",
            "--save-every", "10",
        ]
    )  # fmt: skip
    request = build_request(options)
    assert [(p.text, p.weight) for p in request.prompts] == [
        ("a cat", 2.0),
        ("fog", -1.0),
        ("rain", -1.0),
    ]
    assert (request.width, request.height, request.seed) == (64, 48, 1)
    assert request.optimizer == "AdamW"
    assert request.clip == ("A/x", "B/y")
    assert request.image_prompts == [("style.png", 0.5), ("C:/pictures/ref.png", 1.0)]
    assert request.progress_every == 10


def test_build_request_merges_repeated_negatives() -> None:
    options = build_parser().parse_args(["a cat --no fog", "--no", "Fog", "--no", "rain"])

    request = build_request(options)

    assert [(p.text, p.weight) for p in request.prompts] == [
        ("a cat", 1.0),
        ("fog", -1.0),
        ("rain", -1.0),
    ]


def test_build_request_rejects_too_many_prompts() -> None:
    negatives = ", ".join(f"thing {n}" for n in range(40))
    options = build_parser().parse_args(["a cat", "--no", negatives])

    with pytest.raises(PromptError, match="has 41 prompts, counting the negatives"):
        build_request(options)


def test_random_seed_when_missing() -> None:
    seeds = {build_request(build_parser().parse_args(["a cat"])).seed for _ in range(5)}
    assert len(seeds) > 1


def test_image_prompt_weight_errors() -> None:
    assert parse_image_prompt("ref.png:-1") == ("ref.png", -1.0)
    with pytest.raises(RequestError, match="non-zero"):
        parse_image_prompt("ref.png:0")


HELP_HINT = "Run 'python -m generator --help' to see the options."

USAGE_ERRORS = [
    (["a cat", "--seed", "abc"], "error: --seed: 'abc' is not a whole number; use e.g. --seed 42"),
    (["a cat", "--lr", "fast"], "error: --lr: 'fast' is not a number; use e.g. --lr 0.1"),
    (
        ["a cat", "--size", "256", "wide"],
        "error: --size: 'wide' is not a whole number; use e.g. --size 256 256",
    ),
    (["a cat", "--size", "256"], "error: --size: expected 2 arguments"),
    (["a cat", "--colour", "red"], "error: unrecognized arguments: --colour red"),
]


@pytest.mark.parametrize(("arguments", "expected"), USAGE_ERRORS)
def test_cli_usage_error_one_line(
    arguments: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(arguments)

    assert raised.value.code == 2
    assert capsys.readouterr().err.splitlines() == [expected, HELP_HINT]


def test_download_usage_error_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["download", "--fast"])

    assert raised.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: unrecognized arguments: --fast",
        "Run 'python -m generator download --help' to see the options.",
    ]


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the Hugging Face Hub client at a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hub_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return endpoint


def test_cli_offline_clip_error_keeps_lines(
    tiny_models: TinyModels,
    tmp_path: Path,
    offline_hub: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = tiny_arguments(tiny_models)
    arguments[arguments.index("--clip") + 1] = "ViT-B-32/openai"

    started = time.perf_counter()
    status = main(
        ["a lighthouse", "-o", str(tmp_path / "out.png"), "--models-dir", str(tmp_path), *arguments]
    )
    elapsed = time.perf_counter() - started

    lines = capsys.readouterr().err.splitlines()
    manual = (tmp_path / "clip" / "ViT-B-32" / "openai.safetensors").resolve()
    assert status == 2
    assert elapsed < 20
    assert lines[0].startswith("error: Could not download CLIP ViT-B-32/openai: cannot connect")
    assert "install the weights by hand" in lines[0]
    assert f"  {manual}" in lines
    assert any(line.endswith("/open_clip_model.safetensors") for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)


@pytest.mark.parametrize("hub_first", [False, True], ids=["hub-later", "hub-first"])
def test_library_warning_printed_once(hub_first: bool) -> None:
    script = "\n".join(
        [
            "import logging",
            "import huggingface_hub" if hub_first else "",
            "from generator.cli import configure_logging",
            "configure_logging()",
            "from huggingface_hub.utils import logging as hub_logging",
            "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s.')",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == "WARNING: Retrying in 1s.\n"


def test_cli_path_vqgan_writes_nothing_in_cwd(
    tiny_models: TinyModels,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("IMAGINE_MODELS_DIR", raising=False)

    status = main(
        ["a cat", "-o", str(tmp_path / "out.png"), "--iterations", "1", "-q",
         *tiny_arguments(tiny_models)]
    )  # fmt: skip

    assert status == 0, capsys.readouterr().err
    assert list(workdir.iterdir()) == []
    assert (tmp_path / "out.png").is_file()


def test_cli_path_vqgan_cache_in_models_dir(
    tiny_models: TinyModels, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir = tmp_path / "models"

    status = main(
        ["a cat", "-o", str(tmp_path / "out.png"), "--iterations", "1", "-q",
         "--models-dir", str(models_dir), *tiny_arguments(tiny_models)]
    )  # fmt: skip

    assert status == 0, capsys.readouterr().err
    assert len(list((models_dir / "cache").glob("tiny-vqgan.*.safetensors"))) == 1
