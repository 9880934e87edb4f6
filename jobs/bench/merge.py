"""``python -m jobs.bench merge``: protocol (b)'s greedy box merging, the loop it was written as
(``loop_merge``, the reference, kept here unchanged) against the vectorised ``pipeline.boxes``
(``greedy_merge_many`` over ``--batch`` images at a time, and ``greedy_merge`` one image at a time), on the
same synthetic candidate sets, the outputs checked to be the same bits (``identical``: boxes, scores,
labels, their order and dtypes).

ImageNet's box density, as this code's protocol (b) produces it (``pipeline.localise.dense_candidates``
and ``class_candidates``): the dense net maps an image rescaled so that min(H, W) = Q to
(floor(H/32) - 6) x (floor(W/32) - 6) locations (a 224 crop, stride 32); each location gives one box per
kept class (PCR: that class's box; SCR: the shared box, repeated), for the image and its flip, at every Q
of the net, and 5 classes are kept per Q (``LocProtocol.classes_kept``: the label source's 5, or the
classifier's top 5 at that Q, so 5 or more classes once the Qs disagree). For an ILSVRC image of
500 x 375 (or 375 x 500), the commonest size:

| Table 9 row (``--densities``) | locations | boxes merged per image | merges run |
|---|---|---|---|
| ``Q256`` (LocProtocol's default ``scales=(256,)``) | 4 x 2 = 8 | 8 x 2 flips x 5 = 80 | 1 |
| ``Q384`` | 10 x 6 = 60 | 600 | 1 |
| ``Q352-384`` (the best single net) | 8 x 5 + 60 = 100 | 1,000 | 1 |
| ``fusion`` (256 / 352,384, the paper's best) | 8 + 100 | 80 + 1,000 + the union's 1,080 | 3 (each net, union) |

So 80 (the default scales) to 2,160 boxes per image, 16 to 216 per class in one merge; the mean
ILSVRC image (about 400 x 350) has fewer (42 locations at Q = 384 instead of 60). ``measure`` and the
headline ``vectorised_ms_per_image`` are at ``fusion``, the densest protocol (b) the paper ran; the
ImageNet figure is then 50,000 x that per validation pass.

The synthetic candidates go through the real ``map_to_boxes``, ``mirror``, ``to_fractions`` and
``class_candidates`` (assumptions, where the paper fixes nothing):
- assumption: every image is 500 x 375 or 375 x 500 (landscape 70 %), with one object (70 %) or two,
  each 30-95 % of each side, placed uniformly; 8 classes stand out in the image posterior, each class's
  PCR boxes aim at one object (the best class at the first), the SCR boxes at the first object;
- assumption: a window's box is the object's box in that window's units plus Gaussian noise of
  0.03 + 0.2 (1 - the object's fraction inside the window) window sides (0.7 of that on width and
  height): windows that see the whole object agree, the others scatter. Most boxes merge away
  (``clusters_per_image`` in the figures): the slow case for both versions (a boxes-agree net);
- assumption: location posteriors are a soft-max of the image's logits plus N(0, 1.5) noise per location
  and class; the kept classes are each Q's top 5 of the image posterior (the ``boxes`` label source).

Times are CPU seconds of this process (``time.process_time``), steadier than wall time on a shared
machine, and wall seconds beside them; the load average is recorded at the start and end.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from jobs.bench.common import Report, ratio
from jobs.cli import UsageError, positive
from model.vgg import STRIDE
from pipeline import localise as L
from pipeline.boxes import box_iou, greedy_merge, greedy_merge_many

CROP, CLASSES, KEPT, STANDOUT = 224, 1000, 5, 8
SIZES = ((500, 375), (375, 500))
DENSITIES = {           # Table 9's rows: each localisation net's Q set; several nets: also their union
    "Q256": ((256,),),
    "Q384": ((384,),),
    "Q352-384": ((352, 384),),
    "fusion": ((256,), (352, 384)),
}
HEADLINE = "fusion"


# ---------------------------------------------------------------------------------------------------
# The reference: the loop as pipeline/boxes.py had it, unchanged but for its name
# ---------------------------------------------------------------------------------------------------

def _merge_one_class(boxes: torch.Tensor, scores: torch.Tensor, threshold: float):
    """Greedy merging of one class's boxes (N, 4) with scores (N,) -> (boxes (M, 4), scores (M,))."""
    # Each cluster keeps the sum of its members' corners and their count, so a merged box is the mean
    # of all the boxes it absorbed whatever the merge order (assumption: OverFeat averages pairwise).
    sums, total = boxes.double().clone(), scores.double().clone()   # (n, 4) corner sums, (n,) scores
    counts = torch.ones(len(boxes), dtype=torch.float64)
    while len(sums) > 1:
        iou = box_iou(sums / counts[:, None], sums / counts[:, None])
        iou.fill_diagonal_(-1.0)
        best = int(iou.argmax())
        i, j = divmod(best, len(sums))
        if float(iou[i, j]) <= threshold:
            break
        keep = torch.ones(len(sums), dtype=torch.bool)
        keep[j] = False
        sums[i], counts[i], total[i] = sums[i] + sums[j], counts[i] + counts[j], total[i] + total[j]
        sums, counts, total = sums[keep], counts[keep], total[keep]
    return (sums / counts[:, None]).to(boxes.dtype), total.to(scores.dtype)


