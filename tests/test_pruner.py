"""LyapunovPruner: decisions from the storage alone, recorded for analysis."""

from __future__ import annotations

import itertools
import math
import re
import warnings

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

import lepredict
from lepredict import LyapunovPruner, report_spectrum
from lepredict.predictor import ModelFileError, StabilityPredictor, load
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


def _with(row, **values):
    row = row.copy()
    for key, value in values.items():
        row[key] = value
    return row


def _leaders(study, n=3, steps=range(0, 4), value=0.0):
    """Finished trials that reported the best possible value at every step, so the trials
    replayed next are never the study's leaders (whom the model does not prune)."""
    for _ in range(n):
        trial = study.ask()
        for e in steps:
            trial.report(0.9 if e == 0 else 0.0, e)  # about chance at initialisation
        study.tell(trial, value)


def test_arguments_are_validated(model_dir):
    with pytest.raises(ValueError, match="n_warmup_steps=-1"):
        LyapunovPruner(model=model_dir, n_warmup_steps=-1)
    with pytest.raises(ValueError, match="threshold=1.5"):
        LyapunovPruner(model=model_dir, threshold=1.5)
    with pytest.raises(ValueError, match="risk=0"):
        LyapunovPruner(model=model_dir, risk=0)
    with pytest.raises(ValueError, match="protect_top=2"):
        LyapunovPruner(model=model_dir, protect_top=2)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        LyapunovPruner(model=model_dir, steps_per_epoch=0)
    with pytest.raises(ValueError, match="mode="):
        LyapunovPruner(model=model_dir, mode="vibes")
    with pytest.raises(TypeError, match="wrapped_pruner"):
        LyapunovPruner(model=model_dir, wrapped_pruner="median")
    with pytest.raises(ModelFileError, match="No model named 'nope'"):
        LyapunovPruner(model="nope")
    with pytest.raises(ModelFileError, match="No saved predictor"):
        LyapunovPruner(model=model_dir / "missing")


def test_prunes_the_predicted_untrainable_and_says_why(runs, model_dir, caplog):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.5,
                                                      n_warmup_steps=0, compare_to_best=False))
    _leaders(study)
    good = runs[(runs["final_normalised_loss"] < 0.3) & (runs["status"] == "ok")]
    # The synthetic outcome also hangs on the learning rate, which the predictors never see, so
    # a good run's P(trainable) is a coin flip about 0.5: take the one they rate highest.
    rated = np.min([load(model_dir / f"budget-{b}").predict_proba(good)[:, 1] for b in (0, 1)], 0)
    ok = good.iloc[int(np.argmax(rated))]
    assert rated.max() >= 0.5
    bad = runs[(runs["final_normalised_loss"] > 0.9) & (runs["status"] == "ok")].iloc[0]
    t_ok, pruned_ok = _replay(study, ok)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    optuna.logging.enable_propagation()  # to pytest's handler
    try:
        with caplog.at_level("INFO"):
            t_bad, pruned_bad = _replay(study, bad)
    finally:
        optuna.logging.disable_propagation()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert not pruned_ok and pruned_bad
    pred = study.trials[t_bad.number].user_attrs[f"{ATTR}prediction:0"]
    assert pred["pruned"] and pred["p_trainable"] < 0.5 and pred["source"] == "model:0"
    assert pred["reason"] == f"P(trainable)={pred['p_trainable']:.3f} < 0.500 at epoch 0"
    assert f"Trial {t_bad.number} pruned by LyapunovPruner: P(trainable)=" in caplog.text
    kept = study.trials[t_ok.number].user_attrs[f"{ATTR}prediction:1"]
    assert kept["source"] == "model:1" and not kept["pruned"] and kept["reason"]


def test_leaders_are_not_pruned_by_the_model(runs, model_dir):
    """Threshold 1.0 would prune every prediction: the trial with the best value reported at
    a step beside others is kept all the same, and says why; a trial alone at its step leads
    nothing, and one alone because the others stopped earlier is ranked where they stopped.
    (From step 1: at initialisation every trial is at chance, which no lead rests on.)"""
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0,
                                                      n_warmup_steps=1, protect_top=0.0))
    row = runs[runs["status"] == "ok"].iloc[0]
    first, pruned = _replay(study, row)
    assert pruned  # the first trial of the study, alone at its steps: no one to lead
    record = study.trials[first.number].user_attrs[f"{ATTR}prediction:1"]
    assert (record["rank"], record["reporting"], record["leader"]) == (1, 1, False)
    second, pruned = _replay(study, row, steps=(0, 1, 2, 3))
    assert not pruned  # beside the first at step 1 and at least as good: the leader there
    record = study.trials[second.number].user_attrs[f"{ATTR}prediction:3"]
    assert record["leader"] and record["rank_step"] == 1
    assert record["kept"].startswith("a leader at step 1 (rank 1 of 2)")
    third, pruned = _replay(study, _with(row, val_loss=[v * 1.5 for v in row["val_loss"]]))
    assert pruned  # the same prediction, but behind the leader
    record = study.trials[third.number].user_attrs[f"{ATTR}prediction:1"]
    assert (record["rank"], record["reporting"], record["leader"]) == (3, 3, False)


def test_no_spectrum_never_pruned_for_stability_and_divergence_pruned_at_once(model_dir):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0,
                                                      n_warmup_steps=0))
    trial = study.ask()
    trial.report(0.9, 0)
    assert not trial.should_prune()  # threshold 1.0 would prune any prediction: none was made
    report_spectrum(trial, {"mean": [0.1, -0.2], "std": [0, 0], "diverged": 1.0}, 1)
    trial.report(0.8, 1)
    assert trial.should_prune()
    assert "diverged on 100%" in study.trials[0].user_attrs[f"{ATTR}prediction:1"]["reason"]
    other = study.ask()
    other.report(math.inf, 0)
    assert other.should_prune()
    # A finite loss over 1000 times the chance loss is what train_run labels diverged (and
    # this predictor, which prunes nothing on the model, keeps the trial just below it).
    calm = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0,
                                                     n_warmup_steps=0))
    for loss, pruned in ((1999.0, False), (2001.0, True)):
        finite = calm.ask()
        report_spectrum(finite, {"mean": [0.1, -0.2], "std": [0, 0]}, 0, chance_loss=2.0)
        finite.report(loss, 0)
        assert finite.should_prune() is pruned
        calm.tell(finite, state=optuna.trial.TrialState.PRUNED)
    reason = calm.trials[-1].user_attrs[f"{ATTR}prediction:0"]["reason"]
    assert reason == ("validation loss 2001 at epoch 0 is over 1000 times the chance loss 2: "
                      "diverged")


def _spectrum(row, epoch: int = 0) -> dict:
    return {"mean": row[f"le{epoch}_mean"], "std": row[f"le{epoch}_std"]}


#: Eight exponents falling from 0.1, from one sequence.
_FALLING = {"mean": [0.1 - 0.05 * i for i in range(8)], "std": [0.0] * 8}


def _user_trial(study, row, steps=(0, 1), scale=2.0, chance=2.0, tell=None):
    """A user's loop: raw losses (normalised x ``scale``) with the chance loss declared."""
    trial = study.ask()
    pruned = False
    for e in steps:
        report_spectrum(trial, {"mean": row[f"le{e}_mean"], "std": row[f"le{e}_std"]}, e,
                        chance_loss=chance)
        trial.report(row["val_loss"][e] / 2.0 * scale, e)
        if trial.should_prune():
            pruned = True
            break
    if tell is not None:
        study.tell(trial, tell)
    return trial, pruned


def test_compares_predictions_with_predictions_whatever_the_horizon(runs, model_dir):
    """A study of 40-epoch runs whose best observed final (raw) loss is far below anything a
    10-epoch prediction can reach: the pruner compares the trial's prediction with the best
    trial's prediction at the same budget, never with that observed value."""
    good = runs[(runs["final_normalised_loss"] < 0.3) & (runs["status"] == "ok")]
    poor = runs[(runs["final_normalised_loss"] > 0.9) & (runs["status"] == "ok")
                & (runs["param_lr"] < 1e-3)]
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0,
                                                      protect_top=0.0, risk=0.05))
    _leaders(study, steps=(), value=1.0)  # no reports: they lead at no step, predict nothing
    best, _ = _user_trial(study, good.iloc[0], tell=1e-5)  # the best after 40 epochs
    study.tell(study.ask(), 0.5)  # another finished trial, no report
    similar, pruned_similar = _user_trial(study, good.iloc[1])
    worse, pruned_worse = _user_trial(study, poor.iloc[0])
    rec = study.trials[similar.number].user_attrs[f"{ATTR}prediction:1"]
    assert rec["best_trial"] == best.number and not pruned_similar
    assert rec["p_beats_best"] > 0.05
    rec = study.trials[worse.number].user_attrs[f"{ATTR}prediction:1"]
    assert pruned_worse and rec["p_beats_best"] < 0.05
    assert rec["reason"].startswith("P(beats best)=") and f"trial {best.number}" in rec["reason"]


