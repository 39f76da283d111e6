"""Offline analysis of a study: one self-contained HTML report of plotly figures.

:func:`analyze` takes a trials frame (any single-objective Optuna study read through
:func:`lepredict.sweep.trials_frame`, made by ``lepredict sweep`` or by a loop of one's own, or an
export) and optionally a predictor, and shows, one figure per plot:

* every trial's validation curve, pruned ones up to where they were stopped, with what the pruner
  predicted and why it pruned them (and, with a reference export of full runs, what the full run
  of a pruned configuration reached);
* the epochs trained as the study went, against the epochs without pruning;
* the pruning decisions, trial by trial;
* which hyperparameters mattered, all of them (Optuna's fANOVA importances and parallel
  coordinates, over finished trials at their final value and pruned ones at their value when
  stopped);
* the early spectra and the largest exponent of runs that trained and runs that did not;
* the predictor's calibration on the finished trials, with 95% Wilson intervals per bin.

A panel without enough data to say anything (no spectra, no pruned trial, a handful of finished
runs) is not drawn: the report says why in its place.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lepredict.features import GRID, TARGET_CAP, spectrum_grid

__all__ = ["Panel", "analyze", "figures", "panels", "publish"]

_GOOD, _BAD, _PRUNED, _OTHER = "#2a9d8f", "#e76f51", "#6d597a", "#adb5bd"
#: Normalised losses above this are drawn at it: a run far above chance is simply bad.
_CAP = TARGET_CAP
#: Fewer runs than this in a group: its spectra are drawn one by one, not as quantiles.
_QUANTILE_MIN = 5
#: Fewer points than this: a scatter or an importance says nothing, and is not drawn.
_SCATTER_MIN = 5
#: An integer hyperparameter (or stopping step) with at most this many distinct values is drawn
#: on the parallel-coordinate axis as its values alone, as a categorical one.
_FEW_CHOICES = 8
#: Calibration needs this many finished trials with a prediction, of both outcomes.
_CALIBRATION_MIN = 10


@dataclasses.dataclass
class Panel:
    """One section of the report: a figure, or the reason it is not drawn (``figure=None``)."""

    key: str
    heading: str
    text: str
    figure: object | None = None


# -- reading a frame ------------------------------------------------------------------------


def _list(value) -> list:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return json.loads(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


def _num(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _direction(frame: pd.DataFrame) -> str:
    if "direction" in frame:
        found = {d for d in frame["direction"] if isinstance(d, str)}
        if len(found) > 1:
            raise ValueError("The data mixes minimised and maximised studies; analyse them "
                             "one direction at a time.")
        if found:
            return found.pop()
    return "minimize"


@dataclasses.dataclass
class _Study:
    """The frame read once: each trial's curve on the report's scale and its outcome."""

    frame: pd.DataFrame
    direction: str
    normalised: bool  # curves are losses / chance loss; else the values as reported
    curves: dict  # row index -> (steps, values)
    last: pd.Series  # each trial's last value on the curves' scale (finished: its final)
    finished: pd.Index
    pruned: pd.Index
    final: pd.Series  # finished trials' outcome on the curves' scale (capped when normalised)
    trainable: pd.Series  # finished trials
    good: str
    bad: str
    rule: str
    labelled: bool  # by a threshold (given or recorded), not by a median split
    horizon: pd.Series  # the study's horizon per row (epochs), NaN where unknown
    by_epoch: bool  # steps are epochs: a sweep's, or a loop's read by its steps per epoch
    params: list  # the param_* columns the trials varied

    @property
    def value_name(self) -> str:
        if self.normalised:
            return "normalised validation loss"
        return f"reported value ({'maximised' if self.direction == 'maximize' else 'minimised'})"


def _curve(row: pd.Series, normalised: bool) -> tuple[list, list]:
    values = _list(row.get("values"))
    steps = _list(row.get("steps"))
    # The report steps in one epoch the row was read with (NaN: an export older than that).
    recorded = _num(row.get("steps_per_epoch"))
    spe = int(recorded) if math.isfinite(recorded) and recorded > 1 else 1
    if spe > 1:
        # Read by epoch (its pruned_at and the horizon are): the reports at epochs' ends.
        kept = [(int(x) // spe, v) for x, v in zip(steps, values) if int(x) % spe == 0]
        steps, values = [x for x, _ in kept], [v for _, v in kept]
    if normalised:
        val = _list(row.get("val_loss"))
        chance = _num(row.get("chance_loss"))
        ys = [_num(v) / chance for v in val]
        # Losses are by epoch (their index) in exports that say how steps were read; an older
        # export's list, with as many entries as reports, is at the reported steps.
        by_epoch = math.isfinite(recorded)
        xs = steps if len(steps) == len(val) and not by_epoch else list(range(len(val)))
        return xs, ys
    if not steps or len(steps) != len(values):
        # An export of an older version: the validation losses, as they are.
        values = [_num(v) for v in _list(row.get("val_loss"))]
        steps = list(range(len(values)))
    return steps, [_num(v) for v in values]


def _read(frame: pd.DataFrame, threshold: float | None) -> _Study:
    frame = frame.reset_index(drop=True)
    direction = _direction(frame)
    chance = pd.to_numeric(frame.get("chance_loss"), errors="coerce") if "chance_loss" in frame \
        else pd.Series(np.nan, index=frame.index)
    has_loss = frame["val_loss"].map(lambda v: len(_list(v)) > 0) if "val_loss" in frame \
        else pd.Series(False, index=frame.index)
    normalised = bool(direction == "minimize" and has_loss.any()
                      and (chance[has_loss] > 0).all())
    curves = {i: _curve(row, normalised) for i, row in frame.iterrows()}
    state = frame["state"]
    finished = frame.index[state == "COMPLETE"]
    pruned = frame.index[state == "PRUNED"]

    fnl = pd.to_numeric(frame.get("final_normalised_loss"), errors="coerce") \
        if "final_normalised_loss" in frame else pd.Series(np.nan, index=frame.index)
    status = frame.get("status", pd.Series(None, index=frame.index))
    by_loss = len(finished) > 0 and fnl[finished].notna().all()
    if by_loss:
        final = fnl[finished].astype(float)
        lower_better = True
        recorded = pd.to_numeric(frame.get("threshold"), errors="coerce") \
            if "threshold" in frame else pd.Series(np.nan, index=frame.index)
        if threshold is not None:
            if not threshold > 0:
                raise ValueError(f"threshold {threshold:g} is not above 0, and a normalised "
                                 "loss (loss / chance loss) never falls below it, so no trial "
                                 "would count as trained: give the final normalised loss "
                                 "below which a trial trained (0.5, say).")
            limit = pd.Series(float(threshold), index=finished)
            rule_words = f"final normalised loss below {threshold:g}, from --threshold"
        elif len(finished) and recorded[finished].notna().all():
            limit = recorded[finished].astype(float)
            values = sorted(set(limit))
            rule_words = (f"final normalised loss below {', '.join(f'{v:g}' for v in values)}, "
                          "the task's threshold")
        else:
            limit = None
        what = "final normalised loss"
    else:
        final = pd.to_numeric(frame.loc[finished, "value"], errors="coerce").astype(float)
        lower_better = direction == "minimize"
        if threshold is not None:
            limit = pd.Series(float(threshold), index=finished)
            rule_words = (f"final value {'below' if lower_better else 'above'} {threshold:g}, "
                          "from --threshold")
        else:
            limit = None
        what = "final value"
    finite = np.isfinite(final)
    labelled = limit is not None
    if limit is None:
        middle = float(np.median(final[finite])) if finite.any() else math.nan
        limit = pd.Series(middle, index=finished)
        recorded_some = by_loss and int(recorded[finished].notna().sum())
        why = (f"only {recorded_some} of the {len(finished)} finished trials have a recorded "
               "threshold (a loop of one's own records none): pass --threshold, or analyse "
               "them apart" if recorded_some else
               "no threshold was recorded or given with --threshold")
        rule_words = (f"{what} {'below' if lower_better else 'above'} the median of the finished "
                      f"trials, {middle:.4g}: {why}")
    better = final < limit if lower_better else final > limit
    trainable = (finite & better & (status[finished] != "diverged")).astype(bool)
    if labelled:
        good, bad = "trainable", "not trainable"
    else:
        good, bad = "better half", "worse half"

    last = pd.Series(np.nan, index=frame.index)
    for i, (_, ys) in curves.items():
        if ys:
            last[i] = ys[-1]
    if normalised and by_loss:
        last[finished] = final
    elif not normalised:
        value = pd.to_numeric(frame.loc[finished, "value"], errors="coerce")
        last[finished] = value.where(value.notna(), last[finished])
    if normalised:
        last = last.where(~np.isinf(last), _CAP).clip(0.0, _CAP)
        final = final.where(finite, _CAP).clip(0.0, _CAP) if by_loss else final

    epochs = pd.to_numeric(frame.get("epochs"), errors="coerce") if "epochs" in frame \
        else pd.Series(np.nan, index=frame.index)
    horizon = epochs.copy()
    study = frame.get("study", pd.Series("", index=frame.index)).fillna("")
    for name in study.unique():
        rows = study == name
        missing = rows & horizon.isna()
        if missing.any():
            ends = [max(curves[i][0]) for i in frame.index[rows & (state == "COMPLETE")]
                    if curves[i][0]]
            horizon[missing] = max(ends) if ends else np.nan
    # A sweep's steps are epochs; so are those of a loop read by its steps per epoch.
    by_epoch = "task" in frame and frame["task"].map(lambda t: isinstance(t, str)).any() or (
        "steps_per_epoch" in frame and (pd.to_numeric(frame["steps_per_epoch"],
                                                      errors="coerce") > 1).any())
    return _Study(frame, direction, normalised, curves, last, finished, pruned, final,
                  trainable, good, bad, rule_words, labelled, horizon, bool(by_epoch),
                  _params(frame))


def _epochs_word(s: _Study) -> str:
    return "epoch" if s.by_epoch else "step"


def _params(frame: pd.DataFrame) -> list[str]:
    """The hyperparameters the trials varied (the seed is not one)."""
    cols = [c for c in frame.columns if c.startswith("param_") and c != "param_seed"]
    return [c for c in cols if frame[c].dropna().map(repr).nunique() > 1]


def _hover(s: _Study, i) -> str:
    row = s.frame.loc[i]
    params = ", ".join(f"{c[6:]}={_fmt(row[c])}" for c in s.params if not _missing(row[c]))
    return f"trial {row['number']}" + (f" ({row['study']})" if _text(row.get("study")) and
                                       s.frame["study"].nunique() > 1 else "") + \
        (f"<br>{params}" if params else "")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{v:.3g}"
    return str(v)


def _layout(fig, title: str, subtitle: str = "", **kwargs):
    """One figure per plot, legible on its own (optuna-dashboard shows figures without the
    report's text): a short title, the detail in a smaller second line, the legend below."""
    text = title + (f"<br><span style='font-size:12px;color:#555'>{subtitle}</span>"
                    if subtitle else "")
    # In the top margin, whatever Optuna's plots set: a title anchored to the plot overlaps it.
    fig.update_layout(title={"text": text, "x": 0.01, "xanchor": "left", "font": {"size": 17},
                             "xref": "container", "yref": "container", "y": 1,
                             "yanchor": "top", "pad": {"t": 14}},
                      template="plotly_white", height=kwargs.pop("height", 480),
                      margin={"t": 90, "l": 70, "r": 30, "b": 60},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.16, "x": 0,
                              "xanchor": "left"},
                      **kwargs)
    return fig


