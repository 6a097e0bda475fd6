"""Our VQGAN modules against taming-transformers' own, with one set of random weights.

taming's ``taming.modules.*`` import with torch, numpy and einops alone. Its
``taming.models.vqgan`` needs pytorch-lightning, so the reference VQModel's
encode and decode are composed here from the modules.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from generator.vqgan import VQGAN, VQGANConfig

taming_model = pytest.importorskip(
    "taming.modules.diffusionmodules.model",
    reason="taming-transformers-rom1504 is not installed (pip install --no-deps "
    "taming-transformers-rom1504==0.0.6 einops)",
)
taming_quantize = pytest.importorskip(
    "taming.modules.vqvae.quantize", reason="taming-transformers-rom1504 is not installed"
)

TOLERANCE = 1e-5

# Small but complete: two resolution levels with attention at the lower one, a
# channel change (so nin_shortcut exists), and z_channels != embed_dim.
DDCONFIG: dict[str, Any] = {
    "double_z": False,
    "z_channels": 32,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "dropout": 0.0,
}
N_EMBED = 96
EMBED_DIM = 24
KL_WEIGHT = 5e-4


def _ours(quantizer: str) -> VQGAN:
    embed_dim = EMBED_DIM if quantizer == "vector" else DDCONFIG["z_channels"]
    config = VQGANConfig.from_taming(
        {
            "model": {
                "target": "taming.models.vqgan.GumbelVQ"
                if quantizer == "gumbel"
                else "taming.models.vqgan.VQModel",
                "params": {
                    "ddconfig": DDCONFIG,
                    "n_embed": N_EMBED,
                    "embed_dim": embed_dim,
                    "kl_weight": KL_WEIGHT,
                },
            }
        }
    )
    torch.manual_seed(0)
    model = VQGAN(config)
    # Spread the weights so activations are not tiny and differences would show.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


class TamingReference(torch.nn.Module):
    """taming's VQModel.encode / decode assembled from its modules."""

    def __init__(self, quantizer: str, embed_dim: int) -> None:
        super().__init__()
        with contextlib.redirect_stdout(io.StringIO()):  # taming prints the z shape
            self.encoder = taming_model.Encoder(**DDCONFIG)
            self.decoder = taming_model.Decoder(**DDCONFIG)
        z_channels = DDCONFIG["z_channels"]
        if quantizer == "gumbel":
            self.quantize = taming_quantize.GumbelQuantize(
                z_channels, embed_dim, n_embed=N_EMBED, kl_weight=KL_WEIGHT, temp_init=1.0
            )
        else:
            self.quantize = taming_quantize.VectorQuantizer2(N_EMBED, embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x: torch.Tensor) -> Any:
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))


@pytest.fixture(params=["vector", "gumbel"])
def pair(request: pytest.FixtureRequest) -> tuple[VQGAN, TamingReference]:
    torch.set_num_threads(1)
    ours = _ours(request.param)
    reference = TamingReference(request.param, ours.embed_dim)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference.eval()


def _image(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 32, 48, generator=generator) * 2 - 1


def test_state_dict_keys_match(pair: tuple[VQGAN, TamingReference]) -> None:
    ours, reference = pair

    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes


@torch.no_grad()
def test_encode_matches_taming(pair: tuple[VQGAN, TamingReference]) -> None:
    ours, reference = pair
    x = _image(1)

    # The Gumbel quantiser samples noise even in eval mode: same seed for both.
    torch.manual_seed(5)
    ours_quant, ours_loss, (_, _, ours_indices) = ours.encode(x)
    torch.manual_seed(5)
    ref_quant, ref_loss, (_, _, ref_indices) = reference.encode(x)

    assert ours_quant.shape == (2, ours.embed_dim, 16, 24)
    assert (ours_quant - ref_quant).abs().max().item() <= TOLERANCE
    assert abs(ours_loss.item() - ref_loss.item()) <= TOLERANCE
    assert torch.equal(ours_indices, ref_indices)


@torch.no_grad()
def test_encoder_features_match_taming(pair: tuple[VQGAN, TamingReference]) -> None:
    ours, reference = pair
    x = _image(2)

    difference = (ours.encoder(x) - reference.encoder(x)).abs().max().item()

    assert difference <= TOLERANCE


@torch.no_grad()
def test_decode_matches_taming(pair: tuple[VQGAN, TamingReference]) -> None:
    ours, reference = pair
    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(N_EMBED, (2, 16, 24), generator=generator)
    quant = F.embedding(indices, ours.codebook).permute(0, 3, 1, 2)

    ours_image = ours.decode(quant)
    ref_image = reference.decode(quant)

    assert ours_image.shape == (2, 3, 32, 48)
    assert ours_image.abs().max().item() > 0.1
    assert (ours_image - ref_image).abs().max().item() <= TOLERANCE


def test_decode_gradients_match_taming(pair: tuple[VQGAN, TamingReference]) -> None:
    ours, reference = pair
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(1, ours.embed_dim, 8, 8, generator=generator)
    z_ours = z.clone().requires_grad_(True)
    z_ref = z.clone().requires_grad_(True)

    ours.decode(z_ours).square().mean().backward()
    reference.decode(z_ref).square().mean().backward()

    assert (z_ours.grad - z_ref.grad).abs().max().item() <= TOLERANCE


# Architecture of the released f16 16384 VQGAN (its configs/model.yaml). A
# Lightning checkpoint of it has 144 encoder, 194 decoder, 2 quant_conv,
# 2 post_quant_conv and 1 quantize tensor.
F16_DDCONFIG: dict[str, Any] = {
    "double_z": False,
    "z_channels": 256,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "dropout": 0.0,
}


def test_released_f16_architecture() -> None:
    config = VQGANConfig.from_taming(
        {
            "model": {
                "target": "taming.models.vqgan.VQModel",
                "params": {"ddconfig": F16_DDCONFIG, "n_embed": 16384, "embed_dim": 256},
            }
        }
    )
    with torch.device("meta"):
        model = VQGAN(config)
    counts: dict[str, int] = {}
    for key in model.state_dict():
        prefix = key.split(".")[0]
        counts[prefix] = counts.get(prefix, 0) + 1

    assert counts == {
        "encoder": 144,
        "decoder": 194,
        "quantize": 1,
        "quant_conv": 2,
        "post_quant_conv": 2,
    }
    assert model.factor == 16
    assert model.codebook.shape == (16384, 256)
    assert sum(p.numel() for p in model.encoder.parameters()) == 29_298_176
    assert sum(p.numel() for p in model.decoder.parameters()) == 42_449_795