def test_a_maximising_study_needs_the_loss_beside_its_metric(runs, model_dir):
    row = runs[runs["status"] == "ok"].iloc[0]
    study = optuna.create_study(direction="maximize", pruner=LyapunovPruner(model=model_dir))
    trial = study.ask()
    report_spectrum(trial, _spectrum(row), 0)
    trial.report(0.1, 0)  # an accuracy
    with pytest.raises(ValueError, match="maximises.*val_loss="):
        trial.should_prune()
    trial = study.ask()
    for e in (0, 1):
        report_spectrum(trial, {"mean": row[f"le{e}_mean"]}, e, chance_loss=2.0,
                        val_loss=row["val_loss"][e])
        trial.report(0.5, e)
        trial.should_prune()
    record = study.trials[trial.number].user_attrs[f"{ATTR}prediction:1"]
    assert record["source"] == "model:1" and 0.0 <= record["p_trainable"] <= 1.0
    # A good accuracy does not hide a loss that says the run diverged.
    trial = study.ask()
    report_spectrum(trial, _spectrum(row), 0, chance_loss=2.0, val_loss=1e4)
    trial.report(0.9, 0)
    assert trial.should_prune()
    reason = study.trials[trial.number].user_attrs[f"{ATTR}prediction:0"]["reason"]
    assert reason.startswith("validation loss 1e+04 at epoch 0 is over 1000 times")


def test_raw_losses_without_a_chance_loss_warn_once_and_prune_nothing(runs, model_dir):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0,
                                                      protect_top=0.0))
    _leaders(study, steps=())
    rows = runs[runs["status"] == "ok"].iloc[:3]
    with pytest.warns(UserWarning, match="no chance loss was reported") as caught:
        pruned = [_user_trial(study, row, scale=3.2, chance=None)[1] for _, row in rows.iterrows()]
    assert not any(pruned) and len(caught) == 1
    assert caught[0].filename == __file__  # the loop's own should_prune() line, not lepredict's
    record = study.trials[-1].user_attrs[f"{ATTR}prediction:1"]
    assert not record["pruned"] and "chance_loss=" in record["reason"]
    # A raw binary cross-entropy starts at ln 2 = 0.693 (a user's: 0.70): not about 1 either.
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0,
                                                      protect_top=0.0))
    with pytest.warns(UserWarning, match=r"median loss at initialisation is 0\.7 \(where a raw "
                                         r"binary cross-entropy starts: ln 2 = 0\.693\)"):
        assert not _user_trial(study, _with(rows.iloc[0], val_loss=[0.70, 0.69]),
                               chance=None)[1]
    # Normalised values (about 1 at initialisation) need no declaration: the pruner says once
    # how it reads them (a raw 3-class cross-entropy starts at 1.10, about 1 too) ...
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0,
                                                      protect_top=0.0))
    _leaders(study, steps=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _user_trial(study, rows.iloc[0], scale=1.0, chance=None, tell=0.5)
        assert _user_trial(study, _with(rows.iloc[1], val_loss=[v * 1.2 for v in
                                                               rows.iloc[1]["val_loss"]]),
                           scale=1.0, chance=None)[1]
    said = [str(w.message) for w in caught if "as normalised losses" in str(w.message)]
    assert len(said) == 1 and "chance_loss=1.0 says they are normalised" in said[0]
    # ... and nothing once they are declared normalised.
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0,
                                                      protect_top=0.0))
    _leaders(study, steps=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _user_trial(study, _with(rows.iloc[1], val_loss=[v * 1.2 for v in
                                                               rows.iloc[1]["val_loss"]]),
                           scale=1.0, chance=1.0)[1]
    assert not [w for w in caught if "as normalised losses" in str(w.message)]


def test_reports_at_iterations_with_steps_per_epoch(runs, model_dir):
    row = runs[runs["status"] == "ok"].iloc[0]

    def loop(study):
        trial = study.ask()
        for it in range(0, 201, 50):
            if it % 100 == 0:
                report_spectrum(trial, {"mean": row[f"le{it // 100}_mean"]}, it, chance_loss=2.0)
            trial.report(row["val_loss"][min(it // 100, 1)], it)
            trial.should_prune()
        return study.trials[trial.number].user_attrs

    attrs = loop(optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0,
                                                           steps_per_epoch=100)))
    assert f"{ATTR}prediction:50" not in attrs  # within epoch 0: the warm-up
    assert attrs[f"{ATTR}prediction:100"]["source"] == "model:1"
    assert attrs[f"{ATTR}prediction:200"]["epoch"] == 2
    # Read as epochs, the steps leave gaps: a warning naming steps_per_epoch, no model decision,
    # and never a loss made up for the missing epochs.
    with pytest.warns(UserWarning, match="steps_per_epoch"):
        attrs = loop(optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0)))
    records = [v for k, v in attrs.items() if k.startswith(f"{ATTR}prediction:")]
    assert records and all(not r["pruned"] and "p_trainable" not in r for r in records)


def test_exports_read_a_loops_iteration_steps_by_epoch(runs, model_dir, tmp_path, capsys):
    """A loop reporting every 50 iterations of 100-iteration epochs: the pruner stores its
    steps_per_epoch with each decision, and the export reads the losses and spectra at epochs'
    ends by it, so the predictor scores the exported row as the pruner scored the trial. A
    study without such a pruner gets a note from `lepredict export`, and --steps-per-epoch."""
    from lepredict.cli import main
    from lepredict.predictor import load_models

    row = runs[runs["status"] == "ok"].iloc[0]

    def loop(study):
        trial = study.ask()
        for it in range(0, 201, 50):
            if it % 100 == 0:
                report_spectrum(trial, {"mean": row[f"le{it // 100}_mean"],
                                        "std": row[f"le{it // 100}_std"]}, it, chance_loss=2.0)
            trial.report(row["val_loss"][it // 100], it)
            trial.should_prune()
        study.tell(trial, row["val_loss"][2])

    db = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="it", storage=db, pruner=LyapunovPruner(
        model=model_dir, threshold=0.0, steps_per_epoch=100))
    loop(study)
    own = lepredict.sweep.trials_frame(study).iloc[0]
    assert own["steps_per_epoch"] == 100 and own["steps"] == [0, 50, 100, 150, 200]
    assert own["val_loss"] == list(row["val_loss"][:3]) and own["epochs_completed"] == 2
    assert all(isinstance(own[f"le{e}_mean"], list) for e in range(3)) and "le100_mean" not in own
    record = study.trials[0].user_attrs[f"{ATTR}prediction:100"]
    assert record["steps_per_epoch"] == 100
    model = load_models(model_dir)[record["budget"]]
    assert model.predict_proba(own.to_frame().T)[0, 1] == pytest.approx(record["p_trainable"])
    # The report counts its epochs as epochs, not as report steps.
    panels = {p.key: p for p in lepredict.report.panels(lepredict.sweep.trials_frame(study))}
    assert "no epochs were saved" in panels["epochs"].text
    # Given, steps_per_epoch wins over what the pruner recorded.
    assert "le100_mean" in lepredict.sweep.trials_frame(study, steps_per_epoch=1)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        lepredict.sweep.trials_frame(study, steps_per_epoch=0)

    plain = optuna.create_study(study_name="plain", storage=db)
    loop(plain)
    out = tmp_path / "plain.parquet"
    assert main(["export", "--storage", db, "--study-name", "plain", "-o", str(out)]) == 0
    assert "all multiples of 50" in capsys.readouterr().err
    assert main(["export", "--storage", db, "--study-name", "plain", "-o", str(out),
                 "--steps-per-epoch", "100"]) == 0
    assert "note:" not in capsys.readouterr().err
    exported = pd.read_parquet(out).iloc[0]
    assert list(exported["val_loss"]) == list(row["val_loss"][:3])
    # An epoch length the spectra do not fit: those at no epoch's end are named, left out.
    assert main(["export", "--storage", db, "--study-name", "plain", "-o", str(out),
                 "--steps-per-epoch", "40"]) == 0
    assert "were given at steps that end no epoch (trial 0: 100, with 40 steps per " \
        "epoch) and are left out" in capsys.readouterr().err
    assert main(["analyze", "--data", str(out), "--steps-per-epoch", "100"]) == 2
    assert "an export is already by epoch" in capsys.readouterr().err
    assert main(["export", "--storage", db, "--study-name", "plain", "-o", str(out),
                 "--steps-per-epoch", "0"]) == 2
    assert "--steps-per-epoch must be a positive integer" in capsys.readouterr().err
    # Reported (and measured) every 50 iterations of 60-iteration epochs: the same steps in
    # both, so the warning says to report at epochs' ends or count each report as an epoch.
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, steps_per_epoch=60))
    trial = study.ask()
    with pytest.warns(UserWarning, match=r"given at steps 50 .*report \(and measure\) "
                                         r"at the end of each epoch, step = epoch \* 60, or.*"
                                         r"pass steps_per_epoch=that interval"):
        for e, step in enumerate((0, 50, 100)):
            report_spectrum(trial, {"mean": row[f"le{e}_mean"], "std": row[f"le{e}_std"]},
                            step, chance_loss=2.0)
            trial.report(row["val_loss"][e], step)
            trial.should_prune()


