"""The stability predictor: P(trainable) and the final loss from a run's early training.

:class:`StabilityPredictor` is a scikit-learn estimator whose ``X`` is a trials frame (one run per
row, as :func:`lepredict.sweep.trials_frame` or an export gives it): it computes its own
features (:mod:`lepredict.features`) from the epochs ``0..budget``, so it can be cloned,
cross-validated and grid-searched like any other estimator, with the runs' study as groups.

Saved predictors are a directory holding ``model.joblib`` and ``manifest.json`` (lepredict
version, feature names, training summary, metrics, and the sha256 of ``model.joblib``).
:func:`load` checks the hash and the feature names before it unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lepredict.features import build_features, completed_runs, feature_names, outcomes

__all__ = ["ModelFileError", "StabilityPredictor", "load", "load_models", "resolve_model"]

MODEL_FILE = "model.joblib"
MANIFEST = "manifest.json"
#: Fewest runs of each class a fit accepts (the calibration's 3 folds need one each).
MIN_PER_CLASS = 3
#: Where the shipped predictors live: ``models/`` at the top of the repository (an editable
#: install, as the README sets up), or the directory named by ``LEPREDICT_MODELS``.
MODELS_DIR = Path(os.environ.get("LEPREDICT_MODELS",
                                 Path(__file__).resolve().parent.parent / "models"))


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
            raise ValueError(f"calibration must be 'sigmoid' or 'isotonic', got {self.calibration=}.")

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
            X = completed_runs(X)
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
        target = out["final_loss"].to_numpy()
        reg = clone(self.regressor) if self.regressor is not None else _default_regressor(
            self.random_state)
        self.regressor_ = reg.fit(features, target)
        self.interval_ = [_default_regressor(self.random_state, q).fit(features, target)
                          for q in (0.1, 0.9)] if self.interval else []
        self.training_summary_ = {
            "runs": int(len(y)),
            "trainable_share": round(float(np.mean(y)), 4),
            "studies": sorted(map(str, X["study"].unique())) if "study" in X else [],
            "tasks": sorted(map(str, X["task"].dropna().unique())) if "task" in X else [],
            "archs": sorted(map(str, X["param_arch"].dropna().unique()))
            if "param_arch" in X else [],
            # The horizon of the final loss it predicts, when the runs share one.
            "epochs": int(X["epochs"].iloc[0]) if "epochs" in X and X["epochs"].nunique() == 1
            else None,
        }
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """``(n, 2)``: P(untrainable), P(trainable) for each run."""
        return self.classifier_.predict_proba(self._features(X)[self.feature_names_])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Trainable (True) or not, at P(trainable) >= 0.5."""
        return self.predict_proba(X)[:, 1] >= 0.5

    def predict_loss(self, X: pd.DataFrame, *, interval: bool = False):
        """Predicted final normalised loss; with ``interval=True`` also the 10% and 90%
        quantiles, as ``(loss, low, high)``."""
        features = self._features(X)[self.feature_names_]
        loss = self.regressor_.predict(features)
        if not interval:
            return loss
        if not self.interval_:
            raise ValueError("This predictor was fitted with interval=False: no quantiles.")
        low, high = (m.predict(features) for m in self.interval_)
        return loss, np.minimum(low, loss), np.maximum(high, loss)

    def explain(self, X: pd.DataFrame, reference: pd.DataFrame | None = None,
                top: int = 5) -> list[list[tuple[str, float]]]:
        """For each run, the features that moved P(trainable) most: the change in P when a
        feature is set to its median over ``reference`` (by default the typical values stored at
        fit time), largest first."""
        features = self._features(X)[self.feature_names_]
        base = self.classifier_.predict_proba(features)[:, 1]
        ref = self.reference_ if reference is None else self._features(reference)[
            self.feature_names_].median()
        out = []
        for i in range(len(features)):
            row = features.iloc[[i]]
            probe = pd.concat([row] * len(self.feature_names_), ignore_index=True)
            for j, name in enumerate(self.feature_names_):
                probe.iloc[j, j] = ref[name]
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

    def save(self, path: str | os.PathLike, *, metrics: dict | None = None) -> Path:
        """Write ``path/model.joblib`` and ``path/manifest.json``; returns ``path``."""
        from lepredict import __version__

        if not hasattr(self, "classifier_"):
            raise ValueError("This StabilityPredictor is not fitted yet: call fit() before save().")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        joblib.dump(self, path / MODEL_FILE, compress=3)
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
            "sha256": _sha256(path / MODEL_FILE),
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> StabilityPredictor:
        """:func:`load` (a saved predictor, checked before it is unpickled)."""
        return load(path)


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
            "Fit one with `lepredict fit --data ... -o DIR`, or use model='default'."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{manifest_path} is not valid JSON ({err}); the predictor is "
                             "corrupt: fit it again.") from None
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{manifest_path} holds a JSON {type(manifest).__name__}, not an "
                             "object; the predictor is corrupt: fit it again.")
    return manifest


def load(path: str | os.PathLike) -> StabilityPredictor:
    """Load a saved predictor, refusing a file whose sha256 does not match its manifest or whose
    features differ from what this version of lepredict computes. Nothing is unpickled before
    both checks pass."""
    path = Path(path)
    manifest = read_manifest(path)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise ModelFileError(f"{model_path} is missing; the predictor is incomplete: fit it again.")
    if _sha256(model_path) != manifest.get("sha256"):
        raise ModelFileError(
            f"{model_path} does not match the sha256 in its manifest: the file is corrupt or was "
            "modified, so it will not be unpickled. Restore it, or fit the predictor again."
        )
    try:
        expected = feature_names(manifest["budget"], manifest["feature_sets"])
    except (KeyError, ValueError) as err:
        raise ModelFileError(f"{path / MANIFEST} does not describe usable features: {err}") from None
    if expected != manifest.get("feature_names"):
        raise ModelFileError(
            f"The predictor at {str(path)!r} was built for other features than this version of "
            "lepredict computes (made with lepredict "
            f"{manifest.get('lepredict_version')}); fit it again with this version."
        )
    model = joblib.load(model_path)
    if not isinstance(model, StabilityPredictor) or model.feature_names_ != expected:
        raise ModelFileError(f"{model_path} does not hold the StabilityPredictor its manifest "
                             "describes; fit it again.")
    model.manifest_ = manifest
    return model


def load_models(path: str | os.PathLike) -> dict[int, StabilityPredictor]:
    """All predictors of a model directory, by budget: ``path`` itself if it is a saved predictor,
    else each subdirectory that is one (as ``lepredict fit`` writes them)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        model = load(path)
        return {int(model.budget): model}
    subdirs = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file()) if path.is_dir() else []
    if not subdirs:
        read_manifest(path)  # raises the "no saved predictor" error
    models = [load(p) for p in subdirs]
    return {int(m.budget): m for m in models}


def resolve_model(model: str | os.PathLike) -> Path:
    """``"default"`` (or another name under the shipped ``models/``) or a path, as a path."""
    if isinstance(model, str) and os.sep not in model and not Path(model).exists():
        candidate = MODELS_DIR / model
        if candidate.exists():
            return candidate
        shipped = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) \
            if MODELS_DIR.is_dir() else []
        raise ModelFileError(f"No model named {model!r}; shipped models: {shipped or 'none'}. "
                             "Pass a path to a saved predictor instead.")
    return Path(model)


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