# -- the panels -----------------------------------------------------------------------------


def _curves_panel(s: _Study, reference: pd.DataFrame | None) -> Panel:
    import plotly.graph_objects as go

    heading = "Validation curves" if s.normalised or s.direction == "minimize" else \
        "Reported values"
    drawn = {i: c for i, c in s.curves.items() if c[0]}
    if not drawn:
        return Panel("curves", heading, "No trial reported a value (trial.report) or a "
                     "validation loss, so there are no curves to draw.")
    known = _reference_finals(reference)
    fig = go.Figure()
    shown = set()
    cap = _CAP if s.normalised else math.inf

    def group(i):
        if i in s.finished:
            return (s.good, _GOOD) if s.trainable[i] else (s.bad, _BAD)
        if i in s.pruned:
            return "pruned", _PRUNED
        return str(s.frame.at[i, "state"]).lower(), _OTHER

    counts = {}
    for i in drawn:
        counts[group(i)[0]] = counts.get(group(i)[0], 0) + 1
    marks = 0
    rank = {s.good: 0, s.bad: 1, "pruned": 2}
    for i, (xs, ys) in sorted(drawn.items(), key=lambda kv: (rank.get(group(kv[0])[0], 3),
                                                             kv[0])):
        name, color = group(i)
        ys = [min(y, cap) if math.isfinite(y) else None for y in ys]
        row = s.frame.loc[i]
        text = _hover(s, i)
        if i in s.pruned:
            text += f"<br>pruned at {_epochs_word(s)} {xs[-1]}: {_reason(row)}"
            p = _num(row.get("predicted_p_trainable"))
            if math.isfinite(p):
                text += f"<br>predicted P(trainable) {p:.3f}"
                loss = _num(row.get("predicted_final_loss"))
                if math.isfinite(loss):
                    text += f", final loss {loss:.3f}"
        elif i in s.finished:
            text += f"<br>final {s.final[i]:.4g} ({name})"
        pruned = i in s.pruned
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers" if pruned else "lines",
            line={"color": color, "width": 2 if pruned else 1.5},
            marker={"symbol": ["circle"] * (len(xs) - 1) + ["x"], "size": [0] * (len(xs) - 1)
                    + [10]} if pruned else None,
            opacity=0.85 if pruned else 0.6, legendgroup=name,
            name=f"{name} ({counts[name]})", showlegend=name not in shown,
            text=text, hovertemplate="%{text}<br>" + _epochs_word(s) + " %{x}: %{y:.4g}"
            "<extra></extra>"))
        shown.add(name)
        if pruned and known:
            full = known.get(_config_key(row))
            end = s.horizon[i]
            if full is not None and math.isfinite(end):
                fig.add_trace(go.Scatter(
                    x=[end], y=[min(full, cap)], mode="markers", legendgroup="full",
                    marker={"symbol": "diamond-open", "size": 10, "color": _PRUNED},
                    name="full run of a pruned configuration (reference)",
                    showlegend="full" not in shown,
                    text=f"trial {row['number']}: the full run reached {full:.3f}",
                    hovertemplate="%{text}<extra></extra>"))
                shown.add("full")
                marks += 1
    parts = [f"{counts.get(s.good, 0)} {s.good}", f"{counts.get(s.bad, 0)} {s.bad}"]
    parts += [f"{n} {k}" for k, n in counts.items() if k not in (s.good, s.bad)]
    subtitle = ", ".join(parts) + (" · x: where a trial was pruned" if s.pruned.size
                                   else "")
    if marks:
        subtitle += f" · diamonds: {marks} full runs of pruned configurations"
    ends = [max(xs) for xs, _ in drawn.values()]
    if max(ends) <= 20:
        fig.update_xaxes(dtick=1)
    _layout(fig, f"{heading} of every trial", subtitle,
            xaxis_title=_epochs_word(s),
            yaxis_title=s.value_name + (f" (capped at {_CAP:g})" if s.normalised else ""))
    text = (f"Every trial's {s.value_name} at each {_epochs_word(s)} it reported. Finished "
            f"trials are coloured by outcome ({s.rule})"
            + ("; pruned trials end with an x where they were stopped: hover for what the "
               "pruner predicted and why it pruned them." if s.pruned.size else "."))
    if reference is not None and not marks:
        text += (" The reference holds no full run of a pruned configuration, so no full "
                 "runs are marked.")
    return Panel("curves", heading, text, fig)


