"""``ecomaug shard --url-column``: a URL list fetched from a local HTTP server (good, failing, slow,
redirecting, oversized responses) and a local S3 (moto), every failure a skip with its reason, and a
re-run that fetches nothing already written. No internet needed."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import loaders.convert.run as convert_module
from ecomaug.cli import main as cli
from loaders.convert import convert_to_shards
from loaders.convert.fetch import FetchOptions, fetch_in_order, url_scheme
from loaders.convert.hygiene import Rejected

CAP = 50_000  # --max-bytes of these tests; every good image is far below it
FAST = FetchOptions(threads=8, per_host=4, timeout=0.4, retries=1, max_bytes=CAP, backoff=0.01)


def image_bytes(name: str, image_format: str = "JPEG") -> bytes:
    """A small noisy image of its own (no two names share bytes or pixels)."""
    seed = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, as real servers do
    server: "_Server"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/jpeg", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", headers.pop("length", str(len(body))))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        path = self.path
        with self.server.lock:
            self.server.requests[path] += 1
            seen = self.server.requests[path]
        if path.startswith("/hold/"):  # in flight for a while: how many at once?
            with self.server.lock:
                self.server.active += 1
                self.server.most_active = max(self.server.most_active, self.server.active)
            time.sleep(0.15)
            with self.server.lock:
                self.server.active -= 1
            self._send(200, image_bytes(path))
        elif path.startswith("/good/"):
            self._send(200, image_bytes(path, "PNG" if path.endswith(".png") else "JPEG"))
        elif path == "/flaky.jpg":  # 500 once, then the image
            self._send(500) if seen == 1 else self._send(200, image_bytes(path))
        elif path == "/down.jpg":
            self._send(503)
        elif path == "/slow.jpg":
            time.sleep(1.5)
            self._send(200, image_bytes(path))
        elif path == "/redirect.jpg":
            self._send(302, Location="/good/redirected.jpg")
        elif path == "/loop.jpg":
            self._send(302, Location="/loop.jpg")
        elif path == "/to-file.jpg":
            self._send(302, Location=self.server.file_url)
        elif path == "/big.jpg":  # says its size up front
            self._send(200, b"\xff" * (CAP + 1))
        elif path == "/chunked.jpg":  # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\xff" * 8192
            for _ in range(CAP // len(chunk) + 2):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/page.jpg":
            self._send(200, b"<html><body>Not here</body></html>", content_type="text/html")
        else:
            self._send(404, b"no such thing", content_type="text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, file_url: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.connections = 0
        self.active = self.most_active = 0
        self.file_url = file_url

    def get_request(self):
        accepted = super().get_request()
        with self.lock:
            self.connections += 1
        return accepted

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (timeout, size cap) leaves a broken pipe here: expected


@pytest.fixture
def server(tmp_path):
    local = tmp_path / "local.jpg"  # a good image that only a file:// or bare-path read could reach
    local.write_bytes(image_bytes("local"))
    running = _Server(local.as_uri())
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running, f"http://127.0.0.1:{running.server_address[1]}", local
    running.shutdown()
    running.server_close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def url_rows(base: str, local: Path) -> dict[str, str | None]:
    """Each URL of the list -> the skip reason it must get (None: written)."""
    return {
        f"{base}/good/a.jpg": None, f"{base}/good/b.png": None, f"{base}/flaky.jpg": None,
        f"{base}/redirect.jpg": None,
        f"{base}/missing.jpg": "HTTP 404", f"{base}/down.jpg": "HTTP 503", f"{base}/slow.jpg": "timeout",
        f"{base}/loop.jpg": "too many redirects", f"{base}/to-file.jpg": "scheme not allowed",
        f"{base}/big.jpg": "too large", f"{base}/chunked.jpg": "too large", f"{base}/page.jpg": "not an image",
        f"http://127.0.0.1:{closed_port()}/x.jpg": "connection refused",
        local.as_uri(): "scheme not allowed", str(local): "scheme not allowed", "local.jpg": "scheme not allowed",
        f"pipe:cat {local}": "scheme not allowed", "ftp://example.invalid/a.jpg": "scheme not allowed",
    }


def write_list(path: Path, urls: list[str]) -> Path:
    if path.suffix == ".csv":
        path.write_text("url,item_id\n" + "".join(f"\"{url}\",{n}\n" for n, url in enumerate(urls)))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"url": url, "item_id": n}) + "\n" for n, url in enumerate(urls)))
    else:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.table({"url": urls, "item_id": list(range(len(urls)))}), path)
    return path


def outcome(out: Path) -> tuple[dict, dict[str, dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    return manifest, {record["source"]: record for record in skipped}


def test_a_url_list_converts_with_a_reason_per_skip_and_a_rerun_fetches_nothing(server, tmp_path):
    running, base, local = server
    expected = url_rows(base, local)
    listing = write_list(tmp_path / "urls.csv", list(expected))
    out = tmp_path / "out"
    report = convert_to_shards(listing, out, url_column="url", fetch=FAST, workers=0, progress=False)
    manifest, skipped = outcome(out)
    assert report.inputs == len(expected) == report.written + report.skipped
    assert report.written == sum(reason is None for reason in expected.values()) == 4
    assert {source: record["reason"] for source, record in skipped.items()} == \
        {url: reason for url, reason in expected.items() if reason is not None}
    assert all(record.get("detail") for record in skipped.values())
    assert "after 2 tries" in skipped[f"{base}/down.jpg"]["detail"]
    assert running.requests["/flaky.jpg"] == 2 and running.requests["/down.jpg"] == 2
    assert running.requests["/good/redirected.jpg"] == 1
    assert manifest["options"]["url_column"] == "url" and manifest["options"]["max_bytes"] == CAP
    assert manifest["options"]["fetch"]["retries"] == 1

    before = sum(running.requests.values())
    again = convert_to_shards(listing, out, url_column="url", fetch=FAST, workers=0, progress=False)
    assert again.already_complete and sum(running.requests.values()) == before
    faster = FetchOptions(threads=2, per_host=1, timeout=1, retries=0, max_bytes=CAP)  # only the pace differs
    assert convert_to_shards(listing, out, url_column="url", fetch=faster, workers=0, progress=False).already_complete
    with pytest.raises(ValueError, match="max_bytes"):  # the size cap decides what is written: refused
        convert_to_shards(listing, out, url_column="url", fetch=FetchOptions(max_bytes=CAP * 2), workers=0,
                          progress=False)
    assert sum(running.requests.values()) == before


def test_one_connection_serves_one_fetch_after_another_whatever_their_status(server):
    running, base, _ = server
    paths = ["/missing.jpg", "/redirect.jpg", "/good/a.jpg", "/missing.jpg", "/good/b.jpg", "/redirect.jpg"]
    results = list(fetch_in_order([base + path for path in paths],
                                  FetchOptions(threads=1, per_host=1, timeout=2, retries=0, max_bytes=CAP)))
    assert [r.reason if isinstance(r, Rejected) else "bytes" for r in results] == \
        ["HTTP 404", "bytes", "bytes", "HTTP 404", "bytes", "bytes"]
    assert results[1] == image_bytes("/good/redirected.jpg") and results[2] == image_bytes("/good/a.jpg")
    assert running.connections == 1  # kept alive and reused, an error page or redirect body read off first


def test_fetches_to_one_host_never_exceed_the_per_host_limit(server):
    running, base, _ = server
    urls = [f"{base}/hold/{n}.jpg" for n in range(8)]
    results = list(fetch_in_order(urls, FetchOptions(threads=8, per_host=2, timeout=5, retries=0, max_bytes=CAP)))
    assert results == [image_bytes(f"/hold/{n}.jpg") for n in range(8)]  # in input order
    assert running.most_active == 2


def test_a_resumed_url_list_fetches_only_what_is_not_written(server, tmp_path, monkeypatch):
    running, base, _ = server
    urls = [f"{base}/good/{n}.jpg" for n in range(6)]
    listing = write_list(tmp_path / "urls.jsonl", urls)
    real_append = convert_module.append_journal
    calls = []

    def crash_after_the_first_shard(stream, record):
        calls.append(record)
        if len(calls) == 3:  # the header, the first shard, then a crash
            raise RuntimeError("simulated crash")
        real_append(stream, record)

    monkeypatch.setattr(convert_module, "append_journal", crash_after_the_first_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_to_shards(listing, tmp_path / "out", url_column="url", fetch=FAST, shard_size=2, workers=0,
                          progress=False)
    monkeypatch.setattr(convert_module, "append_journal", real_append)
    first = dict(running.requests)
    report = convert_to_shards(listing, tmp_path / "out", url_column="url", fetch=FAST, shard_size=2,
                               workers=0, progress=False)
    assert report.resumed and report.written == 6 and report.processed == 4
    fetched_again = {path for path, count in running.requests.items() if count > first.get(path, 0)}
    assert fetched_again == {f"/good/{n}.jpg" for n in range(2, 6)}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_lists_through_the_command_with_a_worker(server, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    running, base, local = server
    urls = [f"{base}/good/a.jpg", f"{base}/missing.jpg", local.as_uri()]
    listing = write_list(tmp_path / f"urls{suffix}", urls)
    result = CliRunner().invoke(cli, ["shard", str(listing), str(tmp_path / "out"), "--url-column", "url",
                                      "--workers", "1", "--no-progress", "--timeout", "2", "--retries", "0",
                                      "--max-bytes", "50KB"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 of 3 inputs" in result.output and "HTTP 404: 1" in result.output
    manifest, skipped = outcome(tmp_path / "out")
    assert manifest["totals"]["written"] + manifest["totals"]["skipped"] == 3
    assert skipped[local.as_uri()]["reason"] == "scheme not allowed"
    shard = next((tmp_path / "out").glob("shard-*.tar"))
    import tarfile

    with tarfile.open(shard) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert meta["source"] == urls[0] and meta["item_id"] == "0"


def test_url_options_are_checked_in_one_line(tmp_path, server):
    _, base, _ = server
    listing = write_list(tmp_path / "urls.csv", [f"{base}/good/a.jpg"])
    for arguments, expected in [(["--url-column", "link"], "no URL column 'link'"),
                                (["--url-column", "url", "--path-column", "file"], "not both"),
                                (["--url-column", "url", "--max-bytes", "lots"], "--max-bytes"),
                                (["--url-column", "url", "--per-host", "0"], "--per-host"),
                                (["--timeout", "3"], "give --url-column")]:
        result = CliRunner().invoke(cli, ["shard", str(listing), str(tmp_path / "out"), *arguments])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ValueError, match="manifest of URLs"):
        convert_to_shards(tmp_path, tmp_path / "out", url_column="url", progress=False)


def test_a_scheme_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    listing = write_list(tmp_path / "urls.csv", ["gs://bucket/a.jpg", "http://[::1/a.jpg"])
    with pytest.raises(ValueError, match=r'pip install "ecomaug\[gcs\]"'):
        convert_to_shards(listing, tmp_path / "out", url_column="url", workers=0, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_malformed_url_is_a_skip_not_an_error(tmp_path):
    listing = write_list(tmp_path / "urls.csv", ["http://[::1/a.jpg", "http://127.0.0.1:99999/a.jpg", "https://"])
    report = convert_to_shards(listing, tmp_path / "out", url_column="url", fetch=FAST, workers=0, progress=False)
    assert report.skipped_by_reason == {"bad URL": 3}


def test_the_command_defaults_are_the_library_defaults():
    from ecomaug.commands.shard import shard

    defaults = {option.name: option.default for option in shard.params}
    options = FetchOptions()
    assert (defaults["fetch_threads"], defaults["per_host"], defaults["timeout"], defaults["retries"]) == \
        (options.threads, options.per_host, options.timeout, options.retries)
    assert defaults["max_bytes"] == "20MB" and options.max_bytes == 20_000_000


@pytest.mark.parametrize("url, scheme", [("https://a/b.jpg", "https"), ("S3://b/k", "s3"), ("C:\\x.jpg", ""),
                                         ("x.jpg", ""), ("pipe:cat x", "pipe"), ("", "")])
def test_url_scheme(url, scheme):
    assert url_scheme(url) == scheme


# ----------------------------------------------------------------------------- S3 (moto server, tests/conftest.py)
def test_an_s3_url_list_reads_objects_and_skips_a_missing_one(s3_client, tmp_path):
    client = s3_client
    client.create_bucket(Bucket="ecomaug-urls")
    client.put_object(Bucket="ecomaug-urls", Key="a.jpg", Body=image_bytes("s3-a"))
    client.put_object(Bucket="ecomaug-urls", Key="big.jpg", Body=b"\xff" * (CAP + 1))
    urls = ["s3://ecomaug-urls/a.jpg", "s3://ecomaug-urls/nothing.jpg", "s3://ecomaug-urls/big.jpg"]
    listing = write_list(tmp_path / "urls.csv", urls)
    report = convert_to_shards(listing, tmp_path / "out", url_column="url", fetch=FAST, workers=0,
                               progress=False)
    _, skipped = outcome(tmp_path / "out")
    assert (report.written, report.skipped) == (1, 2)
    assert {source: record["reason"] for source, record in skipped.items()} == \
        {urls[1]: "not found", urls[2]: "too large"}


def test_a_parquet_manifest_of_paths_and_the_line_when_pyarrow_is_missing(tmp_path, monkeypatch):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    (tmp_path / "a.jpg").write_bytes(image_bytes("parquet-a"))
    pyarrow.parquet.write_table(pyarrow.table({"path": ["a.jpg", "gone.jpg"], "item_id": [7, 8]}),
                                tmp_path / "items.parquet")
    report = convert_to_shards(tmp_path / "items.parquet", tmp_path / "out", workers=0, progress=False)
    assert (report.written, report.skipped_by_reason) == (1, {"missing file": 1})
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(ValueError, match=r'pip install "ecomaug\[parquet\]"'):
        convert_to_shards(tmp_path / "items.parquet", tmp_path / "out2", workers=0, progress=False)
