"""Sweeps: storage of records, resume, failures, export, several workers on PostgreSQL."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import optuna
import pandas as pd
import pytest
from conftest import kill_when_it_prints

from lepredict.cli import main
from lepredict.sweep import (
    ATTR,
    SearchSpace,
    SpaceExhausted,
    _parse_space,
    _PerTrialSampler,
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
        # Every generic hyperparameter, fixed ones too, where a screening pruner reads them.
        assert t.user_attrs[f"{ATTR}hparams"] == {
            "arch": t.params["arch"], "hidden": 8, "layers": 1, "init": "uniform",
            "init_scale": 0.3, "lr": t.params["lr"], "optimizer": "adam", "batch_size": 256,
            "clip": 0.0, "weight_decay": 0.0}
    assert study.user_attrs[f"{ATTR}setup"]["task"] == "digits"


def test_fill_fixed_params_completes_old_exports_and_refuses_another_space(space_file):
    import pandas as pd

    from lepredict.sweep import fill_fixed_params

    # An export written before exports recorded the whole configuration: sampled params only,
    # and a later trial that did record them.
    old = pd.DataFrame({"study": ["s", "s"], "number": [0, 1], "param_arch": ["gru", "rnn"],
                        "param_lr": [0.01, 0.02], "param_hidden": [float("nan"), 8.0]})
    filled = fill_fixed_params(old, space_file)
    assert filled["param_hidden"].tolist() == [8, 8] and filled["param_hidden"].dtype == "int64"
    assert filled["param_batch_size"].tolist() == [256, 256]  # fixed by the space, not 64
    assert filled["param_layers"].tolist() == [1, 1]  # RunConfig's default: the space has none
    assert filled["param_lr"].tolist() == [0.01, 0.02]  # sampled: left alone
    assert fill_fixed_params(filled, space_file).equals(filled)
    with pytest.raises(ValueError, match=r"s#1 has hidden=16, but the search space fixes "
                                         r"hidden=8"):
        fill_fixed_params(old.assign(param_hidden=[8, 16]), space_file)


@pytest.mark.parametrize("population", [1, 2])
def test_the_last_epoch_is_never_pruned(tmp_path, space_file, population):
    """A pruner saying "prune" after the last epoch would only discard a finished run: the
    sweep asks it at every epoch but the last (here it answers yes from epoch 1 on)."""
    asked = []

    class FromEpochOne(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            asked.append(trial.last_step)
            return trial.last_step >= 1

    study = _sweep(tmp_path, space_file, n_trials=2, epochs=1, le_epochs=[0],
                   pruner=FromEpochOne(), population=population)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(asked) == [0, 0]
    study = _sweep(tmp_path, space_file, study_name="u", n_trials=2, epochs=2, le_epochs=[0],
                   pruner=FromEpochOne(), population=population)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all(t.last_step == 1 for t in study.trials)


def test_sweep_resumes_and_refuses_a_different_setup(tmp_path, space_file):
    _sweep(tmp_path, space_file, n_trials=2)
    study = _sweep(tmp_path, space_file, n_trials=4)
    assert len(study.trials) == 4
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="was run with"):
        _sweep(tmp_path, space_file, n_trials=5, epochs=3)


@pytest.mark.parametrize("changed,said", [
    ('[params.lr]\nchoices = [0.001, 0.01]', "samples lr as choices [0.001, 0.01], but study "
     "'t' holds it as a range 0.001 to 0.03, log-scaled (2 trials, from trial 0)"),
    ('[params.lr]\nlow = 1e-3\nhigh = 3e-2', "holds it as a range 0.001 to 0.03, log-scaled"),
    ('[params.arch]\nchoices = ["rnn", "gru"]', "samples arch as choices ['rnn', 'gru'], but"),
])
def test_a_resume_whose_space_changes_a_parameters_kind_is_refused(tmp_path, space_file,
                                                                     changed, said):
    """Optuna fails every trial that suggests a parameter as another kind, log setting or set
    of choices than its study holds: the sweep says so before running any (widening a range
    is allowed)."""
    _sweep(tmp_path, space_file, n_trials=2)
    name = changed.split("\n")[0]
    start = SMALL_SPACE.index(name)
    end = SMALL_SPACE.index("\n[", start) + 1
    other = tmp_path / "other.toml"
    other.write_text(SMALL_SPACE[:start] + changed + "\n" + SMALL_SPACE[end:])
    with pytest.raises(ValueError, match=re.escape(said)):
        _sweep(tmp_path, other, n_trials=4)
    assert len(optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 's.db'}")
               .trials) == 2
    # Refused before Optuna opens the study: a journal file is not appended to.
    journal = tmp_path / "j.log"
    _sweep(tmp_path, space_file, n_trials=2, storage=str(journal))
    before = journal.read_bytes()
    with pytest.raises(ValueError, match=re.escape(said)):
        _sweep(tmp_path, other, n_trials=4, storage=str(journal))
    assert journal.read_bytes() == before
    wider = tmp_path / "wider.toml"
    wider.write_text(SMALL_SPACE.replace("high = 3e-2", "high = 1e-1"))
    assert len(_sweep(tmp_path, wider, n_trials=3).trials) == 3


def test_configurations_enqueued_in_a_new_study_run_first(tmp_path, space_file):
    """Optuna's enqueue_trial before the sweep: those configurations run first, the rest is
    drawn; a parameter the space does not sample is refused before anything runs."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="t")
    study.enqueue_trial({"arch": "lstm", "lr": 0.02})
    study = _sweep(tmp_path, space_file, n_trials=2)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    assert study.trials[0].params == {"arch": "lstm", "lr": 0.02}
    assert study.trials[0].user_attrs[f"{ATTR}run"]["config"]["arch"] == "lstm"

    other = optuna.create_study(storage=storage, study_name="u")
    other.enqueue_trial({"lr": 0.02, "hidden": 16})
    with pytest.raises(ValueError, match=r"Trial 0 .* enqueued with hidden, which the search "
                                         r"space does not sample \(hidden fixed in it\)"):
        _sweep(tmp_path, space_file, study_name="u")
    assert [t.state.name for t in other.trials] == ["WAITING"]
    assert ATTR + "setup" not in other.user_attrs
    for bad in ({"arch": "transformer"}, {"lr": 5.0}):
        third = optuna.create_study(storage=storage, study_name=f"v{len(bad)}{list(bad)[0]}")
        third.enqueue_trial(bad)
        with pytest.raises(ValueError, match=f"enqueued with {list(bad)[0]}=.*outside the "):
            _sweep(tmp_path, space_file, study_name=third.study_name)


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
    # load_space refuses this value; a space built in code reaches the trial with it.
    study = _sweep(tmp_path, None, n_trials=1, space=SearchSpace({}, {"lr": -1.0}))
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
        ("[fixed]\nlr = -1.0\n", r"\[fixed\]: lr must be a positive"),
        ("[params.hidden]\nchoices = [8, 0]\n", "params.hidden: hidden must be a positive int"),
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


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_export_of_categoricals_whose_choices_mix_types(tmp_path, suffix):
    """Optuna's categorical choices may be None, bools, numbers and strings in one parameter:
    Parquet holds such a column as text (as CSV does), missing values missing."""
    study = optuna.create_study()
    for choice in (32, "auto", None, True, 2.5):
        study.enqueue_trial({"batch": choice})
        trial = study.ask()
        trial.suggest_categorical("batch", [32, "auto", None, True, 2.5])
        if choice == "auto":
            trial.suggest_float("momentum", 0.1, 0.9)  # conditional: missing elsewhere
        trial.report(1.0, 0)
        study.tell(trial, 1.0)
    out = tmp_path / f"mixed{suffix}"
    assert export_trials(study, out) == 5
    column = read_trials(out)["param_batch"]
    assert [None if pd.isna(v) else str(v) for v in column] == ["32", "auto", None, "True", "2.5"]


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
    assert rc == 2 and "No study named 'missing' in " in (err := capsys.readouterr().err)
    assert "(it holds 'c'); check --study-name" in err  # the studies that are there


