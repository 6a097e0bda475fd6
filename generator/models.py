"""Find, load and hold the models a generation needs: one VQGAN and one or more CLIPs.

``load_vqgan`` takes a registry name (downloaded into models_dir when missing) or
the path of a taming checkpoint with its YAML config beside it.
``find_and_load_clip`` takes ``MODEL/PRETRAINED`` specs and looks for a copy of
tagged weights before it downloads them. Every failure raises ModelError with
a message that names the file or model and the next step to take.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file
from torch import Tensor

from generator import registry
from generator.checkpoint import load_state_dict
from generator.clip import Clip, load_clip
from generator.errors import ModelError
from generator.registry import configured_models_dir, default_models_dir
from generator.vqgan import VQGAN, VQGANConfig

if TYPE_CHECKING:
    from generator.download import ClipSource

__all__ = [
    "VQGAN",
    "Clip",
    "ModelError",
    "Models",
    "VQGANFiles",
    "default_models_dir",
    "find_and_load_clip",
    "load_clip",
    "load_models",
    "load_vqgan",
    "read_vqgan_config",
    "resolve_device",
]

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
CONFIG_SUFFIXES = (".yaml", ".yml")
# State-dict prefixes that encoding and decoding use; `loss.*` and anything else is skipped.
VQGAN_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
CACHE_SUBDIR = "cache"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" (or "mps") into a usable torch.device.

    "auto" picks the first CUDA device when there is one, else the CPU. Raises
    ModelError for an unknown name or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError) as error:
            raise ModelError(
                f"Invalid device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'."
            ) from error

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"Device {name!r} requested but CUDA is not available here; use 'cpu'."
            )
        count = torch.cuda.device_count()
        index = 0 if device.index is None else device.index
        if index >= count:
            raise ModelError(
                f"Device {name!r} requested but this machine has {count} CUDA device(s)."
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"Device {name!r} requested but MPS is not available here; use 'cpu'.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"Unsupported device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    return device


@dataclass(frozen=True)
class VQGANFiles:
    """Locations of a VQGAN's checkpoint and config. `name` is the registry name or stem."""

    name: str
    checkpoint: Path
    config: Path
    entry: registry.ModelEntry | None = None


def _looks_like_path(name_or_path: str) -> bool:
    return (
        "/" in name_or_path
        or os.sep in name_or_path
        or name_or_path.endswith(CHECKPOINT_SUFFIXES)
        or Path(name_or_path).exists()
    )


def _config_beside(checkpoint: Path) -> Path:
    for suffix in CONFIG_SUFFIXES:
        candidate = checkpoint.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"VQGAN config missing: expected {checkpoint.with_suffix('.yaml')} beside the "
        f"checkpoint {checkpoint}. Put the model's taming YAML config there (the file "
        "configs/model.yaml of the original download), named like the checkpoint."
    )


def find_vqgan_files(
    name_or_path: str, models_dir: Path | None = None, download: bool = True
) -> VQGANFiles:
    """Locate a VQGAN's checkpoint and config, downloading a registered model when missing.

    Raises ModelError for an unknown name, a missing file or a failed download.
    """
    if _looks_like_path(name_or_path) and not registry.is_registered(name_or_path):
        checkpoint = Path(name_or_path).expanduser()
        if not checkpoint.is_file():
            raise ModelError(
                f"VQGAN checkpoint not found: {checkpoint}. Give an existing taming .ckpt "
                f"file or one of the registered names: {', '.join(registry.list_models())}."
            )
        return VQGANFiles(checkpoint.stem, checkpoint, _config_beside(checkpoint))

    entry = registry.get_model(name_or_path)
    directory = Path(models_dir) if models_dir is not None else default_models_dir()
    checkpoint, config = entry.paths(directory)
    if not (checkpoint.is_file() and config.is_file()):
        if not download:
            raise ModelError(
                f"VQGAN {entry.name} is not in {directory}: run "
                f"'python -m generator download {entry.name}' or place the files there as "
                f"{checkpoint} and {config}."
            )
        from generator.download import download_model

        download_model(entry, directory)
    return VQGANFiles(entry.name, checkpoint, config, entry)


def read_vqgan_config(path: Path) -> VQGANConfig:
    """Read a taming YAML config file into a VQGANConfig; raise ModelError when invalid."""
    try:
        container: Any = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise ModelError(f"Cannot read VQGAN config {path}: {error}") from error
    return VQGANConfig.from_taming(container, source=str(path))


def _cache_path(files: VQGANFiles, models_dir: Path) -> Path:
    stat = files.checkpoint.stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}"
    return models_dir / CACHE_SUBDIR / f"{files.checkpoint.stem}.{key}.safetensors"


