"""Features of a run's early training, for predicting its final outcome.

Every function here takes runs as rows of a trials frame (:func:`lepredict.sweep.trials_frame`,
or an export read back with :func:`lepredict.sweep.read_trials`) and an early ``budget``: the
epochs ``0..budget`` a prediction may look at (epoch 0 = at initialisation). Feature sets:

* ``"spectrum"``: per early epoch, the :data:`TOP` leading exponents (mean over the probe
  trajectories), their mean, how many are positive, their spread over trajectories, the share of
  diverged trajectories, ``log2 n`` and the mean of all ``n`` exponents (the sum rule's
  ``log|det J|``, :attr:`lepredict.LyapunovSpectrum.exponent_sum`); and the change of each
  summary from one epoch to the next. A measurement needs ``k = TOP`` exponents and the sum, so
  its cost is ``O(n^2 k)`` per step, not the full spectrum's ``O(n^3)``.
* ``"spectrum_full"``: the same from the whole spectrum: the spectrum on a common grid (exponent
  ``i`` of ``n`` sits at ``(i + 1/2) / n``, so networks of any size compare), the largest
  exponent, the mean, the number and share of positive and of near-zero exponents, the
  Kaplan-Yorke dimension as a share of ``n``, the spreads and the diverged share.
* Baselines, computed the same way: ``"loss"`` (the early validation loss curve, normalised by
  the task's chance loss, and its changes), ``"weights"`` (spectral radius and norms of the recurrent weights),
  ``"grad"`` (gradient norms; none at budget 0) and ``"hparams"`` (the hyperparameters).

A diverged run has defined features, never NaN: its missing epochs repeat the last measured
spectrum with the diverged share set to 1, its losses sit at :data:`LOSS_CAP`, and so on. An
epoch a run that did not diverge has no spectrum or loss for (``None`` in ``val_loss``: a loop
of one's own that reported at other steps) repeats the epoch before (a loss missing at epoch 0
reads as the first one given).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lepredict.records import (ARCHS, FEATURE_SETS, HPARAM_COLUMN, INITS, MEASURED_EXPONENTS,
                               OPTIMIZERS, PARAM_COLUMN, exponent_total, hparam_value)

__all__ = [
    "FEATURE_SETS",
    "GRID",
    "TOP",
    "build_features",
    "completed_runs",
    "describe_feature",
    "feature_names",
    "hparam_column",
    "kaplan_yorke",
    "outcomes",
    "spectrum_grid",
    "spectrum_summary",
    "top_summary",
    "unknown_outcomes",
]

#: Points of the common grid each spectrum is interpolated onto.
GRID = 16
#: Exponents are clipped to ``[-CLIP, CLIP]``: a floored (saturated) direction is very negative
#: and carries no more information below this.
CLIP = 20.0
#: ``|lambda| < NEAR_ZERO`` (natural log per step) counts as a near-zero exponent.
NEAR_ZERO = 0.01
#: Normalised losses are clipped to ``[0, LOSS_CAP]``; a diverged run's missing losses take it.
LOSS_CAP = 10.0
#: The regression target, the final normalised loss, is clipped to ``[0, TARGET_CAP]``: above
#: chance by this much a run is simply bad, and a diverged run (``inf``) gets this value.
TARGET_CAP = 3.0
#: Summaries whose change from one epoch to the next is a feature too.
_CHANGES = ("lmax", "mean", "top_mean", "n_pos", "share_pos", "share_zero", "ky", "spread",
            "spread_max", "diverged")
#: The ``"spectrum"`` features use this many leading exponents, so a measurement needs only
#: ``k = TOP`` tangent directions: O(n^2 k) per step instead of the full spectrum's O(n^3).
TOP = MEASURED_EXPONENTS


def kaplan_yorke(exponents: Sequence[float]) -> float:
    """Kaplan-Yorke dimension of a spectrum sorted descending (0 if even the largest is < 0)."""
    total = 0.0
    for j, lam in enumerate(exponents):
        if total + lam < 0:
            return j + total / abs(lam) if j else 0.0
        total += lam
    return float(len(exponents))


def spectrum_grid(exponents: Sequence[float], size: int = GRID) -> np.ndarray:
    """A descending spectrum of any length ``n`` resampled at ``size`` points of the index grid
    ``i / n``, so spectra of networks of different sizes compare point by point."""
    lam = np.clip(np.asarray(exponents, dtype=float), -CLIP, CLIP)
    n = len(lam)
    return np.interp((np.arange(size) + 0.5) / size, (np.arange(n) + 0.5) / n, lam)


def spectrum_summary(mean: Sequence[float], std: Sequence[float] | None = None,
                     diverged: float = 0.0) -> dict[str, float]:
    """Scalar summaries of one spectrum (mean over trajectories, and its spread)."""
    lam = np.clip(np.asarray(mean, dtype=float), -CLIP, CLIP)
    n = len(lam)
    spread = np.clip(np.asarray(std if std is not None and len(std) == n else np.zeros(n),
                               dtype=float), 0, CLIP)
    return {
        "lmax": float(lam[0]),
        "mean": float(lam.mean()),
        "n_pos": float((lam > NEAR_ZERO).sum()),
        "share_pos": float((lam > NEAR_ZERO).mean()),
        "share_zero": float((np.abs(lam) <= NEAR_ZERO).mean()),
        "ky": kaplan_yorke(lam) / n,
        "spread": float(spread.mean()),
        "spread_max": float(spread.max()),
        "diverged": float(diverged),
    }


def _num(value, default: float = math.nan) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v


def _list(value) -> list:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return json.loads(value)
    return list(value)


def _chance(row: pd.Series) -> float:
    chance = _num(row.get("chance_loss"))
    if math.isfinite(chance) and chance > 0:
        return chance
    # Older exports lack the column: the final losses give it back where the run finished.
    final, norm = _num(row.get("final_val_loss")), _num(row.get("final_normalised_loss"))
    if math.isfinite(final) and math.isfinite(norm) and norm > 0:
        return final / norm
    raise ValueError(
        f"Run {row.get('study')}#{row.get('number')} has no chance loss to normalise its losses "
        "by; export the study again with this version of lepredict (`lepredict export`)."
    )


def _diverged_by(row: pd.Series, epoch: int) -> bool:
    """Whether the run had already diverged when ``epoch`` should have been measured."""
    return row.get("status") == "diverged" and len(_list(row.get("val_loss"))) <= epoch


def _sum_measured(row: pd.Series) -> bool:
    """Whether some epoch of the run has a finite exponent sum (``leE_sum``): its spectra were
    measured with the sum, so a missing one is a failed value, not a missing measurement."""
    return any(math.isfinite(_num(v)) for k, v in row.items()
               if str(k).startswith("le") and str(k).endswith("_sum"))


def _spectrum_rows(row: pd.Series, budget: int, summarise, prefix: str = "spec") -> dict[str, float]:
    """Per early epoch the ``summarise``d spectrum, and its change from the epoch before, named
    ``{prefix}_e{epoch}_...`` and ``{prefix}_d{epoch}_...``; an epoch without a finite spectrum
    repeats the last one (a zero spectrum before any). A partial spectrum whose measured sum is
    not finite (NaN or inf: the log-determinant overflowed on a trajectory not flagged as
    diverged; 5 of corpus v2's 5,157 runs) counts as not finite, when the run has a finite sum at
    some epoch; a run measured without the sum at every epoch is an error
    (:func:`top_summary`)."""
    out: dict[str, float] = {}
    last: dict | None = None
    previous: dict | None = None
    sum_measured: bool | None = None
    for e in range(budget + 1):
        mean = _list(row.get(f"le{e}_mean"))
        finite = bool(mean) and all(math.isfinite(v) for v in mean)
        if finite:
            std = _list(row.get(f"le{e}_std"))
            div = _num(row.get(f"le{e}_diverged"), 0.0)
            n = _num(row.get(f"le{e}_n"), float(len(mean)))
            n = len(mean) if math.isnan(n) else int(n)
            given = row.get(f"le{e}_sum")
            total = _num(given)
            if math.isnan(total) and n == len(mean):
                total = exponent_total(mean)
            if not math.isfinite(total) and n > len(mean):
                if sum_measured is None:
                    sum_measured = _sum_measured(row)
                # A partial spectrum measured with its sum, whose sum came out non-finite at
                # this epoch (seen in corpus v2: 3-layer GRUs whose log|det J| was NaN after
                # training began): an epoch without a finite spectrum, like a non-finite
                # exponent. Measured without the sum at any epoch, summarise still says how to
                # measure it.
                finite = not sum_measured
        if finite:
            last = summarise(mean, std, div, n, total)
        elif last is None:
            # No spectrum yet (or a state that overflowed at once): a flat zero spectrum.
            last = summarise([0.0], [0.0], 0.0, 1, 0.0)
        summary = dict(last)
        if _diverged_by(row, e) or not mean and row.get("status") == "diverged":
            summary["diverged"] = 1.0
        out.update({f"{prefix}_e{e}_{k}": v for k, v in summary.items()})
        if previous is not None:
            out.update({f"{prefix}_d{e}_{k}": summary[k] - previous[k] for k in summary
                        if k in _CHANGES})
        previous = summary
    return out


def top_summary(mean: Sequence[float], std: Sequence[float] | None = None,
                diverged: float = 0.0, n: int | None = None, exponent_sum: float | None = None,
                *, top: int = TOP) -> dict[str, float]:
    """Summaries of the ``top`` leading exponents of a spectrum of a state of size ``n``: the
    exponents themselves (a spectrum shorter than ``top``, of a state smaller than ``top``, is
    padded with ``-CLIP``: no direction there), their mean, how many are positive, their spread
    over the trajectories, the trajectories' diverged share, ``log2 n``, and the mean of all
    ``n`` exponents (``exponent_sum / n``; the sum of ``mean`` for a full spectrum).

    Raises:
        ValueError: fewer than ``top`` exponents of a state that has more, or a partial
            spectrum without its ``exponent_sum``.
    """
    n = len(mean) if n is None else int(n)
    have = min(len(mean), top)
    if have < min(top, n):
        raise ValueError(
            f"The spectrum has {len(mean)} exponents of a state of size {n}, but the predictor "
            f"uses the leading {top}: measure at least k={min(top, n)} exponents."
        )
    if exponent_sum is None or not math.isfinite(exponent_sum):
        if len(mean) < n:
            raise ValueError(
                f"The spectrum has {len(mean)} of {n} exponents and not their sum, which the "
                "predictor uses: measure with exponent_sum=True (lepredict.lyapunov_spectrum)."
            )
        exponent_sum = exponent_total(mean)
    lam = np.full(top, -CLIP)
    lam[:have] = np.clip(np.asarray(mean[:have], dtype=float), -CLIP, CLIP)
    spread = np.zeros(top)
    if std is not None and len(std) >= have:
        spread[:have] = np.clip(np.asarray(std[:have], dtype=float), 0, CLIP)
    out = {"lmax": float(lam[0])}
    out.update({f"l{j + 1:02d}": float(lam[j]) for j in range(1, top)})
    out.update({
        "top_mean": float(lam[:have].mean()),
        "n_pos": float((lam > NEAR_ZERO).sum()),
        "spread": float(spread[:have].mean()),
        "spread_max": float(spread.max()),
        "diverged": float(diverged),
        "log2_n": math.log2(max(n, 1)),
        "mean": float(np.clip(exponent_sum / max(n, 1), -CLIP, CLIP)),
    })
    return out


def _full_summary(mean, std, diverged, n, exponent_sum=None) -> dict[str, float]:
    if len(mean) < n:
        raise ValueError(f"The spectrum has {len(mean)} of {n} exponents, but the "
                         "'spectrum_full' features need all: measure with k=None.")
    out = {f"g{i:02d}": float(v) for i, v in enumerate(spectrum_grid(mean))}
    out.update(spectrum_summary(mean, std, diverged))
    return out


def _spectrum_features(row: pd.Series, budget: int) -> dict[str, float]:
    return _spectrum_rows(row, budget, top_summary)


def _spectrum_full_features(row: pd.Series, budget: int) -> dict[str, float]:
    # Its own prefix: both sets name a largest exponent, a mean, a spread..., with other meanings.
    return _spectrum_rows(row, budget, _full_summary, prefix="full")


def _capped(v: float, cap: float) -> float:
    return cap if not math.isfinite(v) else float(min(max(v, 0.0), cap))


def _loss_features(row: pd.Series, budget: int) -> dict[str, float]:
    chance = _chance(row)
    val = _list(row.get("val_loss"))
    out: dict[str, float] = {}
    given = [v for v in val if v is not None]
    for e in range(budget + 1):
        if e < len(val) and val[e] is None:
            # An epoch a loop of one's own reported no loss for (not a diverged one, whose
            # losses are non-finite or end early): read as the epoch before, like a spectrum;
            # at initialisation, as the first loss given.
            out[f"loss_e{e}"] = out[f"loss_e{e - 1}"] if e else _capped(
                _num(given[0]) / chance if given else math.inf, LOSS_CAP)
        else:
            v = _num(val[e]) / chance if e < len(val) else math.inf
            out[f"loss_e{e}"] = _capped(v, LOSS_CAP)
        if e > 0:
            out[f"loss_d{e}"] = out[f"loss_e{e}"] - out[f"loss_e{e - 1}"]
    return out


def _weight_features(row: pd.Series, budget: int) -> dict[str, float]:
    weights = _list(row.get("weights"))
    hidden = _num(hparam_value(row, "hidden"), 1.0)
    out: dict[str, float] = {}
    for e in range(budget + 1):
        w = weights[min(e, len(weights) - 1)] if weights else {}
        diverged = e >= len(weights)

        def log(v, scale=1.0):
            v = _num(v, math.inf) / scale
            return math.log(min(v, 1e6)) if v > 0 and not diverged else math.log(1e6)

        out[f"w_e{e}_radius"] = log(w.get("w_hh_radius"))
        out[f"w_e{e}_opnorm"] = log(w.get("w_hh_opnorm"))
        out[f"w_e{e}_hh_rms"] = log(w.get("w_hh_norm"), math.sqrt(hidden))
        out[f"w_e{e}_ih_rms"] = log(w.get("w_ih_norm"), math.sqrt(hidden))
    return out


def _grad_features(row: pd.Series, budget: int) -> dict[str, float]:
    grads = _list(row.get("grad_norm"))
    out: dict[str, float] = {}
    for e in range(1, budget + 1):
        g = _num(grads[e - 1], math.inf) if e - 1 < len(grads) else math.inf
        out[f"grad_e{e}"] = math.log10(g) if math.isfinite(g) and g > 0 else 10.0
    return out


def _hparam_features(row: pd.Series, budget: int) -> dict[str, float]:
    arch, opt = hparam_value(row, "arch"), hparam_value(row, "optimizer")
    init = hparam_value(row, "init")
    init = init if isinstance(init, str) else "uniform"
    out = {f"hp_arch_{a}": float(arch == a) for a in ARCHS}
    out.update({f"hp_opt_{o}": float(opt == o) for o in OPTIMIZERS})
    out.update({f"hp_init_{i}": float(init == i) for i in INITS})

    def get(name, default):
        v = _num(hparam_value(row, name), default)
        return default if math.isnan(v) else v

    out["hp_log2_hidden"] = math.log2(get("hidden", 64))
    out["hp_layers"] = get("layers", 1)
    out["hp_log10_init_scale"] = math.log10(get("init_scale", 0.1))
    out["hp_log10_lr"] = math.log10(get("lr", 1e-3))
    out["hp_log2_batch_size"] = math.log2(get("batch_size", 64))
    out["hp_clip"] = get("clip", 0.0)
    # Runs recorded before weight decay existed had none: a missing column reads as 0.
    out["hp_weight_decay"] = get("weight_decay", 0.0)
    return out


_BUILDERS = {
    "spectrum": _spectrum_features,
    "spectrum_full": _spectrum_full_features,
    "loss": _loss_features,
    "weights": _weight_features,
    "grad": _grad_features,
    "hparams": _hparam_features,
}


def _check(budget: int, sets: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget must be a non-negative int (epochs 0..budget), got {budget=}.")
    if isinstance(sets, str):
        sets = (sets,)
    unknown = [s for s in sets if s not in _BUILDERS]
    if unknown or not sets:
        raise ValueError(f"Unknown feature sets {unknown or sets!r}; choose from {FEATURE_SETS}.")
    return tuple(sets)


def build_features(frame: pd.DataFrame, *, budget: int,
                   sets: Sequence[str] = ("spectrum",)) -> pd.DataFrame:
    """Feature matrix (one row per run, same index as ``frame``) from epochs ``0..budget``.

    Example:
        >>> import lepredict
        >>> from lepredict.features import build_features
        >>> rec = lepredict.train_run({"arch": "gru", "hidden": 8}, lepredict.tasks.get(
        ...     "digits", mode="row"), epochs=1, le_epochs=[0, 1])
        >>> frame = lepredict.sweep.record_frame(rec, lepredict.tasks.get("digits", mode="row"))
        >>> build_features(frame, budget=1, sets=["spectrum", "loss"]).shape[1]
        56
    """
    sets = _check(budget, sets)
    rows = [{k: v for s in sets for k, v in _BUILDERS[s](row, int(budget)).items()}
            for _, row in frame.iterrows()]
    out = pd.DataFrame(rows, index=frame.index, columns=feature_names(budget, sets))
    return out.astype(float)


def feature_names(budget: int, sets: Sequence[str]) -> list[str]:
    """Column names :func:`build_features` gives for ``budget`` and ``sets``, in order."""
    sets = _check(budget, sets)
    row = pd.Series({
        "status": "ok", "val_loss": [1.0] * (budget + 1), "train_loss": [1.0] * budget,
        "grad_norm": [1.0] * budget, "chance_loss": 1.0, "param_hidden": 4,
        "weights": [{}] * (budget + 1),
        **{f"le{e}_mean": [0.0, 0.0] for e in range(budget + 1)},
    })
    return [k for s in sets for k in _BUILDERS[s](row, int(budget))]


#: Plain words for the summaries of :func:`top_summary` (``spec_`` features).
_TOP_WORDS = {
    "lmax": "largest Lyapunov exponent",
    "mean": "mean of all Lyapunov exponents (their sum over the state size)",
    "top_mean": f"mean of the {TOP} largest Lyapunov exponents",
    "log2_n": "log2 of the size of the state the spectrum is of",
    "n_pos": f"number of positive Lyapunov exponents (above {NEAR_ZERO}) among the {TOP} largest",
    "spread": f"mean spread of the {TOP} largest exponents over the probe sequences",
    "spread_max": f"largest spread of one of the {TOP} largest exponents over the probe sequences",
    "diverged": "share of probe trajectories that diverged",
}
#: Plain words for the summaries of :func:`spectrum_summary` (``full_`` features).
_FULL_WORDS = {
    "lmax": "largest Lyapunov exponent",
    "mean": "mean Lyapunov exponent",
    "n_pos": f"number of positive Lyapunov exponents (above {NEAR_ZERO})",
    "share_pos": f"share of positive Lyapunov exponents (above {NEAR_ZERO})",
    "share_zero": f"share of near-zero Lyapunov exponents (|exponent| <= {NEAR_ZERO})",
    "ky": "Kaplan-Yorke dimension as a share of the state size",
    "spread": "mean spread of the exponents over the probe sequences",
    "spread_max": "largest spread of an exponent over the probe sequences",
    "diverged": "share of probe trajectories that diverged",
}
_WEIGHT_WORDS = {
    "radius": "log spectral radius of the recurrent weights",
    "opnorm": "log largest singular value of the recurrent weights",
    "hh_rms": "log Frobenius norm of the recurrent weights / sqrt(hidden units)",
    "ih_rms": "log Frobenius norm of the input weights / sqrt(hidden units)",
}
_HPARAM_WORDS = {
    "log2_hidden": "log2 of the hidden units",
    "layers": "number of recurrent layers",
    "log10_init_scale": "log10 of the initialisation scale",
    "log10_lr": "log10 of the learning rate",
    "log2_batch_size": "log2 of the batch size",
    "clip": "gradient clipping norm (0: none)",
    "weight_decay": "weight decay (L2 penalty given to the optimizer; 0: none)",
    **{f"arch_{a}": f"architecture is {a.upper()} (1) or not (0)" for a in ARCHS},
    **{f"opt_{o}": f"optimizer is {o} (1) or not (0)" for o in OPTIMIZERS},
    **{f"init_{i}": f"initialisation is {i!r} (1) or not (0)" for i in INITS},
}


def _when(epoch: int) -> str:
    return "at initialisation" if epoch == 0 else f"after epoch {epoch}"


def _between(epoch: int) -> str:
    return f"from {'initialisation' if epoch == 1 else f'epoch {epoch - 1}'} to epoch {epoch}"


def describe_feature(name: str) -> str:
    """A feature column of :func:`build_features` in plain words.

    Args:
        name: a name :func:`feature_names` gives, e.g. ``"spec_e1_lmax"``.

    Returns:
        What the feature measures and when, e.g. ``"largest Lyapunov exponent after epoch 1"``.

    Raises:
        ValueError: for a name no feature set produces.

    Example:
        >>> describe_feature("loss_d1")
        'change in the validation loss (normalised by chance) from initialisation to epoch 1'
    """
    import re

    match = re.fullmatch(r"full_e(\d+)_g(\d+)", name)
    if match and int(match[2]) < GRID:
        epoch, i = int(match[1]), int(match[2])
        # Grid point i sits at (i + 1/2) / GRID of the descending spectrum (spectrum_grid).
        return (f"Lyapunov exponent {(i + 0.5) / GRID:.0%} of the way down the whole spectrum "
                f"(largest first), {_when(epoch)}")
    match = re.fullmatch(r"spec_e(\d+)_l(\d\d)", name)
    if match and 2 <= int(match[2]) <= TOP:
        return f"Lyapunov exponent number {int(match[2])} (largest first), {_when(int(match[1]))}"
    match = re.fullmatch(r"(spec|full)_([ed])(\d+)_(\w+)", name)
    words = {"spec": _TOP_WORDS, "full": _FULL_WORDS}[match[1]] if match else {}
    if match and match[4] in words and (
            match[2] == "e" or int(match[3]) > 0 and match[4] in _CHANGES):
        what, epoch = words[match[4]], int(match[3])
        # The whole-spectrum set repeats names of the default one: say which it is.
        source = " (from the whole spectrum)" if match[1] == "full" else ""
        if match[2] == "e":
            return f"{what}{source} {_when(epoch)}"
        return f"change in the {what}{source} {_between(epoch)}"
    match = re.fullmatch(r"loss_([ed])(\d+)", name)
    if match and (match[1] == "e" or int(match[2]) > 0):
        epoch = int(match[2])
        if match[1] == "e":
            return f"validation loss (normalised by chance) {_when(epoch)}"
        return f"change in the validation loss (normalised by chance) {_between(epoch)}"
    match = re.fullmatch(r"w_e(\d+)_(\w+)", name)
    if match and match[2] in _WEIGHT_WORDS:
        return f"{_WEIGHT_WORDS[match[2]]} {_when(int(match[1]))}"
    match = re.fullmatch(r"grad_e(\d+)", name)
    if match and int(match[1]) > 0:
        return f"log10 of the mean gradient norm during epoch {int(match[1])}"
    match = re.fullmatch(r"hp_(\w+)", name)
    if match and match[1] in _HPARAM_WORDS:
        return _HPARAM_WORDS[match[1]]
    raise ValueError(f"{name!r} is not a feature lepredict builds; see feature_names().")


def completed_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs with a final outcome: finished trials, diverged ones included; pruned, failed
    and running trials have none, nor has a finished trial whose final loss is unknown (see
    :func:`unknown_outcomes`)."""
    return frame[(frame["state"] == "COMPLETE") & ~unknown_outcomes(frame)]


def unknown_outcomes(frame: pd.DataFrame) -> pd.Series:
    """Finished trials whose final loss is unknown and that did not diverge: a loop's trials
    that gave their losses for the early epochs only (a maximised study, say). Labelling them
    untrainable would be inventing an outcome, so they are left out of fitting and scoring."""
    final, raw, diverged = _final_losses(frame)
    # A final loss without its normalised value lacks the chance loss, not an outcome:
    # outcomes() says so rather than drop the trial.
    return (frame["state"] == "COMPLETE") & final.isna() & raw.isna() & ~diverged


def _final_losses(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Per run: the final normalised loss, the final loss as reported (NaN where a frame has
    neither), and whether the run diverged."""
    final = pd.to_numeric(frame["final_normalised_loss"], errors="coerce").astype(float)
    raw = pd.to_numeric(frame["final_val_loss"], errors="coerce") if "final_val_loss" in frame \
        else pd.Series(np.nan, index=frame.index)
    diverged = (frame["status"] if "status" in frame else pd.Series(None, index=frame.index)
                ).eq("diverged")
    return final, raw, diverged


def outcomes(frame: pd.DataFrame, *, threshold: float | None = None) -> pd.DataFrame:
    """Labels of finished runs: ``trainable`` (did not diverge and final normalised loss below
    the threshold: ``threshold`` if given, else each run's task default) and ``final_loss`` (the
    final normalised loss clipped to ``[0, TARGET_CAP]``)."""
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive finite number, got {threshold=}.")
    final, raw, diverged = _final_losses(frame)
    unscaled = final.isna() & raw.notna() & ~diverged
    if unscaled.any():
        raise ValueError(
            f"{int(unscaled.sum())} finished run(s) have a final loss but no chance loss to "
            "normalise it by: give chance_loss= to report_spectrum or measure_and_report "
            "(the loss of the best constant prediction; lepredict.chance_loss computes it).")
    if threshold is None:
        if "threshold" not in frame or frame["threshold"].isna().any():
            raise ValueError("Some runs have no task threshold (a study of your own, a "
                             "custom task or an old export): pass threshold=T (--threshold T "
                             "on the command line), the final normalised loss (final loss / "
                             "chance loss) below which a finished run counts as trained; the "
                             "corpus's tasks use 0.05-0.7, most 0.5.")
        limit = frame["threshold"].astype(float)
    else:
        limit = pd.Series(float(threshold), index=frame.index)
    finite = np.isfinite(final)
    trainable = finite & ~diverged & (final < limit)
    return pd.DataFrame({
        "trainable": trainable.astype(bool),
        "final_loss": final.where(finite, TARGET_CAP).clip(0.0, TARGET_CAP),
    }, index=frame.index)


def hparam_column(frame: pd.DataFrame, name: str) -> pd.Series | None:
    """The runs' hyperparameter ``name`` as :func:`lepredict.records.hparam_value` reads it
    from each row (declared, else the parameter), or ``None`` where the frame has neither."""
    declared, param = f"{HPARAM_COLUMN}{name}", f"{PARAM_COLUMN}{name}"
    if declared in frame and param in frame:
        return frame[declared].where(frame[declared].notna(), frame[param])
    return frame[declared] if declared in frame else frame[param] if param in frame else None