def _reason(row: pd.Series) -> str:
    return _text(row.get("prune_reason")) or "no reason recorded (a pruner other than " \
        "LyapunovPruner)"


def _config_key(row: pd.Series) -> str:
    cols = sorted(c for c in row.index if c.startswith("param_") and c != "param_seed"
                  and not _missing(row[c]))
    return "|".join(f"{c}={row[c]}" for c in cols)


def _reference_finals(reference: pd.DataFrame | None) -> dict:
    if reference is None:
        return {}
    ref = reference[reference["state"] == "COMPLETE"]
    finals = pd.to_numeric(ref["final_normalised_loss"], errors="coerce")
    return {_config_key(row): float(finals[i]) for i, row in ref.iterrows()}


def _epochs_panel(s: _Study) -> Panel:
    import plotly.graph_objects as go

    word = _epochs_word(s)
    heading = f"{word.capitalize()}s saved as the study went"
    order = s.frame.sort_values(["study", "number"] if "study" in s.frame else ["number"]).index
    trained, full, labels = [], [], []
    for i in order:
        xs = s.curves[i][0]
        done = max(xs) if xs else 0
        trained.append(done)
        end = s.horizon[i]
        full.append(end if i in s.pruned and math.isfinite(end) else done)
        labels.append(_hover(s, i) + f"<br>{str(s.frame.at[i, 'state']).lower()}, "
                      f"{done} {word}s")
    if not s.pruned.size:
        return Panel("epochs", heading, f"No trial was pruned, so no {word}s were saved: the "
                     f"{_count(len(s.frame), 'trial')} trained "
                     f"{_count(int(sum(trained)), word)}.")
    if not np.isfinite(s.horizon[s.pruned]).all():
        return Panel("epochs", heading, f"No trial finished, so the study's horizon (the "
                     f"{word}s a full run trains) is unknown and so are the {word}s saved.")
    cum_trained, cum_full = np.cumsum(trained), np.cumsum(full)
    x = list(range(1, len(order) + 1))
    fig = go.Figure([
        go.Scatter(x=x, y=cum_full, name=f"{word}s without pruning", mode="lines",
                   line={"color": _OTHER, "dash": "dash", "width": 2}, text=labels,
                   hovertemplate="%{text}<br>without pruning: %{y}<extra></extra>"),
        go.Scatter(x=x, y=cum_trained, name=f"{word}s trained (gap: saved by pruning)",
                   mode="lines", fill="tonexty", fillcolor="rgba(109,89,122,0.18)",
                   line={"color": _GOOD, "width": 3}, text=labels,
                   hovertemplate="%{text}<br>trained so far: %{y}<extra></extra>"),
    ])
    total, without = int(cum_trained[-1]), int(cum_full[-1])
    saved = 1 - total / without if without else 0.0
    _layout(fig, f"{word.capitalize()}s trained: {total:g} of {without:g} "
            f"({saved:.0%} saved by pruning)",
            f"cumulative over the trials in order; {len(s.pruned)} pruned trials",
            xaxis_title="trials so far", yaxis_title=f"{word}s (cumulative)")
    text = (f"Cumulative {word}s trained as trials were run, against the {word}s they would have "
            f"taken had no trial been pruned (a pruned trial counted at the study's horizon of "
            f"{int(np.nanmax(s.horizon[s.pruned]))} {word}s).")
    if not s.by_epoch:
        text += (" Counted in report steps: epochs when trial.report is called once per "
                 "epoch.")
    return Panel("epochs", heading, text, fig)


