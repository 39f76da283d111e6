"""Pruners in users' own studies: other horizons, batch sizes, raw losses, an unseen task.

A user's study is an Optuna loop of their own: it reports raw validation losses every epoch,
gives the chance loss once, measures spectra at epochs 0-3, and trains for its own horizon at its
own batch size. This benchmark builds such studies and asks how each pruner does in them.

1. **Pool** (``--make-pool``, cached in ``studies/userpool-TASK.parquet``): per task, random
   configurations of the corpus space with batch sizes 16-128 and hidden sizes 16-64, each
   trained once for 40 epochs, recording every epoch's raw validation loss and the spectra of
   epochs 0-3. A run trained for 40 epochs has, at epoch H, exactly the loss a run trained for H
   epochs has (no schedule; the same seed and batch order), so one pool serves every horizon.
   Tasks: ``digits`` read by rows and ``adding`` with 30 steps (tasks the shipped predictor
   knows, at settings it does not), and ``waves``, registered here and never seen by it.
2. **Studies**: for each horizon H in 5, 10, 20, 40 and each task, ``--sets`` random sets of 24
   configurations from the pool, in random order. Each set is run as a user's loop would run it
   (``study.ask()``, ``report_spectrum(..., chance_loss=...)``, ``trial.report(raw_loss, e)``,
   ``trial.should_prune()``, ``study.tell``), with the recorded values standing in for training,
   under each pruner: none, Median, Percentile(25), SuccessiveHalving, Hyperband, Lyapunov.

Printed per horizon: the share of sets in which the no-pruning best configuration was pruned, the
median and 90th-percentile relative regret ((best found - best without pruning) / best without
pruning), the share of the no-pruning epochs spent, and the median relative regret once 20% and
35% of those epochs were spent (equal compute).

    python benchmarks/bench_user_studies.py --make-pool   # trains the pool (about 30 min, 2 cores)
    python benchmarks/bench_user_studies.py [--sets 8]    # replays the studies
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

import lepredict
from bench_pruners import best_at  # benchmarks/ is on the path when run as a script
from lepredict import tasks
from lepredict.sweep import read_trials, record_frame

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HORIZONS = (5, 10, 20, 40)
SET_SIZE = 24
EQUAL_SPEND = (0.2, 0.35)
POOL_TASKS = {"digits": {"mode": "row"}, "adding": {"seq_len": 30, "n_train": 1000},
              "waves": {"n_train": 800}}
POOL_DIR = Path("studies")


def make_waves(*, seq_len: int = 24, n_train: int = 1200, n_val: int = 300,
               seed: int = 0) -> tasks.Task:
    """Which of four frequencies a noisy sine wave has, told at the last step (a task the
    shipped predictor never saw)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    label = rng.integers(0, 4, n)
    freq = np.array([0.05, 0.09, 0.13, 0.17])[label] * 2 * np.pi
    t = np.arange(seq_len)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    x = np.sin(freq[:, None] * t + phase) * rng.uniform(0.5, 1.5, (n, 1))
    x = (x + rng.normal(0, 0.3, x.shape)).astype(np.float32)[..., None]
    y = torch.from_numpy(label)
    return tasks.Task(
        name="waves", x_train=torch.from_numpy(x[:n_train]), y_train=y[:n_train],
        x_val=torch.from_numpy(x[n_train:]), y_val=y[n_train:], input_size=1, output_size=4,
        kind="classification", chance_loss=lepredict.chance_loss(y[:n_train], y[n_train:]),
        threshold=0.5, options={"seq_len": seq_len, "seed": seed}, scored_steps=1)


tasks.register("waves", make_waves, overwrite=True)


def sample_config(rng: np.random.Generator) -> dict:
    """The corpus space, at the batch and hidden sizes users pick."""
    return {
        "arch": str(rng.choice(["rnn", "gru", "lstm"])),
        "hidden": int(rng.choice([16, 32, 64])),
        "init": "uniform",
        "init_scale": float(np.exp(rng.uniform(np.log(0.02), np.log(3.0)))),
        "lr": float(np.exp(rng.uniform(np.log(1e-4), np.log(1.0)))),
        "optimizer": str(rng.choice(["sgd", "adam", "rmsprop"])),
        "batch_size": int(rng.choice([16, 32, 64, 128])),
        "seed": int(rng.integers(0, 2**31)),
    }


def _train_one(name: str, options: dict, config: dict) -> pd.DataFrame:
    torch.set_num_threads(1)
    tasks.register("waves", make_waves, overwrite=True)  # worker processes import nothing
    task = tasks.get(name, **options)
    rec = lepredict.train_run(config, task, epochs=max(HORIZONS), le_epochs=[0, 1, 2, 3])
    return record_frame(rec, task)


def make_pool(n_per_task: int, n_jobs: int) -> None:
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    for name, options in POOL_TASKS.items():
        if (POOL_DIR / f"userpool-{name}.parquet").is_file():
            continue  # delete the file to train it again
        rng = np.random.default_rng(sum(map(ord, name)))  # a stable seed per task
        configs = [sample_config(rng) for _ in range(n_per_task)]
        t0 = time.perf_counter()
        frames = list(tqdm(Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_train_one)(name, options, c) for c in configs), total=len(configs),
            desc=f"pool {name}"))
        pool = pd.concat(frames, ignore_index=True)
        pool["study"] = f"userpool-{name}"
        pool["number"] = range(len(pool))
        path = POOL_DIR / f"userpool-{name}.parquet"
        pool.to_parquet(path, index=False)
        print(f"{path}: {len(pool)} runs in {time.perf_counter() - t0:.0f} s", flush=True)


