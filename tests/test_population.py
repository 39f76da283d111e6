"""Population training: each member's record is its run alone; the sweep's populations."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
import torch
from conftest import kill_when_it_prints

from lepredict import tasks, train_run
from lepredict.cli import main
from lepredict.population import group_by_shape, shape_of, train_population
from lepredict.sweep import ATTR, load_space, make_storage, run_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def digits_row():
    return tasks.get("digits", mode="row")


def _close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(x == pytest.approx(y, rel=rel, abs=1e-7) for x, y in zip(a, b))


def assert_same_run(pop, alone, diverging: bool = False) -> None:
    """A member's record against its configuration trained alone: float32 rounding apart.
    Once a run diverges its values are rounding amplified (weights of 1e7 saturate every unit),
    so for a diverging run only where it stops, and what it had before, are compared."""
    assert (pop.status, pop.epochs_completed, pop.epochs) == (
        alone.status, alone.epochs_completed, alone.epochs)
    assert pop.config == alone.config and pop.task == alone.task
    assert pop.val_loss[0] == pytest.approx(alone.val_loss[0], rel=1e-5)
    assert pop.weights[0] == pytest.approx(alone.weights[0], rel=1e-5)
    for name in ("train_loss", "val_loss", "grad_norm", "weights"):
        assert len(getattr(pop, name)) == len(getattr(alone, name)), name
    if diverging:
        assert sorted(pop.spectra) == sorted(alone.spectra) == [0]
        assert pop.spectra[0]["mean"] == pytest.approx(alone.spectra[0]["mean"], abs=2e-3)
        return
    assert _close(pop.train_loss, alone.train_loss, 1e-4), (pop.train_loss, alone.train_loss)
    assert _close(pop.val_loss, alone.val_loss, 1e-4), (pop.val_loss, alone.val_loss)
    assert _close(pop.grad_norm, alone.grad_norm, 1e-3), (pop.grad_norm, alone.grad_norm)
    for w, v in zip(pop.weights, alone.weights):
        assert w.keys() == v.keys()
        assert all(w[k] == pytest.approx(v[k], rel=1e-4) for k in w)
    assert sorted(pop.spectra) == sorted(alone.spectra)
    for epoch, spec in alone.spectra.items():
        mine = pop.spectra[epoch]
        assert "trajectories" in mine  # compared with the run's own just below
        assert {k: v for k, v in mine.items() if k not in ("mean", "std", "sum")} == {
            k: v for k, v in spec.items() if k not in ("mean", "std", "sum")}
        assert mine["sum"] == pytest.approx(spec["sum"], rel=1e-3, abs=1e-3)
        # The leading exponents closely; the most negative ones are ill-conditioned in float32.
        assert mine["mean"][0] == pytest.approx(spec["mean"][0], abs=2e-4)
        assert mine["mean"] == pytest.approx(spec["mean"], rel=2e-3, abs=2e-3)
    assert math.isinf(pop.final_normalised_loss) == math.isinf(alone.final_normalised_loss)
    if pop.status == "ok":
        assert pop.final_normalised_loss == pytest.approx(alone.final_normalised_loss, rel=1e-4)


def _alone_until(config, task, stop_epoch: int, **kw):
    """train_run stopped by its callback after ``stop_epoch``, as a pruned trial is: the record
    as the callback saw it."""
    seen = {}

    def callback(epoch, rec):
        if epoch == stop_epoch:
            seen["rec"] = copy.deepcopy(rec)
            raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        train_run(config, task, callback=callback, **kw)
    return seen["rec"]


LR = {"sgd": 0.3, "adam": 1e-2, "rmsprop": 3e-3}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_each_member_trains_as_it_would_alone(digits_row, arch, optimizer):
    """Members with their own seed, learning rate, clipping, weight decay and initialisation
    (uniform, gain, orthogonal); member 0 is pruned after epoch 1, member 3 diverges (learning
    rate 1e6): neither changes the others."""
    lr = LR[optimizer]
    configs = [
        {"arch": arch, "hidden": 6, "optimizer": optimizer, "lr": lr, "seed": 0,
         "batch_size": 256},
        {"arch": arch, "hidden": 6, "optimizer": optimizer, "lr": lr / 3, "seed": 5,
         "batch_size": 256, "clip": 0.5, "init": "gain", "init_scale": 1.2},
        {"arch": arch, "hidden": 6, "optimizer": optimizer, "lr": lr * 2, "seed": 7,
         "batch_size": 256, "init": "orthogonal", "init_scale": 0.9, "weight_decay": 0.05},
        {"arch": arch, "hidden": 6, "optimizer": optimizer, "lr": 1e6, "seed": 1,
         "batch_size": 256, "init_scale": 1.0},
    ]
    kw = dict(epochs=2, le_epochs=[0, 2])
    calls = []

    def on_epoch(member, epoch, rec):
        calls.append((member, epoch))
        return member == 0 and epoch == 1

    recs = train_population(configs, digits_row, on_epoch=on_epoch, **kw)
    assert recs[0].status == "pruned" and recs[3].status == "diverged"
    pruned = _alone_until(configs[0], digits_row, 1, **kw)
    pruned.status = "pruned"
    assert_same_run(recs[0], pruned)
    for config, rec in zip(configs[1:3], recs[1:3]):
        assert_same_run(rec, train_run(config, digits_row, **kw))
    assert_same_run(recs[3], train_run(configs[3], digits_row, **kw), diverging=True)
    # Called back as train_run calls back: at 0 whatever happens, then after each epoch the
    # member completes; never again after it left.
    assert sorted(calls) == sorted([(m, 0) for m in range(4)] + [(0, 1), (1, 1), (2, 1),
                                                                   (1, 2), (2, 2)])


def test_a_member_at_a_deeper_population_and_another_task(digits_row):
    """Two layers, every-step scoring (charlm), a repeated configuration."""
    task = tasks.get("charlm", seq_len=12, n_train=64, n_val=32)
    configs = [{"arch": "gru", "hidden": 5, "layers": 2, "lr": 1e-2, "seed": s,
                "batch_size": 16} for s in (0, 1, 0)]
    recs = train_population(configs, task, epochs=1, le_epochs=[1])
    assert recs[0].val_loss == recs[2].val_loss  # the same configuration, the same run
    for config, rec in zip(configs, recs):
        assert_same_run(rec, train_run(config, task, epochs=1, le_epochs=[1]))


class _AbsoluteErrorTask(tasks.Task):
    """A user's task with a loss of its own (mean absolute error on the scored step)."""

    def loss(self, outputs, targets):
        return (outputs[:, -1] - targets).abs().mean()


