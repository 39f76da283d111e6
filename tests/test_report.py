"""The analysis report and the export, on the studies people make.

Three kinds of study: a ``lepredict sweep`` like the README's demo; a user's own Optuna loop (a
GRU on a generated task, raw MSE, ``measure_and_report(..., chance_loss=...)``, LyapunovPruner);
a user's loop maximising an accuracy with the loss given as ``val_loss=`` and MedianPruner; and a
plain Optuna study with nothing of lepredict in it. Each must export its trials (pruned ones with
their curves, status, step and reason) and give a report whose every panel is drawn from enough
data or says why not; the reports render in a real browser without errors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import warnings
from statistics import NormalDist

import numpy as np
import optuna
import pytest
import torch

import lepredict
from lepredict import report
from lepredict.cli import main
from lepredict.predictor import StabilityPredictor
from lepredict.sweep import read_trials, trials_frame

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EPOCHS = 4


# -- the studies ----------------------------------------------------------------------------


def _data(kind: str, n: int = 160, steps: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, steps, 1, generator=g)
    if kind == "regression":
        y = x[:, -3:, 0].sum(1, keepdim=True)  # the sum of the last three inputs
    else:
        y = (x[:, :, 0].sum(1) > 0).long() + (x[:, -1, 0] > 1).long()  # three classes
    return x[:120], y[:120], x[120:], y[120:]


class _Net(torch.nn.Module):
    def __init__(self, hidden: int, outputs: int, scale: float):
        super().__init__()
        self.rnn = torch.nn.GRU(1, hidden, batch_first=True)
        with torch.no_grad():
            for p in self.rnn.parameters():
                p.uniform_(-scale, scale)
        self.head = torch.nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def user_study(storage: str, kind: str, pruner, n_trials: int) -> tuple[optuna.Study, float]:
    """A user's own loop as the README shows it: raw losses, the chance loss given once with
    the spectra of epochs 0-3, and (maximising an accuracy) the loss beside it."""
    x_train, y_train, x_val, y_val = _data(kind)
    chance = lepredict.chance_loss(y_train, y_val)
    loss_fn = torch.nn.MSELoss() if kind == "regression" else torch.nn.CrossEntropyLoss()

    def objective(trial):
        torch.manual_seed(trial.number)
        net = _Net(trial.suggest_categorical("hidden", [4, 8]),
                   1 if kind == "regression" else 3,
                   trial.suggest_float("init_scale", 0.05, 5.0, log=True))
        opt = torch.optim.Adam(net.parameters(), lr=trial.suggest_float("lr", 1e-4, 0.5, log=True))
        for epoch in range(EPOCHS + 1):
            if epoch:
                for i in range(0, len(x_train), 32):
                    opt.zero_grad()
                    loss_fn(net(x_train[i:i + 32]), y_train[i:i + 32]).backward()
                    opt.step()
            with torch.no_grad():
                out = net(x_val)
                loss = float(loss_fn(out, y_val))
            if epoch <= 3:
                lepredict.measure_and_report(trial, net.rnn, x_val[:8], epoch, chance_loss=chance,
                                             val_loss=None if kind == "regression" else loss)
            value = loss if kind == "regression" else float((out.argmax(1) == y_val).float().mean())
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    study = optuna.create_study(storage=storage, study_name=kind, pruner=pruner,
                                direction="minimize" if kind == "regression" else "maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=n_trials)
    return study, chance


def plain_study(storage: str) -> optuna.Study:
    """Nothing of lepredict: values reported per step, a MedianPruner, two hyperparameters."""
    def objective(trial):
        x, y = trial.suggest_float("x", -3, 3), trial.suggest_categorical("kind", ["a", "b"])
        for step in range(EPOCHS + 1):
            trial.report((x - 1) ** 2 + (y == "b") + 2 / (step + 1), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return (x - 1) ** 2 + (y == "b")

    study = optuna.create_study(storage=storage, study_name="plain",
                                sampler=optuna.samplers.RandomSampler(seed=1),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    study.optimize(objective, n_trials=12)
    return study


@pytest.fixture(scope="module")
def studies(tmp_path_factory, model_dir):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = tmp_path_factory.mktemp("studies")
    storage = f"sqlite:///{root / 'user.db'}"
    # The predictors of the synthetic runs (quicker to load than the shipped ones), with a cut-off
    # that makes the pruner decide a few trials of this small study, each with its reason.
    pruner = lepredict.LyapunovPruner(model=str(model_dir), threshold=0.3)
    mse, chance = user_study(storage, "regression", pruner, 12)
    accuracy, _ = user_study(storage, "classification",
                             optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1), 10)
    plain = plain_study(storage)
    return {"root": root, "storage": storage, "chance": chance, "regression": mse,
            "classification": accuracy, "plain": plain}


@pytest.fixture(scope="module")
def sweep_storage(tmp_path_factory, model_dir):
    """The README's demo, smaller: a digits-by-rows sweep pruned by LyapunovPruner."""
    root = tmp_path_factory.mktemp("sweep")
    space = root / "small.toml"
    space.write_text('[params.arch]\nchoices = ["rnn", "gru", "lstm"]\n'
                     '[params.hidden]\nchoices = [8, 16]\n'
                     '[params.init_scale]\nlow = 0.02\nhigh = 3.0\nlog = true\n'
                     '[params.lr]\nlow = 1e-4\nhigh = 0.1\nlog = true\n'
                     '[params.optimizer]\nchoices = ["sgd", "adam", "rmsprop"]\n'
                     '[fixed]\ninit = "uniform"\nlayers = 1\nbatch_size = 64\n')
    storage = f"sqlite:///{root / 'demo.db'}"
    assert main(["sweep", "--task", "digits", "--task-option", "mode=row", "--n-trials", "10",
                 "--epochs", "3", "--pruner", "lyapunov", "--pruner-model", str(model_dir),
                 "--pruner-threshold", "0.3",
                 "--space", str(space), "--study-name", "demo", "--storage", storage,
                 "--seed", "1", "--quiet"]) == 0
    return storage


