"""Honest evaluation of the stability predictor against its baselines.

Every figure comes from runs held out of the fit that predicts them, under three splits:

* ``"configs"``: 5 folds of configurations (grouped by the hyperparameters, so a configuration
  seen in training never scores), stratified by label; metrics pooled over the folds.
* ``"task"``: leave one task out; metrics on each held-out task, then their mean.
* ``"arch"``: leave one architecture out; likewise.

Each split is run for each early budget and each feature set (spectra, each baseline, spectra +
early loss), with the same model and folds, so the comparison is like for like.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

from lepredict.features import completed_runs, outcomes
from lepredict.predictor import MIN_PER_CLASS, StabilityPredictor, metric_table

__all__ = ["COMPARED", "SCHEMES", "compare", "config_groups", "cross_validate", "format_summary",
           "format_table"]

SCHEMES = ("configs", "task", "arch")
#: Feature sets compared, by the name the tables show.
COMPARED = {
    "spectrum": ("spectrum",),
    "spectrum+loss": ("spectrum", "loss"),
    "loss": ("loss",),
    "weights": ("weights",),
    "grad": ("grad",),
    "hparams": ("hparams",),
    "all": ("spectrum", "loss", "hparams"),
}


def config_groups(frame: pd.DataFrame) -> np.ndarray:
    """One group per configuration: the task and hyperparameters, seed excluded."""
    cols = sorted(c for c in frame.columns if c.startswith("param_") and c != "param_seed")
    keys = frame[["task", "task_options", *cols]].apply(lambda r: "|".join(map(str, r)), axis=1)
    return keys.map(lambda k: hashlib.sha1(k.encode()).hexdigest()[:12]).to_numpy()


def _splits(frame: pd.DataFrame, y: np.ndarray, scheme: str, seed: int):
    if scheme == "configs":
        cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
        return list(cv.split(frame, y, config_groups(frame)))
    column = {"task": "task", "arch": "param_arch"}[scheme]
    groups = frame[column].astype(str).to_numpy()
    if len(np.unique(groups)) < 2:
        raise ValueError(f"Leave-one-{scheme}-out needs runs of at least 2 {column} values; the "
                         f"data hold only {np.unique(groups).tolist()}.")
    return list(LeaveOneGroupOut().split(frame, y, groups))


def _fold(frame, train, test, budget, sets, threshold, seed, classifier=None):
    model = StabilityPredictor(budget=budget, feature_sets=sets, threshold=threshold,
                               classifier=classifier, interval=False, random_state=seed)
    part = frame.iloc[train]
    y = outcomes(part, threshold=threshold)["trainable"]
    if min(y.sum(), (~y).sum()) < MIN_PER_CLASS:  # nothing to learn the other class from
        return test, None, None
    model.fit(part)
    held = frame.iloc[test]
    return test, model.predict_proba(held)[:, 1], model.predict_loss(held)


def _prepare(frame: pd.DataFrame, threshold: float | None):
    """Finished runs, their trainable labels and final losses."""
    frame = completed_runs(frame).reset_index(drop=True)
    out = outcomes(frame, threshold=threshold)
    return frame, out["trainable"].to_numpy(), out["final_loss"].to_numpy()


def _aggregate(frame: pd.DataFrame, y: np.ndarray, loss: np.ndarray, scheme: str,
               results) -> dict:
    """Pooled metrics (``"configs"``) or the mean over held-out groups, from the folds' results."""
    if scheme == "configs":
        proba, pred = np.full(len(frame), np.nan), np.full(len(frame), np.nan)
        for test, p, l in results:
            if p is None:
                raise ValueError("A training fold holds too few runs of one class; add runs.")
            proba[test], pred[test] = p, l
        out = metric_table(y, proba, loss, pred)
        # The P(trainable) under which only 1% of the trainable held-out runs fell: a pruning
        # threshold that, on data like these, stops at most 1 in 100 configurations that train.
        out["p_at_99_recall"] = float(np.quantile(proba[y], 0.01)) if y.any() else math.nan
        return out
    column = {"task": "task", "arch": "param_arch"}[scheme]
    groups = {}
    for test, p, l in results:
        name = str(frame[column].iloc[test[0]])
        if p is None:  # the training folds held a single class
            continue
        groups[name] = metric_table(y[test], p, loss[test], l)
    keys = ("auroc", "ap", "brier", "spearman", "mae")
    mean = {k: float(np.nanmean([g[k] for g in groups.values()])) if groups else math.nan
            for k in keys}
    mean["n"] = int(len(frame))
    mean["trainable_share"] = float(y.mean())
    mean["groups"] = groups
    return mean


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme=}.")