@pytest.mark.parametrize("own_loss", [False, True])
def test_members_of_a_regression_task_and_of_a_task_with_its_own_loss(own_loss):
    """Task.loss runs as one call for all members; a task's own loss runs per member. Both
    give each member its run alone."""
    import dataclasses

    base = tasks.get("adding", seq_len=10, n_train=96, n_val=48)
    task = _AbsoluteErrorTask(**{f.name: getattr(base, f.name)
                                 for f in dataclasses.fields(base)}) if own_loss else base
    configs = [{"arch": "lstm", "hidden": 5, "lr": lr, "seed": s, "batch_size": 32}
               for s, lr in ((0, 1e-2), (1, 3e-2), (2, 3e-3))]
    recs = train_population(configs, task, epochs=2, le_epochs=[2])
    for config, rec in zip(configs, recs):
        assert_same_run(rec, train_run(config, task, epochs=2, le_epochs=[2]))
    if own_loss:  # the task's own loss, not Task's, is what the members trained on
        plain = train_population(configs, base, epochs=2, le_epochs=[2])
        assert all(a.train_loss != b.train_loss for a, b in zip(recs, plain))


def test_decisions_given_later_give_the_same_records(digits_row):
    """on_epoch may answer with a future: members train on meanwhile, and one it stops leaves
    with the record the callback saw, the epoch it trained since dropped."""
    configs = [{"arch": "lstm", "hidden": 5, "lr": 1e-2 * (s + 1), "seed": s, "batch_size": 256}
               for s in range(3)]
    seen = {}

    def decide(member, epoch, rec):
        seen[member, epoch] = copy.deepcopy(rec)
        return member == 1 and epoch == 1

    now = train_population(configs, digits_row, epochs=3, le_epochs=[0, 1], on_epoch=decide)
    with ThreadPoolExecutor(1) as pool:
        later = train_population(configs, digits_row, epochs=3, le_epochs=[0, 1],
                                 on_epoch=lambda *a: pool.submit(decide, *a))
    assert [r.status for r in later] == ["ok", "pruned", "ok"]
    for a, b in zip(now, later):
        assert_same_run(b, a)
    stopped = seen[1, 1].to_dict() | {"status": "pruned", "wall_time": None}
    assert later[1].to_dict() | {"wall_time": None} == stopped


