"""Loading VQGAN and CLIP from files in the real formats, and every loading error."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import threading
import time
import types
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import constants as hub_constants
from omegaconf import OmegaConf
from safetensors.torch import save_file

from generator.checkpoint import load_state_dict
from generator.clip import use_sdpa_attention
from generator.errors import ModelError
from generator.models import (
    find_and_load_clip,
    load_clip,
    load_models,
    load_vqgan,
    resolve_device,
)
from generator.testing import (
    TinyModels,
    build_tiny_clip,
    build_tiny_gumbel_vqgan,
    build_tiny_models,
    build_tiny_vqgan,
)

PL_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    build_tiny_models(directory)
    build_tiny_gumbel_vqgan(directory)
    return directory


@pytest.fixture
def tiny(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny VQGAN files that a test may change."""
    for name in ("tiny-vqgan.ckpt", "tiny-vqgan.yaml"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    return tmp_path / "tiny-vqgan.ckpt"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def _assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


# --- tiny models -----------------------------------------------------------


def test_tiny_vqgan_loads(tiny_dir: Path) -> None:
    model = load_vqgan(str(tiny_dir / "tiny-vqgan.ckpt"))

    assert model.name == "tiny-vqgan"
    assert model.factor == 4
    assert model.embed_dim == 16
    assert model.codebook.shape == (128, 16)
    assert model.codebook is model.quantize.embedding.weight
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    _assert_same_weights(model, _weights(tiny_dir / "tiny-vqgan.ckpt"))


def test_tiny_vqgan_encodes_and_decodes(tiny_dir: Path) -> None:
    model = load_vqgan(str(tiny_dir / "tiny-vqgan.ckpt"))
    x = torch.rand(1, 3, 64, 48) * 2 - 1

    with torch.no_grad():
        quant, _, (_, _, indices) = model.encode(x)
        image = model.decode(quant)

    assert quant.shape == (1, 16, 16, 12)
    assert indices.shape == (16 * 12,)
    assert image.shape == (1, 3, 64, 48)
    assert torch.isfinite(image).all()


def test_tiny_gumbel_vqgan_loads(tiny_dir: Path) -> None:
    model = load_vqgan(str(tiny_dir / "tiny-gumbel-vqgan.ckpt"))

    assert model.is_gumbel
    assert model.codebook is model.quantize.embed.weight
    assert model.codebook.shape == (128, 16)
    with torch.no_grad():
        quant, _, _ = model.encode(torch.zeros(1, 3, 32, 32))
        image = model.decode(quant)
    assert image.shape == (1, 3, 32, 32)


def test_tiny_models_are_deterministic(tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()

    first = build_tiny_models(tmp_path / "a")
    second = build_tiny_models(tmp_path / "b")

    assert torch.equal(torch.get_rng_state(), rng_before)
    for name in ("tiny-vqgan.ckpt", "imagine-tiny-clip.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert isinstance(first, TinyModels)
    assert first.clip.startswith("imagine-tiny-clip/")
    assert second.vqgan.endswith("tiny-vqgan.ckpt")


def test_tiny_config_is_taming_format(tiny_dir: Path) -> None:
    config = OmegaConf.load(tiny_dir / "tiny-vqgan.yaml")

    assert config.model.target == "taming.models.vqgan.VQModel"
    assert (
        config.model.params.lossconfig.target
        == "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
    )
    keys = torch.load(tiny_dir / "tiny-vqgan.ckpt", weights_only=True)["state_dict"].keys()
    assert any(k.startswith("loss.") for k in keys)


# --- checkpoint formats ----------------------------------------------------


@pytest.fixture
def fake_lightning() -> Iterator[type]:
    """A stand-in for pytorch_lightning's ModelCheckpoint class, importable only while saving."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", PL_MODULE]
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": PL_MODULE})
    modules[PL_MODULE].ModelCheckpoint = model_checkpoint
    sys.modules.update(modules)
    yield model_checkpoint
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def _lightning_extras(tiny: Path, model_checkpoint: type) -> dict[str, object]:
    checkpoint = torch.load(tiny, weights_only=True)
    checkpoint["callbacks"] = {
        model_checkpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}
    }
    checkpoint["hyper_parameters"] = OmegaConf.load(tiny.with_suffix(".yaml")).model.params
    checkpoint["hparams_list"] = OmegaConf.create([1, "two", {"three": 3.0}])
    return checkpoint


def test_lightning_checkpoint_with_extras_loads(
    tiny: Path, fake_lightning: type
) -> None:
    expected = _weights(tiny)
    torch.save(_lightning_extras(tiny, fake_lightning), tiny)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", PL_MODULE):
        sys.modules.pop(name)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(tiny))
    assert f"{PL_MODULE}.ModelCheckpoint" in unsafe
    assert "omegaconf.dictconfig.DictConfig" in unsafe

    model = load_vqgan(str(tiny))

    _assert_same_weights(model, expected)
    assert PL_MODULE not in sys.modules


def test_plain_state_dict_loads(tiny: Path, tmp_path: Path) -> None:
    expected = _weights(tiny)
    plain = tmp_path / "plain.pt"
    torch.save(expected, plain)
    shutil.copy(tiny.with_suffix(".yaml"), plain.with_suffix(".yaml"))

    _assert_same_weights(load_vqgan(str(plain)), expected)


def test_safetensors_loads(tiny: Path, tmp_path: Path) -> None:
    expected = _weights(tiny)
    weights = tmp_path / "tensors.safetensors"
    save_file(expected, str(weights))
    shutil.copy(tiny.with_suffix(".yaml"), tmp_path / "tensors.yaml")

    _assert_same_weights(load_vqgan(str(weights)), expected)


class _RunsCode:
    """Pickles as a call to open(), which would create `marker` when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_unexpected_global_rejected(tiny: Path, tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "code-ran"
    checkpoint = torch.load(tiny, weights_only=True)
    checkpoint["shell"] = os.system
    checkpoint["payload"] = _RunsCode(marker)
    torch.save(checkpoint, tiny, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(ModelError, match="Refusing to load") as raised:
        load_vqgan(str(tiny))

    assert str(tiny) in str(raised.value)
    assert not marker.exists()
    assert "weights_only" not in str(raised.value)
    if zip_format:
        assert "posix.system" in str(raised.value)
        assert "io.open" in str(raised.value)
    else:
        assert "posix.system" in str(raised.value)


def test_truncated_checkpoint(tiny: Path) -> None:
    data = tiny.read_bytes()
    tiny.write_bytes(data[: len(data) // 2])

    with pytest.raises(ModelError, match="not a valid model checkpoint") as raised:
        load_vqgan(str(tiny))
    assert str(tiny) in str(raised.value)
    assert "miniz" not in str(raised.value)


def _zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "no tensors here")
    return buffer.getvalue()


NOT_CHECKPOINTS = {
    "text": (b"hello, this is text", "contains text"),
    "sentence": (b"this is not a checkpoint", "contains text"),
    "empty": (b"", "empty"),
    "html": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
    "json": (b'{"error": "Repository not found"}', "contains text"),
    "binary": (bytes(range(256)) * 8, "corrupt, incomplete or another kind of file"),
    "pickle protocol only": (b"\x80\x02", "corrupt, incomplete"),
    "zip of text": (_zip_of_text(), "corrupt, incomplete"),
}

# Phrases of torch's own error text that must not reach users.
TORCH_PHRASES = ("weights_only", "torch.load", "miniz", "arbitrary code", "()")


@pytest.mark.parametrize("content", list(NOT_CHECKPOINTS), ids=list(NOT_CHECKPOINTS))
def test_not_a_checkpoint_message(
    tiny: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, cause = NOT_CHECKPOINTS[content]
    tiny.write_bytes(data)

    with (
        caplog.at_level("DEBUG", logger="generator.checkpoint"),
        pytest.raises(ModelError) as raised,
    ):
        load_vqgan(str(tiny))

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{tiny} is not a valid model checkpoint ({len(data)} bytes)")
    assert cause in message
    assert "delete it and download it again" in message
    assert "check the path" in message
    for phrase in TORCH_PHRASES:
        assert phrase not in message, phrase
    assert "Reading" in caplog.text


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_cut_checkpoint_message(tiny: Path, keep: float) -> None:
    data = tiny.read_bytes()
    tiny.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(ModelError, match="corrupt, incomplete or another kind") as raised:
        load_vqgan(str(tiny))
    for phrase in TORCH_PHRASES:
        assert phrase not in str(raised.value), phrase


def test_truncated_safetensors(tiny: Path, tmp_path: Path) -> None:
    weights = tmp_path / "tensors.safetensors"
    save_file(_weights(tiny), str(weights))
    weights.write_bytes(weights.read_bytes()[:5000])
    shutil.copy(tiny.with_suffix(".yaml"), tmp_path / "tensors.yaml")

    with pytest.raises(ModelError, match="not a valid model checkpoint"):
        load_vqgan(str(weights))


def test_checkpoint_without_weights(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)

    with pytest.raises(ModelError, match="contains no weights"):
        load_state_dict(empty)


# --- files, names and configs ---------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "nothing.ckpt"

    with pytest.raises(ModelError, match="not found") as raised:
        load_vqgan(str(path))
    assert str(path) in str(raised.value)
    assert "vqgan_imagenet_f16_16384" in str(raised.value)


def test_missing_config_beside_checkpoint(tiny: Path) -> None:
    tiny.with_suffix(".yaml").unlink()

    with pytest.raises(ModelError, match="config missing") as raised:
        load_vqgan(str(tiny))
    assert str(tiny.with_suffix(".yaml")) in str(raised.value)


def test_config_checkpoint_shape_mismatch(tiny: Path) -> None:
    config_path = tiny.with_suffix(".yaml")
    config = OmegaConf.load(config_path)
    config.model.params.n_embed = 256
    OmegaConf.save(config, config_path)

    with pytest.raises(ModelError, match="does not match") as raised:
        load_vqgan(str(tiny))
    message = str(raised.value)
    assert "'quantize.embedding.weight'" in message
    assert "(128, 16)" in message
    assert "(256, 16)" in message


def test_config_with_fewer_levels(tiny: Path) -> None:
    config_path = tiny.with_suffix(".yaml")
    config = OmegaConf.load(config_path)
    config.model.params.ddconfig.ch_mult = [1, 2]
    OmegaConf.save(config, config_path)

    with pytest.raises(ModelError, match="does not match"):
        load_vqgan(str(tiny))


def test_unsupported_target(tiny: Path) -> None:
    config_path = tiny.with_suffix(".yaml")
    config = OmegaConf.load(config_path)
    config.model.target = "taming.models.cond_transformer.Net2NetTransformer"
    OmegaConf.save(config, config_path)

    with pytest.raises(ModelError, match="Net2NetTransformer") as raised:
        load_vqgan(str(tiny))
    assert "taming.models.vqgan.GumbelVQ" in str(raised.value)


def test_invalid_yaml(tiny: Path) -> None:
    tiny.with_suffix(".yaml").write_text("model: [unclosed\n")

    with pytest.raises(ModelError, match="Cannot read VQGAN config"):
        load_vqgan(str(tiny))


def test_unknown_registry_name() -> None:
    with pytest.raises(ModelError, match="Unknown VQGAN model 'imagenet_f99'") as raised:
        load_vqgan("imagenet_f99")
    assert "gumbel_f8_8192" in str(raised.value)


def test_registered_name_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="python -m generator download gumbel_f8_8192") as raised:
        load_vqgan("gumbel_f8_8192", models_dir=tmp_path, download=False)
    assert str(tmp_path / "gumbel_f8_8192.ckpt") in str(raised.value)


def test_registered_name_from_models_dir(tiny: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    checkpoint = models_dir / "vqgan_imagenet_f16_1024.ckpt"
    shutil.copy(tiny, checkpoint)
    shutil.copy(tiny.with_suffix(".yaml"), models_dir / "vqgan_imagenet_f16_1024.yaml")

    model = load_vqgan("vqgan_imagenet_f16_1024", models_dir=models_dir)

    assert model.name == "vqgan_imagenet_f16_1024"
    assert len(list((models_dir / "cache").glob("*.safetensors"))) == 1


def test_safetensors_cache_used_on_second_load(tiny: Path, tmp_path: Path) -> None:
    expected = _weights(tiny)
    models_dir = tmp_path / "models"
    load_vqgan(str(tiny), models_dir=models_dir)
    stat = tiny.stat()

    # Same size and mtime but unreadable bytes: only the cache can serve this load.
    tiny.write_bytes(b"\0" * stat.st_size)
    os.utime(tiny, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    model = load_vqgan(str(tiny), models_dir=models_dir)

    _assert_same_weights(model, expected)


def test_registered_checkpoint_with_wrong_size(tiny: Path, tmp_path: Path) -> None:
    shutil.copy(tiny, tmp_path / "vqgan_imagenet_f16_16384.ckpt")
    shutil.copy(tiny.with_suffix(".yaml"), tmp_path / "vqgan_imagenet_f16_16384.yaml")

    with pytest.raises(ModelError, match="expected 980092370"):
        load_vqgan("vqgan_imagenet_f16_16384", models_dir=tmp_path)


# --- CLIP --------------------------------------------------------------------


def test_tiny_clip_loads(tiny_dir: Path) -> None:
    spec = f"imagine-tiny-clip/{tiny_dir / 'imagine-tiny-clip.pt'}"

    clip = load_clip(spec)

    assert clip.name == spec
    assert clip.input_size == 32
    assert len(clip.mean) == len(clip.std) == 3
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())


def test_clip_embeddings_are_normalised(tiny_dir: Path) -> None:
    clip = load_clip(f"imagine-tiny-clip/{tiny_dir / 'imagine-tiny-clip.pt'}")
    images = torch.randn(3, 3, 32, 32, requires_grad=True)

    text = clip.encode_text(["a red fox", "fog"])
    image = clip.encode_image(images)
    image.sum().backward()

    assert text.shape == (2, 32)
    assert image.shape == (3, 32)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert images.grad is not None
    assert images.grad.abs().sum() > 0


def test_clip_relative_path_spec(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_dir.parent)

    clip = load_clip(f"imagine-tiny-clip/{tiny_dir.name}/imagine-tiny-clip.pt")

    assert clip.input_size == 32


def test_clip_spec_without_pretrained() -> None:
    with pytest.raises(ModelError, match="MODEL/PRETRAINED"):
        load_clip("ViT-B-32")


def test_clip_unknown_tag() -> None:
    with pytest.raises(ModelError, match="Unknown pretrained tag 'nonsense'") as raised:
        load_clip("ViT-B-32/nonsense")
    assert "openai" in str(raised.value)


def test_clip_unknown_architecture() -> None:
    with pytest.raises(ModelError, match="Unknown CLIP architecture 'ViT-Q-99'"):
        load_clip("ViT-Q-99/openai")


def test_clip_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"

    with pytest.raises(ModelError, match="not found") as raised:
        load_clip(f"ViT-B-32/{path}")
    assert str(path) in str(raised.value)


def test_clip_unknown_model_without_json(tiny_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    shutil.copy(tiny_dir / "imagine-tiny-clip.pt", weights)

    with pytest.raises(ModelError, match="Unknown CLIP architecture 'other-tiny'") as raised:
        load_clip(f"other-tiny/{weights}")
    assert str(tmp_path / "other-tiny.json") in str(raised.value)


def test_clip_weights_for_other_architecture(tmp_path: Path) -> None:
    spec = build_tiny_clip(tmp_path)
    weights = spec.split("/", 1)[1]

    with pytest.raises(ModelError, match="Cannot load CLIP weights") as raised:
        load_clip(f"RN50/{weights}")
    assert "!." not in str(raised.value)
    assert ".." not in str(raised.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("content", list(NOT_CHECKPOINTS), ids=list(NOT_CHECKPOINTS))
def test_clip_weights_not_a_checkpoint(
    tiny_dir: Path, tmp_path: Path, content: str, suffix: str
) -> None:
    data, _cause = NOT_CHECKPOINTS[content]
    weights = tmp_path / f"clip{suffix}"
    weights.write_bytes(data)
    shutil.copy(tiny_dir / "imagine-tiny-clip.json", tmp_path)

    with pytest.raises(ModelError) as raised:
        load_clip(f"imagine-tiny-clip/{weights}")

    message = str(raised.value)
    assert message.startswith(f"{weights} is not a valid model checkpoint ({len(data)} bytes)")
    assert "\n" not in message
    for phrase in TORCH_PHRASES:
        assert phrase not in message, phrase


# --- load_models and devices -------------------------------------------------


def test_load_models_ensemble(tiny_dir: Path) -> None:
    spec = f"imagine-tiny-clip/{tiny_dir / 'imagine-tiny-clip.pt'}"

    models = load_models(str(tiny_dir / "tiny-vqgan.ckpt"), [spec, spec], "cpu")

    assert models.device == torch.device("cpu")
    assert len(models.clips) == 2
    assert models.vqgan.factor == 4
    assert next(models.vqgan.parameters()).device == torch.device("cpu")


def test_load_models_needs_a_clip(tiny_dir: Path) -> None:
    with pytest.raises(ModelError, match="No CLIP model"):
        load_models(str(tiny_dir / "tiny-vqgan.ckpt"), [], "cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto
    with pytest.raises(ModelError, match="Invalid device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ModelError, match="cuda:99"):
        resolve_device("cuda:99")


def test_build_tiny_vqgan_path(tmp_path: Path) -> None:
    checkpoint = build_tiny_vqgan(tmp_path)

    assert checkpoint == tmp_path / "tiny-vqgan.ckpt"
    assert checkpoint.with_suffix(".yaml").is_file()


def test_clip_sdpa_attention_matches(tiny_dir: Path) -> None:
    spec = f"imagine-tiny-clip/{tiny_dir / 'imagine-tiny-clip.pt'}"
    fast = load_clip(spec, sdpa_attention=True)
    plain = load_clip(spec, sdpa_attention=False)
    images = torch.randn(2, 3, 32, 32)
    fast_images = images.clone().requires_grad_(True)
    plain_images = images.clone().requires_grad_(True)
    texts = ["a lighthouse at dusk", "fog"]

    fast_embedding = fast.encode_image(fast_images)
    plain_embedding = plain.encode_image(plain_images)
    fast_embedding.square().sum().backward()
    plain_embedding.square().sum().backward()
    text_difference = (fast.encode_text(texts) - plain.encode_text(texts)).abs().max()

    assert (fast_embedding - plain_embedding).abs().max().item() <= 1e-6
    assert (fast_images.grad - plain_images.grad).abs().max().item() <= 1e-6
    assert text_difference.item() <= 1e-5
    assert use_sdpa_attention(plain.model) == 4


def test_clip_json_beside_weights_wins(tmp_path: Path) -> None:
    first = build_tiny_clip(tmp_path / "first")
    load_clip(first)
    second_dir = tmp_path / "second"
    build_tiny_clip(second_dir)
    config = json.loads((second_dir / "imagine-tiny-clip.json").read_text())
    config["embed_dim"] = 48
    (second_dir / "imagine-tiny-clip.json").write_text(json.dumps(config))

    # The weights were saved for embed_dim 32, so the changed JSON must be the one used.
    with pytest.raises(ModelError, match="Cannot load CLIP weights"):
        load_clip(f"imagine-tiny-clip/{second_dir / 'imagine-tiny-clip.pt'}")
    assert load_clip(first).encode_text(["x"]).shape == (1, 32)


# --- CLIP weights by tag: offline, placed by hand, cached --------------------


TINY_TAG = "test"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _use_hub_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hub_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the Hugging Face Hub client at a loopback port nothing listens on."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    _use_hub_endpoint(monkeypatch, endpoint)
    return endpoint


@pytest.fixture
def hub_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Point the Hub client at a loopback server that answers 404 and records each request."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            requests.append(f"HEAD {self.path}")
            self.send_error(404)

        def do_GET(self) -> None:
            requests.append(f"GET {self.path}")
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _use_hub_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield requests
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def tiny_tag(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the tiny CLIP under the open_clip pretrained tag TINY_TAG."""
    config = json.loads((tiny_dir / "imagine-tiny-clip.json").read_text())
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "imagine-tiny-clip", config)
    tags = {
        TINY_TAG: {
            "hf_hub": "imagine/tiny-clip/",
            "mean": (0.25, 0.5, 0.75),
            "std": (0.5, 0.5, 0.5),
            "quick_gelu": False,
        }
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "imagine-tiny-clip", tags)
    return f"imagine-tiny-clip/{TINY_TAG}"


def test_offline_clip_fails_fast(tiny_dir: Path, tmp_path: Path, offline_hub: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelError) as raised:
        load_models(str(tiny_dir / "tiny-vqgan.ckpt"), "ViT-B-32/openai", "cpu", tmp_path)
    elapsed = time.perf_counter() - started

    message = str(raised.value)
    lines = message.splitlines()
    assert elapsed < 10
    assert lines[0].startswith("Could not download CLIP ViT-B-32/openai: cannot connect to 127.0")
    assert ".." not in message
    repository = f"{offline_hub}/timm/vit_base_patch32_clip_224.openai/resolve/main"
    assert f"  {repository}/open_clip_model.safetensors" in lines
    assert f"  {repository}/open_clip_pytorch_model.bin" in lines
    assert f"  {(tmp_path / 'clip' / 'ViT-B-32' / 'openai.safetensors').resolve()}" in lines


def test_offline_clip_with_hub_offline_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set") as raised:
        find_and_load_clip("ViT-B-32/openai", "cpu", tmp_path)
    assert str((tmp_path / "clip" / "ViT-B-32" / "openai.safetensors").resolve()) in str(
        raised.value
    )


def test_clip_placed_by_hand_loads_offline(
    tiny_dir: Path, tmp_path: Path, hub_requests: list[str], tiny_tag: str
) -> None:
    manual = tmp_path / "clip" / "imagine-tiny-clip" / f"{TINY_TAG}.bin"
    manual.parent.mkdir(parents=True)
    shutil.copy(tiny_dir / "imagine-tiny-clip.pt", manual)
    by_path = load_clip(f"imagine-tiny-clip/{tiny_dir / 'imagine-tiny-clip.pt'}")

    by_path = load_clip(f"imagine-tiny-clip/{tiny_dir / 'imagine-tiny-clip.pt'}")

    clip = find_and_load_clip(tiny_tag, "cpu", tmp_path)

    assert clip.name == tiny_tag
    assert clip.mean == (0.25, 0.5, 0.75)
    assert torch.equal(clip.encode_text(["a fox"]), by_path.encode_text(["a fox"]))
    assert hub_requests == []
    assert clip.std == (0.5, 0.5, 0.5)
    assert torch.equal(clip.encode_text(["a fox"]), by_path.encode_text(["a fox"]))
    assert hub_requests == []


def test_cached_clip_loads_without_request(
    tiny_dir: Path, tmp_path: Path, hub_requests: list[str], tiny_tag: str
) -> None:
    # The layout huggingface_hub gives a downloaded file: a snapshot named by
    # commit, and refs/main naming that commit.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "models--imagine--tiny-clip"
    snapshot = repository / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    state = torch.load(tiny_dir / "imagine-tiny-clip.pt", weights_only=True)
    save_file(state, str(snapshot / "open_clip_model.safetensors"))

    by_path = load_clip(f"imagine-tiny-clip/{tiny_dir / 'imagine-tiny-clip.pt'}")

    clip = find_and_load_clip(tiny_tag, "cpu", tmp_path)

    assert clip.name == tiny_tag
    assert clip.mean == (0.25, 0.5, 0.75)
    assert torch.equal(clip.encode_text(["a fox"]), by_path.encode_text(["a fox"]))
    assert hub_requests == []


def test_vqgan_error_names_missing_clip(tmp_path: Path, offline_hub: str) -> None:
    with pytest.raises(ModelError) as raised:
        load_models("no_such_vqgan", ["ViT-B-32/openai"], "cpu", tmp_path)

    lines = str(raised.value).splitlines()
    assert "Unknown VQGAN model 'no_such_vqgan'" in lines[0]
    manual = (tmp_path / "clip" / "ViT-B-32" / "openai.safetensors").resolve()
    repository = f"{offline_hub}/timm/vit_base_patch32_clip_224.openai/resolve/main"
    assert lines[-4].startswith("CLIP ViT-B-32/openai is not downloaded yet either.")
    assert lines[-3] == f"  {repository}/open_clip_model.safetensors"
    assert lines[-1] == f"  {manual}"


# --- where the safetensors copy of a VQGAN given by path goes ------------------


def test_path_vqgan_cache_in_models_dir_variable(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models_dir = tmp_path / "chosen"
    monkeypatch.setenv("IMAGINE_MODELS_DIR", str(models_dir))

    load_vqgan(str(tiny))

    assert len(list((models_dir / "cache").glob("tiny-vqgan.*.safetensors"))) == 1
