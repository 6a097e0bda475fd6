"""Downloads against a real HTTP server on 127.0.0.1: mirrors, resume, checksums, errors."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from generator.download import (
    download_file,
    download_model,
    main_download,
    probe_url,
    verify_model_files,
)
from generator.errors import ModelError
from generator.registry import ModelEntry, RemoteFile
from generator.testing import build_tiny_clip

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
CONFIG = b"model:\n  target: taming.models.vqgan.VQModel\n"


@dataclass
class Route:
    """What the test server sends for one path."""

    body: bytes
    ranges: bool = True
    status: int = 200
    # Send only this many bytes of the body, then close, while announcing all of it.
    cut_after: int | None = None


@dataclass
class Server:
    base: str
    routes: dict[str, Route]
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            server.requests.append((self.path, range_header))
            route = server.routes.get(self.path)
            if route is None or route.status != 200:
                self.send_error(404 if route is None else route.status)
                return

            body, status, start = route.body, 200, 0
            if route.ranges and range_header and range_header.startswith("bytes="):
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206

            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            sent = body[start:]
            if route.cut_after is not None:
                sent = sent[: route.cut_after]
            self.wfile.write(sent)

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(base="", routes={})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _closed_port_url() -> str:
    """A loopback URL on a port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.ckpt"


def _entry(
    checkpoint_urls: list[str],
    config_urls: list[str],
    *,
    sha256: str | None = PAYLOAD_SHA256,
    size: int | None = len(PAYLOAD),
    unverified: frozenset[str] = frozenset(),
) -> ModelEntry:
    name = "test_model"
    return ModelEntry(
        name=name,
        description="test",
        quantizer="vector",
        factor=16,
        n_embed=1024,
        config=RemoteFile(name, "config", tuple(config_urls), None, None, frozenset()),
        checkpoint=RemoteFile(
            name, "checkpoint", tuple(checkpoint_urls), size, sha256, unverified
        ),
    )


def test_download_success(server: Server, tmp_path: Path) -> None:
    server.routes["/model.ckpt"] = Route(PAYLOAD)
    server.routes["/model.yaml"] = Route(CONFIG)
    entry = _entry([server.url("/model.ckpt")], [server.url("/model.yaml")])

    paths = download_model(entry, tmp_path, progress=False)

    assert [p.name for p in paths] == ["test_model.yaml", "test_model.ckpt"]
    assert (tmp_path / "test_model.ckpt").read_bytes() == PAYLOAD
    assert (tmp_path / "test_model.yaml").read_bytes() == CONFIG
    assert not list(tmp_path.glob("*.part*"))
    verify_model_files(entry, tmp_path)


def test_download_keeps_existing_file(server: Server, tmp_path: Path) -> None:
    (tmp_path / "test_model.ckpt").write_bytes(PAYLOAD)
    entry = _entry([server.url("/model.ckpt")], [server.url("/model.yaml")])

    download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert server.requests == []


def test_download_resumes_partial_file(server: Server, tmp_path: Path) -> None:
    server.routes["/model.ckpt"] = Route(PAYLOAD)
    entry = _entry([server.url("/model.ckpt")], [])
    (tmp_path / "test_model.ckpt.part").write_bytes(PAYLOAD[:40_000])

    target = download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert target.read_bytes() == PAYLOAD
    assert server.requests == [("/model.ckpt", "bytes=40000-")]


def test_download_resumes_after_cut_connection(server: Server, tmp_path: Path) -> None:
    server.routes["/model.ckpt"] = Route(PAYLOAD, cut_after=30_000)
    entry = _entry([server.url("/model.ckpt")], [])

    with pytest.raises(ModelError):
        download_file(entry.checkpoint, entry, tmp_path, progress=False)
    part = tmp_path / "test_model.ckpt.part"
    assert part.exists()
    assert not (tmp_path / "test_model.ckpt").exists()
    partial_size = part.stat().st_size
    assert 0 < partial_size <= 30_000

    server.routes["/model.ckpt"] = Route(PAYLOAD)
    target = download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert target.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/model.ckpt", f"bytes={partial_size}-")


