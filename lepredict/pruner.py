"""Optuna pruner plugin: :class:`LyapunovPruner` and the helpers that feed it spectra."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

from lepredict.features import completed_runs
from lepredict.lyapunov import LyapunovSpectrum, lyapunov_spectrum
from lepredict.predictor import StabilityPredictor, load_models, resolve_model
from lepredict.sweep import ATTR, _jsonable, trial_row

__all__ = ["LyapunovPruner", "measure_and_report", "report_spectrum"]

_MODES = ("model", "online", "both")
#: P(trainable) threshold for predictors that carry none of their own.
DEFAULT_THRESHOLD = 0.5


def report_spectrum(trial: optuna.Trial, spectrum: LyapunovSpectrum | Mapping, step: int, *,
                    chance_loss: float | None = None) -> None:
    """Store a spectrum measured at ``step`` in the trial, where :class:`LyapunovPruner` (and
    ``lepredict analyze``) read it. Call it before ``trial.report(loss, step)``.

    Args:
        trial: the running trial.
        spectrum: a :class:`lepredict.LyapunovSpectrum`, or a dict with ``"mean"`` and ``"std"``
            lists (descending) and optionally ``"diverged"`` (share of trajectories).
        step: the epoch, 0 being the initialisation.
        chance_loss: the loss of the best constant prediction on the task. Give it (once is
            enough) if the values you ``trial.report`` are raw losses; leave it out if they are
            already normalised (loss / chance loss), as ``lepredict sweep`` reports them.
    """
    if isinstance(spectrum, LyapunovSpectrum):
        spec = {"mean": spectrum.mean.tolist(), "std": spectrum.std.tolist(),
                "diverged": float(spectrum.diverged.float().mean()), "n": int(spectrum.n)}
    elif isinstance(spectrum, Mapping) and "mean" in spectrum:
        mean = [float(v) for v in spectrum["mean"]]
        spec = {"mean": mean, "std": [float(v) for v in spectrum.get("std", [0.0] * len(mean))],
                "diverged": float(spectrum.get("diverged", 0.0)), "n": len(mean)}
    else:
        raise TypeError("spectrum must be a LyapunovSpectrum or a dict with 'mean' and 'std' "
                        f"lists, got {type(spectrum).__name__}.")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int (the epoch), got {step=}.")
    trial.set_user_attr(f"{ATTR}spectrum:{step}", _jsonable(spec))
    if chance_loss is not None:
        trial.set_user_attr(f"{ATTR}chance_loss", float(chance_loss))


def measure_and_report(trial: optuna.Trial, rnn: torch.nn.Module, probe: torch.Tensor, step: int,
                       **kwargs) -> LyapunovSpectrum:
    """Measure the spectrum of ``rnn`` on a probe batch of task inputs (in eval mode, without
    gradients) and :func:`report_spectrum` it, in one call; returns the spectrum.

    ``kwargs`` go to :func:`lepredict.lyapunov_spectrum` (``warmup``, ``k``...) except
    ``chance_loss``, which goes to :func:`report_spectrum`.
    """
    chance = kwargs.pop("chance_loss", None)
    was_training = rnn.training
    rnn.eval()
    try:
        with torch.no_grad():
            spec = lyapunov_spectrum(rnn, probe, **kwargs)
    finally:
        rnn.train(was_training)
    report_spectrum(trial, spec, step, chance_loss=chance)
    return spec


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float, trust: bool) -> dict[int, StabilityPredictor]:
    return load_models(path, trust=trust)


def _models(model, trust: bool = False) -> dict[int, StabilityPredictor]:
    if isinstance(model, StabilityPredictor):
        return {int(model.budget): model}
    path = resolve_model(model)
    manifest_dirs = [path] if (path / "manifest.json").exists() else list(path.glob("*/"))
    mtime = max((p.stat().st_mtime for p in manifest_dirs), default=0.0)
    return _load_cached(str(path), mtime, bool(trust))


def _predict(model: StabilityPredictor, frame: pd.DataFrame) -> tuple[float, float]:
    """P(trainable) and an optimistic final loss: the 10% quantile, or NaN for a predictor
    fitted without the interval (its point prediction is no optimistic bound)."""
    p = float(model.predict_proba(frame)[0, 1])
    if model.interval_:
        return p, float(model.predict_loss(frame, interval=True)[1][0])
    return p, math.nan


def _same_horizon(study: optuna.Study, models) -> bool:
    """False when the study (as ``lepredict sweep`` records it) trains for another number of
    epochs than the predictors' corpus did, so its final values are not what they predict."""
    epochs = study.user_attrs.get(f"{ATTR}setup", {}).get("epochs")
    horizons = {getattr(m, "training_summary_", {}).get("epochs") for m in models}
    return epochs is None or horizons <= {None, epochs}


