"""What a probe of 4 validation sequences, instead of 8, costs the shipped predictors.

The runs come from ``studies/probe_size.sh``: the same configurations trained the same way
(checked: every run's validation losses are identical in both arms), their spectra averaged
over 8 or over the first 4 of the same validation sequences. None of the configurations is in
the shipped predictors' corpus: "v1 space" draws new ones from corpus v1's space and tasks
(held-out configurations), "v2 tasks" from corpus v2's space on four tasks corpus v1 lacks
(held-out tasks).

1. How far each spectrum feature moves between the arms, against how far it varies between runs.
2. The shipped predictors (``models/default``) on each arm: AUROC of P(trainable) and Spearman
   of the predicted final loss, averaged over tasks, with the paired difference (probe 4 minus
   probe 8); 95% intervals from bootstrap resamples of configurations within tasks. Beside them
   the strongest baseline, hyperparameters + early loss (fitted on corpus v1 like the shipped
   predictors, default classifier), on the same resamples.
3. At the shipped pruning thresholds: the share of trainable runs each arm would prune (what a
   wrong prune costs) and of untrainable ones (what pruning saves).

    studies/probe_size.sh                  # N=120 trials per task and probe, into studies/probe
    python studies/probe_size.py studies/probe | tee studies/probe_size.log
"""
from __future__ import annotations

import argparse
import glob
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from lepredict.evaluation import bootstrap_counts, interval, weighted_auroc, weighted_spearman
from lepredict.features import build_features, completed_runs, outcomes
from lepredict.predictor import StabilityPredictor, load_models, resolve_model

FAMILIES = {"v1 space": ("lorenz", "charlm", "digits", "adding10"),
            "v2 tasks": ("sines", "narma", "copy", "parity")}
FEATURES = ("lmax", "l02", "top_mean", "mean", "spread")


def load(folder: Path, probe: int, names) -> pd.DataFrame:
    frames = []
    for name in names:
        path = folder / f"probe{probe}-{name}.parquet"
        if path.exists():
            frames.append(pd.read_parquet(path).assign(name=name))
    return pd.concat(frames, ignore_index=True)


