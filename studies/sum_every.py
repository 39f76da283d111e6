"""What the default measurement's ``sum_every`` (the GRU's exponent sum from the LUs of every
4th averaged step) costs: in the measured feature, and in the shipped predictor's AUROC.

1. The mean exponent (sum / n) from every step against every 4th step (the largest error over
   the 4 possible offsets), on GRUs of 64, 128 and 256 units at five weight scales, two networks
   each, beside the spread of the every-step value between the probe's 8 trajectories (its
   standard error): a probe of 8 x 48 steps, warm-up 6, as ``measure_and_report`` takes it.
2. Noise of ``sigma`` per exponent added to the sums (``le{e}_sum``) of corpus v2's GRU runs:
   the shipped predictor's AUROC with the noise minus without it, per budget, over 10 noise
   draws x 300 bootstrap resamples of configurations within tasks (95% interval).

    python studies/sum_every.py | tee studies/sum_every.log
"""
from __future__ import annotations

import glob

import numpy as np
import pandas as pd
import torch

import lepredict
from lepredict.evaluation import bootstrap_counts, config_groups, interval, weighted_auroc
from lepredict.features import completed_runs, outcomes
from lepredict.predictor import load_models, resolve_model

EVERY = 4


def per_step_logdets(gru: torch.nn.GRU, probe: torch.Tensor, warmup: int) -> torch.Tensor:
    """``(steps, B)``: each averaged step's log|det J_t| (the every-step sum of a run that
    averages that step alone)."""
    T = probe.shape[1]
    return torch.stack([lepredict.lyapunov_spectrum(gru, probe[:, :t + 1], warmup=t, k=1,
                                                    exponent_sum=True).exponent_sum
                        for t in range(warmup, T)])


def feature_errors() -> None:
    print(f"1. mean exponent from every step vs every {EVERY}th (GRU, probe 8 x 48, warm-up 6)")
    print(f"{'N':>4} {'scale':>5} {'mean exp':>9} {'traj. s.e.':>10} {'max error':>10}")
    torch.manual_seed(0)
    for N in (64, 128, 256):
        for scale in (0.25, 0.5, 1.0, 2.0, 4.0):
            for _ in range(2):
                gru = torch.nn.GRU(8, N, batch_first=True)
                with torch.no_grad():
                    for p in gru.parameters():
                        p.mul_(scale)
                steps = per_step_logdets(gru, torch.rand(8, 48, 8), warmup=6) / N
                full = steps.mean().item()
                se = steps.mean(0).std().item() / 8 ** 0.5
                error = max(abs(steps[o::EVERY].mean().item() - full) for o in range(EVERY))
                print(f"{N:>4} {scale:>5} {full:>+9.4f} {se:>10.5f} {error:>10.5f}")


def predictor_cost(sigmas=(0.002, 0.005), draws: int = 10, n_boot: int = 300) -> None:
    files = sorted(glob.glob("studies/v2-*.parquet"))
    runs = completed_runs(pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))
    runs = runs[runs["param_arch"] == "gru"].reset_index(drop=True)
    models = load_models(resolve_model("default"))
    weights = bootstrap_counts(runs["task"].astype(str), config_groups(runs), n_boot=n_boot,
                               random_state=0)
    print(f"\n2. shipped predictor on corpus v2's {len(runs)} GRU runs, noise on the sums")
    print(f"{'sigma':>6} {'budget':>6} {'AUROC':>6} {'difference [95%]':>28}")
    for sigma in sigmas:
        rng = np.random.default_rng(0)
        for budget, model in sorted(models.items()):
            y = outcomes(runs, threshold=model.threshold)["trainable"]
            clean = model.predict_proba(runs)[:, 1]
            base = weighted_auroc(y, clean, weights)
            diffs = []
            for _ in range(draws):
                noisy = runs.copy()
                for e in range(budget + 1):
                    n = noisy[f"le{e}_n"].astype(float)
                    noisy[f"le{e}_sum"] = noisy[f"le{e}_sum"] + rng.normal(0, sigma, len(n)) * n
                diffs.append(weighted_auroc(y, model.predict_proba(noisy)[:, 1], weights) - base)
            d = np.concatenate(diffs)
            low, high = interval(d)
            print(f"{sigma:>6} {budget:>6} {weighted_auroc(y, clean):>6.3f} "
                  f"{np.nanmean(d):>+9.4f} [{low:+.4f}, {high:+.4f}]")


if __name__ == "__main__":
    feature_errors()
    predictor_cost()
