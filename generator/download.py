"""Download models into the models directory: registered VQGANs and tagged CLIPs.

Each VQGAN file is fetched into ``NAME.ext.part`` and renamed into place only
after its size and SHA-256 check out, so a file under its final name is always
complete. An interrupted download resumes with an HTTP Range request. Mirrors
are tried in registry order. When all of them fail, one ModelError lists every
URL with its error and the exact paths to place the files by hand.

CLIP weights named by an open_clip tag (``ViT-B-32/openai``) come from the
Hugging Face Hub through open_clip. Before that download starts, one HEAD
request checks that the Hub responds, so that an offline machine fails at once
with the URLs and the path for a copy placed by hand
(``<models_dir>/clip/MODEL/TAG.safetensors``), instead of waiting through the
Hub client's retries.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from generator import registry
from generator.errors import ModelError
from generator.registry import ModelEntry, RemoteFile

logger = logging.getLogger(__name__)

USER_AGENT = "imagine-model-download/0.1"
TIMEOUT_S = 30.0
# Seconds to wait for the Hub to respond to the HEAD request made before a CLIP download.
PROBE_TIMEOUT_S = 10.0
CHUNK_BYTES = 1 << 20
DEFAULT_CLIP = "ViT-B-32/openai"
# Sub-directory of models_dir for CLIP weights placed by hand, as clip/MODEL/TAG.SUFFIX.
CLIP_SUBDIR = "clip"
# open_clip's file names on the Hub, safetensors first as open_clip tries them.
HUB_SAFETENSORS_NAME = "open_clip_model.safetensors"
HUB_PICKLE_NAME = "open_clip_pytorch_model.bin"


class MirrorFailed(Exception):
    """One URL did not deliver the expected file; the next mirror is tried."""


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _resume_offset(response: http.client.HTTPResponse, offset: int, url: str) -> int:
    """Return where the response body starts in the file: `offset`, or 0 for a full body."""
    if offset == 0:
        return 0
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        if content_range.startswith(f"bytes {offset}-"):
            return offset
        raise MirrorFailed(f"unexpected Content-Range {content_range!r} for a resume at {offset}")
    logger.info("%s ignored the Range request; downloading from the start", url)
    return 0


def fetch(url: str, part: Path, expected_size: int | None, progress: bool) -> None:
    """Download `url` into `part`, continuing after the bytes `part` already holds.

    Raises MirrorFailed, urllib.error.URLError or OSError on failure. A connection
    that closes early leaves `part` in place for the next resume.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError as error:
        if error.code != 416 or offset == 0:
            raise
        # 416: the range starts at or past the end, so `part` may already be whole.
        if expected_size is None or offset == expected_size:
            return
        part.unlink()
        offset = 0
        response = _open(url, 0)

    with response:
        offset = _resume_offset(response, offset, url)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else expected_size
        received = 0
        with (
            open(part, "ab" if offset else "wb") as file,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), disable=not progress, leave=False,
            ) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                file.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            file.flush()
            os.fsync(file.fileno())

    if length is not None and received != int(length):
        raise MirrorFailed(f"connection closed after {received} of {length} bytes")


def _check_value(remote: RemoteFile, field_name: str, actual: object, part: Path) -> None:
    expected = getattr(remote, field_name)
    if expected is None:
        logger.info("%s of %s is %s (not in the registry)", field_name, remote.filename, actual)
        return
    if actual == expected:
        return
    if remote.is_enforced(field_name):
        part.unlink(missing_ok=True)
        raise MirrorFailed(f"{field_name} mismatch: expected {expected}, got {actual}")
    logger.warning(
        "%s of %s is %s, not the unverified registry value %s; keeping the file",
        field_name, remote.filename, actual, expected,
    )


def check_download(remote: RemoteFile, part: Path) -> str:
    """Check a downloaded file's size and SHA-256 against the registry; return the digest.

    Verified values must match (the file is deleted and MirrorFailed raised if
    not); unverified ones only log a warning.
    """
    _check_value(remote, "size", part.stat().st_size, part)
    digest = sha256_file(part)
    _check_value(remote, "sha256", digest, part)
    return digest


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _write_stamp(target: Path, digest: str) -> None:
    """Record the digest with the file's size and mtime so a later load need not rehash."""
    stat = target.stat()
    _stamp_path(target).write_text(f"{stat.st_size} {stat.st_mtime_ns} {digest}\n")


