"""The conversion's worker processes: read each input file (or take a URL's bytes fetched by
:mod:`loaders.convert.fetch` in this process) and clean it (:mod:`loaders.convert.hygiene`), results
handed back in input order with a bounded number in flight."""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.pool
import signal
from typing import Any, Generator, Iterator, Sequence, Union

from loaders.convert.hygiene import HygieneOptions, ImageHook, Prepared, Rejected, prepare_image, use_one_torch_thread
from loaders.convert.fetch import FetchOptions, fetch_in_order
from loaders.convert.inputs import NOT_REGULAR
from loaders.convert.plan import Task
from loaders.remote import NotRegularFileError, open_regular_file

_WORKER_STATE: dict[str, Any] = {}
# What a worker is handed per input: a file's path, a fetched URL's bytes, or why it was not fetched.
Payload = Union[str, bytes, Rejected]


def init_worker(options: HygieneOptions, image_hook: ImageHook | None, pooled: bool = False) -> None:
    _WORKER_STATE["options"] = options
    _WORKER_STATE["hook"] = image_hook
    if pooled:  # a process per core: more intra-op threads would only compete
        use_one_torch_thread()
        # A forked worker inherits the parent's handlers; one that only notes SIGTERM (train.py's
        # stop-at-a-step-boundary handler) would outlive Pool.terminate() and hang its join.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Ctrl-C reaches the whole process group: it is the parent's to act on (it terminates the
        # pool). A worker that died of it would print a traceback, and lose its chunk, which the
        # parent would then wait for forever.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_one(payload: Payload) -> Prepared | Rejected:
    if isinstance(payload, Rejected):
        return payload
    if isinstance(payload, bytes):
        return prepare_image(payload, _WORKER_STATE["options"], _WORKER_STATE["hook"])
    path = payload
    try:
        with open_regular_file(path) as stream:  # a FIFO named in a manifest would block open()
            data = stream.read()
    except FileNotFoundError:
        return Rejected("missing file", path)
    except NotRegularFileError as error:
        return Rejected(NOT_REGULAR, error.kind)
    except OSError as error:
        return Rejected("unreadable file", f"{type(error).__name__}: {error}".splitlines()[0])
    return prepare_image(data, _WORKER_STATE["options"], _WORKER_STATE["hook"])


def process_chunk(payloads: list[Payload]) -> list[Prepared | Rejected]:
    return [process_one(payload) for payload in payloads]


def _payloads(tasks: Sequence[Task], start: int, fetch: FetchOptions | None) -> Generator[Payload, None, None]:
    """Each task's payload (up-front skips left out), in order: its path, or with ``fetch`` its URL's
    bytes fetched here on threads, many in flight, so that decoding and not waiting bounds the pace."""
    todo = (task.item.path for task in tasks[start:] if task.skip is None)
    return todo if fetch is None else fetch_in_order(todo, fetch)


def _worker_quietly(target: Any, *args: Any) -> None:
    """A pool worker's loop, ending in silence when the parent is gone (killed, or stopping)."""
    try:
        target(*args)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # no one is left to read a result, or a traceback of the pipe that broke


class _QuietPool(multiprocessing.pool.Pool):
    """A :class:`multiprocessing.pool.Pool` whose workers run through :func:`_worker_quietly`.

    A killed ``ecomaug shard`` left each worker's next result to a closed pipe: every worker then
    printed a BrokenPipeError traceback into the terminal the parent had left.
    """

    @staticmethod
    def Process(ctx: Any, *args: Any, **kwds: Any) -> Any:  # noqa: N802 (the name Pool calls)
        kwds["args"] = (kwds.pop("target"), *kwds.get("args", ()))
        return ctx.Process(*args, target=_worker_quietly, **kwds)


def results_in_order(tasks: Sequence[Task], start: int, options: HygieneOptions, image_hook: ImageHook | None,
             workers: int, start_method: str,
             fetch: FetchOptions | None = None) -> Iterator[tuple[Task, Prepared | Rejected | None]]:
    """Yield (task, outcome) in task order; outcome None for up-front skips.

    Work goes out in chunks with a bounded number in flight, so memory stays flat however
    many inputs there are. With ``fetch``, each task's path is a URL, fetched in this process
    (never opened as a file) once the worker processes are started.
    """
    remaining = len(tasks) - start
    if workers == 0:
        init_worker(options, image_hook)
        payloads = _payloads(tasks, start, fetch)
        try:
            for task in tasks[start:]:
                yield task, None if task.skip is not None else process_one(next(payloads))
        finally:
            payloads.close()  # the fetch threads end with it
        return
    # Small chunks: an image costs milliseconds and a task well under one, and small chunks keep
    # the workers evenly busy to the very end.
    chunk_size = max(1, min(4, remaining // (workers * 64)))
    if start_method == "fork":
        # The workers resize with torch: imported once here, each forked worker shares it, rather
        # than one import (~1.5 s of CPU and its memory) per worker at its first resize.
        import loaders.crops  # noqa: F401
    pool = _QuietPool(workers, initializer=init_worker, initargs=(options, image_hook, True),
                      context=multiprocessing.get_context(start_method))
    payloads = _payloads(tasks, start, fetch)  # fetch threads start after the fork, never before
    try:
        in_flight: collections.deque = collections.deque()
        position = start

        def submit() -> None:
            nonlocal position
            chunk = tasks[position:position + chunk_size]
            position += len(chunk)
            work = [next(payloads) for task in chunk if task.skip is None]
            in_flight.append((chunk, pool.apply_async(process_chunk, (work,)) if work else None))

        while position < len(tasks) and len(in_flight) < workers * 8:
            submit()
        while in_flight:
            chunk, pending = in_flight.popleft()
            outcomes = iter(pending.get() if pending is not None else ())
            if position < len(tasks):
                submit()
            for task in chunk:
                yield task, None if task.skip is not None else next(outcomes)
        pool.close()
    finally:
        payloads.close()
        pool.terminate()
        pool.join()