def test_an_export_keeps_epochs_apart_where_a_loop_reported_at_some_epochs_ends_only(
        tmp_path, capsys):
    """Reports every 4 iterations of 10-iteration epochs end epochs 0, 2, 4: the exported
    losses stay at their epochs (gaps between, not shifted into epochs 1 and 2), and a trial no
    pruner judged is read, and described, with the steps per epoch the study's others
    recorded."""
    from lepredict.cli import main
    from lepredict.features import build_features
    from lepredict.records import PREDICTION

    db = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="gaps", storage=db)
    for number in range(3):
        trial = study.ask()
        for step in range(0, 41, 4):
            trial.report(1.0 - 0.01 * step, step)
            if step % 10 == 0:
                report_spectrum(trial, {"mean": [0.1, -0.5], "std": [0.0, 0.0]}, step,
                                chance_loss=1.0)
        if number < 2:  # what LyapunovPruner(steps_per_epoch=10) writes with a decision
            trial.set_user_attr(f"{PREDICTION}20", {"p_trainable": 0.9, "steps_per_epoch": 10})
        study.tell(trial, 0.6)
    frame = lepredict.sweep.trials_frame(study)
    assert list(frame["steps_per_epoch"]) == [10, 10, 10]
    for _, row in frame.iterrows():
        assert row["val_loss"] == [1.0, None, pytest.approx(0.8), None, pytest.approx(0.6)]
        assert row["epochs_completed"] == 4 and row["final_val_loss"] == pytest.approx(0.6)
    features = build_features(frame, budget=2, sets=["loss"]).iloc[2]
    assert features["loss_e1"] == features["loss_e0"] == 1.0
    assert features["loss_e2"] == pytest.approx(0.8)
    out = tmp_path / "gaps.csv"
    assert main(["export", "--storage", db, "--study-name", "gaps", "-o", str(out)]) == 0
    # Read with 10 steps per epoch, trial 2 reports at epochs' ends: no note reading it with 1.
    assert "all multiples of 4" not in capsys.readouterr().err
    exported = lepredict.sweep.read_trials(out)
    assert exported["val_loss"].iloc[2][:3] == [1.0, None, pytest.approx(0.8)]
    # Parquet too keeps a gap a gap (pandas alone reads it as NaN, a diverged run's loss).
    out = tmp_path / "gaps.parquet"
    assert main(["export", "--storage", db, "--study-name", "gaps", "-o", str(out)]) == 0
    exported = lepredict.sweep.read_trials(out)
    assert exported["val_loss"].iloc[2][:3] == [1.0, None, pytest.approx(0.8)]
    assert build_features(exported, budget=2, sets=["loss"]).iloc[2]["loss_e1"] == 1.0
    # The report draws each loss at its epoch.
    xs, ys = lepredict.report._curve(exported.iloc[2], normalised=True)
    assert xs[:3] == [0, 1, 2] and ys[2] == pytest.approx(0.8)
    # A loop with no loss at initialisation reads its first loss there, not the cap.
    late = frame.iloc[2].copy()
    late["val_loss"] = [None, 0.8, 0.7]
    features = build_features(late.to_frame().T, budget=1, sets=["loss"]).iloc[0]
    assert features["loss_e0"] == pytest.approx(0.8) and features["loss_d1"] == 0.0


def test_export_notes_a_loop_whose_last_step_ends_no_epoch(tmp_path, capsys):
    """Steps counted from 0 (epoch * 10 + batch): the last, 39, ends no epoch, so the final
    loss is read at step 30; the export says so and how to number the steps."""
    from lepredict.cli import main
    from lepredict.records import PREDICTION

    db = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="from0", storage=db)
    trial = study.ask()
    for step in range(40):
        trial.report(1.0 - 0.01 * step, step)
        if step % 10 == 0:
            report_spectrum(trial, {"mean": [0.1, -0.5], "std": [0.0, 0.0]}, step,
                            chance_loss=1.0)
    trial.set_user_attr(f"{PREDICTION}10", {"p_trainable": 0.9, "steps_per_epoch": 10})
    study.tell(trial, 0.61)
    assert lepredict.sweep.trials_frame(study).iloc[0]["final_val_loss"] == pytest.approx(0.7)
    out = tmp_path / "from0.csv"
    assert main(["export", "--storage", db, "--study-name", "from0", "-o", str(out)]) == 0
    assert "trial 0 ended at a step that ends no epoch (trial 0: 39, with 10 steps per epoch)" \
        in capsys.readouterr().err


def test_spectra_the_predictor_cannot_use_are_refused(model_dir):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir))
    trial = study.ask()
    lstm = torch.nn.LSTM(2, 6, batch_first=True)
    probe = torch.randn(3, 20, 2)
    with pytest.raises(ValueError, match="3 of the state's 12 exponents.*k=12"):
        lepredict.measure_and_report(trial, lstm, probe, 0, k=3)
    with pytest.raises(ValueError, match="hidden-only map.*lstm_state='full'"):
        lepredict.measure_and_report(trial, lstm, probe, 0, lstm_state="hidden")
    with pytest.raises(ValueError, match="2 of the state's 64 exponents.*k=16"):
        report_spectrum(trial, {"mean": [0.1, -0.1], "n": 64}, 0)
    with pytest.raises(ValueError, match="not the sum of all.*exponent_sum=True"):
        report_spectrum(trial, {"mean": [0.1] * 16, "n": 64}, 0)
    report_spectrum(trial, {"mean": [0.1] * 16, "n": 64, "sum": -30.0}, 1)  # what it needs
    full = lepredict.measure_and_report(trial, lstm, probe, 0)
    stored = study.trials[0].user_attrs[f"{ATTR}spectrum:0"]
    assert stored["n"] == stored["k"] == full.state_size == 12 and stored["convention"] == "full"
    assert stored["sum"] == pytest.approx(sum(stored["mean"]), abs=1e-4)
    # Under another pruner (or one wrapping LyapunovPruner) a partial spectrum is stored as it
    # is, for analysis, with what the predictors would say of it.
    for pruner in (None, optuna.pruners.PatientPruner(LyapunovPruner(model=model_dir), 1)):
        other = optuna.create_study(pruner=pruner).ask()
        with pytest.warns(UserWarning, match=r"stored, but the shipped predictors cannot use "
                                             r"it: the spectrum holds 3 of the state's 12"):
            report_spectrum(other, lepredict.lyapunov_spectrum(lstm, probe, k=3), 0)
        assert other.study.trials[0].user_attrs[f"{ATTR}spectrum:0"]["n"] == 12


def test_measure_and_report_measures_what_the_predictor_uses_and_no_more():
    """16 leading exponents and the sum of all, over the first 4 probe sequences, a warm-up of
    an eighth of the steps; the record says what was measured."""
    trial = optuna.create_study().ask()
    gru = torch.nn.GRU(3, 40, num_layers=2)  # sequence-first: the probe is (T, B, input)
    probe = torch.randn(32, 12, 3)
    spec = lepredict.measure_and_report(trial, gru, probe, 0)
    assert spec.exponents.shape == (4, 16) and spec.steps == 32 - 4
    stored = trial.study.trials[0].user_attrs[f"{ATTR}spectrum:0"]
    assert (stored["n"], stored["k"], stored["trajectories"]) == (80, 16, 4)
    reference = lepredict.lyapunov_spectrum(gru, probe[:, :4], warmup=4, dtype=torch.float64)
    # The GRU's sum from the LUs of every 2nd of the 28 averaged steps, close to every step's.
    assert spec.sum_every == 2 and stored["sum_every"] == 2  # and the record says so
    from lepredict.sweep import trials_frame
    exported = trials_frame(trial.study).iloc[0]
    assert (exported["le0_sum_every"], exported["le0_trajectories"]) == (2, 4)  # and the exports
    strided = lepredict.lyapunov_spectrum(gru, probe[:, :4], warmup=4, dtype=torch.float64, k=16,
                                          exponent_sum=True, sum_every=2)
    assert stored["sum"] == pytest.approx(float(strided.exponent_sum.mean()), rel=1e-4)
    assert stored["sum"] == pytest.approx(float(reference.exponent_sum.mean()), abs=5e-3 * 80)
    assert np.allclose(stored["mean"][:4], reference.mean[:4].numpy(), atol=0.05)
    # Overrides go to the engine; a network smaller than 16 gets its whole spectrum.
    spec = lepredict.measure_and_report(trial, gru, probe, 1, k=None, warmup=0)
    assert spec.exponents.shape == (4, 80)
    small = lepredict.measure_and_report(optuna.create_study().ask(), torch.nn.RNN(3, 5), probe, 2)
    assert small.exponents.shape == (4, 5)
    # probe_size takes more of the probe (None: all of it), and the record counts them.
    for step, (size, used) in enumerate(((8, 8), (None, 12), (100, 12)), start=3):
        spec = lepredict.measure_and_report(trial, gru, probe, step, probe_size=size)
        assert spec.exponents.shape == (used, 16)
        assert trial.study.trials[0].user_attrs[f"{ATTR}spectrum:{step}"]["trajectories"] == used
    for size in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"a positive int \(None: all\), got probe_size="):
            lepredict.measure_and_report(trial, gru, probe, 3, probe_size=size)


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


