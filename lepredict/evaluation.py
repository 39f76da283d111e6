"""Honest evaluation of the stability predictor against its strongest baselines, with intervals.

Every figure comes from runs held out of the fit that predicts them. Schemes (what is held out):

* ``"configs"``: 5 folds of configurations (grouped by the hyperparameters, so a configuration
  seen in training never scores), stratified by label; metrics pooled over the folds.
* ``"task"``: leave one task out; metrics on each held-out task, then their mean.
* ``"arch"``: leave one architecture out; likewise.
* ``"holdout:PREDICATE"``: a part of the search space, e.g. ``"holdout:arch=lstm"``,
  ``"holdout:hidden>=128"`` or ``"holdout:task=charlm,lorenz"`` (:func:`holdout_mask`): one
  model fitted on the runs the predicate does not select, evaluated on those it selects.
* ``"test"``: one model fitted on all the runs, evaluated on other runs (``test=``, e.g. sweeps
  made later); metrics pooled.

Feature sets are named by :data:`lepredict.features.FEATURE_SETS` joined with ``+``
(``"hparams+loss+spectrum"``). Each scheme runs each early budget and feature set with the same
model and folds, so the comparison is like for like. Each metric gets a bootstrap interval:
configurations are resampled with replacement within each task (a run's seeds travel together),
the held-out predictions stay fixed, and the interval is the percentile interval of the metric
over the resamples. Differences against a baseline (:data:`BASELINE`, the hyperparameters and the
early loss) are computed on the same resamples, so the interval is that of the paired difference.
The intervals describe the uncertainty from the finite set of evaluated configurations, not the
variation between fits.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

from lepredict.features import FEATURE_SETS, completed_runs, hparam_column, outcomes
from lepredict.records import (BASELINE, COMPARED, HPARAM_COLUMN, N_BOOT, PARAM_COLUMN,
                               SCHEMES)
from lepredict.predictor import MIN_PER_CLASS, StabilityPredictor, metric_table

__all__ = ["BASELINE", "COMPARED", "N_BOOT", "SCHEMES", "bootstrap_counts", "compare",
           "config_groups", "cross_validate", "format_groups", "format_summary", "holdout_mask",
           "interval", "out_of_fold", "parse_sets", "summarise", "weighted_auroc",
           "weighted_spearman"]

#: The column each leave-one-out scheme groups by: a frame's own, or a hyperparameter.
_LOGO = {"task": "task", "arch": "arch"}
_TITLES = {"configs": "held-out configurations (5 folds grouped by configuration; pooled)",
           "task": "held-out task (leave one task out; mean over tasks)",
           "arch": "held-out architecture (leave one architecture out; mean over architectures)",
           "test": "test runs (fitted on all of --data; pooled)"}


def parse_sets(name: str) -> tuple[str, ...]:
    """The feature sets of a compared name: ``"hparams+loss"`` -> ``("hparams", "loss")``.

    Example:
        >>> parse_sets("hparams+loss+spectrum")
        ('hparams', 'loss', 'spectrum')
    """
    parts = tuple(p.strip() for p in str(name).split("+"))
    unknown = [p for p in parts if p not in FEATURE_SETS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"Unknown feature set {name!r}: name sets from {', '.join(FEATURE_SETS)}, "
                         "joined by '+' without repeats (e.g. hparams+loss).")
    return parts


def config_groups(frame: pd.DataFrame) -> np.ndarray:
    """One group per configuration: the task and hyperparameters, seed excluded."""
    cols = sorted(c for c in frame.columns if c.startswith((PARAM_COLUMN, HPARAM_COLUMN))
                  and c not in (f"{PARAM_COLUMN}seed", f"{HPARAM_COLUMN}seed"))
    keys = frame[["task", "task_options", *cols]].apply(lambda r: "|".join(map(str, r)), axis=1)
    return keys.map(lambda k: hashlib.sha1(k.encode()).hexdigest()[:12]).to_numpy()


_PREDICATE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|!=|==|=|>|<)\s*(\S.*?)\s*$")


def holdout_mask(frame: pd.DataFrame, predicate: str) -> np.ndarray:
    """The runs a search-space predicate selects (``COLUMN OP VALUE``, or several joined).

    ``COLUMN`` is a column of the frame, or a hyperparameter without its ``param_`` prefix
    (``arch``, ``hidden``, ``layers``, ...). ``OP`` is one of ``= == != > >= < <=``; ``=`` and
    ``!=`` take a comma-separated list of values (``task=charlm,lorenz``). Numeric columns
    compare as numbers; a run with no value in the column is never selected. Conditions join
    with ``&`` (all of them) and ``|`` (any of them), ``&`` first: ``layers>=2 | init!=uniform``
    holds out everything but one-layer uniform networks, so the fit sees only those.

    Example:
        >>> frame = pd.DataFrame({"param_arch": ["rnn", "lstm"], "param_hidden": [16, 128]})
        >>> [holdout_mask(frame, p).tolist() for p in ("hidden>=128", "arch=gru,lstm")]
        [[False, True], [False, True]]
        >>> holdout_mask(frame, "arch=lstm & hidden<64 | hidden<32").tolist()
        [True, False]
    """
    clauses = [part.split("&") for part in str(predicate).split("|")]
    if len(clauses) > 1 or len(clauses[0]) > 1:
        if any(not c.strip() for part in clauses for c in part):
            raise ValueError(f"holdout {predicate!r} has an empty condition around '&' or '|'; "
                             "write COLUMN OP VALUE on each side, e.g. layers>=2 | init!=uniform.")
        out = np.zeros(len(frame), dtype=bool)
        for part in clauses:
            out |= np.logical_and.reduce([_condition(frame, c, predicate) for c in part])
        return out
    return _condition(frame, str(predicate), predicate)


def _condition(frame: pd.DataFrame, condition: str, predicate: str) -> np.ndarray:
    """The runs one ``COLUMN OP VALUE`` condition of ``predicate`` selects."""
    match = _PREDICATE.match(condition)
    if not match:
        raise ValueError(f"holdout {predicate!r} is not COLUMN OP VALUE (OP one of = != > >= < "
                         "<=), e.g. arch=lstm or hidden>=128.")
    name, op, value = match.groups()
    values = frame[name] if name in frame.columns else hparam_column(frame, name)
    if values is None:
        known = sorted({c.removeprefix(PARAM_COLUMN).removeprefix(HPARAM_COLUMN)
                        for c in frame.columns if c.startswith((PARAM_COLUMN, HPARAM_COLUMN))}
                       | {"task", "study"})
        raise ValueError(f"holdout {predicate!r}: the data have no column {name!r}; use one of "
                         f"{', '.join(known)}.")
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    items = [v.strip() for v in value.split(",")] if op in ("=", "==", "!=") else [value]

    def parse(v: str):
        if not numeric:
            return v
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"holdout {predicate!r}: {name} is numeric, {v!r} is not a "
                             "number.") from None

    targets = [parse(v) for v in items]
    if op in ("=", "==", "!="):
        shown = values.astype(float) if numeric else values.astype(str)
        hit = shown.isin(targets) & values.notna()
        return (hit if op != "!=" else ~hit & values.notna()).to_numpy(dtype=bool)
    if not numeric:
        raise ValueError(f"holdout {predicate!r}: {name} is not numeric, so only = and != "
                         "apply to it.")
    x = values.astype(float)
    compare_ = {">": x.gt, ">=": x.ge, "<": x.lt, "<=": x.le}[op]
    return compare_(targets[0]).fillna(False).to_numpy(dtype=bool)


def _scheme_kind(scheme: str) -> str:
    if scheme in SCHEMES or scheme == "test":
        return scheme
    if scheme.startswith("holdout:"):
        return "holdout"
    raise ValueError(f"scheme must be one of {SCHEMES}, 'holdout:PREDICATE' or 'test', got "
                     f"{scheme=}.")


def _splits(frame: pd.DataFrame, y: np.ndarray, scheme: str, seed: int,
            is_test: np.ndarray | None = None):
    """(train, test) index pairs of ``scheme`` over the rows of ``frame``."""
    kind = _scheme_kind(scheme)
    if kind == "configs":
        cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
        return list(cv.split(frame, y, config_groups(frame)))
    if kind in _LOGO:
        column = _LOGO[kind]
        groups = _labels(_group_values(frame, column)).to_numpy()
        if len(np.unique(groups)) < 2:
            raise ValueError(f"Leave-one-{kind}-out needs runs of at least 2 {column} values; "
                             f"the data hold only {np.unique(groups).tolist()}.")
        return list(LeaveOneGroupOut().split(frame, y, groups))
    if kind == "test":
        if is_test is None or not is_test.any():
            raise ValueError("The 'test' scheme needs test runs (test=..., CLI --test-data) with "
                             "finished trials.")
        held = is_test
    else:
        predicate = scheme.removeprefix("holdout:")
        candidate = np.ones(len(frame), dtype=bool) if is_test is None else ~is_test
        held = holdout_mask(frame, predicate) & candidate
        fit_on = ~held & candidate
        if not held.any() or not fit_on.any():
            side, lack = ("none", "evaluate on") if not held.any() else ("all", "fit on")
            raise ValueError(f"holdout {predicate!r} selects {side} of the {int(candidate.sum())} "
                             f"finished runs, which leaves nothing to {lack}; choose a predicate "
                             "that splits the data.")
        held_train = y[fit_on]
        if min(held_train.sum(), (~held_train).sum()) < MIN_PER_CLASS:
            raise ValueError(f"holdout {predicate!r} leaves {int(held_train.sum())} trainable and "
                             f"{int((~held_train).sum())} untrainable runs to fit on; the "
                             f"classifier needs at least {MIN_PER_CLASS} of each.")
        return [(np.flatnonzero(fit_on), np.flatnonzero(held))]
    train = np.flatnonzero(~held)
    return [(train, np.flatnonzero(held))]


def _fold(frame, train, test, budget, sets, threshold, seed, classifier=None, param_grid=None):
    model = StabilityPredictor(budget=budget, feature_sets=sets, threshold=threshold,
                               classifier=classifier, param_grid=param_grid, interval=False,
                               random_state=seed)
    part = frame.iloc[train]
    y = outcomes(part, threshold=threshold)["trainable"]
    if min(y.sum(), (~y).sum()) < MIN_PER_CLASS:  # nothing to learn the other class from
        return test, None, None
    model.fit(part)
    held = frame.iloc[test]
    return test, model.predict_proba(held)[:, 1], model.predict_loss(held)


def _prepare(frame: pd.DataFrame, threshold: float | None, test: pd.DataFrame | None = None):
    """Finished runs (the test runs last), their labels, final losses, and which are test."""
    frame = completed_runs(frame)
    is_test = np.zeros(len(frame), dtype=bool)
    if test is not None:
        test = completed_runs(test)
        is_test = np.r_[is_test, np.ones(len(test), dtype=bool)]
        frame = pd.concat([frame, test], ignore_index=True)
    frame = frame.reset_index(drop=True)
    if frame.empty:
        raise ValueError("No finished runs with a final outcome to evaluate on (pruned, failed "
                         "and running trials have none, nor finished ones whose losses were "
                         "given for the early epochs only).")
    out = outcomes(frame, threshold=threshold)
    return frame, out["trainable"].to_numpy(), out["final_loss"].to_numpy(), is_test


def _held_group(frame: pd.DataFrame, scheme: str) -> np.ndarray:
    """Per run, the group its metrics are reported under: the held-out group of a
    leave-one-out scheme, else the task."""
    column = _LOGO.get(_scheme_kind(scheme), "task")
    return (column + "=" + _labels(_group_values(frame, column))).to_numpy()


def _labels(values: pd.Series) -> pd.Series:
    """Group labels as text, a missing value (a loop of one's own has no task) as "(none)":
    pandas keeps it missing through astype(str), and labels are sorted."""
    return values.astype(object).map(lambda v: "(none)" if pd.isna(v) else str(v))


def _group_values(frame: pd.DataFrame, column: str) -> pd.Series:
    """A frame's own column, or the runs' hyperparameter of that name (declared or sampled)."""
    if column in frame.columns:
        return frame[column]
    values = hparam_column(frame, column)
    if values is None:
        raise ValueError(f"The data have no {column!r}: neither a {PARAM_COLUMN}{column} nor a "
                         f"{HPARAM_COLUMN}{column} column.")
    return values


def _predictions(frame, y, loss, scheme, budget, name, results, configs=None) -> pd.DataFrame:
    """The held-out predictions of one comparison, one row per evaluated run (``configs``:
    :func:`config_groups` of ``frame``, when already computed)."""
    parts = []
    for fold, (test, p, l) in enumerate(results):
        if p is None:
            if scheme == "configs":
                raise ValueError("A training fold holds too few runs of one class; add runs.")
            continue  # a held-out group whose training side held a single class
        parts.append(pd.DataFrame({"row": test, "fold": fold, "proba": p, "loss_pred": l}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["row", "fold", "proba", "loss_pred"])
    rows = out["row"].to_numpy(dtype=int)
    out.insert(0, "features", name)
    out.insert(0, "budget", int(budget))
    out.insert(0, "scheme", scheme)
    out["group"] = _held_group(frame, scheme)[rows]
    out["task"] = _labels(frame["task"]).to_numpy()[rows]
    configs = config_groups(frame) if configs is None and len(rows) else configs
    out["config"] = configs[rows] if len(rows) else []
    out["trainable"] = y[rows]
    out["final_loss"] = loss[rows]
    return out


def out_of_fold(frame: pd.DataFrame, *, budget: int, sets: Sequence[str] | str,
                scheme: str = "configs", test: pd.DataFrame | None = None,
                threshold: float | None = None, random_state: int = 0,
                n_jobs: int | None = None, classifier=None,
                param_grid: dict | None = None) -> pd.DataFrame:
    """Held-out predictions of a :class:`StabilityPredictor` under ``scheme``.

    Args:
        frame: trials frame; only finished runs count.
        budget, sets: the predictor's early budget and feature sets (a list, or a name such as
            ``"hparams+loss"``).
        scheme: see the module's docstring.
        test: the runs the ``"test"`` scheme evaluates on.
        classifier, param_grid: the predictor's; with ``param_grid`` each fold's predictor
            chooses its classifier by grid search on that fold's training runs only (nested
            cross-validation).

    Returns:
        One row per held-out run: ``row`` (position among the finished runs, test runs last),
        ``fold``, ``proba`` (P(trainable)), ``loss_pred``, and ``group``, ``task``, ``config``,
        ``trainable``, ``final_loss``.
    """
    sets = parse_sets(sets) if isinstance(sets, str) else tuple(sets)
    frame, y, loss, is_test = _prepare(frame, threshold, test)
    splits = _splits(frame, y, scheme, random_state, is_test)
    results = Parallel(n_jobs=n_jobs)(
        delayed(_fold)(frame, tr, te, budget, sets, threshold, random_state, classifier,
                       param_grid)
        for tr, te in splits
    )
    return _predictions(frame, y, loss, scheme, budget, "+".join(sets), results)


def cross_validate(frame: pd.DataFrame, *, budget: int, sets: Sequence[str], scheme: str = "configs",
                   threshold: float | None = None, random_state: int = 0,
                   n_jobs: int | None = None, classifier=None,
                   param_grid: dict | None = None, n_boot: int = 0) -> dict:
    """Metrics of a :class:`StabilityPredictor` on held-out runs under ``scheme``.

    Returns :func:`lepredict.predictor.metric_table`'s keys; for ``"task"`` and ``"arch"`` the
    mean over held-out groups, with each group's metrics under ``"groups"``; for pooled schemes
    also ``p_at_99_recall``, and with ``n_boot`` resamples ``auroc_interval`` (95%, as
    :func:`summarise` takes it). ``classifier`` is the predictor's (``None``: the default one);
    ``param_grid`` makes it nested (see :func:`out_of_fold`).
    """
    pred = out_of_fold(frame, budget=budget, sets=sets, scheme=scheme, threshold=threshold,
                       random_state=random_state, n_jobs=n_jobs, classifier=classifier,
                       param_grid=param_grid)
    y = pred["trainable"].to_numpy(dtype=bool)
    proba = pred["proba"].to_numpy(dtype=float)
    if _scheme_kind(scheme) not in _LOGO:
        out = metric_table(y, proba, pred["final_loss"], pred["loss_pred"])
        # The P(trainable) under which only 1% of the trainable held-out runs fell: a pruning
        # threshold that, on data like these, stops at most 1 in 100 configurations that train.
        out["p_at_99_recall"] = float(np.quantile(proba[y], 0.01)) if y.any() else math.nan
        # Folds whose classifier gave all its held-out runs one P learnt nothing: on too few
        # runs the trees cannot split, and the AUROC and the cut-off above describe no model.
        out["constant_folds"] = int((pred.groupby("fold")["proba"].nunique() <= 1).sum())
        out["folds"] = int(pred["fold"].nunique())
        if n_boot:
            table = summarise(pred, baseline=None, n_boot=n_boot, random_state=random_state)
            pooled = table[table["group"] == "all"].iloc[0]
            out["auroc_interval"] = [float(pooled["auroc_low"]), float(pooled["auroc_high"])]
        return out
    groups = {name.split("=", 1)[1]: metric_table(g["trainable"].to_numpy(dtype=bool), g["proba"],
                                                  g["final_loss"], g["loss_pred"])
              for name, g in pred.groupby("group", sort=True)}
    keys = ("auroc", "ap", "brier", "spearman", "mae")
    mean = {k: float(np.nanmean([g[k] for g in groups.values()])) if groups else math.nan
            for k in keys}
    mean["n"] = int(len(completed_runs(frame)))
    mean["trainable_share"] = float(np.mean(outcomes(completed_runs(frame),
                                                     threshold=threshold)["trainable"]))
    mean["groups"] = groups
    return mean


# ------------------------------------------------------------------------------ bootstrap


def bootstrap_counts(strata: Sequence, groups: Sequence, *, n_boot: int,
                     random_state: int = 0) -> np.ndarray:
    """``(n_boot, n)`` times each of ``n`` runs enters each resample: within each stratum, as
    many groups as it holds are drawn with replacement, and a drawn group brings all its runs.

    Example:
        >>> w = bootstrap_counts(["a", "a", "b"], [1, 1, 2], n_boot=4)
        >>> w.shape, bool((w[:, 0] == w[:, 1]).all()), w[:, 2].tolist()
        ((4, 3), True, [1, 1, 1, 1])
    """
    strata, groups = np.asarray(strata).astype(str), np.asarray(groups).astype(str)
    rng = np.random.default_rng(random_state)
    counts = np.zeros((n_boot, len(groups)), dtype=np.int32)
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)
        names, index = np.unique(groups[rows], return_inverse=True)
        m = len(names)
        draws = rng.integers(0, m, size=(n_boot, m)) + m * np.arange(n_boot)[:, None]
        per_group = np.bincount(draws.ravel(), minlength=n_boot * m).reshape(n_boot, m)
        counts[:, rows] = per_group[:, index]
    return counts


def _tie_blocks(values: np.ndarray):
    order = np.argsort(values, kind="mergesort")
    sorted_ = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_[1:] != sorted_[:-1]])
    return order, starts


def weighted_auroc(y_true, score, weights=None) -> np.ndarray | float:
    """AUROC of ``score`` for ``y_true`` with each run counted ``weights`` times (ties count a
    half), for each row of a ``(B, n)`` weight matrix at once; NaN where one class is absent.
    Without weights, :func:`sklearn.metrics.roc_auc_score`."""
    y = np.asarray(y_true, dtype=bool)
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    order, starts = _tie_blocks(np.asarray(score, dtype=float))
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1) if len(y) else np.zeros((len(w), 0))
    neg = np.add.reduceat(ws * ~ys, starts, axis=1) if len(y) else np.zeros((len(w), 0))
    below = np.cumsum(neg, axis=1) - neg
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, (pos * (below + 0.5 * neg)).sum(1) / den, np.nan)
    return float(out[0]) if weights is None or np.ndim(weights) == 1 else out


def _weighted_ranks(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-ranks each run would have in the sample that repeats it ``w`` times."""
    order, starts = _tie_blocks(values)
    block_w = np.add.reduceat(w[:, order], starts, axis=1)
    block_rank = np.cumsum(block_w, axis=1) - block_w + (block_w + 1) / 2
    is_start = np.zeros(len(values), dtype=bool)
    is_start[starts] = True
    block_of = np.empty(len(values), dtype=int)
    block_of[order] = np.cumsum(is_start) - 1
    return block_rank[:, block_of]