def _configs(study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_alike_workers_and_resumes_draw_distinct_configurations(tmp_path, space_file, sampler):
    """Two workers with the same seed on one study (one after the other, as a resume) used to
    replay one sampler sequence; now each trial's draw depends on its number."""
    first = _sweep(tmp_path, space_file, n_trials=3, epochs=1, le_epochs=[0], sampler=sampler)
    assert len(set(_configs(first))) == 3
    both = _sweep(tmp_path, space_file, n_trials=6, epochs=1, le_epochs=[0], sampler=sampler)
    configs = _configs(both)
    assert len(configs) == 6 and len(set(configs)) == 6, configs


def _draws(sampler, space, n, storage=None, name="s"):
    study = optuna.create_study(sampler=sampler, storage=storage, study_name=name,
                                load_if_exists=True)
    study.optimize(lambda t: float(len(space.sample(t))), n_trials=n)
    return study


@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_same_seed_and_trial_number_give_the_same_configuration(space_file, kind):
    space = load_space(space_file)
    make = {"random": lambda s: optuna.samplers.RandomSampler(seed=s),
            "tpe": lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=3)}[kind]
    a = _configs(_draws(_PerTrialSampler(make, 7, space.params), space, 6))
    b = _configs(_draws(_PerTrialSampler(make, 7, space.params), space, 6))
    other = _configs(_draws(_PerTrialSampler(make, 8, space.params), space, 6))
    assert a == b  # TPE included, past its 3 random start-up trials
    assert len(set(a)) == 6 and not set(a) & set(other)


