"""Offline analysis of sweeps: one self-contained HTML report of plotly figures.

:func:`analyze` takes a trials frame (a study read through :func:`lepredict.sweep.trials_frame`,
or an export) and a predictor, and draws: the spectra of trainable and untrainable runs, the
largest exponent and the Kaplan-Yorke dimension against the final loss, hyperparameter maps of
predicted and actual stability, the predictor's calibration, and the pruned trials with what the
full run reached where a reference export of full runs holds the same configuration.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lepredict.features import (GRID, completed_runs, outcomes, spectrum_grid,
                                spectrum_summary)

__all__ = ["analyze", "figures"]

_COLORS = {True: "#2a9d8f", False: "#e76f51"}
_NAMES = {True: "trainable", False: "untrainable"}


def _spectrum_figure(runs: pd.DataFrame, trainable: pd.Series, epoch: int):
    import plotly.graph_objects as go

    fig = go.Figure()
    x = (np.arange(GRID) + 0.5) / GRID
    col = f"le{epoch}_mean"
    for label in (True, False):
        sel = runs[trainable == label]
        grids = np.array([spectrum_grid(v) for v in sel[col] if isinstance(v, list) and v])
        if not len(grids):
            continue
        lo, mid, hi = np.percentile(grids, [25, 50, 75], axis=0)
        color = _COLORS[label]
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[hi, lo[::-1]], fill="toself",
                                 line={"width": 0}, fillcolor=color, opacity=0.25,
                                 name=f"{_NAMES[label]} (25-75%)", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=mid, line={"color": color, "width": 3},
                                 name=f"{_NAMES[label]} median (n={len(grids)})"))
    fig.update_layout(title=f"Lyapunov spectra at epoch {epoch}: trainable vs untrainable runs",
                      xaxis_title="exponent index i / n", yaxis_title="exponent (nats / step)")
    return fig


def _scatter_figure(runs, trainable, final, epoch):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    col = f"le{epoch}_mean"
    has = runs[col].map(lambda v: isinstance(v, list) and len(v) > 0) if col in runs else \
        pd.Series(False, index=runs.index)
    sums = [spectrum_summary(v) for v in runs.loc[has, col]]
    lmax = [s["lmax"] for s in sums]
    ky = [s["ky"] for s in sums]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"largest exponent (epoch {epoch})", f"Kaplan-Yorke dimension / n (epoch {epoch})"))
    for c, xs in enumerate((lmax, ky), start=1):
        for label in (True, False):
            m = (trainable[has] == label).to_numpy()
            fig.add_trace(go.Scatter(
                x=np.asarray(xs)[m], y=final[has].to_numpy()[m], mode="markers",
                marker={"color": _COLORS[label], "size": 6, "opacity": 0.7},
                name=_NAMES[label], showlegend=c == 1,
                text=[f"trial {n}" for n in runs.loc[has, "number"].to_numpy()[m]]), row=1, col=c)
    fig.update_yaxes(title_text="final normalised loss (capped)", row=1, col=1)
    fig.update_layout(title="Spectrum summaries against the final loss")
    return fig


def _hparam_figure(runs, trainable, proba):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("predicted P(trainable)",
                                                        "actual outcome"))
    x, y = runs["param_lr"].astype(float), runs["param_init_scale"].astype(float)
    text = [f"trial {n}, {a}, N={h}" for n, a, h in
            zip(runs["number"], runs.get("param_arch", ""), runs.get("param_hidden", ""))]
    if proba is not None:
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", text=text, name="predicted",
                                 marker={"color": proba, "colorscale": "RdYlGn", "cmin": 0,
                                         "cmax": 1, "size": 7, "colorbar": {"title": "P"}}),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=y, mode="markers", text=text, name="actual",
                             marker={"color": [_COLORS[bool(t)] for t in trainable], "size": 7}),
                  row=1, col=2)
    fig.update_xaxes(type="log", title_text="learning rate")
    fig.update_yaxes(type="log", title_text="init scale")
    fig.update_layout(title="Hyperparameter maps of stability", showlegend=False)
    return fig


def _calibration_figure(trainable, proba, budget):
    import plotly.graph_objects as go
    from sklearn.calibration import calibration_curve

    frac, mean = calibration_curve(trainable, proba, n_bins=10, strategy="quantile")
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], line={"dash": "dash", "color": "grey"},
                   name="perfect calibration"),
        go.Scatter(x=mean, y=frac, mode="lines+markers", name=f"predictor (budget {budget})"),
    ])
    fig.update_layout(title="Calibration of P(trainable)", xaxis_title="predicted P(trainable)",
                      yaxis_title="observed share trainable")
    return fig


def _pruned_figure(frame: pd.DataFrame, reference: pd.DataFrame | None):
    import plotly.graph_objects as go

    fig = go.Figure()
    known = {}
    if reference is not None:
        ref = completed_runs(reference)
        keys = _config_keys(ref)
        known = dict(zip(keys, pd.to_numeric(ref["final_normalised_loss"], errors="coerce")))
    for _, row in frame.iterrows():
        curve = [v / float(row["chance_loss"]) for v in row["val_loss"]] if \
            isinstance(row.get("val_loss"), list) and row.get("chance_loss") else []
        if not curve:
            continue
        pruned = row["state"] == "PRUNED"
        fig.add_trace(go.Scatter(
            x=list(range(len(curve))), y=[min(v, 3.0) for v in curve], mode="lines",
            line={"color": "#e76f51" if pruned else "#8d99ae", "width": 2 if pruned else 1},
            opacity=0.9 if pruned else 0.4, showlegend=False,
            name=f"trial {row['number']}" + (" (pruned)" if pruned else "")))
        if pruned:
            full = known.get(_config_keys(pd.DataFrame([row]))[0])
            if full is not None and math.isfinite(full):
                fig.add_trace(go.Scatter(
                    x=[row.get("epochs") or len(curve)], y=[min(full, 3.0)], mode="markers",
                    marker={"symbol": "x", "size": 10, "color": "#e76f51"}, showlegend=False,
                    name=f"trial {row['number']}: full run reached {full:.3f}"))
    n_pruned = int((frame["state"] == "PRUNED").sum())
    fig.update_layout(title=f"Validation curves; {n_pruned} pruned trials in red "
                      "(x: what the full run reached, where known)",
                      xaxis_title="epoch", yaxis_title="normalised validation loss (capped at 3)")
    return fig


def _config_keys(frame: pd.DataFrame) -> list[str]:
    cols = sorted(c for c in frame.columns if c.startswith("param_") and c != "param_seed")
    return ["|".join(f"{c}={frame[c].iloc[i]}" for c in cols) for i in range(len(frame))]


def figures(frame: pd.DataFrame, *, model=None, budget: int = 1, epoch: int = 1,
            reference: pd.DataFrame | None = None) -> list:
    """The report's plotly figures, in order."""
    runs = completed_runs(frame)
    if runs.empty:
        raise ValueError("The study has no finished trials to analyse yet.")
    out = outcomes(runs)
    trainable, final = out["trainable"], out["final_loss"]
    if f"le{epoch}_mean" not in runs:
        epoch = 0
    proba = None
    if model is not None and len(runs):
        proba = model.predict_proba(runs)[:, 1]
    figs = [_spectrum_figure(runs, trainable, epoch), _scatter_figure(runs, trainable, final, epoch)]
    if {"param_lr", "param_init_scale"} <= set(runs.columns):
        figs.append(_hparam_figure(runs, trainable, proba))
    if proba is not None and trainable.nunique() == 2:
        figs.append(_calibration_figure(trainable.to_numpy(), proba, getattr(model, "budget", budget)))
    figs.append(_pruned_figure(frame, reference))
    return figs


