"""The command line explains itself: help and defaults on every option, `lepredict tasks`, tasks
of one's own (--task module:function), a quiet Optuna log under the progress bar, and
predict-stability on the task variant its predictor knows, with its drivers in words."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

from lepredict import tasks
from lepredict.cli import _trained_variant, build_parser, main

OWN_TASKS = '''
import torch
from lepredict.tasks import Task


def make_waves(*, seq_len: int = 6, n_train: int = 24, seed: int = 0):
    """Sine waves of random phase: predict the next value.

    Args:
        seq_len: steps per sequence.
        n_train: training sequences.
        seed: seed of the phases.
    """
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(n_train + 16, 1, generator=g) * 6.28
    x = torch.sin(phase + 0.5 * torch.arange(seq_len + 1).float()).unsqueeze(-1)
    return Task(name="waves", x_train=x[:n_train, :-1].contiguous(),
                y_train=x[:n_train, 1:].contiguous(), x_val=x[n_train:, :-1].contiguous(),
                y_val=x[n_train:, 1:].contiguous(), input_size=1, output_size=1,
                kind="regression", chance_loss=0.5, threshold=0.2,
                options={"seq_len": seq_len, "n_train": n_train, "seed": seed})


def not_a_task():
    return 42


def broken():
    raise RuntimeError("the data server is down")


NOT_CALLABLE = 3
'''

TINY_NET = ["--arch", "gru", "--hidden", "4"]


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """A module of tasks on sys.path, under a name no other test has imported."""
    name = f"own_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(OWN_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # nothing written beside it
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


# ------------------------------------------------------------------------------ help


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


def _help_block(text: str, option: str) -> str:
    """The lines `--help` gives ``option``: from its line to the next option's, joined."""
    lines = text.splitlines()

    def opens(line: str) -> bool:  # "  -o OUTPUT, --output OUTPUT  help..." names -o, --output
        head = line.strip().split("  ")[0]
        return line.startswith("  -") and option in head.replace(",", " ").split()

    start = next(i for i, line in enumerate(lines) if opens(line))
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("  -")),
               len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_every_option_has_help_and_shows_its_default():
    commands = _subparsers(build_parser())
    assert {"tasks", "spectrum", "sweep", "predict-stability", "fit", "evaluate", "export",
            "analyze"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"{name} {label} has no help"
            if not action.option_strings or action.default in (None, False):
                continue
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
            block = _help_block(text, label)
            assert f"default: {shown}" in block, f"{name} {label}: {block!r}"


def test_task_help_lists_the_tasks_and_points_to_the_tasks_command():
    sub = _subparsers(build_parser())["spectrum"]
    text = " ".join(sub.format_help().split())
    for name in tasks.available():
        assert name in _help_block(sub.format_help(), "--task")
    assert "module:function" in text
    assert "`lepredict tasks` lists each task's options" in _help_block(sub.format_help(),
                                                                         "--task-option")


BAD_COMMAND_LINES = {
    "no-command": ([], "lepredict: error: the following arguments are required: command; see "
                   "`lepredict --help`."),
    "unknown-command": (["nosuch"], "invalid choice: 'nosuch'"),
    "missing-required": (["export", "-o", "x.csv"], "lepredict export: error: the following "
                         "arguments are required: --study-name; see `lepredict export --help`."),
    "unknown-option": (["export", "--study-name", "s", "-o", "x.csv", "--bogus"],
                       "lepredict export: error: unrecognized arguments: --bogus; see "
                       "`lepredict export --help`."),
    "not-an-int": (["sweep", "--n-trials", "many"], "lepredict sweep: error: argument "
                   "--n-trials: invalid int value: 'many'; see `lepredict sweep --help`."),
}


@pytest.mark.parametrize("argv, message", list(BAD_COMMAND_LINES.values()),
                         ids=list(BAD_COMMAND_LINES))
def test_a_command_line_argparse_refuses_is_one_line_exit_2(argv, message, tmp_path,
                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["tasks"], ["tasks", "--json"], ["--help"]])