def test_a_constant_online_predictor_is_no_prediction(runs, model_dir):
    """On a few finished trials the online trees cannot split (20 runs a leaf): one P for every
    trial. mode="both" then decides on the given predictor alone, not on a mean with that
    constant (which lifted trials at chance above the cut-offs), and says so once."""
    finished = runs[runs["status"] == "ok"].iloc[:12]
    bad = runs[(runs["final_normalised_loss"] > 0.9) & (runs["status"] == "ok")].iloc[-1]
    decisions = {}
    for mode in ("model", "both"):
        study = optuna.create_study(pruner=LyapunovPruner(
            model=model_dir, mode=mode, n_startup_trials=10, refit_every=1, n_warmup_steps=0,
            threshold=0.0, risk=None, protect_top=0.0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _, row in finished.iterrows():
                _replay(study, row, steps=(0, 1))
            trial, _ = _replay(study, bad, steps=(0, 1), tell=False)
            _replay(study, bad, steps=(0, 1), tell=True)
        decisions[mode] = study.trials[trial.number].user_attrs[f"{ATTR}prediction:1"]
        said = [str(w.message) for w in caught if "online predictor" in str(w.message)]
        assert len(said) == (mode == "both"), [str(w.message)[:150] for w in caught]
        assert not [w for w in caught if "classifier gives all" in str(w.message)]
    assert said[0].startswith("LyapunovPruner's online predictor, fitted on the 10 finished")
    assert "the given predictor decides alone" in said[0]
    assert decisions["both"]["source"] == "model:1"
    assert decisions["both"]["p_trainable"] == pytest.approx(decisions["model"]["p_trainable"])


def test_measure_and_report_restores_training_mode():
    study = optuna.create_study()
    trial = study.ask()
    rnn = torch.nn.GRU(3, 5, batch_first=True).train()
    spec = lepredict.measure_and_report(trial, rnn, torch.randn(4, 12, 3), 0, chance_loss=2.0)
    assert rnn.training and spec.exponents.shape == (4, 5) and spec.state_size == 5
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
        _leaders(study)
        trial, was_pruned = _replay(study, good)
        assert was_pruned == pruned
        assert study.trials[trial.number].user_attrs[f"{ATTR}prediction:1"]["threshold"] == own
    study = optuna.create_study(pruner=LyapunovPruner(model=model, threshold=0.0,
                                                      compare_to_best=False))
    _leaders(study)
    assert not _replay(study, good)[1]  # an explicit threshold wins


def test_raw_losses_with_chance_loss_predict_as_normalised_ones(runs, model_dir):
    """Raw losses with chance_loss= give the prediction normalised losses give."""
    row = runs[(runs["final_normalised_loss"] < 0.6) & (runs["status"] == "ok")].iloc[0]
    records = []
    for chance in (1.0, 2.0, 7.5):
        study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0))
        trial, _ = _user_trial(study, row, scale=chance, chance=chance)
        records.append(study.trials[trial.number].user_attrs[f"{ATTR}prediction:1"])
    for other in records[1:]:
        assert other["p_trainable"] == pytest.approx(records[0]["p_trainable"])
        assert other["final_loss"] == pytest.approx(records[0]["final_loss"])


def test_a_spectrum_without_its_spread_is_stored_with_a_warning(runs):
    """No "std": stored as zeros (one sequence's), which the predictor reads as a spread, so
    report_spectrum says so; given, nothing is said."""
    row = runs[runs["status"] == "ok"].iloc[0]
    trial = optuna.create_study().ask()
    with pytest.warns(UserWarning, match=r'no "std" .* stored as 0, as from a single sequence'):
        report_spectrum(trial, {"mean": row["le0_mean"]}, 0)
    assert trial.user_attrs[f"{ATTR}spectrum:0"]["std"] == [0.0] * len(row["le0_mean"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_spectrum(trial, {"mean": row["le1_mean"], "std": row["le1_std"]}, 1)


def test_a_study_with_the_pruner_pickles_and_decides_the_same(runs, model_dir):
    """joblib.dump of an in-memory study (Optuna's FAQ) and copy.deepcopy of the pruner work:
    the copy starts without this process's caches and decides as the original does."""
    import copy
    import pickle

    row = runs[runs["status"] == "ok"].iloc[0]
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0))
    _user_trial(study, row)
    restored = pickle.loads(pickle.dumps(study))
    assert isinstance(copy.deepcopy(study.pruner), LyapunovPruner)
    decided = []
    for s in (study, restored):
        trial, _ = _user_trial(s, row)
        decided.append(s.trials[trial.number].user_attrs[f"{ATTR}prediction:1"])
    assert decided[0] == decided[1] and "p_trainable" in decided[0]


def test_a_chance_loss_of_another_loss_warns_once(runs, model_dir):
    """A loss at initialisation 25 times the chance loss given (the squared error's chance loss
    of one-hot targets, a cross-entropy reported) puts every loss on a wrong scale: the pruner
    says so once per study and decides nothing on the model for such trials; a chance loss of
    the loss reported says nothing."""
    row = runs[runs["status"] == "ok"].iloc[0]
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _user_trial(study, row, scale=2.0, chance=2.0)
    assert not [w for w in caught if "times the chance_loss" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _user_trial(study, row, scale=2.0, chance=row["val_loss"][0] / 25)
    said = [str(w.message) for w in caught if "times the chance_loss" in str(w.message)]
    assert len(said) == 1 and "prunes nothing on the model" in said[0]
    assert "trial 1 has a loss at epoch 0 (initialisation) 25 times" in said[0]
    assert "kind='classification'" in said[0]
    assert "p_trainable" in study.trials[0].user_attrs[f"{ATTR}prediction:1"]
    for trial in study.trials[1:]:
        decision = trial.user_attrs[f"{ATTR}prediction:1"]
        assert not decision["pruned"] and "p_trainable" not in decision
    # Far below the chance loss at "epoch 0" is more likely a loop that trained first.
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0))
    with pytest.warns(UserWarning, match=r"0\.3 times the chance_loss.*if epoch 0 was reported "
                                         r"after training, report \(and measure\) it before"):
        _user_trial(study, row, scale=2.0, chance=row["val_loss"][0] / 0.3)


# -- hyperparameters for the screening predictor ------------------------------------------------

GOOD_HPARAMS = {"arch": "gru", "hidden": 16, "layers": 1, "lr": 0.01, "optimizer": "adam",
                "batch_size": 32, "init": "uniform", "init_scale": 0.5}


def test_report_spectrum_stores_hparams_once_and_validates_them():
    study = optuna.create_study()
    trial = study.ask()
    spectrum = {"mean": [0.1, -0.3]}
    with pytest.raises(ValueError, match=r"Unknown hparams \['learning_rate'\].*known: arch, "):
        report_spectrum(trial, spectrum, 0, hparams={"learning_rate": 0.01})
    with pytest.raises(ValueError, match=r"hparams\['optimizer'\] must be one of 'sgd', 'adam', "
                                         r"'rmsprop'.*got 'lbfgs'"):
        report_spectrum(trial, spectrum, 0, hparams={"optimizer": "lbfgs"})
    with pytest.raises(ValueError, match=r"hparams\['lr'\] must be a finite number > 0"):
        report_spectrum(trial, spectrum, 0, hparams={"lr": -1e-3})
    with pytest.raises(ValueError, match=r"hparams\['hidden'\] must be an int > 0"):
        report_spectrum(trial, spectrum, 0, hparams={"hidden": 12.5})
    # A refused call stores nothing, not even its spectrum.
    assert study.trials[0].user_attrs == {}
    report_spectrum(trial, spectrum, 0, hparams={**GOOD_HPARAMS, "optimizer": "Adam",
                                                 "hidden": 16.0})
    stored = study.trials[0].user_attrs[f"{ATTR}hparams"]
    assert stored == GOOD_HPARAMS and isinstance(stored["hidden"], int)
    report_spectrum(trial, spectrum, 1, hparams={"lr": 0.01, "clip": 1.0})  # same lr, a new key
    assert study.trials[0].user_attrs[f"{ATTR}hparams"] == {**GOOD_HPARAMS, "clip": 1.0}
    # The values a trial started with stand (a learning-rate schedule must not end the trial).
    with pytest.warns(UserWarning, match=r"hparams lr=0\.1 differ from what trial 0 stored "
                                         r"first \(lr=0\.01\), which are kept"):
        report_spectrum(trial, spectrum, 2, hparams={"lr": 0.1})
    assert study.trials[0].user_attrs[f"{ATTR}hparams"]["lr"] == 0.01
    assert f"{ATTR}spectrum:2" in study.trials[0].user_attrs


def test_measure_and_report_reads_arch_hidden_and_layers_from_the_module():
    study = optuna.create_study()
    trial = study.ask()
    gru = torch.nn.GRU(3, 20, num_layers=2, batch_first=True)
    probe = torch.randn(4, 12, 3)
    lepredict.measure_and_report(trial, gru, probe, 0, hparams={"lr": 3e-3, "optimizer": "sgd",
                                                                 "batch_size": 16})
    assert study.trials[0].user_attrs[f"{ATTR}hparams"] == {
        "arch": "gru", "hidden": 20, "layers": 2, "lr": 3e-3, "optimizer": "sgd",
        "batch_size": 16}
    with pytest.raises(ValueError, match=r"hparams arch='lstm' contradict the module \(GRU with "
                                         r"arch='gru'\)"):
        lepredict.measure_and_report(trial, gru, probe, 1, hparams={"arch": "lstm"})
    other = optuna.create_study().ask()
    lepredict.measure_and_report(other, torch.nn.LSTM(3, 6), probe.transpose(0, 1), 0)
    assert other.study.trials[0].user_attrs[f"{ATTR}hparams"] == {"arch": "lstm", "hidden": 6,
                                                                  "layers": 1}


