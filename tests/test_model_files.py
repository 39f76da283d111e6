"""Model files run no code when loaded, whoever wrote them (issue 12).

Each malicious file here is self-consistent (its manifest names valid features and carries the
file's own sha256, as anyone shipping a model directory can write) and holds a payload that
creates a marker file when it is built; the payload is shown to be live by loading it the way
that would run it, so "no marker" means the loader refused, not that the payload was a dud.
"""

from __future__ import annotations

import json
import pickle
import shutil

import joblib
import numpy as np
import pytest
import skops.io

import lepredict.predictor as predictor
from lepredict import LyapunovPruner
from lepredict.cli import main
from lepredict.features import feature_names
from lepredict.predictor import (
    ModelFileError,
    StabilityPredictor,
    load,
    load_models,
    pin_shipped_models,
    read_manifest,
    resolve_model,
)


class Payload:
    """Creates the marker file when unpickled or built by skops (its ``__setstate__``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # what pickle calls: open(marker, "w") at load time
        return (open, (self.marker, "w"))

    def __setstate__(self, state):  # what skops calls on the object it builds
        open(state["marker"], "w").close()


def _manifest(model_file, budget=0, **extra):
    return {"lepredict_version": "0.1.0", "budget": budget,
            "feature_sets": ["spectrum", "loss"],
            "feature_names": feature_names(budget, ["spectrum", "loss"]),
            "threshold": None, "prune_threshold": 0.5,
            "sha256": predictor._sha256(model_file), **extra}


def _pickle_model(directory, marker):
    directory.mkdir(parents=True)
    joblib.dump(Payload(marker), directory / "model.joblib")
    (directory / "manifest.json").write_text(json.dumps(_manifest(directory / "model.joblib")))
    return directory


def _skops_model(directory, marker):
    directory.mkdir(parents=True)
    # A predictor on the outside, the payload one attribute down: the audit has to look inside.
    model = StabilityPredictor(budget=0)
    model.feature_names_ = feature_names(0, ["spectrum", "loss"])
    model.payload_ = Payload(marker)
    skops.io.dump(model, directory / "model.skops")
    (directory / "manifest.json").write_text(json.dumps(_manifest(directory / "model.skops")))
    return directory


@pytest.fixture(scope="module")
def fitted(runs):
    return StabilityPredictor(budget=0).fit(runs)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


def test_payloads_are_live(tmp_path, marker):
    pickled = _pickle_model(tmp_path / "p", marker)
    joblib.load(pickled / "model.joblib")
    assert marker.exists()
    marker.unlink()
    crafted = _skops_model(tmp_path / "s", marker)
    skops.io.load(crafted / "model.skops", trusted=skops.io.get_untrusted_types(
        file=crafted / "model.skops"))
    assert marker.exists()


def test_a_pickle_is_not_loaded_without_trust(tmp_path, marker):
    bad = _pickle_model(tmp_path / "evil", marker)
    for attempt in (lambda: load(bad), lambda: load_models(bad),
                    lambda: load_models(tmp_path),  # as a subdirectory of a model directory
                    lambda: StabilityPredictor.load(bad),
                    lambda: LyapunovPruner(model=bad), lambda: LyapunovPruner(model=str(bad))):
        with pytest.raises(ModelFileError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message
        assert str(bad / "model.joblib") in message and "runs any code" in message
        assert "trust=True" in message and "--trust-model" in message
    assert not marker.exists()
    # trust means trust: the user vouched for the pickle, so it is unpickled
    with pytest.raises(ModelFileError, match="does not hold the StabilityPredictor"):
        LyapunovPruner(model=bad, trust_model=True)
    assert marker.exists()


def test_a_skops_file_with_foreign_types_is_refused_even_with_trust(tmp_path, marker):
    bad = _skops_model(tmp_path / "evil", marker)
    for trust in (False, True):
        with pytest.raises(ModelFileError) as err:
            load(bad, trust=trust)
        assert "test_model_files.Payload" in str(err.value) and "\n" not in str(err.value)
        assert "not even with trust" in str(err.value)
    with pytest.raises(ModelFileError, match="Payload"):
        LyapunovPruner(model=bad, trust_model=True)
    assert not marker.exists()


@pytest.mark.parametrize("make", [_pickle_model, _skops_model])
def test_cli_refuses_in_one_line(make, runs, tmp_path, marker, capsys):
    bad = make(tmp_path / "evil", marker)
    data = tmp_path / "runs.parquet"
    runs.head(20).to_parquet(data)
    for argv in (["evaluate", "--model", str(bad), "--data", str(data)],
                 ["predict-stability", "--model", str(bad)],
                 ["analyze", "--model", str(bad), "--data", str(data)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"lepredict {argv[0]}: error: {bad}" in err
        if make is _pickle_model:
            assert "runs any code" in err and "pass trust=True (CLI: --trust-model)" in err
        else:
            assert "test_model_files.Payload" in err and "not even with" in err
    assert not marker.exists()


def test_default_never_means_the_working_directory(tmp_path, marker, monkeypatch):
    _pickle_model(tmp_path / "default" / "budget-1", marker)
    shutil.copy(tmp_path / "default" / "budget-1" / "manifest.json", tmp_path / "default")
    shutil.copy(tmp_path / "default" / "budget-1" / "model.joblib", tmp_path / "default")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("default") == predictor.MODELS_DIR / "default"
    pruner = LyapunovPruner(model="default")
    assert sorted(pruner._models) == [0, 1, 2, 3]  # the shipped four, not the cwd's one
    assert all(m.manifest_["training_data"]["runs"] == 1500 for m in pruner._models.values())
    # A path is a path, and the cwd's pickle is then refused as any other.
    assert resolve_model("./default").resolve() == (tmp_path / "default").resolve()
    with pytest.raises(ModelFileError, match="trust"):
        LyapunovPruner(model="./default")
    assert not marker.exists()


def test_names_and_missing_paths(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFileError, match=r"No model named 'mine'.*'\./mine'"):
        resolve_model("mine")  # exists in the cwd, but a bare name only names shipped models
    with pytest.raises(ModelFileError, match="No saved predictor at .*nowhere"):
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(ModelFileError, match="No saved predictor at 'sub/nowhere'"):
        resolve_model("sub/nowhere")


def test_shipped_files_match_their_pins():
    pins = json.loads(predictor.PIN_FILE.read_text())["sha256"]
    shipped = sorted(p.parent for p in predictor.MODELS_DIR.rglob("manifest.json"))
    assert shipped and not list(predictor.MODELS_DIR.rglob("*.joblib"))
    for directory in shipped:
        for name in ("manifest.json", "model.skops"):
            key = (directory / name).relative_to(predictor.MODELS_DIR).as_posix()
            assert pins[key] == predictor._sha256(directory / name), (
                f"{key} changed since it was pinned: run {predictor.PIN_COMMAND}")
    assert len(pins) == 2 * len(shipped)


def test_the_shipped_screening_predictors_load_through_their_pins():
    """"screening" reads the hyperparameters with the spectra (and losses from epoch 1);
    "default" reads none."""
    screening = load_models(resolve_model("screening"))
    assert sorted(screening) == [0, 1, 2, 3]
    assert tuple(screening[0].feature_sets) == ("hparams", "spectrum")
    assert all(tuple(screening[b].feature_sets) == ("hparams", "spectrum", "loss")
               for b in (1, 2, 3))
    # The default's manifests, not its models: loading four more (skops checks every one of
    # their thousands of arrays) would double this test; other tests load them.
    default = [read_manifest(d) for d in sorted(resolve_model("default").glob("budget-*"))]
    assert len(default) == 4 and all("hparams" not in m["feature_sets"] for m in default)
    assert all(0.0 < m.cutoff < 0.5 for m in screening.values())
    assert LyapunovPruner(model="screening")._needs_hparams()


def test_the_corpus_records_every_hyperparameter_the_screening_predictors_read():
    """The corpus exports hold each run's whole configuration, so no "hparams" feature falls
    back to a default (corpus v1 was swept with batch 32, one layer, uniform init, no clipping
    fixed; its older exports recorded only the sampled params, filled in by fill_fixed_params)."""
    from pathlib import Path

    pd = pytest.importorskip("pandas")
    root = Path(__file__).resolve().parents[1] / "studies"
    files = sorted(root.glob("corpus-*.parquet")) + sorted(root.glob("v2-*.parquet"))
    if not files:
        pytest.skip("the corpus is not here")
    needed = [f"param_{k}" for k in ("arch", "hidden", "layers", "init", "init_scale", "lr",
                                     "optimizer", "batch_size", "clip", "weight_decay")]
    for path in files:
        frame = pd.read_parquet(path, columns=needed + ["state"])
        assert not frame[needed].isna().any().any(), path.name
        if path.name.startswith("corpus-"):
            assert set(frame["param_batch_size"]) == {32} and set(frame["param_layers"]) == {1}


@pytest.fixture
def shipped(fitted, tmp_path, monkeypatch):
    """A models directory of our own, pinned, standing in for the shipped one."""
    monkeypatch.setattr(predictor, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(predictor, "PIN_FILE", tmp_path / "pins.json")
    fitted.save(tmp_path / "models" / "default" / "budget-0")
    pin_shipped_models()
    return tmp_path / "models" / "default"


def test_a_tampered_shipped_model_is_refused(fitted, shipped, tmp_path):
    assert list(load_models(resolve_model("default"))) == [0]
    # A self-consistent edit: the manifest's own sha256 still matches its model file.
    manifest = json.loads((shipped / "budget-0" / "manifest.json").read_text())
    (shipped / "budget-0" / "manifest.json").write_text(json.dumps({**manifest,
                                                                    "prune_threshold": 0.99}))
    with pytest.raises(ModelFileError, match="does not match the sha256 pinned") as err:
        load_models(resolve_model("default"))
    assert "\n" not in str(err.value) and predictor.PIN_COMMAND in str(err.value)
    assert load_models(resolve_model("default"), trust=True)[0].manifest_["prune_threshold"] == 0.99

    pin_shipped_models()
    other = StabilityPredictor(budget=0, interval=False)
    other.__dict__.update({k: v for k, v in vars(fitted).items() if k.endswith("_")})
    other.save(shipped / "budget-0")  # a consistent manifest, a different model file
    with pytest.raises(ModelFileError, match="model.skops does not match the sha256 pinned"):
        LyapunovPruner(model="default")
    # Nor does a predictor slipped in beside the pinned ones count as shipped.
    pin_shipped_models()
    fitted.save(shipped / "budget-1")
    with pytest.raises(ModelFileError, match="not one of the files pinned"):
        load_models(resolve_model("default"))


def test_a_users_own_pickle_loads_with_trust_and_converts(fitted, runs, tmp_path):
    runs = runs.head(30)
    path = fitted.save(tmp_path / "m")
    (path / "model.skops").unlink()
    joblib.dump(fitted, path / "model.joblib")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(
        {**manifest, "sha256": predictor._sha256(path / "model.joblib")}))
    with pytest.raises(ModelFileError, match="pass trust=True"):
        load(path)
    old = load(path, trust=True)
    assert np.array_equal(old.predict_proba(runs), fitted.predict_proba(runs))
    old.save(path)
    assert not (path / "model.joblib").exists()
    assert np.array_equal(load(path).predict_proba(runs), fitted.predict_proba(runs))


def test_round_trip_keeps_predictions_and_plain_attributes(fitted, runs, tmp_path):
    runs = runs.head(30)
    # What a refit may add (held-out residuals and the like) loads without any allow-list change.
    fitted.residuals_ = np.linspace(0.0, 1.0, 7)
    fitted.folds_ = [{"auroc": np.float64(0.9), "ids": np.arange(3)}, ["a", 1, None]]
    try:
        again = load(fitted.save(tmp_path / "m"))
    finally:
        del fitted.residuals_, fitted.folds_
    assert np.array_equal(again.predict_proba(runs), fitted.predict_proba(runs))
    expected = fitted.predict_loss(runs, interval=True)
    for a, b in zip(again.predict_loss(runs, interval=True), expected):
        assert np.array_equal(a, b)
    assert again.explain(runs.head(2)) == fitted.explain(runs.head(2))
    assert list(again.reference_.index) == list(fitted.reference_.index)
    assert np.array_equal(again.reference_.to_numpy(), fitted.reference_.to_numpy())
    assert np.array_equal(again.residuals_, np.linspace(0.0, 1.0, 7))
    assert again.folds_[0]["auroc"] == 0.9 and list(again.folds_[0]["ids"]) == [0, 1, 2]
    assert again.folds_[1] == ["a", 1, None]
    # pickling (joblib's parallel folds, copy.deepcopy) still gives back a Series
    assert pickle.loads(pickle.dumps(fitted)).reference_.equals(fitted.reference_)


def test_a_tree_pointing_outside_itself_is_refused(fitted, runs, tmp_path):
    """Allowing TreePredictor is allowing arrays whose indices scikit-learn's compiled loop
    trusts; a crafted one would read outside memory when predicting."""
    model = pickle.loads(pickle.dumps(fitted))
    est = model.regressor_
    tree = est._predictors[0][0]
    split = int(np.flatnonzero(tree.nodes["is_leaf"] == 0)[0])
    tree.nodes["left"][split] = 10 ** 6
    with pytest.raises(ModelFileError, match="not well formed"):
        load(model.save(tmp_path / "m"))
    tree.nodes["left"][split] = fitted.regressor_._predictors[0][0].nodes["left"][split]
    tree.nodes["feature_idx"][split] = est.n_features_in_
    with pytest.raises(ModelFileError, match="not well formed"):
        load(model.save(tmp_path / "m"))
    original = fitted.regressor_._predictors[0][0].nodes
    tree.nodes["feature_idx"][split] = original["feature_idx"][split]
    assert np.array_equal(load(model.save(tmp_path / "m")).predict_loss(runs.head(5)),
                          fitted.predict_loss(runs.head(5)))
    # categorical features: bitsets indexed by values from the file
    est._bin_mapper.is_categorical_ = np.ones_like(est._bin_mapper.is_categorical_)
    with pytest.raises(ModelFileError, match="categorical"):
        load(model.save(tmp_path / "m"))
