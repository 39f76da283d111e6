"""The stability predictor: P(trainable) and the final loss from a run's early training.

:class:`StabilityPredictor` is a scikit-learn estimator whose ``X`` is a trials frame (one run per
row, as :func:`lepredict.sweep.trials_frame` or an export gives it): it computes its own
features (:mod:`lepredict.features`) from the epochs ``0..budget``, so it can be cloned,
cross-validated and grid-searched like any other estimator, with the runs' study as groups.

Saved predictors are a directory holding ``model.skops`` and ``manifest.json`` (lepredict
version, feature names, training summary, metrics, and the sha256 of ``model.skops``).

Loading a model file must not run code from it, whoever wrote it. A skops file is a description
of objects, not a program: :func:`load` builds one only if every type it names is one that skops
trusts (builtins, numpy, scikit-learn estimators) or one of :data:`ALLOWED_TYPES`, whatever
``trust`` says. The manifest's sha256 only catches corruption, since whoever writes the file
writes the manifest beside it; the shipped predictors are also checked against the hashes pinned
inside the package (``lepredict/shipped_models.json``), so that ``model="default"`` is the model
this release shipped. A pickle (``model.joblib``, the format before skops) can run anything when
loaded, so it is loaded only with ``trust=True``.

Maintainers: after refitting the shipped predictors, pin them again with
:func:`pin_shipped_models` (:data:`PIN_COMMAND`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import threading
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lepredict.features import (build_features, completed_runs, feature_names, hparam_column,
                                outcomes, unknown_outcomes)

__all__ = ["ModelFileError", "StabilityPredictor", "load", "load_models", "pin_shipped_models",
           "resolve_model"]

MODEL_FILE = "model.skops"
#: The pickle format of lepredict 0.1: loaded only with ``trust=True``, since unpickling runs code.
LEGACY_MODEL_FILE = "model.joblib"
MANIFEST = "manifest.json"
#: The types a fitted StabilityPredictor holds that skops does not trust by default (it trusts
#: builtins, numpy arrays and scalars, and scikit-learn's estimators). Each is constructed
#: without calling its ``__init__`` and given its saved attributes, which runs no code from the
#: file. Anything else named in a model file is refused, with or without ``trust``: a new fitted
#: attribute that is a number, a string, a list, a dict or a numpy array needs nothing here.
ALLOWED_TYPES = (
    "lepredict.predictor.StabilityPredictor",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)
#: sha256 of every file of the shipped predictors, by path under :data:`MODELS_DIR`.
PIN_FILE = Path(__file__).resolve().parent / "shipped_models.json"
#: The maintainer's command that pins the shipped predictors again after a refit.
PIN_COMMAND = ('python -c "from lepredict.predictor import pin_shipped_models; '
               'pin_shipped_models()"')
#: What the errors tell a user to pass when they trust a file that lepredict will not load alone.
TRUST_HINT = "trust=True (CLI: --trust-model)"
#: P(trainable) cut-off of a predictor that carries none of its own (see ``cutoff``).
DEFAULT_CUTOFF = 0.5
#: Fewest runs of each class a fit accepts (the calibration's 3 folds need one each).
MIN_PER_CLASS = 3
#: The classifier grid ``lepredict fit --search`` chooses from (``param_grid``), and that
#: ``lepredict evaluate --nested`` searches inside each outer fold.
SEARCH_GRID = {"histgradientboostingclassifier__learning_rate": [0.03, 0.1],
               "histgradientboostingclassifier__max_leaf_nodes": [7, 15, 31]}
#: Where the shipped predictors live: ``models/`` at the top of the repository (an editable
#: install, as the README sets up), or the directory named by ``LEPREDICT_MODELS``.
#: Either way its files load only if they match :data:`PIN_FILE` (or with ``trust=True``).
MODELS_DIR = Path(os.environ.get("LEPREDICT_MODELS",
                                 Path(__file__).resolve().parent.parent / "models"))


#: Per thread: whether :meth:`StabilityPredictor.fit` says so when its classifier came out
#: constant (see :func:`constant_fits_unwarned`).
_fit_warnings = threading.local()


@contextlib.contextmanager
def constant_fits_unwarned():
    """Within this block, in this thread only, :meth:`StabilityPredictor.fit` does not warn
    when its classifier gives every run one P(trainable); ``training_summary_["constant"]``
    still says so. For callers that refit often and say it once themselves (the pruner's online
    mode). ``warnings.catch_warnings`` would do the same by swapping the process's filters,
    which other threads (Optuna's ``n_jobs``, its heartbeat) swap too."""
    before = getattr(_fit_warnings, "quiet", False)
    _fit_warnings.quiet = True
    try:
        yield
    finally:
        _fit_warnings.quiet = before


class ModelFileError(ValueError):
    """A saved predictor that cannot be trusted or used: missing, corrupt, tampered with, or
    built for other features."""


def _default_classifier(random_state: int):
    return make_pipeline(
        StandardScaler(),
        HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                       l2_regularization=1.0, random_state=random_state),
    )