def _decisions_panel(s: _Study, reference: pd.DataFrame | None) -> Panel:
    import plotly.graph_objects as go

    heading = "Pruning decisions"
    if not s.pruned.size:
        return Panel("decisions", heading, "No trial was pruned.")
    known = _reference_finals(reference)
    recorded = sum(bool(_text(s.frame.at[i, "prune_reason"])) if "prune_reason" in s.frame
                   else False for i in s.pruned)
    predicted = "predicted_p_trainable" in s.frame and \
        pd.to_numeric(s.frame.loc[s.pruned, "predicted_p_trainable"], errors="coerce").notna().any()
    rows = []
    for i in s.pruned:
        row = s.frame.loc[i]
        xs, ys = s.curves[i]
        cells = [str(row["number"]), str(xs[-1]) if xs else "",
                 f"{ys[-1]:.4g}" if ys and math.isfinite(ys[-1]) else ""]
        if predicted:
            p, loss = _num(row.get("predicted_p_trainable")), _num(row.get("predicted_final_loss"))
            cells += [f"{p:.3f}" if math.isfinite(p) else "",
                      f"{loss:.3f}" if math.isfinite(loss) else ""]
        cells.append(_reason(row))
        if known:
            full = known.get(_config_key(row))
            cells.append(f"{full:.3f}" if full is not None else "")
        rows.append(cells)
    header = ["trial", f"pruned at {_epochs_word(s)}", "value then"] \
        + (["P(trainable)", "predicted final loss"] if predicted else []) + ["reason"] \
        + (["full run reached"] if known else [])
    widths = [40, 55, 60] + ([90, 75] if predicted else []) + [380] + ([70] if known else [])
    fig = go.Figure(go.Table(
        columnwidth=widths,
        header={"values": [f"<b>{h}</b>" for h in header], "fill_color": "#e9ecef",
                "align": "left"},
        cells={"values": list(map(list, zip(*rows))), "align": "left", "height": 26}))
    subtitle = (f"{recorded} decisions recorded by LyapunovPruner, with P(trainable) and the "
                "predicted final normalised loss" if recorded else
                "no reasons recorded: pruned by a pruner other than LyapunovPruner")
    _layout(fig, f"Why {len(s.pruned)} trials were pruned", subtitle,
            height=min(480, 160 + 40 * len(rows)))  # taller ones scroll
    fig.update_layout(margin={"t": 80, "l": 10, "r": 10, "b": 10})
    text = ("Each pruned trial, the step it was stopped at, its reported value then, and what "
            "LyapunovPruner predicted and decided (its record lepredict:prediction:STEP). A "
            "trial pruned by another pruner has no recorded reason.")
    return Panel("decisions", heading, text, fig)