def test_download_without_range_support(server: Server, tmp_path: Path) -> None:
    server.routes["/model.ckpt"] = Route(PAYLOAD, ranges=False)
    entry = _entry([server.url("/model.ckpt")], [])
    (tmp_path / "test_model.ckpt.part").write_bytes(b"stale bytes from an earlier try")

    target = download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert target.read_bytes() == PAYLOAD
    assert server.requests[0][1] is not None


def test_download_complete_part_gets_416(server: Server, tmp_path: Path) -> None:
    server.routes["/model.ckpt"] = Route(PAYLOAD)
    entry = _entry([server.url("/model.ckpt")], [])
    (tmp_path / "test_model.ckpt.part").write_bytes(PAYLOAD)

    target = download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert target.read_bytes() == PAYLOAD


def test_checksum_mismatch_tries_next_mirror(server: Server, tmp_path: Path) -> None:
    wrong = bytearray(PAYLOAD)
    wrong[500] ^= 0xFF
    server.routes["/bad.ckpt"] = Route(bytes(wrong))
    server.routes["/good.ckpt"] = Route(PAYLOAD)
    entry = _entry([server.url("/bad.ckpt"), server.url("/good.ckpt")], [])

    target = download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert target.read_bytes() == PAYLOAD
    assert [path for path, _ in server.requests] == ["/bad.ckpt", "/good.ckpt"]
    # The bad copy was deleted, so the second mirror started from byte 0.
    assert server.requests[1][1] is None


def test_checksum_mismatch_everywhere(server: Server, tmp_path: Path) -> None:
    server.routes["/bad.ckpt"] = Route(PAYLOAD[::-1])
    entry = _entry([server.url("/bad.ckpt")], [])

    with pytest.raises(ModelError, match="sha256 mismatch"):
        download_file(entry.checkpoint, entry, tmp_path, progress=False)
    assert not (tmp_path / "test_model.ckpt").exists()
    assert not (tmp_path / "test_model.ckpt.part").exists()