def cross_validate(frame: pd.DataFrame, *, budget: int, sets: Sequence[str], scheme: str = "configs",
                   threshold: float | None = None, random_state: int = 0,
                   n_jobs: int | None = None, classifier=None) -> dict:
    """Metrics of a :class:`StabilityPredictor` on held-out runs under ``scheme``.

    Returns :func:`lepredict.predictor.metric_table`'s keys; for ``"task"`` and ``"arch"`` the
    mean over held-out groups, with each group's metrics under ``"groups"``. ``classifier`` is
    the predictor's (``None``: the default one).
    """
    _check_scheme(scheme)
    frame, y, loss = _prepare(frame, threshold)
    results = Parallel(n_jobs=n_jobs)(
        delayed(_fold)(frame, tr, te, budget, tuple(sets), threshold, random_state, classifier)
        for tr, te in _splits(frame, y, scheme, random_state)
    )
    return _aggregate(frame, y, loss, scheme, results)


def compare(frame: pd.DataFrame, *, budgets: Sequence[int] = (0, 1, 2, 3),
            feature_sets: Sequence[str] = tuple(COMPARED), schemes: Sequence[str] = SCHEMES,
            threshold: float | None = None, random_state: int = 0, n_jobs: int | None = None,
            progress: bool = True) -> pd.DataFrame:
    """:func:`cross_validate` for every scheme, budget and feature set: one row each.

    Every fold of every comparison is one job, so ``n_jobs`` workers stay busy to the end.
    """
    from tqdm.auto import tqdm

    unknown = [s for s in feature_sets if s not in COMPARED]
    if unknown:
        raise ValueError(f"Unknown feature sets {unknown}; choose from {list(COMPARED)}.")
    for scheme in schemes:
        _check_scheme(scheme)
    frame, y, loss = _prepare(frame, threshold)
    splits = {scheme: _splits(frame, y, scheme, random_state) for scheme in schemes}
    jobs = [(scheme, b, name) for scheme in schemes for b in budgets for name in feature_sets
            if not (name == "grad" and b == 0)]  # no gradient before the first epoch
    folds = [(job, tr, te) for job in jobs for tr, te in splits[job[0]]]
    results = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_fold)(frame, tr, te, b, COMPARED[name], threshold, random_state)
        for (_, b, name), tr, te in folds
    )
    by_job: dict[tuple, list] = {job: [] for job in jobs}
    for (job, _, _), result in tqdm(zip(folds, results), total=len(folds), desc="evaluate",
                                    disable=not progress):
        by_job[job].append(result)
    rows = []
    for (scheme, b, name), results in by_job.items():
        m = _aggregate(frame, y, loss, scheme, results)
        groups = m.pop("groups", None)
        rows.append({"scheme": scheme, "budget": b, "features": name, **m,
                     "groups": json.dumps(groups) if groups else ""})
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, scheme: str | None = None) -> str:
    """A Markdown table of :func:`compare`'s rows (one scheme, or all)."""
    rows = table if scheme is None else table[table["scheme"] == scheme]
    head = "| split | budget | features | AUROC | AP | Brier | Spearman | MAE |"
    lines = [head, "|" + "---|" * 8]
    for r in rows.itertuples():
        lines.append(f"| {r.scheme} | {r.budget} | {r.features} | {r.auroc:.3f} | {r.ap:.3f} | "
                     f"{r.brier:.3f} | {r.spearman:.3f} | {r.mae:.3f} |")
    return "\n".join(lines)


def format_summary(table: pd.DataFrame, metric: str = "auroc") -> str:
    """Markdown tables of one metric of :func:`compare`'s rows: one table per split, a row per
    feature set and a column per early budget."""
    names = {"configs": "held-out configurations", "task": "held-out task (mean over tasks)",
             "arch": "held-out architecture (mean over architectures)"}
    out = []
    for scheme, rows in table.groupby("scheme", sort=False):
        pivot = rows.pivot(index="features", columns="budget", values=metric)
        pivot = pivot.reindex([f for f in COMPARED if f in pivot.index])
        budgets = list(pivot.columns)
        out.append(f"{metric} on {names.get(scheme, scheme)}, by early budget (epochs):\n")
        out.append("| features | " + " | ".join(str(b) for b in budgets) + " |")
        out.append("|---|" + "---:|" * len(budgets))
        for name, values in pivot.iterrows():
            cells = ["-" if math.isnan(v) else f"{v:.3f}" for v in values]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