def test_a_finite_space_is_run_without_repeats_then_reported_exhausted():
    """50 choices: the last draws mostly hit configurations already run, so the sampler picks
    among the unseen ones; the 51st trial cannot be distinct and says so instead of looping."""
    space = _parse_space({"params": {"hidden": {"low": 1, "high": 50}}}, "test")
    sampler = _PerTrialSampler(lambda s: optuna.samplers.RandomSampler(seed=s), 0, space.params)
    study = _draws(sampler, space, 50)
    assert sorted(t.params["hidden"] for t in study.trials) == list(range(1, 51))
    with pytest.raises(SpaceExhausted, match="already holds all 50 configurations"):
        study.optimize(lambda t: float(len(space.sample(t))), n_trials=1)


def test_sweep_stops_when_a_categorical_space_is_exhausted(tmp_path, capsys):
    space = tmp_path / "two.toml"
    space.write_text('[params.arch]\nchoices = ["rnn", "gru"]\n[fixed]\nhidden = 4\n'
                     'batch_size = 256\n')
    with pytest.raises(SpaceExhausted, match="all 2 configurations of \\['arch'\\]"):
        _sweep(tmp_path, space, n_trials=4, epochs=1, le_epochs=[0], space=load_space(space))
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert sorted(t.params["arch"] for t in study.trials) == ["gru", "rnn"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    rc = main(["sweep", "--task", "digits", "--task-option", "mode=row", "--n-trials", "3",
               "--epochs", "1", "--le-epochs", "0", "--space", str(space), "--storage",
               f"sqlite:///{tmp_path / 's.db'}", "--study-name", "t", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Search space exhausted" in err, err
    assert len(optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 's.db'}").trials) == 2


def _cli_sweep(db, space_file, n_trials, *extra):
    return main(["sweep", "--task", "digits", "--task-option", "mode=row", "--n-trials",
                 str(n_trials), "--epochs", "1", "--le-epochs", "0", "--space", str(space_file),
                 "--storage", db, "--study-name", "k", "--quiet", *extra])


def test_resume_at_its_count_fails_a_stale_trial_and_runs_its_retry(tmp_path, space_file, capsys):
    """A killed worker's trial (RUNNING, heartbeat stopped) in a study already at its count:
    within the grace period the summary says it may still be running; after it, the resumed
    sweep fails it and runs its configuration again, leaving nothing running or waiting."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    beat = ["--heartbeat-interval", "1", "--grace-period", "2"]
    assert _cli_sweep(db, space_file, 2, *beat) == 0
    capsys.readouterr()
    storage = make_storage(db, "k", heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="k", storage=storage)
    with warnings.catch_warnings():  # Optuna warns that ask() does not beat: that is the point
        warnings.simplefilter("ignore", UserWarning)
        killed = study.ask()
    load_space(space_file).sample(killed)
    storage.record_heartbeat(killed._trial_id)  # its worker then dies: no more beats
    assert _cli_sweep(db, space_file, 3, *beat) == 0
    out = capsys.readouterr().out
    assert "0 failed; 1 running)" in out and "still running   trial 2: in other workers" in out
    time.sleep(2.5)  # past the grace period
    assert _cli_sweep(db, space_file, 3, *beat) == 0
    out = capsys.readouterr().out
    assert "4 (3 complete, 0 of them diverged; 1 failed; 0 running)" in out, out
    assert "failed          1: trial 2 killed, retried as 3" in out
    trials = optuna.load_study(study_name="k", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[3].system_attrs["failed_trial"] == 2 and trials[3].params == trials[2].params


@pytest.mark.parametrize("population,storage", [("1", "k.db"), ("2", "k.db"), ("1", "k.log")])
def test_an_interrupted_trial_is_said_so_and_run_again(tmp_path, space_file, capsys,
                                                       monkeypatch, population, storage):
    """Ctrl-C mid-trial: one line (exit 130), the trial failed as interrupted with no error of
    its own and its retry queued at once, so the next sweep runs it first, on a journal file
    (no heartbeats) too, with no grace period to wait out."""
    import lepredict.sweep as sw

    db = f"sqlite:///{tmp_path / storage}" if storage.endswith(".db") else str(tmp_path / storage)
    beat = ("--heartbeat-interval", "1", "--grace-period", "60") if storage.endswith(".db") else ()
    name = "train_run" if population == "1" else "train_population"
    real = getattr(sw, name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sw, name, interrupted)
    assert _cli_sweep(db, space_file, 2, *beat, "--population", population) == 130
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setattr(sw, name, real)
    stopped = optuna.load_study(study_name="k", storage=sw.make_storage(db, "k")).trials
    size = int(population)
    assert [t.state.name for t in stopped] == ["FAIL"] * size + ["WAITING"] * size
    assert all(t.user_attrs[sw.INTERRUPTED_ATTR]["trial"] == t.number
               and f"{ATTR}error" not in t.user_attrs for t in stopped[:size])
    assert [t.system_attrs["failed_trial"] for t in stopped[size:]] == list(range(size))
    assert [t.params for t in stopped[size:]] == [t.params for t in stopped[:size]]
    frame = sw.trials_frame(optuna.load_study(study_name="k", storage=sw.make_storage(db, "k")),
                            finished_only=True)
    assert frame["fail_reason"].str.contains("stopped before this trial's result").all()
    # The count is of trials run: the retries take the interrupted ones' places.
    assert _cli_sweep(db, space_file, size, *beat, "--population", population) == 0
    out = capsys.readouterr().out
    retried = ", ".join(str(size + i) for i in range(size))
    assert f"interrupted, retried as {retried}" in out, out
    done = optuna.load_study(study_name="k", storage=sw.make_storage(db, "k")).trials
    assert [t.state.name for t in done] == ["FAIL"] * size + ["COMPLETE"] * size


def test_interrupts_of_retries_and_of_starting_members_leave_nothing_running(
        tmp_path, space_file, monkeypatch):
    """A retry interrupted in turn gets its own retry, each keeping its own history (an
    in-memory storage hands out its own objects, which Optuna's callback would append to); a
    population member stopped while it starts is failed and retried too, not left running;
    and a database's stale-trial callback does not retry a trial whose retry is queued."""
    import lepredict.sweep as sw

    memory = optuna.storages.InMemoryStorage()
    real = sw.train_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sw, "train_run", interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            _sweep(tmp_path, space_file, n_trials=1, storage=memory)
    monkeypatch.setattr(sw, "train_run", real)
    trials = optuna.load_study(study_name="t", storage=memory).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING"]
    assert [t.system_attrs.get("retry_history") for t in trials] == [None, [0], [0, 1]]
    study = _sweep(tmp_path, space_file, n_trials=1, storage=memory)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE"]

    start = sw._Objective.start

    def second_starts_interrupted(self, trial):
        if trial.number == 1:
            raise KeyboardInterrupt
        return start(self, trial)

    monkeypatch.setattr(sw._Objective, "start", second_starts_interrupted)
    db = f"sqlite:///{tmp_path / 'p.db'}"
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, space_file, n_trials=2, population=2, storage=db)
    study = optuna.load_study(study_name="t", storage=db)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert sorted(t.system_attrs["failed_trial"] for t in study.trials[2:]) == [0, 1]
    before = len(study.trials)
    sw._RetryUnlessRetried(max_retry=1)(study, study.trials[0])  # found stale later: no
    assert len(study.trials) == before


@pytest.mark.parametrize("first_stopped_by, retried", [("ctrl-c", True), ("kill", False)])
def test_a_kill_is_retried_once_whatever_ctrl_cs_came_before(first_stopped_by, retried):
    """A retry killed in turn is retried again where its original was stopped by a Ctrl-C (no
    fault of the configuration's), not where that was a kill too: kills alone count."""
    import lepredict.sweep as sw

    study = optuna.create_study()
    dist = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)}
    first = study.ask(dist)
    if first_stopped_by == "ctrl-c":
        first.set_user_attr(sw.INTERRUPTED_ATTR, {"trial": first.number, "reason": "test"})
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    sw._retry_callback(max_retry=None)(study, copy.deepcopy(study.trials[0]))
    second = study.ask()  # the retry, then killed (found stale)
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    sw._RetryUnlessRetried(max_retry=1)(study, copy.deepcopy(study.trials[1]))
    assert (len(study.trials) == 3) == retried
    if retried:
        assert study.trials[2].system_attrs["retry_history"] == [0, 1]


def test_cli_sweep_exit_codes(tmp_path, space_file, capsys, monkeypatch):
    """A trial that raises makes the run exit 1, naming it; bad heartbeat settings exit 2."""
    import lepredict.sweep

    def broken(*args, **kwargs):  # a bad space file is refused up front: fail inside the run
        raise ValueError("lr must be a positive finite number (simulated)")

    monkeypatch.setattr(lepredict.sweep, "train_run", broken)
    db = f"sqlite:///{tmp_path / 'e.db'}"
    assert _cli_sweep(db, space_file, 1) == 1
    captured = capsys.readouterr()
    assert "trial 0 raised an error (trial 0: ValueError: lr must be a positive" in captured.out
    assert "trial 0 of this run failed with an error" in captured.err
    assert _cli_sweep(db, space_file, 1, "--heartbeat-interval", "10", "--grace-period", "5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grace_period must be longer than heartbeat_interval" in err


def test_a_missing_database_driver_is_one_clear_error():
    pytest.importorskip("sqlalchemy")
    try:
        import pg8000  # noqa: F401
        pytest.skip("pg8000 is installed: no missing driver to report")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="needs the Python module 'pg8000'.*lepredict\\[postgres\\]"):
        make_storage("postgresql+pg8000://postgres@127.0.0.1:5432/test", "x")


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


# Optuna's own heartbeat thread is the easy case; the silent one (no beat written yet) is kept in
# the quick suite.
@pytest.mark.parametrize("heartbeat_thread", [pytest.param("optuna's", marks=pytest.mark.slow),
                                              "silent"])
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
    kill_when_it_prints(script)
    storage = make_storage(db, "k", heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="k", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    orphan_params = study.trials[1].params
    time.sleep(3)  # past the grace period
    study = _sweep(tmp_path, space_file, n_trials=3, storage=storage, study_name="k", epochs=1,
                   le_epochs=[0])
    # The killed trial's retry takes its place in the count: one more new trial follows it.
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].system_attrs.get("failed_trial") == 1
    assert study.trials[2].params == orphan_params
    assert study.trials[3].params != orphan_params


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
    # Each process says it has imported, then waits for all the others: they open the store at
    # the same moment without a fixed wait for the slowest import.
    script = textwrap.dedent("""
        import pathlib, sys, time
        from lepredict.sweep import make_storage
        ready, n = pathlib.Path(sys.argv[2]), int(sys.argv[3])
        (ready / sys.argv[4]).touch()
        deadline = time.time() + 100
        while len(list(ready.iterdir())) < n and time.time() < deadline:
            time.sleep(0.005)
        make_storage(sys.argv[1], "race")
    """)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    ready = tmp_path / "ready"
    ready.mkdir()
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", script, url, str(ready), str(n), str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-800:] for e in errors if e]


def test_a_sweeps_unfinished_trials_keep_its_layout():
    """In a sweep's study every trial's parameters are lepredict's own: a failed or running
    one (no stored run) is exported with its whole configuration in param_*, as the others."""
    from lepredict.records import HPARAMS, trial_row

    frozen = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"lr": 0.01},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)},
        user_attrs={HPARAMS: {"arch": "gru", "hidden": 8, "lr": 0.01}})
    row = trial_row(frozen, "s", {"task": "digits", "epochs": 2})
    assert row["param_arch"] == "gru" and row["param_hidden"] == 8 and row["param_lr"] == 0.01
    assert not [c for c in row if c.startswith("hparam_")]
    own = trial_row(frozen, "s", {"epochs": 2})  # a loop of one's own: apart
    assert own["hparam_hidden"] == 8 and "param_hidden" not in own


def test_a_probe_beyond_the_validation_set_is_refused_not_cut():
    import lepredict

    task = lepredict.tasks.get("digits", mode="row")
    with pytest.raises(ValueError, match="probe_size 1000 exceeds the 359 validation sequences"):
        lepredict.train_run({"arch": "gru", "hidden": 4}, task, epochs=1, probe_size=1000)