def weighted_spearman(a, b, weights=None) -> np.ndarray | float:
    """Spearman correlation of ``a`` and ``b`` with each run counted ``weights`` times, for each
    row of a ``(B, n)`` weight matrix at once; NaN where either side is constant. Without
    weights, :func:`scipy.stats.spearmanr`."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    w = np.ones((1, len(a))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    if len(a) == 0:
        out = np.full(len(w), np.nan)
    else:
        ra, rb = _weighted_ranks(a, w), _weighted_ranks(b, w)
        total = w.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            ma, mb = (w * ra).sum(1, keepdims=True) / total, (w * rb).sum(1, keepdims=True) / total
            da, db = ra - ma, rb - mb
            cov = (w * da * db).sum(1)
            var = (w * da * da).sum(1) * (w * db * db).sum(1)
            # A rank variance at rounding level is a constant side: no correlation to speak of.
            scale = (w * ra * ra).sum(1) * (w * rb * rb).sum(1)
            out = np.where(var > 1e-12 * scale, cov / np.sqrt(np.where(var > 0, var, 1)), np.nan)
    return float(out[0]) if weights is None or np.ndim(weights) == 1 else out


def interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` (NaN resamples left out)."""
    finite = samples[np.isfinite(samples)]
    if len(finite) == 0:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def summarise(predictions: pd.DataFrame, *, baseline: str | None = BASELINE,
              n_boot: int = N_BOOT, confidence: float = 0.95,
              random_state: int = 0) -> pd.DataFrame:
    """Metrics with bootstrap intervals, and paired differences against ``baseline``.

    Args:
        predictions: held-out predictions (:func:`out_of_fold`'s rows, several comparisons
            concatenated), told apart by ``scheme``, ``budget`` and ``features``.
        baseline: the ``features`` value the differences are taken against (at the same scheme
            and budget); ``None`` or absent: no differences.
        n_boot: resamples (0: point estimates only). Within a scheme every comparison uses the
            same resamples, so differences are paired.
        confidence: of the percentile intervals.

    Returns:
        One row per scheme, budget, feature set and group: ``group`` is ``"all"`` (pooled over
        the runs, or for leave-one-task/architecture-out the mean over held-out groups) or one
        group (``task=NAME`` or the held-out ``arch=NAME``). Columns ``auroc``, ``ap``,
        ``brier`` (of P(trainable)), ``spearman``, ``mae`` (of the predicted final loss), ``n``,
        ``trainable_share``; ``auroc_low``/``auroc_high`` and ``spearman_low``/``spearman_high``;
        ``d_auroc``, ``d_spearman`` (minus the baseline's) with their ``_low``/``_high``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence=}.")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot=}.")
    rows = []
    for scheme, by_scheme in predictions.groupby("scheme", sort=False):
        pooled = _scheme_kind(scheme) not in _LOGO
        runs = by_scheme.drop_duplicates("row").sort_values("row")
        position = pd.Series(np.arange(len(runs)), index=runs["row"].to_numpy())
        weights = bootstrap_counts(runs["task"], runs["config"], n_boot=n_boot,
                                   random_state=random_state)
        group_names = sorted(runs["group"].unique())
        samples: dict[tuple, dict] = {}
        for (budget, name), part in by_scheme.groupby(["budget", "features"], sort=False):
            cols = position[part["row"].to_numpy()].to_numpy()
            w = weights[:, cols]
            per_group, boot = {}, {}
            for g in group_names:
                sel = (part["group"] == g).to_numpy()
                if not sel.any():
                    continue
                sub = part[sel]
                per_group[g] = metric_table(sub["trainable"].to_numpy(dtype=bool), sub["proba"],
                                            sub["final_loss"], sub["loss_pred"])
                boot[g] = {
                    "auroc": weighted_auroc(sub["trainable"], sub["proba"], w[:, sel]),
                    "spearman": weighted_spearman(sub["final_loss"], sub["loss_pred"], w[:, sel]),
                }
            if pooled:
                y = part["trainable"].to_numpy(dtype=bool)
                overall = metric_table(y, part["proba"], part["final_loss"], part["loss_pred"])
                boot["all"] = {
                    "auroc": weighted_auroc(y, part["proba"], w),
                    "spearman": weighted_spearman(part["final_loss"], part["loss_pred"], w),
                }
            else:
                with warnings.catch_warnings():  # every group NaN (or a resample's): NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    overall = {k: float(np.nanmean([m[k] for m in per_group.values()]))
                               if per_group else math.nan
                               for k in ("auroc", "ap", "brier", "spearman", "mae")}
                    boot["all"] = {k: np.nanmean(np.stack([boot[g][k] for g in per_group]), 0)
                                   if per_group else np.full(n_boot, np.nan)
                                   for k in ("auroc", "spearman")}
                overall["n"] = int(len(part))
                overall["trainable_share"] = float(part["trainable"].mean())
            for g, metrics in [("all", overall), *per_group.items()]:
                samples[(budget, name, g)] = {"point": metrics, "boot": boot[g]}
        for (budget, name, g), entry in samples.items():
            m = entry["point"]
            row = {"scheme": scheme, "budget": int(budget), "features": name, "group": g,
                   **{k: m[k] for k in ("n", "trainable_share", "auroc", "ap", "brier",
                                        "spearman", "mae")}}
            base = samples.get((budget, baseline, g))
            for k in ("auroc", "spearman"):
                row[f"{k}_low"], row[f"{k}_high"] = interval(entry["boot"][k], confidence) \
                    if n_boot else (math.nan, math.nan)
            for k in ("auroc", "spearman"):
                if base is None:
                    row[f"d_{k}"] = row[f"d_{k}_low"] = row[f"d_{k}_high"] = math.nan
                    continue
                row[f"d_{k}"] = m[k] - base["point"][k]
                diff = entry["boot"][k] - base["boot"][k]
                row[f"d_{k}_low"], row[f"d_{k}_high"] = interval(diff, confidence) \
                    if n_boot else (math.nan, math.nan)
            row["n_boot"], row["confidence"] = int(n_boot), float(confidence)
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ comparisons


def compare(frame: pd.DataFrame, *, budgets: Sequence[int] = (0, 1, 2, 3),
            feature_sets: Sequence[str] = COMPARED, schemes: Sequence[str] = SCHEMES,
            test: pd.DataFrame | None = None, baseline: str | None = BASELINE,
            threshold: float | None = None, n_boot: int = N_BOOT, confidence: float = 0.95,
            param_grid: dict | None = None, random_state: int = 0, n_jobs: int | None = None,
            progress: bool = True, return_predictions: bool = False):
    """Every scheme, budget and feature set with the same model and folds, with bootstrap
    intervals and paired differences against ``baseline`` (:func:`summarise`'s table).

    Args:
        frame: trials frame (the runs cross-validated, or fitted on for ``"test"``).
        feature_sets: names such as ``"hparams+loss"`` (:func:`parse_sets`). The baseline is
            evaluated too when it is not among them, so that every row has its difference.
        schemes: see the module's docstring (``"holdout:arch=lstm"``, ``"test"``...).
        test: the runs of the ``"test"`` scheme.
        param_grid: nested cross-validation: each fold's predictor chooses its classifier by
            this grid search (as ``lepredict fit --search``) on that fold's training runs only.
        return_predictions: also return the held-out predictions behind the table.

    All input is checked before the first fit. Every fold of every comparison is one job, so
    ``n_jobs`` workers stay busy to the end.
    """
    from tqdm.auto import tqdm

    names = list(dict.fromkeys(feature_sets))
    sets = {name: parse_sets(name) for name in names}
    if baseline is not None and baseline not in sets:
        sets[baseline] = parse_sets(baseline)
    budgets = list(dict.fromkeys(int(b) for b in budgets))
    if any(b < 0 for b in budgets) or not budgets:
        raise ValueError(f"budgets must be non-negative epochs, got {budgets}.")
    if n_boot < 0 or not 0 < confidence < 1:
        raise ValueError(f"n_boot must be >= 0 and confidence in (0, 1), got {n_boot=}, "
                         f"{confidence=}.")
    schemes = list(dict.fromkeys(schemes))
    for scheme in schemes:
        _scheme_kind(scheme)
    if test is not None and "test" not in schemes:
        schemes.append("test")
    frame, y, loss, is_test = _prepare(frame, threshold, test)
    train_rows = np.flatnonzero(~is_test)
    splits = {}
    for scheme in schemes:
        if scheme == "test":
            splits[scheme] = _splits(frame, y, scheme, random_state, is_test)
        else:  # the other schemes see the --data runs only
            inner = _splits(frame.iloc[train_rows].reset_index(drop=True), y[train_rows],
                            scheme, random_state)
            splits[scheme] = [(train_rows[tr], train_rows[te]) for tr, te in inner]
    jobs = [(scheme, b, name) for scheme in schemes for b in budgets for name in sets
            if not (set(sets[name]) == {"grad"} and b == 0)]  # no gradient before epoch 1
    folds = [(job, tr, te) for job in jobs for tr, te in splits[job[0]]]
    results = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_fold)(frame, tr, te, b, sets[name], threshold, random_state, None, param_grid)
        for (_, b, name), tr, te in folds
    )
    by_job: dict[tuple, list] = {job: [] for job in jobs}
    for (job, _, _), result in tqdm(zip(folds, results), total=len(folds), desc="evaluate",
                                    disable=not progress):
        by_job[job].append(result)
    configs = config_groups(frame)
    predictions = pd.concat([_predictions(frame, y, loss, scheme, b, name, results, configs)
                             for (scheme, b, name), results in by_job.items()],
                            ignore_index=True)
    table = summarise(predictions, baseline=baseline, n_boot=n_boot, confidence=confidence,
                      random_state=random_state)
    table["nested"] = param_grid is not None
    return (table, predictions) if return_predictions else table


# ------------------------------------------------------------------------------ tables


def _title(scheme: str) -> str:
    if scheme.startswith("holdout:"):
        return (f"held-out part of the search space ({scheme.removeprefix('holdout:')}; "
                "fitted on the rest; pooled)")
    return _TITLES.get(scheme, scheme)


def _cell(value: float, low: float, high: float, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"

    def show(v: float) -> str:
        return fmt.format(round(v, 3) + 0.0)  # no "-0.000"

    text = show(value)
    if np.isfinite(low) and np.isfinite(high):
        text += f" [{show(low)}, {show(high)}]"
    return text


_METRIC_WORDS = {"auroc": "AUROC of P(trainable)", "spearman": "Spearman correlation of the "
                 "predicted final loss"}


def _pivot(rows: pd.DataFrame, metric: str, diff: bool, baseline: str | None, index):
    budgets = sorted(rows["budget"].unique())
    key = f"d_{metric}" if diff else metric
    lines = ["| " + " | ".join(index) + " | " + " | ".join(f"epoch {b}" if b else "init (0)"
                                                        for b in budgets) + " |",
             "|" + "---|" * len(index) + "---:|" * len(budgets)]
    for keys, part in rows.groupby(index, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        if diff and keys[-1] == baseline:
            continue
        by_budget = part.set_index("budget")
        cells = []
        for b in budgets:
            if b not in by_budget.index:
                cells.append("-")
                continue
            r = by_budget.loc[b]
            cells.append(_cell(r[key], r[f"{key}_low"], r[f"{key}_high"], signed=diff))
        lines.append("| " + " | ".join(map(str, keys)) + " | " + " | ".join(cells) + " |")
    return lines


def _order(table: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    names = list(dict.fromkeys(table["features"]))
    if baseline in names:
        names = [baseline] + [n for n in names if n != baseline]
    rank = {n: i for i, n in enumerate(names)}
    return table.assign(_rank=table["features"].map(rank)).sort_values(
        ["_rank", "budget"], kind="stable").drop(columns="_rank")


def _heading(scheme: str, what: str, rows: pd.DataFrame) -> str:
    n_boot = int(rows["n_boot"].iloc[0]) if "n_boot" in rows and len(rows) else 0
    level = float(rows["confidence"].iloc[0]) if "confidence" in rows and len(rows) else 0.95
    nested = " Nested: each fold's classifier chosen by grid search on its training runs." \
        if "nested" in rows and bool(rows["nested"].iloc[0]) else ""
    boot = (f" Intervals: {level:.0%} percentile, {n_boot} bootstrap resamples of configurations "
            "within tasks." if n_boot else "")
    runs = int(rows["n"].iloc[0]) if len(rows) else 0
    return f"{what} on {_title(scheme)}, {runs} runs.{boot}{nested}\n"


def format_summary(table: pd.DataFrame, metric: str = "auroc", baseline: str | None = BASELINE,
                   scheme: str | None = None) -> str:
    """Markdown: for each scheme, ``metric`` of every feature set by early budget (with its
    interval), then each set's paired difference from ``baseline``."""
    out = []
    table = _order(table[table["group"] == "all"], baseline)
    for name, rows in table.groupby("scheme", sort=False):
        if scheme is not None and name != scheme:
            continue
        out.append(_heading(name, _METRIC_WORDS.get(metric, metric), rows))
        out.extend(_pivot(rows, metric, False, baseline, ["features"]))
        if baseline in set(rows["features"]) and rows["features"].nunique() > 1:
            out.append("")
            out.append(f"Difference from {baseline} (same folds, same resamples):\n")
            out.extend(_pivot(rows, metric, True, baseline, ["features"]))
        out.append("")
    return "\n".join(out)


def format_groups(table: pd.DataFrame, metric: str = "auroc", baseline: str | None = BASELINE,
                  scheme: str | None = None) -> str:
    """Markdown: for each scheme, ``metric`` in each group (held-out group or task) by feature
    set and budget, then the paired differences from ``baseline``."""
    out = []
    table = _order(table[table["group"] != "all"], baseline)
    for name, rows in table.groupby("scheme", sort=False):
        if scheme is not None and name != scheme:
            continue
        rows = rows.sort_values("group", kind="stable")
        out.append(f"{_METRIC_WORDS.get(metric, metric)} by group, {_title(name)}:\n")
        out.extend(_pivot(rows, metric, False, baseline, ["group", "features"]))
        if baseline in set(rows["features"]) and rows["features"].nunique() > 1:
            out.append("")
            out.append(f"Difference from {baseline} by group:\n")
            out.extend(_pivot(rows, metric, True, baseline, ["group", "features"]))
        out.append("")
    return "\n".join(out)
