"""URL-list conversion images/s against the same photos as local files: decoding, not waiting, bounds it.

``ecomaug shard URLS.csv OUT --url-column url`` fetches on a thread pool in the parent process
(:mod:`loaders.convert.fetch`) and hands the bytes to the decode workers. This stage serves
synthetic listing photos (:func:`bench.convert.synthetic_photos`) from a local
``ThreadingHTTPServer`` that waits ``--latency-ms`` before every response (a far server), and
times, in this process, with the same worker processes and settings:

* ``local files``: ``convert_to_shards`` of a manifest of the photos' paths (the decode bound);
* ``URLs``: ``convert_to_shards`` of a manifest of their URLs (``url_column="url"``), with
  ``--fetch-threads`` / ``--per-host`` fetches in flight;
* ``URLs, one fetch at a time``: the same with one fetch thread: what waiting alone would cost.

Local and URL runs alternate, repetition by repetition, so that load from elsewhere hits them
alike; the one-at-a-time run is slow (a latency per photo at least): it runs once, over the
first ``--serial-count`` photos. The server counts requests and its peak of open connections and
of requests in flight, per run. Goal: URLs / local >= 0.9 wherever the waiting allows more
images/s than the local run makes (``min(fetch threads, per host) / latency``: with one far host,
``--per-host`` is the limit that binds).

    python -m bench fetch --count 400 --latency-ms 100 --workers 2 --out bench-fetch.json
    python -m bench.fetch --count 40 --latency-ms 20 --repeats 1
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click

from bench.convert import synthetic_photos
from bench.harness import BenchCommand, write_results
from bench.timing import Measurement, conditions
from ecomaug.limits import MAX_FETCH_THREADS, MAX_FETCHES_PER_HOST, MAX_WORKERS

ROWS = {"local": "local files: convert_to_shards", "url": "URLs: convert_to_shards",
        "serial": "URLs, one fetch at a time"}
GOAL = 0.9


class _Handler(BaseHTTPRequestHandler):
    """Each photo by its file name, after the server's latency; keep-alive, as real servers do."""

    protocol_version = "HTTP/1.1"
    server: "SlowServer"

    def log_message(self, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.count("connections", +1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.count("connections", -1)

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.server.count("in_flight", +1)
        try:
            time.sleep(self.server.latency)
            body = self.server.photos.get(self.path.lstrip("/"))
        finally:
            self.server.count("in_flight", -1)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


class SlowServer(ThreadingHTTPServer):
    """Photos from memory on 127.0.0.1, ``latency`` seconds after each request, with counts.

    Attributes:
        photos: file name -> bytes.
        latency: seconds each request waits before its response.
    """

    daemon_threads = True
    request_queue_size = 1024  # a burst of connects never waits out a full accept queue (1-s SYN retries)

    def __init__(self, photos: dict[str, bytes], latency: float):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.photos, self.latency = photos, latency
        self._lock = threading.Lock()
        self._now = {"connections": 0, "in_flight": 0}
        self._peak = dict(self._now)
        self._requests = 0

    def count(self, what: str, change: int) -> None:
        """Open connections or requests in flight go up or down by ``change``."""
        with self._lock:
            self._now[what] += change
            self._peak[what] = max(self._peak[what], self._now[what])
            if what == "in_flight" and change > 0:
                self._requests += 1

    def take_counts(self) -> dict[str, int]:
        """Requests and peaks since the last call; the peaks start again from what is open now."""
        with self._lock:
            counts = {"requests": self._requests, "peak_connections": self._peak["connections"],
                      "peak_in_flight": self._peak["in_flight"]}
            self._peak, self._requests = dict(self._now), 0
        return counts

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


def write_lists(folder: Path, base_url: str, scratch: Path, serial_count: int) -> dict[str, Path]:
    """Manifests of the photos in ``folder``, per row: their paths (column ``path``), their URLs
    (``url``), and the first ``serial_count`` URLs."""
    names = sorted(path.name for path in folder.glob("*.jpg"))
    lists = {"local": ("path", f"{folder.resolve()}/", names), "url": ("url", base_url, names),
             "serial": ("url", base_url, names[:serial_count])}
    for row, (column, prefix, listed) in lists.items():
        with (scratch / f"{row}.csv").open("w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow([column])
            writer.writerows([prefix + name] for name in listed)
    return {row: scratch / f"{row}.csv" for row in lists}


def run_benchmark(folder: Path, *, workers: int, latency: float, fetch_threads: int, per_host: int,
                  max_size: int, quality: int, repeats: int, serial_count: int, scratch: Path,
                  progress: bool = True) -> dict[str, Any]:
    """One untimed local run (page cache, lazy imports), then ``repeats`` x (local, URLs), then
    the one-fetch-at-a-time run once over the first ``serial_count`` photos (at one fetch per
    latency, more would only take longer), each into a fresh folder.

    Returns:
        Per row (``local``, ``url``, ``serial``): its :class:`Measurement`, the last run's counts
        (``inputs``, ``written``, ``skipped``, ``skipped_by_reason``) and per run the server's
        counts (``requests``, ``peak_connections``, ``peak_in_flight``).
    """
    from tqdm import tqdm

    from loaders.convert import convert_to_shards
    from loaders.convert.fetch import FetchOptions

    photos = {path.name: path.read_bytes() for path in sorted(folder.glob("*.jpg"))}
    server = SlowServer(photos, latency)
    threading.Thread(target=server.serve_forever, name="bench-fetch-server", daemon=True).start()
    try:
        lists = write_lists(folder, server.base_url, scratch, serial_count)
        fetches = {"url": FetchOptions(threads=fetch_threads, per_host=per_host),
                   "serial": FetchOptions(threads=1, per_host=1)}
        results: dict[str, dict[str, Any]] = {row: {"seconds": [], "server": []} for row in ROWS}

        def once(row: str) -> tuple[float, dict[str, Any]]:
            out = Path(tempfile.mkdtemp(dir=scratch))
            column = {} if row == "local" else {"url_column": "url", "fetch": fetches[row]}
            try:
                started = time.perf_counter()
                report = convert_to_shards(lists[row], out, workers=workers, max_size=max_size, quality=quality,
                                           progress=False, **column)
                seconds = time.perf_counter() - started
            finally:
                shutil.rmtree(out, ignore_errors=True)
            return seconds, {"inputs": report.inputs, "written": report.written, "skipped": report.skipped,
                             "skipped_by_reason": dict(report.skipped_by_reason)}

        once("local")
        server.take_counts()
        schedule = ["local", "url"] * repeats + ["serial"]
        for row in tqdm(schedule, desc="bench fetch", unit="run", disable=not progress, leave=False):
            seconds, counts = once(row)
            results[row]["seconds"].append(seconds)
            results[row].update(last_run=counts, images=counts["inputs"])
            results[row]["server"].append(server.take_counts())
    finally:
        server.shutdown()
        server.server_close()
    for row, result in results.items():
        result["measurement"] = Measurement(ROWS[row], result.pop("images"), result.pop("seconds"))
    return results


def summary(results: dict[str, Any], *, latency: float, fetch_threads: int, per_host: int) -> dict[str, Any]:
    """The ratios to the local rate, the most images/s the waiting allows (in flight / latency) and
    whether the goal applies (the waiting allows more than the local run makes)."""
    local = results["local"]["measurement"].median_rate
    ceiling = min(fetch_threads, per_host) / latency if latency > 0 else None
    return {"url_over_local": results["url"]["measurement"].median_rate / local,
            "serial_over_local": results["serial"]["measurement"].median_rate / local,
            "goal": GOAL, "goal_applies": ceiling is None or ceiling > local,
            "waiting_ceiling_per_s": ceiling, "serial_ceiling_per_s": 1 / latency if latency > 0 else None}


@click.command("fetch", cls=BenchCommand)
@click.option("--count", type=click.IntRange(min=1), default=400, show_default=True,
              help="Synthetic 1024x768 listing photos served and converted.")
@click.option("--latency-ms", type=click.FloatRange(min=0), default=100.0, show_default=True,
              help="The server's wait before each response: a far server.")
@click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=2, show_default=True,
              help="Decode worker processes of every run.")
@click.option("--fetch-threads", type=click.IntRange(1, MAX_FETCH_THREADS), default=64, show_default=True,
              help="Fetches in flight of the URL run (ecomaug shard's default).")
@click.option("--per-host", type=click.IntRange(1, MAX_FETCHES_PER_HOST), default=16, show_default=True,
              help="Fetches in flight to the one server (ecomaug shard's default).")
@click.option("--max-size", type=click.IntRange(min=1), default=384, show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed local and URL runs each (the one-at-a-time run runs once).")
@click.option("--serial-count", type=click.IntRange(min=1), default=100, show_default=True,
              help="Photos of the one-fetch-at-a-time run (the first ones; at most --count).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results here (JSON).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def main(count: int, latency_ms: float, workers: int, fetch_threads: int, per_host: int, max_size: int,
         quality: int, repeats: int, serial_count: int, out_path: Path | None, progress: bool) -> None:
    """URL-list conversion images/s (a slow local HTTP server) against the same photos as local files.

    \b
    Example:
      python -m bench fetch --count 400 --latency-ms 100 --workers 2 --out bench-fetch.json
    """
    settings = dict(count=count, latency_ms=latency_ms, workers=workers, fetch_threads=fetch_threads,
                    per_host=per_host, max_size=max_size, quality=quality, repeats=repeats,
                    serial_count=min(serial_count, count))
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as scratch_name:
        scratch = Path(scratch_name)
        folder = synthetic_photos(scratch / "photos", count)
        results = run_benchmark(folder, workers=workers, latency=latency_ms / 1000, fetch_threads=fetch_threads,
                                per_host=per_host, max_size=max_size, quality=quality, repeats=repeats,
                                serial_count=settings["serial_count"], scratch=scratch, progress=progress)
    ratios = summary(results, latency=latency_ms / 1000, fetch_threads=fetch_threads, per_host=per_host)
    _report(results, ratios, settings, out_path)


def _report(results: dict[str, Any], ratios: dict[str, Any], settings: dict[str, Any], out_path: Path | None) -> None:
    """Print the table (the server's counts: the most of any run of the row), the ratios and the
    conditions; write the JSON (every run's counts) when asked."""
    print(f"{'run':32s} {'img/s median':>12s} {'min':>8s} {'max':>8s} {'requests':>9s} {'peak conn':>9s} "
          f"{'in flight':>9s} {'written':>8s} {'skipped':>8s}")
    for result in results.values():
        row: Measurement = result["measurement"]
        low, high = row.spread
        server = {key: max(run[key] for run in result["server"]) for key in result["server"][0]}
        last = result["last_run"]
        print(f"{row.name:32s} {row.median_rate:12.1f} {low:8.1f} {high:8.1f} {server['requests']:9d} "
              f"{server['peak_connections']:9d} {server['peak_in_flight']:9d} "
              f"{last['written']:8d} {last['skipped']:8d}")
    ceiling = ratios["waiting_ceiling_per_s"]
    goal = f"goal >= {GOAL}" if ratios["goal_applies"] else "no goal: the waiting allows fewer img/s than local"
    print(f"URLs / local = {ratios['url_over_local']:.3f} ({goal}), one at a time / local = "
          f"{ratios['serial_over_local']:.3f}; waiting allows "
          f"{'no limit' if ceiling is None else f'{ceiling:.0f} img/s'} (min(fetch threads, per host) / latency); "
          f"{settings['count']} photos, latency {settings['latency_ms']:g} ms, workers {settings['workers']}, "
          f"fetch threads {settings['fetch_threads']}, per host {settings['per_host']}, repeats {settings['repeats']}, "
          f"one at a time over {settings['serial_count']}")
    facts = conditions()
    print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; conditions: "
          + ", ".join(f"{k}={facts[k]}" for k in ("python", "cpu_count", "PIL")))
    if out_path is not None:
        rows = {key: {**result["measurement"].as_dict(), "last_run": result["last_run"], "server": result["server"]}
                for key, result in results.items()}
        payload = {"ratios": ratios, "settings": {**settings, "input": f"synthetic {settings['count']} x 1024x768"},
                   "rows": rows, "load_average": os.getloadavg(), "conditions": facts}
        write_results(out_path, payload)


if __name__ == "__main__":
    main()
