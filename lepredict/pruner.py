"""Optuna pruner plugin: :class:`LyapunovPruner` and the helpers that feed it spectra."""

from __future__ import annotations

import itertools
import math
import operator
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping
from functools import lru_cache

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from torch.nn.utils.rnn import PackedSequence

from lepredict.features import completed_runs
from lepredict.lyapunov import LyapunovSpectrum, lyapunov_spectrum
from lepredict.predictor import (StabilityPredictor, constant_fits_unwarned, load_models,
                                 resolve_model)
from lepredict.records import (CHANCE_LOSS, HPARAMS, MEASURED_EXPONENTS, PREDICTION, SETUP,
                               SPECTRUM, VAL_LOSS, attrs_by_step, by_epoch, check_hparams,
                               check_steps_per_epoch, complete_hparams, jsonable, own_attrs,
                               SPECTRUM_KEYS, run_row, spectrum_dict, spectrum_of)
from lepredict.train import (DIVERGED_LOSS_RATIO, PROBE_SIZE, checked_probe_size, diverged_loss,
                             measured_options)

__all__ = ["LyapunovPruner", "measure_and_report", "module_hparams", "report_spectrum"]

_MODES = ("model", "online", "both")
#: Without a declared chance loss, reported values are read as normalised losses only if the
#: study's median loss at initialisation lies in this range: a network that learned nothing
#: scores about its chance loss (1.0 normalised; 0.76 to 1.27 in the corpus for
#: classification), while a raw binary cross-entropy starts at ln 2 = 0.693 or a little above.
#: (A raw 3-class cross-entropy, ln 3 = 1.10, cannot be told apart: the pruner says how it
#: reads undeclared values, once per study.)
NORMALISED_AT_INIT = (0.73, 1.5)
#: A trial leads (rule 3) only with a loss this far under the chance loss: one predicting about
#: the class frequencies (those of the validation set can score under the training ones' chance
#: loss) sits within a percent of it, and is no leader; 3% under it was already learning in
#: lepredict's populations (0.969, 0.932, 0.91 of chance at epochs 1-3).
LEAD_BELOW_CHANCE = 0.99

_logger = optuna.logging.get_logger(f"optuna.{__name__}")


def report_spectrum(trial: optuna.Trial, spectrum: LyapunovSpectrum | Mapping, step: int, *,
                    chance_loss: float | None = None, val_loss: float | None = None,
                    hparams: Mapping | None = None) -> None:
    """Store a spectrum measured at ``step`` in the trial, where :class:`LyapunovPruner` (and
    ``lepredict analyze``) read it. Call it before ``trial.report(value, step)``.

    Args:
        trial: the running trial.
        spectrum: a :class:`lepredict.LyapunovSpectrum`, or a dict with ``"mean"`` (descending;
            sorted if not, ``"std"`` permuted with it) and optionally ``"std"``, ``"diverged"`` (share
            of trajectories, in ``[0, 1]``), ``"n"`` (the state size, if only the leading
            exponents are given), ``"sum"`` (the sum of all ``n`` exponents, needed then),
            ``"convention"`` (``"hidden"`` for an LSTM's hidden-only map, ``"full"`` for its
            ``(h, c)`` state) and ``"trajectories"`` (how many probe sequences it averages
            over; fewer than :data:`lepredict.train.PROBE_SIZE` warns). Other keys are ignored,
            with a warning.
        step: the step you pass to ``trial.report`` (an epoch, 0 being the initialisation, or an
            iteration count with ``LyapunovPruner(steps_per_epoch=...)``, the spectrum of epoch
            ``e`` then at step ``e * steps_per_epoch``): an int, or a numpy or 0-d torch
            integer.
        chance_loss: the scale of the losses: the loss of the best constant prediction
            (:func:`lepredict.chance_loss`) if the values you report are raw losses, or ``1.0``
            if they are already normalised (loss / chance loss). Once per trial is enough.
            (A step's spectrum and ``val_loss``, and a trial's ``chance_loss``, are stored
            once, as ``trial.report`` stores a step's value: a later call keeps what was stored
            first, with a warning.)
        val_loss: the validation loss at ``step``, when the value you ``trial.report`` is not
            the loss (an accuracy in a maximising study): the pruner reads this instead.
        hparams: the trial's generic hyperparameters, for predictors that read them
            (``LyapunovPruner(model="screening")``): any of ``arch``, ``hidden``, ``layers``,
            ``lr``, ``optimizer``, ``batch_size``, ``init``, ``init_scale``, ``clip``,
            ``weight_decay`` (:data:`lepredict.records.HPARAM_FIELDS` lists the allowed values
            and the defaults of those that have one), whatever your own parameters are called.
            Stored once on the trial (attribute ``lepredict:hparams``): later calls may add keys;
            a value that differs from the one stored first is kept as it was, with a warning.
            Once per trial is enough.

    Raises:
        TypeError: a ``FrozenTrial`` (a finished trial's copy, which stores nothing), or a
            spectrum of another type.
        ValueError: a trial of a multi-objective study (Optuna prunes single-objective studies
            only), a spectrum the study's :class:`LyapunovPruner` cannot use (leading
            exponents only, an LSTM's hidden-only map), a dict that is no spectrum (an empty or
            NaN ``"mean"``, ``"diverged"`` outside ``[0, 1]``, an unknown ``"convention"``:
            :func:`lepredict.records.spectrum_dict`), a bad ``step`` or ``chance_loss``, or
            ``hparams`` with an unknown key or a value its key does not allow (the message
            names both).

    Example:
        >>> report_spectrum(trial, spectrum, 0, chance_loss=1.0,  # doctest: +SKIP
        ...                 hparams={"arch": "gru", "hidden": 64, "layers": 1, "lr": 3e-3,
        ...                          "optimizer": "adam", "batch_size": 32})
    """
    _checked_trial(trial)
    step = _checked_step(step)
    if isinstance(spectrum, LyapunovSpectrum):
        spec = spectrum_of(spectrum)
    elif isinstance(spectrum, Mapping) and "mean" in spectrum:
        if spectrum.get("std") is None:
            # Zeros are what one trajectory gives; the predictor reads the spread over the
            # probe's sequences, and its predictions move with it.
            warnings.warn("report_spectrum: the spectrum has no \"std\" (the exponents' spread "
                          "over the probe's sequences), so it is stored as 0, as from a single "
                          "sequence; the predictor reads the spread: give \"std\" too (a "
                          "LyapunovSpectrum's .std), or pass the LyapunovSpectrum itself.",
                          UserWarning, stacklevel=_outside_stacklevel())
        spec = spectrum_dict(spectrum["mean"], spectrum.get("std"),
                             diverged=float(spectrum.get("diverged", 0.0)),
                             state_size=spectrum.get("n"), convention=spectrum.get("convention"),
                             exponent_sum=spectrum.get("sum"),
                             sum_every=int(spectrum.get("sum_every", 1)),
                             trajectories=spectrum.get("trajectories"))
        unknown = sorted(map(str, set(spectrum) - SPECTRUM_KEYS))
        if unknown:
            # A misspelt key ("trajectory") would otherwise vanish without a trace.
            warnings.warn(f"report_spectrum: ignored {', '.join(map(repr, unknown))}: not a key "
                          f"of a spectrum ({', '.join(sorted(SPECTRUM_KEYS))}).",
                          UserWarning, stacklevel=_outside_stacklevel())
    else:
        raise TypeError("spectrum must be a LyapunovSpectrum or a dict with 'mean' and 'std' "
                        f"lists, got {type(spectrum).__name__}.")
    few = spec.get("trajectories")
    if few is not None and few < PROBE_SIZE:
        # The spread feature and the exponents' noise are those of the probe's size: the
        # predictors were checked on 4 sequences and more (studies/probe_size.py).
        warnings.warn(f"report_spectrum: the spectrum at step {step} averages over {few} probe "
                      f"sequence(s); {_FEW_SEQUENCES} measure it on at least {PROBE_SIZE} "
                      "validation sequences.", UserWarning, stacklevel=_outside_stacklevel())
    _report(trial, spec, step, chance_loss=chance_loss, val_loss=val_loss, hparams=hparams)