@pytest.fixture(scope="module")
def screening(runs, tmp_path_factory):
    """Predictors reading hyperparameters as the shipped "screening" ones do: with the
    spectrum at initialisation, and with the spectra and losses after an epoch."""
    out = tmp_path_factory.mktemp("screening")
    for budget, sets in ((0, ("hparams", "spectrum")), (1, ("hparams", "spectrum", "loss"))):
        StabilityPredictor(budget=budget, feature_sets=sets, interval=False).fit(runs).save(
            out / f"budget-{budget}")
    return out


def _hparams_trial(study, row, hparams, step=1):
    """A trial reporting ``row``'s spectra and raw losses for epochs 0 and 1 with ``hparams``;
    the pruner's record at ``step``."""
    trial = study.ask()
    for e in (0, 1):
        report_spectrum(trial, {"mean": row[f"le{e}_mean"], "std": row[f"le{e}_std"]}, e,
                        chance_loss=2.0, hparams=hparams)
        trial.report(row["val_loss"][e], e)
        trial.should_prune()
    return study.trials[trial.number].user_attrs.get(f"{ATTR}prediction:{step}")


def test_a_screening_predictor_reads_the_declared_hparams_not_trial_params(runs, screening,
                                                                         model_dir):
    row = runs[(runs["final_normalised_loss"] < 0.3) & (runs["status"] == "ok")].iloc[0]
    arch = {**GOOD_HPARAMS, "arch": row["param_arch"], "hidden": int(row["param_hidden"])}
    study = optuna.create_study(pruner=LyapunovPruner(model=screening, threshold=0.0,
                                                      compare_to_best=False, n_warmup_steps=0))
    p = {lr: _hparams_trial(study, row, {**arch, "lr": lr}, step=0)["p_trainable"]
         for lr in (1e-2, 0.8)}
    # The synthetic runs train only for 1e-3 < lr < 0.1: the same spectrum, another lr.
    assert p[1e-2] > p[0.8] + 0.1
    # The trial's own params (its own names) are not read: the same lr, another trial.params.
    trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1.0)})
    assert trial.params["learning_rate"] != 1e-2
    for e in (0, 1):
        report_spectrum(trial, {"mean": row[f"le{e}_mean"], "std": row[f"le{e}_std"]}, e,
                        chance_loss=2.0, hparams={**arch, "lr": 1e-2})
        trial.report(row["val_loss"][e], e)
        trial.should_prune()
    record = study.trials[trial.number].user_attrs[f"{ATTR}prediction:0"]
    assert record["source"] == "model:0" and record["p_trainable"] == pytest.approx(p[1e-2])
    # The default kind of predictor (spectra and losses) predicts as before, whatever hparams.
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0,
                                                      compare_to_best=False))
    plain = _hparams_trial(study, row, None)["p_trainable"]
    assert _hparams_trial(study, row, {**arch, "lr": 0.8})["p_trainable"] == pytest.approx(plain)


def test_a_screening_predictor_keeps_a_trial_without_hparams_and_says_how(runs, screening):
    row = runs[(runs["final_normalised_loss"] > 0.9) & (runs["status"] == "ok")].iloc[0]
    study = optuna.create_study(pruner=LyapunovPruner(model=screening, threshold=1.0,
                                                      protect_top=0.0))
    _leaders(study)
    with pytest.warns(UserWarning, match=r"trial 3 has not given the hyperparameters arch, "
                                         r"hidden, layers, lr, optimizer, batch_size, which"
                                         r".*report_spectrum\(trial, spectrum, step, "
                                         r"hparams=") as caught:
        records = [_hparams_trial(study, row, None) for _ in range(2)]
    assert len(caught) == 1  # once per study
    assert all(not r["pruned"] and "p_trainable" not in r and "hparams=" in r["reason"]
               for r in records)
    partial = _hparams_trial(study, row, {"lr": 0.01, "optimizer": "adam", "init": "gain"})
    assert not partial["pruned"] and "arch, hidden, layers, batch_size, init_scale," in \
        partial["reason"]
    # With them, threshold 1.0 prunes: the model decided.
    full = _hparams_trial(study, row, {**GOOD_HPARAMS, "arch": row["param_arch"]})
    assert full["pruned"] and full["p_trainable"] < 1.0


def test_exports_keep_a_loops_own_params_apart_from_the_declared_hparams(runs):
    """A loop's parameters are exported as Optuna holds them (``param_*``) and what it declared
    to lepredict apart (``hparam_*``): the names may coincide and mean other things (here the
    loop's ``hidden`` is its head's width, its ``lr`` a schedule's last value). Features,
    hold-outs and the predictor read the declared ones."""
    from lepredict.evaluation import holdout_mask
    from lepredict.features import build_features

    row = runs[runs["status"] == "ok"].iloc[0]
    study = optuna.create_study()
    trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1.0),
                       "hidden": optuna.distributions.IntDistribution(50, 500),
                       "lr": optuna.distributions.FloatDistribution(0.5, 0.9)})
    report_spectrum(trial, _spectrum(row), 0,
                    hparams={"lr": 0.02, "init": "default", "hidden": 8, "arch": "gru"})
    trial.report(1.0, 0)
    study.tell(trial, 0.5)
    frame = lepredict.sweep.trials_frame(study)
    own = frame.iloc[0]
    assert own["param_hidden"] == trial.params["hidden"] >= 50 and own["hparam_hidden"] == 8
    assert own["param_lr"] == trial.params["lr"] >= 0.5 and own["hparam_lr"] == 0.02
    assert own["param_learning_rate"] == trial.params["learning_rate"]
    assert own["hparam_init"] == "default" and "param_init" not in frame
    features = build_features(frame, budget=0, sets=["hparams"]).iloc[0]
    assert features["hp_log2_hidden"] == 3.0 and features["hp_arch_gru"] == 1.0
    assert features["hp_log10_lr"] == pytest.approx(math.log10(0.02))
    assert holdout_mask(frame, "hidden<16").tolist() == [True]
    assert holdout_mask(frame, "arch=gru").tolist() == [True]


def test_a_retry_shows_only_what_it_reported_itself(runs):
    """Optuna's retry callbacks copy the failed attempt's user attributes into the retry: the
    attempt's spectra, losses and decisions of epochs the retry never reached are neither
    exported as the retry's nor read by the pruner deciding for it."""
    row = runs[runs["status"] == "ok"].iloc[0]
    study = optuna.create_study(pruner=LyapunovPruner(threshold=0.0))
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}

    def epochs(trial, last):
        for e in range(last + 1):
            report_spectrum(trial, {"mean": row[f"le{e}_mean"], "std": row[f"le{e}_std"]}, e,
                            chance_loss=row["chance_loss"], val_loss=row["val_loss"][e])
            trial.report(row["val_loss"][e], e)
            trial.should_prune()

    attempt = study.ask(dist)
    epochs(attempt, 3)
    study.tell(attempt, state=optuna.trial.TrialState.FAIL)  # a kill, say
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks the callback experimental
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    retry(study, study.trials[0])
    again = study.ask()
    assert again.user_attrs[f"{ATTR}spectrum:3"] is not None  # inherited
    epochs(again, 1)
    frame = lepredict.sweep.trials_frame(study)
    first, second = frame.iloc[0], frame.iloc[1]
    assert first["predicted_at"] == 3 and np.isfinite(first["le3_mean"]).all()
    assert second["predicted_at"] == 1
    assert all(isinstance(second[f"le{e}_mean"], float) and math.isnan(second[f"le{e}_mean"])
               for e in (2, 3))
    assert second["val_loss"] == list(row["val_loss"][:2])
    # The pruner reads the retry's own epochs: at epoch 1 its latest is epoch 1's.
    view = lepredict.pruner._TrialView(study, study.trials[1], 1)
    assert sorted(view.spectra) == [0, 1] and sorted(view.losses) == [0, 1]


def test_a_sweep_gives_a_screening_predictor_its_hparams(screening, tmp_path):
    task = lepredict.tasks.get("digits", mode="row")
    space = lepredict.sweep._parse_space({"params": {"lr": {"low": 1e-3, "high": 0.1}},
                                          "fixed": {"arch": "gru", "hidden": 8}}, "t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = lepredict.sweep.run_sweep(task, n_trials=2, epochs=2, le_epochs=[0, 1],
                                          storage=f"sqlite:///{tmp_path / 's.db'}", space=space,
                                          pruner=LyapunovPruner(model=screening, threshold=0.0),
                                          show_progress_bar=False)
    assert not [w for w in caught if "hparams=" in str(w.message)]
    for t in study.trials:
        assert t.user_attrs[f"{ATTR}prediction:1"]["source"] == "model:1"
        assert 0.0 <= t.user_attrs[f"{ATTR}prediction:1"]["p_trainable"] <= 1.0


