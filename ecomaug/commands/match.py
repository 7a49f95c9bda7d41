"""``ecomaug match``: two catalogues -> same-item pairs (pairs.csv) and gap items (gaps.csv)."""

from __future__ import annotations

import click

from ecomaug.commands import FloatRange
from ecomaug.limits import (EXACT_LIMIT, MAX_BATCH_SIZE, MAX_INPUT_SIZE, MAX_SEED, MAX_TOP_K, MIN_INPUT_SIZE,
                            SEARCH_METHODS, parse_size)


@click.command("match")
@click.option("--a", "a_source", type=str, required=True,
              help="Our catalogue: shards, an image folder, a .csv/.jsonl manifest, or what "
                   "ecomaug embed wrote (.npz or a parts folder).")
@click.option("--b", "b_source", type=str, required=True, help="Their catalogue (as --a).")
@click.option("--model", "model_path", type=str, default=None,
              help="Export dir, run dir or checkpoint; not needed when both sides are embeddings.")
@click.option("--random-init", type=str, default=None, metavar="TIMM_NAME",
              help="Instead of --model: a random-init timm backbone (a baseline).")
@click.option("--out", type=click.Path(file_okay=False, path_type=str), required=True,
              help="Output folder: pairs.csv, gaps.csv, report.html, scores.png, summary.json.")
@click.option("--top-k", type=click.IntRange(1, MAX_TOP_K), default=10, show_default=True,
              help="Neighbours of each A listing considered as pairs.")
@click.option("--threshold", type=float, default=None,  # MatchOptions.validate checks it, in its words
              help="Fixed threshold: a cosine, or a normalised score with --score normalised "
                   "(default: calibrated, stored with the model, or the uncalibrated default on "
                   "the normalised score).")
@click.option("--score", type=click.Choice(["auto", "cosine", "normalised"]), default="auto",
              show_default=True,
              help="The score --threshold, --calibrate and the default apply to: the raw cosine, or "
                   "the cosine normalised against each listing's background in A (0 = as similar "
                   "as its neighbours, 1 = identical). auto: cosine for --threshold, else a stored "
                   "calibration's score, else normalised.")
@click.option("--calibrate", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Labelled pairs CSV (a, b, same) to choose the threshold; a useful one is stored "
                   "next to the model for later runs, one that cannot reach --precision at recall "
                   ">= 0.5 is an error.")