#: Why fewer probe sequences than the default are worth a warning.
_FEW_SEQUENCES = (f"the shipped predictors were checked on spectra over {PROBE_SIZE} or more, "
                  "and fewer give noisier exponents than they expect:")


def _report(trial, spec: dict, step: int, *, chance_loss, val_loss, hparams) -> None:
    """Store the checked spectrum record ``spec`` (:func:`report_spectrum` after its checks of
    the spectrum itself)."""
    if chance_loss is not None and not (math.isfinite(chance_loss) and chance_loss > 0):
        raise ValueError(f"chance_loss must be a positive finite number, got {chance_loss=}.")
    stored_hparams = None if hparams is None else _merged_hparams(trial, hparams)
    pruner = getattr(getattr(trial, "study", None), "pruner", None)  # FixedTrial has no study
    if not isinstance(pruner, LyapunovPruner):
        problem = _spectrum_problem(spec)
        if problem:
            # Stored for the user's own analysis (another pruner, or one wrapping a
            # LyapunovPruner), but said: a later fit or prediction on it would be refused.
            warnings.warn(f"report_spectrum: stored, but the shipped predictors cannot use "
                          f"it: {problem}.", UserWarning, stacklevel=_outside_stacklevel())
    else:
        pruner.check_spectrum(spec)
        if pruner.decided_at(trial, step):
            # One text for all trials: Python shows it once, not every epoch of every trial.
            warnings.warn(
                "A spectrum was reported at a step LyapunovPruner had already decided at "
                "(trial.should_prune() came before report_spectrum or measure_and_report), so "
                "that decision used an earlier step's spectrum; report the spectrum before "
                "trial.should_prune() at each step.", UserWarning,
                stacklevel=_outside_stacklevel())
    if stored_hparams is not None:
        trial.set_user_attr(HPARAMS, stored_hparams)
    # As trial.report keeps a step's first value, what this trial stored first stands: a second
    # call would rewrite the spectrum a decision was made on, or rescale every loss. (Only what
    # this process stored for it: a retry starts with its failed attempt's attributes.)
    before = getattr(trial, "user_attrs", {})
    kept = []
    for key, value, shown in (
            (f"{SPECTRUM}{step}", jsonable(spec), f"the spectrum at step {step}"),
            (CHANCE_LOSS, None if chance_loss is None else float(chance_loss), "chance_loss"),
            (f"{VAL_LOSS}{step}", None if val_loss is None else jsonable(float(val_loss)),
             f"val_loss at step {step}")):
        if value is None:
            continue
        if key in before and _STORED.holds(trial, key):
            if before[key] != value:
                kept.append(shown if key != CHANCE_LOSS
                            else f"chance_loss={before[key]!r} (not {value!r})")
            continue
        trial.set_user_attr(key, value)
        _STORED.add(trial, key)
    if kept:
        warnings.warn(f"Trial {getattr(trial, 'number', '?')} already holds {', '.join(kept)}: "
                      "the values stored first are kept, as trial.report keeps a step's first "
                      "value; report each step once, and one chance_loss per trial.",
                      UserWarning, stacklevel=_outside_stacklevel())


class _TrialMarks:
    """Marks this process set on trials (``(trial, key)`` pairs, bounded): what
    :func:`report_spectrum` stored, the steps a pruner decided at. A trial is known by its
    storage and id (:func:`_trial_key`; ``study`` given for a frozen trial, which has none),
    one without either (a ``FixedTrial``) by the object."""

    def __init__(self, bound: int):
        self._keys: set[tuple] = set()
        self._bound = bound
        self._lock = threading.Lock()

    @staticmethod
    def _trial(trial, study) -> tuple:
        study = study if study is not None else getattr(trial, "study", None)
        trial_id = getattr(trial, "_trial_id", None)
        return (id(trial),) if study is None or trial_id is None else _trial_key(study, trial)

    def holds(self, trial, key, study=None) -> bool:
        return (*self._trial(trial, study), key) in self._keys

    def add(self, trial, key, study=None) -> None:
        with self._lock:
            if len(self._keys) > self._bound:
                self._keys.clear()
            self._keys.add((*self._trial(trial, study), key))


_STORED = _TrialMarks(1_000_000)

#: The shortest probe the shipped predictors' corpus measured (digits read by rows, 8 steps);
#: its longest took 64.
MIN_PROBE_STEPS = 8


def _checked_trial(trial) -> None:
    if isinstance(trial, FrozenTrial):
        # Its set_user_attr changes the copy alone: the study would never see the spectrum.
        raise TypeError("A spectrum is stored into a running trial: pass the optuna.Trial your "
                        "objective receives (or study.ask() gives), not a FrozenTrial from "
                        "study.trials.")
    study = getattr(trial, "study", None)
    directions = getattr(study, "directions", ())
    if len(directions) > 1:
        # Optuna prunes single-objective studies only (trial.report raises in the others), and
        # lepredict reads only those: a spectrum stored here would be measured for nothing.
        raise ValueError(f"Study {study.study_name!r} has {len(directions)} objectives; "
                         "lepredict's spectra serve LyapunovPruner, export and analyze, which "
                         "like Optuna's pruners work in single-objective studies: optimise one "
                         "value (the validation loss, say) to record them.")


def _checked_step(step) -> int:
    """``step`` as an int, taking what ``trial.report`` takes (numpy and torch integers too)."""
    try:
        index = operator.index(step)
    except TypeError:
        index = -1
    if isinstance(step, bool) or index < 0:
        raise ValueError(f"step must be a non-negative int (the step of trial.report), got {step=}.")
    return index


def _checked_probe(probe, rnn: torch.nn.Module) -> torch.Tensor:
    """``probe`` if it is a batch of sequences in the module's layout; else a ``TypeError`` or
    ``ValueError`` saying what to pass (before any measuring, not deep in the engine)."""
    batch_first = bool(getattr(rnn, "batch_first", True))
    layout = (f"shaped {'(batch, time, features)' if batch_first else '(time, batch, features)'}"
              f" as the module (batch_first={batch_first}) takes them")
    if isinstance(probe, PackedSequence):
        raise TypeError(f"probe is a PackedSequence; pass a padded tensor of equal-length "
                        f"sequences {layout} (sequences of one length, or cut to the shortest), "
                        "since padding would be measured as input.")
    if isinstance(probe, np.ndarray):
        raise TypeError(f"probe is a numpy array; convert it with torch.as_tensor(probe) "
                        f"(validation sequences {layout}).")
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a torch.Tensor of validation sequences {layout}, got "
                        f"{type(probe).__name__}.")
    if probe.dim() != 3:
        hint = (" (one sequence needs a batch dimension; token ids go through the embedding "
                "first)") if probe.dim() == 2 else ""
        raise ValueError(f"probe must be a 3-D tensor of validation sequences {layout}, got "
                         f"shape {tuple(probe.shape)}{hint}.")
    return probe


def _merged_hparams(trial, hparams: Mapping) -> dict | None:
    """``hparams`` checked and merged into those the trial holds (the values stored first
    stand); ``None`` if nothing is new (each write is a transaction of the storage)."""
    given = check_hparams(hparams)
    before = getattr(trial, "user_attrs", {}).get(HPARAMS) or {}
    changed = sorted(k for k in given if k in before and before[k] != given[k])
    if changed:
        # A warning, not an error: a learning-rate schedule should not end a running trial.
        warnings.warn(
            f"hparams {', '.join(f'{k}={given[k]!r}' for k in changed)} differ from what trial "
            f"{getattr(trial, 'number', '?')} stored first "
            f"({', '.join(f'{k}={before[k]!r}' for k in changed)}), which are kept: a trial's "
            "hyperparameters are those it started with (the learning rate before any "
            "schedule); give the same values, or give them once.", UserWarning, stacklevel=3)
    merged = {**given, **before}
    return merged if merged != before else None


