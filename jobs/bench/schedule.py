"""``python -m jobs.bench schedule``: when does the plateau rule divide the rate, on simulated curves?

Pure python + numpy, no torch, seconds. Each simulated run is a validation top-1 error curve that
reacts to the rule's decays, fed epoch by epoch through the real ``pipeline.schedule.plateau_step``.

The curve model (every figure below is an assumption of the model, stated once here):
- At each rate the noiseless error falls exponentially towards a floor, err(s) = floor + (start -
  floor) exp(-s / tau) - creep * s, s = epochs at this rate. The first rate starts at 80 % after
  epoch 1 with a floor of 38-44 % and tau 5-10 epochs (AlexNet/VGG-like curves at lr 1e-2, where a
  fixed step schedule's first decay at epoch 30 is common practice); each decay lowers the floor by
  7-10, then 1.2-2.5, then 0.1-0.4 points, reached with tau 1.5-4 epochs.
- A decay taken before the curve reached its floor keeps half of the unrealised gap (decaying early
  costs accuracy, as the step-schedule literature finds); that is what makes an early decay a loss.
- Families: ``plateau`` (creep 0: the curve flattens) and ``creep`` (it keeps improving linearly after
  the exponential part: 0.02-0.1 % an epoch (10-50 images of 50,000) at the first rate, 0.01-0.04 %
  at the second, 0.002-0.01 % after; the curve the old rule never decayed).
- Noise: ``none`` (the curve itself); ``binomial``, one epoch's error counted on ImageNet's 50,000 val images (sd ~0.2 % at 30 %
  error); ``0.5%``, Gaussian sd 0.5 % (epoch-to-epoch swings of SGD at a high rate on top of sampling).
- Fine-tune stages (``--finetune``): a converged net restarts at lr 1e-3 at a new scale 1-3 points
  above its old floor, reaches a floor 0.3-1 point below it (tau 2-5 epochs), then two decays.

A decay is *early* when the noiseless curve was still falling by >= 0.2 % an epoch (100 of 50,000
images) when it was taken. ``--grid`` scores every (min_delta, patience, cooldown, smoothing) in ``GRID`` and names
the defaults: three decays in 74 epochs in >= 97 % of runs and early decays in <= 3 % of runs in every
family and noise, then the lowest mean final error.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.config import ScheduleConfig
from pipeline.schedule import Plateau, plateau_step, should_stop

VAL_IMAGES = 50_000
EARLY_SLOPE = 0.002            # a decay while the true curve still falls this much an epoch is early
FAMILIES = ("plateau", "creep")
NOISES = ("none", "binomial", "0.5%")
OLD = {"min_delta": 0.0, "patience": 1, "cooldown": 0, "smoothing": 0.0}   # the rule before the plateau study (docs/training.md)


@dataclass
class Curve:
    """One run's noiseless curve: parameters drawn once, the phase restarted at every decay."""
    floors: list[float]        # floor drop per phase (phase 0: the floor itself)
    taus: list[float]
    creeps: list[float]
    phase: int = 0
    phase_start: int = 0       # epoch index of the first epoch at this phase's rate
    phase_err: float = 0.0     # the true error the phase started from
    floor: float = 0.0

    def true_err(self, epoch: int) -> float:
        s = epoch - self.phase_start + 1
        tau, creep = self.taus[self.phase], self.creeps[self.phase]
        return self.floor + (self.phase_err - self.floor) * math.exp(-s / tau) - creep * s

    def slope(self, epoch: int) -> float:
        """How much the noiseless error falls per epoch at ``epoch`` (a fraction, > 0 = improving)."""
        s = epoch - self.phase_start + 1
        tau = self.taus[self.phase]
        return (self.phase_err - self.floor) / tau * math.exp(-s / tau) + self.creeps[self.phase]

    def decay(self, epoch: int) -> None:
        """The rate was divided after ``epoch``: a new phase starts at the next epoch."""
        now = self.true_err(epoch)
        old_floor = self.floor - self.creeps[self.phase] * (epoch - self.phase_start + 1)
        gap = max(now - old_floor, 0.0)
        self.phase += 1
        self.floor = old_floor - self.floors[self.phase] + 0.5 * gap
        self.phase_start, self.phase_err = epoch + 1, now