def _default_regressor(random_state: int, quantile: float | None = None):
    kwargs = {"loss": "quantile", "quantile": quantile} if quantile is not None else {}
    return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                         l2_regularization=1.0, random_state=random_state,
                                         **kwargs)


class StabilityPredictor(ClassifierMixin, BaseEstimator):
    """Predicts from early training whether a configuration will train, and its final loss.

    Two heads: a calibrated classifier giving P(trainable), where trainable means the run did not
    diverge and its final normalised loss is under the threshold, and a regressor giving the final
    normalised loss (clipped to ``[0, features.TARGET_CAP]``), with a 10-90% interval from two
    quantile regressors.

    Args:
        budget: the prediction looks at epochs ``0..budget`` (0 = at initialisation only).
        feature_sets: which of :data:`lepredict.features.FEATURE_SETS` to use.
        threshold: trainability threshold on the final normalised loss; ``None`` uses each run's
            task default.
        classifier: an unfitted classifier on the feature matrix; ``None`` for a scaled
            histogram gradient-boosting classifier.
        regressor: likewise for the final loss.
        calibration: ``"sigmoid"`` or ``"isotonic"`` (``CalibratedClassifierCV``).
        interval: also fit the 10% and 90% quantile regressors of the final loss
            (``predict_loss(..., interval=True)``).
        param_grid: if given, the classifier's hyperparameters are chosen by ``GridSearchCV`` over
            this grid, scored by AUROC with grouped folds (groups = study, so no configuration
            leaks between folds; stratified folds when there are fewer than 3 studies).
        random_state: seeds the default models and the folds.

    Example:
        >>> from lepredict.predictor import StabilityPredictor
        >>> from lepredict.sweep import read_trials
        >>> runs = read_trials("studies/corpus-digits.parquet")  # doctest: +SKIP
        >>> model = StabilityPredictor(budget=1).fit(runs)  # doctest: +SKIP
        >>> model.predict_proba(runs.head(3))[:, 1]  # doctest: +SKIP
    """

    def __init__(self, *, budget: int = 2, feature_sets: Sequence[str] = ("spectrum", "loss"),
                 threshold: float | None = None, classifier=None, regressor=None,
                 calibration: str = "sigmoid", param_grid: dict | None = None,
                 interval: bool = True, random_state: int = 0):
        self.budget = budget
        self.feature_sets = feature_sets
        self.threshold = threshold
        self.classifier = classifier
        self.regressor = regressor
        self.calibration = calibration
        self.param_grid = param_grid
        self.interval = interval
        self.random_state = random_state

    def _validate(self) -> None:
        feature_names(self.budget, self.feature_sets)  # raises on a bad budget or set
        if self.calibration not in ("sigmoid", "isotonic"):
            raise ValueError(f"calibration must be 'sigmoid' or 'isotonic', got "
                             f"calibration={self.calibration!r}.")

    @staticmethod
    def _check_frame(X) -> None:
        if not isinstance(X, pd.DataFrame):
            raise TypeError("X must be a trials frame (pandas DataFrame, one run per row, as "
                            "lepredict.sweep.read_trials gives it), got "
                            f"{type(X).__name__}.")

    def _features(self, X) -> pd.DataFrame:
        self._check_frame(X)
        return build_features(X, budget=self.budget, sets=self.feature_sets)

    def fit(self, X: pd.DataFrame, y=None, groups=None) -> StabilityPredictor:
        """Fit both heads on finished runs.

        Args:
            X: trials frame; only finished runs (``state == "COMPLETE"``) are used when ``y`` is
                not given.
            y: trainable labels overriding those derived from ``X``; ``X`` must then hold exactly
                the runs they label.
            groups: fold groups for ``param_grid`` search; ``None`` uses ``X["study"]``.
        """
        self._validate()
        self._check_frame(X)
        if y is None:
            unknown = int(unknown_outcomes(X).sum())
            X = completed_runs(X)
            if len(X) == 0 and unknown:
                raise ValueError(f"No finished runs to fit on: the {unknown} finished trial(s) "
                                 "have no final loss (losses given for the early epochs only); "
                                 "give val_loss at the last epoch too.")
        if len(X) == 0:
            raise ValueError("No finished runs to fit on: the frame holds no trial with "
                             "state COMPLETE.")
        out = outcomes(X, threshold=self.threshold)
        y = out["trainable"].to_numpy() if y is None else np.asarray(y).astype(bool)
        if min(y.sum(), (~y).sum()) < MIN_PER_CLASS:
            raise ValueError(
                f"Of {len(y)} runs, {int(y.sum())} are trainable and {int((~y).sum())} are not: "
                f"the classifier needs at least {MIN_PER_CLASS} of each. Add runs from a wider "
                "search space, or change threshold=."
            )
        features = self._features(X)
        self.feature_names_ = list(features.columns)
        self.reference_ = features.median()
        self.classes_ = np.array([False, True])
        clf = clone(self.classifier) if self.classifier is not None else _default_classifier(
            self.random_state)
        if self.param_grid:
            groups = np.asarray(X["study"] if groups is None else groups)
            if len(np.unique(groups)) >= 3:
                cv = GroupKFold(n_splits=min(5, len(np.unique(groups))))
            else:
                cv, groups = StratifiedKFold(5, shuffle=True, random_state=self.random_state), None
            search = GridSearchCV(clf, self.param_grid, scoring="roc_auc", cv=cv, n_jobs=None)
            search.fit(features, y, groups=groups)
            clf = search.best_estimator_
            self.best_params_ = search.best_params_
            self.search_score_ = float(search.best_score_)
        self.classifier_ = CalibratedClassifierCV(clf, method=self.calibration, cv=3).fit(
            features, y)
        fitted_p = self.classifier_.predict_proba(features)[:, 1]
        constant = bool(np.ptp(fitted_p) == 0)
        if constant and not getattr(_fit_warnings, "quiet", False):
            # On a few dozen runs the default trees (20 runs per leaf, fitted on two thirds of
            # them by the calibration) cannot split: one P for every run, whatever it shows.
            warnings.warn(f"StabilityPredictor.fit: the classifier gives all {len(y)} runs the "
                          f"same P(trainable), {fitted_p[0]:.3f}: it found nothing to split on "
                          "in so few runs; fit on more (the shipped predictors saw 1,504).",
                          UserWarning, stacklevel=2)
        target = out["final_loss"].to_numpy()
        reg = clone(self.regressor) if self.regressor is not None else _default_regressor(
            self.random_state)
        self.regressor_ = reg.fit(features, target)
        self.interval_ = [_default_regressor(self.random_state, q).fit(features, target)
                          for q in (0.1, 0.9)] if self.interval else []
        if self.interval:
            self.oof_loss_, self.oof_residual_ = self._held_out_residuals(
                features, target, X, reg)
        archs = hparam_column(X, "arch")
        self.training_summary_ = {
            "runs": int(len(y)),
            "trainable_share": round(float(np.mean(y)), 4),
            "studies": sorted(map(str, X["study"].unique())) if "study" in X else [],
            "tasks": sorted(map(str, X["task"].dropna().unique())) if "task" in X else [],
            "archs": sorted(map(str, archs.dropna().unique())) if archs is not None else [],
            # The horizon of the final loss it predicts, when the runs share one.
            "epochs": int(X["epochs"].iloc[0]) if "epochs" in X and X["epochs"].nunique() == 1
            else None,
            # One P(trainable) for every run: the classifier learnt nothing.
            "constant": constant,
        }
        return self

    def _held_out_residuals(self, features: pd.DataFrame, target: np.ndarray, X: pd.DataFrame,
                            reg) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-fold predictions of the final loss and their residuals (observed minus
        predicted). Folds hold out whole studies where there are enough, so the residuals
        measure the error on a study (a task) the regressor never saw: the error a user's own
        study meets."""
        from sklearn.model_selection import KFold, cross_val_predict

        studies = np.asarray(X["study"]) if "study" in X else np.zeros(len(X))
        if len(np.unique(studies)) >= 3:
            cv, groups = GroupKFold(n_splits=min(5, len(np.unique(studies)))), studies
        else:
            cv, groups = KFold(5, shuffle=True, random_state=self.random_state), None
        held_out = cross_val_predict(clone(reg), features, target, cv=cv, groups=groups)
        return held_out.astype(float), (target - held_out).astype(float)

    @property
    def cutoff(self) -> float:
        """The P(trainable) below which a run is called untrainable: the predictor's own
        ``prune_threshold_`` (set by ``lepredict fit``: the P under which 1% of the trainable
        runs of its corpus fell in cross-validation), else :data:`DEFAULT_CUTOFF`. Both
        :class:`~lepredict.LyapunovPruner` and ``lepredict predict-stability`` use it."""
        own = getattr(self, "prune_threshold_", None)
        return DEFAULT_CUTOFF if own is None else float(own)

    def fit_residuals(self, X: pd.DataFrame) -> StabilityPredictor:
        """Recompute the held-out residuals behind :meth:`prob_beats` on the finished runs of
        ``X`` (those the predictor was fitted on), without refitting either head: how a saved
        predictor fitted before they existed gets them. Returns ``self``."""
        X = completed_runs(X)
        features = self._features(X)[self.feature_names_]
        target = outcomes(X, threshold=self.threshold)["final_loss"].to_numpy()
        self.oof_loss_, self.oof_residual_ = self._held_out_residuals(features, target, X,
                                                                      self.regressor_)
        return self

    def prob_beats(self, loss: float, other: float) -> float:
        """P(a run predicted to reach ``loss`` ends below one predicted to reach ``other``).

        Both predictions come from this predictor at the same budget, so the comparison is like
        with like whatever the user's horizon, batch size or loss scale. Each run's final loss is
        its prediction plus a residual drawn from the held-out residuals of runs with similar
        predictions (the nearest tenth, at least 50): a locally adaptive conformal distribution.
        NaN for a predictor fitted without ``interval``.
        """
        if getattr(self, "oof_residual_", None) is None or len(self.oof_residual_) == 0:
            return math.nan
        mine = np.sort(self._local_residuals(loss))
        theirs = self._local_residuals(other)
        # P(loss + r_mine < other + r_theirs), averaged over r_theirs.
        below = np.searchsorted(mine, other - loss + theirs, side="left")
        return float(below.mean() / len(mine))

    def _local_residuals(self, loss: float) -> np.ndarray:
        n = len(self.oof_loss_)
        size = min(n, max(50, n // 10))
        nearest = np.argpartition(np.abs(self.oof_loss_ - loss), size - 1)[:size]
        return self.oof_residual_[nearest]

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """``(n, 2)``: P(untrainable), P(trainable) for each run."""
        features = self._features(X)[self.feature_names_]
        with _few_threads(len(features)):
            return self.classifier_.predict_proba(features)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Trainable (True) or not, at P(trainable) >= 0.5."""
        return self.predict_proba(X)[:, 1] >= 0.5

    def predict_loss(self, X: pd.DataFrame, *, interval: bool = False):
        """Predicted final normalised loss; with ``interval=True`` also the 10% and 90%
        quantiles, as ``(loss, low, high)``."""
        features = self._features(X)[self.feature_names_]
        with _few_threads(len(features)):
            # A loss is not negative: the regressors' extrapolation below zero is cut there.
            loss = np.maximum(self.regressor_.predict(features), 0.0)
            if not interval:
                return loss
            if not self.interval_:
                raise ValueError("This predictor was fitted with interval=False: no quantiles.")
            low, high = (m.predict(features) for m in self.interval_)
        return loss, np.clip(low, 0.0, loss), np.maximum(high, loss)

    def explain(self, X: pd.DataFrame, reference: pd.DataFrame | None = None,
                top: int = 5) -> list[list[tuple[str, float]]]:
        """For each run, the features that moved P(trainable) most: the change in P when a
        feature is set to its median over ``reference`` (by default the typical values stored at
        fit time), largest first."""
        features = self._features(X)[self.feature_names_]
        with _few_threads(len(features)):
            base = self.classifier_.predict_proba(features)[:, 1]
        ref = self.reference_ if reference is None else self._features(reference)[
            self.feature_names_].median()
        out = []
        for i in range(len(features)):
            row = features.iloc[[i]]
            probe = pd.concat([row] * len(self.feature_names_), ignore_index=True)
            for j, name in enumerate(self.feature_names_):
                probe.iloc[j, j] = ref[name]
            with _few_threads(len(probe)):
                delta = base[i] - self.classifier_.predict_proba(probe)[:, 1]
            order = np.argsort(-np.abs(delta))[:top]
            out.append([(self.feature_names_[j], float(delta[j])) for j in order])
        return out

    def score(self, X: pd.DataFrame, y=None, sample_weight=None) -> float:
        """Accuracy of :meth:`predict` on finished runs (labels derived as in :meth:`fit`)."""
        if y is None:
            X = completed_runs(X)
            y = outcomes(X, threshold=self.threshold)["trainable"].to_numpy()
        return super().score(X, y, sample_weight=sample_weight)

    def __getstate__(self):
        state = super().__getstate__()
        # skops cannot store a pandas Series (its blocks have no plain state), and a model file
        # should not need pandas' internals: the medians travel as names and floats.
        ref = state.get("reference_")
        if isinstance(ref, pd.Series):
            state = {**state, "reference_": {"names": [str(n) for n in ref.index],
                                             "values": ref.to_numpy(dtype=float)}}
        return state

    def __setstate__(self, state):
        ref = state.get("reference_")
        if isinstance(ref, dict):
            state = {**state, "reference_": pd.Series(np.asarray(ref["values"], dtype=float),
                                                      index=list(ref["names"]))}
        super().__setstate__(state)

    def save(self, path: str | os.PathLike, *, metrics: dict | None = None) -> Path:
        """Write ``path/model.skops`` and ``path/manifest.json``; returns ``path``."""
        from importlib.metadata import version

        import skops.io

        __version__ = version("lepredict")
        if not hasattr(self, "classifier_"):
            raise ValueError("This StabilityPredictor is not fitted yet: call fit() before save().")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        skops.io.dump(self, path / MODEL_FILE, compression=zipfile.ZIP_DEFLATED)
        # A pickle left beside the new file would be what an older lepredict loads.
        (path / LEGACY_MODEL_FILE).unlink(missing_ok=True)
        manifest = {
            "lepredict_version": __version__,
            "budget": int(self.budget),
            "feature_sets": list(self.feature_sets),
            "feature_names": self.feature_names_,
            "threshold": self.threshold,
            "training_data": self.training_summary_,
            "params": {k: v for k, v in self.get_params().items()
                       if isinstance(v, (int, float, str, list, tuple, type(None)))},
            "metrics": metrics or {},
            "model_selection": {"best_params": getattr(self, "best_params_", None),
                                "grouped_cv_auroc": getattr(self, "search_score_", None)},
            "prune_threshold": getattr(self, "prune_threshold_", None),
            "model_file": MODEL_FILE,
            "sha256": _sha256(path / MODEL_FILE),
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, trust: bool = False) -> StabilityPredictor:
        """:func:`load` (a saved predictor, checked before anything in it is built)."""
        return load(path, trust=trust)