def _stamped_digest(target: Path) -> str | None:
    try:
        size, mtime_ns, digest = _stamp_path(target).read_text().split()
    except (OSError, ValueError):
        return None
    stat = target.stat()
    if int(size) != stat.st_size or int(mtime_ns) != stat.st_mtime_ns:
        return None
    return digest


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"cannot connect: {error.reason}"
    return str(error) or type(error).__name__


def _manual_instructions(entry: ModelEntry, directory: Path) -> str:
    checkpoint, config = entry.paths(directory.resolve())
    digest = ""
    if entry.checkpoint.is_enforced("sha256"):
        digest = f", SHA-256 {entry.checkpoint.sha256}"
    return "\n".join(
        [
            "To install it by hand, download both files on a machine with network access "
            "and save them as:",
            f"  {config}  (config), from one of:",
            *(f"      {url}" for url in entry.config.urls),
            f"  {checkpoint}  (checkpoint{digest}), from one of:",
            *(f"      {url}" for url in entry.checkpoint.urls),
        ]
    )


def _all_mirrors_failed(
    remote: RemoteFile, entry: ModelEntry, directory: Path, errors: list[tuple[str, str]]
) -> ModelError:
    tried = "\n".join(f"  - {url}: {message}" for url, message in errors)
    return ModelError(
        f"Could not download VQGAN {entry.name}: every mirror of its {remote.kind} failed. "
        "Check the network connection, or install the files by hand as shown below.\n"
        f"Mirrors tried:\n{tried}\n{_manual_instructions(entry, directory)}"
    )


def download_file(
    remote: RemoteFile, entry: ModelEntry, directory: Path, progress: bool = True
) -> Path:
    """Download one registry file into `directory` unless it is already there; return its path.

    Raises ModelError when every mirror fails.

    NOTE: there is no lock, so two processes downloading the same file at once
    write into the same ``.part`` file. Run one download at a time.
    """
    directory = Path(directory)
    target = directory / remote.filename
    if target.is_file():
        return target

    directory.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    source = target.with_name(target.name + ".part.url")
    errors: list[tuple[str, str]] = []
    for url in remote.urls:
        # A partial file from another mirror may hold different bytes: start over.
        if part.exists() and source.exists() and source.read_text().strip() != url:
            part.unlink()
        source.write_text(url + "\n")

        logger.info("Downloading %s of %s from %s", remote.kind, entry.name, url)
        try:
            fetch(url, part, remote.size, progress)
            digest = check_download(remote, part)
        except (MirrorFailed, urllib.error.URLError, OSError, http.client.HTTPException) as error:
            # INFO, not WARNING: the ModelError raised after the last mirror lists them all.
            logger.info("Download of %s from %s failed: %s", remote.filename, url, error)
            errors.append((url, _describe(error)))
            continue

        os.replace(part, target)
        source.unlink(missing_ok=True)
        _write_stamp(target, digest)
        if errors:
            logger.warning(
                "Downloaded %s from %s after %d other mirror(s) failed",
                remote.filename, url, len(errors),
            )
        logger.info("Saved %s", target)
        return target

    # Without a partial file, the URL it came from means nothing.
    if not part.exists():
        source.unlink(missing_ok=True)
    raise _all_mirrors_failed(remote, entry, directory, errors)


def download_model(entry: ModelEntry, directory: Path, progress: bool = True) -> list[Path]:
    """Download a registered VQGAN's config and checkpoint; return their paths."""
    return [download_file(remote, entry, directory, progress) for remote in entry.files]


def verify_model_files(entry: ModelEntry, directory: Path) -> None:
    """Check a registered model's files in `directory` against the registry before loading.

    Sizes are always compared. A verified SHA-256 is recomputed only when the
    ``.sha256`` stamp written at download does not match the file's size and
    mtime. Raises ModelError for a missing file or a mismatch.
    """
    for remote in entry.files:
        target = Path(directory) / remote.filename
        redownload = (
            f"Delete {target} and run 'python -m generator download {entry.name}', "
            "or place a correct copy there by hand."
        )
        if not target.is_file():
            raise ModelError(f"VQGAN {entry.name}: {target} is missing. {redownload}")

        size = target.stat().st_size
        if remote.is_enforced("size") and size != remote.size:
            raise ModelError(
                f"VQGAN {entry.name}: {target} has {size} bytes, expected {remote.size}; "
                f"it is incomplete or a different file. {redownload}"
            )

        if remote.is_enforced("sha256"):
            digest = _stamped_digest(target)
            if digest is None:
                logger.info("Checking the SHA-256 of %s", target)
                digest = sha256_file(target)
                _write_stamp(target, digest)
            if digest != remote.sha256:
                raise ModelError(
                    f"VQGAN {entry.name}: wrong checksum for {target} (SHA-256 {digest}, "
                    f"expected {remote.sha256}). {redownload}"
                )