def _write_cache(state: dict[str, Tensor], target: Path) -> None:
    """Save the decoding weights as safetensors next to older copies, then drop the old ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name, so two processes filling the cache cannot mix bytes.
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
        os.replace(partial, target)
    except OSError as error:
        logger.warning("Could not write the VQGAN cache %s: %s", target, error)
        partial.unlink(missing_ok=True)
        return

    stem = target.name.split(".", 1)[0]
    for old in target.parent.glob(f"{stem}.*.safetensors"):
        if old != target and old.name.split(".", 1)[0] == stem:
            old.unlink(missing_ok=True)


def load_vqgan_weights(files: VQGANFiles, models_dir: Path | None) -> dict[str, Tensor]:
    """Return the encoder, decoder and quantiser tensors of a checkpoint.

    With a models_dir, the first load of a torch checkpoint also writes a
    safetensors copy of the decoding weights under ``models_dir/cache``, keyed
    by the source's size and modification time, and later loads read that copy
    instead. Without one, nothing is written.
    """
    cache = None
    if models_dir is not None and files.checkpoint.suffix != ".safetensors":
        cache = _cache_path(files, Path(models_dir))
        if cache.is_file():
            try:
                return load_state_dict(cache)
            except ModelError as error:
                logger.warning("Ignoring a broken VQGAN cache file %s: %s", cache, error)

    state = load_state_dict(files.checkpoint)
    state = {k: v for k, v in state.items() if k.startswith(VQGAN_PREFIXES)}
    if cache is not None:
        _write_cache(state, cache)
    return state


def _check_weights(model: VQGAN, state: dict[str, Tensor], files: VQGANFiles) -> None:
    """Raise ModelError naming the first weight that the config and checkpoint disagree on."""
    expected = model.state_dict()
    hint = f"The config {files.config} does not match the checkpoint {files.checkpoint}."
    for key, tensor in expected.items():
        if key not in state:
            missing = [k for k in expected if k not in state]
            raise ModelError(
                f"{hint} The checkpoint lacks {len(missing)} weight(s) the config needs, "
                f"first {key!r}."
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"{hint} Weight {key!r} has shape {tuple(state[key].shape)} in the "
                f"checkpoint but the config needs {tuple(tensor.shape)}."
            )

    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ModelError(
            f"{hint} The checkpoint has {len(unexpected)} weight(s) the config does not "
            f"build, first {unexpected[0]!r}."
        )


def load_vqgan(
    name_or_path: str,
    device: str | torch.device = "cpu",
    models_dir: Path | None = None,
    *,
    download: bool = True,
) -> VQGAN:
    """Load a frozen VQGAN by registry name or checkpoint path.

    Args:
        name_or_path: a registered name (see ``registry.list_models()``), or the
            path of a taming checkpoint (.ckpt, .pt, .pth, .bin or .safetensors)
            with its YAML config beside it under the same stem.
        device: where to put the model.
        models_dir: where registered models are stored, downloaded and cached;
            ``default_models_dir()`` when None. For a checkpoint given by path,
            the safetensors cache goes to ``models_dir/cache`` only when a
            models directory was chosen: this argument, or $IMAGINE_MODELS_DIR
            when it is None. With neither, nothing is written and each load
            reads the checkpoint itself (seconds for a 1 GB ``.ckpt``), so that
            loading a model by path never writes into the current directory.
        download: fetch a registered model that is not in models_dir yet.

    Returns:
        A VQGAN in eval mode with gradients disabled for its parameters.

    Raises:
        ModelError: unknown name, missing file or config, failed download or
            checksum, corrupt or unsafe checkpoint, or a config that does not
            match the checkpoint.
    """
    started = time.perf_counter()
    files = find_vqgan_files(name_or_path, models_dir, download=download)
    if files.entry is not None:
        from generator.download import verify_model_files

        verify_model_files(files.entry, files.checkpoint.parent)
        cache_root = files.checkpoint.parent
    else:
        cache_root = models_dir if models_dir is not None else configured_models_dir()

    config = read_vqgan_config(files.config)
    state = load_vqgan_weights(files, cache_root)

    # Built on the meta device so no time goes into random initialisation; the
    # checkpoint's tensors are then assigned in place.
    with torch.device("meta"):
        model = VQGAN(config, name=files.name)
    _check_weights(model, state, files)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.float().to(resolve_device(device)).eval().requires_grad_(False)
    logger.info(
        "Loaded VQGAN %s from %s in %.2f s", files.name, files.checkpoint,
        time.perf_counter() - started,
    )
    return model


def find_and_load_clip(
    spec: str, device: str | torch.device = "cpu", models_dir: Path | None = None
) -> Clip:
    """Load a CLIP, downloading tagged weights only when no copy of them is found.

    For ``MODEL/TAG`` specs, a copy placed by hand at
    ``models_dir/clip/MODEL/TAG.safetensors`` (or ``TAG.bin``) wins, then a
    copy in the Hub cache in models_dir; either loads without any network
    request. Otherwise one HEAD request checks that the Hub responds before
    open_clip downloads into models_dir, so an offline machine fails at once.
    Other specs (paths, ``random``) go to load_clip unchanged. models_dir None
    means ``default_models_dir()``.

    Raises:
        ModelError: as load_clip does; for a failed download, with the URLs and
            the path for a copy placed by hand.
    """
    from generator import download

    directory = Path(models_dir) if models_dir is not None else default_models_dir()
    source = download.clip_source(spec, directory)
    if source is None:
        return load_clip(spec, device, directory)

    # Loading a local copy directly keeps the Hub client from sending its
    # freshness check, which can hang on a network that drops packets.
    local = download.manual_clip_file(source) or download.cached_clip_file(source)
    if local is not None:
        return _load_local_clip(source, local, device)

    download.check_clip_download(source)
    try:
        return load_clip(spec, device, directory)
    except ModelError as error:
        logger.info("Downloading CLIP %s failed: %s", spec, error)
        cause = error.__cause__ or error
        reason = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else repr(cause)
        raise download.clip_download_error(source, f"the download failed ({reason})") from error


def _load_local_clip(source: ClipSource, path: Path, device: str | torch.device) -> Clip:
    """Load a local copy of a tag's weights with the architecture and preprocessing of the tag."""
    import open_clip

    config = open_clip.get_pretrained_cfg(source.model, source.tag)
    architecture = source.model
    # OpenAI's weights need QuickGELU, which open_clip's "-quickgelu" configs turn on.
    if config.get("quick_gelu") and not architecture.endswith("-quickgelu"):
        architecture += "-quickgelu"

    clip = load_clip(f"{architecture}/{path.resolve()}", device)
    clip.name = source.spec
    if config.get("mean") and config.get("std"):
        clip.mean = tuple(float(value) for value in config["mean"])
        clip.std = tuple(float(value) for value in config["std"])
    logger.info("Loaded CLIP %s from %s", source.spec, path)
    return clip


