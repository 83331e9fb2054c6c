"""The training recipe's pure parts: the two-stage schedule, the class-balanced loss, the kept epoch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from convert.augment import AUG, describe_augmentation
from convert.options import kept_epoch
from convert.shifts import suite
from convert.train import TrainConfig, balanced_accuracy, class_weights


def test_the_schedule_runs_two_cosine_cycles_each_with_a_warm_up() -> None:
    c = TrainConfig(low_epochs=14, high_epochs=3, tune_epochs=6, lr=0.02, tune_lr=0.004)
    assert c.epochs == 23 and c.first_epochs == 17
    assert [c.size_at(e) for e in (0, 13, 14, 16, 17, 22)] == [128, 128, 224, 224, 224, 224]
    assert not c.tuning(16.99) and c.tuning(17)
    assert c.lr_at(0) == pytest.approx(0.1 * 0.02)  # warm-up starts at a tenth
    assert c.lr_at(1) == pytest.approx(0.02 * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi / 17))))
    assert c.lr_at(17) == pytest.approx(0.1 * 0.004)  # the tune stage warms up again from fresh momentum
    assert c.lr_at(18) == pytest.approx(0.004 * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi / 6))))
    assert c.lr_at(23) == pytest.approx(0.004 * 0.01)
    lrs = [c.lr_at(e / 4) for e in range(4 * 17)]
    assert max(lrs) <= 0.02 and lrs[-1] < lrs[10]


def test_the_first_cycle_config_is_the_recipe_without_the_tune_stage() -> None:
    """The committed weights of the recipe before the tune stage carry exactly this configuration."""
    c = TrainConfig(tune_epochs=6)
    first = c.first_cycle()
    assert "tune_epochs" not in first and "tune_lr" not in first
    assert first == {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if not f.name.startswith("tune")}


def test_class_weights_balance_the_classes() -> None:
    y = np.array([0] * 10 + [1] * 30 + [2] * 60)
    w = class_weights(y, 4).numpy()
    counts = np.bincount(y, minlength=4)
    assert np.allclose((w * counts)[:3], len(y) / 4)  # each present class weighs n / K in all
    assert w[0] > w[1] > w[2] and np.isfinite(w[3])


def test_balanced_accuracy_is_the_mean_recall() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 1])
    assert balanced_accuracy(pred, y) == pytest.approx((1.0 + 0.5) / 2)
    assert np.isnan(balanced_accuracy(pred[:0], y[:0]))


def test_the_kept_epoch_is_the_best_balanced_one_at_the_shipped_size_ties_later() -> None:
    h = [{"epoch": 1, "size": 128, "val_acc": 0.99, "val_bacc": 0.99},
         {"epoch": 2, "size": 224, "val_acc": 0.97, "val_bacc": 0.95, "given": True},
         {"epoch": 3, "size": 224, "val_acc": 0.96, "val_bacc": 0.96},
         {"epoch": 4, "size": 224, "val_acc": 0.98, "val_bacc": 0.96}]
    assert kept_epoch(h, 224) == 4
    assert kept_epoch(h[:2], 224) == 2
    assert kept_epoch(h[:1], 224) is None
    assert kept_epoch([{"epoch": 5, "size": 224, "val_acc": 0.9}], 224) == 5  # older histories: accuracy


def test_the_tune_stage_augments_past_every_moderate_shift() -> None:
    """The shift suite's moderate strengths lie inside the tune stage's augmentation ranges (issue 10)."""
    st = TrainConfig().tune_shift_strength
    moderate = {(s.family, s.variant): s.params["moderate"] for s in suite()}
    gamma = [v for (f, _), v in moderate.items() if f.startswith("brightness")]
    assert all(abs(np.log(g)) <= AUG["log_gamma"] * st for g in gamma) and len(gamma) == 2
    assert moderate[("stain (optical density)", "heavier")] <= AUG["stain"] * st
    assert all(v <= AUG["gains"] * st for (f, _), v in moderate.items() if f.startswith("colour balance"))
    assert all(abs(v) <= AUG["hue_deg"] * st for (f, _), v in moderate.items() if f == "hue")
    assert all(abs(v - 1) <= AUG["saturation"] * st for (f, _), v in moderate.items() if f == "saturation")
    assert moderate[("sensor noise", "")] <= AUG["noise_sd"] * st
    assert all(max(v, 1 / v) <= 1 + AUG["zoom"] * st for (f, _), v in moderate.items() if f == "magnification")
    assert "gamma 0.69-1.45" in describe_augmentation(st)
    # the first cycle's ranges did not reach darker gamma x1.43 (what the tune stage's strength is for)
    assert np.log(max(gamma)) > AUG["log_gamma"] * TrainConfig().shift_strength