#: Rows below which predictions run on one OpenMP thread.
_SMALL = 2048


def _few_threads(rows: int):
    """One OpenMP thread for small predictions. The gradient-boosting predict loop parallelises
    over rows: for the one row a pruner predicts, threads gain nothing, and inside a training
    process whose cores are busy, OpenMP's waiting threads made one prediction take 14 s instead
    of 0.07 s (measured on 2 loaded cores)."""
    from contextlib import nullcontext

    if rows >= _SMALL:
        return nullcontext()
    return _openmp().limit(limits=1, user_api="openmp")


@functools.lru_cache(maxsize=1)
def _openmp():
    # Finding the loaded thread pools scans the process's libraries (27 ms): once is enough.
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a saved predictor, with a clear error if there is none."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelFileError(
            f"No saved predictor at {str(path)!r}: expected {MANIFEST} and {MODEL_FILE} there. "
            "Fit one with `lepredict fit --data ... -o DIR`; a shipped model goes by its name "
            "where a model is asked for (LyapunovPruner(model='default'), --model default), "
            "and load_models(resolve_model('default')) loads its predictors."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{manifest_path} is not valid JSON ({err}); the predictor is "
                             "corrupt: fit it again.") from None
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{manifest_path} is not a predictor's manifest (a JSON object); "
                             "the predictor is corrupt: fit it again.")
    return manifest


