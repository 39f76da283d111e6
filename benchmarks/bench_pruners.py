"""Does pruning pay? Replays recorded full-length runs under each pruner.

The held-out sweeps (``studies/heldout-*.parquet``: every epoch's validation loss and spectrum,
never used to fit the shipped predictor) are replayed trial by trial, in the same order for every
pruner: a replayed trial reports the recorded spectrum and normalised validation loss of each
epoch, exactly what it would have reported live, and stops where the pruner says so. Epochs are
counted as they are consumed. Repeated over several trial orders; medians with the spread
(min-max) over orders are printed per task and pruner, and the budget curves (best final loss
found against epochs spent) are written as a plotly HTML page.

    python benchmarks/bench_pruners.py [--orders 5] [--data studies/heldout-*.parquet]
"""

from __future__ import annotations

import argparse
import glob
import math
import time
import warnings

import numpy as np
import optuna
import pandas as pd

import lepredict
from lepredict.features import outcomes
from lepredict.sweep import read_trials

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class KeepTopAfterOneEpoch(optuna.pruners.BasePruner):
    """After epoch 1, keep a trial only if its loss is in the best ``share`` of epoch-1 losses
    seen so far (the simple rule people write by hand)."""

    def __init__(self, share: float = 0.25, n_startup_trials: int = 5):
        self.share, self.n_startup_trials = share, n_startup_trials

    def prune(self, study, trial) -> bool:
        if trial.last_step != 1:
            return False
        seen = [t.intermediate_values[1] for t in study.get_trials(deepcopy=False)
                if 1 in t.intermediate_values and t.number != trial.number]
        if len(seen) < self.n_startup_trials:
            return False
        return trial.intermediate_values[1] > np.quantile(seen, self.share)


#: Shares of the no-pruning epochs at which the best found so far is compared.
EQUAL_SPEND = (0.2, 0.35)


def pruners() -> dict:
    P = optuna.pruners
    return {
        "none": lambda: P.NopPruner(),
        "median": lambda: P.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        "percentile25": lambda: P.PercentilePruner(25.0, n_startup_trials=5, n_warmup_steps=1),
        "succ.halving": lambda: P.SuccessiveHalvingPruner(min_resource=1),
        "hyperband": lambda: P.HyperbandPruner(min_resource=1, max_resource=10),
        "wilcoxon": lambda: P.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2),
        "top25%@1": lambda: KeepTopAfterOneEpoch(0.25),
        "lyapunov": lambda: lepredict.LyapunovPruner(model="default"),
        "lyap.P-only": lambda: lepredict.LyapunovPruner(model="default", risk=None),
        "lyap.online": lambda: lepredict.LyapunovPruner(mode="online", model=None,
                                                        n_startup_trials=10),
        "lyap+median": lambda: lepredict.LyapunovPruner(
            model="default", wrapped_pruner=P.MedianPruner(n_startup_trials=5, n_warmup_steps=1)),
    }


def replay(runs: pd.DataFrame, pruner, epochs: int) -> dict:
    """Replay ``runs`` in order under ``pruner``; return the outcome and the budget curve."""
    # A fixed name: HyperbandPruner assigns brackets by a hash of the study name and trial.
    study = optuna.create_study(study_name="replay", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(0))
    study.set_user_attr("lepredict:setup", {"task": runs["task"].iloc[0],
                                            "task_options": json_options(runs)})
    spent, best, curve = 0, math.inf, []
    wrongly_pruned = let_through = 0
    labels = outcomes(runs)["trainable"].to_numpy()
    for (_, row), trainable in zip(runs.iterrows(), labels):
        trial = study.ask()
        chance = float(row["chance_loss"])
        pruned, used = False, 0
        for e, loss in enumerate(row["val_loss"][:epochs + 1]):
            spec = row.get(f"le{e}_mean")
            if isinstance(spec, list) and spec:
                lepredict.report_spectrum(trial, {"mean": spec, "std": row[f"le{e}_std"],
                                                  "diverged": row[f"le{e}_diverged"]}, e,
                                          chance_loss=1.0)  # the values are normalised
            used = e
            trial.report(float(loss) / chance, e)
            if trial.should_prune():
                pruned = True
                break
        if not pruned and row["status"] == "diverged":
            used = min(int(row["epochs_completed"] or 0) + 1, epochs)  # the epoch that blew up
        spent += used
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            wrongly_pruned += int(trainable)
        else:
            final = float(row["final_normalised_loss"])
            study.tell(trial, final)
            best = min(best, final)
            let_through += int(not trainable)
        curve.append((spent, best))
    return {"spent": spent, "best": best, "wrongly_pruned": wrongly_pruned,
            "let_through": let_through, "curve": curve}


