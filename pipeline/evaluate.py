"""Evaluation of one worker's share of a split, in plain torch (the paper, section 3.2).

The input is, per test scale Q, an iterable of batches ``(keys, labels, images)``: ``images`` a list of
(3, H, W) float tensors, mean-subtracted, isotropically rescaled so that min(H, W) == Q (sizes differ
between images), or one (N, 3, H, W) tensor of images of one size (the DALI loader's dense groups).
From each image at each Q the protocols are computed off the *same* decoded, rescaled tensor:

- dense: the fully convolutional net on the whole image -> class-score map -> spatial mean -> soft-max,
  averaged with the horizontally flipped image;
- multicrop: the plain net on an n x n grid of crops (n = 5) and their flips (50 per scale);
- center: the plain net on the centre crop (and its flip) - the training-time validation view;
- both: the average of dense and multicrop.

Across scales the posteriors are averaged (Table 4); across an ensemble of nets as well (Table 6),
each net over its own Q set when the nets were trained at different S (``Protocol.member_scales``). The
output is, per key, the top-5 classes of every (protocol, Q) and of every protocol over all Qs: small
enough to gather from many workers, and what top-1/top-5 error and per-class accuracy need.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

import model
from pipeline import scoring
from pipeline.batch import Batch

MODES = ("center", "dense", "multicrop", "both")
# keys, labels (N,), images at one Q: [(3, H, W)] of any sizes, or one (N, 3, H, W) tensor


@dataclass(frozen=True)
class Protocol:
    """What to compute: ``modes`` from MODES, test ``scales`` (Q, the shorter side), flips, crops.

    ``member_scales``: for an ensemble whose nets were trained at different S, each net's own Q set
    (Table 6: {224,256,288}, {352,384,416}, {256,384,512}, ...), every one within ``scales`` (the
    passes the data loader makes). Empty: every net at every Q of ``scales``, posteriors averaged
    over the nets per view (one net, or nets that share their Q set).
    """

    modes: tuple[str, ...] = ("dense",)
    scales: tuple[int, ...] = (256,)
    flip: bool = True
    crop: int = 224                 # the nets' training crop (multicrop / center crop size)
    grid: int = 5                   # n x n multi-crop grid
    max_batch: int = 64             # images or crops per forward pass (memory bound)
    amp_dtype: torch.dtype | None = None  # bfloat16 on GPU; None = float32
    member_scales: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"Invalid mode(s) {bad or self.modes}. Only {', '.join(MODES)} are supported.")
        if not self.scales or min(self.scales) < self.crop:
            raise ValueError(f"test scales {self.scales} must be non-empty and >= the crop {self.crop}")
        outside = [qs for qs in self.member_scales if not qs or not set(qs) <= set(self.scales)]
        if outside:
            raise ValueError(f"member scales {outside} must be non-empty and within the scales {self.scales}")

    @property
    def ensemble(self) -> bool:
        """Several nets, each at its own Q set: rows per member, then the ensemble."""
        return len(self.member_scales) > 1

    def scales_of(self, member: int) -> tuple[int, ...]:
        return self.member_scales[member] if self.member_scales else self.scales

    @property
    def computed(self) -> tuple[str, ...]:
        """The protocols run on the nets: 'both' needs dense and multicrop and costs nothing more."""
        need = set(self.modes) | ({"dense", "multicrop"} if "both" in self.modes else set())
        return tuple(m for m in MODES if m in need and m != "both")

    @property
    def reported(self) -> tuple[str, ...]:
        """Every protocol that comes out: with 'both', dense and multicrop come out too."""
        return tuple(m for m in MODES if m in self.computed or (m == "both" and "both" in self.modes))


ENSEMBLE = "ensemble"


def scale_label(scales: Sequence[int]) -> str:
    """The test-Q column of the results table: '256' or '256,384,512'."""
    return ",".join(str(q) for q in scales)


def member_row(i: int, scales: Sequence[int]) -> str:
    """An ensemble member's row: 'net1@224,256,288' (net i+1 over its own Q set)."""
    return f"net{i + 1}@{scale_label(scales)}"


def rows(protocol: Protocol) -> list[tuple[str, str]]:
    """(mode, row) of every result row. One net (or nets sharing their Qs): each Q alone, then all Qs
    together when there are several. An ensemble: each member over its own Qs, then the ensemble."""
    if protocol.ensemble:
        qs = [member_row(i, s) for i, s in enumerate(protocol.member_scales)] + [ENSEMBLE]
    else:
        qs = [scale_label([q]) for q in protocol.scales]
        if len(protocol.scales) > 1:
            qs.append(scale_label(protocol.scales))
    return [(m, q) for m in protocol.reported for q in qs]