def _variant(spec: str):
    """``"risk=0.05,protect_top=0.3"`` -> a LyapunovPruner with those keyword arguments."""
    kwargs = {k: (None if v == "None" else float(v)) for k, v in
              (part.split("=") for part in spec.split(",") if part)}
    return lambda: lepredict.LyapunovPruner(model="default", **kwargs)


def pruners(horizon: int, variants=()) -> dict:
    P = optuna.pruners
    return {**{f"lyapunov[{v}]": _variant(v) for v in variants},
        "none": lambda: P.NopPruner(),
        "median": lambda: P.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        "percentile25": lambda: P.PercentilePruner(25.0, n_startup_trials=5, n_warmup_steps=1),
        "succ.halving": lambda: P.SuccessiveHalvingPruner(min_resource=1),
        "hyperband": lambda: P.HyperbandPruner(min_resource=1, max_resource=horizon),
        "lyapunov": lambda: lepredict.LyapunovPruner(model="default"),
    }


def run_study(runs: pd.DataFrame, pruner, horizon: int) -> dict:
    """The user's loop over ``runs`` (in order) for ``horizon`` epochs, under ``pruner``."""
    study = optuna.create_study(study_name="user-study", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(0))
    spent, best, curve, pruned_numbers = 0, math.inf, [], set()
    for i, row in enumerate(runs.itertuples()):
        trial = study.ask()
        losses = list(row.val_loss)
        used, pruned, final = 0, False, math.inf
        for e in range(horizon + 1):
            loss = losses[e] if e < len(losses) else math.inf  # diverged: the loss blew up
            spec = getattr(row, f"le{e}_mean", None) if e <= 3 else None
            if isinstance(spec, (list, np.ndarray)) and len(spec) and math.isfinite(loss):
                lepredict.report_spectrum(
                    trial, {"mean": list(spec), "std": list(getattr(row, f"le{e}_std")),
                            "diverged": getattr(row, f"le{e}_diverged")}, e,
                    chance_loss=row.chance_loss)
            used = e
            trial.report(float(loss), e)
            if not math.isfinite(loss):
                break  # a user's loop stops a run whose loss is NaN
            if trial.should_prune():
                pruned = True
                break
            final = loss
        spent += used
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned_numbers.add(i)
        else:
            final = final if used == horizon else math.inf
            study.tell(trial, final)
            best = min(best, final)
        curve.append((spent, best))
    return {"spent": spent, "best": best, "curve": curve, "pruned": pruned_numbers}


def relative(found: float, reference: float) -> float:
    if not math.isfinite(found):
        return math.inf
    return (found - reference) / reference


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-pool", action="store_true", help="train the pool first")
    ap.add_argument("--pool-size", type=int, default=40, help="configurations per task")
    ap.add_argument("--n-jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sets", type=int, default=8, help="random sets per task and horizon")
    ap.add_argument("--horizons", type=int, nargs="+", default=list(HORIZONS))
    ap.add_argument("--pruners", nargs="+", default=None)
    ap.add_argument("--variants", nargs="+", default=[], metavar="KEY=VALUE,...",
                    help="also LyapunovPruner with these arguments, e.g. risk=0.05,protect_top=0.3")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.make_pool:
        make_pool(args.pool_size, args.n_jobs)
    pools = {name: read_trials(POOL_DIR / f"userpool-{name}.parquet") for name in POOL_TASKS
             if (POOL_DIR / f"userpool-{name}.parquet").is_file()}
    if not pools:
        raise SystemExit("No pool: run with --make-pool first.")
    rng = np.random.default_rng(args.seed)
    rows = []
    t0 = time.perf_counter()
    for horizon in args.horizons:
        table = pruners(horizon, args.variants)
        names = (args.pruners or list(pruners(horizon))) + [n for n in table if "[" in n]
        for task, pool in pools.items():
            for s in range(args.sets):
                runs = pool.iloc[rng.choice(len(pool), SET_SIZE, replace=False)]
                results = {name: run_study(runs, table[name](), horizon)
                           for name in ["none"] + [n for n in names if n != "none"]}
                base = results["none"]
                best_index = int(np.argmin([row.val_loss[horizon] if len(row.val_loss) > horizon
                                            else math.inf for row in runs.itertuples()]))
                for name, res in results.items():
                    row = {"horizon": horizon, "task": task, "set": s, "pruner": name,
                           "best_pruned": best_index in res["pruned"],
                           "regret": relative(res["best"], base["best"]),
                           "epochs": res["spent"] / base["spent"]}
                    for share in EQUAL_SPEND:
                        row[f"regret@{share:.0%}"] = relative(
                            best_at(res["curve"], share * base["spent"]), base["best"])
                    rows.append(row)
            print(f"H={horizon} {task}: {args.sets} sets ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if not rows:
        return
    table = pd.DataFrame(rows)
    table.to_csv("benchmarks/bench_user_studies.csv", index=False)
    print_table(table)


def print_table(table: pd.DataFrame) -> None:
    def pct(v):
        return "inf" if not np.isfinite(v) else f"{100 * v:.1f}%"

    cols = ["horizon", "pruner", "sets", "best pruned", "regret median", "regret p90",
            "epochs spent", "regret@20% median", "regret@35% median"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for (horizon, name), g in table.groupby(["horizon", "pruner"], sort=False):
        print(f"| {horizon} | {name} | {len(g)} | {pct(g.best_pruned.mean())} | "
              f"{pct(g.regret.median())} | {pct(g.regret.quantile(0.9))} | "
              f"{pct(g.epochs.median())} | {pct(g['regret@20%'].median())} | "
              f"{pct(g['regret@35%'].median())} |")


if __name__ == "__main__":
    main()