def test_trial_pruned_raised_by_on_epoch_stops_that_member_alone(digits_row):
    """A user's on_epoch written as an Optuna loop is (raise TrialPruned): it stops the member
    that raised it, now or from a future, as True would; another exception stops them all."""
    configs = [{"arch": "gru", "hidden": 5, "lr": 1e-2, "seed": s, "batch_size": 256}
               for s in range(3)]

    def decide(member, epoch, rec):
        if member == 1 and epoch == 1:
            raise optuna.TrialPruned()
        return member == 2 and epoch == 1

    kw = dict(epochs=2, le_epochs=[0])
    now = train_population(configs, digits_row, on_epoch=decide, **kw)
    with ThreadPoolExecutor(1) as pool:
        later = train_population(configs, digits_row,
                                 on_epoch=lambda *a: pool.submit(decide, *a), **kw)
    for recs in (now, later):
        assert [r.status for r in recs] == ["ok", "pruned", "pruned"]
        assert [r.epochs_completed for r in recs] == [2, 1, 1]

    def fail(member, epoch, rec):
        raise RuntimeError("the user's own bug")

    with pytest.raises(RuntimeError, match="own bug"):
        train_population(configs, digits_row, on_epoch=fail, **kw)


def test_shapes_group_and_mixed_shapes_are_refused(digits_row):
    configs = [{"arch": "gru", "hidden": 8}, {"arch": "lstm"}, {"arch": "gru", "hidden": 8,
                                                                 "lr": 0.1, "seed": 3}]
    assert group_by_shape(configs) == [[0, 2], [1]]
    assert shape_of(configs[0]) == ("gru", 8, 1, "adam", 64)
    with pytest.raises(ValueError, match=r"configs\[1\] has arch='lstm'.*group_by_shape"):
        train_population(configs, digits_row, epochs=1)
    with pytest.raises(ValueError, match="empty"):
        train_population([], digits_row, epochs=1)
    with pytest.raises(ValueError, match="epochs must be"):
        train_population(configs[:1], digits_row, epochs=-1)
    with pytest.raises(ValueError, match="Unknown hyperparameters"):
        train_population([{"arch": "gru", "width": 3}], digits_row, epochs=1)


