"""LyapunovPruner: decisions from the storage alone, recorded for analysis."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

import lepredict
from lepredict import LyapunovPruner, report_spectrum
from lepredict.predictor import ModelFileError, StabilityPredictor
from lepredict.sweep import ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _replay(study, row, steps=(0, 1), tell=True):
    """A trial that reports what a recorded run measured (losses normalised, chance 2.0)."""
    trial = study.ask()
    pruned = False
    for e in steps:
        if f"le{e}_mean" in row and isinstance(row[f"le{e}_mean"], list):
            report_spectrum(trial, {"mean": row[f"le{e}_mean"], "std": row[f"le{e}_std"]}, e)
        if e < len(row["val_loss"]):
            trial.report(row["val_loss"][e] / 2.0, e)
        if trial.should_prune():
            pruned = True
            break
    if tell:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if pruned else None,
                   values=None if pruned else row["final_normalised_loss"])
    return trial, pruned


def test_arguments_are_validated(model_dir):
    with pytest.raises(ValueError, match="n_warmup_steps=-1"):
        LyapunovPruner(model=model_dir, n_warmup_steps=-1)
    with pytest.raises(ValueError, match="threshold=1.5"):
        LyapunovPruner(model=model_dir, threshold=1.5)
    with pytest.raises(ValueError, match="mode="):
        LyapunovPruner(model=model_dir, mode="vibes")
    with pytest.raises(TypeError, match="wrapped_pruner"):
        LyapunovPruner(model=model_dir, wrapped_pruner="median")
    with pytest.raises(ModelFileError, match="No model named 'nope'"):
        LyapunovPruner(model="nope")
    with pytest.raises(ModelFileError, match="No saved predictor"):
        LyapunovPruner(model=model_dir / "missing")


def test_prunes_the_predicted_untrainable_and_records_why(runs, model_dir):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.5,
                                                      n_warmup_steps=0, compare_to_best=False))
    ok = runs[(runs["final_normalised_loss"] < 0.3) & (runs["status"] == "ok")].iloc[0]
    bad = runs[(runs["final_normalised_loss"] > 0.9) & (runs["status"] == "ok")].iloc[0]
    t_ok, pruned_ok = _replay(study, ok)
    t_bad, pruned_bad = _replay(study, bad)
    assert not pruned_ok and pruned_bad
    frozen = study.trials[t_bad.number]
    pred = frozen.user_attrs[f"{ATTR}prediction:0"]
    assert pred["pruned"] and pred["p_trainable"] < 0.5 and pred["source"] == "model:0"
    assert study.trials[t_ok.number].user_attrs[f"{ATTR}prediction:1"]["source"] == "model:1"


def test_no_spectrum_never_pruned_for_stability_and_divergence_pruned_at_once(model_dir):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0,
                                                      n_warmup_steps=0))
    trial = study.ask()
    trial.report(0.9, 0)
    assert not trial.should_prune()  # threshold 1.0 would prune any prediction: none was made
    report_spectrum(trial, {"mean": [0.1, -0.2], "std": [0, 0], "diverged": 1.0}, 1)
    trial.report(0.8, 1)
    assert trial.should_prune()
    other = study.ask()
    other.report(math.inf, 0)
    assert other.should_prune()


def test_prunes_what_cannot_beat_the_best_so_far(runs, model_dir):
    """A trainable configuration whose optimistic predicted final loss is worse than the best
    final value seen is pruned with compare_to_best, and kept without it."""
    mediocre = runs[(runs["final_normalised_loss"] > 0.3) & (runs["final_normalised_loss"] < 0.6)
                    & (runs["status"] == "ok")].iloc[0]
    for compare, expect in ((False, False), (True, True)):
        study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0,
                                                          compare_to_best=compare))
        first, _ = _replay(study, mediocre)
        assert study.trials[first.number].user_attrs[f"{ATTR}prediction:1"]["best_value"] is None
        study.tell(study.ask(), 0.001)  # a far better run finished meanwhile
        trial, pruned = _replay(study, mediocre)
        assert pruned == expect
        record = study.trials[trial.number].user_attrs[f"{ATTR}prediction:1"]
        assert record["final_loss_low"] > 0.001
        assert record["best_value"] == (0.001 if compare else None)


def test_wrapped_pruner_and_warmup(runs, model_dir):
    good = runs[(runs["final_normalised_loss"] < 0.3) & (runs["status"] == "ok")].iloc[0]
    wrapped = optuna.pruners.ThresholdPruner(upper=0.01)  # prunes everything by loss
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, wrapped_pruner=wrapped))
    assert _replay(study, good)[1]
    bad = runs[(runs["final_normalised_loss"] > 0.9) & (runs["status"] == "ok")].iloc[0]
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, n_warmup_steps=5))
    assert not _replay(study, bad)[1]


def test_online_mode_fits_on_the_study_and_is_stateless(runs):
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, pruner=LyapunovPruner(
        mode="online", n_startup_trials=60, refit_every=1000, n_warmup_steps=0))
    finished = runs[runs["status"] == "ok"].iloc[:60]
    for _, row in finished.iterrows():
        _replay(study, row, steps=(0, 1))
    assert all(t.state.name == "COMPLETE" for t in study.trials)  # startup: nothing pruned
    bad = runs[(runs["final_normalised_loss"] > 0.9) & (runs["status"] == "ok")].iloc[-1]
    trial, _ = _replay(study, bad, steps=(0,), tell=False)
    frozen = study.trials[trial.number]
    p_first = frozen.user_attrs[f"{ATTR}prediction:0"]["p_trainable"]
    assert frozen.user_attrs[f"{ATTR}prediction:0"]["source"] == "online:0"
    # A fresh pruner (a restarted worker) reaches the same prediction from the storage alone.
    again = LyapunovPruner(mode="online", n_startup_trials=60, refit_every=1000, n_warmup_steps=0)
    again.prune(study, study.trials[trial.number])
    p_again = study.trials[trial.number].user_attrs[f"{ATTR}prediction:0"]["p_trainable"]
    assert p_again == pytest.approx(p_first)


def test_measure_and_report_restores_training_mode():
    study = optuna.create_study()
    trial = study.ask()
    rnn = torch.nn.GRU(3, 5, batch_first=True).train()
    spec = lepredict.measure_and_report(trial, rnn, torch.randn(4, 12, 3), 0, chance_loss=2.0)
    assert rnn.training and spec.exponents.shape == (4, 5)
    stored = study.trials[0].user_attrs
    assert stored[f"{ATTR}spectrum:0"]["mean"] == pytest.approx(spec.mean.tolist())
    assert stored[f"{ATTR}chance_loss"] == 2.0
    with pytest.raises(TypeError, match="spectrum must be"):
        report_spectrum(trial, [1, 2], 0)


def test_sweep_with_the_lyapunov_pruner(model_dir, tmp_path):
    task = lepredict.tasks.get("digits", mode="row")
    space = lepredict.sweep._parse_space({"params": {"init_scale": {"low": 0.05, "high": 3.0}},
                                          "fixed": {"arch": "gru", "hidden": 8, "lr": 0.01}}, "t")
    study = lepredict.sweep.run_sweep(task, n_trials=3, epochs=2, le_epochs=[0, 1],
                                      storage=f"sqlite:///{tmp_path / 's.db'}", space=space,
                                      pruner=LyapunovPruner(model=model_dir, threshold=0.0),
                                      show_progress_bar=False)
    # threshold 0: never pruned, but every decision is on record
    assert all(f"{ATTR}prediction:1" in t.user_attrs for t in study.trials)


def test_default_threshold_is_the_predictors_own(runs, tmp_path):
    good = runs[(runs["final_normalised_loss"] < 0.3) & (runs["status"] == "ok")].iloc[0]
    model = StabilityPredictor(budget=1).fit(runs)
    for own, pruned in ((1.0, True), (0.0, False)):
        model.prune_threshold_ = own
        model.save(tmp_path / f"m{own}" / "budget-1")
        study = optuna.create_study(pruner=LyapunovPruner(model=tmp_path / f"m{own}",
                                                          compare_to_best=False))
        trial, was_pruned = _replay(study, good)
        assert was_pruned == pruned
        assert study.trials[trial.number].user_attrs[f"{ATTR}prediction:1"]["threshold"] == own
    study = optuna.create_study(pruner=LyapunovPruner(model=model, threshold=0.0,
                                                      compare_to_best=False))
    assert not _replay(study, good)[1]  # an explicit threshold wins


def test_raw_losses_with_chance_loss_predict_as_normalised_ones(runs, model_dir):
    """Reporting raw losses with chance_loss= must give the prediction that reporting the
    normalised losses gives, and be compared with the best on the normalised scale."""
    row = runs[(runs["final_normalised_loss"] < 0.6) & (runs["status"] == "ok")].iloc[0]
    records = []
    for chance in (None, 2.0):
        study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0))
        done = study.ask()
        if chance:
            report_spectrum(done, {"mean": [0.0], "std": [0.0]}, 0, chance_loss=chance)
        study.tell(done, 0.5 * (chance or 1.0))  # best so far: 0.5 normalised
        trial = study.ask()
        for e in (0, 1):
            report_spectrum(trial, {"mean": row[f"le{e}_mean"], "std": row[f"le{e}_std"]}, e,
                            chance_loss=chance)
            trial.report(row["val_loss"][e] / 2.0 * (chance or 1.0), e)
            trial.should_prune()
        records.append(study.trials[trial.number].user_attrs[f"{ATTR}prediction:1"])
    assert records[0]["p_trainable"] == pytest.approx(records[1]["p_trainable"])
    assert records[0]["final_loss_low"] == pytest.approx(records[1]["final_loss_low"])
    assert records[0]["best_value"] == records[1]["best_value"] == pytest.approx(0.5)
