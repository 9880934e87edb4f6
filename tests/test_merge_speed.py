"""The vectorised greedy merging (``pipeline.boxes.greedy_merge`` / ``greedy_merge_many``) gives the same
bits as the loop it replaced (``jobs.bench.merge.loop_merge``): boxes, scores, labels and their order,
on seeded candidate sets built to hit every branch (ties, duplicates, nesting, degenerate and
non-finite boxes, many classes, thresholds), alone and batched together. No timing is asserted."""
from __future__ import annotations

import json

import pytest
import torch

from jobs.bench.merge import identical as same
from jobs.bench.merge import image_sets, loop_merge
from jobs.cli import UsageError
from pipeline import boxes as B
from pipeline.localise import LocProtocol, in_order_guesses, ranked_guesses

T = torch.tensor


def random_set(g: torch.Generator, n: int, classes: int, spread: float = 0.3):
    """``n`` float32 boxes of ``classes`` labels around a few centres (heavy merging), fractions."""
    centre = torch.rand(3, 2, generator=g)[torch.randint(0, 3, (n,), generator=g)]
    half = 0.1 + 0.2 * torch.rand(n, 2, generator=g)
    centre = centre + spread * 0.3 * torch.randn(n, 2, generator=g)
    boxes = torch.cat([centre - half, centre + half], 1).float()
    return boxes, torch.rand(n, generator=g), torch.randint(0, classes, (n,), generator=g)


def grid_ties(n: int = 12):
    """Equal boxes shifted by equal steps: many pairs with exactly the same IoU (and equal scores)."""
    x = torch.arange(n, dtype=torch.float32)
    boxes = torch.stack([x, torch.zeros(n), x + 4, torch.full((n,), 2.0)], 1)     # neighbours: IoU 0.6
    return boxes, torch.full((n,), 0.5), torch.zeros(n, dtype=torch.long)


