"""Matching benchmark: vectors/s of streaming embed, queries/s of matching, exact vs index, memory.

Search cases use synthetic catalogues of unit vectors in clusters of four (several listings of
one item) on a 32-dimensional subspace; the queries are perturbed copies of database rows. Each case runs in a
fresh process so its peak resident memory (``ru_maxrss``) is its own. The index is recalled
against exact search on a sample of the timed queries (10-recall@10).

example: python -m bench match --sizes 10000,100000,1000000 --dim 512 --out bench/results/match.json
"""

from __future__ import annotations

import csv
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from bench.harness import BenchCommand, parse_device, write_results
from bench.timing import conditions, measure


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic(count: int, dim: int, seed: int, *, intrinsic: int = 32) -> torch.Tensor:
    """Unit vectors in clusters of 4 on a ``intrinsic``-dimensional subspace, plus a little noise.

    Real embeddings occupy few directions of their space; isotropic random vectors in 512
    dimensions are all nearly orthogonal, so beyond a cluster their "nearest" neighbours would be
    noise that no index could (or should) reproduce. Built in blocks: memory is the result's size.
    """
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, intrinsic, generator=generator))[0].T  # r x D
    out = torch.empty((count, dim))
    block = 65536
    for start in range(0, count, block):
        stop = min(start + block, count)
        centres = torch.randn((stop - start + 3) // 4, intrinsic, generator=generator)
        low = centres.repeat_interleave(4, dim=0)[: stop - start]
        low += 0.3 * torch.randn(low.shape, generator=generator)
        rows = low @ basis + 0.02 * torch.randn((stop - start, dim), generator=generator)
        out[start:stop] = torch.nn.functional.normalize(rows, dim=1)
    return out


def _search_case(size: int, dim: int, method: str, queries: int, repeats: int, seed: int,
                 device: str, result: Any) -> None:
    from ecomaug.matching.search import exact_search, search

    database = synthetic(size, dim, seed)
    rows = torch.from_numpy(np.random.default_rng(seed).choice(size, queries, replace=False))
    noise = 0.05 * torch.randn((queries, dim), generator=torch.Generator().manual_seed(seed + 1))
    query = torch.nn.functional.normalize(database[rows] + noise, dim=1)
    target = torch.device(device)
    record: dict[str, Any] = {"size": size, "dim": dim, "method": method, "queries": queries}
    if method == "exact":
        timing = measure(f"exact {size}", lambda: exact_search(query, database, k=10, device=target),
                         items=queries, warmup=1, repeats=repeats, device=target)
    else:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            built = search(query, database, k=10, method=method, device=target, seed=seed,
                           index_path=Path(folder) / "index.faiss", database_id="bench")
            record.update({key: built.info[key] for key in
                           ("kind", "nlist", "nprobe", "efSearch", "train_sample",
                            "recall_vs_exact", "recall_sample", "build_seconds") if key in built.info})
            record["first_search_seconds_with_build"] = time.perf_counter() - started
            timing = measure(f"{method} {size}", lambda: search(
                query, database, k=10, method=method, device=target, seed=seed,
                index_path=Path(folder) / "index.faiss", database_id="bench"),
                items=queries, warmup=1, repeats=repeats, device=target)
    record.update(timing.as_dict())
    record["peak_rss_mib"] = _peak_mib()
    record["database_mib"] = size * dim * 4 / 2**20
    result.put(record)


def _embed_case(copies: int, input_size: int, model_name: str, result: Any) -> None:
    from ecomaug.evaluation.embed import embed_to_parts, random_init_model
    from ecomaug.paths import SAMPLE_MANIFEST

    rows = list(csv.DictReader(open(SAMPLE_MANIFEST, newline="")))
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "items.csv"
        with open(manifest, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            for copy in range(copies):
                writer.writerows({**row, "path": str(SAMPLE_MANIFEST.parent / row["path"])}
                                 for row in rows)
        model = random_init_model(model_name, device=torch.device("cpu"), input_size=input_size)
        started = time.perf_counter()
        report = embed_to_parts(model, manifest, Path(folder) / "parts", batch_size=64,
                                part_size=256, progress=False)
        seconds = time.perf_counter() - started
    result.put({"images": report.rows, "parts": report.parts, "seconds": seconds,
                "vectors_per_s": report.rows / seconds, "model": model_name,
                "input_size": input_size, "peak_rss_mib": _peak_mib()})


def _rerank_case(model_name: str, input_size: int, depths: list[int], result: Any) -> None:
    """Pair F1 (at its best threshold) of distinct photos of one item, with and without re-ranking.

    A lists photo 0 of items 0-59 of the bundled sample; B lists photos 1-3 of items 0-39 and
    60-79 (B's items 60-79 are not in A). A pair is right when both photos show one item.
    """
    from ecomaug.evaluation.embed import embed_samples, iter_data, random_init_model
    from ecomaug.matching.rerank import expand
    from ecomaug.matching.search import exact_search
    from ecomaug.paths import SAMPLE_MANIFEST

    samples = list(iter_data(SAMPLE_MANIFEST))
    number = lambda key: (int(key.split("item")[1][:3]), int(key.rsplit("_", 1)[1][0]))
    a_samples = [s for s in samples if number(s[0])[1] == 0 and number(s[0])[0] < 60]
    b_samples = [s for s in samples if number(s[0])[1] > 0 and
                 (number(s[0])[0] < 40 or number(s[0])[0] >= 60)]
    model = random_init_model(model_name, device=torch.device("cpu"), input_size=input_size)
    a = torch.nn.functional.normalize(embed_samples(model, a_samples, progress=False).vectors, dim=1)
    b = torch.nn.functional.normalize(embed_samples(model, b_samples, progress=False).vectors, dim=1)
    a_item = np.array([number(s[0])[0] for s in a_samples])
    b_item = np.array([number(s[0])[0] for s in b_samples])
    positives = int((a_item[:, None] == b_item[None, :]).sum())
    rows = []
    for depth in depths:
        a_v, b_v = a, b
        if depth:
            ab_s, ab_i = exact_search(a, b, k=depth)
            ba_s, ba_i = exact_search(b, a, k=depth)
            a_v = expand(a, b, ab_i, ab_s, n=depth)
            b_v = expand(b, a, ba_i, ba_s, n=depth)
        scores, indices = exact_search(a_v, b_v, k=10)
        right = (b_item[indices] == a_item[:, None]).ravel()
        order = np.argsort(-scores.ravel(), kind="stable")
        true_positive = np.cumsum(right[order])
        called = np.arange(1, len(order) + 1)
        f1 = 2 * true_positive / (called + positives)
        best = int(np.argmax(f1))
        rows.append({"rerank": depth, "best_f1": float(f1[best]),
                     "threshold": float(scores.ravel()[order][best]),
                     "precision": float(true_positive[best] / called[best]),
                     "recall": float(true_positive[best] / positives)})
    result.put({"model": f"random-init {model_name}", "input_size": input_size,
                "a_listings": len(a_samples), "b_listings": len(b_samples),
                "positives": positives, "rows": rows})


def _in_fresh_process(target: Any, *args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    record = queue.get()
    process.join()
    return record


def run(sizes: list[int], dim: int, methods: list[str], queries: int, repeats: int, seed: int,
        device: str, embed_copies: list[int], embed_size: int, embed_model: str,
        rerank_depths: list[int]) -> dict[str, Any]:
    """Every case, each in its own process."""
    result: dict[str, Any] = {"conditions": {**conditions(device), "dim": dim, "queries": queries,
                                             "repeats": repeats}, "search": [], "embed": []}
    if rerank_depths:
        result["rerank"] = _in_fresh_process(_rerank_case, "efficientnet_b0", 64, rerank_depths)
        for row in result["rerank"]["rows"]:
            print(f"rerank {row['rerank']}: pair F1 {row['best_f1']:.3f} (precision "
                  f"{row['precision']:.3f}, recall {row['recall']:.3f} at {row['threshold']:.4f}) "
                  f"on distinct photos, {result['rerank']['model']}", flush=True)
    for copies in embed_copies:
        result["embed"].append(_in_fresh_process(_embed_case, copies, embed_size, embed_model))
        print(_embed_line(result["embed"][-1]), flush=True)
    for size in sizes:
        for method in methods:
            result["search"].append(_in_fresh_process(_search_case, size, dim, method, queries,
                                                      repeats, seed, device))
            print(_search_line(result["search"][-1]), flush=True)
    return result


def _embed_line(r: dict[str, Any]) -> str:
    return (f"embed {r['images']:>6d} images ({r['model']}, {r['input_size']} px, {r['parts']} parts): "
            f"{r['vectors_per_s']:.1f} vectors/s, peak RSS {r['peak_rss_mib']:.0f} MiB")


def _search_line(r: dict[str, Any]) -> str:
    extra = ""
    if "recall_vs_exact" in r:
        probe = f"nprobe={r['nprobe']}" if "nprobe" in r else f"efSearch={r.get('efSearch')}"
        extra = (f"  {r['kind']} {probe} "
                 f"recall@10 vs exact {r['recall_vs_exact']:.3f}, build {r['build_seconds']:.1f} s")
    return (f"{r['method']:>5s} N={r['size']:>8d} D={r['dim']}: {r['median_per_s']:9.1f} queries/s "
            f"({r['min_per_s']:.1f}..{r['max_per_s']:.1f}), peak RSS {r['peak_rss_mib']:.0f} MiB "
            f"(database {r['database_mib']:.0f} MiB){extra}")


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


@click.command("match", cls=BenchCommand)
@click.option("--sizes", default="10000,100000,1000000", show_default=True, help="Database sizes, comma-separated.")
@click.option("--dim", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--methods", default="exact,ivf", show_default=True, help="exact, ivf, hnsw (comma-separated).")
@click.option("--queries", type=click.IntRange(min=1), default=500, show_default=True,
              help="Queries per timed repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--device", default=None, help="Where exact search runs. Default: cuda when present.")
@click.option("--embed-copies", default="1,4", show_default=True,
              help="Embed the bundled sample this many times over (memory stays flat).")
@click.option("--embed-size", type=click.IntRange(min=8), default=64, show_default=True, help="Embedding input size.")
@click.option("--embed-model", default="resnet18", show_default=True)
@click.option("--rerank", default="0,1,2,3", show_default=True,
              help="Re-ranking depths compared on the sample's distinct photos ('' = skip).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON.")
def main(sizes: str, dim: int, methods: str, queries: int, repeats: int, device: str | None, embed_copies: str,
         embed_size: int, embed_model: str, rerank: str, seed: int, out: Path | None) -> None:
    """Embed vectors/s, matching queries/s (exact vs index) and peak memory, each case in a fresh process.

    \b
    Example:
      python -m bench match --sizes 10000,100000,1000000 --dim 512 --out bench/results/match.json
    """
    database_sizes = _integers(sizes, "--sizes")
    copies, depths = _integers(embed_copies, "--embed-copies"), _integers(rerank, "--rerank")
    chosen = [m for m in methods.split(",") if m]
    for method in chosen:
        if method not in ("exact", "ivf", "hnsw"):
            raise ValueError(f"unknown method {method!r} (exact, ivf, hnsw)")
    if min(database_sizes, default=1) < queries:
        raise ValueError(f"every size must hold at least --queries ({queries}) vectors")
    where = str(parse_device(device))
    c = conditions(where)
    click.echo(f"device {c['device']}  cpu {c['cpu_name']} x{c['cpu_count']}  torch threads "
               f"{c['torch_threads']}  dim {dim}  {queries} queries x {repeats} repeats")
    result = run(database_sizes, dim, chosen, queries, repeats, seed, where, copies, embed_size, embed_model, depths)
    if out is not None:
        write_results(out, result)


if __name__ == "__main__":
    main()
