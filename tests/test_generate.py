"""The optimisation loop, run for real on tiny random-weight models."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from generator import (
    GenerationCancelled,
    GenerationRequest,
    Models,
    Progress,
    Prompt,
    PromptError,
    RequestError,
    generate,
    load_models,
    load_state,
    parse_prompts,
    save_state,
)
from generator.cutouts import MakeCutouts, normalize
from generator.generate import estimate_memory, request_fingerprint, round_size
from generator.losses import (
    PromptTarget,
    clamp_with_grad,
    quantize_latent,
    replace_grad,
    spherical_distance,
)
from generator.testing import TinyModels, build_tiny_gumbel_vqgan


@pytest.fixture(scope="module")
def models(tiny_models: TinyModels) -> Models:
    return load_models(tiny_models.vqgan, [tiny_models.clip], "cpu")


@pytest.fixture
def request_for(tiny_models: TinyModels) -> Any:
    def make(text: str = "a red apple --no fog", **changes: Any) -> GenerationRequest:
        values: dict[str, Any] = {
            "prompts": parse_prompts(text),
            "seed": 3,
            "width": 32,
            "height": 32,
            "iterations": 4,
            "cutn": 4,
            "vqgan": tiny_models.vqgan,
            "clip": (tiny_models.clip,),
        }
        values.update(changes)
        return GenerationRequest(**values)

    return make


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def clean_distance(models: Models, image: Image.Image, text: str) -> float:
    """Spherical distance between a whole image and a text, with no augmentation."""
    clip = models.clips[0]
    square = image.resize((clip.input_size, clip.input_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        image_embedding = clip.encode_image(normalize(pixels[None], clip.mean, clip.std))
        text_embedding = clip.encode_text([text])
    return float(spherical_distance(image_embedding, text_embedding))


# Pieces of the objective.


def test_spherical_distance_values() -> None:
    a = torch.tensor([[1.0, 0.0]])
    assert float(spherical_distance(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(spherical_distance(a, torch.tensor([[0.0, 3.0]]))) == pytest.approx(math.pi**2 / 8)
    assert float(spherical_distance(a, -a)) == pytest.approx(math.pi**2 / 2)


def test_clamp_with_grad_passes_inward_gradient() -> None:
    x = torch.tensor([-0.5, 0.5, 1.5, 1.5, -0.5], requires_grad=True)
    y = clamp_with_grad(x, 0.0, 1.0)
    assert y.tolist() == [0.0, 0.5, 1.0, 1.0, 0.0]
    y.backward(torch.tensor([-1.0, 2.0, 3.0, -3.0, 1.0]))
    # Descent moves x by -grad: -0.5 moving up (grad -1) and 1.5 moving down
    # (grad 3) keep their gradient, moves further out are cut.
    assert x.grad is not None
    assert x.grad.tolist() == [-1.0, 2.0, 3.0, 0.0, 0.0]


def test_quantize_latent_straight_through() -> None:
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 3.0]])
    z = torch.tensor([[[[0.9, -1.5]], [[1.2, 2.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    quantized = quantize_latent(z, codebook)
    assert quantized[0, :, 0, 0].tolist() == [1.0, 1.0]
    assert quantized[0, :, 0, 1].tolist() == [-2.0, 3.0]
    quantized.sum().backward()
    assert z.grad is not None
    assert torch.equal(z.grad, torch.ones_like(z))


def test_replace_grad_and_stop() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = replace_grad(x * 10, x * 3)
    assert y.tolist() == [10.0, 20.0]
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [3.0, 3.0]

    target = PromptTarget("cat", torch.tensor([1.0, 0.0]), weight=2.0, stop=0.5)
    near = torch.tensor([[1.0, 0.1]], requires_grad=True)
    loss = target.loss(near)
    expected = 2 * float(spherical_distance(near.detach(), target.embedding))
    assert float(loss.detach()) == pytest.approx(expected)
    loss.backward()
    assert near.grad is not None
    assert torch.count_nonzero(near.grad) == 0


def test_cutouts_shape_and_seed() -> None:
    image = torch.rand(1, 3, 40, 24)
    cutouts = MakeCutouts(cut_size=16, cutn=5, cut_pow=1.0)
    torch.manual_seed(1)
    first = cutouts(image)
    torch.manual_seed(1)
    second = cutouts(image)
    assert first.shape == (5, 3, 16, 16)
    assert torch.equal(first, second)


# Sizes and memory.


def test_round_size_to_factor(caplog: pytest.LogCaptureFixture) -> None:
    assert round_size(64, 48, 16) == (64, 48)
    with caplog.at_level(logging.WARNING, logger="generator.generate"):
        assert round_size(250, 7, 16) == (256, 16)
    assert "250x7" in caplog.text
    assert "256x16" in caplog.text


def test_memory_estimate_scales() -> None:
    small = estimate_memory(128, 128, 16, [224])
    large = estimate_memory(256, 256, 32, [224])
    assert 0.5e9 < small < large
    # The model is fitted to about 2.2 GB beyond the models at 256x256, 32 cutouts.
    assert large == pytest.approx(2.15e9, rel=0.05)


def test_too_large_rejected(models: Models, request_for: Any) -> None:
    request = request_for(width=4096, height=4096, cutn=256)
    with pytest.raises(RequestError, match=r"4096x4096 pixels with 256 cutouts needs about"):
        generate(request, models=models, threads=1)


# The whole loop.


def test_generate_makes_image(models: Models, request_for: Any) -> None:
    request = request_for(width=36, height=30)
    image = generate(request, models=models, threads=1)
    assert image.mode == "RGB"
    assert image.size == (36, 32)
    colours = np.unique(np.asarray(image).reshape(-1, 3), axis=0)
    assert len(colours) > 10


def test_same_seed_same_bytes(models: Models, request_for: Any) -> None:
    first = png(generate(request_for(), models=models, threads=1))
    second = png(generate(request_for(), models=models, threads=1))
    other_seed = png(generate(request_for(seed=4), models=models, threads=1))
    assert first == second
    assert first != other_seed


def test_progress_values(models: Models, request_for: Any) -> None:
    calls: list[Progress] = []
    request = request_for("a red apple:2 | a hat --no fog", iterations=5, progress_every=2)
    image = generate(request, calls.append, models=models, threads=1)

    assert [p.iteration for p in calls] == [1, 2, 3, 4, 5]
    assert {p.total for p in calls} == {5}
    assert [p.image is not None for p in calls] == [False, True, False, True, True]
    for progress in calls:
        assert set(progress.losses) == {"a red apple", "a hat", "fog"}
        assert all(math.isfinite(value) for value in progress.losses.values())
        assert progress.losses["a red apple"] > 0
        assert progress.losses["fog"] < 0
    final = calls[-1].image
    assert final is not None
    assert png(final) == png(image)


def test_positive_prompt_pulls(models: Models, request_for: Any) -> None:
    images: list[Image.Image] = []
    losses: list[float] = []

    def record(progress: Progress) -> None:
        losses.append(progress.losses["a red apple"])
        if progress.image is not None:
            images.append(progress.image)

    request = request_for("a red apple", iterations=20, cutn=8, lr=0.2, progress_every=1)
    generate(request, record, models=models, threads=1)

    # The loss on augmented cutouts is noisy with a random-weight CLIP, so the
    # check uses the distance of the whole image, measured without augmentation.
    start = clean_distance(models, images[0], "a red apple")
    end = clean_distance(models, images[-1], "a red apple")
    assert end < start - 0.02
    assert sum(losses[-5:]) < sum(losses[:5]) + 0.1


def test_negative_prompt_pushes(models: Models, request_for: Any) -> None:
    settings = {"iterations": 20, "cutn": 8, "lr": 0.2}
    without = generate(request_for("a red apple", **settings), models=models, threads=1)
    with_negative = generate(
        request_for("a red apple --no a blue sky", **settings), models=models, threads=1
    )
    assert clean_distance(models, with_negative, "a blue sky") > clean_distance(
        models, without, "a blue sky"
    )


def test_cancel_within_one_iteration(models: Models, request_for: Any) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def stop_at_two(progress: Progress) -> None:
        seen.append(progress.iteration)
        if progress.iteration == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled) as caught:
        generate(request_for(iterations=10), stop_at_two, cancel, models=models, threads=1)
    assert caught.value.iteration == 2
    assert seen == [1, 2]


def test_cancel_before_start(models: Models, request_for: Any) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled) as caught:
        generate(request_for(), cancel=cancel, models=models, threads=1)
    assert caught.value.iteration == 0


def test_resume_matches_uninterrupted(models: Models, request_for: Any, tmp_path: Path) -> None:
    request = request_for(iterations=6, progress_every=2)
    uninterrupted = png(generate(request, models=models, threads=1))

    cancel = threading.Event()
    path = tmp_path / "job.state"
    states: list[int] = []

    def keep_state(state: dict[str, Any]) -> None:
        states.append(state["iteration"])
        save_state(state, path)
        cancel.set()

    with pytest.raises(GenerationCancelled):
        generate(request, cancel=cancel, models=models, on_state=keep_state, threads=1)
    assert states == [2]

    # Another torch RNG draw in between must not matter, the state carries its own.
    torch.rand(7)
    resumed_iterations: list[int] = []
    resumed = generate(
        request,
        lambda p: resumed_iterations.append(p.iteration),
        models=models,
        resume=load_state(path),
        threads=1,
    )
    assert resumed_iterations == [3, 4, 5, 6]
    assert png(resumed) == uninterrupted


def test_cancel_hands_over_latest_state(
    models: Models, request_for: Any, tmp_path: Path
) -> None:
    request = request_for(iterations=6, progress_every=2)
    uninterrupted = png(generate(request, models=models, threads=1))

    cancel = threading.Event()
    path = tmp_path / "job.state"
    states: list[int] = []

    def keep_state(state: dict[str, Any]) -> None:
        states.append(state["iteration"])
        save_state(state, path)

    def stop_after_three(p: Progress) -> None:
        if p.iteration == 3:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        generate(
            request, stop_after_three, cancel, models=models, on_state=keep_state, threads=1
        )
    assert states == [2, 3]

    resumed_iterations: list[int] = []
    resumed = generate(
        request,
        lambda p: resumed_iterations.append(p.iteration),
        models=models,
        resume=load_state(path),
        threads=1,
    )
    assert resumed_iterations == [4, 5, 6]
    assert png(resumed) == uninterrupted


def test_on_state_not_after_last(models: Models, request_for: Any) -> None:
    iterations: list[int] = []
    request = request_for(iterations=4, progress_every=2)
    generate(
        request, models=models, on_state=lambda s: iterations.append(s["iteration"]), threads=1
    )
    assert iterations == [2]


def test_resume_of_other_request_rejected(models: Models, request_for: Any) -> None:
    states: list[dict[str, Any]] = []
    request = request_for(iterations=4, progress_every=2)
    generate(request, models=models, on_state=states.append, threads=1)
    other = dataclasses.replace(request, seed=99)
    assert request_fingerprint(other) != request_fingerprint(request)
    with pytest.raises(RequestError, match="different request"):
        generate(other, models=models, resume=states[0], threads=1)


def test_init_image_starts_from_reconstruction(
    models: Models, request_for: Any, tmp_path: Path
) -> None:
    path = tmp_path / "init.png"
    gradient = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8)
    Image.fromarray(gradient, "RGB").save(path)

    request = request_for(init_image=str(path), iterations=1, lr=1e-6)
    image = generate(request, models=models, threads=1)

    pixels = torch.from_numpy(gradient.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = models.vqgan.encode(pixels * 2 - 1)[0]
        expected = models.vqgan.decode(z).add(1).div(2).clamp(0, 1)[0]
    expected_array = expected.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    difference = np.abs(np.asarray(image, dtype=np.int16) - expected_array.astype(np.int16))
    assert difference.max() <= 1


def test_missing_init_image_rejected(models: Models, request_for: Any, tmp_path: Path) -> None:
    request = request_for(init_image=str(tmp_path / "missing.png"))
    with pytest.raises(RequestError, match=r"init image .*missing\.png' was not found"):
        generate(request, models=models, threads=1)


def test_image_prompt_adds_loss(models: Models, request_for: Any, tmp_path: Path) -> None:
    path = tmp_path / "style.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(path)
    calls: list[Progress] = []
    request = request_for(image_prompts=[(str(path), 0.5)], iterations=2)
    generate(request, calls.append, models=models, threads=1)
    label = f"image:{path}"
    assert set(calls[0].losses) == {"a red apple", "fog", label}
    assert calls[0].losses[label] > 0


def test_not_an_image_rejected(models: Models, request_for: Any, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a picture")
    request = request_for(image_prompts=[(str(path), 1.0)])
    with pytest.raises(RequestError, match="could not be read as an image"):
        generate(request, models=models, threads=1)


def test_long_prompt_rejected(models: Models, request_for: Any) -> None:
    request = request_for(" ".join(["apple"] * 90))
    with pytest.raises(PromptError, match="92 tokens"):
        generate(request, models=models, threads=1)


def test_optimizer_by_name(models: Models, request_for: Any) -> None:
    groups: dict[str, dict[str, Any]] = {}
    for name in ("Adam", "sgd", "RMSprop"):
        states: list[dict[str, Any]] = []
        request = request_for(optimizer=name, iterations=2, progress_every=1)
        generate(request, models=models, on_state=states.append, threads=1)
        groups[name] = states[0]["optimizer"]["param_groups"][0]
    assert "betas" in groups["Adam"]
    assert "momentum" in groups["sgd"]
    assert "betas" not in groups["sgd"]
    assert "alpha" in groups["RMSprop"]
    with pytest.raises(RequestError, match="Unknown optimizer 'Lion'"):
        generate(request_for(optimizer="Lion"), models=models, threads=1)


def test_caller_state_restored(models: Models, request_for: Any) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        generate(request_for(iterations=1), models=models, threads=1)
        assert torch.equal(torch.rand(3), expected)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_threads_default_to_usable_cores(models: Models, request_for: Any) -> None:
    seen: list[int] = []
    generate(
        request_for(iterations=1), lambda p: seen.append(torch.get_num_threads()), models=models
    )
    assert seen == [len(os.sched_getaffinity(0))]


def test_clip_ensemble(tiny_models: TinyModels, request_for: Any) -> None:
    ensemble = load_models(tiny_models.vqgan, [tiny_models.clip, tiny_models.clip], "cpu")
    calls: list[Progress] = []
    generate(request_for(iterations=1), calls.append, models=ensemble, threads=1)
    single: list[Progress] = []
    single_models = dataclasses.replace(ensemble, clips=ensemble.clips[:1])
    generate(request_for(iterations=1), single.append, models=single_models, threads=1)
    # Each CLIP model gets its own cutouts, so the sum is near, not exactly, twice one model.
    ratio = calls[0].losses["a red apple"] / single[0].losses["a red apple"]
    assert 1.6 < ratio < 2.4


def test_gumbel_vqgan(tiny_models: TinyModels, request_for: Any, tmp_path: Path) -> None:
    checkpoint = build_tiny_gumbel_vqgan(tmp_path)
    gumbel = load_models(str(checkpoint), [tiny_models.clip], "cpu")
    request = request_for(vqgan=str(checkpoint), iterations=2)
    image = generate(request, models=gumbel, threads=1)
    assert image.size == (32, 32)


def test_loads_models_from_request(request_for: Any) -> None:
    request = request_for(iterations=1, prompts=[Prompt("a cat")])
    image = generate(request, device="cpu", threads=1)
    assert image.size == (32, 32)