def test_output_piped_into_a_reader_that_left_is_no_traceback(argv):
    """`lepredict tasks | head -3`: the reader may close the pipe before everything is written.
    Here it closes before anything is (the command is still importing), so every write fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lepredict", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader leaves
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == "" and code in (0, 1), (code, err)


# ------------------------------------------------------------------------------ tasks


def test_tasks_lists_every_task_with_its_description_and_option_defaults(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in tasks.available():
        factory = tasks._REGISTRY[name]
        first = inspect.getdoc(factory).splitlines()[0].replace("``", "")
        assert f"{name}: {first}" in out
        block = out.split(f"{name}: ", 1)[1].split("\n\n", 1)[0]
        for param in inspect.signature(factory).parameters.values():
            value = param.default if isinstance(param.default, str) else json.dumps(param.default)
            assert f"  {param.name}={value} " in block, (name, param.name)


def test_tasks_json_and_an_own_task_by_spec(own_module, capsys):
    assert main(["tasks", f"{own_module}:make_waves", "digits", "--json"]) == 0
    waves, digits = json.loads(capsys.readouterr().out)
    assert waves["description"] == "Sine waves of random phase: predict the next value."
    assert waves["options"] == {"seq_len": 6, "n_train": 24, "seed": 0}
    assert waves["help"]["seq_len"] == "steps per sequence."
    assert digits["options"]["mode"] == "pixel"


# ------------------------------------------------------------------------ own tasks


def test_own_task_trains_from_the_command_line(own_module, capsys):
    argv = ["spectrum", "--task", f"{own_module}:make_waves", "--task-option", "seq_len=5",
            *TINY_NET, "--epochs", "1", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["task"] == {"name": "waves", "seq_len": 5, "n_train": 24, "seed": 0}
    assert sorted(map(int, record["spectra"])) == [0, 1] and record["status"] == "ok"


def test_sweep_of_an_own_task_stores_the_spec_and_resumes(own_module, capsys):
    spec = f"{own_module}:make_waves"
    argv = ["sweep", "--task", spec, "--n-trials", "1", "--epochs", "1", "--le-epochs", "0",
            "--quiet", "--study-name", "own"]
    assert main(argv) == 0
    study = optuna.load_study(study_name="own", storage="sqlite:///studies/own.db")
    assert study.user_attrs["lepredict:setup"]["task"] == spec
    assert main([*argv[:argv.index("--n-trials") + 1], "2", *argv[argv.index("--n-trials") + 2:]]
                ) == 0
    assert len(optuna.load_study(study_name="own", storage="sqlite:///studies/own.db").trials) == 2


OWN_BAD = {
    "no-such-module": ("nosuchmodule_lepredict_xyz:make", "no module named "
                       "'nosuchmodule_lepredict_xyz'"),
    "no-such-function": ("{mod}:make_nothing", "has no 'make_nothing'; check the function's "
                         "name (module:function)"),
    "not-callable": ("{mod}:NOT_CALLABLE", "not a function returning a Task"),
    "returns-no-task": ("{mod}:not_a_task", "returned int, not a Task; name a function that "
                        "returns a lepredict.tasks.Task"),
    "raises": ("{mod}:broken", "raised RuntimeError: the data server is down"),
    "no-function-part": ("{mod}:", "module:function"),
    "unknown-option": ("{mod}:make_waves --task-option colour=red", "unknown option(s) 'colour'"),
}


@pytest.mark.parametrize("command", ["spectrum", "sweep"])
@pytest.mark.parametrize("spec, message", list(OWN_BAD.values()), ids=list(OWN_BAD))
def test_bad_own_task_is_one_line_exit_2(command, spec, message, own_module, tmp_path, capsys):
    spec, *more = spec.format(mod=own_module).split(" ")
    argv = [command, "--task", spec, *more]
    argv += ["--quiet", "--n-trials", "1", "--epochs", "1"] if command == "sweep" else TINY_NET
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lepredict {command}: error: "), lines
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no study was created


def test_bad_own_task_in_predict_stability_is_one_line_exit_2(own_module, model_dir, capsys):
    assert main(["predict-stability", "--task", f"{own_module}:broken", "--model",
                 str(model_dir)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "the data server is down" in lines[0]


def test_entry_point_tasks_are_listed_and_built(monkeypatch, own_module):
    from importlib.metadata import EntryPoint

    point = EntryPoint(name="waves", value=f"{own_module}:make_waves", group="lepredict.tasks")
    monkeypatch.setattr(tasks, "_entry_points", lambda: {"waves": point})
    assert "waves" in tasks.available()
    assert tasks.get("waves", seq_len=3).seq_len == 3
    assert tasks.describe("waves")["options"]["n_train"] == 24


# ---------------------------------------------------------------------- sweep's log


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("verbose", [False, True])
def test_sweep_quiets_optuna_info_unless_verbose_and_restores_it(verbose, own_module, capsys):
    handler = _Records()
    logging.getLogger("optuna").addHandler(handler)
    before = optuna.logging.get_verbosity()
    try:
        argv = ["sweep", "--task", f"{own_module}:make_waves", "--n-trials", "1", "--epochs",
                "1", "--le-epochs", "0", "--study-name", "log"] + (["--verbose"] if verbose else [])
        assert main(argv) == 0
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    finished = [m for m in handler.messages if "Trial 0 finished" in m]
    assert bool(finished) == verbose
    assert optuna.logging.get_verbosity() == before


# ------------------------------------------------------------ predict-stability


class _Model:
    def __init__(self, studies):
        self.training_summary_ = {"studies": studies}


def test_the_predictors_variant_comes_from_its_training_studies():
    shipped = _Model(["corpus-adding", "corpus-adding10", "corpus-digits"])
    assert _trained_variant(shipped, "digits") == {"mode": "row"}
    assert _trained_variant(shipped, "adding")["seq_len"] == 10
    assert _trained_variant(shipped, "lorenz") is None  # not among its studies
    assert _trained_variant(_Model(["mine"]), "digits") is None
    assert _trained_variant(shipped, "copy") is None


def test_shipped_corpus_variants_match_the_corpus_exports():
    """The mapping in cli.py is what studies/corpus-*.parquet record (when they are present)."""
    from pathlib import Path

    from lepredict.cli import _CORPUS_VARIANTS

    root = Path(__file__).resolve().parents[1] / "studies"
    pd = pytest.importorskip("pandas")
    for task, (study, options) in _CORPUS_VARIANTS.items():
        path = root / f"{study}.parquet"
        if not path.is_file():
            pytest.skip(f"{path} not here")
        recorded = [json.loads(v) for v in
                    pd.read_parquet(path, columns=["task_options"])["task_options"].unique()]
        assert recorded == [tasks.get(task, **options).options], (task, recorded)


def test_predict_stability_defaults_to_the_trained_variant_and_says_so(capsys):
    """The shipped predictor was trained on digits read row by row: no --task-option, row."""
    argv = ["predict-stability", *TINY_NET, "--budget", "0"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "digits" and out["task_options"]["mode"] == "row"
    assert out["task_variant"] == "trained"
    assert all(len(d) == 3 and d[2] and d[2] != d[0] for d in out["drivers"])


def test_predict_stability_text_shows_the_task_variant_and_drivers_in_words(model_dir, tmp_path,
                                                                           capsys):
    from lepredict.features import describe_feature

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"0": {"mean": [0.1, -0.5], "std": [0.01, 0.02]},
                                "1": {"mean": [0.05, -0.6], "std": [0.01, 0.02]},
                                "val_loss": [2.3, 1.9]}))
    argv = ["predict-stability", "--model", str(model_dir), "--spectrum", str(spec)]
    # This model's runs are not the shipped corpus: the task's defaults, and it says so.
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task_options"]["mode"] == "pixel" and out["task_variant"] == "default"
    assert main([*argv, "--task-option", "mode=row"]) == 0
    text = capsys.readouterr().out
    assert "task digits mode=row val_fraction=0.2 seed=0 (T=8; as given" in text
    drivers = text.split("what drove it", 1)[1].splitlines()[1:6]
    for line in drivers:
        name = line.split()[0]
        assert line.rstrip().endswith(describe_feature(name))
