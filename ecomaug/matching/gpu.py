"""faiss on the GPU where the run's device is CUDA and the installed faiss has GPU support.

The choice is one rule (:func:`faiss_gpu`): a CUDA ``device`` and ``faiss.get_num_gpus() > 0``
(faiss-gpu, or faiss-cpu on a CUDA machine: 0 GPUs) -> that GPU; else the CPU; either way one log
line says which. On the GPU an IVF index's k-means runs there (:func:`train_on_gpu`: the
``clustering_index`` faiss's own benchmarks use, the trained index staying a CPU index), and the
tuned index is copied there for the search (:func:`search_copy`); the saved index is always the CPU
copy. HNSW and on-disk lists stay on the CPU (faiss has no GPU HNSW, and a GPU copy would read the
lists into GPU memory); an index faiss cannot copy (e.g. a PQ size the GPU lacks) stays on the
CPU with a log line naming why.
"""

from __future__ import annotations

import logging
from typing import Any

_LOG = logging.getLogger(__name__)


def faiss_gpu(faiss: Any, device: Any) -> int | None:
    """The GPU faiss should use for a run on ``device``, or None for the CPU (and one log line).

    Args:
        faiss: the faiss module.
        device: the run's ``torch.device`` (None: the CPU).
    """
    cuda = device is not None and getattr(device, "type", "") == "cuda"
    gpus = int(faiss.get_num_gpus()) if cuda and hasattr(faiss, "get_num_gpus") else 0
    if cuda and gpus > 0:
        gpu = device.index if device.index is not None and device.index < gpus else 0
        _LOG.info("faiss on the GPU: cuda:%d (%d GPU(s) visible to faiss)", gpu, gpus)
        return gpu
    _LOG.info("faiss on the CPU: %s", "the installed faiss has no GPU support (faiss-cpu)" if cuda
              else f"the run's device is {device or 'cpu'}")
    return None


def _resources(faiss: Any) -> Any:
    return faiss.StandardGpuResources()


def train_on_gpu(faiss: Any, index: Any, gpu: int) -> tuple[Any, Any]:
    """``index``'s (an IVF index's) coarse k-means set to assign on GPU ``gpu``.

    Returns:
        ``(resources, gpu_flat_index)``: keep them alive until the index is trained.
    """
    ivf = faiss.extract_index_ivf(index)
    resources = _resources(faiss)
    clustering = faiss.index_cpu_to_gpu(resources, gpu, faiss.IndexFlatIP(ivf.d))
    ivf.clustering_index = clustering
    return resources, clustering


def train_ivf(faiss: Any, index: Any, sample: Any, gpu: int | None) -> None:
    """Train ``index`` (an IVF index) on ``sample``, its coarse k-means on GPU ``gpu`` where given
    (:func:`train_on_gpu`); the GPU's flat index is let go once trained."""
    on_gpu = train_on_gpu(faiss, index, gpu) if gpu is not None else None
    index.train(sample)
    if on_gpu is not None:
        faiss.extract_index_ivf(index).clustering_index = None


def search_copy(faiss: Any, index: Any, gpu: int | None, *, on_disk: bool = False,
                family: str = "") -> tuple[Any, str]:
    """The index to search with: a GPU copy of the (tuned) CPU ``index`` where possible.

    Args:
        faiss: the faiss module.
        index: the CPU index, its nprobe already set (the copy takes it).
        gpu: from :func:`faiss_gpu`; None: the CPU.
        on_disk: its lists are on disk (stays on the CPU).
        family: the index family (``HNSW`` stays on the CPU).

    Returns:
        ``(index, where)``: where is ``"cuda:N"`` or ``"cpu"``.
    """
    if gpu is None:
        return index, "cpu"
    if on_disk or family.startswith("HNSW"):
        _LOG.info("faiss search on the CPU: %s", "on-disk lists" if on_disk else "faiss has no GPU HNSW")
        return index, "cpu"
    try:
        resources = _resources(faiss)
        copy = faiss.index_cpu_to_gpu(resources, gpu, index)
    except (RuntimeError, AttributeError) as error:  # faiss raises RuntimeError for what the GPU lacks
        _LOG.info("faiss search on the CPU: the GPU copy failed (%s)", str(error).splitlines()[0])
        return index, "cpu"
    copy.referenced_objects = [resources]  # the resources live as long as the copy
    return copy, f"cuda:{gpu}"