@dataclass(frozen=True)
class ClipSource:
    """The Hub files of a tagged CLIP and the places where a copy of them is looked for.

    `filenames` are the Hub files open_clip tries, in its order. `cache_dir` is
    the Hub cache open_clip downloads into (None: the Hub's default).
    `manual_dir` contains copies placed by hand, named ``TAG.safetensors`` or
    ``TAG.bin`` after the file type.
    """

    spec: str
    model: str
    tag: str
    repo_id: str
    filenames: tuple[str, ...]
    cache_dir: Path | None
    manual_dir: Path

    @property
    def urls(self) -> list[str]:
        """Download URLs of `filenames`, as the Hub client builds them (HF_ENDPOINT applies)."""
        from huggingface_hub import hf_hub_url

        return [hf_hub_url(self.repo_id, filename) for filename in self.filenames]

    @property
    def manual_paths(self) -> list[Path]:
        """Accepted paths of a copy placed by hand, one per file in `filenames`."""
        return [self.manual_dir / (self.tag + Path(name).suffix) for name in self.filenames]


def _hub_filenames(filename: str) -> tuple[str, ...]:
    """Return the files open_clip 3.x tries for a Hub entry: a safetensors twin first."""
    if not filename or filename == HUB_PICKLE_NAME:
        return (HUB_SAFETENSORS_NAME, HUB_PICKLE_NAME)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def clip_source(spec: str, models_dir: Path | None) -> ClipSource | None:
    """Describe where the weights of a CLIP spec ``MODEL/TAG`` come from.

    Returns None when the spec needs no download: a local weights path, random
    weights, an ``hf-hub:`` name (left to open_clip) or a tag open_clip does
    not know (load_clip reports that). Copies placed by hand are looked for in
    ``models_dir/clip/MODEL/`` (``default_models_dir()`` when None).
    """
    import open_clip

    from generator.clip import RANDOM_WEIGHTS, parse_clip_spec

    parsed = parse_clip_spec(spec)
    if parsed.weights_path is not None or parsed.pretrained in (None, RANDOM_WEIGHTS):
        return None
    hub_name = open_clip.get_pretrained_cfg(parsed.model, parsed.pretrained).get("hf_hub", "")
    if not hub_name:
        return None

    # The entry is "owner/repo/" or "owner/repo/FILENAME".
    repo_id, _, filename = hub_name.rpartition("/")
    base = Path(models_dir) if models_dir is not None else registry.default_models_dir()
    return ClipSource(
        spec=parsed.spec,
        model=parsed.model,
        tag=parsed.pretrained,
        repo_id=repo_id,
        filenames=_hub_filenames(filename),
        cache_dir=Path(models_dir) if models_dir is not None else None,
        manual_dir=base / CLIP_SUBDIR / parsed.model,
    )


def manual_clip_file(source: ClipSource) -> Path | None:
    """Return the copy of a CLIP's weights placed by hand, if there is one."""
    return next((path for path in source.manual_paths if path.is_file()), None)


