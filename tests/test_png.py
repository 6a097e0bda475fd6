"""PNG metadata and the saved generation state."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import generator
from generator import GenerationRequest, parse_prompts
from generator.png import METADATA_KEYS, generation_metadata, png_bytes, read_png_metadata, save_png
from generator.state import load_state, save_state


def sample_image() -> Image.Image:
    image = Image.new("RGB", (8, 4), (10, 20, 30))
    image.putpixel((1, 2), (200, 100, 0))
    return image


def test_metadata_round_trip_file(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    save_png(sample_image(), path, {"prompt": "a cat", "seed": "7"})
    assert read_png_metadata(path) == {"prompt": "a cat", "seed": "7"}
    with Image.open(path) as image:
        assert image.getpixel((1, 2)) == (200, 100, 0)


def test_metadata_round_trip_bytes_unicode() -> None:
    metadata = {"prompt": "a caf\u00e9 \u2615 in \u6771\u4eac", "negative": ""}
    data = png_bytes(sample_image(), metadata)
    assert read_png_metadata(data) == metadata
    assert read_png_metadata(io.BytesIO(data)) == metadata


def test_latin1_text_uses_text_chunk() -> None:
    data = png_bytes(sample_image(), {"prompt": "caf\u00e9"})
    assert b"tEXtprompt\x00caf\xe9" in data


def test_png_bytes_repeat() -> None:
    metadata = {"prompt": "a cat"}
    assert png_bytes(sample_image(), metadata) == png_bytes(sample_image(), metadata)


def test_generation_metadata_keys() -> None:
    request = GenerationRequest(
        prompts=parse_prompts("a cat:2 | a hat --no fog"),
        seed=42,
        iterations=10,
        cutn=4,
        clip=("ViT-B-32/openai", "RN50/openai"),
    )
    metadata = generation_metadata(request, 128, 96)
    assert tuple(metadata) == METADATA_KEYS
    assert metadata["prompt"] == "a cat:2 | a hat"
    assert metadata["negative"] == "fog"
    assert metadata["seed"] == "42"
    assert metadata["size"] == "128x96"
    assert metadata["iterations"] == "10"
    assert metadata["cutn"] == "4"
    assert metadata["vqgan"] == "vqgan_imagenet_f16_16384"
    assert metadata["clip"] == "ViT-B-32/openai,RN50/openai"
    assert metadata["version"] == generator.__version__


def sample_state() -> dict[str, object]:
    return {
        "format": 1,
        "iteration": 5,
        "z": torch.arange(6, dtype=torch.float32).view(1, 2, 3),
        "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1}]},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": None,
        "fingerprint": "abc",
    }


def test_state_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "jobs" / "1.state"
    state = sample_state()
    save_state(state, path)
    loaded = load_state(path)
    assert loaded["iteration"] == 5
    assert torch.equal(loaded["z"], state["z"])
    assert torch.equal(loaded["rng_cpu"], state["rng_cpu"])
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert loaded["rng_cuda"] is None


def test_state_save_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "job.state"
    save_state(sample_state(), path)
    newer = sample_state() | {"iteration": 9}
    save_state(newer, path)
    assert load_state(path)["iteration"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["job.state"]


def test_state_failed_save_keeps_old(tmp_path: Path) -> None:
    path = tmp_path / "job.state"
    save_state(sample_state(), path)
    with pytest.raises(Exception):  # noqa: B017  (torch.save's pickling error type varies)
        save_state({"bad": lambda: None}, path)
    assert load_state(path)["iteration"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["job.state"]


def test_state_load_rejects_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.state"
    torch.save({"value": Path("x")}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"weights_only"):
        load_state(path)
