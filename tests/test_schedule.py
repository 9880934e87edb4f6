"""The paper's learning-rate rule (pipeline/schedule.py) as a pure function."""
import math

import pytest

from pipeline.config import ScheduleConfig
from pipeline.schedule import Plateau, improved, plateau_step, should_stop


def run(errors, **kw):
    """Feed a sequence of validation errors; return the states after each epoch."""
    cfg = ScheduleConfig(**kw)
    state, out = Plateau(lr=1e-2), []
    for epoch, err in enumerate(errors):
        state = plateau_step(state, err, epoch, cfg)
        out.append(state)
    return out


def test_improving_keeps_the_rate_and_tracks_the_best():
    states = run([0.9, 0.8, 0.7], patience=1)
    assert [s.lr for s in states] == [1e-2] * 3
    assert states[-1].best == 0.7 and states[-1].best_epoch == 2 and states[-1].bad_epochs == 0


def test_divides_by_ten_after_patience_epochs_without_improvement():
    states = run([0.5, 0.6, 0.55, 0.5], patience=3)
    assert [s.lr for s in states] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3])
    assert states[-1].decays == 1 and states[-1].bad_epochs == 0
    assert states[-1].best == 0.5  # an equal error is no improvement


def test_at_most_max_decays_then_stalled():
    states = run([0.5] + [0.6] * 6, patience=1, max_decays=3)
    assert [s.lr for s in states] == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5])
    assert [s.decays for s in states] == [0, 1, 2, 3, 3, 3, 3]
    assert [s.stalled for s in states] == [False, False, False, False, True, True, True]


def test_improvement_after_a_decay_resets_the_count():
    states = run([0.5, 0.6, 0.4, 0.45], patience=1)
    assert [s.lr for s in states] == pytest.approx([1e-2, 1e-3, 1e-3, 1e-4])
    assert states[2].best == 0.4 and states[2].bad_epochs == 0


def test_min_delta_requires_a_real_improvement():
    states = run([0.5, 0.495, 0.48], patience=1, min_delta=0.01)
    assert states[1].lr == pytest.approx(1e-3) and states[1].best == 0.5
    assert states[2].best == 0.48 and states[2].lr == pytest.approx(1e-3)


def test_nan_is_never_an_improvement():
    states = run([0.5, math.nan], patience=1)
    assert states[1].best == 0.5 and states[1].decays == 1


def test_improved_marks_the_best_checkpoint():
    before = Plateau(lr=1e-2, best=0.5)
    cfg = ScheduleConfig(patience=2)
    assert improved(before, plateau_step(before, 0.4, 3, cfg))
    assert not improved(before, plateau_step(before, 0.5, 3, cfg))


def test_should_stop_after_epochs_or_when_stalled_if_asked():
    cfg = ScheduleConfig(epochs=74)
    assert not should_stop(Plateau(lr=1e-2), 73, cfg) and should_stop(Plateau(lr=1e-2), 74, cfg)
    stalled = Plateau(lr=1e-5, decays=3, stalled=True)
    assert not should_stop(stalled, 10, cfg)
    assert should_stop(stalled, 10, ScheduleConfig(epochs=74, stop_after_max_decays=True))


def test_state_round_trips_through_a_plain_dict():
    s = run([0.5, 0.6, 0.4, 0.7], patience=1)[-1]
    d = s.to_dict()
    assert all(isinstance(v, (int, float, bool)) for v in d.values())
    assert Plateau.from_dict(d) == s


def test_the_papers_schedule_is_the_default():
    cfg = ScheduleConfig()
    assert (cfg.epochs, cfg.factor, cfg.max_decays) == (74, 0.1, 3)
