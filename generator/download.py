"""Download registered VQGAN files into the models directory.

Each file is fetched into ``NAME.ext.part`` and renamed into place only after its
size and SHA-256 check out, so a file under its final name is always complete.
An interrupted download resumes with an HTTP Range request. Mirrors are tried in
registry order. When all of them fail, one ModelError lists every URL with its
error and the exact paths to place the files by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from generator import registry
from generator.errors import ModelError
from generator.registry import ModelEntry, RemoteFile

logger = logging.getLogger(__name__)

USER_AGENT = "imagine-model-download/0.1"
TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20
DEFAULT_CLIP = "ViT-B-32/openai"


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
    lines = [
        "To install it by hand, download the files on a machine with network access "
        "(any of the URLs above) and save them as:",
        f"  {checkpoint}  (checkpoint, from one of: {', '.join(entry.checkpoint.urls)})",
        f"  {config}  (config, from one of: {', '.join(entry.config.urls)})",
    ]
    if entry.checkpoint.is_enforced("sha256"):
        lines.append(f"The checkpoint's SHA-256 must be {entry.checkpoint.sha256}.")
    return "\n".join(lines)


def _all_mirrors_failed(
    remote: RemoteFile, entry: ModelEntry, directory: Path, errors: list[tuple[str, str]]
) -> ModelError:
    tried = "\n".join(f"  - {url}: {message}" for url, message in errors)
    return ModelError(
        f"Could not download the {remote.kind} of VQGAN {entry.name}; every mirror failed:\n"
        f"{tried}\n{_manual_instructions(entry, directory)}"
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
            logger.warning("Download of %s from %s failed: %s", remote.filename, url, error)
            errors.append((url, _describe(error)))
            continue

        os.replace(part, target)
        source.unlink(missing_ok=True)
        _write_stamp(target, digest)
        logger.info("Saved %s", target)
        return target

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
    parser = argparse.ArgumentParser(
        prog="python -m generator download",
        description=(
            "Download models into the models directory. NAME is a registered VQGAN "
            "or a CLIP spec MODEL/TAG (weights go to the same directory). Without "
            f"names: {registry.default_model()} and {DEFAULT_CLIP}."
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


def main_download(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m generator download``; return the process exit status.

    Prints each downloaded path; a ModelError prints its message to stderr and
    returns 1.
    """
    args = _parser().parse_args(argv)
    if args.list:
        _print_registry()
        return 0

    models_dir = args.models_dir or registry.default_models_dir()
    names = args.names or [registry.default_model(), DEFAULT_CLIP]
    vqgans = [name for name in names if "/" not in name]
    clips = [name for name in names if "/" in name]
    try:
        for path in download_models(vqgans, models_dir, progress=not args.quiet):
            print(path)
        for spec in clips:
            from generator.clip import load_clip

            load_clip(spec, "cpu", models_dir)
            print(f"{spec}: weights in {models_dir}")
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
