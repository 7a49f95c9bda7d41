"""The ranges the commands, the training config and an export's ``config.json`` hold numbers to,
and the choices and defaults of command options whose code lives in torch-importing modules.

One place, importing nothing but ``re``, so every command can name them in its click options without paying
for torch (``--help`` and a bad option answer at once). A number outside them is refused up front
in one line, before any allocation: an ``--input-size`` of 100000 would otherwise ask for 30 GB for
one batch, a ``--top-k`` of 10^9 for 96 GB of padding.
"""

from __future__ import annotations

import re

# Side of the square crops a backbone is fed (training's --crop-size, --input-size, an export's
# input_size). Below 16 a ResNet's stride-32 features are empty; above 1024 a batch of 64 is over
# 800 MB of input alone, and its activations tens of GB.
MIN_INPUT_SIZE = 16
MAX_INPUT_SIZE = 1024
MAX_EXTRA_SIZES = 3  # more sides an export embeds at (a multi-scale descriptor: one more forward pass each)
# Neighbours per query in match: results are (queries x k), padded where the gallery is smaller.
MAX_TOP_K = 1000
# Images per forward pass of embed/eval/match.
MAX_BATCH_SIZE = 4096
# Seeds: numpy takes 0 .. 2**32 - 1, and a run seeds rank r with seed + r.
MAX_SEED = 2**31 - 1
# Worker processes of the shard conversion.
MAX_WORKERS = 1024
# Fetching a URL list (shard --url-column): fetches in flight, and to one host; beyond a few
# thousand sockets a process runs out of file descriptors before the network is busy.
MAX_FETCH_THREADS = 1024
MAX_FETCHES_PER_HOST = 256
# Seconds to connect / between reads, further tries, and the size cap of one response (1 GB).
MAX_FETCH_TIMEOUT = 600.0
MAX_FETCH_RETRIES = 20
MAX_FETCH_BYTES = 10**9
# Longest side a JPEG can have (its header holds 16 bits; Pillow refuses above 65500).
MAX_IMAGE_SIDE = 65500
# Rows of a preview grid.
MAX_PREVIEW_IMAGES = 256
# Query disturbances of the robustness report (ecomaug.evaluation.disturbances), in report order.
DISTURBANCES = ("clean", "perspective", "watermark", "colour", "multi_item")
# Nearest-neighbour search methods of match (ecomaug.matching.search).
SEARCH_METHODS = ("auto", "exact", "ivf", "hnsw")
# Above this many database vectors, auto uses an index. Measured with python -m bench.match on
# 2 shared CPU cores at D = 512 (docs/matching.md, "Matching benchmark"): exact search answers 234
# queries/s at 10^5 (IVF at recall 0.95: 152) and 18.7 at 10^6 (IVF: 34), so the index starts
# to pay between the two.
EXACT_LIMIT = 200_000
# --max-index-memory of match (ecomaug.matching.index): a size in bytes, powers of 1024. Below 64 KiB
# no faiss index holds a useful catalogue; 1 TiB is past any single machine's RAM.
MIN_INDEX_MEMORY = 64 * 1024
MAX_INDEX_MEMORY = 1024**4
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# MoCo's queue holds K x dim floats: 2**20 x 128 is 512 MB.
MAX_QUEUE_SIZE = 2**20
# Sizes of the projection head (its output and hidden layer).
MAX_HEAD_DIM = 16384

# TrainConfig fields bounded beyond "at least 1": train.py refuses a value outside in one line.
TRAIN_RANGES: dict[str, tuple[float, float]] = {
    "crop_size": (MIN_INPUT_SIZE, MAX_INPUT_SIZE), "export_size": (MIN_INPUT_SIZE, MAX_INPUT_SIZE),
    "batch_size": (1, MAX_BATCH_SIZE),
    "queue_size": (1, MAX_QUEUE_SIZE), "dim": (1, MAX_HEAD_DIM), "hidden_dim": (1, MAX_HEAD_DIM),
    "seed": (0, MAX_SEED), "num_workers": (0, MAX_WORKERS), "sgd_momentum": (0.0, 1.0),
    "listing_table": (1, 10**7),
}


def check_input_size(value: object, *, name: str) -> int:
    """``value`` as a crop side, or ValueError naming ``name`` and the allowed range.

    Args:
        value: an int (a bool, float or string is refused).
        name: what it is, for the message (``--input-size``, ``path/config.json: input_size``).

    Returns:
        The side, in ``MIN_INPUT_SIZE .. MAX_INPUT_SIZE``.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_INPUT_SIZE <= value <= MAX_INPUT_SIZE:
        raise ValueError(f"{name} must be an integer in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} (pixels), got {value!r}")
    return value


def check_extra_sizes(value: object, *, name: str) -> tuple[int, ...]:
    """``value`` as an export's extra sides (a multi-scale descriptor), or ValueError naming ``name``.

    Returns:
        At most ``MAX_EXTRA_SIZES`` distinct sides, each checked by :func:`check_input_size`.
    """
    if not isinstance(value, (list, tuple)) or len(value) > MAX_EXTRA_SIZES:
        raise ValueError(f"{name} must be a list of at most {MAX_EXTRA_SIZES} sides, got {value!r}")
    sides = tuple(check_input_size(side, name=name) for side in value)
    if len(set(sides)) != len(sides):
        raise ValueError(f"{name} repeats a side: {list(sides)}")
    return sides


def parse_size(text: object, *, name: str = "--max-index-memory") -> int:
    """A size such as ``500K``, ``32M``, ``2G`` or ``1.5G`` in bytes (powers of 1024), range-checked.

    Args:
        text: the size: a number of bytes, or a number followed by K, M, G or T (an optional
            ``B`` or ``iB`` after it, any case).
        name: what it is, for the message.

    Returns:
        The size in bytes, in ``MIN_INDEX_MEMORY .. MAX_INDEX_MEMORY``.

    Raises:
        ValueError: not a size, or out of range (one line naming the value and what is allowed).
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if found is None or isinstance(text, bool):
        raise ValueError(f"{name} takes a size like 500K, 32M or 2G (bytes, powers of 1024); got {text!r}")
    size = int(float(found.group(1)) * SIZE_UNITS[found.group(2)])
    if not MIN_INDEX_MEMORY <= size <= MAX_INDEX_MEMORY:
        raise ValueError(f"{name} must be between 64K and 1T; got {text!r} ({size} bytes)")
    return size
