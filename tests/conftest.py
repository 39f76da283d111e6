"""Shared fixtures: a synthetic trials frame shaped like a real export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest


def synthetic_runs(n: int = 240, seed: int = 0, budget: int = 3) -> pd.DataFrame:
    """Runs whose outcome depends on the largest exponent (edge of chaos near 0) and on the
    learning rate, over two tasks, three architectures and several sizes; some diverge."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        task = ("alpha", "beta")[i % 2]
        arch = ("rnn", "gru", "lstm")[i % 3]
        hidden = int(rng.choice([8, 16, 32]))
        n_state = 2 * hidden if arch == "lstm" else hidden
        lmax0 = rng.normal(-0.3, 0.4)
        lr = 10 ** rng.uniform(-4, 0)
        diverged = lmax0 > 0.4 and lr > 0.1
        good = abs(lmax0) < 0.25 and 1e-3 < lr < 0.1
        final = rng.uniform(0.1, 0.4) if good else rng.uniform(0.6, 1.2)
        epochs_done = int(rng.integers(0, 2)) if diverged else 10
        val = [1.0] + list(np.linspace(1.0, final, 11)[1:epochs_done + 1])
        row = {
            "study": f"s-{task}", "number": i, "state": "COMPLETE",
            "status": "diverged" if diverged else "ok", "task": task,
            "task_options": "{}", "epochs": 10, "chance_loss": 2.0, "threshold": 0.5,
            "param_arch": arch, "param_hidden": hidden, "param_init_scale": 10 ** rng.uniform(-1.5, 0.5),
            "param_lr": lr, "param_optimizer": ("sgd", "adam", "rmsprop")[i % 3], "param_layers": 1,
            "final_normalised_loss": float("inf") if diverged else final,
            "val_loss": [2.0 * v for v in val], "train_loss": [2.0 * v for v in val[1:]],
            "grad_norm": [float(rng.uniform(0.1, 5))] * (len(val) - 1),
            "weights": json.dumps([{"w_hh_radius": float(np.exp(lmax0)), "w_hh_norm": 3.0,
                                    "w_hh_opnorm": 1.5, "w_ih_norm": 1.0}] * len(val)),
        }
        for e in range(min(budget, len(val) - 1) + 1):
            lam = np.sort(lmax0 + 0.05 * e - np.linspace(0, 2, n_state) + rng.normal(0, 0.02, n_state))[::-1]
            row[f"le{e}_mean"] = lam.tolist()
            row[f"le{e}_std"] = [0.01] * n_state
            row[f"le{e}_diverged"] = 0.0
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def runs() -> pd.DataFrame:
    return synthetic_runs()


@pytest.fixture(scope="session")
def model_dir(runs, tmp_path_factory):
    """Saved predictors for budgets 0 and 1, fitted on :func:`runs`."""
    from lepredict.predictor import StabilityPredictor

    out = tmp_path_factory.mktemp("model")
    for b in (0, 1):
        StabilityPredictor(budget=b).fit(runs).save(out / f"budget-{b}")
    return out


def kill_when_it_prints(script: str, line: str = "hanging") -> None:
    """Run ``script`` in a fresh interpreter and SIGKILL it once it prints ``line``: a worker
    killed at a known point, mid-trial."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