def test_a_trial_is_ranked_last_where_its_own_value_was_not_finite():
    from lepredict.pruner import _rank_at

    study = optuna.create_study()
    first = study.ask()
    for step in (0, 1):
        first.report(1.0, step)
    study.tell(first, 1.0)
    second = study.ask()
    for step, value in ((0, 0.5), (1, math.nan), (2, 5.0)):
        second.report(value, step)
    trials = study.get_trials(deepcopy=False)
    # Alone at step 2: ranked at step 1, the last step the first trial reached, and last there.
    assert _rank_at(study, trials, trials[1], 2) == (2, 2, 1)
    assert _rank_at(study, trials, trials[1], 0) == (1, 2, 0)


# -- loops that do not feed the pruner what it reads ---------------------------------------------


def _unfed_trial(study, steps=(0, 1, 2), spectra=(), report=True, val_loss=None, chance=1.0):
    """A trial of a loop that stores ``spectra`` at those steps and, if ``report``, reports a
    normalised loss at ``steps``; whether it was pruned. ``val_loss``: one value, or one per
    step."""
    trial = study.ask()
    for step in sorted({*steps, *spectra}):
        if step in spectra:
            loss = val_loss.get(step) if isinstance(val_loss, dict) else val_loss
            report_spectrum(trial, _FALLING, step, chance_loss=chance, val_loss=loss)
        if report and step in steps:
            trial.report(0.9, step)
        if trial.should_prune():
            return trial, True
    return trial, False


def test_a_loop_that_stores_no_spectrum_is_warned_once_naming_the_call(model_dir):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at initialisation a spectrum may yet come: no warning
        _unfed_trial(study, steps=(0,))
    with pytest.warns(UserWarning, match=r"prunes nothing on the model.*trial 1 reported values "
                                         r"up to step 1 but stored no spectrum.*lepredict\."
                                         r"measure_and_report\(trial, rnn, probe, step\)") \
            as caught:
        pruned = [_unfed_trial(study)[1] for _ in range(2)]
    assert len(caught) == 1 and caught[0].filename == __file__  # the loop's should_prune()
    assert not any(pruned)
    record = study.trials[-1].user_attrs[f"{ATTR}prediction:2"]
    assert not record["pruned"] and "stored no spectrum" in record["reason"]
    # A loop with spectra that leaves out epoch 0 (the initialisation) cannot be read either.
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0))
    with pytest.warns(UserWarning, match=r"trial 0 stored no spectrum at epoch 0, which every "
                                         r"predictor reads"):
        assert not _unfed_trial(study, spectra=(1, 2))[1]
    # ... nor one that reports its losses from epoch 1 only.
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=1.0))
    with pytest.warns(UserWarning, match=r"trial 0 reported no value at epoch 0.*"
                                         r"trial\.report\(loss, 0\)"):
        assert not _unfed_trial(study, steps=(1, 2), spectra=(0, 1, 2))[1]


def test_a_trial_without_spectra_is_left_to_the_wrapped_pruner_without_a_warning(model_dir):
    """A study may mix recurrent networks with models that have no spectrum: the wrapped
    pruner judges those, as asked. Spectra with a gap are still a loop's mistake."""
    study = optuna.create_study(pruner=LyapunovPruner(
        model=model_dir, threshold=1.0, wrapped_pruner=optuna.pruners.NopPruner()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _unfed_trial(study)[1]
    with pytest.warns(UserWarning, match="stored no spectrum at epoch 0"):
        _unfed_trial(study, spectra=(1, 2))


def test_spectra_without_trial_report_warn_once_naming_it(model_dir):
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the spectrum at initialisation may precede the report
        _unfed_trial(study, steps=(0,), spectra=(0,), report=False)
    with pytest.warns(UserWarning, match=r"prunes nothing in study .*: trial 1 stored spectra at "
                                         r"steps 0, 1 but reported no value.*call trial\.report"
                                         r"\(loss, step\)") as caught:
        for _ in range(2):
            assert not _unfed_trial(study, spectra=(0, 1, 2), report=False)[1]
    assert len(caught) == 1 and caught[0].filename == __file__


def test_spectra_given_at_epochs_while_losses_are_at_iterations_warn_once(model_dir):
    """steps_per_epoch=5 with losses at iterations 0, 5, 10 and spectra at epochs 0, 1, 2: the
    spectra at steps 1 and 2 are at no epoch's end and never read; the pruner says so and how
    to number them, and reads them once numbered as documented."""
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0,
                                                      steps_per_epoch=5))
    with pytest.warns(UserWarning, match=r"no spectrum or val_loss= given at steps 1 \(trial 0.*"
                                         r"steps_per_epoch=5.*steps 0, 5, 10\.\.\..*the step you "
                                         r"give trial\.report \(epoch \* steps_per_epoch\)") \
            as caught:
        for _ in range(2):
            trial = study.ask()
            for epoch in range(3):
                report_spectrum(trial, _FALLING, epoch,
                                chance_loss=1.0)
                trial.report(0.9, 5 * epoch)
                trial.should_prune()
    assert len(caught) == 1
    # Not a decision on epoch 0's spectrum as if it were the latest: none on the model at all.
    record = study.trials[0].user_attrs[f"{ATTR}prediction:10"]
    assert not record["pruned"] and "budget" not in record and "steps 1" in record["reason"]
    trial = study.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(3):
            report_spectrum(trial, _FALLING, 5 * epoch,
                            chance_loss=1.0)
            trial.report(0.9, 5 * epoch)
            trial.should_prune()
    assert study.trials[trial.number].user_attrs[f"{ATTR}prediction:10"]["budget"] == 1


def test_spectra_at_the_last_step_of_each_epoch_are_no_decision_on_epoch_0(model_dir):
    """Global steps counted from 0, measured at each epoch's last step (999, 1999 of 1000-step
    epochs): those spectra are no epoch's end, and a decision on the step-0 spectrum alone as
    if it were the latest would be the initialisation predictor's; the pruner makes none."""
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.99,
                                                      steps_per_epoch=10))
    trial = study.ask()
    with pytest.warns(UserWarning, match=r"given at steps 9 \(trial 0"):
        for step in (0, 9, 19, 29):
            report_spectrum(trial, {"mean": [0.3 - 0.05 * i for i in range(8)]}, step,
                            chance_loss=1.0)
            trial.report(0.99, step)
            assert not trial.should_prune()
    records = {k: v for k, v in study.trials[0].user_attrs.items()
               if k.startswith(f"{ATTR}prediction:")}
    assert records and all("budget" not in r and not r["pruned"] for r in records.values())
    # A spectrum logged past every budget the predictors read changes no decision.
    trial = study.ask()
    for step in (0, 10, 20, 30, 40, 45, 50):
        if step <= 30 or step == 45:
            report_spectrum(trial, {"mean": [0.3 - 0.05 * i for i in range(8)]}, step,
                            chance_loss=1.0)
        if step % 10 == 0:
            trial.report(0.99, step)
            trial.should_prune()
    assert study.trials[1].user_attrs[f"{ATTR}prediction:50"].get("budget", -1) >= 1


# -- ties ------------------------------------------------------------------------------------------


def test_trials_at_chance_do_not_lead(model_dir):
    """A loss exactly at chance for every trial of a maximising study: the model prunes each
    (threshold 1.0). Before, every tied trial ranked first and was kept; then the first still
    going at that value led (trial 1, ranked 1 of 2 beside pruned trial 0); a trial that has
    learned nothing leads nothing now, whatever its rank."""
    study = optuna.create_study(direction="maximize", pruner=LyapunovPruner(
        model=model_dir, threshold=1.0, protect_top=0.5, n_warmup_steps=0))
    states = []
    for _ in range(5):
        trial, pruned = _unfed_trial(study, steps=(0, 1), spectra=(0, 1), val_loss=1.0)
        states.append(pruned)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if pruned else None,
                   values=None if pruned else 0.1)
    assert states == [True] * 5
    records = [t.user_attrs[f"{ATTR}prediction:0"] for t in study.trials]
    assert not records[1]["leader"] and (records[1]["rank"], records[1]["reporting"]) == (1, 2)
    # (Every trial before it pruned, trial 4 is the first still going at the tie: rank 1.)
    assert not records[4]["leader"] and (records[4]["rank"], records[4]["reporting"]) == (1, 5)


def test_a_leader_below_chance_is_kept_one_at_chance_is_not(model_dir):
    """Of two trials the model would prune, the better one leads (protect_top) only if its
    loss is at most 99% of the chance loss: one predicting about the class frequencies (a
    user's study: 0.998 of it at majority-class accuracy) has learned nothing yet. Values read
    as normalised without a chance loss are held to a chance of 1."""
    cases = ((0.6, True), (0.98, True), (0.998, False), (1.0, False), (1.3, False))
    for (loss, kept), chance in itertools.product(cases, (1.0, None)):
        study = optuna.create_study(pruner=LyapunovPruner(
            model=model_dir, threshold=1.0, protect_top=0.5, n_warmup_steps=0))
        worse, _ = _unfed_trial(study, steps=(0,), spectra=(0,), val_loss=1.4, chance=chance)
        study.tell(worse, state=optuna.trial.TrialState.PRUNED)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LyapunovPruner reads the values")
            trial, pruned = _unfed_trial(study, steps=(0,), spectra=(0,), val_loss=loss,
                                         chance=chance)
        record = trial.study._storage.get_trial(trial._trial_id).user_attrs[
            f"{ATTR}prediction:0"]
        assert (record["rank"], record["reporting"]) == (1, 2)
        assert pruned is not kept and record["leader"] is kept, (loss, record)


