"""Sweeps: storage of records, resume, failures, export, several workers on PostgreSQL."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import optuna
import pytest

from lepredict.cli import main
from lepredict.sweep import (
    ATTR,
    export_trials,
    load_space,
    make_storage,
    read_trials,
    run_sweep,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL_SPACE = """
[params.arch]
choices = ["rnn", "gru", "lstm"]
[params.lr]
low = 1e-3
high = 3e-2
log = true
[fixed]
hidden = 8
batch_size = 256
init_scale = 0.3
"""

# As the README writes it: SQLAlchemy picks psycopg 3, the driver lepredict[postgres] installs.
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_reason() -> str | None:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG_URL).connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as err:  # any failure to connect means: skip, saying why
        return f"no PostgreSQL server answers at {PG_URL}: {type(err).__name__}: {str(err)[:120]}"
    return None


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_SPACE)
    return path


def _sweep(tmp_path, space_file, **kw):
    args = dict(n_trials=3, epochs=2, le_epochs=[0, 1], task_options={"mode": "row"},
                storage=f"sqlite:///{tmp_path / 's.db'}", study_name="t", space=load_space(space_file),
                show_progress_bar=False)
    args.update(kw)
    return run_sweep("digits", **args)


def test_sweep_stores_records_spectra_and_values(tmp_path, space_file):
    study = _sweep(tmp_path, space_file)
    assert len(study.trials) == 3
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        run = t.user_attrs[f"{ATTR}run"]
        assert len(run["val_loss"]) == 3 and len(run["train_loss"]) == 2
        assert t.value == pytest.approx(run["final_normalised_loss"])
        for epoch in (0, 1):
            spec = t.user_attrs[f"{ATTR}spectrum:{epoch}"]
            assert len(spec["mean"]) == (16 if t.params["arch"] == "lstm" else 8)  # LSTM: (h, c)
        assert f"{ATTR}spectrum:2" not in t.user_attrs
        assert set(t.intermediate_values) == {0, 1, 2}
        assert set(t.params) == {"arch", "lr"}
    assert study.user_attrs[f"{ATTR}setup"]["task"] == "digits"


def test_sweep_resumes_and_refuses_a_different_setup(tmp_path, space_file):
    _sweep(tmp_path, space_file, n_trials=2)
    study = _sweep(tmp_path, space_file, n_trials=4)
    assert len(study.trials) == 4
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="was run with"):
        _sweep(tmp_path, space_file, n_trials=5, epochs=3)


def test_diverged_run_is_a_complete_trial_with_inf_value(tmp_path):
    space = tmp_path / "boom.toml"
    space.write_text('[fixed]\narch = "rnn"\nhidden = 16\ninit_scale = 3.0\nlr = 1e38\n'
                     'optimizer = "sgd"\nbatch_size = 256\n')
    study = _sweep(tmp_path, space, n_trials=1, space=load_space(space))
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.COMPLETE
    assert math.isinf(t.value)
    assert t.user_attrs[f"{ATTR}status"] == "diverged"
    assert f"{ATTR}spectrum:0" in t.user_attrs


def test_failed_trial_is_recorded_with_its_error(tmp_path):
    space = tmp_path / "bad.toml"
    space.write_text("[fixed]\nlr = -1.0\n")
    study = _sweep(tmp_path, space, n_trials=1, space=load_space(space))
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.FAIL
    assert "lr must be a positive" in t.user_attrs[f"{ATTR}error"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("[params.width]\nchoices = [1, 2]\n", "unknown hyperparameters"),
        ("[params.lr]\nlow = 1.0\n", "needs 'choices'"),
        ("[params.lr]\nlow = 0.0\nhigh = 1.0\nlog = true\n", "params.lr"),
        ("[bogus]\n", "unknown sections"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_search_space(tmp_path, text, match):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_space(path)


def test_missing_search_space_names_where_it_looked(tmp_path):
    with pytest.raises(ValueError, match="studies_x/nope.toml"):
        load_space("nope", studies_dir="studies_x")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_export_round_trip(tmp_path, space_file, suffix):
    study = _sweep(tmp_path, space_file, n_trials=2)
    out = tmp_path / f"runs{suffix}"
    assert export_trials(study, out) == 2
    frame = read_trials(out)
    assert len(frame) == 2
    assert set(frame["param_arch"]) <= {"rnn", "gru", "lstm"}
    row = frame.iloc[0]
    assert len(row["le0_mean"]) == (16 if row["param_arch"] == "lstm" else 8)
    assert len(row["val_loss"]) == 3
    assert row["value"] == pytest.approx(row["final_normalised_loss"])


def test_cli_sweep_and_export(tmp_path, space_file, capsys):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    rc = main(["sweep", "--task", "digits", "--task-option", "mode=row", "--n-trials", "2",
               "--epochs", "1", "--le-epochs", "0", "1", "--space", str(space_file), "--storage", db,
               "--study-name", "c", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "trials run      2 (2 complete" in out
    assert "epochs trained  2 of 2 without pruning" in out and "best result" in out
    rc = main(["export", "--storage", db, "--study-name", "c", "-o", str(tmp_path / "c.csv")])
    assert rc == 0 and (tmp_path / "c.csv").exists()
    rc = main(["export", "--storage", db, "--study-name", "missing", "-o", str(tmp_path / "m.csv")])
    assert rc == 2 and "No study named 'missing'" in capsys.readouterr().err


def _worker_cmd(storage: str, study: str, space_file, n_trials: int) -> list[str]:
    return [sys.executable, "-m", "lepredict.cli", "sweep", "--task", "digits", "--task-option",
            "mode=row", "--n-trials", str(n_trials), "--epochs", "1", "--le-epochs", "0",
            "--space", str(space_file), "--storage", storage, "--study-name", study, "--quiet"]


# Optuna's heartbeat thread (a private class) writes its first beat when it gets scheduled; a
# silent one is the worst case of a worker killed before that, which under load does happen.
SILENT_HEARTBEAT_THREAD = """
import optuna.storages._heartbeat as hb
hb.HeartbeatThread.start = lambda self: None
hb.HeartbeatThread.join = lambda self: None
"""


@pytest.mark.parametrize("heartbeat_thread", ["optuna's", "silent"])
def test_killed_sweep_resumes(tmp_path, space_file, heartbeat_thread):
    """SIGKILL a worker mid-trial; the resumed sweep fails the orphan (stale heartbeat) and runs
    its configuration again, losing nothing that had finished; also when Optuna's heartbeat
    thread had written nothing yet (the sweep writes a first beat itself)."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    prelude = SILENT_HEARTBEAT_THREAD if heartbeat_thread == "silent" else ""
    script = prelude + textwrap.dedent(f"""
        import time
        import lepredict.sweep as sw
        real, calls = sw.train_run, []
        def second_hangs(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                print("hanging", flush=True)
                time.sleep(120)
            return real(*a, **k)
        sw.train_run = second_hangs
        sw.run_sweep("digits", n_trials=3, epochs=1, le_epochs=[0], task_options={{"mode": "row"}},
                     storage=sw.make_storage({db!r}, "k", heartbeat_interval=1, grace_period=2),
                     study_name="k", space=sw.load_space({str(space_file)!r}), show_progress_bar=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "hanging"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    storage = make_storage(db, "k", heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="k", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    orphan_params = study.trials[1].params
    time.sleep(3)  # past the grace period
    study = _sweep(tmp_path, space_file, n_trials=3, storage=storage, study_name="k", epochs=1,
                   le_epochs=[0])
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2].system_attrs.get("failed_trial") == 1
    assert study.trials[2].params == orphan_params


@pytest.mark.postgres
def test_three_workers_share_one_postgres_study(tmp_path, space_file):
    reason = _postgres_reason()
    if reason:
        pytest.skip(reason)
    import sqlalchemy

    # A database of its own, created empty: the workers start together and race to create
    # Optuna's schema, as they do on a new server.
    database = f"lepredict_test_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    url = PG_URL.rsplit("/", 1)[0] + f"/{database}"
    study_name = "three-workers"
    n_trials = 9
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        procs = [subprocess.Popen(_worker_cmd(url, study_name, space_file, n_trials), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        outs = [p.communicate(timeout=300) for p in procs]
        failed = [o[1][-1500:] for p, o in zip(procs, outs) if p.returncode != 0]
        assert not failed, failed
        study = optuna.load_study(study_name=study_name, storage=url)
        trials = study.trials
        numbers = [t.number for t in trials]
        # No duplicates, no gaps, nothing left running, every trial complete with its record.
        assert sorted(numbers) == list(range(len(trials)))
        assert len({t._trial_id for t in trials}) == len(trials)
        assert n_trials <= len(trials) <= n_trials + 2  # MaxTrialsCallback: at most workers - 1 over
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert all(f"{ATTR}run" in t.user_attrs and f"{ATTR}spectrum:0" in t.user_attrs for t in trials)
    finally:
        sqlalchemy.orm.close_all_sessions()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()


def test_workers_opening_a_new_sqlite_store_together(tmp_path):
    """Processes that create the same new SQLite store at once race on Optuna's schema; each
    must open it (the losers retry)."""
    script = textwrap.dedent("""
        import sys, time
        from lepredict.sweep import make_storage
        start = float(sys.argv[2])
        time.sleep(max(0.0, start - time.time()))
        make_storage(sys.argv[1], "race")
    """)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    start = time.time() + 10.0  # past every process's imports, then all at once
    procs = [subprocess.Popen([sys.executable, "-c", script, url, str(start)],
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-800:] for e in errors if e]
