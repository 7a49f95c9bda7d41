"""The ranges the commands, the training config and an export's ``config.json`` hold numbers to,
and the choices and defaults of command options whose code lives in torch-importing modules.

One place, and no imports, so every command can name them in its click options without paying
for torch (``--help`` and a bad option answer at once). A number outside them is refused up front
in one line, before any allocation: an ``--input-size`` of 100000 would otherwise ask for 30 GB for
one batch, a ``--top-k`` of 10^9 for 96 GB of padding.
"""

from __future__ import annotations

# Side of the square crops a backbone is fed (training's --crop-size, --input-size, an export's
# input_size). Below 16 a ResNet's stride-32 features are empty; above 1024 a batch of 64 is over
# 800 MB of input alone, and its activations tens of GB.
MIN_INPUT_SIZE = 16
MAX_INPUT_SIZE = 1024
# Neighbours per query in match: results are (queries x k), padded where the gallery is smaller.
MAX_TOP_K = 1000
# Images per forward pass of embed/eval/match.
MAX_BATCH_SIZE = 4096
# Seeds: numpy takes 0 .. 2**32 - 1, and a run seeds rank r with seed + r.
MAX_SEED = 2**31 - 1
# Worker processes of the shard conversion.
MAX_WORKERS = 1024
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
# MoCo's queue holds K x dim floats: 2**20 x 128 is 512 MB.
MAX_QUEUE_SIZE = 2**20
# Sizes of the projection head (its output and hidden layer).
MAX_HEAD_DIM = 16384

# TrainConfig fields bounded beyond "at least 1": train.py refuses a value outside in one line.
TRAIN_RANGES: dict[str, tuple[float, float]] = {
    "crop_size": (MIN_INPUT_SIZE, MAX_INPUT_SIZE), "batch_size": (1, MAX_BATCH_SIZE),
    "queue_size": (1, MAX_QUEUE_SIZE), "dim": (1, MAX_HEAD_DIM), "hidden_dim": (1, MAX_HEAD_DIM),
    "seed": (0, MAX_SEED), "num_workers": (0, MAX_WORKERS), "sgd_momentum": (0.0, 1.0),
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