def test_a_loss_not_finite_at_initialisation_is_no_scale(model_dir):
    """A NaN or inf at epoch 0 is a network that diverged there, not a loss on another scale:
    neither the scale warning (which would use up the study's one) nor the note on values
    read as normalised (whose median it would give as NaN) comes of it."""
    for at_init, chance in itertools.product((math.nan, math.inf), (2.0, None)):
        study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _unfed_trial(study, steps=(0, 1), spectra=(0, 1), chance=chance,
                         val_loss={0: at_init, 1: 1.0 if chance is None else 2.0})
        said = [str(w.message) for w in caught]
        assert not [m for m in said if "initialisation" in m], (at_init, chance, said)
        # The next trial's finite loss at initialisation is read as usual.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _unfed_trial(study, steps=(0, 1), spectra=(0, 1), chance=chance,
                         val_loss={0: 0.3, 1: 0.3})
        said = [str(w.message) for w in caught if "initialisation" in str(w.message)]
        assert len(said) == 1 and (("0.15 times the chance_loss" in said[0]) if chance
                                   else "median loss at initialisation is 0.3," in said[0])


def test_a_tie_ranks_behind_the_whole_tie_unless_first_still_going():
    from lepredict.pruner import _rank_at

    study = optuna.create_study()
    for value, state in ((1.0, "PRUNED"), (0.5, "COMPLETE"), (1.0, "COMPLETE"), (1.0, None)):
        trial = study.ask()
        trial.report(value, 0)
        if state:
            study.tell(trial, state=getattr(optuna.trial.TrialState, state),
                       values=None if state == "PRUNED" else value)
    trials = study.get_trials(deepcopy=False)
    # Trial 2 ties only with trial 0, which was pruned: it ranks where 1.0 does, behind 0.5.
    assert _rank_at(study, trials, trials[2], 0) == (2, 4, 0)
    # Trial 3 ties with trial 2, still in the race and first: behind 0.5 and both of the tie.
    assert _rank_at(study, trials, trials[3], 0) == (4, 4, 0)


# -- what report_spectrum and measure_and_report take -------------------------------------------


def test_report_spectrum_refuses_dicts_that_are_no_spectrum():
    study = optuna.create_study(pruner=LyapunovPruner())
    trial = study.ask()
    m16 = [-0.1 * i for i in range(16)]
    for spectrum, message in (
            ({"mean": []}, r"mean is empty"),
            ({"mean": ["a"] * 16}, r"mean must be a list of numbers"),
            ({"mean": [math.nan] + m16[1:]}, r"mean has a NaN exponent but diverged=0\.0.*"
                                             r"'diverged'"),
            ({"mean": m16, "diverged": 2.0}, r"diverged.*in \[0, 1\], got diverged=2\.0"),
            ({"mean": m16, "diverged": math.nan}, r"in \[0, 1\], got diverged=nan"),
            ({"mean": m16, "convention": "weird"}, r"convention must be one of \('full', "
                                                   r"'hidden', None\).*convention='weird'")):
        with pytest.raises(ValueError, match=message):
            report_spectrum(trial, spectrum, 0)
    assert study.trials[0].user_attrs == {}  # a refused call stores nothing
    # What lyapunov_spectrum gives when every trajectory diverged: a NaN mean, diverged 1.0.
    report_spectrum(trial, {"mean": [math.nan] * 16, "diverged": 1.0}, 0)
    stored = study.trials[0].user_attrs[f"{ATTR}spectrum:0"]
    assert stored["diverged"] == 1.0 and all(math.isnan(float(v)) for v in stored["mean"])


def test_a_measured_spectrum_that_diverged_is_stored_as_diverged():
    gru = torch.nn.GRU(3, 8, batch_first=True)
    with torch.no_grad():
        gru.weight_hh_l0[0, 0] = math.nan
    trial = optuna.create_study().ask()
    lepredict.measure_and_report(trial, gru, torch.randn(4, 12, 3), 0)
    stored = trial.study.trials[0].user_attrs[f"{ATTR}spectrum:0"]
    assert stored["diverged"] == 1.0 and math.isnan(float(stored["mean"][0]))


def test_report_spectrum_sorts_the_exponents_descending_with_their_spread():
    trial = optuna.create_study().ask()
    report_spectrum(trial, {"mean": [-0.5, 0.2, -0.1], "std": [0.05, 0.02, 0.01]}, 0)
    stored = trial.study.trials[0].user_attrs[f"{ATTR}spectrum:0"]
    assert stored["mean"] == [0.2, -0.1, -0.5] and stored["std"] == [0.02, 0.01, 0.05]
    assert stored["sum"] == pytest.approx(-0.4)


def test_exponents_beyond_a_float_are_pruned_as_diverged_not_a_crash(model_dir):
    """1e308 per exponent: the sum is beyond a float (stored as inf, where math.fsum raised
    OverflowError). No network that did not diverge grows that fast: pruned as diverged. The
    same magnitude negative (a collapse, not a divergence) goes to the model."""
    study = optuna.create_study(pruner=LyapunovPruner(model=model_dir, threshold=0.0))
    trial = study.ask()
    report_spectrum(trial, {"mean": [1e308] * 16}, 0, chance_loss=1.0)
    assert study.trials[0].user_attrs[f"{ATTR}spectrum:0"]["sum"] == "inf"
    trial.report(1.0, 0)
    assert trial.should_prune()
    reason = study.trials[0].user_attrs[f"{ATTR}prediction:0"]["reason"]
    assert reason.startswith("spectrum overflowed at epoch 0") and reason.endswith("diverged")
    other = study.ask()
    for e in (0, 1):
        report_spectrum(other, {"mean": [-1e308] * 16}, e, chance_loss=1.0)
        other.report(1.0, e)
        assert not other.should_prune()
    assert 0.0 <= study.trials[1].user_attrs[f"{ATTR}prediction:1"]["p_trainable"] <= 1.0


def test_report_spectrum_takes_the_steps_trial_report_takes():
    trial = optuna.create_study().ask()
    report_spectrum(trial, {"mean": [0.1, -0.2]}, np.int64(2))
    report_spectrum(trial, {"mean": [0.1, -0.2]}, torch.tensor(3))
    assert {f"{ATTR}spectrum:2", f"{ATTR}spectrum:3"} <= set(trial.study.trials[0].user_attrs)
    for step in (1.5, torch.tensor(2.0), True, -1, "2"):
        with pytest.raises(ValueError, match="step must be a non-negative int"):
            report_spectrum(trial, {"mean": [0.1, -0.2]}, step)


def test_measure_and_report_says_what_probe_it_needs():
    from torch.nn.utils.rnn import pack_padded_sequence

    trial = optuna.create_study().ask()
    gru = torch.nn.GRU(3, 8, batch_first=True)
    batch = torch.randn(4, 12, 3)
    for probe, error, message in (
            (torch.randn(24), ValueError, r"3-D tensor .*\(batch, time, features\).*shape \(24,\)"),
            (torch.tensor(1.0), ValueError, r"3-D tensor .*got shape \(\)"),
            (torch.randn(12, 3), ValueError, r"shape \(12, 3\) \(one sequence needs a batch "
                                             r"dimension"),
            (None, TypeError, r"must be a torch\.Tensor .*got NoneType"),
            ((batch,), TypeError, r"got tuple"),
            (batch.tolist(), TypeError, r"got list"),
            (batch.numpy(), TypeError, r"numpy array; convert it with torch\.as_tensor\(probe\)"),
            (pack_padded_sequence(batch, [12, 11, 10, 9], batch_first=True), TypeError,
             r"PackedSequence; pass a padded tensor of equal-length sequences")):
        with pytest.raises(error, match=message):
            lepredict.measure_and_report(trial, gru, probe, 0)
    with pytest.raises(ValueError, match=r"\(time, batch, features\) as the module "
                                         r"\(batch_first=False\)"):
        lepredict.measure_and_report(trial, torch.nn.GRU(3, 8), torch.randn(24), 0)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        lepredict.measure_and_report(trial, gru, batch, 0.5)  # before measuring, not after
    assert trial.study.trials[0].user_attrs == {}


def test_a_relu_rnn_is_measured_with_a_warning_that_no_predictor_has_seen_one():
    trial = optuna.create_study().ask()
    probe = torch.randn(8, 12, 3)
    with pytest.warns(UserWarning, match=r"never seen a ReLU nn\.RNN"):
        lepredict.measure_and_report(trial, torch.nn.RNN(3, 8, nonlinearity="relu",
                                                         batch_first=True), probe, 0)
    assert "lepredict:spectrum:0" in trial.study.trials[0].user_attrs  # stored all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tanh RNN: no warning
        lepredict.measure_and_report(trial, torch.nn.RNN(3, 8, batch_first=True), probe, 1)