_FAULTS_OF_AN_EPOCH = """
import resource, sys
from lepredict import tasks, train_run
from lepredict.population import train_population
from lepredict.train import keep_freed_memory
faults = 0
if sys.argv[1] == "check":  # train_run sets the thresholds too
    train_run({"hidden": 2}, tasks.get("digits", mode="row"), epochs=0, le_epochs=[])
    assert keep_freed_memory.cache_info().currsize == 1
else:
    task = tasks.get("digits", mode="row")
    configs = [{"arch": "lstm", "hidden": 32, "seed": seed} for seed in range(32)]
    train_population(configs, task, epochs=1, le_epochs=[])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_population(configs, task, epochs=1, le_epochs=[])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(keep_freed_memory(), faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_freed_blocks_are_kept_for_the_next_step_unless_the_user_says_otherwise():
    def run(what="train", **env):
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_AN_EPOCH, what], check=True,
                             capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items()
                                  if not k.startswith("MALLOC_")} | env).stdout.split()
        return out[0] == "True", int(out[1])

    kept, faults = run()
    if not kept:
        pytest.skip("not glibc's malloc")
    # The epoch allocates and frees about 600 MB in blocks of megabytes: 150,000 pages if
    # each were mapped afresh. Kept, the second epoch reuses the first's (tens to hundreds of
    # faults here). Left to glibc's own dynamic threshold the count varies from run to run
    # (5,000 to 120,000 here), so only the kept side is bounded.
    assert faults < 4_000
    assert run("check", LEPREDICT_KEEP_FREED_MEMORY="0")[0] is False
    assert run("check", MALLOC_TRIM_THRESHOLD_="131072")[0] is False


# -------------------------------------------------------------------------------- sweeps

SPACE = """
[params.lr]
low = 1e-3
high = 3e-2
log = true
[params.init_scale]
low = 0.1
high = 2.0
[fixed]
arch = "gru"
hidden = 8
batch_size = 256
"""

MIXED_SPACE = """
[params.arch]
choices = ["rnn", "lstm"]
[params.lr]
low = 1e-3
high = 3e-2
log = true
[fixed]
hidden = 6
batch_size = 256
"""


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "pop.toml"
    path.write_text(SPACE)
    return path


def _sweep_args(tmp_path, space_file, *extra):
    return ["sweep", "--task", "digits", "--task-option", "mode=row", "--epochs", "2",
            "--le-epochs", "0", "1", "2", "--space", str(space_file), "--storage",
            f"sqlite:///{tmp_path / 'p.db'}", "--quiet", *extra]


def _stored(t: optuna.trial.FrozenTrial) -> set[str]:
    return {k for k in t.user_attrs if not k.startswith(f"{ATTR}prediction:")}


class _PruneOddAtOne(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1 and trial.last_step == 1


def test_population_sweep_stores_what_a_sequential_one_stores(tmp_path, space_file, model_dir,
                                                              capsys):
    """Through the command line with LyapunovPruner, which predicts for each member at each
    epoch (its predictions are stored in the member's trial), then one trial at a time."""
    assert main(_sweep_args(tmp_path, space_file, "--n-trials", "5", "--population", "4",
                            "--study-name", "pop", "--pruner", "lyapunov", "--pruner-model",
                            str(model_dir))) == 0
    assert main(_sweep_args(tmp_path, space_file, "--n-trials", "1", "--study-name", "seq",
                            "--seed", "1")) == 0
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    pop = optuna.load_study(study_name="pop", storage=storage).trials
    seq = optuna.load_study(study_name="seq", storage=storage).trials
    assert len(pop) == 5 and [t.number for t in pop] == list(range(5))
    assert len({tuple(sorted(t.params.items())) for t in pop}) == 5  # no repeated configuration
    assert all(t.state.is_finished() and t.state.name != "FAIL" for t in pop)
    complete = _stored(seq[0])
    assert all(f"{ATTR}prediction:1" in t.user_attrs for t in pop)
    for t in pop:
        run = t.user_attrs[f"{ATTR}run"]
        if t.state.name == "PRUNED":
            assert run["status"] == "pruned" and t.user_attrs[f"{ATTR}status"] == "pruned"
            assert run["pruned_at"] == t.last_step == run["epochs_completed"]
            assert _stored(t) <= complete
        else:
            assert _stored(t) == complete
            assert t.value == pytest.approx(run["final_normalised_loss"])
            assert list(t.intermediate_values) == [0, 1, 2]
        # Reported at every epoch it reached, as loss / chance loss.
        assert [t.intermediate_values[e] for e in sorted(t.intermediate_values)] == \
            pytest.approx([v / 2.3 for v in run["val_loss"]], rel=0.05)
        assert run["config"]["seed"] == t.number  # seed + trial number, as one at a time
    # A member's stored run is its configuration trained alone.
    t = next(t for t in pop if t.state.name == "COMPLETE")
    run = t.user_attrs[f"{ATTR}run"]
    alone = train_run(run["config"], tasks.get("digits", mode="row"), epochs=2,
                      le_epochs=[0, 1, 2])
    assert _close(run["val_loss"], alone.val_loss, 1e-4)
    assert t.user_attrs[f"{ATTR}spectrum:2"]["mean"] == pytest.approx(
        alone.spectra[2]["mean"], rel=2e-3, abs=2e-3)


@pytest.mark.parametrize("pruner", [_PruneOddAtOne(),
                                    optuna.pruners.MedianPruner(n_startup_trials=0)])
def test_pruners_prune_members_one_by_one(tmp_path, space_file, pruner):
    """A median pruner compares with completed trials only: the second population's members
    are pruned against the first's."""
    study = run_sweep("digits", n_trials=8, epochs=3, le_epochs=[0, 1, 2], population=4,
                      pruner=pruner, task_options={"mode": "row"},
                      storage=f"sqlite:///{tmp_path / 'p.db'}", study_name="p",
                      space=load_space(space_file), show_progress_bar=False)
    trials = study.trials
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and len(pruned) < len(trials)
    if isinstance(pruner, _PruneOddAtOne):
        assert [t.number for t in pruned] == [1, 3, 5, 7]
    for t in trials:
        run = t.user_attrs[f"{ATTR}run"]
        if t.state.name == "PRUNED":
            step = t.last_step
            assert run["pruned_at"] == step == run["epochs_completed"] < 3
            assert len(run["val_loss"]) == step + 1 and len(run["train_loss"]) == step
            assert t.value == t.intermediate_values[step]
            assert {k for k in t.user_attrs if k.startswith(f"{ATTR}spectrum:")} == {
                f"{ATTR}spectrum:{e}" for e in range(step + 1)}
        else:
            assert t.state.name == "COMPLETE" and run["epochs_completed"] == 3
            assert list(t.intermediate_values) == [0, 1, 2, 3]


def test_population_shrinks_to_the_trials_left_and_groups_shapes(tmp_path):
    space = tmp_path / "mixed.toml"
    space.write_text(MIXED_SPACE)
    storage = f"sqlite:///{tmp_path / 'm.db'}"
    common = dict(epochs=1, le_epochs=[0, 1], task_options={"mode": "row"}, storage=storage,
                  study_name="m", space=load_space(space), show_progress_bar=False)
    study = run_sweep("digits", n_trials=3, population=16, **common)
    assert len(study.trials) == 3
    study = run_sweep("digits", n_trials=7, population=16, **common)  # a resume: 4 more
    trials = study.trials
    assert len(trials) == 7 and all(t.state.name == "COMPLETE" for t in trials)
    assert {t.params["arch"] for t in trials} == {"rnn", "lstm"}
    for t in trials:
        assert t.user_attrs[f"{ATTR}spectrum:1"]["n"] == (12 if t.params["arch"] == "lstm" else 6)


SHAPES_SPACE = """
[params.arch]
choices = ["rnn", "lstm"]
[params.hidden]
choices = [4, 6]
[params.lr]
low = 1e-3
high = 3e-2
log = true
[fixed]
batch_size = 256
"""


def test_same_shape_fills_populations_with_the_first_trials_shape(tmp_path):
    space = tmp_path / "shapes.toml"
    space.write_text(SHAPES_SPACE)
    common = dict(epochs=1, le_epochs=[0, 1], task_options={"mode": "row"},
                  space=load_space(space), show_progress_bar=False, population=4)

    def shapes(same_shape):
        study = run_sweep("digits", n_trials=8, storage=f"sqlite:///{tmp_path / 's.db'}",
                          study_name=f"s{same_shape}", same_shape=same_shape, **common)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 8
        return [{(t.params["arch"], t.params["hidden"]) for t in study.trials[i:i + 4]}
                for i in (0, 4)]

    assert all(len(group) == 1 for group in shapes(True))
    assert any(len(group) > 1 for group in shapes(False))  # what same_shape changes


def test_same_shape_draws_from_the_whole_space_once_a_shape_is_used_up(tmp_path):
    """Two configurations per shape: the third member of a population cannot take the first's
    shape, so it takes another (its own population) rather than repeat or fail."""
    space = tmp_path / "small.toml"
    space.write_text(MIXED_SPACE.replace("low = 1e-3\nhigh = 3e-2\nlog = true",
                                         "choices = [1e-2, 2e-2]"))
    study = run_sweep("digits", n_trials=4, epochs=1, le_epochs=[0], population=3,
                      same_shape=True, task_options={"mode": "row"},
                      storage=f"sqlite:///{tmp_path / 'x.db'}", study_name="x",
                      space=load_space(space), show_progress_bar=False)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({(t.params["arch"], t.params["lr"]) for t in trials}) == 4
    assert trials[0].params["arch"] == trials[1].params["arch"] != trials[2].params["arch"]


def test_a_failing_population_fails_its_trials_with_the_error(tmp_path, space_file,
                                                              monkeypatch):
    import lepredict.sweep as sw

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sw, "train_population", broken)
    study = run_sweep("digits", n_trials=3, epochs=1, le_epochs=[0], population=3,
                      task_options={"mode": "row"}, storage=f"sqlite:///{tmp_path / 'f.db'}",
                      study_name="f", space=load_space(space_file), show_progress_bar=False)
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
    assert all(t.user_attrs[f"{ATTR}error"] == "RuntimeError: out of memory"
               for t in study.trials)


