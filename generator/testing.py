"""Tiny random-weight models written in the real file formats, for tests and the sandbox.

The files go through the same loading code as released models: a taming-style
Lightning ``.ckpt`` with a YAML config beside it, and an open_clip weights file
with its JSON model config beside it. Building them takes well under a second and
gives the same weights every time, without touching torch's global RNG state.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from omegaconf import OmegaConf

from generator.vqgan import VQGAN, VQGANConfig

TINY_VQGAN_NAME = "tiny-vqgan"
TINY_GUMBEL_NAME = "tiny-gumbel-vqgan"
TINY_CLIP_NAME = "imagine-tiny-clip"

# GroupNorm uses 32 groups, so channel counts must be multiples of 32. Three
# levels give a factor of 4: a 64x64 image is a 16x16 latent.
TINY_DDCONFIG: dict[str, Any] = {
    "double_z": False,
    "z_channels": 16,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
TINY_N_EMBED = 128
TINY_EMBED_DIM = 16

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Training-only weights that real checkpoints carry under `loss.`; loading must skip them.
_FAKE_LOSS_SHAPES = {
    "loss.logvar": (),
    "loss.perceptual_loss.net.slice1.0.weight": (4, 3, 3, 3),
    "loss.perceptual_loss.lin0.model.1.weight": (1, 4, 1, 1),
    "loss.discriminator.main.0.weight": (4, 3, 4, 4),
    "loss.discriminator.main.0.bias": (4,),
}


@dataclass(frozen=True)
class TinyModels:
    """Spec strings for load_vqgan and load_clip of the files build_tiny_models wrote."""

    vqgan: str
    clip: str


def _taming_yaml(target: str, params: dict[str, Any], loss_target: str) -> dict[str, Any]:
    params = {**params, "ddconfig": dict(TINY_DDCONFIG)}
    params["lossconfig"] = {
        "target": loss_target,
        "params": {
            "disc_conditional": False,
            "disc_in_channels": 3,
            "disc_start": 10000,
            "disc_weight": 0.8,
            "codebook_weight": 1.0,
        },
    }
    return {"model": {"base_learning_rate": 4.5e-06, "target": target, "params": params}}


def _lightning_checkpoint(model: torch.nn.Module) -> dict[str, Any]:
    state = OrderedDict(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    for key, shape in _FAKE_LOSS_SHAPES.items():
        state[key] = torch.randn(shape, generator=generator)
    return {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state,
        "optimizer_states": [],
        "lr_schedulers": [],
    }


def _write_vqgan(directory: Path, name: str, yaml_config: dict[str, Any], seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = directory / f"{name}.ckpt"
    config = VQGANConfig.from_taming(yaml_config, source=name)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQGAN(config, name=name)
        # A unit-variance codebook makes decoded random codes visibly different.
        torch.nn.init.normal_(model.codebook)

    torch.save(_lightning_checkpoint(model), checkpoint)
    OmegaConf.save(OmegaConf.create(yaml_config), directory / f"{name}.yaml")
    return checkpoint


def build_tiny_vqgan(directory: Path) -> Path:
    """Write ``tiny-vqgan.ckpt`` and ``tiny-vqgan.yaml`` (vector quantiser, factor 4).

    Returns the checkpoint path.
    """
    yaml_config = _taming_yaml(
        "taming.models.vqgan.VQModel",
        {"embed_dim": TINY_EMBED_DIM, "n_embed": TINY_N_EMBED},
        "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
    )
    return _write_vqgan(Path(directory), TINY_VQGAN_NAME, yaml_config, seed=0)


def build_tiny_gumbel_vqgan(directory: Path) -> Path:
    """Write ``tiny-gumbel-vqgan.ckpt`` and ``.yaml`` in taming's GumbelVQ format (factor 4).

    Returns the checkpoint path.
    """
    yaml_config = _taming_yaml(
        "taming.models.vqgan.GumbelVQ",
        {
            "embed_dim": TINY_EMBED_DIM,
            "n_embed": TINY_N_EMBED,
            "kl_weight": 1.0e-08,
            "temperature_scheduler_config": {
                "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                "params": {
                    "warm_up_steps": 0,
                    "max_decay_steps": 1000001,
                    "lr_start": 0.9,
                    "lr_max": 0.9,
                    "lr_min": 1.0e-06,
                },
            },
        },
        "taming.modules.losses.vqperceptual.DummyLoss",
    )
    return _write_vqgan(Path(directory), TINY_GUMBEL_NAME, yaml_config, seed=2)


def build_tiny_clip(directory: Path) -> str:
    """Write ``imagine-tiny-clip.json`` and ``imagine-tiny-clip.pt``; return the CLIP spec.

    The spec is ``imagine-tiny-clip/<absolute path of the .pt file>``. Input images are 32x32.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{TINY_CLIP_NAME}.json"
    weights_path = directory / f"{TINY_CLIP_NAME}.pt"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)

    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), weights_path)
    return f"{TINY_CLIP_NAME}/{weights_path.resolve()}"


def build_tiny_models(directory: Path) -> TinyModels:
    """Write a tiny VQGAN and a tiny CLIP into `directory`; return their spec strings."""
    directory = Path(directory)
    checkpoint = build_tiny_vqgan(directory)
    return TinyModels(vqgan=str(checkpoint.resolve()), clip=build_tiny_clip(directory))