def test_probes_shorter_or_fewer_than_the_corpus_warn_and_multi_objective_is_refused():
    gru = torch.nn.GRU(3, 8, batch_first=True)
    trial = optuna.create_study().ask()
    # Fewer sequences averaged, whether the probe or probe_size holds them: said by the count.
    for step, (probe, size, asked) in enumerate(((torch.randn(2, 12, 3), 4, ""),
                                                 (torch.randn(8, 12, 3), 2, " (probe_size=2)"))):
        with pytest.warns(UserWarning, match=rf"averages over 2 probe sequence\(s\)"
                                             rf"{re.escape(asked)}; .* checked on spectra over 4 "
                                             r"or more.*a probe_size of 4 or more"):
            lepredict.measure_and_report(trial, gru, probe, step, probe_size=size)
        assert trial.study.trials[0].user_attrs[f"{ATTR}spectrum:{step}"]["trajectories"] == 2
    # Short sequences: the steps are named, with the layout the module reads.
    with pytest.warns(UserWarning, match=r"a probe of 3 step\(s\); .* batch_first=True, so "
                                         r"the probe is read as \(sequences, steps, features\); "
                                         r"a probe shaped \(steps, sequences, features\) is "
                                         r"probe.transpose\(0, 1\)"):
        lepredict.measure_and_report(trial, gru, torch.randn(8, 3, 3), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lepredict.measure_and_report(trial, gru, torch.randn(16, 8, 3), 3)
        lepredict.measure_and_report(trial, gru, torch.randn(4, 8, 3), 4)  # the default's 4
        lepredict.measure_and_report(trial, gru, torch.randn(8, 8, 3), 5,
                                     probe_size=np.int64(4))  # a numpy int is an int
    # A dict says its count too, and a key that is no spectrum's is named, not dropped unsaid.
    spec = {"mean": [0.1] * 8, "std": [0.0] * 8, "trajectories": 1, "trajectory": 8}
    with pytest.warns(UserWarning) as caught:
        lepredict.report_spectrum(trial, spec, 6)
    shown = [str(w.message) for w in caught]
    assert any(m.startswith("report_spectrum: the spectrum at step 6 averages over 1 probe "
                            "sequence(s)") for m in shown)
    assert any(m.startswith("report_spectrum: ignored 'trajectory': not a key of a spectrum")
               for m in shown)
    both = optuna.create_study(directions=["minimize", "maximize"]).ask()
    with pytest.raises(ValueError, match="has 2 objectives; lepredict's spectra serve "
                                         "LyapunovPruner, export and analyze, which like "
                                         "Optuna's pruners work in single-objective studies"):
        lepredict.measure_and_report(both, gru, torch.randn(8, 8, 3), 0)
    assert not both.study.trials[0].user_attrs


def test_a_spectrum_reported_after_should_prune_is_named_and_so_is_the_epoch_decided_on(runs):
    """Measuring after trial.should_prune() leaves each decision a step behind: the pruner
    decides on the previous epoch's spectrum, and the spectrum that comes late says so; a
    decision on an earlier epoch's spectrum names the epochs it saw."""
    row = runs[runs["status"] == "ok"].iloc[0]
    pruner = LyapunovPruner(n_warmup_steps=0, protect_top=0.0)
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    report_spectrum(trial, _spectrum(row), 0, chance_loss=1.0)
    trial.report(1.0, 0)
    trial.should_prune()
    trial.report(1.0, 1)
    trial.should_prune()  # decides at epoch 1 on epoch 0's spectrum
    record = trial.study._storage.get_trial(trial._trial_id).user_attrs[f"{ATTR}prediction:1"]
    assert record["budget"] == 0 and record["epoch"] == 1
    with pytest.warns(UserWarning, match="already decided at"):
        report_spectrum(trial, _spectrum(row), 1)
    trial.report(1.0, 2)
    study.tell(trial, 1.0)
    # The order of the README's loop gives no warning:
    trial = study.ask()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in (0, 1):
            report_spectrum(trial, _spectrum(row), epoch, chance_loss=1.0)
            trial.report(1.0, epoch)
            trial.should_prune()


def test_a_second_report_at_a_step_keeps_the_first_as_trial_report_does(runs):
    row = runs[runs["status"] == "ok"].iloc[0]
    study = optuna.create_study()
    trial = study.ask()
    report_spectrum(trial, _spectrum(row), 0, chance_loss=2.3, val_loss=2.0)
    with pytest.warns(UserWarning, match=r"spectrum at step 0, chance_loss=2.3 \(not 1.0\), "
                                         "val_loss at step 0"):
        report_spectrum(trial, {"mean": [0.3, -0.2], "std": [0.0, 0.0]}, 0, chance_loss=1.0,
                        val_loss=0.5)
    attrs = trial.user_attrs
    assert attrs[f"{ATTR}spectrum:0"]["mean"] == pytest.approx(sorted(row["le0_mean"],
                                                                      reverse=True))
    assert attrs[f"{ATTR}chance_loss"] == 2.3 and attrs[f"{ATTR}val_loss:0"] == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same chance loss again, another step: fine
        report_spectrum(trial, _spectrum(row), 1, chance_loss=2.3)


def test_a_frozen_trial_is_refused_before_anything_is_measured():
    """A FrozenTrial's set_user_attr changes its copy alone: the spectrum would be lost."""
    study = optuna.create_study()
    study.optimize(lambda t: 1.0, n_trials=1)
    frozen = study.trials[0]
    with pytest.raises(TypeError, match="not a FrozenTrial"):
        report_spectrum(frozen, {"mean": [0.1, -0.2]}, 0)
    rnn = torch.nn.GRU(3, 4, batch_first=True)
    with pytest.raises(TypeError, match="not a FrozenTrial"):
        lepredict.measure_and_report(frozen, rnn, torch.randn(2, 5, 3), 0)
    assert study.trials[0].user_attrs == {}


def test_a_retried_trial_stores_its_own_spectra_over_those_it_inherited(runs):
    """Optuna's retry of a stale trial copies the failed attempt's user attributes into the
    retry, which starts from scratch: its own spectrum, loss and chance loss are stored,
    silently."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    row = runs[runs["status"] == "ok"].iloc[0]
    study = optuna.create_study()
    first = study.ask()
    report_spectrum(first, {"mean": [0.3, -0.5], "std": [0.0, 0.0]}, 0, chance_loss=2.0,
                    val_loss=1.5)
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback()(study, study.trials[0])
    retry = study.ask()
    assert retry.user_attrs[f"{ATTR}chance_loss"] == 2.0  # inherited
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_spectrum(retry, _spectrum(row), 0, chance_loss=2.5, val_loss=0.9)
        report_spectrum(retry, _spectrum(row), 0)  # the same again: no conflict
    attrs = retry.user_attrs
    assert attrs[f"{ATTR}chance_loss"] == 2.5 and attrs[f"{ATTR}val_loss:0"] == 0.9
    assert attrs[f"{ATTR}spectrum:0"]["mean"][0] == pytest.approx(max(row["le0_mean"]))


def test_the_late_spectrum_warning_knows_studies_apart_and_the_largest_budget(runs):
    """A pruner used again for a new study of the same name does not mistake its trials for
    the old ones; past the largest budget a late spectrum changes no decision: no warning."""
    row = runs[runs["status"] == "ok"].iloc[0]
    pruner = LyapunovPruner(n_warmup_steps=0, protect_top=0.0)

    def loop(study, steps, late):
        trial = study.ask()
        for step in steps:
            if not late:
                report_spectrum(trial, _spectrum(row), step, chance_loss=1.0)
            trial.report(0.5, step)
            trial.should_prune()
            if late:
                report_spectrum(trial, _spectrum(row), step, chance_loss=1.0)

    loop(optuna.create_study(study_name="s", pruner=pruner), (0, 1), late=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop(optuna.create_study(study_name="s", pruner=pruner), (0, 1), late=False)
        study = optuna.create_study(study_name="late", pruner=pruner)
        trial = study.ask()
        for step in range(4):  # budgets 0-3 measured in time
            report_spectrum(trial, _spectrum(row), step, chance_loss=1.0)
            trial.report(0.5, step)
            trial.should_prune()
        trial.report(0.5, 4)
        trial.should_prune()
        report_spectrum(trial, _spectrum(row), 4)  # past budget 3: nothing lost


def test_trajectories_are_a_positive_count_and_old_records_export_without_one():
    trial = optuna.create_study().ask()
    for bad in (0, -3, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"trajectories is how many probe sequences the "
                                             r"spectrum averages over, a positive int, got "):
            report_spectrum(trial, {"mean": [0.1], "std": [0.0], "trajectories": bad}, 0)
    assert not trial.study.trials[0].user_attrs  # nothing stored
    report_spectrum(trial, {"mean": [0.1], "std": [0.0], "trajectories": np.int64(6)}, 0)
    from lepredict.records import run_row
    old = {"mean": [0.1], "std": [0.0], "diverged": 0.0, "n": 1}  # a record from before the key
    row = run_row({}, {}, {}, {0: old, 1: {**old, "trajectories": 6}})
    assert row["le0_trajectories"] is None and row["le1_trajectories"] == 6