def paired(folder: Path, names) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The finished runs of both arms, in the same order, after checking they trained alike."""
    eight, four = load(folder, 8, names), load(folder, 4, names)
    keys = ["name", "number"]
    both = eight[keys].merge(four[keys], on=keys)
    eight = eight.merge(both, on=keys).sort_values(keys, ignore_index=True)
    four = four.merge(both, on=keys).sort_values(keys, ignore_index=True)
    for a, b in zip(eight["val_loss"], four["val_loss"]):
        if not np.array_equal(np.asarray(a, float), np.asarray(b, float), equal_nan=True):
            raise SystemExit("the two arms trained differently: not a paired comparison")
    # Runs before spectra recorded their sequences (the first 60 per task, and lorenz) have no
    # count; every one that has must be its arm's.
    for frame, size in ((eight, 8), (four, 4)):
        counts = frame.filter(regex=r"^le\d+_trajectories$").to_numpy(dtype=float)
        if not np.all(np.isnan(counts) | (counts == size)):
            raise SystemExit(f"a run of the probe-{size} arm averaged over another count")
    done = completed_runs(eight).index.intersection(completed_runs(four).index)
    return eight.loc[done].reset_index(drop=True), four.loc[done].reset_index(drop=True)


def feature_noise(eight: pd.DataFrame, four: pd.DataFrame) -> None:
    print(f"{'feature':>22} {'runs':>5} {'sd between runs':>16} {'sd of 4 - 8':>12} {'ratio':>6}")
    a = build_features(eight, budget=3, sets=("spectrum",))
    b = build_features(four, budget=3, sets=("spectrum",))
    for epoch in range(4):
        for f in FEATURES:
            col = f"spec_e{epoch}_{f}"
            ok = np.isfinite(a[col]) & np.isfinite(b[col]) & (a[col] > -19.9)
            between, noise = a[col][ok].std(), (b[col] - a[col])[ok].std()
            print(f"{col:>22} {int(ok.sum()):>5} {between:>16.4f} {noise:>12.4f} "
                  f"{noise / between:>6.3f}")


def cell(values: np.ndarray, point: float, signed: bool = False) -> str:
    low, high = interval(values)
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(point)} [{fmt.format(low)}, {fmt.format(high)}]"


#: A task enters the AUROC average only with at least this many runs of each class: with fewer,
#: many resamples hold one class only, and the average would cover other tasks in those.
MIN_CLASS = 5


def per_task(metric, y, scores, tasks, weights):
    """Mean over tasks of ``metric``, for each resample (a row of ``weights``) or the point."""
    values = []
    for task in np.unique(tasks):
        rows = tasks == task
        w = None if weights is None else weights[:, rows]
        values.append(metric(y[rows], scores[rows], w))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with one class in a task
        mean = np.nanmean(np.vstack([np.atleast_1d(v) for v in values]), axis=0)
    return float(mean[0]) if weights is None else mean


def compare(family: str, eight: pd.DataFrame, four: pd.DataFrame, baselines, n_boot: int) -> None:
    models = load_models(resolve_model("default"))
    tasks = eight["name"].to_numpy()
    weights = bootstrap_counts(tasks, eight["number"], n_boot=n_boot, random_state=0)
    print(f"\n{family}: {len(eight)} finished runs of {', '.join(FAMILIES[family])}")
    labels = outcomes(eight)
    per = labels.groupby(tasks)["trainable"].agg(["sum", "count"])
    print("  trainable per task: " + ", ".join(f"{t} {int(r['sum'])}/{int(r['count'])}"
                                               for t, r in per.iterrows()))
    rare = [t for t, r in per.iterrows() if min(r["sum"], r["count"] - r["sum"]) < MIN_CLASS]
    if rare:
        print(f"  AUROC averaged without {', '.join(rare)} (fewer than {MIN_CLASS} runs of a "
              "class); Spearman over every task")
    for budget, model in sorted(models.items()):
        labels = outcomes(eight, threshold=model.threshold)
        y, loss = labels["trainable"].to_numpy(), labels["final_loss"].to_numpy()
        auc_rows = ~np.isin(tasks, rare)
        p8, p4 = model.predict_proba(eight)[:, 1], model.predict_proba(four)[:, 1]
        f8, f4 = model.predict_loss(eight), model.predict_loss(four)
        pb = baselines[budget].predict_proba(eight)[:, 1]
        fb = baselines[budget].predict_loss(eight)
        auc = {k: (per_task(weighted_auroc, y[auc_rows], s[auc_rows], tasks[auc_rows], None),
                   per_task(weighted_auroc, y[auc_rows], s[auc_rows], tasks[auc_rows],
                            weights[:, auc_rows]))
               for k, s in (("8", p8), ("4", p4), ("base", pb))}
        rho = {k: (per_task(weighted_spearman, loss, s, tasks, None),
                   per_task(weighted_spearman, loss, s, tasks, weights))
               for k, s in (("8", f8), ("4", f4), ("base", fb))}
        cut = getattr(model, "prune_threshold_", None)
        print(f"budget {budget}: trainable {y.mean():.0%} ({int(y.sum())})")
        for what, table in (("AUROC", auc), ("Spearman", rho)):
            d = table["4"][1] - table["8"][1]
            b8 = table["8"][1] - table["base"][1]
            b4 = table["4"][1] - table["base"][1]
            print(f"  {what:>8}  probe 8 {cell(table['8'][1], table['8'][0])}  "
                  f"probe 4 {cell(table['4'][1], table['4'][0])}  "
                  f"4 - 8 {cell(d, table['4'][0] - table['8'][0], True)}")
            print(f"  {'':>8}  hparams+loss {cell(table['base'][1], table['base'][0])}  "
                  f"probe 8 - it {cell(b8, table['8'][0] - table['base'][0], True)}  "
                  f"probe 4 - it {cell(b4, table['4'][0] - table['base'][0], True)}")
        if cut is not None:
            for k, p in (("8", p8), ("4", p4)):
                print(f"  pruned below {cut:.3f}, probe {k}: {(p[y] < cut).mean():6.1%} of the "
                      f"trainable, {(p[~y] < cut).mean():6.1%} of the untrainable")
            print(f"  same decision in both arms: {((p8 < cut) == (p4 < cut)).mean():.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="OUT of studies/probe_size.sh")
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    corpus = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob("studies/corpus-*.parquet"))],
                       ignore_index=True)
    baselines = {b: StabilityPredictor(budget=b, feature_sets=("hparams", "loss"),
                                       interval=False, random_state=0).fit(corpus)
                 for b in range(4)}
    print(f"1. spectrum features, probe of 4 against 8 (all {sum(map(len, FAMILIES.values()))} "
          "tasks, finished runs, features at -20 (no exponent there) left out)")
    arms = {family: paired(args.folder, names) for family, names in FAMILIES.items()}
    feature_noise(pd.concat([a[0] for a in arms.values()], ignore_index=True),
                  pd.concat([a[1] for a in arms.values()], ignore_index=True))
    print(f"\n2-3. shipped predictors on each arm ({args.resamples} resamples)")
    for family, (eight, four) in arms.items():
        compare(family, eight, four, baselines, args.resamples)


if __name__ == "__main__":
    main()
