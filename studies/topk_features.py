"""Cost in prediction quality of spectrum features built on the leading exponents only.

Out-of-fold P(trainable) for each spectrum feature variant (with the loss features beside it, as
the shipped predictor uses them), under held-out configurations (5 folds grouped by
configuration) and leave-one-task-out; AUROC and its paired difference against the full-spectrum
features with 95% bootstrap intervals over configuration groups (within tasks for the per-task
mean). Truncating a measured full spectrum stands in for measuring only the top k: the leading
exponents of a k-dimensional QR converge to the same values (checked in tests/test_lyapunov.py).

    python studies/topk_features.py --resamples 300 --jobs 16 | tee studies/topk_features.log
"""
from __future__ import annotations

import argparse
import glob

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

from lepredict.evaluation import config_groups
from lepredict.features import completed_runs, outcomes
from lepredict.predictor import StabilityPredictor


#: The shipped spectrum features (16 leading exponents and the mean of all, from their sum)
#: against the whole spectrum's, each beside the loss features as the shipped predictor has them.
VARIANTS = {"full": "spectrum_full", "top16+sum": "spectrum"}


def fold_proba(frame, train, test, budget, spectrum_set, seed=0):
    model = StabilityPredictor(budget=budget, feature_sets=(spectrum_set, "loss"),
                               interval=False, random_state=seed).fit(frame.iloc[train])
    return test, model.predict_proba(frame.iloc[test])[:, 1]


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--schemes", nargs="+", default=["configs", "task"], choices=["configs", "task"])
    ap.add_argument("--jobs", type=int, default=1, help="fits run in parallel (joblib)")
    ap.add_argument("-o", default="studies/topk_features.csv")
    args = ap.parse_args()
    frame = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob("studies/corpus-*.parquet"))],
                      ignore_index=True)
    frame = completed_runs(frame).reset_index(drop=True)
    y = outcomes(frame)["trainable"].to_numpy()
    groups = config_groups(frame)
    tasks = frame["task"].astype(str).to_numpy()
    all_splits = {
        "configs": list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(frame, y, groups)),
        "task": list(LeaveOneGroupOut().split(frame, y, tasks)),
    }
    jobs = [(scheme, budget, variant, train, test)
            for scheme in args.schemes for budget in args.budgets for variant in VARIANTS
            for train, test in all_splits[scheme]]
    print(f"{len(frame)} completed runs; {len(jobs)} fits on {args.jobs} processes", flush=True)
    fitted = Parallel(n_jobs=args.jobs, verbose=5)(
        delayed(fold_proba)(frame, train, test, budget, VARIANTS[variant])
        for _, budget, variant, train, test in jobs)
    rows = []
    for scheme in args.schemes:
        strata = np.zeros(len(y), int) if scheme == "configs" else pd.factorize(tasks)[0]
        for budget in args.budgets:
            scores = {v: np.full(len(y), np.nan) for v in VARIANTS}
            for (s_, b_, variant, _, _), (test, proba) in zip(jobs, fitted):
                if (s_, b_) == (scheme, budget):
                    scores[variant][test] = proba
            for r in boot_auc(y, scores, groups, strata, args.resamples):
                rows.append({"scheme": scheme, "budget": budget, **r})
                print(f"{scheme:8s} b{budget} {r['variant']:10s} AUROC {r['auroc']:.3f} "
                      f"[{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]  vs full {r['diff']:+.3f} "
                      f"[{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]", flush=True)
    pd.DataFrame(rows).to_csv(args.o, index=False)


if __name__ == "__main__":
    main()
