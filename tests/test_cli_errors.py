"""Bad input to the CLI: one line naming the problem, exit code 2, no traceback, no file made.

Each row is a command line, plus the files it reads (written before the directory is listed).
The command runs in an empty working directory, so a study, database or output it should not
have created shows up as a new path there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import socket
from pathlib import Path

import pytest

from lepredict.cli import main

DIGITS = ["--task", "digits", "--task-option", "mode=row"]
TINY = [*DIGITS, "--arch", "gru", "--hidden", "8", "--lr", "0.01"]
SWEEP = ["sweep", *DIGITS, "--n-trials", "1", "--epochs", "1", "--le-epochs", "0", "1",
         "--quiet", "--study-name", "s"]


def _pg_driver() -> str | None:
    for module, driver in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return driver
    return None


def _pg_server() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
        return True
    except OSError:
        return False


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PG = _pg_driver()
NO_DRIVER = pytest.mark.skipif(PG is None, reason="no PostgreSQL driver (psycopg, psycopg2)")
NO_SERVER = pytest.mark.skipif(PG is None or not _pg_server(),
                               reason="no PostgreSQL server at 127.0.0.1:5432")


def checkpoint(tmp: Path) -> None:
    """What torch.save writes: a zip archive."""
    import torch

    torch.save(torch.nn.GRU(2, 3).state_dict(), tmp / "ck.pt")


def write(name: str, text: str):
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return setup


def empty_study(tmp: Path) -> None:
    import optuna

    (tmp / "studies").mkdir()
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp / 'studies' / 's.db'}")


def _study(tmp: Path, **kwargs):
    import optuna

    (tmp / "studies").mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name="s", storage=f"sqlite:///{tmp / 'studies' / 's.db'}",
                               **kwargs)


def two_objective_study(tmp: Path) -> None:
    study = _study(tmp, directions=["minimize", "maximize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)


def study_without_values(tmp: Path) -> None:
    import optuna

    study = _study(tmp)
    for _ in range(2):  # trials that failed before reporting anything
        study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}),
                   state=optuna.trial.TrialState.FAIL)


def running_study(tmp: Path) -> None:
    import optuna

    study = _study(tmp)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}).report(0.5, 0)


def enqueued_study(tmp: Path) -> None:
    """A finished trial, and two enqueued that no worker started."""
    study = _study(tmp)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    study.enqueue_trial({"x": 0.1})
    study.enqueue_trial({"x": 0.2})


def retried_study(tmp: Path) -> None:
    """A finished trial, one a Ctrl-C stopped (failed), and the retry the sweep queued."""
    import optuna

    from lepredict.sweep import _retry_callback

    study = _study(tmp)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    stopped = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    _retry_callback(max_retry=None)(study, study.trials[1])


def exports_of_both_directions(tmp: Path) -> None:
    """Two exports, of a minimised and of a maximised study: one analysis cannot rank both."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp / 'both.db'}"
    for direction in ("minimize", "maximize"):
        study = optuna.create_study(study_name=direction, storage=storage, direction=direction)

        def objective(trial):
            x = trial.suggest_float("x", 0, 1)
            for step in range(3):
                trial.report(x / (step + 1), step)
            return x / 3

        study.optimize(objective, n_trials=3)
        assert main(["export", "--storage", storage, "--study-name", direction,
                     "-o", str(tmp / f"{direction}.csv")]) == 0


SPECTRUM = {"0": {"mean": [0.1, -0.5], "std": [0.01, 0.02]},
            "1": {"mean": [0.05, -0.6], "std": [0.01, 0.02]}}


def spectrum_file(**changes):
    data = {**SPECTRUM, "val_loss": [2.3, 1.9], **changes}
    return write("spec.json", json.dumps({k: v for k, v in data.items() if v is not None}))


def export(tmp: Path) -> None:
    """A small export of 240 finished runs (the synthetic runs of conftest)."""
    from conftest import synthetic_runs

    synthetic_runs().to_parquet(tmp / "runs.parquet")


def model_manifest_list(tmp: Path) -> None:
    (tmp / "m" / "budget-1").mkdir(parents=True)
    (tmp / "m" / "budget-1" / "manifest.json").write_text("[]")