def _param_study(s: _Study, rows: pd.Index, target: pd.Series, extra: dict | None = None, *,
                 few_as_choices: int = 0):
    """An in-memory study holding ``rows`` as complete trials with ``target`` as their value, for
    Optuna's importance and parallel-coordinate plots (which read complete trials only).

    An export keeps values, not distributions: an integer hyperparameter with at most
    ``few_as_choices`` distinct values (a categorical such as ``hidden`` in ``[8, 16]``) is
    given as those choices, so a plot's axis ticks only the values trials took."""
    import optuna
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)

    cols = _params(s.frame.loc[rows])
    dists = {}
    for c in cols:
        values = s.frame.loc[rows, c].dropna()
        name = c[len("param_"):]
        numeric = values.map(lambda v: isinstance(v, (int, float, np.integer, np.floating))
                             and not isinstance(v, bool)).all()
        if not numeric:
            dists[name] = CategoricalDistribution(sorted({_plain(v) for v in values}, key=str))
            continue
        low, high = float(values.min()), float(values.max())
        log = low > 0 and high / low >= 20
        if all(float(v).is_integer() for v in values):
            if 1 < values.nunique() <= few_as_choices:
                dists[name] = CategoricalDistribution(sorted({int(v) for v in values}))
                continue
            dists[name] = IntDistribution(int(low), int(high), log=low > 0 and high / low >= 8)
        else:
            dists[name] = FloatDistribution(low, high, log=log)
    for name, (dist, _) in (extra or {}).items():
        dists[name] = dist
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory"
    try:
        study = optuna.create_study(direction=s.direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    trials = []
    for i in rows:
        params, used = {}, {}
        for c in cols:
            v = s.frame.at[i, c]
            if _missing(v):
                continue
            name = c[len("param_"):]
            v = _plain(v)
            if isinstance(dists[name], IntDistribution) or (
                    isinstance(dists[name], CategoricalDistribution)
                    and isinstance(v, float) and v.is_integer()
                    and int(v) in dists[name].choices):
                v = int(v)
            elif isinstance(dists[name], FloatDistribution):
                v = float(v)
            params[name], used[name] = v, dists[name]
        for name, (dist, values) in (extra or {}).items():
            params[name], used[name] = values[i], dist
        trials.append(optuna.trial.create_trial(params=params, distributions=used,
                                                value=float(target[i]),
                                                user_attrs={"number": int(s.frame.at[i, "number"])}))
    study.add_trials(trials)
    return study, list(dists)


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def _targets(s: _Study) -> tuple[pd.Index, pd.Series]:
    """Trials with a value to rank hyperparameters by: finished ones at their final value,
    pruned ones at their value when stopped (as Optuna's samplers rank pruned trials)."""
    rows = s.finished.union(s.pruned)
    target = s.last[rows]
    ok = np.isfinite(target.astype(float))
    return rows[ok.to_numpy()], target[ok].astype(float)


def _importance_panel(s: _Study) -> Panel:
    import optuna

    heading = "Which hyperparameters mattered"
    rows, target = _targets(s)
    params = _params(s.frame.loc[rows]) if len(rows) else []
    if not params:
        return Panel("importance", heading, "The trials did not vary any hyperparameter (or "
                     "none has a value to rank by), so there is no importance to show.")
    if len(rows) < _SCATTER_MIN:
        return Panel("importance", heading, f"Only {len(rows)} finished or pruned trials have "
                     f"a value; importances need at least {_SCATTER_MIN}.")
    study, _ = _param_study(s, rows, target)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fig = optuna.visualization.plot_param_importances(study, evaluator=evaluator,
                                                              target_name=s.value_name)
        except (ValueError, RuntimeError) as err:  # e.g. no hyperparameter all trials share
            return Panel("importance", heading, f"Optuna could not rank the hyperparameters: "
                         f"{err}")
    if not fig.data or not len(fig.data[0].y or ()):
        return Panel("importance", heading, "No hyperparameter is shared by all the trials "
                     "(conditional hyperparameters), so Optuna ranks none.")
    n_pruned = len(rows.intersection(s.pruned))
    _layout(fig, "Hyperparameter importance",
            f"of the {s.value_name} (fANOVA), over {len(rows)} trials"
            + (f", {n_pruned} of them pruned" if n_pruned else ""), showlegend=False,
            height=max(320, 160 + 40 * len(params)))
    text = (f"How much of the variation of the {s.value_name} each hyperparameter explains "
            "(Optuna's fANOVA importance), over every hyperparameter the trials varied."
            + (" Finished trials count with their final value, pruned trials with their value "
               "when they were stopped, as Optuna's samplers rank them." if n_pruned else ""))
    return Panel("importance", heading, text, fig)


def _parallel_panel(s: _Study) -> Panel:
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    heading = "Hyperparameters of every trial"
    rows, target = _targets(s)
    params = _params(s.frame.loc[rows]) if len(rows) else []
    if not params or len(rows) < _SCATTER_MIN:
        return Panel("parallel", heading, f"{_count(len(rows), 'trial')} with a value over "
                     f"{_count(len(params), 'varied hyperparameter')}: too few to draw (at least "
                     f"{_SCATTER_MIN} trials and one varied hyperparameter).")
    stops = {i: (max(s.curves[i][0]) if s.curves[i][0] else 0) for i in rows}
    extra = {}
    steps = sorted(set(stops.values()))
    if s.pruned.size and len(steps) > 1:
        # Few distinct steps as choices, so the axis ticks the steps trials stopped at (2 3 5),
        # not an even grid between them (2, 2.75, 3.5...).
        extra["(stopped at)"] = (CategoricalDistribution(steps) if len(steps) <= _FEW_CHOICES
                                 else IntDistribution(steps[0], steps[-1]), stops)
    study, _ = _param_study(s, rows, target, extra, few_as_choices=_FEW_CHOICES)
    # Short axis names: optuna-dashboard draws this figure a third as wide as the report.
    fig = optuna.visualization.plot_parallel_coordinate(
        study, target_name="loss" if s.normalised else "value")
    _layout(fig, "Hyperparameters of every trial",
            f"line colour: {s.value_name}" + (" (final, or when pruned)" if s.pruned.size
                                              else "")
            + (f"; second axis: the {_epochs_word(s)} each trial stopped at" if extra else ""),
            height=480)  # optuna-dashboard clips figures taller than this
    fig.update_layout(margin={"t": 100, "l": 70, "r": 70, "b": 40})
    text = ("Each line is a trial, across every hyperparameter the trials varied, coloured by "
            f"its {s.value_name}" + (" (final, or when it was pruned)." if s.pruned.size
                                     else ".")
            + (f" The second axis is the {_epochs_word(s)} each trial stopped at: the "
               "pruned trials sit low on it." if extra else ""))
    return Panel("parallel", heading, text, fig)


def _spectra(s: _Study, epoch: int, rows) -> list[list[float]]:
    col = f"le{epoch}_mean"
    if col not in s.frame:
        return []
    out = []
    for i in rows:
        lam = _list(s.frame.at[i, col])
        if lam and all(math.isfinite(_num(v)) for v in lam):
            out.append([float(v) for v in lam])
    return out


def _spectrum_epochs(frame: pd.DataFrame) -> list[int]:
    return sorted(int(c[2:-5]) for c in frame.columns
                  if c.startswith("le") and c.endswith("_mean") and c[2:-5].isdigit()
                  and frame[c].map(lambda v: len(_list(v)) > 0).any())


def _spectrum_panel(s: _Study, epoch: int) -> Panel:
    import plotly.graph_objects as go

    heading = f"Lyapunov spectra at epoch {epoch}"
    x = (np.arange(GRID) + 0.5) / GRID
    groups = [(s.good, _GOOD, s.finished[s.trainable.to_numpy()]),
              (s.bad, _BAD, s.finished[~s.trainable.to_numpy()]),
              ("pruned", _PRUNED, s.pruned)]
    fig = go.Figure()
    notes = []
    for name, color, rows in groups:
        grids = np.array([spectrum_grid(v) for v in _spectra(s, epoch, rows)])
        if not len(grids):
            continue
        if len(grids) >= _QUANTILE_MIN:
            lo, mid, hi = np.percentile(grids, [25, 50, 75], axis=0)
            fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[hi, lo[::-1]], fill="toself",
                                     line={"width": 0}, fillcolor=color, opacity=0.22,
                                     legendgroup=name, showlegend=False, hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=x, y=mid, mode="lines", line={"color": color, "width": 3},
                                     legendgroup=name,
                                     name=f"{name}: median, 25-75% band (n={len(grids)})"))
        else:
            notes.append(f"{name}: {len(grids)} run(s), each drawn")
            for j, g in enumerate(grids):
                fig.add_trace(go.Scatter(x=x, y=g, mode="lines",
                                         line={"color": color, "width": 1.5},
                                         opacity=0.7, legendgroup=name, showlegend=j == 0,
                                         name=f"{name}: each run (n={len(grids)})"))
    if not fig.data:
        others = len(_spectra(s, epoch, s.frame.index))
        if others:  # running or failed trials: no outcome to group them by
            return Panel("spectra", heading, f"No finished or pruned trial recorded a spectrum "
                         f"at epoch {epoch}; {others} running or failed trial(s) did, but the "
                         "panel compares spectra by outcome, which they have not yet.")
        return Panel("spectra", heading, f"No trial recorded a spectrum at epoch {epoch} "
                     "(lepredict.report_spectrum stores them), so there are none to compare.")
    fig.add_hline(y=0, line={"color": "#999", "width": 1})
    _layout(fig, f"Lyapunov spectra at epoch {epoch}",
            f"by outcome ({s.rule.split(':')[0]})" + (" and pruned trials" if s.pruned.size
                                                      else ""),
            xaxis_title="exponent index i / n (largest first)",
            yaxis_title="exponent (nats / step)")
    text = (f"The spectra measured at epoch {epoch} (0: at initialisation) on a common grid, so "
            "networks of any size compare; groups of at least "
            f"{_QUANTILE_MIN} runs as their median and 25-75% band, smaller ones run by run"
            + (f" ({'; '.join(notes)})" if notes else "") + ".")
    return Panel("spectra", heading, text, fig)