def loop_merge(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5):
    """The reference ``greedy_merge``: the Python loop ``pipeline.boxes`` had before it was vectorised
    (same arguments and result; its docstring there)."""
    out_boxes, out_scores, out_labels = [], [], []
    for c in torch.unique(labels):
        mine = labels == c
        b, s = _merge_one_class(boxes[mine], scores[mine], threshold)
        out_boxes.append(b)
        out_scores.append(s)
        out_labels.append(torch.full((len(s),), int(c), dtype=labels.dtype))
    if not out_boxes:
        return boxes.reshape(0, 4), scores.reshape(0), labels.reshape(0)
    b, s, lab = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
    order = torch.argsort(s, descending=True, stable=True)
    return b[order], s[order], lab[order]


# ---------------------------------------------------------------------------------------------------
# Synthetic candidate sets (the module's assumptions)
# ---------------------------------------------------------------------------------------------------

def _objects(g: torch.Generator) -> list[tuple[float, float, float, float]]:
    out = []
    for _ in range(1 if torch.rand(1, generator=g).item() < 0.7 else 2):
        w, h = (0.3 + 0.65 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
        x, y = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        out.append((x * (1 - w), y * (1 - h), x * (1 - w) + w, y * (1 - h) + h))
    return out


def _window_boxes(obj, width: int, height: int, hm: int, wm: int, g: torch.Generator) -> torch.Tensor:
    """(hm * wm, 4) net outputs (cx, cy, w, h) in window units aiming at ``obj`` (corners, fractions)."""
    origin = L.window_origins(hm, wm).double()                                  # (L, 2) px
    o = torch.tensor(obj, dtype=torch.float64) * torch.tensor([width, height, width, height])
    inside = ((torch.minimum(origin + CROP, o[2:]) - torch.maximum(origin, o[:2])).clamp(min=0).prod(1)
              / ((o[2] - o[0]) * (o[3] - o[1])))                                  # (L,) object fraction seen
    centre = ((o[:2] + o[2:]) / 2 - origin) / CROP
    size = ((o[2:] - o[:2]) / CROP).expand(len(origin), 2)
    noise = torch.randn(len(origin), 4, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 0.7, 0.7])
    return (torch.cat([centre, size], 1) + noise * (0.03 + 0.2 * (1 - inside))[:, None]).float()