def _sections(path) -> dict[str, str]:
    """Each section of a report, by its key: 'drawn' or its 'Not drawn' text."""
    text = path.read_text()
    out = {}
    for key, body in re.findall(r"<section id='(\w+)'>(.*?)</section>", text, re.S):
        if f'id="figure-{key}"' in body:
            out[key] = "drawn"
        else:
            out[key] = re.search(r"Not drawn: (.*?)</p>", body, re.S)[1]
    return out


# -- exports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_users_loop_exports_curves_status_step_and_reason(studies, tmp_path, capsys, suffix):
    out = tmp_path / f"mse{suffix}"
    assert main(["export", "--storage", studies["storage"], "--study-name", "regression",
                 "-o", str(out)]) == 0
    frame = read_trials(out)
    study = studies["regression"]
    assert len(frame) == len(study.trials)
    assert frame["chance_loss"].tolist() == pytest.approx([studies["chance"]] * len(frame))
    pruned = frame[frame["state"] == "PRUNED"]
    done = frame[frame["state"] == "COMPLETE"]
    assert len(pruned) and len(done)
    for _, row in frame.iterrows():
        trial = study.trials[int(row["number"])]
        # The curve is what the loop reported, step by step, up to where it stopped.
        assert row["val_loss"] == pytest.approx([trial.intermediate_values[s]
                                                 for s in sorted(trial.intermediate_values)])
        assert row["steps"] == sorted(trial.intermediate_values)
        assert row["le0_mean"] and row["le1_mean"]
    assert (pruned["status"] == "pruned").all()
    assert list(pruned["pruned_at"]) == [len(v) - 1 for v in pruned["val_loss"]]
    assert list(pruned["pruned_at"]) == [study.trials[n].last_step for n in pruned["number"]]
    reasons = pruned["prune_reason"].tolist()
    assert all(isinstance(r, str) and r.startswith("P(") for r in reasons), reasons
    assert pruned["predicted_p_trainable"].between(0, 1).all()
    assert (done["status"] == "ok").all()
    assert done["final_normalised_loss"].tolist() == pytest.approx(
        [v[-1] / studies["chance"] for v in done["val_loss"]])
    assert done["final_val_loss"].tolist() == pytest.approx(done["value"].tolist())
    assert (frame["epochs"] == EPOCHS).all() and (frame["direction"] == "minimize").all()