def module_hparams(rnn: torch.nn.Module) -> dict:
    """The hyperparameters a recurrent module shows itself: ``arch``, ``hidden`` and ``layers``
    of an ``nn.RNN`` (tanh), ``nn.GRU`` or ``nn.LSTM``; nothing for another module (or a ReLU
    ``nn.RNN``, which the predictors have never seen)."""
    if isinstance(rnn, torch.nn.LSTM):
        arch = "lstm"
    elif isinstance(rnn, torch.nn.GRU):
        arch = "gru"
    elif isinstance(rnn, torch.nn.RNN) and getattr(rnn, "nonlinearity", "tanh") == "tanh":
        arch = "rnn"
    else:
        return {}
    return {"arch": arch, "hidden": int(rnn.hidden_size), "layers": int(rnn.num_layers)}


def measure_and_report(trial: optuna.Trial, rnn: torch.nn.Module, probe: torch.Tensor, step: int,
                       *, chance_loss: float | None = None, val_loss: float | None = None,
                       hparams: Mapping | None = None, probe_size: int | None = PROBE_SIZE,
                       **kwargs) -> LyapunovSpectrum:
    """Measure the spectrum of ``rnn`` on a probe batch (in eval mode, without gradients) and
    :func:`report_spectrum` it, in one call; returns the spectrum.

    The probe is what the recurrent module itself receives: validation sequences, after any
    embedding, shaped as the module expects (``(B, T, features)`` with ``batch_first=True``,
    else ``(T, B, features)``). By default the measurement is what the shipped predictor uses and
    nothing more: the first ``probe_size`` sequences (:data:`lepredict.train.PROBE_SIZE`, 4: the
    predictors were fitted on 8, and 4 moved their AUROC by -0.006 to +0.002 from epoch 1 on;
    ``probe_size=None`` takes the whole probe), a warm-up of an eighth of their steps, the leading
    :data:`lepredict.records.MEASURED_EXPONENTS` (16) exponents with the sum of all, QRs on the
    :data:`lepredict.train.MEASURED_REORTH` schedule. That costs ``O(n^2 k)`` per step instead of
    the full spectrum's ``O(n^3)`` (the sum: ``O(n)`` for RNN and LSTM, an ``O(N^3)`` LU per layer
    for the GRU, on every :data:`lepredict.train.MEASURED_SUM_EVERY`-th averaged step, keeping at
    least 10 steps: :func:`lepredict.train.measured_sum_every`). ``kwargs`` go to
    :func:`lepredict.lyapunov_spectrum` and override those choices (``k=None`` for the full
    spectrum, ``warmup=``...); the spectrum is recorded with what was measured (state size, ``k``,
    convention, the sequences averaged over), and the pruner refuses one its predictors cannot use.

    The module's own ``arch``, ``hidden`` and ``layers`` (:func:`module_hparams`) are stored as
    the trial's hyperparameters together with ``hparams`` (those the module cannot show: ``lr``,
    ``optimizer``, ``batch_size``, ``init``, ``init_scale``, ``clip``, ``weight_decay``; see
    :func:`report_spectrum`); a value of ``hparams`` that contradicts the module is an error.

    Raises:
        TypeError: a probe that is not a ``torch.Tensor`` (a numpy array: convert it with
            ``torch.as_tensor``; a ``PackedSequence``: pass a tensor of equal-length sequences),
            or a ``FrozenTrial`` for ``trial`` (checked before measuring).
        ValueError: a probe without 3 dimensions, a bad ``step`` or ``probe_size``, ``hparams``
            that contradict the module, a trial of a multi-objective study (checked before
            measuring), or anything :func:`report_spectrum` refuses.
    """
    _checked_trial(trial)
    probe, step = _checked_probe(probe, rnn), _checked_step(step)
    if probe_size is not None:
        try:
            probe_size = checked_probe_size(probe_size)
        except ValueError:
            raise ValueError("probe_size is how many of the probe's sequences the spectrum "
                             f"averages over, a positive int (None: all), got {probe_size=}."
                             ) from None
    shown = module_hparams(rnn)
    if isinstance(rnn, torch.nn.RNN) and getattr(rnn, "nonlinearity", "tanh") == "relu":
        # Measured and stored all the same (a study may judge it by other means), but a
        # prediction for it would look as confident as any other.
        warnings.warn("measure_and_report: the shipped predictors have never seen a ReLU "
                      "nn.RNN (their corpus holds tanh RNNs, GRUs and LSTMs), so "
                      "LyapunovPruner's predictions for it are extrapolations; a dead unit's "
                      "exponent is floored at log(tiny), which depends on the dtype.",
                      UserWarning, stacklevel=2)
    given = check_hparams(hparams or {})
    clash = sorted(k for k in shown if k in given and given[k] != shown[k])
    if clash:
        raise ValueError(f"hparams {', '.join(f'{k}={given[k]!r}' for k in clash)} contradict "
                         f"the module ({type(rnn).__name__} with "
                         f"{', '.join(f'{k}={shown[k]!r}' for k in clash)}); leave them out: "
                         "measure_and_report reads them from the module.")
    batch_first = getattr(rnn, "batch_first", True)
    sequences = probe if batch_first else probe.transpose(0, 1)
    if "warmup" not in kwargs:
        kwargs["warmup"] = sequences.shape[1] // 8
    shapes = ("(steps, sequences, features)", "(sequences, steps, features)")
    read, other = shapes if not batch_first else shapes[::-1]
    # Either shortfall may be a probe in the other layout: the message says how it was read.
    layout = (f" The module has batch_first={batch_first}, so the probe is read as {read}; a "
              f"probe shaped {other} is probe.transpose(0, 1).")
    if sequences.shape[1] < MIN_PROBE_STEPS:
        warnings.warn(f"measure_and_report: a probe of {sequences.shape[1]} step(s); the "
                      f"shipped predictors were checked on sequences of {MIN_PROBE_STEPS} steps "
                      "or more, and shorter ones give noisier exponents than they expect: pass "
                      "longer validation sequences (where the task's own are shorter, its "
                      f"predictions are extrapolations).{layout}", UserWarning, stacklevel=2)
    sequences = sequences[:probe_size]
    if sequences.shape[0] < PROBE_SIZE:
        asked = "" if probe_size is None or probe_size >= PROBE_SIZE else \
            f" (probe_size={probe_size})"
        warnings.warn(f"measure_and_report: the spectrum averages over {sequences.shape[0]} "
                      f"probe sequence(s){asked}; {_FEW_SEQUENCES} pass at least {PROBE_SIZE} "
                      f"validation sequences, and a probe_size of {PROBE_SIZE} or more (None: "
                      f"all).{layout}", UserWarning, stacklevel=2)
    probe = sequences if batch_first else sequences.transpose(0, 1)
    defaults = measured_options(rnn, sequences.shape[1] - kwargs["warmup"],
                                lstm_state=kwargs.get("lstm_state", "full"))
    kwargs = {**defaults, **kwargs}
    was_training = rnn.training
    rnn.eval()
    try:
        with torch.no_grad():
            spec = lyapunov_spectrum(rnn, probe, **kwargs)
    finally:
        rnn.train(was_training)
    _report(trial, spectrum_of(spec), step, chance_loss=chance_loss, val_loss=val_loss,
            hparams={**shown, **given} or None)
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


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class _TrialView:
    """What one trial left in the storage, read on the predictor's scale: losses and spectra by
    epoch, the chance loss its values are divided by."""

    def __init__(self, study: optuna.Study, trial: FrozenTrial, steps_per_epoch: int):
        self.trial = trial
        attrs = own_attrs(trial)  # not what a retry inherited of its attempt's later epochs
        own = attrs_by_step(attrs, VAL_LOSS)
        self.reported_losses = bool(own)
        # A maximising study reports something else than the loss: only losses given to
        # report_spectrum(val_loss=...) can be read then.
        self.losses_from_attrs = bool(own) or study.direction != StudyDirection.MINIMIZE
        raw = {s: _float(v) for s, v in own.items()} if self.losses_from_attrs \
            else dict(trial.intermediate_values)
        self.losses = by_epoch(raw, steps_per_epoch)
        spectra = attrs_by_step(attrs, SPECTRUM)
        self.spectra = by_epoch(spectra, steps_per_epoch)
        # Spectra and losses given at steps that are no epoch's end are never read ...
        self.off_epoch = sorted(s for s in {*spectra, *own} if s % steps_per_epoch)
        # ... and where the epoch they fall in has none at its end, they were meant for it
        # (step 999 of a 1000-step epoch, counted from 0): a decision there would read an
        # earlier epoch's as the latest.
        self.misplaced = sorted({-(-s // steps_per_epoch) for s in self.off_epoch}
                                - (self.spectra.keys() & self.losses.keys()))
        stored = trial.user_attrs.get(HPARAMS)
        self.hparams = dict(stored) if isinstance(stored, Mapping) else None
        setup = study.user_attrs.get(SETUP, {})
        declared = trial.user_attrs.get(CHANCE_LOSS)
        if declared is None and setup.get("reported") == "normalised":
            declared = 1.0
        self.chance = None if declared is None else float(declared)

    def budget(self, budgets: Iterable[int], epoch: int) -> int | None:
        """The largest of ``budgets`` (those predictors exist for), at most ``epoch``, whose
        epochs all have a loss and a spectrum."""
        usable = [b for b in budgets if b <= epoch
                  and all(e in self.losses and e in self.spectra for e in range(b + 1))]
        return max(usable) if usable else None

    def hparams_problem(self) -> str | None:
        """Why a predictor that reads hyperparameters cannot read this trial's, if so."""
        how = ("give them with lepredict.report_spectrum(trial, spectrum, step, hparams={...}) "
               "(measure_and_report(..., hparams=...) reads arch, hidden and layers from the "
               "module); the keys and allowed values are in lepredict.records.HPARAM_FIELDS")
        try:
            given = check_hparams(self.hparams or {})
        except (TypeError, ValueError) as err:
            return f"trial {self.trial.number} stored hyperparameters it cannot use: {err} ({how})"
        missing = complete_hparams(given)[1]
        if not missing:
            return None
        return (f"trial {self.trial.number} has not given the hyperparameters "
                f"{', '.join(missing)}, which the predictor reads (its 'hparams' features); "
                f"{how}")

    def row(self, study_name: str, budget: int) -> dict:
        chance = self.chance or 1.0
        run = {"val_loss": [self.losses[e] for e in range(budget + 1)]}
        meta = {"study": study_name, "number": self.trial.number, "state": "RUNNING",
                "status": "ok", "chance_loss": chance}
        spectra = {e: self.spectra[e] for e in range(budget + 1)}
        # The declared generic hyperparameters (defaults filled in) rather than the trial's own
        # params, whose names (learning_rate, n_units...) mean nothing to the predictors.
        params = self.trial.params
        if self.hparams is not None:
            try:
                params = complete_hparams(check_hparams(self.hparams))[0]
            except (TypeError, ValueError):
                pass  # unusable: hparams_problem says so where a predictor needs them
        return run_row(meta, run, params, spectra)


class LyapunovPruner(BasePruner):
    """Prunes trials whose early Lyapunov spectra and losses predict they will not train, or
    will very likely not beat the study's best.

    The training loop reports spectra with :func:`lepredict.report_spectrum` (or
    :func:`lepredict.measure_and_report`) and losses with ``trial.report``. At each
    ``should_prune()`` the pruner reads them back from the storage and uses the predictor for
    the largest early budget (epochs ``0..b``) the trial has both a loss and a spectrum for.
    Everything comes from the storage, so any number of workers can share one study.

    **What it decides, and why that holds in your study.** The shipped predictors were fitted on
    10-epoch runs; your study may train for 40 epochs, at another batch size, and report raw
    losses. So the pruner never compares a prediction with a value your study observed:

    1. *Unstable*: P(trainable) below the predictor's own cut-off (``threshold``), or a spectrum
       that diverged on at least half of its trajectories (or overflowed: an exponent above
       the log of the largest float, an infinite sum), or a non-finite reported value, or
       (the chance loss known) a validation loss over
       :data:`~lepredict.train.DIVERGED_LOSS_RATIO` times the chance loss, which
       :func:`~lepredict.train_run` labels diverged.
       P(trainable) is the chance of training within the predictor's horizon (10 epochs for
       the shipped one); once the study's finished trials show it trains for ``H`` epochs more,
       the cut-off is scaled by ``10 / H``, so slow starters get the longer horizon's benefit.
    2. *Cannot beat the best*: P(this trial's final loss < the best trial's), computed from the
       two trials' predictions *at the same budget* (like with like), each with a residual
       drawn from the predictor's held-out residuals (a conformal distribution), is below
       ``risk``. The best trial is the best finished one by your study's own values and
       direction, so the horizon and scale of those values never matter.
    3. *Leaders are kept*: a trial whose reported value at this step is among the study's best
       ``protect_top`` share of the values reported at the same step is never pruned by the
       model (rules 1-2); only divergence or the wrapped pruner can stop it. A trial that no
       other has reported beside at this step is ranked at the last step others reached too;
       one no other trial ever reported beside (the first of a study, or the first member of a
       population to report) leads nothing and the model decides for it. A tie is no lead: of
       the trials tied at a value, only the first (by number) still running or finished ranks
       there, the others behind the whole tie (trials all at chance accuracy do not all lead);
       and a trial whose loss is not yet below :data:`LEAD_BELOW_CHANCE` (99%) of the chance
       loss (1.0 for values read as normalised without one) leads nothing, whatever its rank:
       it has learned nothing yet.

    **What you report.** Losses, raw or normalised: give the chance loss once with
    ``report_spectrum(..., chance_loss=lepredict.chance_loss(y_train, y_val))`` for raw losses,
    or ``chance_loss=1.0`` if they are already normalised. Without it, values are read as
    normalised only if the study's losses at initialisation sit near 1 (a network that learned
    nothing scores its chance loss), and the pruner says so once (a raw 3-class cross-entropy
    starts at 1.10 too); otherwise it warns once and prunes nothing on the model. In a
    maximising study (an accuracy), report the loss beside it with
    ``report_spectrum(..., val_loss=...)``; without that the pruner raises a ``ValueError`` at
    the first ``should_prune()``. Report at every epoch (step = epoch), or at iterations with
    ``steps_per_epoch`` set: the steps ``e * steps_per_epoch`` are then epoch ``e``'s ends,
    and spectra are given at the same steps (a spectrum at another step is never read: the
    pruner warns once). A trial past its first epoch without a spectrum and a loss at epoch 0
    (or at all of epochs ``0..b`` of the smallest budget ``b`` a predictor has), or one that
    stores spectra but never calls ``trial.report``, makes the pruner warn once and decide
    nothing on the model for it (a trial without any spectrum is left to ``wrapped_pruner``,
    when given, without a warning). The predictor reads the leading exponents and the sum of
    all, as :func:`measure_and_report` measures them by default (for an LSTM, of the ``(h, c)``
    state): a spectrum it cannot use is refused by :func:`report_spectrum`.

    **Screening with hyperparameters.** ``model="screening"`` is a shipped predictor that also
    reads the trial's generic hyperparameters (architecture, hidden size, layers, learning rate,
    optimizer, batch size, initialisation, clipping, weight decay; see
    :data:`lepredict.records.HPARAM_FIELDS`), which ranks configurations far better at
    initialisation than spectra alone. Give them once per trial with
    ``report_spectrum(..., hparams={...})``, or ``measure_and_report(..., hparams={...})``, which
    reads arch, hidden and layers from the module (``lepredict sweep`` stores them itself). The
    trial's own ``trial.params`` are never read for this: their names are yours. A trial that
    has not given those it needs is kept and the pruner warns once, naming ``hparams=``.

    Every decision is written into the trial's user attributes (``lepredict:prediction:STEP``,
    with its ``reason``) and a pruned trial is logged with its reason, e.g.
    ``P(trainable)=0.03 < 0.08 at epoch 1``.

    Args:
        model: ``"default"`` (the shipped predictor: spectra and losses only),
            ``"screening"`` (the shipped predictor that also reads the hyperparameters given
            to ``report_spectrum(hparams=...)``), a directory written by ``lepredict fit`` or
            :meth:`StabilityPredictor.save`, or a fitted :class:`StabilityPredictor`.
            Ignored when ``mode="online"``.
        mode: ``"model"`` (the given predictor), ``"online"`` (a predictor fitted on this study's
            own finished trials, once ``n_startup_trials`` have finished), or ``"both"`` (the
            mean of the two once the online one exists). The online trees need about 60
            finished trials to split at all (20 runs a leaf, fitted on two thirds of them);
            until then its fit gives every trial one P, which is no prediction: ``"online"``
            decides nothing on the model and ``"both"`` uses the given predictor alone (the
            pruner says so once).
        threshold: prune when P(trainable) is below this. ``None`` takes the predictor's own
            (``prune_threshold_``: the P(trainable) under which 1% of the trainable runs of its
            corpus fell in cross-validation; :attr:`StabilityPredictor.cutoff`).
        risk: prune when P(beats the best) is below this (rule 2). ``None`` turns rule 2 off.
        protect_top: the share of trials, by the value reported at the same step, that the
            model never prunes (rule 3); at least the single best of two or more is kept.
        steps_per_epoch: report steps per epoch, when ``trial.report`` is called with
            iteration numbers.
        n_warmup_steps: no model-based pruning before this step. ``None``: one epoch
            (``steps_per_epoch``): at initialisation the shipped predictors rank configurations
            far worse (held-out AUROC 0.80) than after one epoch (0.96).
        n_startup_trials: finished trials needed before the online predictor is fitted.
        trainable_below: the final normalised loss under which a finished trial counts as
            trainable for the online predictor; ``None`` takes the study's recorded task
            threshold (``lepredict sweep``) or the median final value.
        refit_every: refit the online predictor once this many more trials have finished.
        wrapped_pruner: another pruner (e.g. ``MedianPruner``) asked first: the trial is pruned
            if either says so.
        compare_to_best: ``False`` is the same as ``risk=None``.
        trust_model: you trust the files of ``model``: a pickled predictor (``model.joblib``,
            which runs code when loaded) is loaded, and so is a shipped one that differs from
            its pinned hash (:func:`lepredict.predictor.load`).

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
        ...             lepredict.report_spectrum(trial, rec.spectra[epoch], epoch,
        ...                                       chance_loss=task.chance_loss)
        ...         trial.report(rec.val_loss[-1], epoch)  # the raw validation loss
        ...         if trial.should_prune():
        ...             raise optuna.TrialPruned()
        ...     rec = lepredict.train_run(cfg, task, epochs=2, le_epochs=[0, 1], callback=on_epoch)
        ...     return rec.final_val_loss
        >>> study = optuna.create_study(pruner=lepredict.LyapunovPruner(model="default"))
        >>> study.optimize(objective, n_trials=4)
        >>> len(study.trials)
        4
    """

    def __init__(self, *, model: str | os.PathLike | StabilityPredictor | None = "default",
                 mode: str = "model", threshold: float | None = None,
                 risk: float | None = 0.01, protect_top: float = 0.2, steps_per_epoch: int = 1,
                 n_warmup_steps: int | None = None, n_startup_trials: int = 20,
                 trainable_below: float | None = None, refit_every: int = 10,
                 wrapped_pruner: BasePruner | None = None, compare_to_best: bool = True,
                 trust_model: bool = False) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode=}.")
        if threshold is not None and not (isinstance(threshold, (int, float))
                                          and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold=}.")
        if risk is not None and not (isinstance(risk, (int, float)) and 0.0 < risk < 1.0):
            raise ValueError(f"risk must be a probability in (0, 1) or None, got {risk=}.")
        if not (isinstance(protect_top, (int, float)) and 0.0 <= protect_top <= 1.0):
            raise ValueError(f"protect_top must be a share in [0, 1], got {protect_top=}.")
        check_steps_per_epoch(steps_per_epoch)
        if n_warmup_steps is not None and (not isinstance(n_warmup_steps, int)
                                           or n_warmup_steps < 0):
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
        self._risk = risk if compare_to_best else None
        self._protect_top = float(protect_top)
        self._steps_per_epoch = steps_per_epoch
        self._n_warmup_steps = steps_per_epoch if n_warmup_steps is None else n_warmup_steps
        self._n_startup_trials = n_startup_trials
        self._trainable_below, self._refit_every = trainable_below, refit_every
        self._wrapped_pruner = wrapped_pruner
        self._start_caches()

    _CACHES = ("_online", "_warned", "_predicted", "_decided", "_lock")

    def _start_caches(self) -> None:
        # Caches of what the storage implies (the online fit for a given set of finished
        # trials; warnings already given), not state: any worker decides the same.
        self._online: dict[tuple[str, int], dict[int, StabilityPredictor]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._predicted: dict[tuple[int, int, str], tuple[float, float]] = {}
        # The steps this process decided at, per trial: a spectrum reported at one afterwards
        # came too late for its decision (the trials a worker decides for are those it runs).
        self._decided = _TrialMarks(100_000)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # A pickled study (joblib.dump, as Optuna's FAQ saves an in-memory one) or a deepcopy
        # starts with empty caches, as a new worker does: they know trials by this process's
        # storages, and a lock does not pickle.
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_caches()

    # -- what a spectrum must be ------------------------------------------------------------

    def check_spectrum(self, spectrum: Mapping) -> None:
        """Raise ``ValueError`` naming what to measure instead if the predictors cannot use
        ``spectrum`` (a :func:`lepredict.records.spectrum_dict`)."""
        problem = _spectrum_problem(spectrum)
        if problem:
            raise ValueError(problem)

    # -- the decision ------------------------------------------------------------------------

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            self._check_reported(study, trial)
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return self._prune(study, trial, step, {"reason": f"reported value {value} at step "
                                                              f"{step}"})
        if self._wrapped_pruner is not None and self._wrapped_pruner.prune(study, trial):
            return True
        view = _TrialView(study, trial, self._steps_per_epoch)
        if study.direction != StudyDirection.MINIMIZE and not view.reported_losses:
            raise ValueError(
                f"LyapunovPruner: study {study.study_name!r} maximises, so its reported values "
                "are not losses; report the validation loss beside them with "
                "lepredict.measure_and_report(trial, rnn, probe, step, val_loss=...) or "
                "lepredict.report_spectrum(trial, spectrum, step, val_loss=...) at each epoch "
                "the predictor uses (0..3), or minimise the loss.")
        if view.chance is not None and view.losses:
            epoch, loss = max(view.losses.items())
            if diverged_loss(loss, view.chance):
                return self._prune(study, trial, step, {
                    "reason": f"validation loss {loss:.4g} at epoch {epoch} is "
                              + (f"over {DIVERGED_LOSS_RATIO:g} times the chance loss "
                                 f"{view.chance:.4g}" if math.isfinite(loss) else "not finite")
                              + ": diverged"})
        if view.off_epoch:
            self._warn_once(study, "off-epoch", self._off_epoch_message(study, view))
        if view.spectra:
            at, latest = max(view.spectra.items())
            if _overflowed(latest):
                return self._prune(study, trial, step, {
                    "reason": f"spectrum overflowed at epoch {at} (exponents beyond "
                              f"{_OVERFLOW:.4g}, the log of the largest float): diverged"})
            if _float(latest.get("diverged", 0.0)) >= 0.5:
                return self._prune(study, trial, step, {
                    "reason": f"spectrum diverged on {_float(latest['diverged']):.0%} of its "
                              f"trajectories at epoch {at}"})
        if step < self._n_warmup_steps:
            return False
        epoch = step // self._steps_per_epoch
        return self._decide(study, trial, view, step, epoch)

    def _decide(self, study, trial, view: _TrialView, step: int, epoch: int) -> bool:
        if not view.spectra and self._wrapped_pruner is not None:
            # A trial that stores no spectrum is the wrapped pruner's to judge (a study may mix
            # recurrent networks with others): nothing to warn about, nor to record each step.
            return False
        problem = self._unfed_problem(view, epoch)
        if problem:
            self._warn_once(study, "unfed", _nothing_on_the_model(study, trial, problem))
            return self._keep(study, trial, step, problem)
        if not view.spectra:
            return False  # at initialisation: a spectrum may yet come
        # Every trial is read once per decision: each read is a query of an RDB storage.
        trials = study.get_trials(deepcopy=False)
        largest = self._largest_budget()
        read_to = epoch if largest is None else min(epoch, largest)  # epochs a decision reads
        for kind, problem in (
                ("spectrum", next(filter(None, map(_spectrum_problem, view.spectra.values())),
                                  None)),
                ("steps", self._steps_problem(trial)),
                # Only where a decision reads that epoch: a spectrum logged past the largest
                # budget (monitoring, say) changes none.
                ("off-epoch", self._off_epoch_message(study, view)
                 if view.misplaced and view.misplaced[0] <= read_to else None),
                ("scale", self._scale_problem(study, trials, view)),
                ("hparams", view.hparams_problem() if self._needs_hparams() else None)):
            if problem:
                self._warn_once(study, kind, _nothing_on_the_model(study, trial, problem))
                return self._keep(study, trial, step, problem)
        # Said once a finite loss at initialisation shows the scale (and built only then).
        median = (_median_at_init(study, trials, self._steps_per_epoch)
                  if view.chance is None and not self._warned_of(study, "undeclared")
                  else math.nan)
        if math.isfinite(median):
            self._warn_once(study, "undeclared", (
                f"LyapunovPruner reads the values of study {study.study_name!r} as normalised "
                "losses (loss / chance loss): no chance_loss was given, and their median at "
                f"initialisation, {median:.4g}, is about 1. A raw cross-entropy starts at "
                "about ln(classes) (1.10 for 3 classes): if yours are raw, pass "
                "chance_loss=lepredict.chance_loss(y_train, y_val) to measure_and_report or "
                "report_spectrum; chance_loss=1.0 says they are normalised and silences this."))
        models = []
        if self._mode in ("model", "both"):
            models.append(self._models)
        if self._mode in ("online", "both"):
            online = self._online_models(study, trials)
            if online:
                models.append(online)
        budgets = [view.budget(m, epoch) for m in models]
        chosen = [(m[b], b) for m, b in zip(models, budgets) if b is not None]
        if not chosen:
            return False  # no loss or spectrum yet for any budget a predictor exists for
        model, budget = chosen[0]
        sources = "+".join(f"{'online' if m is not self._models.get(b) else 'model'}:{b}"
                           for m, b in chosen)
        # Past the largest budget the features no longer change: the prediction made at an
        # earlier step of this budget stands (the comparison with the best may not).
        # (Online predictors are refitted as trials finish, so theirs are made anew.)
        # (The trial Optuna hands a pruner is its cached copy, without what _record wrote, so
        # the prediction is kept here: a worker predicts only for the trials it runs.)
        key = (*_trial_key(study, trial), sources)
        if self._mode == "model" and key in self._predicted:
            p, loss = self._predicted[key]
        else:
            row = pd.DataFrame([view.row(study.study_name, max(b for _, b in chosen))])
            p = float(np.mean([m.predict_proba(row)[0, 1] for m, _ in chosen]))
            loss = float(np.mean([m.predict_loss(row)[0] for m, _ in chosen]))
            with self._lock:
                if len(self._predicted) > 10_000:
                    self._predicted.clear()
                self._predicted[key] = (p, loss)
        threshold = self._threshold_of(model)  # the given predictor's (online ones have none)
        # P(trainable) is the chance of training within the predictor's own horizon. A study
        # whose finished trials trained longer gives slow starters more time: only those very
        # unlikely to train even within the shorter horizon are pruned for it.
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        horizon = _horizon(finished, self._steps_per_epoch)
        trained = (getattr(model, "training_summary_", None) or {}).get("epochs")
        if horizon and trained and horizon > trained:
            threshold *= trained / horizon
        # A trial leads only beside others: alone at its step (the first of a study, the
        # first member of a population to report) it is ranked where others reported last.
        # (A survivor of everyone else's pruning is so ranked by its value back then, however
        # it has gone since: only divergence or the wrapped pruner stop it.)
        rank, reporting, rank_step = _rank_at(study, trials, trial, step)
        leader = reporting > 1 and rank <= max(1, math.ceil(self._protect_top * reporting))
        # A lead at chance is none: ahead of trials that learned nothing (a pruned one, say),
        # a trial still at the constant prediction's loss has nothing a lead could rest on.
        loss_now = view.losses.get(epoch)
        # (Values without a chance loss were read as normalised: their chance is 1.)
        at_chance = (loss_now is not None
                     and not loss_now < LEAD_BELOW_CHANCE * (view.chance or 1.0))
        leader = leader and not at_chance
        record = {"epoch": epoch, "budget": budget, "source": sources, "horizon": horizon,
                  "p_trainable": p, "threshold": threshold, "final_loss": loss,
                  "rank": rank, "reporting": reporting, "rank_step": rank_step,
                  "leader": leader}
        reason = None
        # A decision on an earlier epoch's spectrum (the last one reported) says so.
        shown = f"at epoch {epoch}" + (f" (on epochs 0-{budget})" if budget < epoch else "")
        if p < threshold:
            reason = f"P(trainable)={p:.3f} < {threshold:.3f} {shown}"
        elif self._risk is not None:
            best = _best_prediction(study, finished, budget)
            if best is not None and best[0] != trial.number:
                beats = model.prob_beats(loss, best[1])
                record.update(p_beats_best=beats, best_trial=best[0], best_final_loss=best[1])
                if beats < self._risk:
                    reason = (f"P(beats best)={beats:.1%} < {self._risk:.1%} {shown} "
                              f"(predicted final loss, normalised, at the predictor's horizon: "
                              f"{loss:.3f} against {best[1]:.3f} predicted at the same budget "
                              f"for trial {best[0]}, the best so far)")
        if reason is not None and leader:
            reason, record["kept"] = None, (f"a leader at step {rank_step} (rank {rank} of "
                                            f"{reporting}), not pruned by the model alone")
        if reason is None:
            record.update(pruned=False, reason=record.get("kept", "predicted to train"))
            self._record(study, trial, step, record)
            return False
        return self._prune(study, trial, step, {**record, "reason": reason})

    def _prune(self, study, trial, step: int, record: dict) -> bool:
        self._record(study, trial, step, {**record, "pruned": True})
        _logger.info(f"Trial {trial.number} pruned by LyapunovPruner: {record['reason']}.")
        return True

    def _keep(self, study, trial, step: int, reason: str) -> bool:
        self._record(study, trial, step, {"pruned": False, "reason": reason})
        return False

    def _record(self, study: optuna.Study, trial: FrozenTrial, step: int,
                prediction: dict) -> None:
        # A pruner gets a frozen trial: the storage is the only way to annotate it. The steps
        # per epoch go with each decision, so an export reads the trial's steps as it did.
        study._storage.set_trial_user_attr(
            trial._trial_id, f"{PREDICTION}{step}",
            jsonable({**prediction, "steps_per_epoch": self._steps_per_epoch}))
        if "budget" in prediction:  # decided on a predictor, not kept for want of one
            self._decided.add(trial, step, study)

    def decided_at(self, trial, step: int) -> bool:
        """Whether this pruner (in this process) has decided for ``trial``, a running trial, at
        ``step`` on a predictor whose budget a spectrum at ``step`` would have raised (past the
        largest budget, later spectra change no decision)."""
        largest = self._largest_budget()
        if largest is not None and step // self._steps_per_epoch > largest:
            return False
        return self._decided.holds(trial, step)

    def _largest_budget(self) -> int | None:
        """The last epoch whose spectrum a decision reads: the shipped or given predictors'
        largest budget; ``None`` where online predictors may read later ones."""
        return max(self._models) if self._mode == "model" and self._models else None

    def _warn_once(self, study: optuna.Study, kind: str, message: str) -> None:
        with self._lock:
            if (study.study_name, kind) in self._warned:
                return
            self._warned.add((study.study_name, kind))
        warnings.warn(message, UserWarning, stacklevel=_outside_stacklevel())

    def _warned_of(self, study: optuna.Study, kind: str) -> bool:
        with self._lock:
            return (study.study_name, kind) in self._warned

    def _check_reported(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Warn once if the trial stores spectra but never calls ``trial.report``, once that is
        plain: a spectrum after initialisation (the step-0 one may come before the report)."""
        steps = sorted(attrs_by_step(own_attrs(trial), SPECTRUM))
        if steps and steps[-1] > 0:
            self._warn_once(study, "unreported", (
                f"LyapunovPruner prunes nothing in study {study.study_name!r}: trial "
                f"{trial.number} stored spectra at steps {_steps_text(steps)} but reported no "
                "value, and a pruner decides at the reported steps; call trial.report(loss, "
                "step) after lepredict.measure_and_report(...) at each epoch, then "
                "trial.should_prune()."))

    def _unfed_problem(self, view: _TrialView, epoch: int) -> str | None:
        """Why no predictor can read the trial, once it is past initialisation (a spectrum may
        come after the first ``trial.report``) without the epochs ``0..b`` of the smallest
        budget ``b``; ``None`` if it can, or still may."""
        first, last = min(self._models, default=0), max(self._models, default=3)
        if epoch < max(first, 1):
            return None
        needed = range(first + 1)
        no_spectrum = [e for e in needed if e not in view.spectra]
        no_loss = [e for e in needed if e not in view.losses]
        number, when = view.trial.number, self._epochs_text
        how = ("call lepredict.measure_and_report(trial, rnn, probe, step) or "
               "lepredict.report_spectrum(trial, spectrum, step) before trial.report(value, "
               f"step), with the same step, at the epochs the predictors read (0 to {last}, 0 "
               "being the initialisation)")
        if not view.spectra:
            return (f"trial {number} reported values up to step "
                    f"{view.trial.last_step} but stored no spectrum at an epoch's end; {how}")
        if no_spectrum:
            return (f"trial {number} stored no spectrum at {when(no_spectrum)}, which every "
                    f"predictor reads; {how}")
        if no_loss and view.losses_from_attrs:
            return (f"trial {number} gave no loss at {when(no_loss)}, which every predictor "
                    "reads; pass the validation loss there too: "
                    "lepredict.report_spectrum(..., val_loss=loss)")
        if no_loss:
            return (f"trial {number} reported no value at {when(no_loss)}, which every predictor "
                    "reads; report the validation loss there too, with trial.report(loss, step) "
                    "(epoch 0 is the initialisation: trial.report(loss, 0) before any training)")
        return None

    def _epochs_text(self, epochs: list[int]) -> str:
        steps = "" if self._steps_per_epoch == 1 else \
            f" (step {_steps_text([e * self._steps_per_epoch for e in epochs])})"
        return f"epoch {_steps_text(epochs)}{steps}"

    def _off_epoch_message(self, study: optuna.Study, view: _TrialView) -> str:
        spe = self._steps_per_epoch
        said = (f"LyapunovPruner reads no spectrum or val_loss= given at steps "
                f"{_steps_text(view.off_epoch)} (trial {view.trial.number} of study "
                f"{study.study_name!r}): with steps_per_epoch={spe} it reads those at the ends "
                f"of epochs, steps 0, {spe}, {2 * spe}...; ")
        if set(view.off_epoch) <= set(view.trial.intermediate_values):
            # trial.report itself is called between epochs' ends: the steps agree, the
            # interval does not.
            return said + ("report (and measure) at the end of each epoch, step = epoch * "
                           f"{spe}, or, to decide at your reporting interval, pass "
                           "steps_per_epoch=that interval (each report then counts as an "
                           "epoch).")
        return said + ("give measure_and_report and report_spectrum the step you give "
                       "trial.report (epoch * steps_per_epoch), not the epoch.")

    def _steps_problem(self, trial: FrozenTrial) -> str | None:
        """Why the report steps cannot be read as epochs, if so."""
        steps = sorted(trial.intermediate_values)
        if self._steps_per_epoch != 1 or steps[-1] + 1 <= len(steps) + 1:
            return None
        return (f"trial {trial.number} reported at steps {_steps_text(steps)}, not at every "
                "epoch; if the steps are "
                "iterations, pass LyapunovPruner(steps_per_epoch=...)")

    def _scale_problem(self, study: optuna.Study, trials: list[FrozenTrial],
                       view: _TrialView) -> str | None:
        """Why the reported values are evidently not losses on the predictor's scale, if so."""
        if view.chance is not None:
            at_init = view.losses.get(0)
            # A loss not finite at initialisation is a diverged network's, not another scale.
            if at_init is None or not math.isfinite(at_init):
                return None
            ratio = at_init / view.chance
            if INIT_LOSS_RATIOS[0] <= ratio <= INIT_LOSS_RATIOS[1]:
                return None
            said = (f"trial {view.trial.number} has a loss at epoch 0 (initialisation) "
                    f"{ratio:.3g} times the chance_loss it gave ({view.chance:.4g}), where an "
                    f"untrained network scores about its chance loss ({INIT_LOSS_RATIOS[0]:g} to "
                    f"{INIT_LOSS_RATIOS[1]:g} times it in lepredict's runs)")
            scale = ("give the chance loss of the loss reported (lepredict.chance_loss of "
                     "float targets is the squared error's unless kind='classification'; 1.0 "
                     "for losses already normalised)")
            if ratio < INIT_LOSS_RATIOS[0]:
                return (f"{said}: if epoch 0 was reported after training, report (and measure) "
                        "it before any, at initialisation, and epoch e after e epochs; else "
                        f"{scale}")
            return f"{said}, so its losses are on another scale than the predictor's: {scale}"
        median = _median_at_init(study, trials, self._steps_per_epoch)
        low, high = NORMALISED_AT_INIT
        if math.isnan(median) or low <= median <= high:  # NaN: no finite loss at epoch 0 yet
            return None
        binary = (" (where a raw binary cross-entropy starts: ln 2 = 0.693)"
                  if abs(median - math.log(2)) < 0.1 else "")
        return (f"no chance loss was reported and the median loss at initialisation is "
                f"{median:.4g}{binary}, not about 1, so the values are not normalised "
                "losses; pass chance_loss=lepredict.chance_loss(y_train, y_val) to "
                "measure_and_report or report_spectrum for raw losses (chance_loss=1.0 if they "
                "are normalised)")

    def _needs_hparams(self) -> bool:
        """Whether the given predictor reads hyperparameters (the ``"screening"`` model)."""
        return self._mode != "online" and any(
            "hparams" in tuple(m.feature_sets) for m in self._models.values())

    def _threshold_of(self, model: StabilityPredictor) -> float:
        if self._threshold is not None:
            return self._threshold
        return model.cutoff

    # -- the online predictor ---------------------------------------------------------------

    def _online_models(self, study: optuna.Study,
                       trials: list[FrozenTrial]) -> dict[int, StabilityPredictor]:
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        if len(finished) < self._n_startup_trials:
            return {}
        # Refit on a bucketed count so all workers fit on the same trials at the same times.
        n = self._n_startup_trials + (len(finished) - self._n_startup_trials) // self._refit_every \
            * self._refit_every
        key = (study.study_name, n)
        with self._lock:
            fitted = key not in self._online
            if fitted:
                self._online = {key: self._fit_online(study, sorted(finished,
                                                                    key=lambda t: t.number)[:n])}
            models = self._online[key]
        if fitted and models is None:
            self._warn_once(study, "online-constant", (
                f"LyapunovPruner's online predictor, fitted on the {n} finished trials of study "
                f"{study.study_name!r}, gives every trial the same P(trainable): its trees "
                "found nothing to split on in so few (a leaf holds 20 runs, and the calibration "
                "fits on two thirds of them, so it needs about 60); "
                + ("the given predictor decides alone until a refit learns something."
                   if self._mode == "both" else
                   "it decides nothing until a refit learns something (mode='both' lets the "
                   "given predictor decide meanwhile).")))
        return models or {}

    def _fit_online(self, study: optuna.Study,
                    trials: list[FrozenTrial]) -> dict[int, StabilityPredictor] | None:
        """The online predictors by budget: ``{}`` while nothing can be fitted (no usable run,
        one class only), ``None`` where every fit gives one P(trainable) to every run (a
        constant is no prediction: averaged into ``mode="both"`` it would lift every trial
        towards the cut-offs)."""
        views = [_TrialView(study, t, self._steps_per_epoch) for t in trials]
        budgets = sorted({e for v in views for e in v.spectra})[:4]
        rows = []
        for v in views:
            b = v.budget(budgets, max(budgets, default=0))
            if b is None:
                continue
            row = v.row(study.study_name, b)
            row.update(state="COMPLETE", final_normalised_loss=v.trial.value / (v.chance or 1.0))
            rows.append(row)
        if not rows:
            return {}
        frame = completed_runs(pd.DataFrame(rows))
        values = pd.to_numeric(frame["final_normalised_loss"], errors="coerce").astype(float)
        limit = self._trainable_below
        if limit is None:
            limit = study.user_attrs.get(SETUP, {}).get("threshold") \
                or float(np.nanmedian(values[np.isfinite(values)]))
        frame = frame.assign(status=np.where(np.isfinite(values), "ok", "diverged"))
        models = {}
        for b in budgets:
            try:
                # A constant fit is said once per study (above), not at every refit.
                with constant_fits_unwarned():
                    model = StabilityPredictor(budget=b, threshold=float(limit)).fit(frame)
            except ValueError:
                return {}  # one class only so far: nothing to learn yet
            if not model.training_summary_["constant"]:
                models[b] = model
        return models or None


def _spectrum_problem(spectrum: Mapping) -> str | None:
    """Why the predictors, fitted on the leading exponents and the exponent sum of the whole
    state's spectrum, cannot use a spectrum."""
    k = len(spectrum.get("mean", []))
    n = int(spectrum.get("n") or k)
    if spectrum.get("convention") == "hidden":
        return ("the spectrum is of the LSTM's hidden-only map, but the predictors were fitted "
                "on the full (h, c) state (2N exponents per layer): measure with "
                "lstm_state='full' (the default)")
    if k < min(MEASURED_EXPONENTS, n):
        return (f"the spectrum holds {k} of the state's {n} exponents, but the predictors use "
                f"the leading {min(MEASURED_EXPONENTS, n)}: measure with "
                f"k={min(MEASURED_EXPONENTS, n)} or more (measure_and_report's default)")
    if k < n and spectrum.get("sum") is None:
        return (f"the spectrum holds {k} of the state's {n} exponents but not the sum of all, "
                "which the predictors use: measure with exponent_sum=True "
                "(measure_and_report's default)")
    return None


def _nothing_on_the_model(study: optuna.Study, trial: FrozenTrial, problem: str) -> str:
    """The warning for a trial the model cannot judge (shown once per study and problem)."""
    return (f"LyapunovPruner prunes nothing on the model for trial {trial.number} of study "
            f"{study.study_name!r}, nor for any later trial with this problem (warned once): "
            f"{problem}")


def _median_at_init(study: optuna.Study, trials: list[FrozenTrial],
                    steps_per_epoch: int) -> float:
    """The median finite loss at initialisation (epoch 0) over ``trials``; NaN if none."""
    at_init = [v for t in trials for v in [_TrialView(study, t, steps_per_epoch).losses.get(0)]
               if v is not None and math.isfinite(v)]
    return float(np.median(at_init)) if at_init else math.nan


def _steps_text(steps: list[int]) -> str:
    """The first few of ``steps``, for a message."""
    return f"{', '.join(map(str, steps[:4]))}{'...' if len(steps) > 4 else ''}"


#: Loss at initialisation over the chance loss given, outside which the chance loss is taken to
#: be another loss's and the pruner warns: of the 6,937 runs of studies/, none lay below 0.76
#: and 2 above 20 (at most 22.4; 99.9% within 0.88-16.4), while one-hot targets' squared-error
#: chance loss under a cross-entropy gives about 25.
INIT_LOSS_RATIOS = (0.5, 20.0)

#: The largest growth per step, as a log, that a float64 state survives: an exponent above it
#: (or an infinite sum) is a state that overflowed, which lyapunov_spectrum marks diverged.
_OVERFLOW = math.log(sys.float_info.max)


def _overflowed(spectrum: Mapping) -> bool:
    """Whether a stored spectrum holds an exponent or sum no network that did not diverge has."""
    return _float(spectrum.get("sum")) == math.inf or any(
        _float(v) > _OVERFLOW for v in spectrum.get("mean", []))


def _horizon(finished: list[FrozenTrial], steps_per_epoch: int) -> int | None:
    """The epochs the study's finished trials trained for (the longest), if any finished."""
    steps = [t.last_step for t in finished if t.last_step is not None]
    return max(steps) // steps_per_epoch if steps else None


_STORAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STORAGE_NUMBERS = itertools.count()
_STORAGES_LOCK = threading.Lock()


def _trial_key(study, trial) -> tuple[int, int]:
    """A trial in this process's caches: its storage (numbered while it lives: a new in-memory
    study may get a freed one's id()) and its id there (a study deleted and made again under
    its name, or a new in-memory study, holds other trials)."""
    storage = study._storage
    with _STORAGES_LOCK:
        try:
            number = _STORAGES.get(storage)
            if number is None:
                number = _STORAGES[storage] = next(_STORAGE_NUMBERS)
        except TypeError:  # a storage that takes no weak reference
            number = id(storage)
    return number, trial._trial_id


def _outside_stacklevel() -> int:
    """The ``stacklevel``, for a warning issued by the caller, of the first frame outside
    lepredict and Optuna: the line that called ``trial.should_prune()``, however many pruners
    wrap this one (Python 3.12's ``skip_file_prefixes``, by hand)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
            "lepredict", "optuna"):
        frame, level = frame.f_back, level + 1
    return level


def _rank_at(study: optuna.Study, trials: list[FrozenTrial], trial: FrozenTrial,
             step: int) -> tuple[int, int, int]:
    """The trial's rank (1 = best, in the study's direction) among the finite values reported
    at the latest of its steps up to ``step`` that another trial reported at too, how many
    trials reported there, and that step. A trial no other trial has reported beside (the
    first of a study, or the first member of a population to report) ranks 1 of 1 at
    ``step``: it leads nothing.

    A tie is no lead: of the trials tied at a value, the first (the lowest number) that is still
    running or finished ranks where the value does, and the others behind the whole tie, so a
    study whose trials all sit at chance (an accuracy of exactly 1/classes) protects at most
    one of them, not all. A pruned (or failed) trial is out of the race and takes no tie's
    place: the first trial still in it at that value is the best still going there."""
    sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
    for at in sorted((s for s in trial.intermediate_values if s <= step), reverse=True):
        mine = trial.intermediate_values[at]
        others = [(t, t.intermediate_values[at]) for t in trials
                  if t.number != trial.number and at in t.intermediate_values
                  and math.isfinite(t.intermediate_values[at])]
        if not others:
            continue
        if not math.isfinite(mine):  # its own non-finite value there ranks last
            return len(others) + 1, len(others) + 1, at
        better = sum(sign * v < sign * mine for _, v in others)
        tied = [t for t, v in others if v == mine]
        if any(t.number < trial.number and t.state not in (TrialState.PRUNED, TrialState.FAIL)
               for t in tied):
            better += len(tied)
        return better + 1, len(others) + 1, at
    return 1, 1, step


def _best_prediction(study: optuna.Study, finished: list[FrozenTrial],
                     budget: int) -> tuple[int, float] | None:
    """The best finished trial (by the study's own values and direction) and its predicted
    final loss at ``budget``, if the pruner recorded one."""
    finished = [t for t in finished if t.value is not None and math.isfinite(t.value)]
    if not finished:
        return None
    best = (min if study.direction == StudyDirection.MINIMIZE else max)(
        finished, key=lambda t: t.value)
    for record in attrs_by_step(own_attrs(best), PREDICTION).values():
        if isinstance(record, Mapping) and record.get("budget") == budget \
                and record.get("final_loss") is not None:
            return best.number, float(record["final_loss"])
    return None