def _shipped_key(file: Path) -> str | None:
    """``file``'s path under :data:`MODELS_DIR` (the key of its pinned hash), or None for a file
    that is not shipped."""
    try:
        return file.resolve().relative_to(Path(MODELS_DIR).resolve()).as_posix()
    except ValueError:
        return None


def _pinned() -> dict[str, str]:
    try:
        return json.loads(PIN_FILE.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no pins: no file under MODELS_DIR counts as shipped-and-intact


def _check_pinned(files: Sequence[Path], trust: bool) -> None:
    """Refuse a file of the shipped predictors that is not the one this release pinned."""
    pins = _pinned()
    for file in files:
        key = _shipped_key(file)
        if key is None or trust:
            continue
        if key not in pins:
            raise ModelFileError(
                f"{file} is in the shipped models directory ({MODELS_DIR}) but is not one of "
                f"the files pinned in {PIN_FILE.name}, so it is not loaded as a shipped model; "
                f"after a refit, run `{PIN_COMMAND}`, or pass {TRUST_HINT}."
            )
        if _sha256(file) != pins[key]:
            raise ModelFileError(
                f"{file} does not match the sha256 pinned for the shipped model in "
                f"{PIN_FILE.name}: it was modified, so it is not loaded. Restore it (git "
                f"checkout models/); after a refit, run `{PIN_COMMAND}`; "
                f"or pass {TRUST_HINT} to load it as it is."
            )


def _load_skops(model_path: Path):
    import skops.io
    from skops.io.exceptions import UntrustedTypesFoundException

    try:
        # skops audits every type the file names (as get_untrusted_types does) before it builds
        # anything; one pass instead of two, since parsing the trees is most of the load time.
        return skops.io.load(model_path, trusted=list(ALLOWED_TYPES))
    except UntrustedTypesFoundException as err:
        # trust does not widen this: a StabilityPredictor never holds these types.
        foreign = ", ".join(sorted(err.args[0])) if err.args and isinstance(
            err.args[0], (set, frozenset, list)) else str(err)
        raise ModelFileError(
            f"{model_path} names types a StabilityPredictor does not hold ({foreign}), so it is "
            "not loaded, not even with trust=True / --trust-model; inspect it with "
            "skops.io.get_untrusted_types if you expected them."
        ) from None
    except Exception as err:  # a broken zip or schema
        raise ModelFileError(f"{model_path} is not a readable skops file ({type(err).__name__}: "
                             f"{err}); the predictor is corrupt: fit it again.") from None


def _hist_gradient_boosting_models(obj, seen=None):
    """The histogram gradient-boosting estimators anywhere in ``obj``'s attributes."""
    from sklearn.ensemble._hist_gradient_boosting.gradient_boosting import (
        BaseHistGradientBoosting,
    )

    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, np.ndarray, np.generic, pd.Series)):
        return
    seen.add(id(obj))
    if isinstance(obj, BaseHistGradientBoosting):
        yield obj
    children = (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple))
                else vars(obj).values() if hasattr(obj, "__dict__") else ())
    for child in children:
        yield from _hist_gradient_boosting_models(child, seen)