def test_maximising_loop_exports_its_values_and_given_losses(studies, tmp_path):
    out = tmp_path / "acc.csv"
    assert main(["export", "--storage", studies["storage"], "--study-name", "classification",
                 "-o", str(out)]) == 0
    frame = read_trials(out)
    study = studies["classification"]
    assert (frame["direction"] == "maximize").all()
    for _, row in frame.iterrows():
        trial = study.trials[int(row["number"])]
        assert row["values"] == pytest.approx([trial.intermediate_values[s]
                                               for s in sorted(trial.intermediate_values)])
        # The losses given to report_spectrum(val_loss=...) at epochs 0-3, not the accuracies.
        given = [trial.user_attrs[f"lepredict:val_loss:{e}"] for e in range(4)
                 if f"lepredict:val_loss:{e}" in trial.user_attrs]
        assert row["val_loss"] == pytest.approx(given)
    pruned = frame[frame["state"] == "PRUNED"]
    assert len(pruned) and (pruned["status"] == "pruned").all()
    # MedianPruner records no reason; the step it pruned at is the last reported.
    assert pruned["prune_reason"].isna().all()
    assert list(pruned["pruned_at"]) == [len(v) - 1 for v in pruned["values"]]
    # No loss at the last epoch: no final normalised loss, the accuracy is the outcome.
    assert frame.loc[frame["state"] == "COMPLETE", "final_normalised_loss"].isna().all()


def test_finished_trials_without_a_final_loss_are_not_labelled(studies, model_dir, tmp_path,
                                                               capsys):
    """A maximising loop that gave its losses for epochs 0-3 only: its finished trials have no
    known final loss, so fit and evaluate leave them out (not 'untrainable'), saying so; a
    diverged trial without one stays a label."""
    from lepredict.features import completed_runs, outcomes, unknown_outcomes

    out = tmp_path / "acc.csv"
    assert main(["export", "--storage", studies["storage"], "--study-name", "classification",
                 "-o", str(out)]) == 0
    frame = read_trials(out)
    finished = frame["state"] == "COMPLETE"
    assert finished.any() and unknown_outcomes(frame).equals(finished)
    assert completed_runs(frame).empty
    capsys.readouterr()
    for args in (["evaluate", "--model", str(model_dir)], ["evaluate"],
                 ["fit", "-o", str(tmp_path / "m")]):
        assert main([*args, "--data", str(out), "--threshold", "0.5"]) == 2
        err = capsys.readouterr().err.strip()
        assert "early epochs only" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()

    diverged = frame[finished].head(1).assign(status="diverged")
    assert outcomes(completed_runs(diverged), threshold=0.5)["trainable"].tolist() == [False]
    # A final loss without a chance loss to divide it by is a missing scale, not an outcome.
    unscaled = frame[finished].head(1).assign(final_val_loss=0.4)
    assert not unknown_outcomes(unscaled).any()
    with pytest.raises(ValueError, match="a final loss but no chance loss.*chance_loss="):
        outcomes(completed_runs(unscaled), threshold=0.5)


def test_export_of_a_running_study_needs_finished_only(studies, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(storage=storage, study_name="r")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    running = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    running.report(0.5, 0)
    out = tmp_path / "r.csv"
    assert main(["export", "--storage", storage, "--study-name", "r", "-o", str(out)]) == 2
    assert "--finished-only" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--storage", storage, "--study-name", "r", "-o", str(out),
                 "--finished-only"]) == 0
    frame = read_trials(out)
    assert sorted(frame["number"]) == [0, 1, 2] and (frame["state"] == "COMPLETE").all()


# -- reports ---------------------------------------------------------------------------------


def _analyze(args, out, capsys):
    assert main(["analyze", *args, "-o", str(out)]) == 0, capsys.readouterr().err
    return _sections(out)


