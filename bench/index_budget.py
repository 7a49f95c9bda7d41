"""An index under a memory budget: build time, size, memory, queries/s, recall@10 and copies found.

The database is :func:`bench.match.synthetic` (unit vectors in clusters of four on a 32-dimensional
subspace); the queries are noisy copies of database rows (noise of norm ``--noise``), so each has
one true copy. ``ecomaug.matching.search.search`` with ``max_index_memory`` chooses, builds, tunes
and saves the index; the figures are its type, bytes on disk, build seconds, recall@10 against
exact search, the share of queries whose true copy comes first (with exact search's share beside
it), queries/s of the saved index (median of repeats, after a warm-up) and peak resident memory.

The acceptance case runs in a few minutes on two cores. Memory is the database once (generated
block by block into one array; ``search`` hands it to faiss without a copy, adds it in chunks and
normalises it a block at a time for exact search) plus the index and ~1.9 GB of libraries and
work space. 10^7 x 256 (9,766 MiB of floats) on this 2-core, 24 GB machine with ``--budget 1G
--queries 1000``: ``IVF4096,PQ64x8``, 690.9 MiB on disk, built in 578 s, recall@10 vs exact 0.973,
every copy first, 46 queries/s, peak RSS 12,368 MiB, 18 min in all (bench/results/index_budget_10m.json).
D 2048 at 10^7 wants a larger machine: 10^7 x 2048 floats alone are 80 GB.

example: python -m bench.index_budget --n 300000 --dim 128 --budget 32M --out bench/results/index_budget.json
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from bench.harness import BenchCommand, write_results
from bench.match import synthetic
from bench.timing import conditions, measure
from ecomaug.limits import parse_size


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(count: int, dim: int, budget: int, queries: int, noise: float, repeats: int, seed: int,
        on_disk: bool = False) -> dict[str, Any]:
    """One budgeted index built, tuned, saved, reloaded and timed; the figures as a dict (``on_disk``:
    its inverted lists in a file beside it, ``--index-on-disk``)."""
    from ecomaug.matching.search import exact_search, search

    started = time.perf_counter()
    database = synthetic(count, dim, seed)
    generate_seconds = time.perf_counter() - started
    rows = np.random.default_rng(seed).choice(count, size=queries, replace=False)
    noisy = torch.randn((queries, dim), generator=torch.Generator().manual_seed(seed + 1)) * noise / dim ** 0.5
    query = torch.nn.functional.normalize(database[torch.from_numpy(rows)] + noisy, dim=1)
    record: dict[str, Any] = {"n": count, "dim": dim, "budget_bytes": budget, "queries": queries, "noise": noise,
                              "database_mib": count * dim * 4 / 2**20, "generate_seconds": generate_seconds}
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "index.faiss"
        call = dict(k=10, index_path=saved, database_id="bench", max_index_memory=budget, seed=seed,
                    exact_limit=0, index_on_disk=on_disk)
        built = search(query, database, **call)
        record.update({key: built.info[key] for key in (
            "kind", "index_type", "index_bytes", "estimated_bytes", "nlist", "nprobe", "pq_m",
            "rescored_candidates", "train_sample", "build_seconds", "recall_vs_exact", "recall_k",
            "recall_sample", "on_disk", "lists_bytes") if key in built.info})
        record["file_bytes"] = os.path.getsize(saved)
        record["peak_rss_mib_after_build"] = _peak_mib()
        timing = measure("budgeted index", lambda: search(query, database, **call), items=queries,
                         warmup=1, repeats=repeats)
        again = search(query, database, **call)
    record.update(timing.as_dict())
    record["reused"] = bool(again.info.get("reused"))
    record["copy_first"] = float((again.indices[:, 0] == rows).mean())
    started = time.perf_counter()
    _, exact = exact_search(query, database, k=1)
    record["exact_seconds"] = time.perf_counter() - started
    record["exact_copy_first"] = float((exact[:, 0] == rows).mean())
    record["peak_rss_mib"] = _peak_mib()
    return record


def _line(r: dict[str, Any]) -> str:
    return (f"N={r['n']} D={r['dim']} budget {r['budget_bytes'] / 2**20:.1f} MiB: {r['kind']} ({r['index_type']}), "
            f"{r['file_bytes'] / 2**20:.2f} MiB on disk"
            + (f" + lists {r['lists_bytes'] / 2**20:.2f} MiB" if r.get("on_disk") else "")
            + f", build {r['build_seconds']:.1f} s, nprobe {r.get('nprobe')}, "
            f"rescored {r.get('rescored_candidates', '-')}, "
            f"recall@{r['recall_k']} vs exact {r['recall_vs_exact']:.3f}, "
            f"true copy first {r['copy_first']:.3f} (exact search {r['exact_copy_first']:.3f}), "
            f"{r['median_per_s']:.0f} queries/s ({r['min_per_s']:.0f}..{r['max_per_s']:.0f}), "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB (database {r['database_mib']:.0f} MiB)")


@click.command("index-budget", cls=BenchCommand)
@click.option("--n", "count", type=click.IntRange(min=1000), default=300_000, show_default=True,
              help="Database vectors.")
@click.option("--dim", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--budget", default="32M", show_default=True, help="--max-index-memory: 500K, 32M, 2G ...")
@click.option("--queries", type=click.IntRange(min=10), default=2000, show_default=True,
              help="Noisy copies of database rows searched per repeat.")
@click.option("--noise", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Norm of the noise added to each copy (the vectors are unit).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--index-on-disk", "on_disk", is_flag=True, help="ecomaug match --index-on-disk: the IVF lists "
              "in a file beside the index, the budget bounding what stays in RAM.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON.")
def main(count: int, dim: int, budget: str, queries: int, noise: float, repeats: int, seed: int,
         on_disk: bool, out: Path | None) -> None:
    """A faiss index chosen by a memory budget: size, build, queries/s, recall@10, true copies first.

    \b
    Example (the acceptance case; 10^7 x 256 takes ~18 min and ~12 GB; D 2048 at 10^7 wants 80 GB):
      python -m bench.index_budget --n 300000 --dim 128 --budget 32M --out bench/results/index_budget.json
      python -m bench index-budget --n 10000000 --dim 256 --budget 1G --queries 1000
    """
    size = parse_size(budget, name="--budget")
    if queries > count:
        raise ValueError(f"--queries ({queries}) must be at most --n ({count})")
    c = conditions("cpu")
    click.echo(f"cpu {c['cpu_name']} x{c['cpu_count']}  torch threads {c['torch_threads']}  load "
               f"{os.getloadavg()[0]:.1f}  {queries} queries x {repeats} repeats")
    record = run(count, dim, size, queries, noise, repeats, seed, on_disk)
    record["conditions"] = {**c, "load_average": os.getloadavg()[0]}
    click.echo(_line(record))
    if out is not None:
        write_results(out, record)


if __name__ == "__main__":
    main()