def cases():
    g = torch.Generator().manual_seed(0)
    yield "random", random_set(g, 60, 3)
    yield "many classes", random_set(g, 300, 40)
    yield "sparse", random_set(g, 50, 2, spread=3.0)          # mostly apart: few merges
    b, s, lab = random_set(g, 30, 2)
    yield "duplicates", (torch.cat([b, b, b[:5]]), torch.cat([s, s, s[:5]]), torch.cat([lab, lab, lab[:5]]))
    yield "score ties", (b, torch.full_like(s, 0.25), lab)
    yield "grid ties", grid_ties()
    nested = torch.stack([T([0.5 - r, 0.5 - r, 0.5 + r, 0.5 + r]) for r in torch.linspace(0.05, 0.5, 20).tolist()])
    yield "nested", (nested, torch.rand(20, generator=g), torch.zeros(20, dtype=torch.long))
    yield "one box", (T([[0.1, 0.2, 0.3, 0.4]]), T([0.7]), T([3]))
    yield "none", (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    flat = b.clone()
    flat[::3, 2] = flat[::3, 0]                                  # zero-width: areas 0, some unions 0
    flat[1] = T([0.2, 0.2, 0.2, 0.2])
    flat[4] = T([0.2, 0.2, 0.2, 0.2])
    yield "degenerate", (flat, s, lab)
    bad = b.clone()
    bad[2, 0], bad[7, 3], bad[11] = float("nan"), float("inf"), T([float("-inf"), 0.0, float("inf"), 1.0])
    yield "non-finite", (bad, s, lab)
    yield "float64, labels not from 0", (b.double(), s.double(), lab + 7)
    yield "float labels", (b, s, lab.double() * 1.5)       # the loop labels a cluster int(label): 1.5 -> 1.0


CASES = list(cases())


def integer_grid(seed: int, n: int, corners: int, sides: int):
    """``n`` boxes with integer corners in [0, corners) and sides in [1, sides): exact IoU ties galore."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, corners, (n, 2), generator=g).float()
    wh = torch.randint(1, sides, (n, 2), generator=g).float()
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g), torch.zeros(n, dtype=torch.long)


# (seed, n, corners, sides, threshold): sets where a merged cluster's IoU with a box equals that box's
# best IoU so far, at a column after the merged one, and it decides a later merge (found by dropping
# the rule "equal IoUs: the first column wins" from greedy_merge, which then got them wrong)
GRID_TIES = [(1058, 13, 3, 3, 0.3), (2378, 13, 3, 3, 0.3), (1475, 13, 4, 4, 0.0), (1595, 13, 4, 4, 0.0)]


@pytest.mark.parametrize("seed, n, corners, sides, threshold", GRID_TIES)
def test_equal_ious_go_to_the_first_column_as_in_the_loop(seed, n, corners, sides, threshold):
    case = integer_grid(seed, n, corners, sides)
    assert same(B.greedy_merge(*case, threshold=threshold), loop_merge(*case, threshold=threshold))


@pytest.mark.parametrize("threshold", [0.5, 0.0, 0.8, -5.0, 1.0])
@pytest.mark.parametrize("name, case", CASES, ids=[n for n, _ in CASES])
def test_one_set_matches_the_loop(name, case, threshold):
    assert same(B.greedy_merge(*case, threshold=threshold), loop_merge(*case, threshold=threshold))


def test_every_case_batched_together_matches_the_loop(monkeypatch):
    # Small batches and chunks, so that problems are split over several batches, start in several
    # chunks and are compacted (finished ones dropped, removed clusters squeezed out) on the way.
    monkeypatch.setattr(B, "_BATCH_SLOTS", 1000)
    monkeypatch.setattr(B, "_PAIRS_CHUNK", 5000)
    monkeypatch.setattr(B, "_COMPACT_EVERY", 3)
    sets = [case for _, case in CASES]                  # float32 and float64 boxes, empty sets, together
    for got, case in zip(B.greedy_merge_many(sets), sets):
        assert same(got, loop_merge(*case))
    assert B.greedy_merge_many([]) == []


def test_protocol_b_candidates_match_the_loop_and_merge_heavily():
    sets = [s for i in range(3) for s in image_sets("Q256", i, seed=3)] + image_sets("Q384", 3, seed=3)
    merged = B.greedy_merge_many(sets)
    for got, case in zip(merged, sets):
        assert same(got, loop_merge(*case))
        assert len(got[0]) < len(case[0]) / 4          # the synthetic boxes cluster, as a trained net's do


def test_guesses_from_the_merged_boxes_match_the_loops():
    p = LocProtocol(scales=(256,))
    boxes, scores, labels = random_set(torch.Generator().manual_seed(1), 80, 6)
    want = loop_merge(boxes, scores, labels, p.merge_iou)
    got_ranked = ranked_guesses(boxes, scores, labels, p)
    lab, box = B.top_guesses(*want, k=p.guesses)
    assert torch.equal(got_ranked[0][0, :len(lab)], lab) and torch.equal(got_ranked[1][0, :len(box)], box)
    classes = torch.tensor([5, 0, 3])
    assert same(in_order_guesses(boxes, scores, labels, classes, p),
                in_order_guesses(*want, classes, p, merged=True))


def test_synthetic_sets_are_deterministic_and_at_the_documented_density():
    a, b = image_sets("fusion", 0, seed=1), image_sets("fusion", 0, seed=1)
    assert all(same(x, y) for x, y in zip(a, b))
    assert [len(s[0]) for s in a] == [80, 1000, 1080]      # 500 x 375: 8 + 100 locations, 2 flips, 5 classes
    assert not same(a[1], image_sets("fusion", 0, seed=2)[1])


def test_the_benchmark_writes_its_figures_and_the_measure_others_import(tmp_path, capsys):
    from jobs.bench import merge

    out = tmp_path / "merge.json"
    assert merge.main(["--images", "3", "--loop-images", "2", "--densities", "Q256", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["identical"] and row["density"] == "Q256" and row["boxes_per_image"] == 80
    assert row["loop_over_vectorised"] == pytest.approx(row["loop_ms_per_image"] / row["vectorised_ms_per_image"])
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == row
    got = merge.measure(2, seed=0, density="Q256", loop_images=1)
    assert next(iter(got)) == "vectorised_ms_per_image" and got["identical"] and got["threads"] == 1
    with pytest.raises(UsageError, match="Q256"):
        merge.main(["--densities", "Q999"])