def draw(rng: np.random.Generator, family: str, finetune: bool = False) -> Curve:
    u = rng.uniform
    floors = [u(0.38, 0.44), u(0.07, 0.10), u(0.012, 0.025), u(0.001, 0.004)]
    taus = [u(5, 10), u(1.5, 4), u(1.5, 4), u(1.5, 4)]
    creeps = [u(2e-4, 1e-3), u(1e-4, 4e-4), u(2e-5, 1e-4), u(2e-5, 1e-4)]
    if family == "plateau":
        creeps = [0.0] * 4
    if finetune:  # phase 0 is the fine-tune at lr 1e-3, from a converged net at a new scale
        old = u(0.28, 0.32)
        floors, taus = [old - u(0.003, 0.01)] + floors[2:] + [0.0], [u(2, 5)] + taus[2:] + [2.0]
        return Curve(floors, taus, creeps[1:] + [0.0], phase_err=old + u(0.01, 0.03), floor=floors[0])
    return Curve(floors, taus, creeps, phase_err=0.80, floor=floors[0])


def observe(rng: np.random.Generator, p: float, noise: str) -> float:
    p = min(max(p, 0.0), 1.0)
    if noise == "none":
        return p
    if noise == "binomial":
        return rng.binomial(VAL_IMAGES, p) / VAL_IMAGES
    return p + rng.normal(0.0, 0.005)


def run_once(curve: Curve, cfg: ScheduleConfig, rng: np.random.Generator, noise: str) -> dict:
    """Feed one curve through the rule for ``cfg.epochs`` epochs: decay epochs (epochs done when the
    rate was divided), whether each was early, the final noiseless error, the epochs run."""
    state, decays, early, epoch = Plateau(lr=1.0), [], [], 0
    while not should_stop(state, epoch, cfg):
        after = plateau_step(state, observe(rng, curve.true_err(epoch), noise), epoch, cfg)
        if after.decays > state.decays:
            decays.append(epoch + 1)
            early.append(curve.slope(epoch) >= EARLY_SLOPE)
            curve.decay(epoch)
        state, epoch = after, epoch + 1
    return {"decays": decays, "early": early, "final_err": curve.true_err(epoch - 1), "epochs": epoch}


def quartiles(values: list[float]) -> list[float] | None:
    return [float(q) for q in np.percentile(values, [25, 50, 75])] if values else None


def cell(cfg: ScheduleConfig, family: str, noise: str, runs: int, seed: int, finetune: bool = False) -> dict:
    """One (rule, family, noise): the decay epochs' quartiles and the shares that matter."""
    rng = np.random.default_rng([seed, FAMILIES.index(family), NOISES.index(noise)])
    out = [run_once(draw(rng, family, finetune), cfg, rng, noise) for _ in range(runs)]
    full = cfg.max_decays
    return {
        "family": family, "noise": noise, "runs": runs,
        "decay_epochs": [quartiles([r["decays"][i] for r in out if len(r["decays"]) > i]) for i in range(full)],
        "final_lr_epochs": quartiles([r["epochs"] - r["decays"][-1] if len(r["decays"]) == full else 0
                                      for r in out]),
        "all_decays_share": sum(len(r["decays"]) == full for r in out) / runs,
        "never_decayed_share": sum(not r["decays"] for r in out) / runs,
        "early_run_share": sum(any(r["early"]) for r in out) / runs,
        "mean_final_err": float(np.mean([r["final_err"] for r in out])),
        "epochs_run": quartiles([r["epochs"] for r in out]),
        "epochs_run_p90": float(np.percentile([r["epochs"] for r in out], 90)),
    }


def rule(name: str, **kw) -> tuple[str, ScheduleConfig]:
    return name, ScheduleConfig(**kw)


def compare(rules: list[tuple[str, ScheduleConfig]], runs: int, seed: int, finetune: bool = False) -> list[dict]:
    return [{"rule": name, **{k: getattr(cfg, k) for k in ("min_delta", "patience", "cooldown", "smoothing",
                                                            "max_decays", "epochs")},
             **cell(cfg, fam, noise, runs, seed, finetune)}
            for name, cfg in rules for fam in FAMILIES for noise in NOISES]