def test_unverified_checksum_only_warns(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.routes["/model.ckpt"] = Route(PAYLOAD)
    entry = _entry(
        [server.url("/model.ckpt")], [], sha256="0" * 64, unverified=frozenset({"sha256"})
    )

    with caplog.at_level(logging.WARNING, logger="generator.download"):
        target = download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert target.read_bytes() == PAYLOAD
    assert PAYLOAD_SHA256 in caplog.text


def test_all_mirrors_failing_message(server: Server, tmp_path: Path) -> None:
    missing = server.url("/missing.ckpt")
    closed_port_url = _closed_port_url()
    entry = _entry([missing, closed_port_url], [server.url("/model.yaml")])

    with pytest.raises(ModelError) as raised:
        download_file(entry.checkpoint, entry, tmp_path, progress=False)

    message = str(raised.value)
    assert "test_model" in message
    assert f"{missing}: HTTP 404" in message
    assert f"{closed_port_url}: cannot connect" in message
    assert str((tmp_path / "test_model.ckpt").resolve()) in message
    assert str((tmp_path / "test_model.yaml").resolve()) in message
    assert PAYLOAD_SHA256 in message


def test_failed_mirrors_log_no_warning(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _entry([server.url("/missing.ckpt"), _closed_port_url()], [])

    with caplog.at_level(logging.INFO, logger="generator.download"), pytest.raises(ModelError):
        download_file(entry.checkpoint, entry, tmp_path, progress=False)

    # The ModelError lists every mirror, so a warning per mirror would repeat it.
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "missing.ckpt failed: HTTP Error 404" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_later_mirror_success_warns(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.routes["/good.ckpt"] = Route(PAYLOAD)
    entry = _entry([server.url("/missing.ckpt"), server.url("/good.ckpt")], [])

    with caplog.at_level(logging.WARNING, logger="generator.download"):
        download_file(entry.checkpoint, entry, tmp_path, progress=False)

    assert "after 1 other mirror(s) failed" in caplog.text


def test_all_mirrors_failing_first_line(server: Server, tmp_path: Path) -> None:
    entry = _entry([server.url("/missing.ckpt")], [server.url("/model.yaml")])

    with pytest.raises(ModelError) as raised:
        download_file(entry.checkpoint, entry, tmp_path, progress=False)

    lines = str(raised.value).splitlines()
    assert lines[0] == (
        "Could not download VQGAN test_model: every mirror of its checkpoint failed. "
        "Check the network connection, or install the files by hand as shown below."
    )
    assert f"  {(tmp_path / 'test_model.ckpt').resolve()}  (checkpoint, SHA-256 " in lines[-2]
    assert lines[-1] == f"      {server.url('/missing.ckpt')}"


def test_probe_url(server: Server) -> None:
    assert probe_url(server.url("/missing.safetensors")) is None
    server.routes["/model.safetensors"] = Route(PAYLOAD)
    assert probe_url(server.url("/model.safetensors")) is None

    failure = probe_url(_closed_port_url())
    assert failure is not None
    assert "refused" in failure.lower()


def test_verify_rejects_wrong_checksum(tmp_path: Path) -> None:
    entry = _entry(["http://127.0.0.1:9/x"], ["http://127.0.0.1:9/y"])
    (tmp_path / "test_model.yaml").write_bytes(CONFIG)
    (tmp_path / "test_model.ckpt").write_bytes(PAYLOAD[::-1])

    with pytest.raises(ModelError, match="wrong checksum") as raised:
        verify_model_files(entry, tmp_path)
    assert "python -m generator download test_model" in str(raised.value)


def test_verify_rejects_wrong_size(tmp_path: Path) -> None:
    entry = _entry(["http://127.0.0.1:9/x"], ["http://127.0.0.1:9/y"])
    (tmp_path / "test_model.yaml").write_bytes(CONFIG)
    (tmp_path / "test_model.ckpt").write_bytes(PAYLOAD[:1000])

    with pytest.raises(ModelError, match="has 1000 bytes, expected 102400"):
        verify_model_files(entry, tmp_path)


def test_verify_reports_missing_file(tmp_path: Path) -> None:
    entry = _entry(["http://127.0.0.1:9/x"], ["http://127.0.0.1:9/y"])

    with pytest.raises(ModelError, match="missing"):
        verify_model_files(entry, tmp_path)


def test_main_download_lists_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_download(["--list"]) == 0

    output = capsys.readouterr().out
    assert "vqgan_imagenet_f16_16384 (default)" in output
    assert "gumbel_f8_8192" in output


def test_main_download_unknown_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main_download(["no_such_model", "--models-dir", str(tmp_path), "--quiet"])

    assert status == 1
    error = capsys.readouterr().err
    assert "no_such_model" in error
    assert "vqgan_imagenet_f16_16384" in error


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the Hugging Face Hub client at a loopback port nothing listens on."""
    endpoint = _closed_port_url().removesuffix("/gone.ckpt")
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hub_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return endpoint


def test_main_download_tries_every_name(
    tmp_path: Path, offline_hub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    clip_spec = build_tiny_clip(tmp_path / "clip")
    names = ["no_such_model", "ViT-B-32/openai", clip_spec]

    status = main_download([*names, "--models-dir", str(tmp_path / "models"), "--quiet"])

    output = capsys.readouterr()
    assert status == 1
    assert "Unknown VQGAN model 'no_such_model'" in output.err
    assert "error: Could not download CLIP ViT-B-32/openai: cannot connect" in output.err
    assert output.err.splitlines()[-1] == (
        "error: 2 of 3 downloads failed: no_such_model, ViT-B-32/openai."
    )
    weights = clip_spec.partition("/")[2]
    assert output.out.splitlines() == [f"{clip_spec}: {weights}"]
