"""Thresholds that mean something: the normalised score, refused calibrations, the threshold's source.

The catalogues are built from vectors, not photos: every listing is a large shared component
plus its item's direction, so every raw cosine between the catalogues is >= 0.6 (a model, or a
catalogue of look-alike product shots, that puts everything close together). A lists items
0-29 once; B lists copies of items 0-19 (in both) and items 30-39 that A lacks (gaps), 1-3
listings each by different shops.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ecomaug.cli import main
from ecomaug.evaluation.embeddings import Embeddings
from ecomaug.matching import Catalogue, MatchOptions, match_catalogues
from ecomaug.matching.calibrate import MIN_RECALL, choose_threshold
from ecomaug.matching.normalise import DEFAULT_MARGIN, background_levels, normalise
from ecomaug.matching.report import histogram

DIM, SHARED = 32, 2.5
COMMON, ONLY_A, GAPS = range(20), range(20, 30), range(30, 40)


def _item_vectors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared direction and one direction per item (40 items)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.nn.functional.normalize(torch.randn(DIM, generator=generator), dim=0)
    items = torch.randn(40, DIM, generator=generator)
    items = items - (items @ shared)[:, None] * shared  # item directions orthogonal to the shared one
    return shared, torch.nn.functional.normalize(items, dim=1)


@pytest.fixture(scope="module")
def lookalike() -> dict:
    """A and B as lists of (key, item, shop, vector), before any file is written."""
    generator = torch.Generator().manual_seed(1)
    shared, items = _item_vectors()

    def listing(item: int) -> torch.Tensor:  # a photo of the item: its direction, a little noise
        noisy = items[item] + 0.05 * torch.randn(DIM, generator=generator)
        return torch.nn.functional.normalize(SHARED * shared + noisy, dim=0)

    a = [(f"a{i:02d}", f"item{i:02d}", "ours", listing(i)) for i in [*COMMON, *ONLY_A]]
    b = [(f"b{i:02d}", f"item{i:02d}", f"shop{i % 5}", listing(i)) for i in COMMON]
    copies = {}
    for i in GAPS:
        copies[f"item{i:02d}"] = 1 + i % 3
        b += [(f"gap{i:02d}_{c}", f"item{i:02d}", f"gapshop{c}", listing(i)) for c in range(1 + i % 3)]
    return {"a": a, "b": b, "copies": copies}


def _catalogue(name: str, rows: list, source: str = "synthetic") -> Catalogue:
    embeddings = Embeddings(vectors=torch.stack([r[3] for r in rows]), keys=[r[0] for r in rows],
                            meta=[{"item_id": r[1], "shop": r[2]} for r in rows], info={"source": source})
    return Catalogue(name=name, embeddings=embeddings, source=f"{name}.npz", data=None)


def _save(rows: list, path: Path, source: Path) -> Path:
    """What ``ecomaug embed`` writes, made by the model at ``source`` (where a threshold is stored)."""
    _catalogue("x", rows, str(source)).embeddings.save(path)
    return path


def _read(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, newline="")))


def _invoke(*arguments: str):
    return CliRunner().invoke(main, ["match", *arguments, "--device", "cpu", "--no-progress"])


@pytest.fixture
def on_disk(lookalike, tmp_path) -> dict:
    """The catalogues as .npz embeddings of a model folder (so a calibration is stored there)."""
    model = tmp_path / "model"
    model.mkdir()
    return {"model": model, "a": _save(lookalike["a"], tmp_path / "a.npz", model),
            "b": _save(lookalike["b"], tmp_path / "b.npz", model)}


def _labels(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["a", "b", "same"])
        writer.writerows(rows)
    return path


def test_every_cosine_is_high_yet_the_uncalibrated_run_reports_the_gaps(lookalike, tmp_path):
    a, b = _catalogue("a", lookalike["a"]), _catalogue("b", lookalike["b"])
    assert float((a.vectors @ b.vectors.T).min()) >= 0.6  # the case: no cosine gap anywhere
    result = match_catalogues(a, b, tmp_path, options=MatchOptions(top_k=5), report=False)
    assert (result.threshold_source, result.score, result.threshold) == ("default", "normalised",
                                                                         DEFAULT_MARGIN)
    pairs = _read(tmp_path / "pairs.csv")
    assert sorted((p["a_item_id"], p["b_item_id"]) for p in pairs) == \
        [(f"item{i:02d}", f"item{i:02d}") for i in COMMON]
    assert all(float(p["normalised_score"]) >= DEFAULT_MARGIN and float(p["score"]) >= 0.6 for p in pairs)
    gaps = _read(tmp_path / "gaps.csv")
    gap_items = {f"item{i:02d}" for i in GAPS}
    assert {g["b_key"] for g in gaps} == {key for key, item, _, _ in lookalike["b"] if item in gap_items}
    for g in gaps:  # one cluster per gap item, as many listings as it has copies
        assert int(g["cluster_listings"]) == lookalike["copies"][g["item_id"]]
        assert float(g["nearest_normalised_score"]) < DEFAULT_MARGIN <= 1
    assert result.gap_clusters == len(GAPS) and result.b_matched == len(COMMON)
    # the raw cosine's old default matches every listing here: no gap at all
    old = match_catalogues(a, b, tmp_path / "cosine", options=MatchOptions(top_k=5, score="cosine"),
                           report=False)
    assert (old.threshold, old.score, old.gap_listings) == (0.8, "cosine", 0)


def test_normalised_score_matches_a_hand_computed_reference(lookalike, tmp_path):
    a, b = _catalogue("a", lookalike["a"]), _catalogue("b", lookalike["b"])
    match_catalogues(a, b, tmp_path, options=MatchOptions(top_k=3, threshold=-1.0), report=False)
    va, vb = a.vectors.double(), b.vectors.double()
    within = (va @ va.T).numpy()
    np.fill_diagonal(within, -np.inf)  # an A listing is not its own background
    level_a = -np.sort(-within, axis=1)[:, 2:5].mean(axis=1)  # 3rd-5th nearest in A
    level_b = -np.sort(-(vb @ va.T).numpy(), axis=1)[:, 2:5].mean(axis=1)
    a_row = {key: i for i, key in enumerate(a.keys)}
    b_row = {key: j for j, key in enumerate(b.keys)}
    pairs = _read(tmp_path / "pairs.csv")
    assert len(pairs) == 3 * len(a)
    for p in pairs:
        i, j = a_row[p["a_key"]], b_row[p["b_key"]]
        level = (level_a[i] + level_b[j]) / 2
        assert float(p["normalised_score"]) == pytest.approx((float(va[i] @ vb[j]) - level) / (1 - level),
                                                             abs=1e-4)


def test_background_levels_and_their_invariance_to_a_shared_component():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                       [0.9, 0.8, -np.inf, -np.inf, -np.inf, -np.inf],  # fewer than 3: its last
                       [0.9, 0.8, 0.7, 0.6, -np.inf, -np.inf],  # ranks 3-4 only
                       [-np.inf] * 6])
    np.testing.assert_allclose(background_levels(scores, ranks=(3, 5)), [0.6, 0.8, 0.65, -1.0], atol=1e-6)
    with pytest.raises(ValueError, match="1 <= first <= last"):
        background_levels(scores, ranks=(0, 2))
    # cos -> c + (1 - c) cos (a component every vector shares) leaves the score unchanged
    cosines = np.array([[0.95, 0.3, -0.2]])
    level_x, level_y = np.array([[0.2]]), np.array([[0.4, 0.1, 0.3]])
    for c in (0.5, 0.9):
        np.testing.assert_allclose(normalise(c + (1 - c) * cosines, c + (1 - c) * level_x, c + (1 - c) * level_y),
                                   normalise(cosines, level_x, level_y), rtol=1e-5)
    assert normalise(np.array([1.0, -np.inf]), np.array([0.99, 0.2]), np.array([0.99, 0.2]))[0] == 1.0
    assert normalise(np.array([-np.inf]), np.array([0.2]), np.array([0.2]))[0] == -np.inf


def test_a_calibration_without_useful_recall_is_refused_and_stores_nothing(lookalike, on_disk, tmp_path):
    # One true pair is labelled same; nine "same" labels name gap listings A does not sell, and
    # unrelated pairs are labelled different: 0.95 precision only at the top, recall 0.1.
    a_keys = [r[0] for r in lookalike["a"]]
    gap_keys = [r[0] for r in lookalike["b"] if r[0].startswith("gap")]
    rows = [("a00", "b00", 1), *[(a_keys[k], gap_keys[k], 1) for k in range(1, 10)],
            *[(a_keys[k], f"b{(k + 7) % 20:02d}", 0) for k in range(10, 30)]]
    labels = _labels(tmp_path / "labels.csv", rows)
    out = tmp_path / "out"
    run = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(out),
                  "--calibrate", str(labels), "--precision", "0.95")
    assert run.exit_code == 2, run.output
    assert run.output.startswith("Error: no useful threshold reaches precision 0.95") and \
        run.output.count("\n") == 1, run.output
    assert re.search(rf"keeps recall 0\.[0-4]\d\d \(at least {MIN_RECALL} needed\); nothing stored;", run.output)
    assert not (on_disk["model"] / "match-threshold.json").exists()
    assert not (out / "calibration.json").exists()
    plain = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path / "plain"),
                    "--no-report")
    assert plain.exit_code == 0, plain.output
    assert f"threshold {DEFAULT_MARGIN:.4f} (default, normalised score; UNCALIBRATED" in plain.output
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["threshold_source"] == "default"


def test_a_stored_threshold_without_useful_recall_is_not_reused(on_disk, tmp_path):
    # what --calibrate stored before it checked recall (the user's 1.0000 at recall 0.025)
    (on_disk["model"] / "match-threshold.json").write_text(json.dumps({
        "threshold": 1.0, "precision_target": 0.95, "precision": 1.0, "recall": 0.025, "pairs": 80,
        "unresolved": 0, "positives": 40, "rerank": 0, "labels": "labelled.csv", "model": "m"}))
    run = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path / "out"),
                  "--no-report")
    assert run.exit_code == 0, run.output
    assert "Warning: the threshold stored in" in run.output and "is not used" in run.output
    assert f"threshold {DEFAULT_MARGIN:.4f} (default, normalised score" in run.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["threshold_source"] == "default" and summary["gap_listings"] > 0
    assert "is not used" in summary["notes"][0]


def test_a_useful_stored_cosine_threshold_is_still_reused_on_the_cosine(on_disk, tmp_path):
    # a record from before scores were normalised (no "score": a cosine) that is a useful one
    (on_disk["model"] / "match-threshold.json").write_text(json.dumps({
        "threshold": 0.97, "precision_target": 0.95, "precision": 0.97, "recall": 0.9, "pairs": 80,
        "unresolved": 0, "positives": 40, "rerank": 0, "labels": "labelled.csv", "model": "m"}))
    run = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path), "--no-report")
    assert run.exit_code == 0, run.output
    assert "threshold 0.9700 (stored, cosine score; calibrated earlier" in run.output and "Warning" not in run.output


def test_a_threshold_stored_with_other_query_regions_is_not_reused(on_disk, tmp_path):
    # calibrated on region-collapsed scores (a bundle scores by its best region): no fit for whole images
    (on_disk["model"] / "match-threshold.json").write_text(json.dumps({
        "threshold": 0.6, "precision_target": 0.95, "precision": 0.97, "recall": 0.9, "pairs": 80,
        "unresolved": 0, "positives": 40, "rerank": 0, "labels": "labelled.csv", "model": "m",
        "score": "normalised", "query_regions": "items"}))
    run = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path), "--no-report")
    assert run.exit_code == 0, run.output
    assert "calibrated with --query-regions items, this run uses none: not used" in run.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["threshold_source"] == "default" and summary["threshold"] == 0.5


def test_a_good_calibration_is_stored_on_its_score_and_reused(lookalike, on_disk, tmp_path):
    # every true pair, and hard negatives: each A listing's three most similar other items in B
    a, b = _catalogue("a", lookalike["a"]), _catalogue("b", lookalike["b"])
    cosines = (a.vectors @ b.vectors.T).numpy()
    rows = [(f"a{i:02d}", f"b{i:02d}", 1) for i in COMMON]
    for i, (key, item, _, _) in enumerate(lookalike["a"]):
        others = [j for j in np.argsort(-cosines[i]) if b.meta[j]["item_id"] != item]
        rows += [(key, b.keys[j], 0) for j in others[:3]]
    labels = _labels(tmp_path / "labels.csv", rows)
    run = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path / "cal"),
                  "--calibrate", str(labels), "--precision", "0.95")
    assert run.exit_code == 0, run.output
    stored = json.loads((on_disk["model"] / "match-threshold.json").read_text())
    assert stored["score"] == "normalised" and stored["precision"] >= 0.95 and stored["recall"] >= MIN_RECALL
    assert stored["query_regions"] == "none"
    summary = json.loads((tmp_path / "cal" / "summary.json").read_text())
    assert (summary["threshold_source"], summary["score"]) == ("calibrated", "normalised")
    assert summary["gap_listings"] == sum(lookalike["copies"].values())
    again = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path / "again"),
                    "--no-report")
    assert again.exit_code == 0, again.output
    assert f"threshold {stored['threshold']:.4f} (stored, normalised score; calibrated earlier" in again.output
    # asked for the other score, the stored one is not used (and says why)
    cosine = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path / "cos"),
                     "--no-report", "--score", "cosine")
    assert cosine.exit_code == 0, cosine.output
    assert "applies to the normalised score, not --score cosine" in cosine.output
    assert "threshold 0.8000 (default, cosine score" in cosine.output


@pytest.mark.parametrize("arguments, source, says", [
    ((), "default", "UNCALIBRATED: pass --calibrate"),
    (("--threshold", "0.9"), "given", "given with --threshold"),
    (("--threshold", "0.5", "--score", "normalised"), "given", "given with --threshold"),
])
def test_summary_and_report_say_where_the_threshold_came_from(on_disk, tmp_path, arguments, source, says):
    run = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path), *arguments)
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    score = "cosine" if arguments[:2] == ("--threshold", "0.9") else "normalised"
    assert (summary["threshold_source"], summary["score"]) == (source, score)
    assert says in summary["threshold_description"] and summary["calibrated"] is False
    page = (tmp_path / "report.html").read_text()
    assert f"on the <b>{score}</b> score, <b>{source}</b>: {says}" in page
    assert "(calibrated: calibrated)" not in page and "max-width:none" in page
    assert Image.open(tmp_path / "scores.png").size[0] >= 1000  # both scores, side by side


def test_a_normalised_threshold_above_one_is_refused(on_disk, tmp_path):
    run = _invoke("--a", str(on_disk["a"]), "--b", str(on_disk["b"]), "--out", str(tmp_path),
                  "--threshold", "1.5", "--score", "normalised")
    assert run.exit_code == 2 and "--threshold on the normalised score is a number <= 1; got 1.5" in run.output


def test_choose_threshold_refuses_a_threshold_that_keeps_too_little_recall():
    scores = np.array([0.99, 0.9, 0.8, 0.7, 0.6, 0.5])
    same = np.array([True, False, True, False, True, False])
    with pytest.raises(ValueError, match=r"keeps recall 0.333 \(at least 0.5 needed\)"):
        choose_threshold(scores, same, precision=0.95)
    assert choose_threshold(scores, same, precision=0.95, min_recall=0.0) == (0.99, 1.0, pytest.approx(1 / 3))
    with pytest.raises(ValueError, match="top of the score range"):
        choose_threshold(np.array([1.0, 1.0, 0.2]), np.array([True, True, False]), precision=0.95)


def test_histograms_are_outlines_that_do_not_hide_each_other(tmp_path):
    rng = np.random.default_rng(0)
    best = {score: {"A's best in B": rng.normal(0.6, 0.1, 400), "B's best in A": rng.normal(0.5, 0.1, 400)}
            for score in ("cosine", "normalised")}
    histogram(best, threshold=0.5, score="normalised", path=tmp_path / "scores.png")
    pixels = np.asarray(Image.open(tmp_path / "scores.png").convert("RGB")).astype(int)
    painted = (pixels < 235).any(axis=2).mean()
    assert painted < 0.12, painted  # outlines, not filled bars over each other
    for colour in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two: each series shows
        assert (np.abs(pixels - colour).sum(axis=2) < 40).sum() > 500