def test_users_loop_report_shows_every_trial_and_why_pruned(studies, tmp_path, capsys):
    out = tmp_path / "mse.html"
    sections = _analyze(["--storage", studies["storage"], "--study-name", "regression",
                         "--model", "none"], out, capsys)
    assert [k for k, v in sections.items() if v != "drawn"] == ["calibration"]
    assert "No predictor given" in sections["calibration"]
    frame = trials_frame(studies["regression"])
    figs = report.figures(frame)
    curves = figs["curves"]
    # One curve per trial, pruned ones too, each as long as what the trial reported.
    lines = [t for t in curves.data if t.name and "full run" not in t.name]
    assert len(lines) == len(frame)
    assert sorted(len(t.x) for t in lines) == sorted(len(v) for v in frame["val_loss"])
    pruned = frame[frame["state"] == "PRUNED"]
    for reason in pruned["prune_reason"]:
        assert any(reason in t.text for t in lines)
    # Every hyperparameter the loop sampled is ranked, not just two of them.
    assert set(figs["importance"].data[0].y) == {"hidden", "init_scale", "lr"}
    # Epochs saved: the pruned trials' unrun epochs.
    saved = sum(EPOCHS - len(v) + 1 for v in pruned["val_loss"])
    trained = sum(len(v) - 1 for v in frame["val_loss"])
    assert f"{trained} of {trained + saved}" in figs["epochs"].layout.title.text


def test_threshold_labels_the_runs(studies, model_dir, tmp_path, capsys):
    out = tmp_path / "mse.html"
    args = ["--storage", studies["storage"], "--study-name", "regression"]
    # No task threshold in a study of one's own: split at the median, and say so.
    sections = _analyze([*args, "--model", str(model_dir)], out, capsys)
    assert "better half" in out.read_text() and "median" in out.read_text()
    assert "pass --threshold" in sections["calibration"]
    n_done = int((trials_frame(studies["regression"])["state"] == "COMPLETE").sum())
    _analyze([*args, "--model", "none", "--threshold", "100"], out, capsys)
    assert f"Of the {n_done} finished, {n_done} are trainable" in out.read_text()
    _analyze([*args, "--model", "none", "--threshold", "1e-9"], out, capsys)
    assert f"Of the {n_done} finished, 0 are trainable" in out.read_text()


def test_maximising_and_plain_studies_report(studies, tmp_path, capsys):
    sections = _analyze(["--storage", studies["storage"], "--study-name", "classification",
                         "--model", "none"], tmp_path / "acc.html", capsys)
    for key in ("curves", "epochs", "decisions", "importance", "parallel", "spectra"):
        assert sections[key] == "drawn", (key, sections[key])
    text = (tmp_path / "acc.html").read_text()
    assert "reported value (maximised)" in text and "no reason recorded" in text
    sections = _analyze(["--storage", studies["storage"], "--study-name", "plain",
                         "--model", "none", "--threshold", "2.0"], tmp_path / "plain.html",
                        capsys)
    assert sections["curves"] == sections["importance"] == sections["epochs"] == "drawn"
    assert "No trial recorded a spectrum" in sections["spectra"]
    assert "final value below 2" in (tmp_path / "plain.html").read_text()


def test_spectra_of_running_trials_alone_are_said_to_be_there():
    """Only a running trial measured spectra: the panel, which groups spectra by outcome, says
    so instead of that no trial recorded any."""
    import optuna

    import lepredict
    from lepredict import report

    study = optuna.create_study()
    for value in (0.5, 0.7):
        study.optimize(lambda t, v=value: [t.report(v, e) for e in (0, 1)] and v, n_trials=1)
    running = study.ask()
    for epoch in (0, 1):
        lepredict.report_spectrum(running, {"mean": [0.1, -0.4], "std": [0.0, 0.0]}, epoch)
        running.report(0.9, epoch)
    panel = next(p for p in report.panels(trials_frame(study), threshold=0.6)
                 if p.key == "spectra")
    assert panel.figure is None
    assert "No finished or pruned trial recorded a spectrum at epoch 1; 1 running or failed" \
        in panel.text


def test_demo_sweep_reports_and_exports_alike(sweep_storage, model_dir, tmp_path, capsys):
    out = tmp_path / "demo.parquet"
    assert main(["export", "--storage", sweep_storage, "--study-name", "demo", "-o",
                 str(out)]) == 0
    frame = read_trials(out)
    pruned = frame[frame["state"] == "PRUNED"]
    assert len(pruned), "the demo sweep pruned nothing"
    assert (pruned["status"] == "pruned").all()
    assert all(isinstance(r, str) and r for r in pruned["prune_reason"])
    assert list(pruned["pruned_at"]) == [len(v) - 1 for v in pruned["val_loss"]]
    from_study = _analyze(["--storage", sweep_storage, "--study-name", "demo", "--model",
                           str(model_dir)], tmp_path / "a.html", capsys)
    from_export = _analyze(["--data", str(out), "--model", str(model_dir)],
                           tmp_path / "b.html", capsys)
    assert from_study == from_export
    assert from_study["spectra"] == from_study["decisions"] == "drawn"
    text = (tmp_path / "a.html").read_text()
    assert "Kaplan-Yorke" not in text and "the task's threshold" in text