def own_loop_export(tmp: Path) -> None:
    """An export of a loop of one's own: no task, so no threshold recorded."""
    from conftest import synthetic_runs

    runs = synthetic_runs(n=40)
    runs["task"], runs["threshold"] = None, float("nan")
    runs.to_parquet(tmp / "own.parquet")


# (argv, setup, what the message must name)
CASES = {
    # Storage: a URL, a driver, a server, a database or a directory that is not there.
    "sweep-unknown-url-scheme": (
        [*SWEEP, "--storage", "foo://bar"], None, "unknown database kind 'foo'"),
    "sweep-sqlite-missing-dir": (
        [*SWEEP, "--storage", "sqlite:////no/such/dir/x.db"], None,
        "directory '/no/such/dir' does not exist"),
    "sweep-journal-missing-dir": (
        [*SWEEP, "--storage", "no/such/dir/j.log"], None, "its directory does not exist"),
    "sweep-journal-with-grace-period": (
        [*SWEEP, "--storage", "j.log", "--grace-period", "60"], None,
        "--grace-period applies to a database storage; a journal file ('j.log') keeps no"),
    "sweep-storage-neither": (
        [*SWEEP, "--storage", "study.txt"], None, "neither a database URL"),
    "export-text-file-as-journal": (
        ["export", "--storage", "notes.log", "--study-name", "s", "-o", "x.csv"],
        write("notes.log", "a\nb\n"), "is not an Optuna journal file"),
    "analyze-text-file-as-journal": (
        ["analyze", "--storage", "notes.log", "--study-name", "s"],
        write("notes.log", "a\nb\n"), "is not an Optuna journal file"),
    "sweep-postgres-closed-port": pytest.param(
        [*SWEEP, "--storage", f"{PG}://postgres@127.0.0.1:{_closed_port()}/test"], None,
        "Cannot open --storage", marks=NO_DRIVER),
    "sweep-postgres-missing-database": pytest.param(
        [*SWEEP, "--storage", f"{PG}://postgres@127.0.0.1:5432/lepredict_no_such_db"], None,
        "lepredict_no_such_db", marks=NO_SERVER),
    "export-postgres-missing-database": pytest.param(
        ["export", "--storage", f"{PG}://postgres@127.0.0.1:5432/lepredict_no_such_db",
         "--study-name", "s", "-o", "x.csv"], None, "lepredict_no_such_db", marks=NO_SERVER),
    "export-postgres-closed-port": pytest.param(
        ["export", "--storage", f"{PG}://postgres@127.0.0.1:{_closed_port()}/test",
         "--study-name", "s", "-o", "x.csv"], None, "Cannot open --storage", marks=NO_DRIVER),
    "export-driver-not-installed": pytest.param(
        ["export", "--storage", "mysql+mysqldb://u@127.0.0.1/db", "--study-name", "s",
         "-o", "x.csv"], None, "driver that is not installed",
        marks=pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None,
                                 reason="MySQLdb is installed here")),
    # The driver named is missing, another is installed: that one is suggested, not the same.
    "export-other-driver-installed": pytest.param(
        ["export", "--storage", "postgresql+pg8000://postgres@127.0.0.1/test", "--study-name",
         "s", "-o", "x.csv"], None,
        f"name an installed one in the URL: {PG}://USER@HOST/DB, or install it.",
        marks=pytest.mark.skipif(PG is None or importlib.util.find_spec("pg8000") is not None,
                                 reason="needs psycopg or psycopg2 and no pg8000")),
    # Sweep arguments that would make every trial fail, in a study pinned to them.
    "sweep-negative-epochs": ([*SWEEP, "--epochs", "-2"], None, "--epochs must be >= 1"),
    "sweep-zero-trials": ([*SWEEP, "--n-trials", "0"], None, "--n-trials must be >= 1"),
    "sweep-probe-size-0": ([*SWEEP, "--probe-size", "0"], None, "--probe-size must be >= 1"),
    "sweep-le-k-0": ([*SWEEP, "--le-k", "0"], None, "--le-k must be >= 1"),
    "sweep-le-k-beyond-state": (
        [*SWEEP, "--le-k", "100000"], None, "exceeds the state size"),
    "sweep-device-banana": ([*SWEEP, "--device", "banana"], None, "--device 'banana'"),
    "sweep-le-epochs-beyond-epochs": (
        [*SWEEP, "--le-epochs", "0", "99"], None, "--le-epochs 99 outside 0..1"),
    # The default --le-epochs (0 1 2 3) is no error with fewer epochs: the storage is reached.
    "sweep-default-le-epochs-with-2-epochs": (
        ["sweep", *DIGITS, "--epochs", "2", "--storage", "foo://bar"], None,
        "unknown database kind"),
    "sweep-le-epochs-negative": (
        [*SWEEP, "--le-epochs", "-1", "0"], None, "--le-epochs -1 outside 0..1"),
    "sweep-space-missing": ([*SWEEP, "--space", "nope"], None, "Search space 'nope' not found"),
    "sweep-space-bad-fixed": (
        [*SWEEP, "--space", "bad.toml"], write("bad.toml", "[fixed]\nhidden = 0\n"),
        "[fixed]: hidden must be a positive int"),
    "sweep-space-bad-low": (
        [*SWEEP, "--space", "bad.toml"],
        write("bad.toml", "[params.lr]\nlow = -1.0\nhigh = 0.1\n"), "params.lr: lr must be"),
    "sweep-space-float-hidden": (
        [*SWEEP, "--space", "bad.toml"],
        write("bad.toml", "[params.hidden]\nlow = 8.0\nhigh = 64.0\n"),
        "params.hidden: hidden must be a positive int"),
    "sweep-space-bad-choice": (
        [*SWEEP, "--space", "bad.toml"],
        write("bad.toml", "[params.arch]\nchoices = ['rnn', 'transformer']\n"),
        "params.arch: arch must be one of"),
    "sweep-space-choices-not-list": (
        [*SWEEP, "--space", "bad.toml"], write("bad.toml", "[params.arch]\nchoices = 3\n"),
        "params.arch: choices must be a non-empty list"),
    "sweep-space-fixed-not-table": (
        [*SWEEP, "--space", "bad.toml"], write("bad.toml", "fixed = 3\n"),
        "fixed must be a table"),
    "sweep-space-fixed-vs-bound": (
        [*SWEEP, "--space", "bad.toml"],
        write("bad.toml", "[fixed]\nclip = -1.0\n[params.lr]\nlow = 0.001\nhigh = 0.1\n"),
        "[fixed]: clip must be >= 0"),
    # Commands that only read: nothing is created, whatever is missing.
    "export-missing-study": (
        ["export", "--study-name", "nope", "-o", "x.csv"], None,
        "No study named 'nope': no studies/nope.db here, the default storage"),
    "export-missing-sqlite-file": (
        ["export", "--storage", "sqlite:///nope.db", "--study-name", "s", "-o", "x.csv"], None,
        "No SQLite database 'nope.db'"),
    "export-sqlite-missing-dir": (
        ["export", "--storage", "sqlite:////no/such/dir", "--study-name", "s", "-o", "x.csv"],
        None, "No SQLite database '/no/such/dir'"),
    "export-unknown-url-scheme": (
        ["export", "--storage", "foo://bar", "--study-name", "s", "-o", "x.csv"], None,
        "unknown database kind 'foo'"),
    "export-missing-journal": (
        ["export", "--storage", "j.log", "--study-name", "s", "-o", "x.csv"], None,
        "No journal file 'j.log'"),
    "export-output-dir-missing": (
        ["export", "--study-name", "s", "-o", "/nonexistent/x.parquet"], empty_study,
        "directory '/nonexistent' does not exist"),
    "export-output-format": (
        ["export", "--study-name", "s", "-o", "x.txt"], empty_study, "FILE.parquet or FILE.csv"),
    "analyze-missing-study": (
        ["analyze", "--study-name", "nope", "--model", "none"], None, "No study named 'nope'"),
    "analyze-empty-study": (
        ["analyze", "--study-name", "s", "--model", "none"], empty_study, "has no trials yet"),
    "analyze-unknown-url-scheme": (
        ["analyze", "--storage", "foo://bar", "--study-name", "s"], None, "unknown database"),
    "export-empty-study": (
        ["export", "--study-name", "s", "-o", "x.csv"], empty_study, "has no trials yet"),
    "export-two-objectives": (
        ["export", "--study-name", "s", "-o", "x.csv"], two_objective_study,
        "has 2 objectives (minimize, maximize); lepredict export reads single-objective "
        "studies only: give it a study with one direction"),
    "analyze-two-objectives": (
        ["analyze", "--study-name", "s", "--model", "none"], two_objective_study,
        "lepredict analyze reads single-objective studies only: give it a study with one "
        "direction"),
    "analyze-data-of-both-directions": (
        ["analyze", "--data", "minimize.csv", "maximize.csv", "--model", "none", "-o", "r.html"],
        exports_of_both_directions, "mixes minimised and maximised studies; analyse them one "
        "direction at a time"),
    "export-no-reported-values": (
        ["export", "--study-name", "s", "-o", "x.csv"], study_without_values,
        "None of the 2 trials of study 's' reported a value"),
    "analyze-no-reported-values": (
        ["analyze", "--study-name", "s", "--model", "none"], study_without_values,
        "None of the 2 trials of study 's' reported a value"),
    "export-still-running": (
        ["export", "--study-name", "s", "-o", "x.csv"], running_study,
        "has unfinished trials (trial 2 running); export it when they have finished"),
    "export-enqueued": (
        ["export", "--study-name", "s", "-o", "x.csv"], enqueued_study,
        "has unfinished trials (trials 1, 2 enqueued, not started); export it when they have "
        "finished, or pass --finished-only to export the 1 finished trial."),
    "export-retry-waiting": (
        ["export", "--study-name", "s", "-o", "x.csv"], retried_study,
        "has unfinished trials (trial 2 waiting to run stopped trial 1 again when the sweep "
        "resumes); export it when they have finished, or pass --finished-only to export the 2"),
    "analyze-threshold-nan": (
        ["analyze", "--study-name", "s", "--model", "none", "--threshold", "nan"],
        running_study, "--threshold must be a finite number"),
    "analyze-data-and-study": (
        ["analyze", "--data", "runs.parquet", "--study-name", "s", "--model", "none"], export,
        "Give --data FILE or --study-name NAME [--storage URL], not both"),
    "analyze-threshold-not-above-0": (
        ["analyze", "--data", "runs.parquet", "--model", "none", "--threshold", "-1", "-o",
         "r.html"], export, "threshold -1 is not above 0"),
    "export-sqlite-directory": (
        ["export", "--storage", "sqlite:///.", "--study-name", "s", "-o", "x.csv"], None,
        "Storage 'sqlite:///.' names a directory, not a SQLite database; name a file in it"),
    # SQLite URLs short of slashes: the URL they meant, not sqlite:/// before the whole string.
    "analyze-sqlite-one-slash": (
        ["analyze", "--storage", "sqlite:/s.db", "--study-name", "s"], None,
        "an SQLite URL has three slashes before a relative path and four before an absolute "
        "one: --storage sqlite:///s.db for s.db here, sqlite:////s.db for /s.db."),
    "analyze-sqlite-no-slash": (
        ["analyze", "--storage", "sqlite:s.db", "--study-name", "s"], None,
        "four before an absolute one: --storage sqlite:///s.db."),
    "analyze-sqlite-two-slashes": (
        ["analyze", "--storage", "sqlite://runs/s.db", "--study-name", "s"], None,
        "names no file: an SQLite URL has three slashes before a relative path, --storage "
        "sqlite:///runs/s.db."),
    "export-postgres-one-slash": (
        ["export", "--storage", "postgresql:/db", "--study-name", "s", "-o", "x.csv"], None,
        "a database URL has '://' after its kind: postgresql://USER@HOST/DB."),
    "export-sqlite-memory-as-given": (
        ["export", "--storage", "sqlite:///:memory:", "--study-name", "s", "-o", "x.csv"], None,
        "--storage sqlite:///:memory: is an in-memory database"),
    "predict-task-option-twice": (
        ["predict-stability", *TINY, "--task-option", "mode=pixel", "--model", "{model}"], None,
        "--task-option mode is given twice (mode='row' and mode='pixel'); give it once"),
    "predict-task-option-twice-as-true-and-1": (
        ["predict-stability", *TINY, "--task-option", "x=true", "--task-option", "x=1",
         "--model", "{model}"], None, "--task-option x is given twice (x=True and x=1)"),
    "predict-probe-size-beyond-the-validation-set": (
        ["predict-stability", *TINY, "--model", "{model}", "--probe-size", "100000"], None,
        "--probe-size 100000 exceeds the 359 validation sequences of task 'digits'"),
    "spectrum-probe-size-beyond-the-validation-set": (
        ["spectrum", *TINY, "--probe-size", "100000"], None, "pass at most 359"),
    "sweep-probe-size-beyond-the-validation-set": (
        [*SWEEP, "--probe-size", "100000"], None, "pass at most 359"),
    "predict-budget-the-model-lacks": (
        ["predict-stability", *TINY, "--model", "{model}", "--budget", "9"], None,
        "pass --budget with one of those"),
    "evaluate-model-on-runs-without-a-threshold": (
        ["evaluate", "--data", "own.parquet", "--model", "{model}"], own_loop_export,
        "Some runs have no task threshold"),
    "evaluate-unrelated-csv": (
        ["evaluate", "--data", "other.csv"], write("other.csv", "a,b\n1,2\n3,4\n"),
        "'other.csv' is not a lepredict export"),
    "fit-unrelated-csv": (
        ["fit", "--data", "other.csv", "-o", "models/m"], write("other.csv", "a,b\n1,2\n"),
        "is not a lepredict export"),
    "evaluate-data-is-a-database-url": (
        ["evaluate", "--data", "postgresql+psycopg://postgres@127.0.0.1/x"], None,
        "--data 'postgresql+psycopg://postgres@127.0.0.1/x' is a database URL; --data reads "
        "exports: write one with `lepredict export"),
    "evaluate-data-is-a-directory": (
        ["evaluate", "--data", "d.csv"], lambda tmp: (tmp / "d.csv").mkdir(), "Cannot read"),
    "evaluate-unknown-feature-set": (
        ["evaluate", "--data", "runs.parquet", "--features", "spectrum", "vibes"], export,
        "Unknown feature set 'vibes'"),
    "evaluate-unknown-baseline": (
        ["evaluate", "--data", "runs.parquet", "--baseline", "hparams+vibes"], export,
        "Unknown feature set 'hparams+vibes'"),
    "evaluate-holdout-unknown-column": (
        ["evaluate", "--data", "runs.parquet", "--holdout", "colour=red"], export,
        "no column 'colour'"),
    "evaluate-holdout-not-a-predicate": (
        ["evaluate", "--data", "runs.parquet", "--holdout", "lstm"], export,
        "is not COLUMN OP VALUE"),
    "evaluate-holdout-selects-nothing": (
        ["evaluate", "--data", "runs.parquet", "--holdout", "arch=transformer"], export,
        "selects none of the 240 finished runs"),
    "evaluate-holdout-selects-everything": (
        ["evaluate", "--data", "runs.parquet", "--holdout", "hidden>=1"], export,
        "selects all of the 240 finished runs"),
    "evaluate-negative-n-boot": (
        ["evaluate", "--data", "runs.parquet", "--n-boot", "-1"], export, "--n-boot must be >= 0"),
    "evaluate-output-format": (
        ["evaluate", "--data", "runs.parquet", "-o", "table.txt"], export,
        "FILE.csv or FILE.json"),
    "evaluate-model-with-holdout": (
        ["evaluate", "--model", "./m", "--data", "runs.parquet", "--holdout", "arch=lstm"],
        export, "drop --holdout or --model"),
    "evaluate-test-data-missing": (
        ["evaluate", "--data", "runs.parquet", "--test-data", "later.parquet"], export,
        "No such data file: 'later.parquet'"),
    # Training runs.
    "spectrum-negative-epochs": (
        ["spectrum", *TINY, "--epochs", "-1"], None, "--epochs must be >= 0"),
    "spectrum-probe-size-0": (["spectrum", *TINY, "--probe-size", "0"], None, "--probe-size"),
    "spectrum-device-banana": (["spectrum", *TINY, "--device", "banana"], None, "banana"),
    # Predictions: files measured elsewhere, and model files.
    "predict-probe-size-0": (
        ["predict-stability", *TINY, "--model", "{model}", "--probe-size", "0"], None,
        "--probe-size must be >= 1"),
    "predict-device-banana": (
        ["predict-stability", *TINY, "--model", "{model}", "--device", "banana"], None,
        "--device 'banana'"),
    "predict-spectrum-json-list": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        write("spec.json", "[[0.1, -0.5]]"), "holds a JSON list, not an object"),
    "predict-spectrum-is-a-checkpoint": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "ck.pt"],
        checkpoint, "'ck.pt': is a zip archive (a torch.save checkpoint?), not JSON: --spectrum "
        "reads spectra, not models"),
    "predict-config-is-a-checkpoint": (
        ["predict-stability", *TINY, "--model", "{model}", "--config", "ck.pt"],
        checkpoint, "--config 'ck.pt' is a zip archive (a torch.save checkpoint?), not a "
        "configuration"),
    "predict-spectrum-missing-epoch": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        spectrum_file(**{"1": None}), "no spectrum for epoch(s) [1]"),
    "predict-spectrum-nan-loss": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        write("spec.json", json.dumps({**SPECTRUM, "val_loss": [2.3, math.nan]})),
        "val_loss[1] is nan"),
    "predict-spectrum-null-loss": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        spectrum_file(val_loss=[2.3, None]), "val_loss[1] is nan"),
    "predict-spectrum-short-loss": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        spectrum_file(val_loss=[2.3]), "\"val_loss\" has 1"),
    "predict-spectrum-ragged": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        spectrum_file(**{"0": {"mean": [0.1, -0.5], "std": [0.01]}}), "of one length"),
    "predict-spectrum-bad-share": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        spectrum_file(**{"0": {"mean": [0.1], "std": [0.0], "diverged": 2}}), "in [0, 1]"),
    "predict-spectrum-bad-trajectories": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        spectrum_file(**{"0": {"mean": [0.1], "std": [0.0], "trajectories": 0}}),
        "trajectories is how many probe sequences the spectrum averages over, a positive int"),
    "predict-spectrum-not-json": (
        ["predict-stability", *TINY, "--model", "{model}", "--spectrum", "spec.json"],
        write("spec.json", "{0: 1"), "not valid JSON"),
    "predict-manifest-is-a-list": (
        ["predict-stability", *TINY, "--model", "./m"], model_manifest_list,
        "is not a predictor's manifest (a JSON object)"),
}


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, setup, message", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_creates_nothing(argv, setup, message, tmp_path,
                                                          monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)
    if "{model}" in argv:
        argv = [str(request.getfixturevalue("model_dir")) if a == "{model}" else a for a in argv]
    if setup is not None:
        setup(tmp_path)
    before = _listing(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lepredict {argv[0]}: error: "), err
    assert message in lines[0], err
    assert _listing(tmp_path) == before


def _strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_documented_spectrum_format_predicts_and_json_is_strict(model_dir, tmp_path, capsys):
    """{epoch: {mean, std}} without "diverged", as the help and README describe it."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPECTRUM, "val_loss": [2.3, 1.9]}))
    # A GRU of 2 units: the 2 exponents are its whole spectrum.
    argv = ["predict-stability", *DIGITS, "--arch", "gru", "--hidden", "2", "--model",
            str(model_dir), "--spectrum", str(spec), "--json"]
    assert main(argv) == 0
    out = _strict_json(capsys.readouterr().out)
    assert out["status"] == "ok" and 0.0 <= out["p_trainable"] <= 1.0
    # A loss far beyond chance is a diverged run by lepredict.train's rule, as in a live run.
    from lepredict import tasks
    from lepredict.train import DIVERGED_LOSS_RATIO

    chance = tasks.get("digits", mode="row").chance_loss
    spec.write_text(json.dumps({**SPECTRUM, "val_loss": [2.3, 10 * DIVERGED_LOSS_RATIO * chance]}))
    assert main(argv) == 0
    diverged = _strict_json(capsys.readouterr().out)
    assert diverged["status"] == "diverged"
    assert diverged["p_trainable"] < out["p_trainable"]


def test_diverged_run_record_is_strict_json_and_reads_back(model_dir, tmp_path, capsys):
    """A diverged run's record has infinite losses: null in the JSON, and still a record
    predict-stability reads."""
    argv = ["spectrum", *DIGITS, "--arch", "rnn", "--hidden", "8", "--init-scale", "3",
            "--lr", "1e38", "--optimizer", "sgd", "--epochs", "1", "--json"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    record = _strict_json(text)
    assert record["status"] == "diverged" and record["final_normalised_loss"] is None
    path = tmp_path / "record.json"
    path.write_text(text)
    assert main(["predict-stability", *DIGITS, "--model", str(model_dir), "--spectrum", str(path),
                 "--json"]) == 0
    out = _strict_json(capsys.readouterr().out)
    assert out["status"] == "diverged"


def _optuna_study(directions, trials: int):
    def setup(tmp: Path) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp / 'mine.db'}",
                                    directions=directions)
        study.optimize(lambda t: [t.suggest_float("x", 0, 1)] * len(directions),
                       n_trials=trials)
    return setup


def _foreign_sqlite(tmp: Path) -> None:
    import sqlite3

    with sqlite3.connect(tmp / "mine.db") as conn:
        conn.execute("CREATE TABLE invoices (x)")
    conn.close()


STORES_NOT_A_SWEEPS = {
    "multi-objective-study": ("sqlite:///mine.db", _optuna_study(["minimize", "maximize"], 2),
                              "multi-objective"),
    "maximising-study": ("sqlite:///mine.db", _optuna_study(["maximize"], 0), "maximises"),
    "users-own-study": ("sqlite:///mine.db", _optuna_study(["minimize"], 3),
                        "holds 3 trials that no lepredict sweep made"),
    "another-applications-database": ("sqlite:///mine.db", _foreign_sqlite,
                                      "SQLite database of another application"),
    "text-file-as-database": ("sqlite:///mine.db", write("mine.db", "my notes\n"),
                              "is not a SQLite database"),
    "text-file-as-journal": ("mine.log", write("mine.log", "my notes\n"),
                             "is not an Optuna journal file"),
    "directory-as-database": ("sqlite:///mine.db", lambda tmp: (tmp / "mine.db").mkdir(),
                              "names a directory"),
}


@pytest.mark.parametrize("storage, setup, message", list(STORES_NOT_A_SWEEPS.values()),
                         ids=list(STORES_NOT_A_SWEEPS))
def test_sweep_leaves_stores_it_did_not_make_alone(storage, setup, message, tmp_path,
                                                   monkeypatch, capsys):
    """A sweep pointed at someone else's study, database or file refuses before it writes:
    no trial added, no table created, nothing appended."""
    import sqlite3

    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    path = tmp_path / storage.removeprefix("sqlite:///")

    def contents():
        if path.is_dir():
            return None
        try:  # an Optuna database's trials and tables (its journal mode may change)
            with contextlib.closing(sqlite3.connect(path)) as conn:
                return sorted(conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()), (
                    conn.execute("SELECT * FROM trials").fetchall()
                    if "trials" in str(conn.execute("SELECT name FROM sqlite_master")
                                       .fetchall()) else None)
        except sqlite3.DatabaseError:
            return path.read_bytes()

    before, listing = contents(), _listing(tmp_path)
    capsys.readouterr()
    assert main([*SWEEP, "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err, err
    assert contents() == before
    assert _listing(tmp_path) == listing


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    """Ctrl-C ends a command with one line, not a traceback (a sweep's says how to resume)."""
    import lepredict.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_export", interrupted)
    assert main(["export", "--study-name", "s", "-o", "x.csv"]) == 130
    assert capsys.readouterr().err == "lepredict export: interrupted\n"
