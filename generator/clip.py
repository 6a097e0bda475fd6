"""Load CLIP models through open_clip and encode text and images with them.

A CLIP is named by a spec ``MODEL/PRETRAINED``: MODEL is an open_clip
architecture (``ViT-B-32``) and PRETRAINED is either an open_clip tag
(``openai``, ``laion2b_s34b_b79k``) or the path of a weights file
(``ViT-B-32//models/clip.safetensors``, ``ViT-B-32/weights/clip.pt``).
The tag ``random`` builds the architecture with random weights, for speed
measurements and tests; its embeddings mean nothing.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import types
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from safetensors import SafetensorError
from torch import Tensor, nn

from generator.errors import ModelError

logger = logging.getLogger(__name__)

# Prefixes that make open_clip read the config and weights from elsewhere.
_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
# Architectures shipped with open_clip, before any add_model_config call.
_BUILTIN_MODELS = frozenset(open_clip.list_models())
# PRETRAINED value that selects the architecture with random weights.
RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class ClipSpec:
    """A parsed ``MODEL/PRETRAINED`` string. `weights_path` is set for local weights."""

    spec: str
    model: str
    pretrained: str | None
    weights_path: Path | None


def parse_clip_spec(spec: str) -> ClipSpec:
    """Split ``MODEL/PRETRAINED`` into its parts and decide whether PRETRAINED is a path.

    PRETRAINED is a path when it contains a ``/`` or names an existing file;
    otherwise it is an open_clip tag. Raises ModelError for a malformed spec.
    """
    spec = spec.strip()
    if spec.startswith(_SCHEMA_PREFIXES):
        return ClipSpec(spec, spec, None, None)

    model, sep, pretrained = spec.partition("/")
    if not sep or not model or not pretrained:
        raise ModelError(
            f"Invalid CLIP model {spec!r}: write MODEL/PRETRAINED, for example "
            "'ViT-B-32/openai' or 'ViT-B-32/path/to/weights.safetensors'."
        )

    if "/" in pretrained or os.sep in pretrained or Path(pretrained).is_file():
        return ClipSpec(spec, model, pretrained, Path(pretrained).expanduser())
    return ClipSpec(spec, model, pretrained, None)


class Clip:
    """A frozen open_clip model with its tokenizer and image normalisation.

    Attributes:
        model: the open_clip model, in eval mode with requires_grad False.
        tokenizer: callable turning a list of strings into a (N, context_length) token tensor.
        input_size: side of the square input image in pixels.
        mean, std: per-channel normalisation applied to images in [0, 1].
        name: the spec the model was loaded from.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: open_clip.tokenizer.SimpleTokenizer,
        name: str,
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.input_size = input_size
        self.mean = mean
        self.std = std

    def __repr__(self) -> str:
        return f"Clip({self.name!r}, input_size={self.input_size})"

    @property
    def device(self) -> torch.device:
        """Device holding the model's weights."""
        return next(self.model.parameters()).device

    def encode_text(self, texts: list[str]) -> Tensor:
        """Embed texts; return an L2-normalised (len(texts), embed_dim) tensor."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """Embed images (N, 3, input_size, input_size) already normalised with mean and std.

        Returns an L2-normalised (N, embed_dim) tensor. Gradients flow to `images`.
        """
        return F.normalize(self.model.encode_image(images), dim=-1)


def _sdpa_attention(
    self: ResidualAttentionBlock,
    q_x: Tensor,
    k_x: Tensor | None = None,
    v_x: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Self-attention of a batch-first block through scaled_dot_product_attention.

    Computes what the block's nn.MultiheadAttention computes with the same
    weights. The module's own path materialises the attention matrix and runs
    slower whenever gradients are needed, as they are for the input images.
    """
    if k_x is not None or v_x is not None:
        return ResidualAttentionBlock.attention(self, q_x, k_x, v_x, attn_mask)

    attn = self.attn
    batch, length, width = q_x.shape
    head_dim = width // attn.num_heads

    def heads(t: Tensor) -> Tensor:
        return t.reshape(batch, length, attn.num_heads, head_dim).transpose(1, 2)

    q, k, v = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, length, width)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def use_sdpa_attention(model: nn.Module) -> int:
    """Route the self-attention of open_clip's standard blocks through _sdpa_attention.

    Only blocks with a batch-first, bias-carrying nn.MultiheadAttention without
    extra key/value biases are changed. Returns how many blocks were changed.
    """
    changed = 0
    for block in model.modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        attn = block.attn
        if not (
            isinstance(attn, nn.MultiheadAttention)
            and attn.batch_first
            and attn._qkv_same_embed_dim
            and attn.in_proj_bias is not None
            and attn.bias_k is None
            and not attn.add_zero_attn
            and not hasattr(block, "ln_1_kv")
        ):
            continue
        block.attention = types.MethodType(_sdpa_attention, block)
        changed += 1
    return changed