# ---------------------------------------------------------------------------------------------------
# Posteriors of a list of images at one scale
# ---------------------------------------------------------------------------------------------------

def forward_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, max_batch: int,
             amp_dtype: torch.dtype | None) -> list[torch.Tensor]:
    """``fn`` over ``x`` in chunks of ``max_batch``; outputs in float32."""
    out = []
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for i in range(0, x.shape[0], max_batch):
            out.append(fn(x[i:i + max_batch]).float())
    return out


def flip_stack(x: torch.Tensor, flip: bool) -> torch.Tensor:
    """(M, 3, h, w) -> (M * (1 + flip), 3, h, w) ordered view-major: [x_0, flip(x_0), x_1, ...]."""
    if not flip:
        return x
    return torch.stack([x, torch.flip(x, dims=[3])], dim=1).flatten(0, 1)


def crops_of(x: torch.Tensor, boxes: Sequence[tuple[int, int]], crop: int) -> torch.Tensor:
    """(N, 3, H, W) and (top, left) boxes -> (N * len(boxes), 3, crop, crop), image-major. Slicing of
    the rescaled image: the crop's border is padded with zeros by the convs, as in the paper's
    multi-crop (dense evaluation instead sees the neighbouring image content there)."""
    return torch.stack([x[:, :, t:t + crop, l:l + crop] for t, l in boxes], dim=1).flatten(0, 1)