def analyze(frame: pd.DataFrame, output: str | os.PathLike, *, model=None, title: str = "",
            reference: pd.DataFrame | None = None) -> Path:
    """Write the HTML report (plotly.js inlined, so it opens offline) and return its path."""
    figs = figures(frame, model=model, reference=reference)
    runs = completed_runs(frame)
    states = frame["state"].value_counts().to_dict()
    summary = ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items()))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>lepredict report {html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}</style></head><body>",
        f"<h1>lepredict report: {html.escape(title)}</h1>",
        f"<p>{len(frame)} trials: {html.escape(summary)}. "
        f"{int(outcomes(runs)['trainable'].sum()) if len(runs) else 0} finished runs trainable."
        + (f" Predictor: budget {model.budget}, features {', '.join(model.feature_sets)}."
           if model is not None else "") + "</p>",
    ]
    for i, fig in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0),
                                 div_id=f"figure-{i}"))
    parts.append("</body></html>")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(parts), encoding="utf-8")
    return output


def publish(study, figs) -> int:
    """Save figures into the study for optuna-dashboard (``pip install optuna-dashboard``)."""
    try:
        from optuna_dashboard import save_plotly_graph_object
    except ImportError:
        raise ImportError("--publish needs optuna-dashboard: pip install optuna-dashboard "
                          "(or pip install 'lepredict[dashboard]').") from None
    for i, fig in enumerate(figs):
        save_plotly_graph_object(study, fig, graph_object_id=f"lepredict-{i}")
    return len(figs)