def _net_at(q: int, size, objects, logits, shared: bool, g: torch.Generator):
    """One net's candidates at Q (both views): [(boxes, scores, labels)] via ``class_candidates``;
    ``shared``: one box per location for every class (SCR), else one per class (PCR)."""
    w, h = size
    s = q / min(w, h)
    width, height = round(w * s), round(h * s)
    hm, wm = height // STRIDE - CROP // STRIDE + 1, width // STRIDE - CROP // STRIDE + 1
    standout = logits.topk(STANDOUT).indices
    views, image_post = [], []
    for flipped in (False, True):
        objs = [(1 - o[2], o[1], 1 - o[0], o[3]) if flipped else o for o in objects]
        loc_post = torch.softmax(logits + 1.5 * torch.randn(hm * wm, CLASSES, generator=g), dim=1)   # (L, C)
        image_post.append(loc_post.mean(0))
        k = 1 if shared else CLASSES
        out = torch.zeros(hm * wm, k, 4)
        for i, c in enumerate([0] if shared else standout.tolist()):
            out[:, c] = _window_boxes(objs[i % len(objs)], width, height, hm, wm, g)
        box_map = out.reshape(hm * wm, 4 * k).T.reshape(1, 4 * k, hm, wm)
        corners = L.map_to_boxes(box_map, CROP)
        corners = L.mirror(corners, width) if flipped else corners
        views.append((L.to_fractions(corners, height, width)[0], loc_post))
    kept = torch.stack(image_post).mean(0).topk(KEPT).indices
    return [L.class_candidates(b, lp, kept) for b, lp in views]