def _crop_posteriors(nets: Sequence[nn.Module], x: torch.Tensor, boxes, p: Protocol) -> torch.Tensor:
    """Mean over crops, flips and nets of the soft-max of the plain forward. (N, classes).
    Images are taken a few at a time so that at most ~max_batch views exist at once (50 per image)."""
    per_image = len(boxes) * (2 if p.flip else 1)
    step = max(1, p.max_batch // per_image)
    out = []
    for i in range(0, x.shape[0], step):
        views = flip_stack(crops_of(x[i:i + step], boxes, p.crop), p.flip)  # (n * per_image, 3, c, c)
        ps = [scoring.group_mean(scoring.posteriors(torch.cat(forward_chunks(net, views, p.max_batch,
                                                                             p.amp_dtype))), per_image)
              for net in nets]
        out.append(scoring.average_posteriors(ps))
    return torch.cat(out)


def _dense_posteriors(dense_nets: Sequence[nn.Module], x: torch.Tensor, p: Protocol) -> torch.Tensor:
    """Dense evaluation of same-sized images: (N, 3, H, W) -> (N, classes), mean over flips and nets."""
    views = flip_stack(x, p.flip)                             # (N * flips, 3, H, W)
    ps = []
    for dense in dense_nets:
        maps = forward_chunks(dense, views, p.max_batch, p.amp_dtype)
        pooled = torch.cat([scoring.pool_score_map(m) for m in maps])
        ps.append(scoring.group_mean(scoring.posteriors(pooled), 2 if p.flip else 1))
    return scoring.average_posteriors(ps)


def shape_groups(images: Sequence[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images of each exact (H, W): dense evaluation batches only equal shapes, so no
    padding ever reaches the convs and every score map is the one the image alone would give."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[tuple(img.shape[-2:])].append(i)
    return dict(groups)


def same_shape_batches(images: Sequence[torch.Tensor] | torch.Tensor):
    """(index list, (n, 3, H, W) float32 batch) per exact image shape."""
    if isinstance(images, torch.Tensor):  # (N, 3, H, W): one shape already (the DALI dense groups)
        yield list(range(images.shape[0])), images.float()
        return
    for idx in shape_groups(images).values():
        yield idx, torch.stack([images[i] for i in idx]).float()


@torch.no_grad()
def posteriors_at_scale(nets: Sequence[nn.Module], images: Sequence[torch.Tensor] | torch.Tensor, p: Protocol,
                        dense_nets: Sequence[nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """{mode: (N, classes)} for every computed mode (and 'both'), averaged over flips, crops and nets.

    ``images``: a list of (3, H, W) tensors of any sizes, or one (N, 3, H, W) tensor. ``nets`` are
    plain VGGs in eval mode, on the images' device; ``dense_nets`` their ``model.to_dense`` forms
    (made here when not given).
    """
    dense_nets = dense_nets or [model.to_dense(n) for n in nets]
    out: dict[str, torch.Tensor] = {}
    for idx, x in same_shape_batches(images):
        h, w = x.shape[-2:]
        got = {}
        if "dense" in p.computed:
            got["dense"] = _dense_posteriors(dense_nets, x, p)
        if "multicrop" in p.computed:
            got["multicrop"] = _crop_posteriors(nets, x, scoring.crop_grid(h, w, p.crop, p.grid), p)
        if "center" in p.computed:
            got["center"] = _crop_posteriors(nets, x, [scoring.center_box(h, w, p.crop)], p)
        for m, post in got.items():
            if m not in out:
                out[m] = post.new_empty(len(images), post.shape[1])
            out[m][idx] = post
    if "both" in p.modes:
        out["both"] = scoring.average_posteriors([out["dense"], out["multicrop"]])
    return out


# ---------------------------------------------------------------------------------------------------
# One worker's share: every scale, every batch
# ---------------------------------------------------------------------------------------------------

@dataclass
class ShareResult:
    """What a worker sends back: its keys, their labels and, per result row, the top-k classes.

    ``top[(mode, q_label)]`` is (N, k) aligned with ``keys``. ``top_posteriors[mode]`` (N, k) are the
    posteriors of the last row's top classes (all Qs together, or the ensemble): what a later pass
    takes as this evaluation's labels (protocol (b)'s classes). Optional ``posteriors`` (multi-scale,
    per mode, (N, classes) float16) are kept only when asked for (ensembles of separate evaluations).
    """

    keys: list[str]
    labels: torch.Tensor
    top: dict[tuple[str, str], torch.Tensor]
    posteriors: dict[str, torch.Tensor] = field(default_factory=dict)
    top_posteriors: dict[str, torch.Tensor] = field(default_factory=dict)


class DuplicateKeyError(RuntimeError):
    """A key came twice within one scale's pass, or a pass missed keys another pass had."""


def checked_passes(batches_at: Callable[[int], Iterable[Batch]], scales: Sequence[int],
                   device: torch.device) -> Iterator[tuple[int, list[str], torch.Tensor, object]]:
    """(Q, keys, labels, images on ``device``) for every batch of every scale's pass, enforcing
    exactly once: a key twice in one pass, or a pass with other keys than the first, is an error."""
    first: set[str] | None = None
    for q in scales:
        seen: set[str] = set()
        for batch in batches_at(q):
            keys, lbl, images = batch.keys, batch.labels, batch.images
            dup = [key for key in keys if key in seen] or _repeated(keys)
            if dup:
                raise DuplicateKeyError(f"key(s) {dup[:5]} came twice in the pass at Q={q}")
            seen.update(keys)
            if isinstance(images, torch.Tensor):
                images = images.to(device, non_blocking=True)
            else:
                images = [im.to(device, non_blocking=True) for im in images]
            yield q, keys, lbl, images
        if first is None:
            first = seen
        elif seen != first:
            raise DuplicateKeyError(f"the pass at Q={q} saw other keys than the first pass: "
                                    f"{sorted(seen ^ first)[:5]}")


class _Sums:
    """Per member, mode and key: the posterior summed over the member's scales, (classes,) float32
    per image (ImageNet, 4 modes, one net: 800 MB over all workers together; x nets for an ensemble)."""

    def __init__(self, members: int):
        self.sums: list[dict[str, dict[str, torch.Tensor]]] = [defaultdict(dict) for _ in range(members)]

    def add(self, member: int, mode: str, keys: Sequence[str], post: torch.Tensor) -> None:
        got = self.sums[member][mode]
        for j, key in enumerate(keys):
            got[key] = got[key] + post[j] if key in got else post[j].clone()

    def mean(self, member: int, mode: str, order: Sequence[str], n_scales: int) -> torch.Tensor:
        return _stack([self.sums[member][mode][key] for key in order], 0) / n_scales


def _members(p: Protocol, n_nets: int) -> list[list[int]]:
    """The nets each member is: one net each for an ensemble, else all nets averaged per view."""
    if not p.ensemble:
        return [list(range(n_nets))]
    if len(p.member_scales) != n_nets:
        raise ValueError(f"{n_nets} nets but {len(p.member_scales)} member Q sets")
    return [[i] for i in range(n_nets)]


@torch.no_grad()
def evaluate_share(nets: Sequence[nn.Module], batches_at: Callable[[int], Iterable[Batch]], p: Protocol,
                   device: torch.device | str = "cpu", k: int = 5, keep_posteriors: bool = False,
                   progress: Callable[[int], None] | None = None) -> ShareResult:
    """Evaluate one worker's share: ``batches_at(Q)`` yields that share's batches rescaled to Q.

    Every scale's pass must give the same keys, each once. ``progress(n)`` is called after each
    batch with the number of images in it (summed over scales: total = images x len(scales)).
    An ensemble (``p.member_scales``): at each Q only the nets whose own Q set holds it run; each
    net's posteriors are averaged over its own Qs (its row), then over the nets with equal weights
    (the ensemble's row): the paper's soft-max averaging of several models.
    """
    device = torch.device(device)
    nets = [n.to(device).eval() for n in nets]
    dense_nets = [model.to_dense(n) for n in nets]
    members = _members(p, len(nets))
    labels: dict[str, int] = {}
    top: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)  # one member's per-Q rows
    sums = _Sums(len(members))
    for q, keys, lbl, images in checked_passes(batches_at, p.scales, device):
        for key, label in zip(keys, lbl.tolist()):  # .tolist(): one device-to-host copy
            labels[key] = label
        for g, idx in enumerate(members):
            if q not in p.scales_of(g):
                continue
            post = posteriors_at_scale([nets[i] for i in idx], images, p, [dense_nets[i] for i in idx])
            for m, pm in post.items():
                pm = pm.cpu()  # a CPU-GPU sync point, once per batch and member
                if not p.ensemble:
                    t = scoring.topk(pm, k)
                    top[(m, scale_label([q]))].update((key, t[j]) for j, key in enumerate(keys))
                sums.add(g, m, keys, pm)   # the last row's posteriors, every row's top-k posteriors
        if progress is not None:
            progress(len(keys))
    order = sorted(labels)
    out_top, keep = _share_rows(p, members, top, sums, order, k)
    last_row = rows(p)[-1][1]
    top_p = {m: post.gather(1, out_top[(m, last_row)]) if len(order) else post for m, post in keep.items()}
    return ShareResult(order, torch.tensor([labels[key] for key in order], dtype=torch.long), out_top,
                       {m: post.half() for m, post in keep.items()} if keep_posteriors else {}, top_p)


def _share_rows(p: Protocol, members: list[list[int]], top, sums: _Sums, order: list[str], k: int):
    """({(mode, row): (N, k) top classes} in ``rows(p)``'s rows, {mode: the last row's posteriors})."""
    out_top, last = {}, {}
    for m in p.reported:
        if p.ensemble:
            means = [sums.mean(g, m, order, len(p.scales_of(g))) for g in range(len(members))]
            for g, mean in enumerate(means):
                out_top[(m, member_row(g, p.scales_of(g)))] = _topk(mean, k)
            last[m] = sum(means) / len(means)
            out_top[(m, ENSEMBLE)] = _topk(last[m], k)
            continue
        for q in p.scales:
            out_top[(m, scale_label([q]))] = _stack([top[(m, scale_label([q]))][key] for key in order], k)
        if sums.sums[0][m] or not order:
            last[m] = sums.mean(0, m, order, len(p.scales))
        if len(p.scales) > 1:
            out_top[(m, scale_label(p.scales))] = _topk(last[m], k)
    return out_top, last


def _topk(post: torch.Tensor, k: int) -> torch.Tensor:
    return scoring.topk(post, k) if post.shape[0] else post.long()


def _repeated(keys: Sequence[str]) -> list[str]:
    return [key for key in set(keys) if keys.count(key) > 1] if len(set(keys)) != len(keys) else []


def _stack(rows_: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack(rows_) if rows_ else torch.zeros(0, width, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# Gathering shares: exactly once, then the table's figures
# ---------------------------------------------------------------------------------------------------

def check_exactly_once(shares: Sequence[ShareResult], expected: Iterable[str]) -> None:
    """Every expected key in exactly one share, and nothing else. Raises naming the offending keys."""
    counts: dict[str, int] = defaultdict(int)
    for s in shares:
        for key in s.keys:
            counts[key] += 1
    expected = set(expected)
    dup = sorted(k for k, c in counts.items() if c > 1)
    missing = sorted(expected - counts.keys())
    extra = sorted(counts.keys() - expected)
    if dup or missing or extra:
        raise DuplicateKeyError(f"evaluation is not exactly once: {len(dup)} duplicated {dup[:5]}, "
                                f"{len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}")


def tally(shares: Sequence[ShareResult], num_classes: int) -> dict[tuple[str, str], scoring.Tally]:
    """Top-1/top-5 errors and per-class counts of every result row, over all shares."""
    out: dict[tuple[str, str], scoring.Tally] = {}
    for s in shares:
        for row, t in s.top.items():
            out.setdefault(row, scoring.Tally(num_classes)).add(t, s.labels)
    return out