def test_too_few_runs_are_said_not_drawn(studies):
    frame = trials_frame(studies["regression"])
    done = frame.index[frame["state"] == "COMPLETE"]
    few = frame.drop(done[3:])  # three finished runs, and the pruned ones
    panels = {p.key: p for p in report.panels(few, threshold=1.0)}
    assert panels["lmax"].figure is None and "Only 3 finished" in panels["lmax"].text
    spectra = panels["spectra"].figure
    # Groups this small are drawn run by run, never as a median of two.
    names = {t.name for t in spectra.data if t.name and not t.name.startswith("pruned")}
    assert names and all("each run" in n for n in names), names
    assert len([t for t in spectra.data if (t.legendgroup or "").endswith("trainable")]) == 3
    nothing_pruned = frame[frame["state"] == "COMPLETE"]
    panels = {p.key: p for p in report.panels(nothing_pruned)}
    assert panels["epochs"].figure is None and "No trial was pruned" in panels["epochs"].text
    assert panels["decisions"].figure is None


def _axis_ticks(fig) -> dict[str, list[str]]:
    """Each parallel-coordinate axis's tick labels, by axis name (Optuna 5 draws the axes as
    annotations over line traces, Optuna 4 as a Parcoords trace)."""
    parcoords = [t for t in fig.data if t.type == "parcoords"]
    if parcoords:
        return {d.label: [str(v) for v in (d.ticktext or ())] for d in parcoords[0].dimensions}
    names = fig.layout.xaxis.ticktext
    ticks = {name: [] for name in names}
    for a in fig.layout.annotations:
        ticks[names[int(a.x)]].append(a.text)
    return ticks


def test_parallel_axes_tick_only_the_values_trials_took(studies):
    """An export keeps no distributions: a categorical of numbers (hidden in [4, 8]) and the
    steps trials stopped at are ticked at the values taken, not on an even grid (6, 2.75)."""
    frame = trials_frame(studies["regression"])
    fig = {p.key: p for p in report.panels(frame, threshold=1.0)}["parallel"].figure
    ticks = _axis_ticks(fig)
    hidden = sorted(int(h) for h in frame["param_hidden"].dropna().unique())
    assert ticks["hidden"] == [str(h) for h in hidden] and len(hidden) == 2, ticks
    stops = sorted({len(v) - 1 for v in frame["val_loss"]})
    assert len(stops) > 1 and ticks["(stopped at)"] == [str(s) for s in stops], ticks
    # A float hyperparameter keeps its continuous axis.
    assert len(ticks["lr"]) >= 3


def test_calibration_has_wilson_intervals(runs, model_dir):
    model = StabilityPredictor.load(model_dir / "budget-1")
    runs = runs.iloc[::2]  # enough for bins of 12 runs, and quicker
    fig = report.figures(runs, model=model)["calibration"]
    bins = [t for t in fig.data if t.error_y and t.error_y.array is not None][0]
    p = model.predict_proba(runs)[:, 1]
    assert sum(int(t.split()[0]) for t in bins.text) == len(runs)
    assert np.all(np.diff(bins.x) > 0) and min(bins.x) >= p.min() and max(bins.x) <= p.max()
    for share, up, down, text in zip(bins.y, bins.error_y.array, bins.error_y.arrayminus,
                                     bins.text):
        n = int(text.split()[0])
        # The Wilson interval: around the share, inside [0, 1], about 2 standard errors wide.
        assert 0 <= share - down <= share <= share + up <= 1
        z = NormalDist().inv_cdf(0.975)
        assert up + down == pytest.approx(2 * z * math.sqrt(
            share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n), rel=1e-9)


def test_no_finished_or_reported_values_is_a_clear_error(runs, tmp_path):
    frame = runs.assign(state="FAIL", value=np.nan, val_loss=[[]] * len(runs))
    with pytest.raises(ValueError, match="No trial reported a value"):
        report.analyze(frame, tmp_path / "x.html")


