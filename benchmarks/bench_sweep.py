"""Sweep throughput and the share of a run's time spent computing spectra.

Digits read pixel by pixel (T = 64), N = 64, one layer, 10 epochs, spectra (full, over 16
validation sequences) after epochs 1, 2 and 3; one trial per architecture and seed through the
real ``run_sweep`` path on a SQLite study. Prints trials per minute and, per architecture, the
share of wall time spent on spectra (target: under 15%).

Run: ``python benchmarks/bench_sweep.py`` (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna

from lepredict.sweep import ATTR, SearchSpace, run_sweep
from optuna.distributions import CategoricalDistribution


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials-per-arch", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    archs = ["rnn", "gru", "lstm"]
    space = SearchSpace(
        {"arch": CategoricalDistribution(archs)},
        {"hidden": args.hidden, "init_scale": 0.1, "lr": 3e-3, "batch_size": 64},
    )
    n = args.trials_per_arch * len(archs)
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'bench.db'}"
        study = optuna.create_study(storage=storage, study_name="bench")
        for i in range(n):  # the same number of trials for each architecture, in a fixed order
            study.enqueue_trial({"arch": archs[i % len(archs)]})
        t0 = time.perf_counter()
        study = run_sweep("digits", n_trials=n, epochs=args.epochs, le_epochs=[1, 2, 3],
                          storage=storage, study_name="bench", space=space, device=args.device,
                          show_progress_bar=False)
        elapsed = time.perf_counter() - t0
    print(f"digits (pixel, T=64), N={args.hidden}, {args.epochs} epochs, spectra at epochs 1-3, "
          f"device {args.device}")
    print(f"{'arch':5} {'trials':>6} {'s/trial':>8} {'spectra s/trial':>16} {'spectra share':>14}")
    for arch in archs:
        runs = [t.user_attrs[f"{ATTR}run"] for t in study.trials if t.params["arch"] == arch]
        wall = sum(r["wall_time"] for r in runs) / len(runs)
        le = sum(r["le_time"] for r in runs) / len(runs)
        print(f"{arch:5} {len(runs):>6} {wall:>8.1f} {le:>16.2f} {le / wall:>13.1%}")
    print(f"throughput: {n / elapsed * 60:.1f} trials/minute ({n} trials in {elapsed:.0f} s, "
          "including storage)")


if __name__ == "__main__":
    main()
