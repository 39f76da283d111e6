"""Features of early training: common grid, summaries, defined values for diverged runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lepredict
from lepredict.features import (FEATURE_SETS, build_features, feature_names, kaplan_yorke,
                                outcomes, spectrum_grid, spectrum_summary)


def test_grid_puts_spectra_of_any_size_on_one_scale():
    small = np.linspace(0.5, -1.5, 8)
    large = np.linspace(0.5, -1.5, 64)
    # The same continuous profile sampled at different n lands on (nearly) the same grid values.
    assert np.allclose(spectrum_grid(small), spectrum_grid(large), atol=0.15)
    assert spectrum_grid(small).shape == spectrum_grid([0.3]).shape == (16,)
    assert np.all(spectrum_grid([-1e9, 1e9]) <= 20) and np.all(spectrum_grid([-1e9]) >= -20)


def test_kaplan_yorke_and_summary():
    assert kaplan_yorke([-0.1, -0.2]) == 0.0
    assert kaplan_yorke([0.5, -1.0]) == pytest.approx(1.5)
    assert kaplan_yorke([0.3, 0.1]) == 2.0
    s = spectrum_summary([0.2, 0.0, -0.5, -1.0], [0.1, 0.1, 0.2, 0.3], diverged=0.25)
    assert s["lmax"] == 0.2 and s["n_pos"] == 1 and s["share_zero"] == 0.25
    assert s["ky"] == pytest.approx(kaplan_yorke([0.2, 0.0, -0.5, -1.0]) / 4)
    assert s["spread_max"] == pytest.approx(0.3) and s["diverged"] == 0.25


def test_every_set_every_budget_is_finite_even_for_diverged_runs(runs):
    assert (runs["status"] == "diverged").any()
    for budget in (0, 1, 3):
        X = build_features(runs, budget=budget, sets=FEATURE_SETS)
        assert list(X.columns) == feature_names(budget, FEATURE_SETS)
        assert np.isfinite(X.to_numpy()).all()
        assert len(X) == len(runs)
    X = build_features(runs, budget=3, sets=["spectrum", "loss"])
    div = runs["status"].eq("diverged") & runs["val_loss"].map(len).le(2)
    assert (X.loc[div, "spec_e3_diverged"] == 1).all()
    assert (X.loc[div, "loss_e3"] == 10.0).all()
    assert not any(c.startswith("grad") for c in feature_names(0, FEATURE_SETS))


def test_spectrum_features_follow_the_spectrum(runs):
    X = build_features(runs, budget=1, sets=["spectrum"])
    lmax = runs["le0_mean"].map(lambda v: v[0])
    assert np.allclose(X["spec_e0_lmax"], lmax)
    assert np.allclose(X["spec_d1_lmax"], X["spec_e1_lmax"] - X["spec_e0_lmax"])


def test_outcomes_and_threshold(runs):
    out = outcomes(runs)
    final = runs["final_normalised_loss"].astype(float)
    assert (out["trainable"] == (np.isfinite(final) & (final < 0.5))).all()
    assert out["final_loss"].max() <= 3.0 and np.isfinite(out["final_loss"]).all()
    assert outcomes(runs, threshold=5.0)["trainable"].sum() == np.isfinite(final).sum()
    with pytest.raises(ValueError, match="threshold must be"):
        outcomes(runs, threshold=-1)


def test_bad_budget_and_sets(runs):
    with pytest.raises(ValueError, match="budget must be"):
        build_features(runs, budget=-1)
    with pytest.raises(ValueError, match="Unknown feature sets"):
        build_features(runs, budget=1, sets=["vibes"])


def test_features_of_a_real_run():
    task = lepredict.tasks.get("digits", mode="row")
    rec = lepredict.train_run({"arch": "lstm", "hidden": 8, "lr": 1e-2}, task, epochs=1,
                              le_epochs=[0, 1])
    frame = lepredict.sweep.record_frame(rec, task)
    X = build_features(frame, budget=1, sets=FEATURE_SETS)
    assert np.isfinite(X.to_numpy()).all()
    assert X["spec_e1_lmax"].iloc[0] == pytest.approx(rec.spectra[1]["mean"][0])
    assert X["loss_e1"].iloc[0] == pytest.approx(rec.val_loss[1] / task.chance_loss)
    assert math.isclose(X["hp_log2_hidden"].iloc[0], 3.0)


@pytest.mark.parametrize("budget", [0, 3])
def test_every_feature_name_has_a_plain_description(budget):
    from lepredict.features import FEATURE_SETS, describe_feature

    names = feature_names(budget, FEATURE_SETS)
    words = {name: describe_feature(name) for name in names}
    assert all(text and text != name and "_" not in text  # words, not another code
               for name, text in words.items())
    # Different features read differently: a description that ignored the epoch or the grid
    # point would collapse several names onto one text.
    assert len(set(words.values())) == len(names)
    assert describe_feature("spec_e1_lmax") == "largest Lyapunov exponent after epoch 1"
    assert "initialisation to epoch 1" in describe_feature("loss_d1")


@pytest.mark.parametrize("name", ["spec_e0_nope", "spec_d0_lmax", "loss_d0", "grad_e0",
                                  "spec_e0_g16", "hp_colour", "bogus"])
def test_describing_an_unknown_feature_is_an_error(name):
    from lepredict.features import describe_feature

    with pytest.raises(ValueError, match="not a feature"):
        describe_feature(name)


def test_a_partial_spectrum_whose_sum_overflowed_repeats_the_last_epoch(runs):
    """Corpus v2 holds 5 runs whose measured exponent sum is NaN or inf at some epoch (a
    log-determinant overflow on a trajectory not flagged as diverged): that epoch counts as not
    finite, like a non-finite spectrum, instead of stopping every fit on the corpus; a partial
    spectrum with no sum at all is still an error."""
    row = runs[runs["status"] == "ok"].iloc[[0]].copy()
    lead = [0.1 - 0.05 * i for i in range(16)]
    for e in (0, 1):
        row[f"le{e}_mean"] = [lead]
        row[f"le{e}_std"] = [[0.0] * 16]
        row[f"le{e}_n"] = 48
        row[f"le{e}_sum"] = -40.0 if e == 0 else math.nan
    X = build_features(row, budget=1, sets=["spectrum"]).iloc[0]
    assert X["spec_e1_mean"] == X["spec_e0_mean"] == pytest.approx(-40.0 / 48)
    assert X["spec_d1_mean"] == 0.0
    row["le1_sum"] = [None]
    with pytest.raises(ValueError, match="not their sum"):
        build_features(row.astype({"le1_sum": object}), budget=1, sets=["spectrum"])