def _best_value(study: optuna.Study) -> float | None:
    """The best finite final value of a single-objective minimising study, if any, normalised
    by the chance loss where the trial reported one (its values are then raw losses)."""
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MINIMIZE:
        return None
    values = [t.value / float(t.user_attrs.get(f"{ATTR}chance_loss", 1.0))
              for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.value is not None and math.isfinite(t.value)]
    return min(values) if values else None


def _pick(models: Mapping[int, StabilityPredictor], step: int) -> StabilityPredictor | None:
    usable = [b for b in models if b <= step]
    return models[max(usable)] if usable else None


@lru_cache(maxsize=16)
def _task_threshold(name: str, options: str) -> float | None:
    import json

    from lepredict import tasks

    try:
        return tasks.get(name, **json.loads(options)).threshold
    except (KeyError, ValueError, TypeError):
        return None


def _live_row(study: optuna.Study, trial: FrozenTrial) -> dict:
    """A trial as a trials-frame row, from what any training loop leaves in the storage: the
    reported losses (intermediate values, normalised unless a chance loss was reported) and the
    spectra."""
    setup = study.user_attrs.get(f"{ATTR}setup", {})
    row = trial_row(trial, study.study_name, setup)
    chance = float(trial.user_attrs.get(f"{ATTR}chance_loss", 1.0))
    values = dict(trial.intermediate_values)
    last = max(values, default=-1)
    row["val_loss"] = [values.get(s, math.inf) for s in range(last + 1)]
    row["chance_loss"] = chance
    if setup.get("task"):
        row["threshold"] = _task_threshold(setup["task"], row["task_options"])
    if trial.state == TrialState.COMPLETE and row["final_normalised_loss"] is None:
        row["final_normalised_loss"] = trial.value
    if row["status"] is None:
        final = row["final_normalised_loss"]
        row["status"] = "diverged" if final is not None and not math.isfinite(final) else "ok"
    return row


