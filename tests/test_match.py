"""ecomaug match on a constructed case whose answer is known, calibration, report, bad inputs.

Two catalogues are built from the bundled sample: A lists photo 0 of items 0-49 (ours); B lists
a re-encoded (smaller, lower-quality) copy of photo 0 of items 0-29 (in both), and items 50-64
that A lacks, each as 1-3 re-encoded copies of photo 2 by different shops plus its distinct
photo 3. Re-encoded copies match under any backbone, so a random-init one is enough.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ecomaug.cli import main
from ecomaug.evaluation.embed import embed_to_parts, load_embeddings, random_init_model
from ecomaug.matching import (Catalogue, MatchOptions, choose_threshold, clusters, expand,
                              load_catalogue, match_catalogues, precision_recall)

MODEL, SIZE = "efficientnet_b0", 64
THRESHOLD = 0.99  # copies score >= 0.998 with this backbone, different items <= 0.98
RERANK_THRESHOLD = 0.9  # centred and re-ranked (see _centred): copies >= 0.99, false mutual pairs <= 0.78
COMMON, ONLY_A, GAPS = range(30), range(30, 50), range(50, 65)


def _copy(source: Path, target: Path, quality: int, scale: float) -> None:
    image = Image.open(source).convert("RGB")
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BICUBIC)
    image.save(target, format="JPEG", quality=quality)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory, sample_dir) -> dict:
    root = tmp_path_factory.mktemp("match_case")
    (root / "a").mkdir()
    (root / "b").mkdir()
    images = sample_dir / "images"
    a_rows, b_rows = [], []
    for i in [*COMMON, *ONLY_A]:
        name = f"item{i:03d}_0.jpg"
        _copy(images / name, root / "a" / name, 92, 1)
        a_rows.append({"path": name, "item_id": f"item{i:03d}", "shop": "ours", "price": 10 + i})
    for i in COMMON:
        name = f"copy_item{i:03d}_0.jpg"
        _copy(images / f"item{i:03d}_0.jpg", root / "b" / name, 75, 0.9)
        b_rows.append({"path": name, "item_id": f"item{i:03d}", "shop": f"shop{i % 7}",
                       "price": 20 + 2 * i})
    copies = {}
    for i in GAPS:
        copies[f"item{i:03d}"] = 1 + i % 3
        for c in range(1 + i % 3):
            name = f"gap_item{i:03d}_2_c{c}.jpg"
            _copy(images / f"item{i:03d}_2.jpg", root / "b" / name, 70 + 8 * c, 1 - 0.05 * c)
            b_rows.append({"path": name, "item_id": f"item{i:03d}", "shop": f"gapshop{c}",
                           "price": 5 + i})
        name = f"gap_item{i:03d}_3.jpg"
        _copy(images / f"item{i:03d}_3.jpg", root / "b" / name, 85, 1)
        b_rows.append({"path": name, "item_id": f"item{i:03d}", "shop": "gapshop9", "price": 5 + i})
    a_manifest = write_manifest(root / "a" / "items.csv", a_rows)
    b_manifest = write_manifest(root / "b" / "items.csv", b_rows)
    model = random_init_model(MODEL, device=torch.device("cpu"), input_size=SIZE)
    embed_to_parts(model, a_manifest, root / "emb_a", part_size=32, progress=False)
    embed_to_parts(model, b_manifest, root / "emb_b", part_size=32, progress=False)
    # labelled pairs: every true pair, and random others labelled by item
    rng = random.Random(0)
    labels = [(q["path"], r["path"], 1) for r in b_rows for q in a_rows
              if q["item_id"] == r["item_id"]]
    labels += [(q["path"], r["path"], int(q["item_id"] == r["item_id"]))
               for q, r in ((rng.choice(a_rows), rng.choice(b_rows)) for _ in range(200))]
    with open(root / "labels.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["a", "b", "same"])
        writer.writerows(labels)
    return {"root": root, "a": a_manifest, "b": b_manifest, "emb_a": root / "emb_a",
            "emb_b": root / "emb_b", "labels": root / "labels.csv", "copies": copies,
            "b_rows": b_rows}


def _read(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, newline="")))


def _match(case, out, **options):
    a = load_catalogue(case["emb_a"], name="a", model=None, work_dir=out)
    b = load_catalogue(case["emb_b"], name="b", model=None, work_dir=out)
    return match_catalogues(a, b, out, options=MatchOptions(**options), report=False)


def test_pairs_and_gaps_of_the_known_answer(case, tmp_path):
    result = _match(case, tmp_path, threshold=THRESHOLD, top_k=5)
    pairs = _read(tmp_path / "pairs.csv")
    # exactly the 30 items in both, each its copy, mutual and at rank 1
    assert sorted((p["a_item_id"], p["b_item_id"]) for p in pairs) == \
        [(f"item{i:03d}", f"item{i:03d}") for i in COMMON]
    assert all(p["mutual"] == "1" and p["rank"] == "1" and float(p["score"]) >= THRESHOLD
               for p in pairs)
    assert {p["b_key"] for p in pairs} == {f"copy_item{i:03d}_0.jpg" for i in COMMON}
    for p in pairs:  # both sides' metadata and the price ratio travel
        i = int(p["a_item_id"][4:])
        assert (p["a_shop"], p["b_shop"]) == ("ours", f"shop{i % 7}")
        assert float(p["price_a"]) == 10 + i and float(p["price_b"]) == 20 + 2 * i
        assert float(p["price_ratio"]) == pytest.approx((20 + 2 * i) / (10 + i), rel=1e-5)
    gaps = _read(tmp_path / "gaps.csv")
    gap_items = {f"item{i:03d}" for i in GAPS}
    assert {g["b_key"] for g in gaps} == {r["path"] for r in case["b_rows"]
                                          if r["item_id"] in gap_items}
    assert result.gap_listings == len(gaps) == 45 and result.b_matched == 30
    assert result.a_listings == 50 and result.b_listings == result.b_matched + len(gaps) == 75
    for g in gaps:
        # B's metadata under its own names; a listing's copies are one cluster
        assert g["item_id"] in gap_items and g["shop"].startswith("gapshop")
        if "_c" in g["b_key"]:
            assert int(g["cluster_listings"]) >= case["copies"][g["item_id"]]
        assert float(g["nearest_score"]) < THRESHOLD
    sizes = [int(g["cluster_listings"]) for g in gaps]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 3  # most-listed gaps first
    top = [g for g in gaps if g["gap_rank"] == "1"]
    assert len({g["item_id"] for g in top}) == 1 and int(top[0]["cluster_shops"]) >= 3
    assert not result.calibrated and result.threshold_source == "given"


def test_mutual_only_and_top_k(case, tmp_path):
    loose = _match(case, tmp_path / "loose", threshold=0.5, top_k=3)
    strict = _match(case, tmp_path / "strict", threshold=0.5, top_k=3, mutual_only=True)
    assert loose.pairs > strict.pairs == strict.mutual_pairs == loose.mutual_pairs
    rows = _read(tmp_path / "loose" / "pairs.csv")
    assert {r["rank"] for r in rows} <= {"1", "2", "3"}
    assert all(r["mutual"] == "1" for r in _read(tmp_path / "strict" / "pairs.csv"))


def test_calibrated_threshold_reaches_the_precision_and_is_reused(case, tmp_path):
    from safetensors.torch import save_file

    export = tmp_path / "export"
    export.mkdir()
    model = random_init_model(MODEL, device=torch.device("cpu"), input_size=SIZE)
    save_file(model.backbone.state_dict(), str(export / "backbone.safetensors"))
    (export / "config.json").write_text(json.dumps({"model": MODEL, "input_size": SIZE}))
    out = tmp_path / "calibrated"
    run = CliRunner().invoke(main, ["match", "--a", str(case["a"]), "--b", str(case["b"]),
                                    "--model", str(export), "--out", str(out), "--calibrate",
                                    str(case["labels"]), "--precision", "0.95", "--device",
                                    "cpu", "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "calibrated" in run.output and "UNCALIBRATED" not in run.output
    calibration = json.loads((out / "calibration.json").read_text())
    stored = json.loads((export / "match-threshold.json").read_text())
    assert stored == calibration and calibration["unresolved"] == 0
    # recompute precision at the threshold from the labels and the embeddings
    a, b = load_embeddings(out / "embeddings" / "a"), load_embeddings(out / "embeddings" / "b")
    a_row = {k: i for i, k in enumerate(a.keys)}
    b_row = {k: i for i, k in enumerate(b.keys)}
    labels = _read(case["labels"])
    va = torch.nn.functional.normalize(a.vectors, dim=1)
    vb = torch.nn.functional.normalize(b.vectors, dim=1)
    assert calibration["score"] == "normalised"  # an uncalibrated run's score, chosen on it
    scores = _normalised_reference(va, vb)[[a_row[r["a"]] for r in labels], [b_row[r["b"]] for r in labels]]
    same = np.array([r["same"] == "1" for r in labels])
    called = scores >= calibration["threshold"]
    assert same[called].mean() >= 0.95 and calibration["precision"] >= 0.95
    assert calibration["recall"] == pytest.approx(same[called].sum() / same.sum())
    assert (out / "precision_recall.png").stat().st_size > 0
    assert json.loads((out / "precision_recall.json").read_text())["curve"]["precision"]
    # a later run with the same model (here: its embeddings) reuses the stored threshold
    again = CliRunner().invoke(main, ["match", "--a", str(out / "embeddings" / "a"), "--b",
                                      str(out / "embeddings" / "b"), "--out",
                                      str(tmp_path / "again"), "--no-report", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert f"threshold {calibration['threshold']:.4f} (stored" in again.output


def _normalised_reference(va: torch.Tensor, vb: torch.Tensor) -> np.ndarray:
    """Every A x B pair's normalised score, by the formula of docs/matching.md on full matrices:
    (cos - m) / (1 - m), m the mean of both listings' mean cosine to their 3rd-5th nearest A
    listing (an A listing's own row left out)."""
    within = (va @ va.T).numpy()
    np.fill_diagonal(within, -np.inf)
    level_a = -np.sort(-within, axis=1)[:, 2:5].mean(axis=1)
    level_b = -np.sort(-(vb @ va.T).numpy(), axis=1)[:, 2:5].mean(axis=1)
    level = (level_a[:, None] + level_b[None, :]) / 2
    return ((va @ vb.T).numpy() - level) / (1 - level)


def test_report_page_and_histogram(case, tmp_path):
    run = CliRunner().invoke(main, ["match", "--a", str(case["emb_a"]), "--b", str(case["emb_b"]),
                                    "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "UNCALIBRATED" in run.output
    page = (tmp_path / "report.html").read_text()
    assert "UNCALIBRATED" in page and page.count("data:image/jpeg;base64") >= 20
    assert "Top gaps" in page and Image.open(tmp_path / "scores.png").size[0] >= 500
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["calibrated"] is False and "uncalibrated" in summary["note"]


def test_index_path_gives_the_known_answer(case, tmp_path):
    pytest.importorskip("faiss")
    exact = _match(case, tmp_path / "exact", threshold=THRESHOLD, index="exact")
    indexed = _match(case, tmp_path / "ivf", threshold=THRESHOLD, index="ivf")
    assert indexed.searches["a_to_b"]["method"] == "ivf"
    assert indexed.searches["a_to_b"]["recall_vs_exact"] >= 0.95
    by_index, by_exact = _read(tmp_path / "ivf" / "pairs.csv"), _read(tmp_path / "exact" / "pairs.csv")
    assert [float(p.pop("score")) for p in by_index] == \
        pytest.approx([float(p.pop("score")) for p in by_exact], abs=1e-5)
    # the normalised score divides by 1 - background (~0.02 here), so float noise grows with it
    assert [float(p.pop("normalised_score")) for p in by_index] == \
        pytest.approx([float(p.pop("normalised_score")) for p in by_exact], abs=1e-3)
    assert by_index == by_exact
    assert (tmp_path / "ivf" / "index" / "b.faiss").is_file()
    assert indexed.gap_listings == exact.gap_listings


def _centred(case, work: Path) -> tuple[Catalogue, Catalogue]:
    """Both catalogues with their pooled mean removed (rows unit again).

    A random-init backbone gives every photo one large shared component: all 50 x 75 cosines of
    this case are >= 0.98. Re-ranking weighs neighbours by ``score ** 3``, so there it weighs a
    copy and an unrelated listing alike and averages unrelated listings together (at depth 2 the
    best false mutual pair outscores the worst copy), which says nothing about the re-ranker.
    Centring (the first step of the PCA whitening retrieval descriptors get) gives the geometry a
    trained model has: copies score >= 0.99 after re-ranking at depth 1-3, the best false mutual
    pair <= 0.78.
    """
    a = load_catalogue(case["emb_a"], name="a", model=None, work_dir=work)
    b = load_catalogue(case["emb_b"], name="b", model=None, work_dir=work)
    mean = torch.cat([a.vectors, b.vectors]).mean(dim=0)
    return tuple(replace(side, embeddings=replace(
        side.embeddings, vectors=torch.nn.functional.normalize(side.vectors - mean, dim=1)))
        for side in (a, b))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_rerank_keeps_the_known_pairs_and_adds_no_false_one(case, tmp_path, depth):
    a, b = _centred(case, tmp_path)
    options = MatchOptions(threshold=RERANK_THRESHOLD, rerank=depth, top_k=5)
    result = match_catalogues(a, b, tmp_path, options=options, report=False)
    pairs = _read(tmp_path / "pairs.csv")
    known = {(f"item{i:03d}", f"item{i:03d}") for i in COMMON}
    # every copy stays its listing's mutual best match; no other pair becomes one (the lower ranks
    # are candidates, which query expansion is expected to pull up)
    assert {(p["a_item_id"], p["b_item_id"]) for p in pairs if p["mutual"] == "1"} == known
    assert result.mutual_pairs == len(known) and result.searches["a_to_b"]["method"] == "exact"
    match_catalogues(a, b, tmp_path / "plain", options=replace(options, rerank=0), report=False)
    scores = {p["a_key"]: float(p["score"]) for p in pairs if p["mutual"] == "1"}
    plain = {p["a_key"]: float(p["score"]) for p in _read(tmp_path / "plain" / "pairs.csv")}
    assert scores.keys() == plain.keys() and scores != pytest.approx(plain, abs=1e-4)  # it re-ranked


def test_expand_matches_a_hand_computed_reference():
    vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    neighbours = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), dim=1)
    indices = np.array([[0, 1], [1, -1]])
    scores = np.array([[0.5, 0.2], [-0.3, -np.inf]], dtype=np.float32)
    out = expand(vectors, neighbours, indices, scores, n=2, alpha=2.0)
    first = vectors[0] + 0.25 * neighbours[0] + 0.04 * neighbours[1]
    torch.testing.assert_close(out[0], first / first.norm())
    torch.testing.assert_close(out[1], vectors[1])  # negative and missing neighbours weigh 0


def test_clusters_are_connected_components():
    indices = np.array([[1, -1], [2, 0], [1, 0], [4, 3], [3, 0], [0, 1]])
    scores = np.array([[0.9, 0], [0.9, 0.9], [0.9, 0.1], [0.95, 0.1], [0.95, 0.1], [0.2, 0.1]])
    assert clusters(indices, scores, 0.5).tolist() == [0, 0, 0, 3, 3, 5]


def test_choose_threshold_reaches_the_precision():
    rng = np.random.default_rng(0)
    same = rng.random(500) < 0.3
    scores = np.where(same, rng.normal(0.8, 0.1, 500), rng.normal(0.5, 0.1, 500))
    for target in (0.8, 0.95, 0.99):
        threshold, precision, recall = choose_threshold(scores, same, precision=target)
        called = scores >= threshold
        assert same[called].mean() == pytest.approx(precision) and precision >= target
        assert recall == pytest.approx(same[called].sum() / same.sum())
        lower = scores[scores < threshold].max()  # one step lower misses the target
        assert same[scores >= lower].mean() < target or recall == 1
    curve = precision_recall(scores, same)
    assert curve["recall"] == sorted(curve["recall"])
    with pytest.raises(ValueError, match="no threshold reaches precision 1.0"):
        choose_threshold(np.array([0.9, 0.9, 0.1]), np.array([True, False, True]), precision=1.0)


def _invoke(*arguments):
    return CliRunner().invoke(main, ["match", *arguments, "--device", "cpu", "--no-progress"])


def test_bad_inputs_are_one_line_errors(case, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("path,item_id\n")
    other = random_init_model("resnet18", device=torch.device("cpu"), input_size=SIZE)
    embed_to_parts(other, case["a"], tmp_path / "wide", progress=False)
    no_same = tmp_path / "labels.csv"
    no_same.write_text("a,b\nx,y\n")
    cases = [
        (["--a", str(empty), "--b", str(case["b"]), "--random-init", MODEL], "lists no inputs"),
        (["--a", str(tmp_path / "wide"), "--b", str(case["emb_b"])], "differ in width: --a has 512"),
        (["--a", str(case["emb_a"]), "--b", str(case["emb_b"]), "--calibrate", str(no_same)],
         "missing same"),
        (["--a", str(case["emb_a"]), "--b", str(case["emb_b"]), "--shop-column", "seller"],
         "'seller' is not a column of --b"),
        (["--a", str(tmp_path / "nowhere"), "--b", str(case["emb_b"])], "nowhere"),
        (["--a", str(case["a"]), "--b", str(case["emb_b"])], "give --model"),
        (["--a", str(case["emb_a"]), "--b", str(case["emb_b"]), "--threshold", "2"],
         "--threshold is a cosine"),
    ]
    for arguments, message in cases:
        result = _invoke(*arguments, "--out", str(tmp_path / "out"))
        assert result.exit_code == 2, (arguments, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert message in result.output, (message, result.output)


def test_pairs_parquet_when_pyarrow_is_installed(case, tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    result = _match(case, tmp_path, threshold=THRESHOLD)
    assert "pairs.parquet" in result.files
    table = parquet.read_table(tmp_path / "pairs.parquet")
    assert table.num_rows == result.pairs == 30 and "price_ratio" in table.column_names
