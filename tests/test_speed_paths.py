"""The faster compute paths of the models give the plain paths' results.

Each fast path (folded upsampling convolution and fused SiLU in the VQGAN,
matmul patch embedding and SDPA attention in CLIP) is compared with the plain
sequence it replaces, forward and for the input gradient the generator needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generator import Models, load_models
from generator.clip import PatchEmbedding, load_clip, use_matmul_patch_embedding
from generator.cutouts import normalize
from generator.losses import PromptTarget, clamp_with_grad, quantize_latent
from generator.testing import TinyModels
from generator.vqgan import Upsample, swish, upsample_conv

TOLERANCE = 1e-5


def _relative_difference(fast: Tensor, plain: Tensor) -> float:
    """Largest absolute difference over the plain tensor's largest magnitude (at least 1)."""
    return ((fast - plain).abs().max() / plain.abs().max().clamp(min=1.0)).item()


def _with_input_grad(function: nn.Module | object, x: Tensor) -> tuple[Tensor, Tensor]:
    """Return function(x) and the gradient of a fixed random projection of it with respect to x."""
    x = x.clone().requires_grad_(True)
    out = function(x)  # type: ignore[operator]
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * projection).sum().backward()
    assert x.grad is not None
    return out.detach(), x.grad


def test_swish_is_x_sigmoid_x() -> None:
    x = torch.linspace(-30, 30, 10_001)
    assert torch.allclose(swish(x), x * torch.sigmoid(x), rtol=1e-6, atol=1e-7)


def test_upsample_conv_matches_upsample_then_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel_size=3, padding=1).requires_grad_(False)
    x = torch.randn(2, 6, 7, 4)

    def plain(t: Tensor) -> Tensor:
        return conv(F.interpolate(t, scale_factor=2.0, mode="nearest"))

    fast_out, fast_grad = _with_input_grad(lambda t: upsample_conv(t, conv.weight, conv.bias), x)
    plain_out, plain_grad = _with_input_grad(plain, x)

    assert fast_out.shape == (2, 5, 14, 8)
    assert (fast_out - plain_out).abs().max().item() <= TOLERANCE
    assert (fast_grad - plain_grad).abs().max().item() <= TOLERANCE


def test_upsample_module_switch() -> None:
    torch.manual_seed(0)
    module = Upsample(4, with_conv=True).requires_grad_(False)
    x = torch.randn(1, 4, 5, 5)
    folded = module(x)
    module.folded = False
    plain = module(x)
    assert (folded - plain).abs().max().item() <= TOLERANCE
    # A failing fold would show up as a different result, not as equal outputs.
    assert not torch.equal(folded, F.interpolate(module.conv(x), scale_factor=2.0))


def test_patch_embedding_matches_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, kernel_size=8, stride=8, bias=False).requires_grad_(False)
    # 35 is not a multiple of 8: the convolution ignores the last 3 rows and columns.
    x = torch.randn(3, 3, 35, 35)

    fast_out, fast_grad = _with_input_grad(PatchEmbedding(conv), x)
    plain_out, plain_grad = _with_input_grad(conv, x)

    assert fast_out.shape == plain_out.shape == (3, 16, 4, 4)
    assert (fast_out - plain_out).abs().max().item() <= TOLERANCE
    assert (fast_grad - plain_grad).abs().max().item() <= TOLERANCE


def test_patch_embedding_only_for_patch_convolutions() -> None:
    assert PatchEmbedding.fits(nn.Conv2d(3, 8, kernel_size=4, stride=4))
    assert not PatchEmbedding.fits(nn.Conv2d(3, 8, kernel_size=4, stride=2))
    assert not PatchEmbedding.fits(nn.Conv2d(3, 8, kernel_size=4, stride=4, padding=1))
    assert not PatchEmbedding.fits(nn.Conv2d(6, 8, kernel_size=4, stride=4, groups=2))


def test_clip_fast_paths_match_plain(tiny_models: TinyModels) -> None:
    fast = load_clip(tiny_models.clip)
    plain = load_clip(tiny_models.clip, sdpa_attention=False, matmul_patch_embedding=False)
    assert isinstance(fast.model.visual.conv1, PatchEmbedding)
    assert type(plain.model.visual.conv1) is nn.Conv2d
    assert fast.model.state_dict().keys() == plain.model.state_dict().keys()

    torch.manual_seed(0)
    images = torch.rand(4, 3, plain.input_size, plain.input_size)
    fast_out, fast_grad = _with_input_grad(fast.encode_image, images)
    plain_out, plain_grad = _with_input_grad(plain.encode_image, images)

    assert (fast_out - plain_out).abs().max().item() <= TOLERANCE
    assert _relative_difference(fast_grad, plain_grad) <= TOLERANCE
    assert use_matmul_patch_embedding(plain.model) == 1


def _objective_gradient(models: Models, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step's image, loss and gradient on z, composed as generate's step composes them."""
    clip = models.clips[0]
    codebook = models.vqgan.codebook.detach()
    with torch.no_grad():
        target = PromptTarget("fog", clip.encode_text(["fog"])[0], 1.0)

    z = z.clone().requires_grad_(True)
    image = clamp_with_grad(models.vqgan.decode(quantize_latent(z, codebook)).add(1).div(2), 0, 1)
    # A fixed set of crops (the corners and the centre) instead of random cutouts.
    side, size = image.shape[-1], clip.input_size
    offsets = [(0, 0), (0, side - size), (side - size, 0), (side - size, side - size)]
    crops = torch.cat([image[:, :, y : y + size, x : x + size] for y, x in offsets])
    loss = target.loss(clip.encode_image(normalize(crops, clip.mean, clip.std)))
    loss.backward()
    assert z.grad is not None
    return image.detach(), loss.detach(), z.grad


def test_step_gradient_matches_plain_models(tiny_models: TinyModels) -> None:
    fast = load_models(tiny_models.vqgan, [tiny_models.clip], "cpu")
    plain = load_models(tiny_models.vqgan, [tiny_models.clip], "cpu")
    plain.clips = [load_clip(tiny_models.clip, sdpa_attention=False, matmul_patch_embedding=False)]
    folded = [m for m in plain.vqgan.modules() if isinstance(m, Upsample) and m.with_conv]
    assert folded, "the tiny VQGAN should upsample with a convolution"
    for module in folded:
        module.folded = False

    torch.manual_seed(0)
    codebook = fast.vqgan.codebook.detach()
    cells = 64 // fast.vqgan.factor
    z = codebook[torch.randint(codebook.shape[0], (cells * cells,))]
    z = z.view(1, cells, cells, -1).permute(0, 3, 1, 2).contiguous()

    fast_image, fast_loss, fast_grad = _objective_gradient(fast, z)
    plain_image, plain_loss, plain_grad = _objective_gradient(plain, z)

    assert (fast_image - plain_image).abs().max().item() <= TOLERANCE
    assert abs(fast_loss.item() - plain_loss.item()) <= TOLERANCE
    assert _relative_difference(fast_grad, plain_grad) <= TOLERANCE