@click.option("--precision", type=FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Precision the calibrated threshold must reach.")
@click.option("--mutual-only", is_flag=True, help="Keep only mutual nearest neighbours.")
@click.option("--rerank", type=click.IntRange(0, MAX_TOP_K), default=0, show_default=True,
              help="Neighbourhood re-ranking (query expansion + database-side augmentation) "
                   "with this many neighbours; 0 = off.")
@click.option("--index", type=click.Choice(SEARCH_METHODS), default="auto", show_default=True,
              help="auto: exact up to --exact-limit database vectors, else a faiss IVF index.")
@click.option("--exact-limit", type=click.IntRange(min=0), default=EXACT_LIMIT, show_default=True,
              help="Largest catalogue searched exactly with --index auto.")
@click.option("--max-index-memory", type=str, default=None, metavar="SIZE",
              help="Budget for each faiss index, e.g. 32M, 2G (powers of 1024): a catalogue whose vectors "
                   "exceed it (or --exact-limit) gets the most accurate index that fits (HNSW, IVF-Flat, IVF-PQ, "
                   "OPQ + IVF-PQ), tuned against exact search; summary.json records its type, bytes, recall@10.")
@click.option("--index-on-disk", is_flag=True,
              help="With --max-index-memory: an IVF index keeps its inverted lists in a file beside it "
                   "(OUT/index/*.ivfdata), paged in by the OS, so the budget bounds only what stays in RAM "
                   "(centroids, PQ tables); for a catalogue whose index outgrows RAM.")
@click.option("--query-regions", type=click.Choice(["none", "items", "grid"]), default="none", show_default=True,
              help="items: also search B's listings by their item regions (the blobs standing out from a "
                   "bundle photo's backdrop, or a lone small item's tight box), so a bundle pairs with "
                   "each A item it shows and pairs.csv's b_region names the box; grid: layout cells "
                   "instead. Needs B's images, not embeddings.")
@click.option("--shop-column", type=str, default=None,
              help="B's column counted per gap cluster (default: shop, when present).")
@click.option("--input-size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), default=None,
              help="Crop side for checkpoints / --random-init.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=64, show_default=True,
              help="Images per forward pass.")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seeds --random-init weights, index training and the report's samples.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write report.html and scores.png.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def match(a_source: str, b_source: str, model_path: str | None, random_init: str | None, out: str,
          top_k: int, threshold: float | None, score: str, calibrate: str | None, precision: float,
          mutual_only: bool, rerank: int, index: str, exact_limit: int, query_regions: str, shop_column: str | None,
          input_size: int | None, batch_size: int, device: str, seed: int, report: bool,
          progress: bool, max_index_memory: str | None, index_on_disk: bool) -> None:
    """Find which listings of B are the same item as ours (A), and what B sells that A lacks.

    \b
    Examples:
      ecomaug match --a ./ours --b ./theirs --model runs/r50/export --out match/ \\
          --calibrate labelled.csv --precision 0.95
      ecomaug embed --model runs/r50/export --data ./theirs_shards --out emb/theirs
      ecomaug match --a emb/ours --b emb/theirs --out match/ --rerank 2
      ecomaug match --a emb/ours --b emb/theirs --out match/ --max-index-memory 2G
      ecomaug match --a emb/ours --b emb/theirs --out match/ --max-index-memory 256M --index-on-disk
      ecomaug match --a emb/ours --b emb/theirs --out match/ --score normalised --threshold 0.5
      ecomaug match --a emb/ours --b ./theirs_bundles --model runs/r50/export --out match/ \\
          --query-regions items
    """
    from ecomaug.commands.embed import raise_disk_full
    from ecomaug.evaluation.embed import random_init_model, resolve_device, load_model, shortfall
    from ecomaug.matching.catalogue import check_region_source, check_source, is_embeddings, load_catalogue
    from ecomaug.matching.match import MatchOptions, match_catalogues

    if model_path is not None and random_init is not None:
        raise ValueError("give at most one of --model and --random-init")
    options = MatchOptions(top_k=top_k, threshold=threshold, calibrate=calibrate,
                           precision=precision, mutual_only=mutual_only, rerank=rerank,
                           index=index, exact_limit=exact_limit, shop_column=shop_column, seed=seed,
                           score=score, query_regions=query_regions, index_on_disk=index_on_disk,
                           max_index_memory=None if max_index_memory is None else parse_size(max_index_memory))
    options.validate()
    target = resolve_device(device)
    model = None
    check_source(a_source, name="a")
    check_source(b_source, name="b")
    check_region_source(b_source, query_regions)  # before A is embedded
    needs_model = not (is_embeddings(a_source) and is_embeddings(b_source))
    if needs_model and model_path is None and random_init is None:
        raise ValueError("--a or --b holds images: give --model (or pass what ecomaug embed wrote)")
    if needs_model or model_path is not None:
        model = (random_init_model(random_init, device=target, input_size=input_size or 224,
                                   seed=seed) if random_init is not None else
                 load_model(model_path, device=target, input_size=input_size))
    try:
        a = load_catalogue(a_source, name="a", model=model, work_dir=out, batch_size=batch_size,
                           progress=progress)
        b = load_catalogue(b_source, name="b", model=model, work_dir=out, batch_size=batch_size,
                           progress=progress, regions=query_regions)
        model_source = model.source if model is not None else a.embeddings.info.get("source")
        result = match_catalogues(a, b, out, options=options, model_source=model_source,
                                  device=target, report=report)
    except OSError as error:
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                              NotADirectoryError, FileExistsError)):
            raise
        raise_disk_full(error, out)
    for note in result.notes:
        click.echo(f"Warning: {note}", err=True)
    click.echo(f"threshold {result.threshold:.4f} ({result.threshold_source}, {result.score} score; "
               f"{result.threshold_description})")
    if result.calibration is not None and result.threshold_source == "calibrated":
        c = result.calibration
        click.echo(f"calibration: {c.positives} same of {c.pairs} labelled pairs ({c.unresolved} rows "
                   f"unresolved); the curve is in {result.out_dir / 'precision_recall.png'}")
    for name, info in result.searches.items():
        recall = (f", recall@{info.get('recall_k')} vs exact {info['recall_vs_exact']:.3f}"
                  if "recall_vs_exact" in info else "")
        kind = (f" {info['kind']} ({info['index_bytes'] / 2**20:.1f} MiB)" if "index_bytes" in info else "")
        click.echo(f"search {name}: {info['method']}{kind}{recall}, "
                   f"{info['queries_per_second']:.0f} queries/s")
    click.echo(f"{result.pairs} pairs ({result.mutual_pairs} mutual) of {result.a_listings} A and "
               f"{result.b_listings} B listings; {result.b_matched} B listings matched, "
               f"{result.gap_listings} in {result.gap_clusters} gap clusters -> {result.out_dir}")
    if result.regions:
        click.echo(result.regions_description)
    for catalogue in (a, b):  # what each side's data promised but did not give
        lost = shortfall(catalogue.read, where=catalogue.skipped_file) if catalogue.read else ""
        if lost:
            click.echo(f"--{catalogue.name}: {lost}")