def json_options(runs: pd.DataFrame) -> dict:
    import json

    return json.loads(runs["task_options"].iloc[0])


def best_at(curve, budget) -> float:
    """Best final loss found once ``budget`` epochs had been spent (inf if none yet)."""
    best = math.inf
    for spent, b in curve:
        if spent > budget:
            break
        best = b
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=sorted(glob.glob("studies/heldout-*.parquet")))
    ap.add_argument("--orders", type=int, default=5)
    ap.add_argument("--pruners", nargs="+", default=list(pruners()))
    ap.add_argument("--plot", default="benchmarks/bench_pruners.html")
    args = ap.parse_args(argv)
    if not args.data:
        raise SystemExit("No held-out sweeps found: run studies/make_corpus.sh first.")
    rows, curves = [], {}
    t0 = time.perf_counter()
    for path in args.data:
        frame = read_trials(path)
        frame = frame[frame["state"] == "COMPLETE"].reset_index(drop=True)
        task = frame["study"].iloc[0]
        epochs = int(frame["epochs"].iloc[0])
        for o in range(args.orders):
            order = frame.sample(frac=1.0, random_state=o).reset_index(drop=True)
            for name in args.pruners:
                res = replay(order, pruners()[name](), epochs)
                rows.append({"task": task, "pruner": name, "order": o, **{
                    k: res[k] for k in ("spent", "best", "wrongly_pruned", "let_through")}})
                curves.setdefault((task, name), []).append(res["curve"])
        print(f"{task}: {len(frame)} runs x {args.orders} orders replayed "
              f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
    table = pd.DataFrame(rows)
    base = table[table.pruner == "none"].set_index(["task", "order"])
    table["epochs_share"] = [r.spent / base.loc[(r.task, r.order), "spent"] for r in table.itertuples()]
    table["regret"] = [r.best - base.loc[(r.task, r.order), "best"] for r in table.itertuples()]
    # Regret at equal spending: best found by the time 20% and 35% of the no-pruning epochs
    # were spent.
    for share in EQUAL_SPEND:
        table[f"regret@{share:.0%}"] = [
            best_at(curves[(r.task, r.pruner)][r.order], share * base.loc[(r.task, r.order), "spent"])
            - base.loc[(r.task, r.order), "best"] for r in table.itertuples()]
    print_table(table)
    write_plot(curves, args.plot)
    print(f"budget curves: {args.plot}")


def _fmt(values, pct=False, count=False):
    v = np.asarray(values, dtype=float)
    if pct:
        f = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    elif count:
        f = lambda x: f"{x:g}"  # noqa: E731
    else:
        f = lambda x: "inf" if not np.isfinite(x) else f"{x:.3f}"  # noqa: E731
    return f"{f(np.median(v))} [{f(v.min())}-{f(v.max())}]"


def print_table(table: pd.DataFrame) -> None:
    at = [f"regret@{share:.0%}" for share in EQUAL_SPEND]
    head = (f"| {'task':<18} | {'pruner':<12} | {'epochs spent':<16} | {'regret':<22} | "
            + "".join(f"{c + ' epochs':<22} | " for c in at)
            + f"{'trainable pruned':<16} | {'unstable to end':<15} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for (task, name), g in table.groupby(["task", "pruner"], sort=False):
        print(f"| {task:<18} | {name:<12} | {_fmt(g.epochs_share, True):<16} | "
              f"{_fmt(g.regret):<22} | " + "".join(f"{_fmt(g[c]):<22} | " for c in at)
              + f"{_fmt(g.wrongly_pruned, count=True):<16} | "
              f"{_fmt(g.let_through, count=True):<15} |")


def write_plot(curves, path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = sorted({t for t, _ in curves})
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks)
    palette = ["#000000", "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#9467bd", "#8c564b",
               "#2ca02c", "#17becf", "#98df8a", "#d62728"]
    names = list(dict.fromkeys(n for _, n in curves))
    for c, task in enumerate(tasks, start=1):
        for i, name in enumerate(names):
            curve = curves[(task, name)][0]  # the first order
            fig.add_trace(go.Scatter(x=[s for s, _ in curve],
                                     y=[min(b, 3.0) for _, b in curve], mode="lines",
                                     line={"color": palette[i % len(palette)],
                                           "shape": "hv", "width": 3 if "lyap" in name else 1.5,
                                           "dash": "dot" if "+" in name else "solid"},
                                     name=name, legendgroup=name, showlegend=c == 1), row=1, col=c)
    fig.update_xaxes(title_text="epochs spent")
    fig.update_yaxes(title_text="best final normalised loss", type="log")
    fig.update_layout(title="Budget curves (trial order 0)", height=560,
                      legend={"orientation": "h", "y": -0.2})
    fig.write_html(path, include_plotlyjs=True)


if __name__ == "__main__":
    main()