def _lmax_panel(s: _Study, epoch: int) -> Panel:
    import plotly.graph_objects as go

    heading = f"Largest exponent at epoch {epoch} against the outcome"
    col = f"le{epoch}_mean"
    points = {}
    for i in s.finished.union(s.pruned):
        lam = _list(s.frame.at[i, col]) if col in s.frame else []
        if lam and math.isfinite(_num(lam[0])) and math.isfinite(s.last[i]):
            points[i] = float(lam[0])
    n_finished = sum(i in s.finished for i in points)
    if not n_finished:
        return Panel("lmax", heading, f"No finished trial has a spectrum at epoch {epoch} "
                     "(lepredict.report_spectrum stores them).")
    if n_finished < _SCATTER_MIN:
        return Panel("lmax", heading, f"Only {n_finished} finished trials have a spectrum at "
                     f"epoch {epoch} and a final value; a scatter needs at least "
                     f"{_SCATTER_MIN}.")
    fig = go.Figure()
    for name, color, symbol, pick in (
            (s.good, _GOOD, "circle", lambda i: i in s.finished and s.trainable[i]),
            (s.bad, _BAD, "circle", lambda i: i in s.finished and not s.trainable[i]),
            ("pruned (value when stopped)", _PRUNED, "x", lambda i: i in s.pruned)):
        sel = [i for i in points if pick(i)]
        if sel:
            fig.add_trace(go.Scatter(
                x=[points[i] for i in sel], y=[s.last[i] for i in sel], mode="markers",
                marker={"color": color, "size": 9, "symbol": symbol, "opacity": 0.8},
                name=f"{name} ({len(sel)})", text=[_hover(s, i) for i in sel],
                hovertemplate="%{text}<br>largest exponent %{x:.3f}, value %{y:.4g}"
                              "<extra></extra>"))
    fig.add_vline(x=0, line={"color": "#999", "width": 1, "dash": "dot"})
    _layout(fig, f"Largest exponent at epoch {epoch} vs outcome",
            "right of 0: chaotic dynamics; far left: vanishing memory",
            xaxis_title=f"largest exponent at epoch {epoch} (nats / step)",
            yaxis_title=s.value_name + (f" (capped at {_CAP:g})" if s.normalised else ""))
    text = (f"The largest exponent at epoch {epoch} of each trial against its final "
            f"{s.value_name}" + (" (pruned trials: the value when they were stopped)."
                                 if s.pruned.size else "."))
    return Panel("lmax", heading, text, fig)


def _predictions(s: _Study, model) -> pd.Series:
    """P(trainable) of ``model`` for the trials it can read (the spectra and losses of epochs
    0..budget and a chance loss), NaN for the others."""
    out = pd.Series(np.nan, index=s.frame.index)
    if model is None:
        return out
    budget = int(getattr(model, "budget", 0))
    chance = pd.to_numeric(s.frame.get("chance_loss"), errors="coerce") \
        if "chance_loss" in s.frame else pd.Series(np.nan, index=s.frame.index)
    ok = []
    for i in s.finished.union(s.pruned):
        loss = _list(s.frame.at[i, "val_loss"]) if "val_loss" in s.frame else []
        if chance[i] > 0 and len(loss) > budget and all(
                _spectra(s, e, [i]) for e in range(budget + 1)):
            ok.append(i)
    if ok:
        out[ok] = model.predict_proba(s.frame.loc[ok])[:, 1]
    return out


