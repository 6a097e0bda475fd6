"""PNG metadata and the saved generation state."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import generator
from generator import GenerationRequest, RequestError, generate, load_models, parse_prompts
from generator.png import (
    METADATA_KEYS,
    generation_metadata,
    png_bytes,
    read_png_metadata,
    request_from_metadata,
    request_from_png,
    save_png,
)
from generator.state import load_state, save_state
from generator.testing import TinyModels


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
        cut_pow=0.7,
        lr=0.05,
        optimizer="AdamW",
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
    assert metadata["cut_pow"] == "0.7"
    assert metadata["lr"] == "0.05"
    assert metadata["optimizer"] == "AdamW"
    assert metadata["vqgan"] == "vqgan_imagenet_f16_16384"
    assert metadata["clip"] == "ViT-B-32/openai,RN50/openai"
    assert metadata["version"] == generator.__version__
    assert json.loads(metadata["request"]) == {
        k: v for k, v in request.to_dict().items() if k not in ("init_image", "image_prompts")
    }
    assert json.loads(metadata["image_inputs"]) == {
        "init_image": False,
        "image_prompt_weights": [],
    }


def test_metadata_leaves_out_image_paths() -> None:
    request = GenerationRequest(
        prompts=parse_prompts("a cat"),
        seed=1,
        init_image="/home/someone/private/start.png",
        image_prompts=[("/home/someone/private/style.png", 0.5)],
    )

    metadata = generation_metadata(request, 64, 64)

    assert not any("/home/someone" in value for value in metadata.values())
    assert json.loads(metadata["image_inputs"]) == {
        "init_image": True,
        "image_prompt_weights": [0.5],
    }


def _request_with_everything(tiny_models: TinyModels) -> GenerationRequest:
    return GenerationRequest(
        prompts=parse_prompts("a red apple:1.5:0.2 | a bowl --no fog, rain"),
        seed=11,
        width=32,
        height=32,
        iterations=3,
        cutn=3,
        cut_pow=0.8,
        lr=0.07,
        optimizer="AdamW",
        vqgan=tiny_models.vqgan,
        clip=(tiny_models.clip,),
    )


def test_png_rebuilds_request_same_bytes(tiny_models: TinyModels) -> None:
    torch.set_num_threads(1)
    original = _request_with_everything(tiny_models)
    models = load_models(tiny_models.vqgan, [tiny_models.clip], "cpu")
    image = generate(original, models=models)
    first = png_bytes(image, generation_metadata(original, *image.size))

    rebuilt = request_from_png(first)
    again = generate(rebuilt, models=models)
    second = png_bytes(again, generation_metadata(rebuilt, *again.size))

    assert rebuilt == original
    assert first == second


def test_rebuild_needs_image_paths_back() -> None:
    original = GenerationRequest(
        prompts=parse_prompts("a cat"),
        seed=1,
        init_image="start.png",
        image_prompts=[("style.png", 0.5), ("colour.png", -1.0)],
    )
    data = png_bytes(sample_image(), generation_metadata(original, 8, 4))

    with pytest.raises(RequestError, match="init image"):
        request_from_png(data, image_prompts=["a.png", "b.png"])
    with pytest.raises(RequestError, match="2 image prompt"):
        request_from_png(data, init_image="start.png", image_prompts=["a.png"])

    rebuilt = request_from_png(data, init_image="start.png", image_prompts=["style.png", "c.png"])
    assert rebuilt.init_image == "start.png"
    assert rebuilt.image_prompts == [("style.png", 0.5), ("c.png", -1.0)]
    assert rebuilt.prompts == original.prompts


def test_rebuild_without_request_key() -> None:
    data = png_bytes(sample_image(), {"prompt": "a cat", "seed": "7"})

    with pytest.raises(RequestError, match="has no 'request' metadata"):
        request_from_png(data)


def test_rebuild_rejects_invalid_request() -> None:
    request = GenerationRequest(prompts=parse_prompts("a cat"), seed=1)
    metadata = generation_metadata(request, 8, 4)

    broken = {**metadata, "request": "{not json"}
    with pytest.raises(RequestError, match="not valid JSON"):
        request_from_metadata(broken)

    settings = json.loads(metadata["request"]) | {"lr": -1}
    with pytest.raises(RequestError, match="lr is -1"):
        request_from_metadata({**metadata, "request": json.dumps(settings)})


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