def cached_clip_file(source: ClipSource) -> Path | None:
    """Return the Hub cache's copy of a CLIP's weights, if open_clip downloaded one."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = str(source.cache_dir) if source.cache_dir is not None else None
    for filename in source.filenames:
        found = try_to_load_from_cache(source.repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    return None


def clip_download_error(source: ClipSource, reason: str) -> ModelError:
    """Build the error for CLIP weights that could not be downloaded, with manual steps."""
    paths = source.manual_paths
    save_as = f"  {paths[0].resolve()}"
    if len(paths) > 1:
        save_as += f"\n  (or {paths[1].resolve()} for the {paths[1].suffix} file)"
    urls = "\n".join(f"  {url}" for url in source.urls)
    return ModelError(
        f"Could not download CLIP {source.spec}: {reason}. Check the network connection, "
        "or install the weights by hand as shown below.\n"
        f"To install them by hand, download one of these files on a machine with network "
        f"access:\n{urls}\nand save it as:\n{save_as}"
    )


def probe_url(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Send one HEAD request; return None when the server responded, else why it did not.

    Any HTTP status counts as a response. The result describes a connection
    failure (no network, unknown host, refused connection or timeout).
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        logger.info("HEAD %s failed: %s", url, error)
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        return str(reason) or type(error).__name__


def check_clip_download(source: ClipSource) -> None:
    """Raise ModelError when the Hub cannot be reached for a CLIP download.

    One HEAD request to the first URL decides, and the Hub client's retries
    never start: a DNS failure or refused connection fails at once, a network
    that drops packets after PROBE_TIMEOUT_S. With HF_HUB_OFFLINE set, no
    request is sent.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise clip_download_error(
            source, "HF_HUB_OFFLINE is set and the weights are not in the download cache"
        )
    url = source.urls[0]
    failure = probe_url(url)
    if failure is not None:
        host = urllib.parse.urlsplit(url).netloc
        raise clip_download_error(source, f"cannot connect to {host} ({failure})")


def download_models(
    names: Sequence[str], models_dir: Path, progress: bool = True
) -> list[Path]:
    """Download registered VQGANs by name into models_dir; return the paths of all files.

    Files already present are kept. Raises ModelError for an unknown name or a
    failed download.
    """
    entries = [registry.get_model(name) for name in names]
    paths: list[Path] = []
    for entry in entries:
        paths.extend(download_model(entry, Path(models_dir), progress))
    return paths


def _parser() -> argparse.ArgumentParser:
    from generator.cli import CommandParser

    parser = CommandParser(
        prog="python -m generator download",
        description=(
            "Download models into the models directory. NAME is a registered VQGAN "
            "or a CLIP spec MODEL/TAG (weights go to the same directory). Without "
            f"names: {registry.default_model()} and {DEFAULT_CLIP}. Every NAME is "
            "tried; the exit status is 1 when any of them failed."
        ),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="models to download")
    parser.add_argument(
        "--models-dir", type=Path, default=None,
        help="directory for model files (default: $IMAGINE_MODELS_DIR or ./data/models)",
    )
    parser.add_argument("--list", action="store_true", help="list registered VQGANs and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _print_registry() -> None:
    default = registry.default_model()
    for name in registry.list_models():
        entry = registry.get_model(name)
        marker = " (default)" if name == default else ""
        print(f"{name}{marker}: {entry.description}")


def download_clip(spec: str, models_dir: Path) -> Path | None:
    """Download the weights of a CLIP spec into models_dir unless a copy is there.

    Returns the weights file, or None for a spec that open_clip resolves by
    itself (an ``hf-hub:`` name). Raises ModelError as find_and_load_clip does.
    """
    from generator.models import find_and_load_clip

    find_and_load_clip(spec, "cpu", models_dir)
    source = clip_source(spec, models_dir)
    if source is None:
        from generator.clip import parse_clip_spec

        return parse_clip_spec(spec).weights_path
    return manual_clip_file(source) or cached_clip_file(source)


def _download_one(name: str, models_dir: Path, progress: bool) -> list[Path]:
    """Download one VQGAN name or CLIP spec; return the paths of its files."""
    if "/" in name:
        path = download_clip(name, models_dir)
        return [path] if path is not None else []
    return download_model(registry.get_model(name), models_dir, progress)


def main_download(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m generator download``; return the process exit status.

    Every requested model is tried, in order. Each success prints
    ``NAME: PATH ...`` to stdout and each failure ``error: MESSAGE`` to stderr.
    Returns 0 when all succeeded, 1 when any failed and 2 for a usage error.
    """
    args = _parser().parse_args(argv)
    if args.list:
        _print_registry()
        return 0

    models_dir = args.models_dir or registry.default_models_dir()
    names = args.names or [registry.default_model(), DEFAULT_CLIP]
    failed: list[str] = []
    for name in names:
        try:
            paths = _download_one(name, models_dir, progress=not args.quiet)
        except ModelError as error:
            logger.info("Download of %s failed: %s", name, error)
            print(f"error: {str(error).strip()}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"{name}: {' '.join(str(path) for path in paths) or 'ready'}")

    if failed:
        print(
            f"error: {len(failed)} of {len(names)} downloads failed: {', '.join(failed)}.",
            file=sys.stderr,
        )
        return 1
    return 0