def _check_trees(model, model_path: Path) -> None:
    """Refuse trees whose node indices would send scikit-learn's prediction loop (compiled
    without bounds checks) outside its arrays: a crafted file could otherwise crash the
    process or read arbitrary memory when it predicts, though loading it ran nothing."""
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    def numeric_only(est) -> bool:
        # Categorical features make predict() write into bitsets at indices read from the file
        # (the bin mapper's known categories), again unchecked; a StabilityPredictor has none.
        cat = getattr(getattr(est, "_bin_mapper", None), "is_categorical_", None)
        return (getattr(est, "_preprocessor", None) is None
                and getattr(est, "is_categorical_", None) is None
                and (cat is None or (isinstance(cat, np.ndarray) and not cat.any())))

    for est in _hist_gradient_boosting_models(model):
        n_features = getattr(est, "n_features_in_", None)
        if not numeric_only(est):
            raise ModelFileError(
                f"{model_path} holds a gradient-boosting model with categorical features, which "
                "a StabilityPredictor never has, so it is not loaded; the file is corrupt or "
                "crafted."
            )
        for tree in (t for trees in getattr(est, "_predictors", []) for t in trees):
            nodes = getattr(tree, "nodes", None)
            ok = (isinstance(n_features, (int, np.integer)) and isinstance(nodes, np.ndarray)
                  and nodes.dtype == PREDICTOR_RECORD_DTYPE and nodes.ndim == 1 and len(nodes))
            if ok:
                split = nodes["is_leaf"] == 0
                own = np.flatnonzero(split)
                # children after their parent: every walk ends, inside the array
                ok = (not nodes["is_categorical"][split].any()  # all features are numeric
                      and np.all((nodes["feature_idx"][split] >= 0)
                                 & (nodes["feature_idx"][split] < n_features))
                      and all(np.all((nodes[side][split] > own)
                                     & (nodes[side][split] < len(nodes)))
                              for side in ("left", "right")))
            if not ok:
                raise ModelFileError(
                    f"{model_path} holds a gradient-boosting tree that is not well formed (node "
                    "indices out of range), so it is not loaded; the file is corrupt or crafted."
                )


