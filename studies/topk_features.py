"""Cost in prediction quality of spectrum features built on the leading exponents only.

Out-of-fold P(trainable) for each spectrum feature variant (with the loss features beside it, as
the shipped predictor uses them), under held-out configurations (5 folds grouped by
configuration) and leave-one-task-out; AUROC and its paired difference against the full-spectrum
features with 95% bootstrap intervals over configuration groups (within tasks for the per-task
mean). Truncating a measured full spectrum stands in for measuring only the top k: the leading
exponents of a k-dimensional QR converge to the same values (checked in tests/test_lyapunov.py).

    python studies/topk_features.py [--resamples 1000] [--budgets 0 1 2 3]
"""
from __future__ import annotations

import argparse
import functools
import glob

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

from lepredict import features
from lepredict.evaluation import config_groups
from lepredict.features import completed_runs, outcomes
from lepredict.predictor import StabilityPredictor


def _top_with_mean(row, budget, top, clip_first=True):
    """Top-k features plus the mean of all exponents: of the clipped exponents (as the full
    features have it) or the clipped mean of the raw ones (the sum rule's log|det J|/n)."""
    out = features._spectrum_rows(row, budget, functools.partial(features.top_summary, top=top))
    for e in range(budget + 1):
        mean = features._list(row.get(f"le{e}_mean"))
        if not mean or not np.all(np.isfinite(mean)):
            value = 0.0
        elif clip_first:
            value = float(np.clip(mean, -20, 20).mean())
        else:
            value = float(np.clip(np.mean(mean), -20, 20))
        out[f"spec_e{e}_mean"] = value
    return out


VARIANTS = {
    "full": "spectrum_full",
    "top4": functools.partial(lambda r, b: features._spectrum_rows(
        r, b, functools.partial(features.top_summary, top=4))),
    "top8": "spectrum",
    "top16": functools.partial(lambda r, b: features._spectrum_rows(
        r, b, functools.partial(features.top_summary, top=16))),
    "top8+mean": functools.partial(lambda r, b: _top_with_mean(r, b, 8)),
    "top8+sum": functools.partial(lambda r, b: _top_with_mean(r, b, 8, clip_first=False)),
    "top16+sum": functools.partial(lambda r, b: _top_with_mean(r, b, 16, clip_first=False)),
}


def oof(frame, y, splits, budget, spectrum_set, seed=0):
    proba = np.full(len(frame), np.nan)
    for train, test in splits:
        model = StabilityPredictor(budget=budget, feature_sets=(spectrum_set, "loss"),
                                   interval=False, random_state=seed).fit(frame.iloc[train])
        proba[test] = model.predict_proba(frame.iloc[test])[:, 1]
    return proba


def boot_auc(y, scores: dict, groups, strata, resamples, seed=0):
    """Per variant: AUROC (mean over strata) and its difference from "full", with intervals."""
    rng = np.random.default_rng(seed)
    def auc(idx):
        vals = {}
        for name, s in scores.items():
            per = [roc_auc_score(y[idx][strata[idx] == k], s[idx][strata[idx] == k])
                   for k in np.unique(strata[idx])
                   if 0 < y[idx][strata[idx] == k].mean() < 1]
            vals[name] = np.mean(per)
        return vals
    point = auc(np.arange(len(y)))
    ids = {}
    for k in np.unique(strata):
        g = np.unique(groups[strata == k])
        ids[k] = [np.flatnonzero((groups == gg) & (strata == k)) for gg in g]
    draws = []
    for _ in range(resamples):
        idx = np.concatenate([ids[k][j] for k in ids for j in rng.integers(0, len(ids[k]), len(ids[k]))])
        draws.append(auc(idx))
    rows = []
    for name in scores:
        a = np.array([d[name] for d in draws])
        d = np.array([d[name] - d["full"] for d in draws])
        rows.append({"variant": name, "auroc": point[name],
                     "auroc_lo": np.quantile(a, 0.025), "auroc_hi": np.quantile(a, 0.975),
                     "diff": point[name] - point["full"],
                     "diff_lo": np.quantile(d, 0.025), "diff_hi": np.quantile(d, 0.975)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("-o", default="studies/topk_features.csv")
    args = ap.parse_args()
    for name, builder in VARIANTS.items():
        if callable(builder):
            features._BUILDERS[name] = builder
    frame = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob("studies/corpus-*.parquet"))],
                      ignore_index=True)
    frame = completed_runs(frame).reset_index(drop=True)
    y = outcomes(frame)["trainable"].to_numpy()
    groups = config_groups(frame)
    tasks = frame["task"].astype(str).to_numpy()
    schemes = {
        "configs": list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(frame, y, groups)),
        "task": list(LeaveOneGroupOut().split(frame, y, tasks)),
    }
    rows = []
    for scheme, splits in schemes.items():
        strata = np.zeros(len(y), int) if scheme == "configs" else pd.factorize(tasks)[0]
        for budget in args.budgets:
            scores = {}
            for v in args.variants:
                key = VARIANTS[v] if isinstance(VARIANTS[v], str) else v
                scores[v] = oof(frame, y, splits, budget, key)
            for r in boot_auc(y, scores, groups, strata, args.resamples):
                rows.append({"scheme": scheme, "budget": budget, **r})
                print(f"{scheme:8s} b{budget} {r['variant']:10s} AUROC {r['auroc']:.3f} "
                      f"[{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]  vs full {r['diff']:+.3f} "
                      f"[{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]", flush=True)
    pd.DataFrame(rows).to_csv(args.o, index=False)


if __name__ == "__main__":
    main()