@pytest.mark.parametrize("args, message", [
    (["--population", "0"], "--population must be >= 1"),
    (["--population", "2", "--n-jobs", "2"], "cannot be combined"),
    (["--same-shape"], "--same-shape shapes populations"),
])
def test_bad_population_is_one_line_and_exit_2(tmp_path, space_file, capsys, args, message):
    assert main(_sweep_args(tmp_path, space_file, "--n-trials", "2", *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.db").exists()


def test_run_sweep_refuses_a_bad_population(space_file):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="population must be a positive int"):
            run_sweep("digits", n_trials=1, population=bad, space=load_space(space_file))
    with pytest.raises(ValueError, match="give population > 1"):
        run_sweep("digits", n_trials=1, same_shape=True, space=load_space(space_file))


def test_run_sweep_refuses_a_bad_schedule_before_it_makes_a_study(tmp_path, space_file):
    db = tmp_path / "s.db"
    for kwargs in ({"le_epochs": [-1, 0, 1]}, {"probe_size": 0}, {"device": "gpu"}):
        with pytest.raises(ValueError, match="le_epochs must hold|probe_size must be|not a dev"):
            run_sweep("digits", n_trials=1, storage=f"sqlite:///{db}", study_name="s",
                      space=load_space(space_file), **kwargs)
    assert not db.exists()


def test_killed_population_is_retried_by_the_next_sweep(tmp_path, space_file):
    """SIGKILL a worker while its population trains: the next sweep fails its trials (stale
    heartbeats) and runs each configuration again, once."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    script = textwrap.dedent(f"""
        import time
        import lepredict.sweep as sw
        def hangs(*a, **k):
            print("hanging", flush=True)
            time.sleep(120)
        sw.train_population = hangs
        sw.run_sweep("digits", n_trials=3, epochs=1, le_epochs=[0], population=2,
                     task_options={{"mode": "row"}},
                     storage=sw.make_storage({db!r}, "k", heartbeat_interval=1, grace_period=2),
                     study_name="k", space=sw.load_space({str(space_file)!r}),
                     show_progress_bar=False)
    """)
    kill_when_it_prints(script)
    storage = make_storage(db, "k", heartbeat_interval=1, grace_period=2)
    orphans = [t.params for t in optuna.load_study(study_name="k", storage=storage).trials]
    assert len(orphans) == 2
    time.sleep(3)  # past the grace period
    study = run_sweep("digits", n_trials=3, epochs=1, le_epochs=[0], population=2,
                      task_options={"mode": "row"}, storage=storage, study_name="k",
                      space=load_space(space_file), show_progress_bar=False)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert sorted(t.system_attrs["failed_trial"] for t in study.trials[2:4]) == [0, 1]
    assert [t.params for t in study.trials[2:4]] in (orphans, orphans[::-1])


PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.postgres
def test_two_population_workers_share_one_postgres_study(tmp_path, space_file):
    try:
        import sqlalchemy

        admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            database = f"lepredict_test_{uuid.uuid4().hex[:8]}"
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    except Exception as err:
        pytest.skip(f"no PostgreSQL server answers at {PG_URL}: {type(err).__name__}")
    url = PG_URL.rsplit("/", 1)[0] + f"/{database}"
    n_trials = 10
    cmd = [sys.executable, "-m", "lepredict.cli", "sweep", "--task", "digits", "--task-option",
           "mode=row", "--n-trials", str(n_trials), "--epochs", "1", "--le-epochs", "0", "1",
           "--space", str(space_file), "--storage", url, "--study-name", "two", "--quiet",
           "--population", "4", "--pruner", "median"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        failed = [o[1][-1500:] for p, o in zip(procs, outs) if p.returncode != 0]
        assert not failed, failed
        trials = optuna.load_study(study_name="two", storage=url).trials
        assert sorted(t.number for t in trials) == list(range(len(trials)))
        assert n_trials <= len(trials) <= n_trials + 1  # at most workers - 1 over
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
        assert all(f"{ATTR}run" in t.user_attrs and f"{ATTR}spectrum:0" in t.user_attrs
                   for t in trials)
    finally:
        sqlalchemy.orm.close_all_sessions()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()


def test_a_population_reads_the_study_once_and_repeats_no_configuration(tmp_path, monkeypatch):
    """A read loads every running trial in full: asked one by one with a read each, a
    population of K read O(K^2) trials. Its draws still see each other (a space of exactly K
    configurations is covered once) and the sweep stops at its count."""
    from optuna.distributions import CategoricalDistribution
    from optuna.storages import _CachedStorage

    from lepredict.sweep import SearchSpace

    reads = []
    real = _CachedStorage.get_all_trials

    def counted(self, *args, **kwargs):
        reads.append(kwargs.get("states"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_CachedStorage, "get_all_trials", counted)
    space = SearchSpace({"lr": CategoricalDistribution([1e-3, 3e-3, 1e-2, 3e-2]),
                         "init_scale": CategoricalDistribution([0.5, 1.0])},
                        {"arch": "gru", "hidden": 8})
    study = run_sweep("digits", n_trials=8, population=8, epochs=0, le_epochs=[],
                      task_options={"mode": "row"}, storage=f"sqlite:///{tmp_path / 'r.db'}",
                      study_name="r", space=space, show_progress_bar=False)
    trials = study.trials
    assert len(trials) == 8 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({(t.params["lr"], t.params["init_scale"]) for t in trials}) == 8
    # Asked with a read each, the population read the study 23 times here (7 now): a few at
    # the start of the sweep and of each population, none per trial.
    assert len(reads) <= 9, reads


def test_a_space_another_worker_exhausts_mid_population_stops_the_sweep(tmp_path, monkeypatch):
    """Another worker draws the last configurations after this worker's read of the study.
    Under Hyperband the sampler draws from its bracket's own read and finds nothing left: the
    sweep stops with SpaceExhausted after one failed trial, rather than failing the rest of its
    count one trial after another."""
    import itertools

    from optuna.distributions import CategoricalDistribution

    import lepredict.sweep as sweep_module
    from lepredict.sweep import SearchSpace, SpaceExhausted

    dists = {"lr": CategoricalDistribution([1e-3, 3e-3, 1e-2, 3e-2]),
             "init_scale": CategoricalDistribution([0.5, 1.0])}
    space = SearchSpace(dists, {"arch": "gru", "hidden": 8})
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    common = dict(population=4, epochs=0, le_epochs=[], task_options={"mode": "row"},
                  storage=storage, study_name="x", space=space, show_progress_bar=False,
                  pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=3))
    run_sweep("digits", n_trials=4, **common)
    real = sweep_module._work_left
    other_worker_ran = []

    def work_left_then_another_worker_draws(study, n_trials, trials=None):
        left = real(study, n_trials, trials)
        if trials is not None and not other_worker_ran:
            other_worker_ran.append(True)
            other = optuna.load_study(study_name="x", storage=storage)
            seen = {(t.params["lr"], t.params["init_scale"]) for t in other.trials}
            for config in itertools.product(dists["lr"].choices, dists["init_scale"].choices):
                if config not in seen:
                    other.add_trial(optuna.trial.create_trial(
                        params=dict(zip(dists, config)), distributions=dists, value=1.0))
        return left

    monkeypatch.setattr(sweep_module, "_work_left", work_left_then_another_worker_draws)
    with pytest.raises(SpaceExhausted):
        run_sweep("digits", n_trials=16, **common)
    trials = optuna.load_study(study_name="x", storage=storage).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) <= 1 and len(trials) <= 9, [t.state.name for t in trials]


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_the_hand_written_backward_through_time_is_the_gradient(arch):
    """The stacked layers' backward pass against finite differences, in float64: K = 2
    members, T = 4 steps, batch 3, 5 units, 2 inputs; for the RNN and the LSTM the gradient of
    the inputs too (a second layer's, from the first), for the GRU its hidden bias inside the
    reset gate."""
    from lepredict.population import _GRURecurrence, _Recurrence

    gates = {"rnn": 1, "gru": 3, "lstm": 4}[arch]
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    w_hh, b = randn(2, gates * 5, 5, scale=0.7), randn(2, gates * 5)
    if arch == "gru":
        gi = randn(2, 4, 3, gates * 5)
        assert torch.autograd.gradcheck(_GRURecurrence.apply, (gi, w_hh, b))
    else:
        x, w_ih = randn(2, 4, 3, 2), randn(2, gates * 5, 2)
        assert torch.autograd.gradcheck(
            lambda *args: _Recurrence.apply(*args, arch), (x, w_ih, w_hh, b))