def load(path: str | os.PathLike, *, trust: bool = False) -> StabilityPredictor:
    """Load a saved predictor without running code from its files.

    Checked before anything is built: the model file's sha256 against the manifest (corruption),
    against the hash pinned in the package for a shipped predictor (under :data:`MODELS_DIR`),
    and the feature names against what this version of lepredict computes. A skops file is then
    built only if it names no type outside those skops trusts and :data:`ALLOWED_TYPES`.

    Args:
        path: a directory written by :meth:`StabilityPredictor.save` (``lepredict fit``).
        trust: the user vouches for the files: a legacy pickle (``model.joblib``) is unpickled,
            which runs whatever code it holds, and a shipped file that differs from its pin is
            loaded. A skops file still loads only the allowed types.
    """
    path = Path(path)
    manifest = read_manifest(path)
    model_path = path / MODEL_FILE
    legacy = not model_path.is_file() and (path / LEGACY_MODEL_FILE).is_file()
    if legacy:
        model_path = path / LEGACY_MODEL_FILE
    if not model_path.is_file():
        raise ModelFileError(f"{model_path} is missing; the predictor is incomplete: fit it again.")
    _check_pinned([model_path, path / MANIFEST], trust)
    if _sha256(model_path) != manifest.get("sha256"):
        raise ModelFileError(
            f"{model_path} does not match the sha256 in its manifest: the file is corrupt or was "
            "modified, so it will not be loaded. Restore it, or fit the predictor again."
        )
    try:
        expected = feature_names(manifest["budget"], manifest["feature_sets"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{path / MANIFEST} does not describe usable features: {err}") from None
    if expected != manifest.get("feature_names"):
        raise ModelFileError(
            f"The predictor at {str(path)!r} was built for other features than this version of "
            "lepredict computes (made with lepredict "
            f"{manifest.get('lepredict_version')}); fit it again with this version."
        )
    if legacy:
        if not trust:
            raise ModelFileError(
                f"{model_path} is a pickle (lepredict 0.1's format), and unpickling runs any code "
                f"the file holds, so it is not loaded; if you trust whoever wrote it, pass "
                f"{TRUST_HINT}, then re-save it with .save() to convert it to {MODEL_FILE}."
            )
        import joblib

        model = joblib.load(model_path)
    else:
        model = _load_skops(model_path)
    if not isinstance(model, StabilityPredictor) or getattr(
            model, "feature_names_", None) != expected:
        raise ModelFileError(f"{model_path} does not hold the StabilityPredictor its manifest "
                             "describes; fit it again.")
    _check_trees(model, model_path)
    model.manifest_ = manifest
    return model


def load_models(path: str | os.PathLike, *, trust: bool = False) -> dict[int, StabilityPredictor]:
    """All predictors of a model directory, by budget: ``path`` itself if it is a saved predictor,
    else each subdirectory that is one (as ``lepredict fit`` writes them). ``trust``: as in
    :func:`load`."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        model = load(path, trust=trust)
        return {int(model.budget): model}
    subdirs = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file()) if path.is_dir() else []
    if not subdirs:
        read_manifest(path)  # raises the "no saved predictor" error
    models = [load(p, trust=trust) for p in subdirs]
    return {int(m.budget): m for m in models}


def _is_name(model) -> bool:
    # A bare word names a shipped model; anything that looks like a path is one. Only a str can
    # be a name: a Path object is always a path.
    return (isinstance(model, str) and bool(model) and model not in (".", "..")
            and not model.startswith("~")
            and not any(sep and sep in model for sep in ("/", os.sep, os.altsep)))


def resolve_model(model: str | os.PathLike) -> Path:
    """``"default"`` (or another name of a shipped model) or a path, as a path.

    A bare name always means the shipped model under :data:`MODELS_DIR`, never a directory of
    that name where the program happens to run: a path needs a separator (``./default``). A path
    that does not exist is an error naming it.
    """
    if _is_name(model):
        candidate = Path(MODELS_DIR) / model
        if candidate.is_dir():
            return candidate
        shipped = sorted(p.name for p in Path(MODELS_DIR).iterdir() if p.is_dir()) \
            if Path(MODELS_DIR).is_dir() else []
        if Path(model).suffix:  # a file's name: no predictor lepredict saves is one file
            raise ModelFileError(
                f"No model named {model!r} is shipped (shipped: {shipped or 'none'}), and a "
                "model here is a lepredict predictor, not your network, and not one file: give "
                "a shipped name, or the directory a predictor was saved to (lepredict fit -o "
                "DIR; StabilityPredictor.save), such as './DIR'.")
        raise ModelFileError(f"No model named {model!r} is shipped (shipped: {shipped or 'none'}); "
                             f"for a saved predictor in a directory, pass its path, such as "
                             f"'./{model}'.")
    path = Path(os.fspath(model)).expanduser()
    if not path.exists():
        raise ModelFileError(f"No saved predictor at {str(model)!r}: no such directory.")
    return path


def pin_shipped_models() -> Path:
    """Write :data:`PIN_FILE`: the sha256 of each shipped predictor's model file and manifest.

    For maintainers, after refitting the shipped predictors (:data:`PIN_COMMAND`): the package
    then loads exactly these files as its shipped models. Pickles cannot be pinned: re-save
    them first.
    """
    root = Path(MODELS_DIR).resolve()
    pins = {}
    for manifest in sorted(root.rglob(MANIFEST)):
        if not (manifest.parent / MODEL_FILE).is_file():
            raise ModelFileError(f"{manifest.parent} has no {MODEL_FILE}: re-save it "
                                 f"(StabilityPredictor.save) before pinning.")
        for file in (manifest, manifest.parent / MODEL_FILE):
            pins[file.relative_to(root).as_posix()] = _sha256(file)
    if not pins:
        raise ModelFileError(f"No saved predictors under {str(root)!r} to pin.")
    PIN_FILE.write_text(json.dumps({
        "comment": "sha256 of the shipped predictors' files under models/; regenerate after a "
                   "refit with lepredict.predictor.pin_shipped_models()",
        "sha256": pins}, indent=2) + "\n")
    return PIN_FILE


def metric_table(y_true, proba, loss_true, loss_pred) -> dict[str, float]:
    """AUROC, average precision and Brier score of P(trainable); Spearman correlation and MAE
    of the predicted final loss."""
    from scipy.stats import spearmanr
    from sklearn.metrics import (average_precision_score, brier_score_loss,
                                 mean_absolute_error, roc_auc_score)

    y_true = np.asarray(y_true, bool)
    two = len(np.unique(y_true)) == 2
    rho = spearmanr(loss_true, loss_pred).statistic if np.ptp(loss_pred) > 0 else math.nan
    return {
        "auroc": float(roc_auc_score(y_true, proba)) if two else math.nan,
        "ap": float(average_precision_score(y_true, proba)) if two else math.nan,
        "brier": float(brier_score_loss(y_true, proba)),
        "spearman": float(rho),
        "mae": float(mean_absolute_error(loss_true, loss_pred)),
        "n": int(len(y_true)),
        "trainable_share": float(y_true.mean()),
    }