class LyapunovPruner(BasePruner):
    """Prunes trials whose early Lyapunov spectra (and losses) predict they will not train.

    The trial's training loop reports spectra with :func:`lepredict.report_spectrum` (or
    :func:`lepredict.measure_and_report`) and losses with ``trial.report``; at each
    ``should_prune()`` the pruner reads them back from the storage, predicts P(trainable) with
    the predictor for the largest early budget not beyond the current step, and prunes when it
    is below ``threshold``. Everything comes from the storage, so any number of workers on SQLite,
    a journal file or PostgreSQL can share one study, and a restarted worker loses nothing. Each
    prediction is written into the trial's user attributes (``lepredict:prediction:STEP``).

    Args:
        model: a shipped predictor's name (``"default"``), a directory written by
            ``lepredict fit`` or :meth:`StabilityPredictor.save`, or a fitted
            :class:`StabilityPredictor`. Ignored when ``mode="online"``.
        mode: ``"model"`` (the given predictor), ``"online"`` (a predictor fitted on this study's
            own finished trials, once ``n_startup_trials`` have finished; nothing is pruned for
            stability before), or ``"both"`` (the mean of the two probabilities once the online
            one exists, the given predictor alone before).
        threshold: prune when P(trainable) is below this. ``None`` takes each predictor's own
            (``prune_threshold_``, set by ``lepredict fit``: the P(trainable) under which 1% of
            the trainable runs of its corpus fell in cross-validation), or
            :data:`DEFAULT_THRESHOLD` for a predictor without one (online ones).
        n_warmup_steps: no stability pruning before this step (epoch). The default, 1, waits
            for one epoch of training: at initialisation (step 0) the shipped predictors rank
            configurations far worse (held-out AUROC 0.80) than after one epoch (0.96).
        compare_to_best: also prune when even an optimistic prediction of the trial's final
            value (the predictor's 10% quantile of the final normalised loss) is worse than the
            best final value the study has seen. It needs the trial's reported values on that
            scale (the final value normalised as the intermediate ones are, as ``lepredict
            sweep`` reports them, or raw with ``report_spectrum(..., chance_loss=...)``), and the
            same number of epochs as the predictor's corpus (10 for the shipped one; a
            ``lepredict sweep`` study of another length skips the comparison). It does nothing
            in a maximising or multi-objective study.
        n_startup_trials: finished trials needed before the online predictor is fitted.
        trainable_below: the final value under which a finished trial counts as trainable for
            the online predictor; ``None`` takes the task's threshold for studies made by
            ``lepredict sweep`` and the median final value otherwise.
        refit_every: refit the online predictor once this many more trials have finished.
        wrapped_pruner: another pruner (e.g. ``MedianPruner``) asked too: the trial is pruned if
            either says so.
        trust_model: you trust the files of ``model``: a pickled predictor (``model.joblib``,
            which runs code when loaded) is loaded, and so is a shipped one that differs from
            its pinned hash (:func:`lepredict.predictor.load`).

    A trial whose reported loss is not finite, or whose latest spectrum diverged on at least half
    of its trajectories, is pruned at once. A trial with no spectrum yet is never pruned for its
    stability (the wrapped pruner may still prune it).

    Example:
        >>> import optuna
        >>> import lepredict
        >>> from lepredict.tasks import get
        >>> task = get("digits", mode="row")
        >>> def objective(trial):
        ...     cfg = {"arch": "gru", "hidden": 8, "lr": trial.suggest_float("lr", 1e-3, 1e-1,
        ...            log=True), "init_scale": trial.suggest_float("p", 0.05, 3.0, log=True)}
        ...     def on_epoch(epoch, rec):
        ...         if epoch in rec.spectra:
        ...             lepredict.report_spectrum(trial, rec.spectra[epoch], epoch)
        ...         trial.report(task.normalised_loss(rec.val_loss[-1]), epoch)
        ...         if trial.should_prune():
        ...             raise optuna.TrialPruned()
        ...     rec = lepredict.train_run(cfg, task, epochs=2, le_epochs=[0, 1], callback=on_epoch)
        ...     return rec.final_normalised_loss
        >>> pruner = lepredict.LyapunovPruner(mode="online", n_startup_trials=4)
        >>> study = optuna.create_study(pruner=pruner)
        >>> study.optimize(objective, n_trials=6)
        >>> len(study.trials)
        6
    """

    def __init__(self, *, model: str | os.PathLike | StabilityPredictor | None = "default",
                 mode: str = "model", threshold: float | None = None, n_warmup_steps: int = 1,
                 compare_to_best: bool = True, n_startup_trials: int = 20,
                 trainable_below: float | None = None, refit_every: int = 10,
                 wrapped_pruner: BasePruner | None = None, trust_model: bool = False) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode=}.")
        if threshold is not None and not (isinstance(threshold, (int, float))
                                          and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold=}.")
        if not isinstance(n_warmup_steps, int) or n_warmup_steps < 0:
            raise ValueError(f"Number of warmup steps cannot be negative but got {n_warmup_steps=}.")
        if not isinstance(n_startup_trials, int) or n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be a positive int, got {n_startup_trials=}.")
        if not isinstance(refit_every, int) or refit_every < 1:
            raise ValueError(f"refit_every must be a positive int, got {refit_every=}.")
        if trainable_below is not None and not math.isfinite(trainable_below):
            raise ValueError(f"trainable_below must be finite, got {trainable_below=}.")
        if wrapped_pruner is not None and not isinstance(wrapped_pruner, BasePruner):
            raise TypeError("wrapped_pruner must be an optuna.pruners.BasePruner, got "
                            f"{type(wrapped_pruner).__name__}.")
        if mode != "online":
            if model is None:
                raise ValueError(f"{mode=} needs a model: 'default', a path, or a predictor.")
            self._models = _models(model, trust_model)  # fails here, not mid-study
        else:
            self._models = {}
        self._model, self._mode = model, mode
        self._threshold = None if threshold is None else float(threshold)
        self._n_warmup_steps, self._n_startup_trials = n_warmup_steps, n_startup_trials
        self._compare_to_best = bool(compare_to_best)
        self._trainable_below, self._refit_every = trainable_below, refit_every
        self._wrapped_pruner = wrapped_pruner
        # A cache of what the storage implies (the online fit for a given set of finished
        # trials), not state: any worker computes the same from the same storage.
        self._online: dict[tuple[str, int], dict[int, StabilityPredictor]] = {}
        self._lock = threading.Lock()

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        if self._wrapped_pruner is not None and self._wrapped_pruner.prune(study, trial):
            return True
        spectra = sorted(int(k.rsplit(":", 1)[1]) for k in trial.user_attrs
                         if k.startswith(f"{ATTR}spectrum:"))
        if not spectra:
            return False
        latest = trial.user_attrs[f"{ATTR}spectrum:{spectra[-1]}"]
        if float(latest.get("diverged", 0.0)) >= 0.5:
            self._record(study, trial, step, {"p_trainable": None, "source": "diverged",
                                              "pruned": True})
            return True
        if step < self._n_warmup_steps:
            return False
        models, sources = [], []
        if self._mode in ("model", "both"):
            model = _pick(self._models, step)
            if model is not None:
                models.append(model)
                sources.append(f"model:{model.budget}")
        if self._mode in ("online", "both"):
            model = _pick(self._online_models(study), step)
            if model is not None:
                models.append(model)
                sources.append(f"online:{model.budget}")
        if not models:
            return False
        frame = pd.DataFrame([_live_row(study, trial)])
        p, low = np.mean([_predict(model, frame) for model in models], axis=0).tolist()
        # In "both" mode the given predictor's threshold stands (the online one has none).
        threshold = self._threshold_of(models[0])
        prune = p < threshold
        best = _best_value(study) if self._compare_to_best else None
        if best is not None and not _same_horizon(study, models):
            best = None  # final values after another number of epochs than predicted
        if not prune and best is not None and math.isfinite(low):
            prune = low > best
        self._record(study, trial, step, {"p_trainable": p, "threshold": threshold,
                                          "source": "+".join(sources), "pruned": prune,
                                          "final_loss_low": low if math.isfinite(low) else None,
                                          "best_value": best})
        return prune

    @staticmethod
    def _record(study: optuna.Study, trial: FrozenTrial, step: int, prediction: dict) -> None:
        study._storage.set_trial_user_attr(trial._trial_id, f"{ATTR}prediction:{step}",
                                           prediction)

    def _threshold_of(self, model: StabilityPredictor) -> float:
        if self._threshold is not None:
            return self._threshold
        return float(getattr(model, "prune_threshold_", DEFAULT_THRESHOLD))

    def _online_models(self, study: optuna.Study) -> dict[int, StabilityPredictor]:
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(finished) < self._n_startup_trials:
            return {}
        # Refit on a bucketed count so all workers fit on the same trials at the same times.
        n = self._n_startup_trials + (len(finished) - self._n_startup_trials) // self._refit_every \
            * self._refit_every
        key = (study.study_name, n)
        with self._lock:
            if key not in self._online:
                self._online = {key: self._fit_online(study, sorted(finished,
                                                                    key=lambda t: t.number)[:n])}
            return self._online[key]

    def _fit_online(self, study: optuna.Study, trials: list[FrozenTrial]):
        frame = completed_runs(pd.DataFrame([_live_row(study, t) for t in trials]))
        values = pd.to_numeric(frame["final_normalised_loss"], errors="coerce").astype(float)
        limit = self._trainable_below
        if limit is None:
            limit = frame["threshold"].dropna().iloc[0] if frame["threshold"].notna().any() \
                else float(np.nanmedian(values[np.isfinite(values)]))
        budgets = sorted({int(k.rsplit(":", 1)[1]) for t in trials for k in t.user_attrs
                          if k.startswith(f"{ATTR}spectrum:")})
        models = {}
        for b in budgets[:4]:
            try:
                models[b] = StabilityPredictor(budget=b, threshold=float(limit)).fit(frame)
            except ValueError:
                return {}  # one class only so far: nothing to learn yet
        return models
