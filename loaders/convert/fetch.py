"""The bytes of a URL list's images: http(s) through one urllib3 connection pool, s3:// and gs://
through fsspec, with timeouts, retries with backoff, a per-host limit and a size cap.

A URL is only ever fetched as a URL of an allowed scheme (:data:`ALLOWED_SCHEMES`); anything else
(``file://``, a bare path, ``pipe:``, ``data:``...) and any redirect off http(s) is a skip with the
reason ``scheme not allowed``, decided before anything is opened. Every failure is a
:class:`~loaders.convert.hygiene.Rejected` with a short stable reason (``HTTP 404``, ``timeout``,
``connection refused``, ``too large``...) and a detail, never an exception.

:func:`fetch_in_order` keeps many fetches in flight on a thread pool (the conversion's decoding
stays the bound, not the waiting) and hands the results back in input order, with a bounded
window so memory stays flat.
"""

from __future__ import annotations

import collections
import http
import random
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generator, Iterable

from loaders.convert.hygiene import Rejected
from loaders.remote import FSSPEC_PACKAGES, url_scheme as remote_scheme

ALLOWED_SCHEMES = ("http", "https", "s3", "gs")
SCHEME_NOT_ALLOWED = "scheme not allowed"
TOO_LARGE = "too large"
# Worth another try: the server or the way to it may be fine a moment later.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Which package each scheme needs, and the extra that installs it (s3, gs: as the shard readers' table).
BACKENDS = {"http": ("urllib3", "urls"), "https": ("urllib3", "urls"),
            **{scheme: FSSPEC_PACKAGES[scheme] for scheme in ("s3", "gs")}}
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class FetchOptions:
    """How a URL list is fetched.

    Attributes:
        threads: fetches in flight at once (threads of the fetch pool).
        per_host: most fetches in flight to one host (``host:port``; an S3/GCS bucket).
        timeout: seconds to connect, and seconds a read may wait for data.
        retries: further tries after a connection error, a timeout, HTTP 408, 429 or 5xx,
            waiting ``backoff * 2**try`` seconds (times a jitter in [0.5, 1.5)) before each.
        max_bytes: size cap of one response: larger ones are skipped (``too large``), checked on
            ``Content-Length`` and while reading.
        max_redirects: redirects followed (http(s) only) before ``too many redirects``.
        backoff: the first retry's wait in seconds.
        seed: seed of the jitter.
    """

    threads: int = 64
    per_host: int = 16
    timeout: float = 10.0
    retries: int = 3
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    backoff: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("threads", "per_host", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"fetch {name} must be >= 1 (got {getattr(self, name)})")
        for name in ("retries", "max_redirects", "backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"fetch {name} must be >= 0 (got {getattr(self, name)})")
        if not self.timeout > 0:
            raise ValueError(f"fetch timeout must be > 0 seconds (got {self.timeout})")

    def recorded(self) -> dict[str, Any]:
        """The options as the manifest records them (the size cap is recorded on its own)."""
        return {"threads": self.threads, "per_host": self.per_host, "timeout": self.timeout,
                "retries": self.retries, "max_redirects": self.max_redirects}


class _Transient(Exception):
    """A failed try worth repeating; ``rejected`` is what to report if it is the last."""

    def __init__(self, rejected: Rejected):
        super().__init__(rejected.reason)
        self.rejected = rejected


def url_scheme(url: str) -> str:
    """The scheme of ``url`` (:func:`loaders.remote.url_scheme`, surrounding blanks ignored), "" for a bare path."""
    return remote_scheme(url.strip()) or ""


def check_backends(urls: Iterable[str]) -> None:
    """Raise ValueError (one line naming the extra to install) when a scheme in ``urls`` lacks its package."""
    import importlib.util

    wanted = {url_scheme(url) for url in urls} & set(BACKENDS)
    for package, extra in sorted({BACKENDS[scheme] for scheme in wanted}):
        if importlib.util.find_spec(package) is None:
            schemes = "/".join(sorted(s for s in wanted if BACKENDS[s][0] == package))
            raise ValueError(f"{schemes} URLs need {package}: pip install \"ecomaug[{extra}]\"")


class Fetcher:
    """Fetches one URL at a time from any number of threads; :meth:`fetch` never raises for a bad URL."""

    def __init__(self, options: FetchOptions):
        self.options = options
        self._lock = threading.Lock()
        self._random = random.Random(options.seed)
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._pool: Any = None
        self._filesystems: dict[str, Any] = {}
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Make fetches under way give up at their next try or wait (a stopped conversion ends promptly)."""
        self._stopping.set()

    def fetch(self, url: str) -> bytes | Rejected:
        """The bytes at ``url``, or why not, after up to ``retries`` further tries."""
        url = url.strip()
        scheme = url_scheme(url)
        if scheme not in ALLOWED_SCHEMES:
            return Rejected(SCHEME_NOT_ALLOWED, f"{scheme}:" if scheme else ("empty" if not url else "not a URL"))
        get = self._http if scheme in ("http", "https") else self._object
        last = Rejected("fetch failed", "")
        for attempt in range(self.options.retries + 1):
            if self._stopping.is_set():
                return Rejected("stopped", "the conversion stopped")
            try:
                return get(url)
            except ValueError as error:  # a malformed URL (an IPv6 host without "]", a bad port...)
                return Rejected("bad URL", one_line(error))
            except _Transient as failure:
                last = failure.rejected
                if attempt < self.options.retries:
                    self._stopping.wait(self._backoff(attempt))
        tries = self.options.retries + 1
        return Rejected(last.reason, f"{last.detail} (after {tries} tries)") if tries > 1 else last

    def _backoff(self, attempt: int) -> float:
        with self._lock:
            jitter = 0.5 + self._random.random()
        return self.options.backoff * 2**attempt * jitter

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            if host not in self._host_slots:
                self._host_slots[host] = threading.BoundedSemaphore(self.options.per_host)
            return self._host_slots[host]

    def _connection_pool(self) -> Any:
        with self._lock:
            if self._pool is None:
                import urllib3

                # One pool per host, as many kept connections as the per-host limit lets run at once.
                self._pool = urllib3.PoolManager(num_pools=256, maxsize=self.options.per_host, block=False,
                                                 retries=False)
            return self._pool

    def _http(self, url: str) -> bytes | Rejected:
        """One try: follow up to ``max_redirects`` http(s) redirects and read the body under the cap."""
        pool = self._connection_pool()
        for _ in range(self.options.max_redirects + 1):
            with self._slot(urllib.parse.urlsplit(url).netloc.lower()):
                outcome = self._http_once(pool, url)
            if not isinstance(outcome, str):
                return outcome
            url = outcome
            scheme = url_scheme(url)
            if scheme not in ("http", "https"):
                return Rejected(SCHEME_NOT_ALLOWED, f"redirect to {scheme or 'a bare path'}:")
        return Rejected("too many redirects", f"more than {self.options.max_redirects}")

    def _http_once(self, pool: Any, url: str) -> bytes | Rejected | str:
        """The body, a skip, or the absolute URL a redirect points to."""
        import urllib3

        options = self.options
        try:
            response = pool.request("GET", url, preload_content=False, redirect=False, retries=False,
                                    timeout=urllib3.Timeout(connect=options.timeout, read=options.timeout))
        except urllib3.exceptions.HTTPError as error:
            if is_transient(error):
                raise _Transient(http_failure(error)) from None
            return http_failure(error)
        try:
            status = response.status
            if status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    return Rejected(f"HTTP {status}", "a redirect without a Location")
                return urllib.parse.urljoin(url, location)
            if status != 200:
                rejected = Rejected(f"HTTP {status}", status_phrase(status))
                if status in RETRY_STATUSES:
                    raise _Transient(rejected)
                return rejected
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > options.max_bytes:
                return Rejected(TOO_LARGE, f"Content-Length {length} > {options.max_bytes} bytes")
            return self._read_capped(response)
        finally:
            _give_back(response)

    def _read_capped(self, response: Any) -> bytes | Rejected:
        import urllib3

        chunks, total = [], 0
        try:
            for chunk in response.stream(CHUNK_BYTES):
                total += len(chunk)
                if total > self.options.max_bytes:
                    response.close()  # the rest is never read
                    return Rejected(TOO_LARGE, f"more than {self.options.max_bytes} bytes")
                chunks.append(chunk)
        except urllib3.exceptions.HTTPError as error:
            response.close()  # broken off mid-body: this connection is not reused
            raise _Transient(http_failure(error)) from None
        return b"".join(chunks)

    def _object(self, url: str) -> bytes | Rejected:
        """One try at an s3:// or gs:// object through fsspec."""
        scheme = url_scheme(url)
        with self._lock:
            if scheme not in self._filesystems:
                import fsspec

                self._filesystems[scheme] = fsspec.filesystem(scheme)
            filesystem = self._filesystems[scheme]
        bucket = urllib.parse.urlsplit(url).netloc
        try:
            with self._slot(f"{scheme}://{bucket}"), filesystem.open(url, "rb") as stream:
                if stream.size is not None and stream.size > self.options.max_bytes:
                    return Rejected(TOO_LARGE, f"{stream.size} > {self.options.max_bytes} bytes")
                return stream.read()
        except FileNotFoundError:
            return Rejected("not found", "no such object")
        except PermissionError as error:
            return Rejected("access denied", one_line(error))
        except (OSError, TimeoutError) as error:
            raise _Transient(Rejected("storage error", one_line(error))) from None


def _give_back(response: Any) -> None:
    """Return a response's connection to the pool for reuse, once nothing of its body is left unread
    (a connection with a body pending would fail the next request on it); a large rest is not read:
    that connection is closed instead."""
    if not response.closed:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= CHUNK_BYTES:
            response.drain_conn()  # an error page or an empty redirect body: cheap to read
        else:
            response.close()
    response.release_conn()


def one_line(error: BaseException) -> str:
    text = str(error).splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "unknown status"


def is_transient(error: BaseException) -> bool:
    """Whether a try that failed with ``error`` is worth repeating (not a bad name, URL or TLS)."""
    import urllib3.exceptions as errors

    return not isinstance(error, (errors.NameResolutionError, errors.LocationValueError, errors.SSLError,
                                  errors.ProxySchemeUnknown))


def http_failure(error: BaseException) -> Rejected:
    """An urllib3 error as a skip: ``timeout``, ``connection refused``, ``host not found``..."""
    import urllib3.exceptions as errors

    # NewConnectionError is a ConnectTimeoutError too (urllib3's history): asked first
    if isinstance(error, errors.NameResolutionError):
        return Rejected("host not found", one_line(error))
    if isinstance(error, errors.NewConnectionError):
        refused = isinstance(error.__cause__, ConnectionRefusedError) or "refused" in str(error).lower()
        return Rejected("connection refused" if refused else "connection failed", one_line(error))
    if isinstance(error, errors.TimeoutError):
        return Rejected("timeout", one_line(error))
    if isinstance(error, errors.SSLError):
        return Rejected("TLS error", one_line(error))
    if isinstance(error, errors.LocationValueError):
        return Rejected("bad URL", one_line(error))
    return Rejected("connection failed", one_line(error))


def fetch_in_order(urls: Iterable[str], options: FetchOptions) -> Generator[bytes | Rejected, None, None]:
    """Fetch ``urls`` on ``options.threads`` threads; yield each one's bytes or skip, in input order.

    At most ``2 * threads`` results are held at once (fetched ahead of the consumer or in flight).
    """
    fetcher = Fetcher(options)
    todo = iter(urls)
    pending: collections.deque = collections.deque()
    executor = ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="ecomaug-fetch")
    try:
        for url in todo:
            pending.append(executor.submit(fetcher.fetch, url))
            if len(pending) >= 2 * options.threads:
                break
        while pending:
            result = pending.popleft().result()
            url = next(todo, None)
            if url is not None:
                pending.append(executor.submit(fetcher.fetch, url))
            yield result
    finally:  # stopped early (an error, Ctrl-C): no new fetch starts and none waits to retry
        fetcher.stop()
        executor.shutdown(wait=False, cancel_futures=True)