GRID = {"min_delta": (0.002, 0.003, 0.005, 0.007, 0.01), "patience": (2, 3, 4, 5, 6),
        "cooldown": (0, 1, 2), "smoothing": (0.0, 0.5, 0.7, 0.8)}


def grid(runs: int, seed: int) -> list[dict]:
    """Every combination in ``GRID`` over every family and noise, scored as the module says."""
    scored = []
    for values in itertools.product(*GRID.values()):
        kw = dict(zip(GRID, values))
        cells = [cell(ScheduleConfig(**kw), f, n, runs, seed) for f in FAMILIES for n in NOISES]
        scored.append({**kw, "worst_all_decays_share": min(c["all_decays_share"] for c in cells),
                       "worst_early_run_share": max(c["early_run_share"] for c in cells),
                       "mean_final_err": float(np.mean([c["mean_final_err"] for c in cells]))})
    for s in scored:
        s["eligible"] = s["worst_all_decays_share"] >= 0.97 and s["worst_early_run_share"] <= 0.03
    return sorted(scored, key=lambda s: (not s["eligible"], s["mean_final_err"]))


def fmt(q: list[float] | None) -> str:
    return "never" if q is None else f"{q[1]:.0f} [{q[0]:.0f}-{q[2]:.0f}]"


def markdown(rows: list[dict]) -> str:
    """The docs/training.md table: median [quartiles] of each decay epoch and of the final-rate epochs."""
    head = ("| rule | curve | noise | decay 1 | decay 2 | decay 3 | epochs at final lr | all decays | "
            "never decayed | early decay | final err |\n|" + "---|" * 11)
    lines = [head]
    for r in rows:
        d = [fmt(q) for q in r["decay_epochs"]] + ["-"] * (3 - len(r["decay_epochs"]))
        lines.append(f"| {r['rule']} | {r['family']} | {r['noise']} | {' | '.join(d[:3])} | "
                     f"{fmt(r['final_lr_epochs'])} | {r['all_decays_share']:.0%} | "
                     f"{r['never_decayed_share']:.0%} | {r['early_run_share']:.0%} | {r['mean_final_err']:.2%} |")
    return "\n".join(lines)


def markdown_stage(rows: list[dict]) -> str:
    """The fine-tune table: its two decays, and when the rule ends the stage (stalled at the last rate)."""
    lines = ["| rule | curve | noise | decay 1 | decay 2 | epochs run | 90th percentile | early decay |\n|" + "---|" * 8]
    for r in rows:
        d = [fmt(q) for q in r["decay_epochs"]]
        lines.append(f"| {r['rule']} | {r['family']} | {r['noise']} | {d[0]} | {d[1]} | {fmt(r['epochs_run'])} | "
                     f"{r['epochs_run_p90']:.0f} | {r['early_run_share']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.bench schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="simulated curves per family and noise (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", action="store_true", help="also score every (min_delta, patience, cooldown, "
                                                       "smoothing) in GRID; minutes")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="also simulate a fine-tune stage (lr 1e-3, 2 decays) capped at this many epochs")
    p.add_argument("--grid-runs", type=int, default=100, help="curves per family and noise for --grid")
    p.add_argument("--out", default="", help="also write everything as JSON here")
    args = p.parse_args(argv)
    default = ScheduleConfig()
    rules = [rule("old", **OLD), rule("new", **{k: getattr(default, k) for k in OLD})]
    result = {"rules": compare(rules, args.runs, args.seed)}
    print(markdown(result["rules"]))
    if args.finetune_epochs:
        ft = [(n, replace(c, epochs=args.finetune_epochs, max_decays=2, stop_after_max_decays=True))
              for n, c in rules]
        result["finetune"] = compare(ft, args.runs, args.seed, finetune=True)
        print("\nfine-tune stage, lr 1e-3, 2 decays, stop once the last rate stalls:\n" +
              markdown_stage(result["finetune"]))
    if args.grid:
        result["grid"] = grid(args.grid_runs, args.seed)
        print("\nbest (min_delta, patience, cooldown, smoothing):", json.dumps(result["grid"][:5], indent=1))
    if args.out:
        from storage.files import atomic_write
        atomic_write(Path(args.out), (json.dumps(result, indent=1) + "\n").encode())
    return result


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