def image_sets(density: str, image: int, seed: int, shared: bool = False) -> list[tuple]:
    """One image's candidate sets at ``density``, in the order protocol (b) merges them: each net's
    (boxes (N, 4), scores (N,), labels (N,)), then their union when several; deterministic in
    (``seed``, ``image``), the image (size, objects, classes) the same at every density."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + image)
    size = SIZES[0] if torch.rand(1, generator=g).item() < 0.7 else SIZES[1]
    objects = _objects(g)
    logits = torch.randn(CLASSES, generator=g)
    logits[torch.randperm(CLASSES, generator=g)[:STANDOUT]] += torch.linspace(7, 4, STANDOUT)
    nets = [[part for q in qs for part in _net_at(q, size, objects, logits, shared, g)] for qs in DENSITIES[density]]
    sets = [tuple(torch.cat(x) for x in zip(*parts)) for parts in nets]
    return sets + ([tuple(torch.cat(x) for x in zip(*sets))] if len(sets) > 1 else [])


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]) if x.is_floating_point() else x


def identical(a, b) -> bool:
    """Whether two ``greedy_merge`` results (or lists of them) hold the same bits: dtypes, shapes and
    values (NaN equal to the same NaN, -0.0 not equal to 0.0)."""
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))


def _vectorised(flat: list, step: int) -> tuple[list, float, float]:
    """All of ``flat`` through ``greedy_merge_many``, ``step`` sets per call: (results, wall s, CPU s)."""
    vec, vec_wall, vec_cpu = [], 0.0, 0.0
    for s in range(0, len(flat), step):
        out, wall, cpu = _timed(lambda: greedy_merge_many(flat[s:s + step]))
        vec, vec_wall, vec_cpu = vec + out, vec_wall + wall, vec_cpu + cpu
    return vec, vec_wall, vec_cpu


def figures(density: str, images: int, seed: int, loop_images: int, batch: int, shared: bool = False,
            repeats: int = 1) -> dict:
    """One density's figures over ``images`` images: the vectorised merge ``batch`` images per call
    (``repeats`` times: the median, and the fastest), and on the first ``loop_images`` also the loop and
    ``greedy_merge`` one set at a time, all compared."""
    sets = [image_sets(density, i, seed, shared) for i in range(images)]
    flat = [s for per in sets for s in per]
    per = len(sets[0])
    runs = sorted((_vectorised(flat, batch * per) for _ in range(repeats)), key=lambda r: r[2])
    vec, vec_wall, vec_cpu = runs[len(runs) // 2]
    some = flat[:loop_images * per]
    ref, loop_wall, loop_cpu = _timed(lambda: [loop_merge(*x) for x in some])
    one, one_wall, one_cpu = _timed(lambda: [greedy_merge(*x) for x in some])
    n = max(loop_images, 1)
    return {
        "density": density, "boxes": "shared (SCR)" if shared else "per class (PCR)", "images": images,
        "loop_images": loop_images, "batch": batch,
        "merges_per_image": per, "boxes_per_image": sum(len(x[0]) for x in flat) / images,
        "classes_per_merge": sum(len(torch.unique(x[2])) for x in flat) / len(flat),
        "clusters_per_image": sum(len(x[0]) for x in vec) / images,
        "identical": identical(ref, vec[:len(ref)]) and identical(ref, one),
        "vectorised_ms_per_image": vec_cpu / images * 1e3, "vectorised_wall_ms_per_image": vec_wall / images * 1e3,
        "vectorised_fastest_ms_per_image": runs[0][2] / images * 1e3, "repeats": repeats,
        "single_ms_per_image": one_cpu / n * 1e3, "loop_ms_per_image": loop_cpu / n * 1e3,
        "loop_wall_ms_per_image": loop_wall / n * 1e3,
        "loop_over_vectorised": ratio(loop_cpu / n, vec_cpu / images),
        "loop_over_single": ratio(loop_cpu, one_cpu),
    }


def measure(images: int, seed: int, density: str = HEADLINE, loop_images: int = 4, batch: int = 64,
            threads: int = 1) -> dict:
    """The merge at ImageNet's density (``fusion`` unless told) over ``images`` synthetic images, on
    ``threads`` torch threads (an evaluation worker's default): ``vectorised_ms_per_image`` (CPU ms,
    ``batch`` images per call) first, then the rest of ``figures`` (the loop on ``min(images,
    loop_images)`` of them) and the load averages at the start and end."""
    before, start = torch.get_num_threads(), os.getloadavg()
    torch.set_num_threads(threads)
    try:
        fig = figures(density, images, seed, min(images, loop_images), batch)
    finally:
        torch.set_num_threads(before)
    return {"vectorised_ms_per_image": fig.pop("vectorised_ms_per_image"), **fig, "threads": threads,
            "load_avg_start": list(start), "load_avg_end": list(os.getloadavg())}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.bench merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=positive, default=128, help="synthetic images (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop-images", type=positive, default=8,
                   help="of those, how many the loop and the one-at-a-time merge also run (default 8)")
    p.add_argument("--batch", type=positive, default=64, help="images per greedy_merge_many call (default 64)")
    p.add_argument("--repeats", type=positive, default=3,
                   help="vectorised passes over the images; the median is reported, and the fastest (default 3)")
    p.add_argument("--densities", default=",".join(DENSITIES), help=f"some of {', '.join(DENSITIES)}")
    p.add_argument("--shared-box", action="store_true",
                   help="one box per location for all classes (SCR) instead of one per class (PCR, the paper's)")
    p.add_argument("--threads", type=positive, default=1,
                   help="torch CPU threads (default 1: an evaluation worker's --cpus-per-worker default)")
    p.add_argument("--out", default="", help="also write the figures as a JSON list here")
    p.add_argument("--note", default="", help="a remark kept with the figures (e.g. what else the machine ran)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    names = [d for d in args.densities.split(",") if d]
    unknown = [d for d in names if d not in DENSITIES]
    if unknown or not names:
        raise UsageError(f"--densities {args.densities!r}: choose from {', '.join(DENSITIES)}")
    if args.loop_images > args.images:
        raise UsageError(f"--loop-images {args.loop_images}: more than --images {args.images}")
    torch.set_num_threads(args.threads)
    report = Report("merge", torch.device("cpu"), out=args.out, seed=args.seed, threads=args.threads,
                    torch=torch.__version__, cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                    **({"note": args.note} if args.note else {}))
    for name in names:
        start = os.getloadavg()
        fig = figures(name, args.images, args.seed, args.loop_images, args.batch, args.shared_box, args.repeats)
        report.add(**fig, load_avg_start=list(start), load_avg_end=list(os.getloadavg()))
    print(report.table(["density", "boxes_per_image", "merges_per_image", "loop_ms_per_image", "single_ms_per_image",
                        "vectorised_ms_per_image", "loop_over_vectorised", "identical"]))
    return 0 if all(r["identical"] for r in report.rows) else 1


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main, sys.argv[1:]))
