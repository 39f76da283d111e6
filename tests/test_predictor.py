"""StabilityPredictor: a well-behaved scikit-learn estimator with checked persistence."""

from __future__ import annotations

import copy
import json
import shutil
import threading
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.model_selection import GroupKFold, cross_val_score

from lepredict.evaluation import compare, cross_validate
from lepredict.predictor import (ModelFileError, StabilityPredictor, constant_fits_unwarned, load,
                                 load_models)


@pytest.fixture(scope="module")
def fitted(runs):
    return StabilityPredictor(budget=1, feature_sets=("spectrum", "loss")).fit(runs)


def test_sklearn_contract(runs, fitted):
    est = StabilityPredictor(budget=2, threshold=0.6)
    assert est.get_params()["budget"] == 2
    assert clone(est).set_params(budget=0).budget == 0
    proba = fitted.predict_proba(runs)
    assert proba.shape == (len(runs), 2) and np.allclose(proba.sum(1), 1)
    assert set(fitted.predict(runs)) <= {True, False}
    assert fitted.score(runs) > 0.8
    scores = cross_val_score(StabilityPredictor(budget=0), runs, runs["final_normalised_loss"] < 0.5,
                             groups=runs["number"] % 4, cv=GroupKFold(4), scoring="roc_auc")
    assert scores.mean() > 0.8  # the synthetic outcome is written in the epoch-0 spectrum


def test_loss_head_and_interval(runs, fitted):
    loss, low, high = fitted.predict_loss(runs, interval=True)
    assert np.all(low <= loss) and np.all(loss <= high)
    final = runs["final_normalised_loss"].clip(upper=3.0)
    assert np.corrcoef(loss, final)[0, 1] > 0.7
    # A normalised loss is not negative: the regressors' extrapolations below 0 are cut there,
    # the interval's low end included (a new user's predict-stability showed -0.015).
    shifted = copy.deepcopy(fitted)
    offset = float(loss.max()) + 1.0

    class Shifted:
        def __init__(self, model):
            self.model = model

        def predict(self, features):
            return self.model.predict(features) - offset

    shifted.regressor_ = Shifted(fitted.regressor_)
    shifted.interval_ = [Shifted(m) for m in fitted.interval_]
    cut, cut_low, cut_high = shifted.predict_loss(runs, interval=True)
    assert np.all(cut == 0.0) and np.all(cut_low == 0.0) and np.all(cut_high >= 0.0)
    assert np.all(shifted.predict_loss(runs) == 0.0)


def test_explain_names_driving_features(runs, fitted):
    (top,) = fitted.explain(runs.head(1), top=3)
    assert len(top) == 3 and all(name in fitted.feature_names_ for name, _ in top)
    assert abs(top[0][1]) >= abs(top[-1][1])


def test_grid_search_with_grouped_folds(runs):
    grid = {"histgradientboostingclassifier__max_leaf_nodes": [3, 7]}
    model = StabilityPredictor(budget=0, param_grid=grid).fit(runs, groups=runs["number"] % 3)
    assert model.best_params_["histgradientboostingclassifier__max_leaf_nodes"] in (3, 7)


def test_single_class_and_bad_input_are_refused(runs):
    with pytest.raises(ValueError, match="at least 3 of each"):
        StabilityPredictor(budget=0, threshold=100.0).fit(runs[runs["status"] == "ok"])
    with pytest.raises(TypeError, match="trials frame"):
        StabilityPredictor().fit(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="calibration"):
        StabilityPredictor(calibration="magic").fit(runs)


def test_save_load_round_trip_and_tampering(runs, fitted, tmp_path):
    path = fitted.save(tmp_path / "m", metrics={"auroc": 0.9})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["feature_names"] == fitted.feature_names_ and manifest["budget"] == 1
    assert len(manifest["sha256"]) == 64 and manifest["training_data"]["runs"] == len(runs)
    again = load(path)
    assert np.allclose(again.predict_proba(runs), fitted.predict_proba(runs))
    assert load_models(tmp_path) == {} or 1 in load_models(tmp_path)

    bad = tmp_path / "tampered"
    shutil.copytree(path, bad)
    with open(bad / "model.skops", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFileError, match="does not match the sha256"):
        load(bad)

    other = tmp_path / "other"
    shutil.copytree(path, other)
    m = json.loads((other / "manifest.json").read_text())
    m["feature_names"] = m["feature_names"][:-1]
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFileError, match="built for other features"):
        load(other)
    with pytest.raises(ModelFileError, match="No saved predictor"):
        load(tmp_path / "nowhere")