def test_publish_saves_one_graph_per_figure_and_a_note(studies, tmp_path):
    pytest.importorskip("optuna_dashboard")
    from optuna_dashboard import get_note

    storage = f"sqlite:///{tmp_path / 'p.db'}"
    optuna.copy_study(from_study_name="regression", from_storage=studies["storage"],
                      to_storage=storage)
    study = optuna.load_study(study_name="regression", storage=storage)
    sections = report.panels(trials_frame(study))
    drawn = {p.key: p.figure for p in sections if p.figure is not None}
    assert report.publish(study, drawn, notes=[p for p in sections if p.figure is None]) \
        == len(drawn)
    backend = optuna.storages.RDBStorage(storage)
    stored = json.dumps(backend.get_study_system_attrs(
        backend.get_study_id_from_name("regression")))
    for key in drawn:
        assert f"lepredict-{key}" in stored
    assert "not drawn" in get_note(study) and "Calibration" in get_note(study)
    # A note of the user's own is left alone.
    from optuna_dashboard import save_note

    save_note(study, "my note")
    report.publish(study, drawn, notes=[p for p in sections if p.figure is None])
    assert get_note(study) == "my note"
    # Published again without one of them (another --threshold, say): the earlier figure no
    # longer shows beside the note that says it was not drawn; an empty one says why.
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    gone = sorted(drawn)[0]
    rest = {k: f for k, f in drawn.items() if k != gone}
    report.publish(study, rest, notes=[report.Panel(gone, "Gone", "no threshold this time")])
    graphs = get_plotly_graph_objects(backend.get_study_system_attrs(
        backend.get_study_id_from_name("regression")))
    blank = json.loads(graphs[f"lepredict-{gone}"])
    assert not blank["data"] and "Gone: not drawn: no threshold this time" in json.dumps(blank)
    assert json.loads(graphs[f"lepredict-{sorted(rest)[0]}"])["data"]


# -- in a real browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_files(runs, studies, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = runs.iloc[:120]
    frame = runs.copy()
    frame.loc[frame.index[:5], "state"] = "PRUNED"  # as a pruned sweep leaves them
    model = StabilityPredictor.load(model_dir / "budget-1")
    synthetic = report.analyze(frame, root / "synthetic.html", model=model, title="synthetic",
                               reference=runs)
    user = report.analyze(trials_frame(studies["classification"]), root / "user.html",
                          title="classification")
    return [synthetic, user]


def test_report_is_offline_and_every_panel_is_there(report_files):
    text = report_files[0].read_text()
    assert "<script src=" not in text  # plotly.js inlined, no CDN
    assert text.count("plotly.js v") <= 2  # once, not once per figure
    sections = _sections(report_files[0])
    assert list(sections) == ["curves", "epochs", "decisions", "importance", "parallel",
                              "spectra", "lmax", "calibration"]
    assert all(v == "drawn" for v in sections.values()), sections
    assert "5 pruned" in text and "full runs of pruned configurations" in text


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(report_files):
    for path in report_files:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=15000", "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=180,
        )
        console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
        assert console == [], console
        dom = out.stdout
        keys = [k for k, v in _sections(path).items() if v == "drawn"]
        assert keys
        # Each figure's div was filled in by plotly.js: it drew an SVG plot inside it.
        for key in keys:
            body = dom.split(f'id="figure-{key}"', 1)[1][:30000]
            assert 'class="main-svg"' in body, f"{path.name}: figure {key} not rendered"


def test_a_threshold_recorded_for_some_trials_only_is_said_so(runs):
    """A sweep's export analysed with a loop's own (no threshold recorded): the split falls
    back to the median, and the report says why (not "none was recorded")."""
    mixed = runs.copy()
    mixed["threshold"] = mixed["threshold"].astype(float)
    mixed.loc[mixed.index[::3], "threshold"] = float("nan")
    text = " ".join(p.text for p in report.panels(mixed))
    finished = int((mixed["state"] == "COMPLETE").sum())
    with_threshold = int(((mixed["state"] == "COMPLETE") & mixed["threshold"].notna()).sum())
    assert (f"only {with_threshold} of the {finished} finished trials have a recorded "
            "threshold") in text