def _wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _calibration_panel(s: _Study, model, proba: pd.Series) -> Panel:
    import plotly.graph_objects as go
    from sklearn.metrics import roc_auc_score

    heading = "Calibration of the predictor"
    if model is None:
        return Panel("calibration", heading, "No predictor given (--model), so there is no "
                     "P(trainable) to check.")
    budget = int(getattr(model, "budget", 0))
    if not s.labelled:
        return Panel("calibration", heading, "P(trainable) is the chance of a final normalised "
                     "loss below a trainability threshold, and none was recorded or given: pass "
                     "--threshold to check the predictor's calibration.")
    rows = [i for i in s.finished if math.isfinite(proba[i])]
    y = s.trainable[rows].to_numpy().astype(int) if rows else np.array([], dtype=int)
    if len(rows) < _CALIBRATION_MIN or len(set(y)) < 2:
        why = (f"only {len(rows)} finished trials have a prediction (the spectra and losses of "
               f"epochs 0..{budget} and a chance loss)" if len(rows) < _CALIBRATION_MIN
               else f"all {len(rows)} finished trials have one outcome")
        return Panel("calibration", heading, f"{why[0].upper()}{why[1:]}; calibration needs at least "
                     f"{_CALIBRATION_MIN} finished trials with a prediction, of both "
                     "outcomes.")
    p = proba[rows].to_numpy()
    n_bins = int(np.clip(len(rows) // 5, 2, 10))
    # Quantile bins; a value many trials share (a confident predictor's 0.01) stays in one bin
    # rather than swallowing its neighbours, as merged duplicate edges would.
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)[1:-1]))
    bins = np.searchsorted(edges, p, side="right")
    mean, share, low, high, count = [], [], [], [], []
    for b in sorted(set(bins)):
        m = bins == b
        k, n = int(y[m].sum()), int(m.sum())
        lo, hi = _wilson(k, n)
        mean.append(float(p[m].mean()))
        share.append(k / n)
        low.append(k / n - lo)
        high.append(hi - k / n)
        count.append(n)
    rng = np.random.default_rng(0)
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "grey"},
                   name="perfect calibration", hoverinfo="skip"),
        go.Scatter(x=p, y=y + rng.uniform(-0.03, 0.03, len(y)), mode="markers",
                   marker={"size": 6, "color": [_GOOD if v else _BAD for v in y],
                           "opacity": 0.5}, name="each finished trial (1: trainable)",
                   text=[_hover(s, i) for i in rows],
                   hovertemplate="%{text}<br>P(trainable) %{x:.3f}<extra></extra>"),
        go.Scatter(x=mean, y=share, mode="lines+markers", name="share trainable per bin, "
                   "95% Wilson interval", line={"color": "#264653", "width": 2},
                   marker={"size": 9},
                   error_y={"type": "data", "symmetric": False, "array": high,
                            "arrayminus": low, "thickness": 1.5, "width": 6},
                   text=[f"{n} trials" for n in count],
                   hovertemplate="%{text}: mean P %{x:.3f}, share %{y:.2f}<extra></extra>"),
    ])
    auroc = roc_auc_score(y, p)
    brier = float(np.mean((p - y) ** 2))
    _layout(fig, f"Calibration of P(trainable) at budget {budget}",
            f"{len(rows)} finished trials in {len(mean)} quantile bins; AUROC {auroc:.3f}, "
            f"Brier {brier:.3f}", xaxis_title="predicted P(trainable)",
            yaxis_title="observed share trainable")
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(range=[-0.08, 1.08])
    text = (f"The predictor's P(trainable) from epochs 0..{budget} against what the finished "
            f"trials did ({s.rule}), in bins of about equal size, each with the 95% Wilson "
            "interval of its share; the dots are the trials themselves.")
    return Panel("calibration", heading, text, fig)


# -- the report -----------------------------------------------------------------------------


def panels(frame: pd.DataFrame, *, model=None, budget: int | None = None,
           reference: pd.DataFrame | None = None, threshold: float | None = None) -> list[Panel]:
    """The report's sections in order, each a figure or the reason it is not drawn.

    Args:
        frame: a trials frame (:func:`lepredict.sweep.trials_frame`, or an export read back).
        model: a :class:`~lepredict.predictor.StabilityPredictor` whose P(trainable) is checked
            against the outcomes, or ``None``.
        budget: the epoch whose spectra are shown (default: the model's budget, else 1), or the
            latest epoch with spectra before it.
        reference: an export of full runs: what pruned configurations would have reached.
        threshold: a finished trial is trainable when its final normalised loss is below this
            (or, for a study without losses, its value beats this in the study's direction);
            default: the task's recorded threshold, else the median of the finished trials.

    Raises:
        ValueError: no trial reported a value or finished with one.
    """
    if threshold is not None and not (math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold=}.")
    s = _read(frame, threshold)
    has_value = s.frame["value"].map(lambda v: math.isfinite(_num(v)) or _num(v) == math.inf) \
        if "value" in s.frame else pd.Series(False, index=s.frame.index)
    if not any(c[0] for c in s.curves.values()) and not has_value.any():
        raise ValueError("No trial reported a value (trial.report) or finished with one, so "
                         "there is nothing to analyse.")
    if budget is None:
        budget = int(getattr(model, "budget", 1)) if model is not None else 1
    epochs = [e for e in _spectrum_epochs(s.frame) if e <= budget] or _spectrum_epochs(s.frame)
    epoch = max(epochs) if epochs and max(epochs) <= budget else (min(epochs) if epochs else
                                                                   budget)
    proba = _predictions(s, model)
    out = [_curves_panel(s, reference), _epochs_panel(s), _decisions_panel(s, reference),
           _importance_panel(s), _parallel_panel(s), _spectrum_panel(s, epoch),
           _lmax_panel(s, epoch), _calibration_panel(s, model, proba)]
    return out


