"""Resume on purpose: what the driver decides, before Ray starts, about a run name that may already
have checkpoints (``run.resume``: auto | never | must).

The resolved config is compared with the one the latest checkpoint was trained with. Keys that only
change how long, where or how the run is carried out (``MAY_CHANGE``, each declared so by its field in
pipeline/config.py) are applied on resume and reported; any other difference changes the experiment
and is refused, every differing key named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline.config import ConfigError
from pipeline.schedule import Plateau, should_stop

# How long, with what failure budget, on how many workers, where it is logged and how it is loaded:
# none of these changes what is learnt from the same data in the same order. Each key says so itself,
# with ``resume=True`` in its field (pipeline/config.py); every ``tracking.*`` key does.
MAY_CHANGE = frozenset(k for k, f in config_lib.leaves().items() if f.metadata.get("resume"))


class ResumeError(ConfigError):
    """A resume that would change the experiment, or a ``run.resume`` policy the run folder breaks."""


@dataclass
class Plan:
    """What the driver will do: start a ``new`` run, ``resume`` one, or report it ``complete``."""
    kind: str
    epoch: int = 0                        # epochs completed in the checkpoint resumed from
    step: int = 0                         # optimizer steps completed
    checkpoint: str = ""
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)   # key -> (checkpoint's, now)
    state: dict[str, Any] | None = None


def may_change(key: str) -> bool:
    return key in MAY_CHANGE


def plan(cfg: config_lib.Config, run_folder: str, fingerprint: str) -> Plan:
    """Read the run folder's newest loadable checkpoint and decide; raises ResumeError."""
    state = ckpt.latest_loadable(run_folder)
    where = f"run.name {cfg.run.name!r} ({run_folder})"
    if state is None:
        if cfg.run.resume == "must":
            raise ResumeError(f"run.resume=must but {where} has no checkpoint to resume from")
        return Plan("new")
    if cfg.run.resume == "never":
        raise ResumeError(f"run.resume=never but {where} already has checkpoints (latest: {state['path']}); "
                          f"choose a new run.name, or set run.resume=auto to resume it")
    before, now = config_lib.flatten(ckpt.config_of(state)), config_lib.flatten(cfg)
    differ = {k: (before.get(k), now[k]) for k in now if before.get(k) != now[k]}
    refused = {k: v for k, v in differ.items() if not may_change(k)}
    if state.get("dataset_fingerprint") and state["dataset_fingerprint"] != fingerprint:
        refused["dataset fingerprint"] = (state["dataset_fingerprint"][:12], fingerprint[:12])
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in
                           ((k, *v) for k, v in sorted(refused.items())))
        raise ResumeError(f"{where} cannot resume with a different experiment: {listed}. Start a new run "
                          f"with --set run.name=<new name> (model.init_from={cfg.run.name} starts from its "
                          f"weights), or resume with the values it was trained with")
    changed = {k: v for k, v in differ.items() if may_change(k)}
    done = should_stop(Plateau.from_dict(state["schedule"]), state["epoch"], cfg.schedule) or bool(
        cfg.run.max_steps and state["step"] >= cfg.run.max_steps)
    return Plan("complete" if done else "resume", state["epoch"], state["step"], state["path"], changed, state)


def describe(p: Plan, cfg: config_lib.Config) -> str:
    """One line for people: what this command will do with the run."""
    if p.kind == "new":
        return f"new run {cfg.run.name!r}"
    where = f"epoch {p.epoch}, step {p.step} ({p.checkpoint})"
    if p.kind == "complete":
        return f"run {cfg.run.name!r} is complete: {where}"
    changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(p.changed.items()))
    return f"resume {cfg.run.name!r} at {where}" + (f", with changed {changes}" if changes else "")