def missing_clip_note(specs: Sequence[str], models_dir: Path | None) -> str:
    """Describe the tagged CLIPs whose weights are neither placed by hand nor downloaded.

    Returns "" when every CLIP is available offline.
    """
    from generator import download

    lines = []
    for spec in specs:
        try:
            source = download.clip_source(spec, models_dir)
        except ModelError:
            continue
        if source is None or download.manual_clip_file(source) or download.cached_clip_file(source):
            continue
        lines += [
            f"CLIP {spec} is not downloaded yet either. The first run downloads it from:",
            f"  {source.urls[0]}",
            "Without network access, save that file as:",
            f"  {source.manual_paths[0].resolve()}",
        ]
    return "\n".join(lines)


@dataclass
class Models:
    """The models a generation uses, loaded once and kept warm by the caller."""

    vqgan: VQGAN
    clips: list[Clip]
    device: torch.device


def load_models(
    vqgan: str,
    clip_specs: Sequence[str] | str,
    device: str | torch.device = "auto",
    models_dir: Path | None = None,
) -> Models:
    """Load a VQGAN and an ensemble of CLIPs onto one device.

    `clip_specs` is one ``MODEL/PRETRAINED`` spec or a sequence of them, loaded
    with find_and_load_clip. models_dir None means ``default_models_dir()`` for
    downloads, and no safetensors cache for a VQGAN given by path unless
    $IMAGINE_MODELS_DIR is set (see load_vqgan).

    Raises:
        ModelError: as load_vqgan and find_and_load_clip do, and when no CLIP is
            given. When the VQGAN fails, the message also names the tagged CLIPs
            that still need a download.
    """
    specs = [clip_specs] if isinstance(clip_specs, str) else list(clip_specs)
    if not specs:
        raise ModelError("No CLIP model given: name at least one, for example 'ViT-B-32/openai'.")

    resolved = resolve_device(device)
    try:
        vqgan_model = load_vqgan(vqgan, resolved, models_dir)
    except ModelError as error:
        note = missing_clip_note(specs, models_dir)
        if not note:
            raise
        raise ModelError(f"{error}\n{note}") from error

    return Models(
        vqgan=vqgan_model,
        clips=[find_and_load_clip(spec, resolved, models_dir) for spec in specs],
        device=resolved,
    )