class PatchEmbedding(nn.Module):
    """A ViT's patch embedding (a convolution whose stride equals its kernel) as one matmul.

    Computes what the wrapped ``nn.Conv2d`` computes, with the same weight
    tensor, and returns the same (N, width, rows, columns) layout. The
    convolution's input gradient runs several times slower on the CPU than the
    matrix multiplication it amounts to.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.patch = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        """Return whether ``conv`` is a plain convolution over non-overlapping patches."""
        return (
            type(conv) is nn.Conv2d
            and tuple(conv.stride) == tuple(conv.kernel_size)
            and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        (ph, pw), out_channels = self.patch, self.weight.shape[0]
        rows, columns = height // ph, width // pw
        # A strided convolution ignores pixels past the last whole patch.
        x = x[:, :, : rows * ph, : columns * pw]

        # (N, C, rows, ph, columns, pw) -> (N, rows * columns, C * ph * pw), in the
        # order of the weight's (C, ph, pw) axes.
        patches = x.reshape(batch, channels, rows, ph, columns, pw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, -1)
        out = F.linear(patches, self.weight.reshape(out_channels, -1), self.bias)

        # The caller flattens and transposes this back to (N, rows * columns, width),
        # which is then a view of `out` without a copy.
        return out.transpose(1, 2).reshape(batch, out_channels, rows, columns)


def use_matmul_patch_embedding(model: nn.Module) -> int:
    """Replace each vision tower's patch convolution ``conv1`` by a PatchEmbedding.

    The state_dict keys and values stay the same. Returns how many were replaced.
    """
    changed = 0
    for module in model.modules():
        conv = getattr(module, "conv1", None)
        if isinstance(module, VisionTransformer) and PatchEmbedding.fits(conv):
            module.conv1 = PatchEmbedding(conv)
            changed += 1
    return changed


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"Cannot read the CLIP model config {path}: {error}") from error


def _register_local_config(spec: ClipSpec) -> None:
    """Register ``<weights dir>/<MODEL>.json`` with open_clip when MODEL is not built in.

    The JSON beside the weights wins over a config of the same name registered
    from another directory earlier.
    """
    if spec.model in _BUILTIN_MODELS or spec.weights_path is None:
        return

    config_path = spec.weights_path.parent / f"{spec.model}.json"
    if config_path.is_file():
        if open_clip.get_model_config(spec.model) != _read_json(config_path):
            open_clip.add_model_config(config_path)
    elif spec.model not in open_clip.list_models():
        raise ModelError(
            f"Unknown CLIP architecture {spec.model!r} in {spec.spec!r}: open_clip has no "
            f"config of that name and there is no {config_path}. Use a built-in name such as "
            "ViT-B-32, ViT-B-16 or ViT-L-14, or put the model's JSON config beside the weights."
        )
    open_clip.add_model_config(config_path)
    if spec.model not in open_clip.list_models():
        raise ModelError(
            f"{config_path} is not a valid open_clip model config: it needs the keys "
            "'embed_dim', 'vision_cfg' and 'text_cfg'."
        )


def _check_architecture(spec: ClipSpec) -> None:
    if spec.model not in open_clip.list_models():
        raise ModelError(
            f"Unknown CLIP architecture {spec.model!r} in {spec.spec!r}. "
            "Examples of valid names: ViT-B-32, ViT-B-16, ViT-L-14, RN50 "
            f"({len(open_clip.list_models())} in all, see open_clip.list_models())."
        )


def _quick_gelu_for_tag(spec: ClipSpec) -> bool:
    """Check that the tag exists for the model; return whether its weights need QuickGELU."""
    _check_architecture(spec)
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if spec.pretrained not in tags:
        raise ModelError(
            f"Unknown pretrained tag {spec.pretrained!r} for CLIP {spec.model!r}. "
            f"Valid tags: {', '.join(tags) or 'none'}; or give the path of a weights file."
        )
    # OpenAI's weights were trained with QuickGELU; building plain GELU only warns
    # and gives subtly wrong embeddings.
    return bool(open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("quick_gelu"))


def _create_model(spec: ClipSpec, device: torch.device, models_dir: Path | None) -> nn.Module:
    if spec.weights_path is not None:
        if not spec.weights_path.is_file():
            raise ModelError(
                f"CLIP weights file not found: {spec.weights_path} (from {spec.spec!r})."
            )
        _register_local_config(spec)
        pretrained, quick_gelu = str(spec.weights_path), False
    elif spec.pretrained is None:
        pretrained, quick_gelu = None, False
    elif spec.pretrained == RANDOM_WEIGHTS:
        _check_architecture(spec)
        logger.warning("CLIP %s has random weights: its guidance means nothing.", spec.spec)
        pretrained, quick_gelu = None, False
    else:
        pretrained, quick_gelu = spec.pretrained, _quick_gelu_for_tag(spec)

    cache_dir = str(models_dir) if models_dir is not None else None
    try:
        return open_clip.create_model(
            spec.model,
            pretrained=pretrained,
            device=device,
            force_quick_gelu=quick_gelu,
            cache_dir=cache_dir,
        )
    # open_clip reports some mismatched weights with `assert`. IndexError, EOFError,
    # UnpicklingError and SafetensorError come from files that are not weights.
    except (
        RuntimeError, OSError, ValueError, KeyError, AssertionError,
        IndexError, EOFError, pickle.UnpicklingError, SafetensorError,
    ) as error:
        raise ModelError(_creation_failure(spec, models_dir, error)) from error


def _creation_failure(spec: ClipSpec, models_dir: Path | None, error: BaseException) -> str:
    # open_clip's messages often end with punctuation of their own.
    reason = str(error).strip() or type(error).__name__
    if not reason.endswith((".", "!", "?")):
        reason += "."
    if spec.weights_path is not None:
        from generator.checkpoint import load_state_dict

        # A file that our own reader cannot read either gets its clearer message.
        try:
            load_state_dict(spec.weights_path)
        except ModelError as unreadable:
            return str(unreadable)
        return (
            f"Cannot load CLIP weights {spec.weights_path} for {spec.model!r}: {reason} "
            "Check that the file is complete and matches the architecture."
        )
    place = models_dir if models_dir is not None else "the open_clip cache"
    return (
        f"Cannot get CLIP {spec.spec!r}: {reason} Downloads go to {place}. Without network "
        "access, download the weights elsewhere (for OpenAI ViT-B-32, the file "
        "open_clip_model.safetensors of the Hugging Face repository "
        "timm/vit_base_patch32_clip_224.openai), copy the file to this machine and use "
        f"'{spec.model}-quickgelu/PATH' for OpenAI weights or '{spec.model}/PATH' for others."
    )


def load_clip(
    spec: str,
    device: str | torch.device = "cpu",
    models_dir: Path | None = None,
    *,
    sdpa_attention: bool = True,
    matmul_patch_embedding: bool = True,
) -> Clip:
    """Load a frozen CLIP from a ``MODEL/PRETRAINED`` spec.

    Args:
        spec: ``MODEL/TAG``, whose weights are downloaded into `models_dir` when
            missing, ``MODEL/PATH`` for a local weights file, or ``MODEL/random``
            for random weights (speed measurements only). When open_clip
            does not know MODEL, the JSON config ``MODEL.json`` beside the file
            is registered.
        device: where to put the model.
        models_dir: download cache for tagged weights; open_clip's default when None.
        sdpa_attention: compute self-attention with scaled_dot_product_attention
            (same results, faster with gradients); see use_sdpa_attention.
        matmul_patch_embedding: compute the patch embedding as a matrix
            multiplication (same results, faster with gradients); see
            use_matmul_patch_embedding.

    Returns:
        A Clip in eval mode with gradients disabled for its parameters.

    Raises:
        ModelError: malformed spec, unknown model or tag, missing or broken weights,
            or a failed download.

    NOTE: QuickGELU is switched on only for tags whose open_clip metadata requests
    it. For OpenAI weights from a local file, name the ``-quickgelu`` config.
    """
    parsed = parse_clip_spec(spec)
    device = torch.device(device)
    model = _create_model(parsed, device, models_dir)
    model.eval().requires_grad_(False)
    if sdpa_attention:
        use_sdpa_attention(model)
    if matmul_patch_embedding:
        use_matmul_patch_embedding(model)

    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", 224)
    input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    tokenizer = open_clip.get_tokenizer(parsed.model if parsed.pretrained else parsed.spec)
    logger.info("Loaded CLIP %s on %s (input %d px)", spec, device, input_size)
    return Clip(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        input_size=input_size,
        mean=tuple(float(m) for m in preprocess["mean"]),
        std=tuple(float(s) for s in preprocess["std"]),
    )