def figures(frame: pd.DataFrame, **kwargs) -> dict:
    """The report's plotly figures by key (``"curves"``, ``"epochs"``...), in order; panels
    without enough data to draw are left out. Keyword arguments: as :func:`panels`."""
    return {p.key: p.figure for p in panels(frame, **kwargs) if p.figure is not None}


def _count(n: int, noun: str) -> str:
    """``3, "trial"`` -> ``"3 trials"``; ``1, "trial"`` -> ``"1 trial"``."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _summary(s: _Study, model) -> str:
    states = s.frame["state"].value_counts().to_dict()
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items(), key=lambda kv:
                                                              -kv[1]))
    text = f"{len(s.frame)} trials: {counts}. "
    if len(s.finished):
        k = int(s.trainable.sum())
        # "3 are trainable", but "3 are in the better half"
        where = s.good if s.good == "trainable" else f"in the {s.good}"
        text += (f"Of the {len(s.finished)} finished, {k} {'is' if k == 1 else 'are'} "
                 f"{where} ({s.rule}). ")
    text += f"Curves show the {s.value_name}"
    text += "." if s.normalised else (
        " (no chance loss was recorded to normalise losses by: report_spectrum(..., "
        "chance_loss=...) records it)." if s.direction == "minimize" else ".")
    if model is not None:
        text += (f" Predictor: budget {model.budget}, features "
                 f"{', '.join(model.feature_sets)}.")
    return text


def analyze(frame: pd.DataFrame, output: str | os.PathLike, *, model=None, title: str = "",
            reference: pd.DataFrame | None = None, threshold: float | None = None,
            budget: int | None = None, sections: list[Panel] | None = None) -> Path:
    """Write the HTML report (plotly.js inlined, so it opens offline) and return its path.

    Arguments as :func:`panels`; ``title`` names the study in the report; ``sections``: the
    panels if already made (by :func:`panels` with the same arguments).

    Example:
        >>> import lepredict, optuna, tempfile
        >>> def objective(trial):
        ...     x = trial.suggest_float("x", -3, 3)
        ...     for step in range(4):
        ...         trial.report((x - 1) ** 2 + 1 / (step + 1), step)
        ...     return (x - 1) ** 2
        >>> study = optuna.create_study()
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study.optimize(objective, n_trials=6)
        >>> frame = lepredict.sweep.trials_frame(study)
        >>> path = lepredict.report.analyze(frame, tempfile.mkdtemp() + "/r.html")
        >>> path.name
        'r.html'
    """
    if sections is None:
        sections = panels(frame, model=model, reference=reference, threshold=threshold,
                          budget=budget)
    s = _read(frame, threshold)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>lepredict report {html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em auto;max-width:1150px;color:#222;"
        "padding:0 1em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
        "p{line-height:1.45}.skipped{color:#555;background:#f6f6f6;padding:.6em 1em;"
        "border-left:4px solid #bbb}nav a{margin-right:1em}</style></head><body>",
        f"<h1>lepredict report: {html.escape(title)}</h1>",
        f"<p id='summary'>{html.escape(_summary(s, model))}</p>",
        "<nav>" + "".join(f"<a href='#{p.key}'>{html.escape(p.heading)}</a>" for p in sections)
        + "</nav>",
    ]
    first = True
    for p in sections:
        parts.append(f"<section id='{p.key}'><h2>{html.escape(p.heading)}</h2>")
        if p.figure is None:
            parts.append(f"<p class='skipped'>Not drawn: {html.escape(p.text)}</p>")
        else:
            parts.append(f"<p>{html.escape(p.text)}</p>")
            parts.append(p.figure.to_html(full_html=False, include_plotlyjs=first,
                                          div_id=f"figure-{p.key}",
                                          config={"displaylogo": False}))
            first = False
        parts.append("</section>")
    parts.append("</body></html>")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(parts), encoding="utf-8")
    return output


#: The first line of the study note :func:`publish` writes; a note that does not start with it
#: is the user's own and is left alone.
NOTE_MARK = "<!-- lepredict report -->"


def publish(study, figs, *, notes: list[Panel] | None = None) -> int:
    """Save figures into the study for optuna-dashboard (``pip install optuna-dashboard``), one
    graph per figure, under ``lepredict-KEY``; and, unless the study has a note of its own, a
    note saying which panels were not drawn and why. Returns the number of figures."""
    try:
        from optuna_dashboard import get_note, save_note, save_plotly_graph_object
    except ImportError:
        raise ImportError("--publish needs optuna-dashboard: pip install optuna-dashboard "
                          "(or pip install 'lepredict[dashboard]').") from None
    import plotly.graph_objects as go

    items = figs.items() if isinstance(figs, dict) else enumerate(figs)
    saved = set()
    for key, fig in items:
        save_plotly_graph_object(study, fig, graph_object_id=f"lepredict-{key}")
        saved.add(f"lepredict-{key}")
    # A figure an earlier publish saved that this one did not draw would still be shown beside
    # a note that says it was not drawn: it is replaced by an empty one that says why.
    # (optuna-dashboard keeps each graph in the study's system attributes under this prefix.)
    prefix = "dashboard:plot_data:"
    attrs = study._storage.get_study_system_attrs(study._study_id)
    earlier = {k[len(prefix):].rsplit(":", 1)[0] for k in attrs if k.startswith(prefix)}
    why = {f"lepredict-{p.key}": f"{p.heading}: not drawn: {p.text}" for p in notes or []}
    for graph in sorted(g for g in earlier if g.startswith("lepredict-") and g not in saved):
        blank = go.Figure()
        blank.update_layout(title=why.get(graph, f"{graph}: not drawn by the latest publish"),
                            xaxis_visible=False, yaxis_visible=False)
        save_plotly_graph_object(study, blank, graph_object_id=graph)
    if notes:
        current = get_note(study) or ""
        if not current.strip() or current.startswith(NOTE_MARK):
            lines = [NOTE_MARK, "## lepredict report", ""]
            lines += [f"- **{p.heading}**: not drawn: {p.text}" for p in notes]
            save_note(study, "\n".join(lines))
    return len(saved)
