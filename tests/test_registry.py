"""The VQGAN registry data file and its reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from generator import registry
from generator.errors import ModelError

REQUIRED = {
    "vqgan_imagenet_f16_16384": ("vector", 16, 16384),
    "vqgan_imagenet_f16_1024": ("vector", 16, 1024),
    "wikiart_16384": ("vector", 16, 16384),
    "gumbel_f8_8192": ("gumbel", 8, 8192),
}


def test_required_models_registered() -> None:
    names = registry.list_models()

    assert names[0] == "vqgan_imagenet_f16_16384"
    assert registry.default_model() == "vqgan_imagenet_f16_16384"
    for name, (quantizer, factor, n_embed) in REQUIRED.items():
        entry = registry.get_model(name)
        assert (entry.quantizer, entry.factor, entry.n_embed) == (quantizer, factor, n_embed)


def test_every_file_has_https_mirrors() -> None:
    for name in registry.list_models():
        for remote in registry.get_model(name).files:
            assert remote.urls, (name, remote.kind)
            for url in remote.urls:
                assert url.startswith("https://"), url


def test_known_checksum_is_enforced() -> None:
    checkpoint = registry.get_model("vqgan_imagenet_f16_16384").checkpoint

    assert checkpoint.size == 980_092_370
    assert checkpoint.sha256 == "845a68805098cb666420d5db93df53f3a3b6dd443e6dd85c05759c5b998cd663"
    assert checkpoint.is_enforced("size")
    assert checkpoint.is_enforced("sha256")


def test_unknown_values_are_marked_unverified() -> None:
    for name in registry.list_models():
        for remote in registry.get_model(name).files:
            for field_name in ("size", "sha256"):
                if getattr(remote, field_name) is None:
                    assert field_name in remote.unverified, (name, remote.kind, field_name)


def test_unverified_value_is_not_enforced() -> None:
    config = registry.get_model("vqgan_imagenet_f16_16384").config

    assert config.sha256 is not None
    assert not config.is_enforced("sha256")
    assert not config.is_enforced("size")


def test_model_paths_layout(tmp_path: Path) -> None:
    checkpoint, config = registry.get_model("gumbel_f8_8192").paths(tmp_path)

    assert checkpoint == tmp_path / "gumbel_f8_8192.ckpt"
    assert config == tmp_path / "gumbel_f8_8192.yaml"


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="Unknown VQGAN model 'imagenet'") as raised:
        registry.get_model("imagenet")

    for name in REQUIRED:
        assert name in str(raised.value)


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAGINE_MODELS_DIR", raising=False)
    assert registry.default_models_dir() == Path("data/models")

    monkeypatch.setenv("IMAGINE_MODELS_DIR", str(tmp_path))
    assert registry.default_models_dir() == tmp_path


def test_configured_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAGINE_MODELS_DIR", raising=False)
    assert registry.configured_models_dir() is None

    # An empty value counts as unset, not as the current directory.
    monkeypatch.setenv("IMAGINE_MODELS_DIR", "")
    assert registry.configured_models_dir() is None
    assert registry.default_models_dir() == Path("data/models")

    monkeypatch.setenv("IMAGINE_MODELS_DIR", str(tmp_path))
    assert registry.configured_models_dir() == tmp_path


def _registry_data() -> dict[str, Any]:
    return json.loads(registry.REGISTRY_PATH.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(default="missing"), "unknown default"),
        (lambda d: d["models"]["gumbel_f8_8192"]["files"].pop("config"), "lacks files: config"),
        (
            lambda d: d["models"]["gumbel_f8_8192"]["files"]["checkpoint"].update(sha256="ABC"),
            "'sha256' must be 64 lowercase hex digits",
        ),
        (
            lambda d: d["models"]["gumbel_f8_8192"]["files"]["checkpoint"].update(urls=[]),
            "'urls' must be a non-empty list",
        ),
        (
            lambda d: d["models"]["gumbel_f8_8192"]["files"]["checkpoint"].update(size=-1),
            "'size' must be a positive integer",
        ),
        (
            lambda d: d["models"]["gumbel_f8_8192"]["files"]["checkpoint"].update(
                unverified=["colour"]
            ),
            "'unverified' may only list",
        ),
    ],
)
def test_malformed_registry_rejected(tmp_path: Path, change: Any, message: str) -> None:
    data = _registry_data()
    change(data)
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(data), encoding="utf-8")

    with pytest.raises(ModelError, match=message):
        registry.read_registry(path)


def test_unreadable_registry(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text("{not json", encoding="utf-8")

    with pytest.raises(ModelError, match="Cannot read the model registry"):
        registry.read_registry(path)
