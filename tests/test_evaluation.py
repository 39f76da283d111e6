"""Evaluation: bootstrap intervals over configurations, paired differences against the strongest
baseline, search-space holdouts, test runs, and nested cross-validation that keeps the grid
search away from the runs that score it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import lepredict.predictor
from lepredict.features import outcomes
from lepredict.evaluation import (BASELINE, bootstrap_counts, compare, format_groups,
                                  format_summary, holdout_mask, out_of_fold, parse_sets,
                                  summarise, weighted_auroc, weighted_spearman)
from lepredict.predictor import StabilityPredictor


def _tiny_classifier():
    return make_pipeline(StandardScaler(),
                         HistGradientBoostingClassifier(max_iter=20, random_state=0))


def test_weighted_metrics_are_those_of_the_sample_that_repeats_each_run():
    rng = np.random.default_rng(3)
    n = 80
    y = rng.random(n) < 0.3
    score = np.round(rng.normal(size=n) + y, 1)  # rounded: ties
    a = np.round(rng.normal(size=n), 1)
    b = np.round(a + rng.normal(size=n), 1)
    w = rng.integers(0, 3, size=(6, n))
    auroc, rho = weighted_auroc(y, score, w), weighted_spearman(a, b, w)
    for i in range(len(w)):
        rows = np.repeat(np.arange(n), w[i])
        assert auroc[i] == pytest.approx(roc_auc_score(y[rows], score[rows]), abs=1e-12)
        assert rho[i] == pytest.approx(spearmanr(a[rows], b[rows]).statistic, abs=1e-12)
    assert weighted_auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert np.isnan(weighted_auroc(np.ones(n, bool), score))
    assert np.isnan(weighted_spearman(a, np.ones(n)))


def test_bootstrap_resamples_whole_configurations_within_each_task():
    strata = ["a"] * 6 + ["b"] * 4
    groups = [1, 1, 2, 3, 3, 3, 4, 5, 6, 6]
    w = bootstrap_counts(strata, groups, n_boot=200, random_state=1)
    assert w.shape == (200, 10)
    # The runs of one configuration (a repeated seed) enter a resample together.
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all() and (w[:, 8] == w[:, 9]).all()
    # Each task keeps its number of configurations: 3 draws in task a, 3 in task b.
    assert ((w[:, 0] + w[:, 2] + w[:, 3]) == 3).all()
    assert ((w[:, 6] + w[:, 7] + w[:, 8]) == 3).all()
    assert w.min() == 0 and w.max() >= 2  # some configurations left out, some repeated
    assert (bootstrap_counts(strata, groups, n_boot=200, random_state=1) == w).all()


def _predictions(n_configs: int, seed: int = 0, names=("a",)) -> pd.DataFrame:
    """Held-out predictions with real signal and noise, two runs (seeds) per configuration."""
    rng = np.random.default_rng(seed)
    config = np.repeat(np.arange(n_configs), 2)
    quality = rng.normal(size=n_configs)[config]
    final = np.clip(1 + quality + 0.3 * rng.normal(size=len(config)), 0, 3)
    parts = []
    for i, name in enumerate(names):
        noise = np.random.default_rng(seed + 1 + i).normal(size=len(config))
        parts.append(pd.DataFrame({
            "scheme": "configs", "budget": 1, "features": name, "row": np.arange(len(config)),
            "fold": config % 5, "proba": 1 / (1 + np.exp(quality + noise)),
            "loss_pred": final + 0.5 * noise, "task": np.where(config % 2, "x", "y"),
            "config": config.astype(str), "trainable": final < 0.8, "final_loss": final,
        }))
    out = pd.concat(parts, ignore_index=True)
    out["group"] = "task=" + out["task"]
    return out


def test_intervals_contain_the_estimate_and_narrow_with_more_data():
    widths = {}
    for n in (60, 960):
        table = summarise(_predictions(n), baseline=None, n_boot=50)
        for _, r in table.iterrows():
            assert r["auroc_low"] <= r["auroc"] <= r["auroc_high"]
            assert r["spearman_low"] <= r["spearman"] <= r["spearman_high"]
            assert r["auroc_low"] < r["auroc_high"]
        overall = table[table["group"] == "all"].iloc[0]
        widths[n] = (overall["auroc_high"] - overall["auroc_low"],
                     overall["spearman_high"] - overall["spearman_low"])
        assert overall["n"] == 2 * n and set(table["group"]) == {"all", "task=x", "task=y"}
    # 16 times the configurations: intervals about 4 times narrower.
    assert widths[960][0] < 0.5 * widths[60][0] and widths[960][1] < 0.5 * widths[60][1]


def test_paired_difference_of_a_set_with_itself_is_exactly_zero():
    both = _predictions(100, names=("a", "c"))  # the same runs, other predictions for c
    twin = both[both["features"] == "a"].assign(features="b")
    table = summarise(pd.concat([both, twin]), baseline="a", n_boot=50)
    for name in ("a", "b"):
        rows = table[table["features"] == name]
        assert len(rows) == 3
        for k in ("d_auroc", "d_auroc_low", "d_auroc_high", "d_spearman", "d_spearman_low",
                  "d_spearman_high"):
            assert (rows[k] == 0).all(), (name, k)
    c = table[(table["features"] == "c") & (table["group"] == "all")].iloc[0]
    assert c["d_auroc"] == pytest.approx(c["auroc"] - table.query(
        "features == 'a' and group == 'all'")["auroc"].iloc[0])
    assert c["d_auroc_low"] < c["d_auroc_high"]
    text = format_summary(table, baseline="a")
    assert "| a | " in text and "Difference from a" in text
    assert "| b | +0.000 [+0.000, +0.000] |" in text


@pytest.mark.parametrize("predicate, expected", [
    ("arch=lstm", lambda r: r["param_arch"] == "lstm"),
    ("param_arch = gru,lstm", lambda r: r["param_arch"].isin(["gru", "lstm"])),
    ("arch!=rnn", lambda r: r["param_arch"] != "rnn"),
    ("hidden>=16", lambda r: r["param_hidden"] >= 16),
    ("hidden<16", lambda r: r["param_hidden"] < 16),
    ("hidden=8,32", lambda r: r["param_hidden"].isin([8, 32])),
    ("task=beta", lambda r: r["task"] == "beta"),
    ("lr>0.01", lambda r: r["param_lr"] > 0.01),
    ("arch=lstm & hidden>=16", lambda r: (r["param_arch"] == "lstm") & (r["param_hidden"] >= 16)),
    ("hidden>=32 | arch!=rnn", lambda r: (r["param_hidden"] >= 32) | (r["param_arch"] != "rnn")),
    ("task=beta&arch=gru | hidden<16 & arch=lstm",
     lambda r: (r["task"] == "beta") & (r["param_arch"] == "gru")
     | (r["param_hidden"] < 16) & (r["param_arch"] == "lstm")),
])
def test_holdout_predicates_select_the_runs_they_name(runs, predicate, expected):
    mask = holdout_mask(runs, predicate)
    assert mask.dtype == bool and 0 < mask.sum() < len(runs)
    assert (mask == expected(runs).to_numpy()).all()


@pytest.mark.parametrize("predicate, message", [
    ("colour=red", "no column 'colour'"),
    ("lstm", "is not COLUMN OP VALUE"),
    ("hidden>=big", "is not a number"),
    ("arch>rnn", "only = and != apply"),
    ("layers>=2 | ", "empty condition around '&' or '|'"),
    ("arch=lstm & colour=red", "no column 'colour'"),
])
def test_bad_holdout_predicates_are_refused(runs, predicate, message):
    with pytest.raises(ValueError, match=message):
        holdout_mask(runs, predicate)


def test_feature_set_names():
    assert parse_sets("hparams+loss+spectrum") == ("hparams", "loss", "spectrum")
    for bad in ("vibes", "loss+loss", "loss+"):
        with pytest.raises(ValueError, match="Unknown feature set"):
            parse_sets(bad)


@pytest.fixture
def fit_spy(monkeypatch):
    """The row labels of every frame a StabilityPredictor is fitted on."""
    seen = []
    fit = StabilityPredictor.fit

    def spy(self, X, y=None, groups=None):
        seen.append(set(X.index))
        return fit(self, X, y, groups)

    monkeypatch.setattr(StabilityPredictor, "fit", spy)
    return seen


def test_holdout_scheme_fits_on_the_rest_and_scores_what_it_selects(runs, fit_spy):
    pred = out_of_fold(runs, budget=0, sets="spectrum", scheme="holdout:arch=lstm",
                       classifier=_tiny_classifier())
    lstm = set(np.flatnonzero(runs["param_arch"] == "lstm"))  # all runs finished: row = position
    assert set(pred["row"]) == lstm and len(pred) == len(lstm)
    assert fit_spy == [set(range(len(runs))) - lstm]
    assert (pred["group"] == "task=" + pred["task"]).all()
    with pytest.raises(ValueError, match="selects none of the 240 finished runs"):
        out_of_fold(runs, budget=0, sets="loss", scheme="holdout:arch=transformer")
    with pytest.raises(ValueError, match="selects all"):
        out_of_fold(runs, budget=0, sets="loss", scheme="holdout:hidden>=1")


def test_holdout_of_an_architecture_is_that_fold_of_leave_one_architecture_out(runs):
    kwargs = dict(budget=1, sets="loss", classifier=_tiny_classifier())
    held = out_of_fold(runs, scheme="holdout:arch=gru", **kwargs).set_index("row")
    logo = out_of_fold(runs, scheme="arch", **kwargs).set_index("row")
    assert np.allclose(held["proba"], logo.loc[held.index, "proba"])
    assert np.allclose(held["loss_pred"], logo.loc[held.index, "loss_pred"])


def test_test_scheme_fits_on_all_the_data_and_scores_the_test_runs(runs, fit_spy):
    pred = out_of_fold(runs.iloc[:160], test=runs.iloc[160:], budget=1, sets="loss",
                       scheme="test", classifier=_tiny_classifier())
    assert sorted(pred["row"]) == list(range(160, 240))
    assert fit_spy == [set(range(160))]
    pred = pred.sort_values("row")
    assert np.allclose(pred["final_loss"], outcomes(runs.iloc[160:])["final_loss"])
    assert (pred["trainable"].to_numpy() == outcomes(runs.iloc[160:])["trainable"]).all()


def test_nested_grid_search_never_sees_the_runs_it_is_scored_on(runs, monkeypatch):
    searched = []

    class SpyGridSearch(lepredict.predictor.GridSearchCV):
        def fit(self, X, y=None, **kwargs):
            searched.append(set(X.index))
            return super().fit(X, y, **kwargs)

    monkeypatch.setattr(lepredict.predictor, "GridSearchCV", SpyGridSearch)
    grid = {"histgradientboostingclassifier__max_leaf_nodes": [3, 7]}
    pred = out_of_fold(runs, budget=0, sets="spectrum", scheme="configs",
                       classifier=_tiny_classifier(), param_grid=grid)
    folds = [set(part["row"]) for _, part in pred.groupby("fold")]
    assert len(folds) == 5 and set().union(*folds) == set(range(len(runs)))
    assert len(searched) == 5  # one search per outer fold, none on all the runs
    everything = set(range(len(runs)))
    for rows in searched:
        assert sum(rows == everything - test for test in folds) == 1
        assert all(not rows & test for test in folds if rows == everything - test)


@pytest.fixture(scope="module")
def table(runs):
    return compare(runs, budgets=[1], feature_sets=["spectrum"], schemes=["task"], n_boot=50,
                   progress=False)


def test_compare_adds_the_baseline_and_reports_each_held_out_group(table):
    assert set(table["features"]) == {"spectrum", BASELINE}
    assert set(table["group"]) == {"all", "task=alpha", "task=beta"}
    base = table[table["features"] == BASELINE]
    assert (base[["d_auroc", "d_auroc_low", "d_auroc_high"]] == 0).all().all()
    spec = table[(table["features"] == "spectrum")].set_index("group")
    assert spec.loc["all", "auroc"] == pytest.approx(
        spec.loc[["task=alpha", "task=beta"], "auroc"].mean())
    assert (spec["auroc_low"] <= spec["auroc"]).all() and (spec["auroc"] <= spec["auroc_high"]).all()
    assert not table["nested"].any() and (table["n_boot"] == 50).all()
    groups = format_groups(table)
    assert "| task=alpha | spectrum | " in groups and "Difference from hparams+loss" in groups


def test_evaluate_command_prints_intervals_and_writes_the_table(runs, tmp_path, capsys):
    from lepredict.cli import main

    data = tmp_path / "runs.parquet"
    runs.to_parquet(data)
    argv = ["evaluate", "--data", str(data), "--budgets", "1", "--features", "spectrum",
            "--schemes", "task", "--n-boot", "20"]
    assert main([*argv, "-o", str(tmp_path / "t.csv")]) == 0
    text = capsys.readouterr().out
    assert "20 bootstrap resamples" in text and "Difference from hparams+loss" in text
    assert "| spectrum | " in text and "Spearman" in text and "| task=beta | spectrum |" in text
    written = pd.read_csv(tmp_path / "t.csv")
    assert len(written) == 6 and {"auroc_low", "d_spearman_high", "mae"} <= set(written.columns)
    # A holdout alone replaces the default schemes: one fit per feature set.
    assert main(["evaluate", "--data", str(data), "--budgets", "1", "--features", "loss",
                 "--holdout", "arch=lstm", "--n-boot", "20", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["scheme"] for r in rows} == {"holdout:arch=lstm"}
    assert len(rows) == 6 and all(0 <= r["auroc"] <= 1 for r in rows)  # 2 sets, 3 groups


def test_runs_without_a_task_are_a_group_of_their_own(runs):
    """A loop of one's own exports no task: pooled with a corpus its runs are "task=(none)"
    (pandas keeps a missing task missing through astype(str), and the labels are sorted)."""
    mixed = runs.copy()
    mixed["task"] = mixed["task"].astype(object)
    mixed.loc[mixed["task"] == "beta", "task"] = None
    table = compare(mixed, budgets=[1], feature_sets=["spectrum"], schemes=["configs"], n_boot=20,
                    progress=False)
    assert set(table["group"]) == {"all", "task=(none)", "task=alpha"}