# Slow (20-24 s): cross-validation by configuration, task and architecture in one test; the quick
# suite keeps compare's held-out tasks (test_evaluation) and fit's own cross-validation.
@pytest.mark.slow
def test_cross_validation_schemes(runs):
    m = cross_validate(runs, budget=1, sets=["spectrum", "hparams"], scheme="configs")
    assert m["auroc"] > 0.85 and m["n"] == len(runs)
    by_task = cross_validate(runs, budget=1, sets=["spectrum"], scheme="task")
    assert set(by_task["groups"]) == {"alpha", "beta"}
    table = compare(runs, budgets=[0, 1], feature_sets=["spectrum", "grad"], schemes=["arch"],
                    n_boot=0, progress=False)
    overall = table[table["group"] == "all"]
    assert len(overall) == 5  # the baseline joins in; no gradient features at budget 0
    assert set(table["features"]) == {"spectrum", "grad", "hparams+loss"}
    assert set(table["group"]) == {"all", "arch=rnn", "arch=gru", "arch=lstm"}


def test_fit_and_evaluate_commands(runs, tmp_path, capsys):
    # In process: the CLI's own subprocess behaviour (exit codes, one-line errors) is tested in
    # test_cli_errors; four interpreter start-ups here cost half a minute of CI.
    from lepredict.cli import main

    data = tmp_path / "runs.parquet"
    runs.to_parquet(data)
    assert main(["fit", "--data", str(data), "-o", str(tmp_path / "model"),
                 "--budgets", "0", "1", "--no-cv"]) == 0
    assert (tmp_path / "model" / "budget-1" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data),
                 "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["budget"] for r in rows] == [0, 1] and rows[1]["auroc"] > 0.9
    # Scored on the very runs it was fitted on: said so.
    assert "note: the model was fitted on the runs of stud" in err
    assert "which --data holds too: on those its figures are not held out" in err
    assert rows[1]["trained"] == int((runs["final_normalised_loss"] < runs["threshold"]).sum())
    few = tmp_path / "few.parquet"
    runs.sample(30, random_state=0).to_parquet(few)  # 5 trained
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(few),
                 "--n-boot", "50"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split()[:3] == ["budget", "runs", "trained"]
    assert out.splitlines()[1].split()[:3] == ["0", "30", "5"]
    assert "note: scored on 30 runs, 5 of which trained: with fewer than 20" in err
    assert "predicts training within" not in err  # the model's horizon, 10 epochs
    longer = tmp_path / "longer.parquet"
    runs.assign(epochs=40).sample(30, random_state=0).to_parquet(longer)
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(longer),
                 "--n-boot", "0"]) == 0
    assert ("note: the model predicts training within 10 epochs, and --data holds runs of 40 "
            "epochs") in capsys.readouterr().err
    mixed = runs.sample(30, random_state=0).reset_index(drop=True)
    mixed.loc[:9, "state"] = "PRUNED"
    mixed.to_parquet(longer)
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(longer),
                 "--n-boot", "0"]) == 0
    assert "note: 10 pruned trial(s) were left out" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "No saved predictor" in capsys.readouterr().err
    assert main(["fit", "--data", str(tmp_path / "missing.parquet"), "-o",
                 str(tmp_path / "x")]) == 2
    assert "No such data file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_fit_records_a_pruning_threshold_and_evaluate_summarises(runs, tmp_path, capsys):
    import re

    from lepredict.cli import main
    from lepredict.evaluation import compare, format_summary

    data = tmp_path / "runs.parquet"
    runs.to_parquet(data)
    assert main(["fit", "--data", str(data), "-o", str(tmp_path / "m"), "--budgets", "1"]) == 0
    out, err = capsys.readouterr()
    auroc, low, high = map(float, re.search(r"held-out AUROC ([\d.]+) \[([\d.]+)-([\d.]+)\]",
                                            out).groups())
    assert low <= auroc <= high and high - low < 0.2
    assert "note: fitted on" not in err
    # Fewer than 20 trained: fit says what that means.
    few = tmp_path / "few.parquet"
    runs.sample(60, random_state=0).to_parquet(few)  # 13 trainable
    assert main(["fit", "--data", str(few), "-o", str(tmp_path / "f"), "--budgets", "1",
                 "--no-cv"]) == 0
    err = capsys.readouterr().err
    assert "note: fitted on 60 runs, 13 of which trained" in err
    assert "fewer than 20 on either side" in err
    # Cross-validated, each fold's classifier (48 runs) is constant: its held-out AUROC and the
    # cut-off, a quantile of those constants, would describe no model: nothing is written.
    assert main(["fit", "--data", str(few), "-o", str(tmp_path / "cv"), "--budgets", "1"]) == 2
    err = capsys.readouterr().err
    assert "classifier of every one of the 5 cross-validation folds gave all its held-out " \
        "runs one P(trainable)" in err
    assert not (tmp_path / "cv").exists()
    # A handful: the trees cannot split, and a predictor that gives every run one P is not
    # written (budget 0 fits first: nothing of budget 1 either).
    runs.sample(30, random_state=0).to_parquet(few)  # 5 trainable
    with pytest.warns(UserWarning, match="gives all 30 runs the same P"):
        StabilityPredictor(budget=1).fit(pd.read_parquet(few))
    assert main(["fit", "--data", str(few), "-o", str(tmp_path / "g"), "--budgets", "0", "1",
                 "--no-cv"]) == 2
    err = capsys.readouterr().err
    assert "On 30 runs (5 trained) the budget-0 classifier learnt nothing" in err
    assert not (tmp_path / "g").exists()
    manifest = json.loads((tmp_path / "m" / "budget-1" / "manifest.json").read_text())
    threshold = manifest["prune_threshold"]
    assert threshold == manifest["metrics"]["held_out_configs"]["p_at_99_recall"]
    assert 0.0 < threshold < 1.0
    assert manifest["training_data"]["epochs"] == int(runs["epochs"].iloc[0])
    # The baseline ("loss") is compared too without being asked for: two sets, ten fits.
    table = compare(runs, budgets=(1,), feature_sets=("spectrum",), baseline="loss",
                    schemes=("configs",), n_boot=20, progress=False)
    text = format_summary(table)
    assert "| spectrum | " in text and "| loss | " in text and "held-out configurations" in text


def test_constant_fits_unwarned_is_this_threads_alone(runs):
    """The pruner's online refits silence the constant-fit warning in their own thread only,
    leaving the process's warning filters as they were: ``warnings.catch_warnings`` swapped
    those, so another thread's block (Optuna's heartbeat, a user's objective) closing out of
    order left a filter behind that hid the warning from the user for good."""
    few = runs.sample(30, random_state=0)
    filters = list(warnings.filters)
    inside, other_done = threading.Event(), threading.Event()
    other = {}

    def fit_elsewhere():
        inside.wait(10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            StabilityPredictor(budget=1).fit(few)
        other["said"] = [str(w.message) for w in caught]
        other_done.set()

    thread = threading.Thread(target=fit_elsewhere)
    thread.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with constant_fits_unwarned():
            inside.set()
            assert other_done.wait(60)
            model = StabilityPredictor(budget=1).fit(few)
    thread.join()
    assert model.training_summary_["constant"]
    assert not [w for w in caught if "gives all 30 runs" in str(w.message)]
    assert any("gives all 30 runs the same P" in m for m in other["said"])
    assert warnings.filters == filters
    with pytest.warns(UserWarning, match="gives all 30 runs the same P"):
        StabilityPredictor(budget=1).fit(few)
