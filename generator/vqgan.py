"""VQGAN autoencoder modules that load taming-transformers checkpoints.

The module tree and parameter names match taming-transformers
(``taming/modules/diffusionmodules/model.py`` and ``taming/modules/vqvae/quantize.py``),
so a taming ``state_dict`` loads without renaming. Only what encoding and decoding
need is built: no training loss, no discriminator, no pytorch-lightning.

Reference: Esser, Rombach and Ommer, "Taming Transformers for High-Resolution Image
Synthesis" (2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generator.errors import ModelError

# Values of a taming YAML's `model.target` and the quantiser each one uses.
QUANTIZER_BY_TARGET = {
    "taming.models.vqgan.VQModel": "vector",
    "taming.models.vqgan.GumbelVQ": "gumbel",
}

# ddconfig keys the encoder and decoder need; the rest (for example `double_z`,
# `dropout`, `resamp_with_conv`) have defaults.
REQUIRED_DDCONFIG_KEYS = (
    "ch",
    "out_ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "in_channels",
    "resolution",
    "z_channels",
)


def swish(x: Tensor) -> Tensor:
    """Swish (SiLU) nonlinearity, x * sigmoid(x), in one pass over memory."""
    return F.silu(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as in taming."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

        # Whether forward folds the upsampling into the convolution (same result,
        # fewer multiply-adds); False gives taming's literal sequence.
        self.folded = True

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv and self.folded and _foldable(self.conv):
            return upsample_conv(x, self.conv.weight, self.conv.bias)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


def _foldable(conv: nn.Conv2d) -> bool:
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _fold_taps(weight: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Fold a 3-tap kernel axis into the 2-tap kernels of the even and odd output phases.

    Along an upsampled axis, even output 2i reads inputs i-1, i, i (taps 0, 1, 2)
    and odd output 2i+1 reads i, i, i+1.
    """
    t0, t1, t2 = weight.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def upsample_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` (zero padding 1) computed at the input's resolution.

    Each of the four output phases (even or odd row, even or odd column) reads
    only a 2x2 neighbourhood of input pixels, so its 3x3 kernel folds into a
    2x2 kernel: 16 instead of 36 multiply-adds per input pixel and channel
    pair. The result equals the upsample-then-convolve sequence up to float
    rounding.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    phases = []
    for row, row_kernel in enumerate(_fold_taps(weight, 2)):
        for column, kernel in enumerate(_fold_taps(row_kernel, 3)):
            window = padded[:, :, row : row + height + 1, column : column + width + 1]
            phases.append(F.conv2d(window, kernel, bias))

    # Channel c * 4 + row * 2 + column of the stack goes to pixel (2i + row, 2j + column).
    stacked = torch.stack(phases, dim=2).reshape(batch, -1, height, width)
    return F.pixel_shuffle(stacked, 2)


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution (or average pooling)."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)

        # Taming pads only the right and bottom edges, which Conv2d cannot express.
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
        return self.conv(x)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: two GroupNorm-swish-conv stages and a shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float, conv_shortcut: bool = False
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(
                    in_channels, out_channels, kernel_size=3, stride=1, padding=1
                )
            else:
                self.nin_shortcut = nn.Conv2d(
                    in_channels, out_channels, kernel_size=1, stride=1, padding=0
                )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))

        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape

        # (b, c, h, w) -> (b, 1, h*w, c): one attention head whose tokens are positions.
        def tokens(t: Tensor) -> Tensor:
            return t.reshape(b, 1, c, height * width).transpose(2, 3)

        # Scaled dot-product attention computes the same softmax(q k^T / sqrt(c)) v as
        # taming's explicit bmm version, in fewer passes over memory.
        h = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


def _level_module(
    blocks: nn.ModuleList, attns: nn.ModuleList, resample: nn.Module | None, name: str
) -> nn.Module:
    """Group one resolution level's blocks as taming does (`block`, `attn`, resample)."""
    level = nn.Module()
    level.block = blocks
    level.attn = attns
    if resample is not None:
        setattr(level, name, resample)
    return level


def _middle(channels: int, dropout: float) -> nn.Module:
    middle = nn.Module()
    middle.block_1 = ResnetBlock(channels, channels, dropout)
    middle.attn_1 = AttnBlock(channels)
    middle.block_2 = ResnetBlock(channels, channels, dropout)
    return middle


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_middle(middle: nn.Module, h: Tensor) -> Tensor:
    return middle.block_2(middle.attn_1(middle.block_1(h)))


class Encoder(nn.Module):
    """Convolutional encoder: image (N, in_channels, H, W) -> (N, z_channels[*2], H/f, W/f)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        in_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        double_z: bool = True,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1, *ch_mult)
        current_resolution = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            downsample = None
            if i_level != self.num_resolutions - 1:
                downsample = Downsample(block_in, resamp_with_conv)
                current_resolution //= 2
            self.down.append(_level_module(blocks, attns, downsample, "downsample"))

        self.mid = _middle(block_in, dropout)
        self.norm_out = group_norm(block_in)
        out_channels = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            h = _run_level(level, h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)

        h = _run_middle(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Convolutional decoder: latent (N, z_channels, h, w) -> image (N, out_ch, h*f, w*f)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        give_pre_end: bool = False,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.give_pre_end = give_pre_end
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _middle(block_in, dropout)

        # Built from the lowest resolution up but stored in encoder order, as taming
        # does, so `up.0` is the full-resolution level in the state_dict.
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            upsample = None
            if i_level != 0:
                upsample = Upsample(block_in, resamp_with_conv)
                current_resolution *= 2
            levels.insert(0, _level_module(blocks, attns, upsample, "upsample"))
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            h = _run_level(level, h)
            if i_level != 0:
                h = level.upsample(h)

        if self.give_pre_end:
            return h
        return self.conv_out(swish(self.norm_out(h)))


QuantizerOutput = tuple[Tensor, Tensor, tuple[None, None, Tensor]]


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantiser with a straight-through gradient.

    Matches taming's ``VectorQuantizer2``. With ``legacy=True`` (taming's default and
    what every released checkpoint used) the commitment weight ``beta`` multiplies
    the codebook term instead of the commitment term. The loss does not affect the
    quantised output.
    """

    def __init__(
        self, n_e: int, e_dim: int, beta: float = 0.25, legacy: bool = True,
        sane_index_shape: bool = False,
    ) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise z (N, e_dim, H, W); return (z_q, loss, (None, None, indices))."""
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flat = z.view(-1, self.e_dim)
        codebook = self.embedding.weight

        # Squared distances |z|^2 + |e|^2 - 2 z.e, the expansion taming uses, so ties
        # break the same way.
        distances = (
            z_flat.pow(2).sum(dim=1, keepdim=True)
            + codebook.pow(2).sum(dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flat, codebook.t())
        )
        indices = distances.argmin(dim=1)
        z_q = self.embedding(indices).view(z.shape)

        codebook_term = torch.mean((z_q - z.detach()) ** 2)
        commitment_term = torch.mean((z_q.detach() - z) ** 2)
        if self.legacy:
            loss = commitment_term + self.beta * codebook_term
        else:
            loss = self.beta * commitment_term + codebook_term

        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(
        self, indices: Tensor, shape: tuple[int, int, int, int] | None
    ) -> Tensor:
        """Look up codebook vectors; with shape (N, H, W, C) return them as (N, C, H, W)."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class GumbelQuantize(nn.Module):
    """Gumbel-softmax quantiser (Jang et al. 2016, "Categorical Reparameterization with
    Gumbel-Softmax"), as in taming's ``GumbelQuantize``.

    A 1x1 convolution ``proj`` turns features into logits over ``n_embed`` codes, and
    ``embed`` contains the code vectors. Sampling uses torch's global RNG, in eval mode
    too, so seed it for reproducible encodings.
    """

    def __init__(
        self, num_hiddens: int, embedding_dim: int, n_embed: int, straight_through: bool = True,
        kl_weight: float = 5e-4, temp_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.n_embed = n_embed
        self.straight_through = straight_through
        self.temperature = temp_init
        self.kl_weight = kl_weight
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    def forward(self, z: Tensor, temp: float | None = None) -> QuantizerOutput:
        """Quantise z (N, num_hiddens, H, W); return (z_q, kl_loss, (None, None, indices))."""
        hard = self.straight_through if self.training else True
        tau = self.temperature if temp is None else temp

        logits = self.proj(z)
        one_hot = F.gumbel_softmax(logits, tau=tau, dim=1, hard=hard)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)

        # KL divergence from a uniform prior over the codes.
        probabilities = F.softmax(logits, dim=1)
        kl = torch.sum(probabilities * torch.log(probabilities * self.n_embed + 1e-10), dim=1)
        loss = self.kl_weight * kl.mean()
        return z_q, loss, (None, None, one_hot.argmax(dim=1))

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        """Look up code vectors for flat indices; return (N, C, H, W) for shape (N, H, W, C)."""
        b, h, w, _ = shape
        one_hot = F.one_hot(indices.view(b, h, w), num_classes=self.n_embed)
        one_hot = one_hot.permute(0, 3, 1, 2).to(self.embed.weight.dtype)
        return torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)


@dataclass(frozen=True)
class VQGANConfig:
    """Settings for building a VQGAN, read from a taming YAML config.

    ``quantizer`` is ``"vector"`` (taming ``VQModel``) or ``"gumbel"`` (``GumbelVQ``).
    """

    ddconfig: dict[str, Any]
    n_embed: int
    embed_dim: int
    quantizer: str = "vector"
    kl_weight: float = 1e-8
    sane_index_shape: bool = False
    target: str = "taming.models.vqgan.VQModel"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side, 2 ** (levels - 1)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @classmethod
    def from_taming(cls, config: Mapping[str, Any], source: str = "config") -> VQGANConfig:
        """Read a taming YAML config (as a plain dict) with `model.target` and `model.params`.

        Raises ModelError naming `source` when the target is not a supported
        autoencoder or a required value is missing. The loss and temperature
        scheduler settings are ignored because decoding does not need them.
        """
        model = config.get("model") if isinstance(config, Mapping) else None
        if not isinstance(model, Mapping):
            raise ModelError(f"{source} has no 'model' section; expected a taming VQGAN config.")

        target = model.get("target")
        quantizer = QUANTIZER_BY_TARGET.get(str(target))
        if quantizer is None:
            supported = ", ".join(QUANTIZER_BY_TARGET)
            raise ModelError(
                f"{source}: model.target is {target!r}, which is not a supported VQGAN. "
                f"Supported targets: {supported}."
            )

        params = model.get("params")
        if not isinstance(params, Mapping):
            raise ModelError(f"{source} has no 'model.params' section.")
        if params.get("remap") is not None:
            raise ModelError(
                f"{source} uses a codebook remap file (model.params.remap), which is not supported."
            )

        ddconfig = params.get("ddconfig")
        if not isinstance(ddconfig, Mapping):
            raise ModelError(f"{source} has no 'model.params.ddconfig' section.")
        missing = [key for key in REQUIRED_DDCONFIG_KEYS if key not in ddconfig]
        missing += [key for key in ("n_embed", "embed_dim") if key not in params]
        if missing:
            raise ModelError(f"{source} is missing required values: {', '.join(missing)}.")

        ddconfig = dict(ddconfig)
        ddconfig["ch_mult"] = tuple(int(m) for m in ddconfig["ch_mult"])
        ddconfig["attn_resolutions"] = tuple(int(r) for r in ddconfig["attn_resolutions"])
        return cls(
            ddconfig=ddconfig,
            n_embed=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]),
            quantizer=quantizer,
            kl_weight=float(params.get("kl_weight", 1e-8)),
            sane_index_shape=bool(params.get("sane_index_shape", False)),
            target=str(target),
        )


class VQGAN(nn.Module):
    """A taming VQGAN autoencoder without its training loss.

    ``encode(x)`` and ``decode(z)`` behave like taming's ``VQModel.encode`` and
    ``VQModel.decode``: images are NCHW in [-1, 1] and latents are
    (N, embed_dim, H / factor, W / factor).
    """

    def __init__(self, config: VQGANConfig, name: str = "vqgan") -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.embed_dim = config.embed_dim
        self.n_embed = config.n_embed
        self.factor = config.factor
        z_channels = int(config.ddconfig["z_channels"])

        self.encoder = Encoder(**config.ddconfig)
        self.decoder = Decoder(**config.ddconfig)
        self.quantize: VectorQuantizer | GumbelQuantize
        if config.quantizer == "gumbel":
            self.quantize = GumbelQuantize(
                z_channels, config.embed_dim, config.n_embed, kl_weight=config.kl_weight
            )
        else:
            self.quantize = VectorQuantizer(
                config.n_embed, config.embed_dim, beta=0.25,
                sane_index_shape=config.sane_index_shape,
            )
        self.quant_conv = nn.Conv2d(z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, z_channels, 1)

    @property
    def is_gumbel(self) -> bool:
        """Whether the quantiser is the Gumbel-softmax kind."""
        return isinstance(self.quantize, GumbelQuantize)

    @property
    def codebook(self) -> Tensor:
        """The (n_embed, embed_dim) code vectors that latents are quantised against."""
        if isinstance(self.quantize, GumbelQuantize):
            return self.quantize.embed.weight
        return self.quantize.embedding.weight

    def encode(self, x: Tensor) -> QuantizerOutput:
        """Encode images x (N, 3, H, W) in [-1, 1]; return (z_q, loss, (None, None, indices))."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: Tensor) -> Tensor:
        """Decode latents (N, embed_dim, h, w) to images (N, 3, h*factor, w*factor), ~[-1, 1]."""
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        quant, loss, _ = self.encode(x)
        return self.decode(quant), loss
