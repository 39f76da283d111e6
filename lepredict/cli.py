"""The ``lepredict`` command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

from lepredict.records import MEASURED_EXPONENTS, spectrum_dict, state_size

__all__ = ["main"]


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _dumps(obj, **kwargs) -> str:
    """Strict JSON: NaN and infinities, which ``json.dumps`` writes as tokens no JSON parser but
    Python's accepts, become ``null``."""
    import numpy as np

    def strict(value):
        if isinstance(value, (np.generic, np.ndarray)):
            value = value.tolist()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(obj), allow_nan=False, **kwargs)


#: Epochs ``sweep`` measures spectra at when ``--le-epochs`` is not given.
DEFAULT_LE_EPOCHS = (0, 1, 2, 3)


def _check_int(option: str, value: int, low: int, meaning: str) -> None:
    if value < low:
        raise CLIError(f"{option} must be >= {low} ({meaning}), got {option} {value}.")


def _check_storage_file(url: str) -> None:
    from lepredict.sweep import check_storage_file

    try:
        check_storage_file(url)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _check_probe_size(probe_size: int, task) -> None:
    """The probe is the first validation sequences: no more than the task has."""
    from lepredict.train import checked_probe_size

    try:
        checked_probe_size(probe_size, task)
    except ValueError as err:
        raise CLIError(f"--{str(err).replace('_', '-', 1)}") from None


def _check_device(name: str) -> None:
    """Fail here, not in every trial: a sweep whose device is wrong fails all its trials."""
    from lepredict.train import checked_device

    try:
        checked_device(name)
    except ValueError as err:
        raise CLIError(f"--device {err}") from None


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def _shown(storage: str | None) -> str:
    """``--storage`` as messages show it: without a password."""
    if storage is None:
        return "studies/"
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: there is no password to hide
        return storage


def _check_rdb(url: str, *, read_only: bool) -> bool:
    """Check a database URL before Optuna opens it: a bad URL, a missing driver, a closed port or
    a missing database become one line here instead of a SQLAlchemy traceback, and a read-only
    command never creates a SQLite file. Returns whether Optuna's tables exist (read-only only)."""
    import sqlalchemy
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise CLIError(f"--storage {url!r} is not a database URL; use sqlite:///FILE.db, "
                       "postgresql://USER@HOST/DB, or a journal file ending in .log or .jsonl."
                       ) from None
    # As given unless there is a password to hide (rendering escapes ':memory:', say).
    shown = url if parsed.password is None else parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if parsed.host:  # sqlite://a.db: the file name read as a host
            path = parsed.host + (f"/{db}" if db else "")
            raise CLIError(f"--storage {shown} names no file: an SQLite URL has three slashes "
                           f"before a relative path, --storage sqlite:///{path}.")
        if db in ("", ":memory:"):
            if read_only:
                raise CLIError(f"--storage {shown} is an in-memory database, which holds no "
                               "study; name the database file: sqlite:///FILE.db.")
            return False
        path = Path(db)
        if path.is_dir():
            _check_storage_file(url)  # says so, with an example
        if read_only and not path.is_file():
            raise CLIError(f"No SQLite database {db!r} (from --storage {shown}); check the path "
                           "(sqlite:///relative.db, sqlite:////absolute.db).")
        if not read_only:
            if not path.parent.is_dir():
                raise CLIError(f"Cannot create the SQLite database {db!r}: directory "
                               f"{str(path.parent)!r} does not exist; create it first "
                               "(sqlite:///relative.db, sqlite:////absolute.db).")
            return False  # connecting would create the file: leave that to the sweep
    try:
        engine = sqlalchemy.create_engine(parsed)
    except sqlalchemy.exc.NoSuchModuleError:
        raise CLIError(f"--storage {shown}: unknown database kind {parsed.drivername!r}; use "
                       "sqlite:///FILE.db, postgresql://USER@HOST/DB, or a journal file ending "
                       "in .log or .jsonl.") from None
    except ImportError as err:
        raise CLIError(f"--storage {shown} needs a database driver that is not installed "
                       f"({_first_line(err)}); "
                       f"{_driver_advice(parsed.get_backend_name(), parsed.get_driver_name())}."
                       ) from None
    except (sqlalchemy.exc.ArgumentError, TypeError, ValueError) as err:
        raise CLIError(f"--storage {shown}: {_first_line(err)}.") from None
    try:
        with engine.connect() as conn:
            return sqlalchemy.inspect(conn).has_table("studies")
    except sqlalchemy.exc.SQLAlchemyError as err:
        check = ("that the file is an SQLite database (an Optuna study's .db file)"
                 if parsed.get_backend_name() == "sqlite" else
                 "that the server runs, the database exists and the URL is right")
        raise CLIError(f"Cannot open --storage {shown}: {_first_line(err)}; check {check}."
                       ) from None
    finally:
        engine.dispose()


def _not_a_storage(storage: str) -> CLIError:
    """The error for a --storage that is no URL and no journal file, with the SQLite URL of a
    database file given as a bare path or with too few slashes."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(/?)/?", storage)
    said = f"--storage {storage!r} is neither a database URL (sqlite:///..., postgresql://...) " \
        "nor a journal file path ending in .log or .jsonl"
    kind = scheme.group(1).split("+")[0].lower() if scheme else ""
    if kind == "sqlite":
        rest = storage[scheme.end():]
        relative, absolute = f"sqlite:///{rest}", f"sqlite:////{rest}"
        here, rooted = Path(rest).is_file(), Path("/", rest).is_file()
        if not rest:
            meant = "--storage sqlite:///FILE.db"
        elif not scheme.group(2) or here and not rooted:
            meant = f"--storage {relative}"
        elif rooted and not here:
            meant = f"--storage {absolute}"
        else:  # one slash: a relative path short of two, or an absolute one short of three
            meant = f"--storage {relative} for {rest} here, {absolute} for /{rest}"
        return CLIError(f"{said}; an SQLite URL has three slashes before a relative path and "
                        f"four before an absolute one: {meant}.")
    if kind in (*_DRIVERS, "postgres", "mariadb"):
        return CLIError(f"{said}; a database URL has '://' after its kind: "
                        f"{scheme.group(1)}://USER@HOST/DB.")
    bare = not scheme or len(scheme.group(1)) == 1  # a path, or one after a drive letter
    return CLIError(said + (f"; for the SQLite file, --storage sqlite:///{storage}."
                            if bare and storage.endswith((".db", ".sqlite", ".sqlite3")) else "."))


#: The SQLAlchemy drivers of the database kinds users name, by the module each imports, in the
#: order suggested where the URL names one that is not installed.
_DRIVERS = {"postgresql": {"psycopg": "psycopg", "psycopg2": "psycopg2", "pg8000": "pg8000"},
            "mysql": {"pymysql": "pymysql", "mysqldb": "MySQLdb",
                      "mysqlconnector": "mysql.connector"}}


def _driver_advice(backend: str, missing: str | None) -> str:
    """What to do about a database driver that is not installed: the URL with one that is, or
    which to install."""
    drivers = _DRIVERS.get(backend, {})
    for driver, module in drivers.items():
        if driver != missing and importlib.util.find_spec(module.split(".")[0]) is not None:
            return (f"name an installed one in the URL: {backend}+{driver}://USER@HOST/DB, or "
                    "install it")
    if drivers:
        driver = next(iter(drivers))
        return (f"install one and name it in the URL: pip install {driver}, then "
                f"{backend}+{driver}://USER@HOST/DB")
    return "install it"


def _check_storage_for_sweep(storage: str | None, heartbeat_options: list[str]) -> None:
    """What a sweep will open, checked before anything is created; ``heartbeat_options``: the
    heartbeat settings given on the command line."""
    if storage is None:
        return  # studies/NAME.db, created by the sweep
    if "://" in storage:
        _check_rdb(storage, read_only=False)
    elif not storage.endswith((".log", ".jsonl")):
        raise _not_a_storage(storage)
    elif not Path(storage).absolute().parent.is_dir():
        raise CLIError(f"Cannot create the journal file {storage!r}: its directory does not "
                       "exist; create it first.")
    elif heartbeat_options:
        # Taken silently, it would promise killed workers' trials a retry that never comes.
        them, verb = ("them", "apply") if len(heartbeat_options) > 1 else ("it", "applies")
        raise CLIError(f"{' and '.join(heartbeat_options)} {verb} to a database storage; a "
                       f"journal file ({storage!r}) keeps no heartbeats, so a killed worker's "
                       f"trial is never found: leave {them} out, or use --storage "
                       "sqlite:///NAME.db (or postgresql://...).")


def _open_study(storage: str | None, study_name: str):
    """Load a study for a command that only reads it: nothing is created when it is missing."""
    import optuna

    missing = CLIError(f"No study named {study_name!r} in {_shown(storage)}; check "
                       "--study-name and --storage.")
    if storage is None:
        path = Path("studies") / f"{study_name}.db"
        if not path.is_file():
            raise CLIError(f"No study named {study_name!r}: no {path} here, the default "
                           "storage; check --study-name, or give --storage (the sweep's URL or "
                           "journal file).")
        storage = f"sqlite:///{path}"
    if "://" in storage:
        if not _check_rdb(storage, read_only=True):
            raise missing
        # No heartbeat (nothing runs trials here), and no schema created in a database Optuna
        # has never used.
        try:
            backend = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        except RuntimeError as err:  # a schema of another Optuna version
            raise CLIError(f"Cannot read --storage {_shown(storage)}: {_first_line(err)}"
                           ) from None
    elif storage.endswith((".log", ".jsonl")):
        if not Path(storage).is_file():
            raise CLIError(f"No journal file {storage!r}; check --storage.")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        _check_storage_file(storage)
        backend = JournalStorage(JournalFileBackend(storage))
    else:
        raise _not_a_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=backend)
    except KeyError:
        names = sorted(s.study_name for s in backend.get_all_studies())
        there = (f"it holds {', '.join(map(repr, names[:8]))}" + (" and more" if len(names) > 8
                                                                  else "")
                 if names else "it holds no study")
        raise CLIError(f"No study named {study_name!r} in {_shown(storage)} ({there}); check "
                       "--study-name and --storage.") from None


def _task_options(pairs: list[str]) -> dict:
    """``["seq_len=30", "mode=row"]`` -> ``{"seq_len": 30, "mode": "row"}`` (JSON values)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CLIError(f"--task-option takes KEY=VALUE, got {pair!r}.")
        key, value = pair.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key in out and (out[key] != parsed or type(out[key]) is not type(parsed)):
            raise CLIError(f"--task-option {key} is given twice ({key}={out[key]!r} and "
                           f"{key}={parsed!r}); give it once.")
        out[key] = parsed
    return out


def _own_task_importable(name: str) -> None:
    """Let ``--task module:function`` find a module in the working directory."""
    if ":" in name and "" not in sys.path and os.getcwd() not in sys.path:
        # The `lepredict` script, unlike `python -m`, does not put the working directory on
        # sys.path: without it, --task mytasks:make_waves would not find ./mytasks.py.
        sys.path.insert(0, os.getcwd())


def _get_task(name: str, options: dict):
    from lepredict import tasks

    _own_task_importable(name)
    try:
        return tasks.get(name, **options)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None


#: The task variants the shipped predictors (``models/default``) were trained on: options that
#: differ from the task's defaults, by the corpus study they came from. Their manifests record
#: the studies (``training_data``) but not the task options, so these were read once from the
#: ``task_options`` column of the corpus exports (``studies/corpus-*.parquet``, written by
#: ``studies/make_corpus.sh``). ``adding`` ran at two lengths; T=10 (``corpus-adding10``, 350
#: runs) is the one make_corpus.sh went on with after T=24 (154 runs) proved nearly unlearnable.
_CORPUS_VARIANTS = {
    "digits": ("corpus-digits", {"mode": "row"}),
    "charlm": ("corpus-charlm", {"seq_len": 24, "n_train": 500, "n_val": 200}),
    "adding": ("corpus-adding10", {"seq_len": 10, "n_train": 1000, "n_val": 200}),
    "lorenz": ("corpus-lorenz", {"seq_len": 24, "n_train": 500, "n_val": 200}),
}


def _trained_variant(model, task: str) -> dict | None:
    """Options of the variant of ``task`` the predictor was trained on, or None if unknown."""
    summary = getattr(model, "training_summary_", None) or {}
    study, options = _CORPUS_VARIANTS.get(task, (None, None))
    return dict(options) if study in summary.get("studies", ()) else None


def _option_value(value) -> str:
    """A task option's value as --task-option takes it: strings bare, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _options_text(options: dict) -> str:
    """``{"mode": "row", "seed": 0}`` -> ``mode=row seed=0``, as --task-option takes them."""
    return " ".join(f"{k}={_option_value(v)}" for k, v in options.items())


class _Given(argparse.Action):
    """Stores the value and notes that the option was given (``args.given``), for options
    whose defaults must not be read as the user's word."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from lepredict.train import RunConfig

    d = RunConfig()
    p.add_argument("--arch", default="lstm", choices=["rnn", "gru", "lstm"], action=_Given,
                   help="recurrent cell: tanh RNN, GRU or LSTM")
    p.add_argument("--hidden", type=int, default=32, action=_Given,
                   help="hidden units per layer")
    p.add_argument("--layers", type=int, default=d.layers, action=_Given,
                   help="stacked recurrent layers")
    p.add_argument("--init", default=d.init, choices=["uniform", "gain", "orthogonal", "default"],
                   action=_Given,
                   help="weight initialisation: uniform in [-s, s], Gaussian with gain s (std "
                   "s/sqrt(fan_in)), orthogonal recurrent gate blocks times s (inputs as gain), "
                   "or torch's default")
    p.add_argument("--init-scale", type=float, default=d.init_scale, action=_Given,
                   help="scale s of --init (ignored by --init default)")
    p.add_argument("--lr", type=float, default=d.lr, action=_Given, help="learning rate")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam", "rmsprop"],
                   action=_Given,
                   help="optimizer")
    p.add_argument("--batch-size", type=int, default=d.batch_size, action=_Given,
                   help="training batch size")
    p.add_argument("--clip", type=float, default=d.clip, action=_Given,
                   help="gradient-norm clipping (0: none)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, action=_Given,
                   help="L2 weight decay given to the optimizer (Adam's coupled one; 0: none)")
    p.add_argument("--seed", type=int, default=d.seed, action=_Given,
                   help="seed of the initialisation and the batch order")


def _config_from_args(args):
    from lepredict.train import RunConfig

    try:
        return RunConfig(arch=args.arch, hidden=args.hidden, layers=args.layers, init=args.init,
                         init_scale=args.init_scale, lr=args.lr, optimizer=args.optimizer,
                         batch_size=args.batch_size, clip=args.clip,
                         weight_decay=args.weight_decay, seed=args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _completed_config(partial, source: str, args) -> dict:
    """A run's configuration from a file's partial one (a spectrum file's "config", --config):
    what it gives stands; what it lacks comes from the options given (and their defaults, said
    in a note); an option given against a value the file gives is refused."""
    from lepredict.train import RunConfig

    if not isinstance(partial, dict):
        raise CLIError(f"{source} is not an object of hyperparameters ({{\"arch\": \"gru\", "
                       "\"hidden\": 64, ...}).")
    options = _config_from_args(args).to_dict()
    unknown = sorted(set(partial) - set(options))
    if unknown:
        raise CLIError(f"{source} has unknown hyperparameter(s) {unknown}; known: "
                       f"{sorted(options)}.")
    given = getattr(args, "given", set()) & set(options)
    merged = {**options, **partial}
    # The file's values are checked before anything is said about them: a bad one is the error.
    try:
        config = RunConfig.from_dict(merged).to_dict()
    except (ValueError, TypeError) as err:
        raise CLIError(f"{source}: {err}") from None
    for key in sorted(given & set(partial)):
        if config[key] != options[key]:
            flag = "--" + key.replace("_", "-")
            raise CLIError(f"{source} says {key}={partial[key]!r}, but {flag} {options[key]!r} "
                           f"was given, and the file's value is the one read; drop {flag}, or "
                           "change the file.")
    assumed = [k for k in options if k not in partial and k not in given and k != "seed"
               and not (k == "init_scale" and merged["init"] == "default")]
    if assumed and partial:
        read = ", ".join(f"{k}={options[k]}" for k in assumed)
        print(f"note: {source} gives no {', '.join(assumed)}: read as {read}, the options' "
              "defaults; give them in the file or as "
              f"{', '.join('--' + k.replace('_', '-') for k in assumed)}.", file=sys.stderr)
    return config


def _cmd_tasks(args) -> int:
    """Each task with its one-line description and its options with their defaults."""
    from lepredict import tasks

    for name in args.names:
        _own_task_importable(name)
    names = args.names or tasks.available()
    described = []
    for name in names:
        try:
            described.append(tasks.describe(name))
        except (ValueError, TypeError) as err:
            if args.names:  # asked for by name: that is the user's error
                raise CLIError(str(err)) from None
            # An installed package's entry point that fails to load should not hide the rest.
            described.append({"name": name, "description": f"(cannot be loaded: {err})",
                              "options": {}, "required": [], "help": {}})
    if args.json:
        print(_dumps(described, indent=1))
        return 0
    for i, info in enumerate(described):
        if i:
            print()
        print(f"{info['name']}: {info['description'].replace('``', '')}")
        rows = [(f"{k}={_option_value(v)}", k) for k, v in info["options"].items()]
        rows += [(f"{k}=... (required)", k) for k in info["required"]]
        width = max((len(r[0]) for r in rows), default=0)
        for shown, key in rows:
            text = info["help"].get(key, "").replace("``", "")
            print(f"  {shown:<{width}}  {text}".rstrip())
    print()
    print("Use one with --task NAME --task-option KEY=VALUE ...; a task of your own with --task "
          "module:function, or by name from a package's 'lepredict.tasks' entry points.")
    return 0


def _cmd_spectrum(args) -> int:
    """Train briefly and print the spectrum at each measured epoch."""
    from lepredict.features import kaplan_yorke
    from lepredict.train import train_run

    _check_int("--epochs", args.epochs, 0, "epochs to train; 0 measures the initialisation only")
    _check_int("--probe-size", args.probe_size, 1, "validation sequences the spectrum averages "
               "over")
    _check_device(args.device)
    config = _config_from_args(args)
    task = _get_task(args.task, _task_options(args.task_option))
    _check_probe_size(args.probe_size, task)
    le_epochs = list(range(args.epochs + 1))
    t0 = time.perf_counter()
    # The whole spectrum: this command shows it (mean, Kaplan-Yorke dimension, all exponents).
    rec = train_run(config, task, epochs=args.epochs, le_epochs=le_epochs, device=args.device,
                    probe_size=args.probe_size, le_k=None)
    if args.json:
        print(_dumps(rec.to_dict()))
        return 0
    print(f"task {task.name} (T={task.seq_len}), {config.arch.upper()} N={config.hidden} x "
          f"{config.layers} layer(s), init {config.init} {config.init_scale:g}; spectrum over "
          f"{args.probe_size} validation sequences, nats/step")
    print(f"{'epoch':>5} {'val loss':>9} {'norm.':>6} {'lambda_1':>16} {'mean':>8} {'#>0':>4} "
          f"{'KY dim':>7}   leading exponents")
    for epoch, spec in sorted(rec.spectra.items()):
        mean, std = spec["mean"], spec["std"]
        val = rec.val_loss[epoch]
        print(f"{epoch:>5} {val:>9.4f} {task.normalised_loss(val):>6.3f} "
              f"{mean[0]:>8.4f}±{std[0]:<7.4f} {sum(mean) / len(mean):>8.4f} "
              f"{sum(v > 0 for v in mean):>4} {kaplan_yorke(mean):>7.2f}   "
              + " ".join(f"{v:.3f}" for v in mean[:6]))
    print(f"status {rec.status}; {time.perf_counter() - t0:.1f} s, of which spectra {rec.le_time:.1f} s")
    return 0


def _pruner(args):
    import optuna

    name = args.pruner
    median = lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)  # noqa: E731
    if name == "lyapunov":
        from lepredict.predictor import ModelFileError
        from lepredict.pruner import LyapunovPruner

        try:
            return LyapunovPruner(model=args.pruner_model, mode=args.pruner_mode,
                                  trust_model=args.trust_model, threshold=args.pruner_threshold,
                                  n_warmup_steps=args.pruner_warmup,
                                  compare_to_best=not args.pruner_no_compare_to_best,
                                  n_startup_trials=10,
                                  wrapped_pruner=median() if args.pruner_wrap_median else None)
        except (ModelFileError, ValueError) as err:
            raise CLIError(str(err)) from None
    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": median,
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
    }
    return pruners[name]()


def _cmd_sweep(args) -> int:
    from lepredict.sweep import load_space, retries_stopped_trials, run_sweep

    # Everything is checked before the study exists: a study created with a bad setup is pinned
    # to it (resuming must repeat it), and every one of its trials would fail.
    _check_int("--n-trials", args.n_trials, 1, "trials the study should hold")
    _check_int("--n-jobs", args.n_jobs, 1, "trials at once")
    _check_int("--population", args.population, 1, "trials trained together; 1 for one at a "
               "time")
    if args.population > 1 and args.n_jobs > 1:
        raise CLIError(f"--population {args.population} and --n-jobs {args.n_jobs} cannot be "
                       "combined (a population already keeps the cores busy); drop one.")
    if args.same_shape and args.population == 1:
        raise CLIError("--same-shape shapes populations: give --population K (K > 1) with it.")
    _check_int("--epochs", args.epochs, 1, "epochs each trial trains")
    _check_int("--probe-size", args.probe_size, 1, "validation sequences the spectrum averages "
               "over")
    le_k_given = args.le_k is not None
    if args.le_k == "all":
        args.le_k = None
    elif le_k_given:
        try:
            args.le_k = int(args.le_k)
        except ValueError:
            raise CLIError(f"--le-k {args.le_k!r} is not a whole number: give the number of "
                           "leading exponents per spectrum, or 'all'.") from None
        _check_int("--le-k", args.le_k, 1, "leading exponents per spectrum, or 'all'")
    else:
        args.le_k = MEASURED_EXPONENTS
    given = args.le_epochs is not None
    if not given:
        # The default as it always was (and as studies made with it store it); with fewer
        # epochs, the run ignores the epochs it does not reach.
        args.le_epochs = list(DEFAULT_LE_EPOCHS)
    outside = sorted({e for e in args.le_epochs if not 0 <= e <= args.epochs})
    if outside and given:
        raise CLIError(f"--le-epochs {' '.join(map(str, outside))} outside 0..{args.epochs}: "
                       "spectra are measured at epochs 0 (initialisation) to --epochs.")
    _check_device(args.device)
    options = _task_options(args.task_option)
    # A clear error before any storage is touched.
    _check_probe_size(args.probe_size, _get_task(args.task, options))
    mine = []  # the trials this worker ran, for the exit code

    def record(study, trial) -> None:
        mine.append(trial)

    try:
        space = load_space(args.space)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if le_k_given and args.le_k is not None and args.le_k > _smallest_state(space):
        raise CLIError(f"--le-k {args.le_k} exceeds the state size of the smallest network the "
                       f"space holds ({_smallest_state(space)}); lower --le-k or leave it out.")
    pruner = _pruner(args)
    _check_storage_for_sweep(args.storage, heartbeat_options=[
        f"--{name.replace('_', '-')}" for name in ("heartbeat_interval", "grace_period")
        if name in getattr(args, "given", ())])
    try:
        with _optuna_log(verbose=args.verbose, bar=not args.quiet):
            study = run_sweep(
                args.task, n_trials=args.n_trials, epochs=args.epochs, le_epochs=args.le_epochs,
                storage=args.storage, study_name=args.study_name, space=space,
                task_options=options, device=args.device, n_jobs=args.n_jobs,
                sampler=args.sampler, pruner=pruner, seed=args.seed, le_k=args.le_k,
                probe_size=args.probe_size, show_progress_bar=not args.quiet,
                callbacks=[record], heartbeat_interval=args.heartbeat_interval,
                grace_period=args.grace_period, population=args.population,
                same_shape=args.same_shape,
            )
    except ValueError as err:
        raise CLIError(str(err)) from None
    _print_summary(study, args.epochs, grace_period=args.grace_period
                   if retries_stopped_trials(study) else None)
    if args.report:
        from lepredict import report
        from lepredict.predictor import ModelFileError, load_models, resolve_model
        from lepredict.sweep import trials_frame

        model = None
        try:
            models = load_models(resolve_model(args.pruner_model), trust=args.trust_model)
            model = models[min(models, key=lambda b: abs(b - 1))]
        except ModelFileError:
            pass  # the report without the predictor's figures
        frame = trials_frame(study)
        try:
            path = report.analyze(frame, f"studies/{args.study_name}-report.html", model=model,
                                  title=args.study_name)
            print(f"  {'report':<15} {path}")
        except ValueError as err:
            print(f"  {'report':<15} not written: {err}")
    errors = [t.number for t in mine if t.state.name == "FAIL"]
    if errors:
        print(f"lepredict sweep: {_numbers(errors, 'trial')} of this run failed with an error "
              "(see 'failed' above)", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _optuna_log(*, verbose: bool, bar: bool):
    """Optuna's log while a sweep runs: warnings only unless ``verbose`` (its INFO line per trial
    would otherwise interleave with the progress bar), and, under a bar, written through tqdm so
    lines land above the bar instead of inside it. The verbosity is restored afterwards."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    # Ctrl-C: Optuna logs the interrupted trial's traceback and "failed with value None"; the
    # CLI says it in one line instead.
    trials_log, quiet = logging.getLogger("optuna.study._optimize"), _Interrupted()
    trials_log.addFilter(quiet)
    try:
        if bar:
            from tqdm.contrib.logging import logging_redirect_tqdm

            # lepredict's own warnings (sweep.py) go through Optuna's logger machinery too.
            with logging_redirect_tqdm(loggers=[logging.getLogger("optuna"),
                                                logging.getLogger("lepredict")]):
                yield
        else:
            yield
    finally:
        trials_log.removeFilter(quiet)
        optuna.logging.set_verbosity(before)


class _Interrupted(logging.Filter):
    """Drops Optuna's records of a trial a Ctrl-C stopped: the traceback, and the line after."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.seen = True
            return False
        return not (self.seen and "failed with value None" in record.getMessage())


def _smallest_state(space) -> int:
    """State size of the smallest network a search space can sample (``--le-k`` may not
    exceed it)."""
    from optuna.distributions import CategoricalDistribution

    from lepredict.train import RunConfig

    default = RunConfig()

    def values(name):
        if name in space.fixed:
            return [space.fixed[name]]
        dist = space.params.get(name)
        if dist is None:
            return [getattr(default, name)]
        return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low]

    return min(state_size(arch, int(min(values("hidden"))), int(min(values("layers"))))
               for arch in values("arch"))


def _numbers(numbers: list[int], noun: str = "trial", most: int = 6) -> str:
    """``[3, 5, 9]`` -> ``"trials 3, 5, 9"``, the list cut short after ``most``."""
    shown = ", ".join(str(n) for n in numbers[:most])
    more = f" and {len(numbers) - most} more" if len(numbers) > most else ""
    return f"{noun}{'s' if len(numbers) != 1 else ''} {shown}{more}"


def _print_summary(study, epochs: int, grace_period: int | None = None) -> None:
    import optuna

    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    count = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState}
    diverged = sum(t.user_attrs.get("lepredict:status") == "diverged" for t in trials)
    # Epochs each trial trained: to its end, to its pruning, or to the epoch it diverged in.
    spent = 0
    for t in trials:
        run = t.user_attrs.get("lepredict:run", {})
        if t.state == optuna.trial.TrialState.PRUNED:
            spent += int(run.get("pruned_at", t.last_step or 0))
        elif t.state == optuna.trial.TrialState.COMPLETE:
            done = int(run.get("epochs_completed", epochs))
            spent += done if run.get("status") != "diverged" else min(done + 1, epochs)
    finished = count["complete"] + count["pruned"]
    full = finished * epochs
    waiting = f"; {count['waiting']} waiting" if count["waiting"] else ""
    rows = [
        ("trials run", f"{len(states) - count['waiting']} ({count['complete']} complete, "
                       f"{diverged} of them diverged; {count['fail']} failed; "
                       f"{count['running']} running{waiting})"),
    ]
    if count["fail"]:
        rows.append(("failed", _failures(trials, grace_period)))
    if count["running"]:
        # This worker finished all it started: what still runs is another worker's, or was a
        # killed worker's whose heartbeat has not been missing for the grace period yet.
        running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        if grace_period:
            rows.append(("still running", f"{_numbers(running)}: in other workers, or killed "
                                          f"ones not yet {grace_period} s without a heartbeat "
                                          "(a sweep started after that fails and retries them)"))
        else:
            rows.append(("still running", f"{_numbers(running)}: in other workers, or killed "
                                          "ones (this storage keeps no heartbeats: those stay "
                                          "running)"))
    if count["waiting"]:
        rows.append(("waiting", f"{count['waiting']} (retries of killed or interrupted "
                                "trials, or enqueued): the next sweep runs them"))
    rows += [
        ("pruned", f"{count['pruned']}"),
        ("epochs trained", f"{spent} of {full} without pruning"),
        ("compute saved", f"{100 * (1 - spent / full):.0f}% of the epochs" if full else "-"),
    ]
    finite = [t for t in trials if t.value is not None and math.isfinite(t.value)]
    if finite:
        best = min(finite, key=lambda t: t.value)
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best.params.items())
        rows.append(("best result", f"normalised loss {best.value:.4f} (trial {best.number}: "
                                    f"{params})"))
    print(f"study {study.study_name}")
    for key, value in rows:
        print(f"  {key:<15} {value}")


def _check_output(path: str, suffixes: tuple[str, ...]) -> None:
    """An output path that can be written, checked before the (slow) work that fills it."""
    out = Path(path)
    if out.suffix not in suffixes:
        raise CLIError(f"Cannot tell the format of -o {path!r}: name it "
                       f"{' or '.join('FILE' + s for s in suffixes)}.")
    if out.is_dir():
        raise CLIError(f"-o {path!r} is a directory; name a file in it.")
    if not out.absolute().parent.is_dir():
        raise CLIError(f"-o {path!r}: directory {str(out.parent)!r} does not exist; create it "
                       "first.")


def _failures(trials, grace_period: int | None = None) -> str:
    """What became of the failed trials: killed or interrupted (retried, to be retried, or a
    retry itself, not retried again) or an error, with the first."""
    from lepredict.records import retry_of
    from lepredict.sweep import interrupted_here, retries_used_up

    fail = [t for t in trials if t.state.name == "FAIL"]
    retried_as = {retry_of(t): t.number for t in trials if retry_of(t) is not None}
    errors = [t for t in fail if "lepredict:error" in t.user_attrs]
    stopped = [t for t in fail if "lepredict:error" not in t.user_attrs]

    def how(group) -> str:
        kinds = {"interrupted" if interrupted_here(t) else "killed" for t in group}
        return " or ".join(sorted(kinds))

    retried = [t for t in stopped if t.number in retried_as]
    again = [t for t in stopped if t.number not in retried_as and retries_used_up(t, trials)]
    later = [t for t in stopped if t.number not in retried_as and t not in again]
    parts = []
    if retried:
        parts.append(f"{_numbers([t.number for t in retried])} {how(retried)}, retried as "
                     f"{', '.join(str(retried_as[t.number]) for t in retried[:6])}")
    if later and grace_period:
        parts.append(f"{_numbers([t.number for t in later])} {how(later)}, to be run again by "
                     f"the next sweep started {grace_period} s or more after they stopped")
    elif later:
        parts.append(f"{_numbers([t.number for t in later])} {how(later)}, not run again (this "
                     "storage keeps no heartbeats: a database storage retries such trials)")
    if again:
        parts.append(f"{_numbers([t.number for t in again])} {how(again)}, not retried (a "
                     "configuration is retried once after a kill)")
    if errors:
        first = errors[0]
        parts.append(f"{_numbers([t.number for t in errors])} raised an error (trial "
                     f"{first.number}: {first.user_attrs['lepredict:error'][:200]})")
    return f"{len(fail)}: " + "; ".join(parts)


def _check_readable(study, command: str, *, finished_only: bool = False) -> None:
    """A study ``export`` and ``analyze`` can read: one objective, something reported, and (for
    an export) no trial still running unless only the finished ones are asked for."""
    from lepredict.records import FINISHED_STATES, retry_of

    trials = study.get_trials(deepcopy=False)
    name = study.study_name
    if len(study.directions) > 1:
        raise CLIError(f"Study {name!r} has {len(study.directions)} objectives "
                       f"({', '.join(d.name.lower() for d in study.directions)}); lepredict "
                       f"{command} reads single-objective studies only: give it a study with "
                       "one direction (optuna.visualization.plot_pareto_front shows this one).")
    if not trials:
        raise CLIError(f"Study {name!r} has no trials yet, so nothing to {command}; run "
                       f"`lepredict sweep --study-name {name}` or your own loop first.")
    if not any(t.intermediate_values or t.value is not None for t in trials):
        raise CLIError(f"None of the {len(trials)} trials of study {name!r} reported a value "
                       f"(trial.report) or finished with one, so there is nothing to {command}; "
                       "report the validation loss with trial.report(loss, epoch).")
    running = [t.number for t in trials if t.state.name == "RUNNING"]
    waiting = [t for t in trials if t.state.name == "WAITING"]
    if command == "export" and (running or waiting) and not finished_only:
        done = sum(t.state.name in FINISHED_STATES for t in trials)
        # A retry is queued by the sweep for a trial a kill or Ctrl-C stopped: not the user's.
        retries = [t for t in waiting if retry_of(t) is not None]
        queued = [t.number for t in waiting if t not in retries]
        unfinished = ([f"{_numbers(running)} running"] if running else []) + (
            [f"{_numbers(queued)} enqueued, not started"] if queued else []) + (
            [f"{_numbers([t.number for t in retries])} waiting to run stopped trial"
             f"{'s' if len(retries) > 1 else ''} "
             f"{', '.join(str(retry_of(t)) for t in retries[:6])} again "
             "when the sweep resumes"] if retries else [])
        raise CLIError(f"Study {name!r} has unfinished trials ({'; '.join(unfinished)}); "
                       "export it when they have finished, or pass --finished-only to export "
                       f"the {done} finished trial{'s' if done != 1 else ''}.")


def _cmd_export(args) -> int:
    from lepredict.sweep import export_trials

    _check_output(args.output, (".parquet", ".csv"))
    study = _open_study(args.storage, args.study_name)
    _check_readable(study, "export", finished_only=args.finished_only)
    _check_steps_per_epoch(args.steps_per_epoch)
    try:
        n = export_trials(study, args.output, finished_only=args.finished_only,
                          steps_per_epoch=args.steps_per_epoch)
    except OSError as err:
        raise CLIError(f"Cannot write -o {args.output!r}: {err.strerror or err}.") from None
    except ValueError as err:
        raise CLIError(str(err)) from None
    print(f"wrote {n} trials to {args.output}")
    _note_report_steps(study, args.steps_per_epoch)
    return 0


def _check_steps_per_epoch(value: int | None) -> None:
    if value is not None and value < 1:
        raise CLIError(f"--steps-per-epoch must be a positive integer, got {value}: the report "
                       "steps in one epoch.")


def _add_steps_per_epoch_arg(p) -> None:
    p.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                   help="for a loop of your own that reports by iteration: the report steps "
                   "in one epoch, so losses and spectra are read at epochs' ends (default: "
                   "what its LyapunovPruner was given, else 1)")


def _note_report_steps(study, given: int | None, command: str = "export") -> None:
    """After reading a loop of one's own by epoch (export, analyze): a note where its report
    steps look like iterations read as epochs, or where spectra or reports fall at no epoch's
    end for the steps per epoch it was read with (they are left out)."""
    from lepredict.records import RUN, SETUP, SPECTRUM, attrs_by_step, steps_per_epoch_by_trial

    trials = study.get_trials(deepcopy=False)
    own = [t for t in trials if t.intermediate_values and RUN not in t.user_attrs]
    if not own or study.user_attrs.get(SETUP, {}).get("task"):
        return
    again = f"{command} again with --steps-per-epoch"
    spe = steps_per_epoch_by_trial(trials, given)  # as the export read them
    off = [t.number for t in own if spe[t.number] > 1
           and not any(s and s % spe[t.number] == 0 for s in t.intermediate_values)
           and len(t.intermediate_values) > 1]
    if off:
        t = next(t for t in own if t.number == off[0])
        print(f"note: {_numbers(off, 'trial')} reported at no epoch's end after the first (trial "
              f"{t.number}: steps {_steps_list(t.intermediate_values)}; steps per epoch "
              f"{spe[t.number]}), so their rows hold epoch 0 alone; report at the end of each "
              f"epoch (step = epoch * steps per epoch), or {again} set to your reporting "
              "interval (each report then counts as an epoch).", file=sys.stderr)
        return
    dropped = {t.number: sorted(s for s in attrs_by_step(t.user_attrs, SPECTRUM)
                                if s % spe[t.number]) for t in own}
    dropped = {n: steps for n, steps in dropped.items() if steps}
    if dropped:
        first = next(iter(dropped))
        print(f"note: spectra of {_numbers(list(dropped), 'trial')} were given at steps that end "
              f"no epoch (trial {first}: {_steps_list(dropped[first])}, with "
              f"{spe[first]} steps per epoch) and are left out; if an epoch is another number "
              f"of steps, {again} N.", file=sys.stderr)
        return
    # A loop counting steps from 0 (epoch * N + batch) ends its last epoch at epochs * N - 1:
    # read by epoch, its last epoch's loss is the one at the end of the epoch before.
    short = [t for t in own if t.state.name == "COMPLETE" and spe[t.number] > 1
             and t.last_step is not None and t.last_step % spe[t.number]]
    if short:
        t = short[0]
        end = t.last_step // spe[t.number] * spe[t.number]
        print(f"note: {_numbers([s.number for s in short], 'trial')} ended at a step that ends no "
              f"epoch (trial {t.number}: {t.last_step}, with {spe[t.number]} steps per epoch), so "
              f"their final loss is read at the last epoch's end (trial {t.number}: step {end}) "
              "and the steps after it are left out; report the end of epoch e at step "
              f"e * {spe[t.number]} (the iterations done, counted from 1).",
              file=sys.stderr)
        return
    steps = sorted({s for t in own if spe[t.number] == 1 for s in t.intermediate_values if s})
    interval = math.gcd(*steps) if len(steps) > 1 else 1
    if interval > 1:
        print(f"note: the trials report at steps 0, {_steps_list(steps)}, all multiples of "
              f"{interval}, read here as epochs; if they count iterations, {again} N "
              "(the iterations in one epoch, as LyapunovPruner(steps_per_epoch=N) takes it) "
              "so losses and spectra are read by epoch.", file=sys.stderr)


def _steps_list(steps) -> str:
    steps = sorted(steps)
    return ", ".join(map(str, steps[:4])) + (", ..." if len(steps) > 4 else "")


#: Columns every export has (``lepredict.sweep.trials_frame``) and every command reading one uses.
_EXPORT_COLUMNS = ("study", "state", "status", "final_normalised_loss", "val_loss")


def _read_data(paths: list[str]):
    """Exports named on the command line (globs already expanded by the shell), as one frame."""
    import glob

    import pandas as pd

    files = [f for p in paths for f in (sorted(glob.glob(p)) or [p])]
    frames = []
    for f in files:
        frame = _read_export(f, "--data")
        # Any CSV reads as a frame; one of something else would fail later as a KeyError.
        lacking = [c for c in _EXPORT_COLUMNS if c not in frame.columns]
        if lacking:
            raise CLIError(f"{f!r} is not a lepredict export: it has no column(s) {lacking}; "
                           "write exports with `lepredict export`.")
        frames.append(frame)
    if not frames:
        raise CLIError("No data: pass --data FILE [FILE ...].")
    return pd.concat(frames, ignore_index=True)


def _note_unknown_outcomes(*frames) -> None:
    """After a command that fitted or scored on ``frames``: how many finished trials it left
    out for want of a final loss (:func:`lepredict.features.unknown_outcomes`)."""
    from lepredict.features import unknown_outcomes

    unknown = sum(int(unknown_outcomes(f).sum()) for f in frames if f is not None)
    if unknown:
        print(f"note: {unknown} finished trial(s) have no final loss (losses given for the early "
              "epochs only, as in a maximised study) and were left out; give val_loss at the "
              "last epoch too to count them.", file=sys.stderr)


#: Fewer runs than this on either side of the threshold (trained, not) and ``fit`` says the
#: predictor it wrote rests on too few to be relied on.
FEW_RUNS = 20


def _cmd_fit(args) -> int:
    from lepredict.evaluation import N_BOOT, cross_validate
    from lepredict.predictor import DEFAULT_CUTOFF, SEARCH_GRID, StabilityPredictor

    frame = _read_data(args.data)
    # Model selection by grouped cross-validation (groups = study) over a small grid.
    grid = SEARCH_GRID if args.search else None
    fitted = []  # every budget's, before any is written: a refusal leaves nothing half done
    for budget in args.budgets:
        try:
            metrics = {}
            with warnings.catch_warnings():
                # A constant classifier is refused below; a fold's shows in its held-out AUROC.
                warnings.filterwarnings("ignore", "StabilityPredictor.fit: the classifier gives")
                model = StabilityPredictor(budget=budget, feature_sets=tuple(args.features),
                                           threshold=args.threshold, param_grid=grid).fit(frame)
                summary = model.training_summary_
                if summary["constant"]:
                    # Saved, it would prune every trial or none, on no evidence at all.
                    trained = round(summary["runs"] * summary["trainable_share"])
                    raise CLIError(
                        f"On {summary['runs']} runs ({trained} trained) the budget-{budget} "
                        "classifier learnt nothing: it gives every run the same P(trainable); "
                        "nothing was written. Fit on more runs (a few hundred; the shipped "
                        "predictors saw 1,504), or use them (model='default').")
                if not args.no_cv:
                    # Nested: each outer fold searches the grid on its own training runs, so
                    # the figures (and LyapunovPruner's default threshold) are not selected on
                    # the runs that score them.
                    metrics["held_out_configs"] = cross_validate(
                        frame, budget=budget, sets=args.features, scheme="configs",
                        threshold=args.threshold, param_grid=grid, n_boot=N_BOOT)
                    metrics["held_out_configs"]["nested"] = grid is not None
                    held = metrics["held_out_configs"]
                    if held["constant_folds"] == held["folds"]:
                        # The cut-off would be a quantile of those constants: refused, as a
                        # constant classifier is.
                        raise CLIError(
                            f"On {summary['runs']} runs the budget-{budget} classifier of every "
                            f"one of the {held['folds']} cross-validation folds gave all its "
                            "held-out runs one P(trainable) (too few runs once a fold is held "
                            "out): its held-out AUROC and pruning cut-off would describe no "
                            "model; nothing was written. Fit on more runs, or pass --no-cv "
                            f"(no held-out figures; the cut-off is then lepredict's default, {DEFAULT_CUTOFF:g}).")
                    model.prune_threshold_ = held["p_at_99_recall"]
        except ValueError as err:
            raise CLIError(str(err)) from None
        fitted.append((budget, model, metrics))
        held_out = metrics.get("held_out_configs", {})
        extra = ""
        if held_out.get("auroc") is not None:
            low, high = held_out["auroc_interval"]
            extra = f", held-out AUROC {held_out['auroc']:.3f} [{low:.3f}-{high:.3f}]"
        print(f"budget {budget}: fitted on {model.training_summary_['runs']} runs{extra}",
              flush=True)
    written = [model.save(f"{args.output}/budget-{budget}", metrics=metrics)
               for budget, model, metrics in fitted]
    print(f"wrote {', '.join(map(str, written))}")
    _note_unknown_outcomes(frame)
    runs = model.training_summary_["runs"]
    _note_few_runs("fitted on", runs, round(runs * model.training_summary_["trainable_share"]),
                   "the predictor rests on a handful of runs and its held-out AUROC is known "
                   "only roughly (see its interval); fit on more runs before pruning with it")
    return 0


def _note_few_runs(what: str, runs: int, trained: int, meaning: str) -> None:
    """A note where fewer than :data:`FEW_RUNS` runs trained, or did not."""
    if min(trained, runs - trained) < FEW_RUNS:
        print(f"note: {what} {runs} runs, {trained} of which trained: with fewer than "
              f"{FEW_RUNS} on either side, {meaning}.", file=sys.stderr)


def _write_table(table, path: str) -> None:
    try:
        if path.endswith(".json"):
            Path(path).write_text(_dumps(table.to_dict(orient="records"), indent=1) + "\n")
        else:
            table.to_csv(path, index=False)
    except OSError as err:
        raise CLIError(f"Cannot write -o {path!r}: {err.strerror or err}.") from None


def _cmd_evaluate(args) -> int:
    from lepredict.evaluation import SCHEMES, compare, format_groups, format_summary
    from lepredict.predictor import SEARCH_GRID

    if args.output is not None:
        _check_output(args.output, (".csv", ".json"))
    _check_int("--n-boot", args.n_boot, 0, "bootstrap resamples; 0 for none")
    if args.model is not None:
        given = [o for o, v in (("--holdout", args.holdout), ("--test-data", args.test_data),
                                ("--nested", args.nested), ("--schemes", args.schemes)) if v]
        if given:
            raise CLIError(f"{' and '.join(given)} choose(s) what the cross-validated comparison "
                           "holds out; with --model the data are scored as they are: drop "
                           f"{given[0]} or --model.")
        return _evaluate_model(args)
    frame = _read_data(args.data)
    test = _read_data(args.test_data) if args.test_data else None
    schemes = list(args.schemes) if args.schemes is not None else (
        [] if args.holdout or test is not None else list(SCHEMES))
    schemes += [f"holdout:{p}" for p in args.holdout or []]
    try:
        table = compare(frame, budgets=args.budgets, feature_sets=args.features,
                        schemes=schemes, test=test, baseline=args.baseline,
                        threshold=args.threshold, n_boot=args.n_boot,
                        param_grid=SEARCH_GRID if args.nested else None,
                        random_state=args.seed, progress=not args.json, n_jobs=args.n_jobs)
    except ValueError as err:
        raise CLIError(str(err)) from None
    _note_unknown_outcomes(frame, test)
    if args.output is not None:
        _write_table(table, args.output)
    if args.json:
        print(_dumps(table.to_dict(orient="records"), indent=1))
        return 0
    for metric in ("auroc", "spearman"):
        print(format_summary(table, metric, baseline=args.baseline))
    for metric in ("auroc", "spearman"):
        print(format_groups(table, metric, baseline=args.baseline))
    if args.output is not None:
        print(f"every row, with AP, Brier and MAE: {args.output}")
    return 0


def _evaluate_model(args) -> int:
    """Metrics of a saved predictor on the data as they are, with bootstrap intervals."""
    from lepredict.evaluation import (bootstrap_counts, config_groups, interval,
                                      weighted_auroc, weighted_spearman)
    from lepredict.features import completed_runs, outcomes
    from lepredict.predictor import ModelFileError, load_models, metric_table, resolve_model

    frame = _read_data(args.data)
    try:
        models = load_models(resolve_model(args.model), trust=args.trust_model)
    except ModelFileError as err:
        raise CLIError(str(err)) from None
    runs = completed_runs(frame)
    if runs.empty:
        raise CLIError("No finished trial with a final outcome in --data (pruned, failed and "
                       "running trials have none, nor finished ones whose losses were given for "
                       "the early epochs only): nothing to score the model on.")
    weights = bootstrap_counts(runs["task"].astype(str), config_groups(runs),
                               n_boot=args.n_boot, random_state=args.seed)
    rows = []
    for budget, model in sorted(models.items()):
        try:
            out = outcomes(runs, threshold=args.threshold if args.threshold else model.threshold)
        except ValueError as err:
            raise CLIError(str(err)) from None
        proba, loss = model.predict_proba(runs)[:, 1], model.predict_loss(runs)
        m = metric_table(out["trainable"], proba, out["final_loss"], loss)
        m["trained"] = int(out["trainable"].sum())
        m["auroc_low"], m["auroc_high"] = interval(
            weighted_auroc(out["trainable"], proba, weights))
        m["spearman_low"], m["spearman_high"] = interval(
            weighted_spearman(out["final_loss"], loss, weights))
        rows.append({"budget": budget, **m, "n_boot": args.n_boot})
    _note_unknown_outcomes(frame)
    fitted_on = {str(name) for predictor in models.values()
                 for name in (getattr(predictor, "training_summary_", None) or {}).get("studies",
                                                                                        [])}
    seen = sorted(fitted_on & set(runs["study"].astype(str))) if "study" in runs else []
    if seen:
        which = "study" if len(seen) == 1 else "studies"
        print(f"note: the model was fitted on the runs of {which} {', '.join(map(repr, seen))}, "
              "which --data holds too: on those its figures are not held out (and read high).",
              file=sys.stderr)
    _note_other_horizon(models, runs)
    pruned = int((frame["state"] == "PRUNED").sum()) if "state" in frame else 0
    if pruned:
        print(f"note: {pruned} pruned trial(s) were left out (a pruned run has no final outcome):"
              f" the {len(runs)} scored are the runs a pruner kept, not a random sample of the "
              "configurations, and score the model on the easier part; score on runs trained "
              "to the end (a study without pruning).", file=sys.stderr)
    fewest = min(rows, key=lambda r: min(r["trained"], r["n"] - r["trained"]))
    _note_few_runs("scored on", fewest["n"], fewest["trained"],
                   "the AUROC ranks a handful of runs, and a bootstrap interval, which only "
                   "resamples them, can look narrow (one trained run gives [1, 1] or [0, 0]); "
                   "score on more runs")
    if args.output is not None:
        import pandas as pd

        _write_table(pd.DataFrame(rows), args.output)
    if args.json:
        print(_dumps(rows, indent=1))
        return 0
    print(f"{'budget':>6} {'runs':>6} {'trained':>7} {'AUROC [95%]':>22} {'AP':>6} {'Brier':>6} "
          f"{'Spearman [95%]':>22} {'MAE':>6}")

    def cell(r, k):
        low, high = r[f"{k}_low"], r[f"{k}_high"]
        text = f"{r[k]:.3f}"
        return text + (f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) else "")

    for r in rows:
        print(f"{r['budget']:>6} {r['n']:>6} {r['trained']:>7} {cell(r, 'auroc'):>22} "
              f"{r['ap']:>6.3f} {r['brier']:>6.3f} {cell(r, 'spearman'):>22} {r['mae']:>6.3f}")
    if args.n_boot:
        print(f"95% percentile intervals from {args.n_boot} bootstrap resamples of "
              "configurations within tasks.")
    return 0


def _note_other_horizon(models: dict, runs) -> None:
    """A note where the scored runs trained for more or fewer epochs than the model's: its
    P(trainable) is of training within its own horizon, so a run that needed longer (or had
    less time) counts against it."""
    trained = {(getattr(m, "training_summary_", None) or {}).get("epochs")
               for m in models.values()} - {None}
    if len(trained) != 1 or "epochs" not in runs:
        return
    model_epochs = trained.pop()
    horizons = sorted({int(e) for e in runs["epochs"].dropna()} - {int(model_epochs)})
    if horizons:
        print(f"note: the model predicts training within {model_epochs} epochs, and --data "
              f"holds runs of {_steps_list(horizons)} epochs: where they differ, a run that trained only later "
              "(or would have, given longer) counts against it; LyapunovPruner scales its "
              "cut-off for such a study, this score does not.", file=sys.stderr)


def _load_predictors(name: str, trust: bool = False):
    from lepredict.predictor import ModelFileError, load_models, resolve_model

    try:
        return load_models(resolve_model(name), trust=trust)
    except ModelFileError as err:
        raise CLIError(str(err)) from None


def _read_config_file(path: str) -> dict:
    import tomllib

    try:
        text = open(path, "rb").read()
    except OSError as err:
        raise CLIError(f"Cannot read --config {path!r}: {err.strerror}.") from None
    try:
        return json.loads(text) if path.endswith(".json") else tomllib.loads(text.decode())
    except UnicodeDecodeError:
        raise CLIError(f"--config {path!r} is {_binary_file(path)[3:]}, not a configuration: "
                       "give the run's hyperparameters as JSON or TOML ({\"arch\": \"gru\", "
                       "\"hidden\": 64, ...}), or as --arch/--hidden/... options.") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise CLIError(f"--config {path!r} is not valid {'JSON' if path.endswith('.json') else 'TOML'}:"
                       f" {err}") from None


def _binary_file(path: str) -> str:
    """What a file that is not text seems to be, for a message: "is ..."."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            return "is a zip archive (a torch.save checkpoint?)"
        if head[:1] == b"\x80":
            return "is a pickle (a torch.save checkpoint or a joblib file?)"
    return "is a binary file"


_SPECTRUM_FORMAT = ("a run record from `lepredict spectrum --json`, or {\"0\": {\"mean\": "
                    "[...], \"std\": [...]}, \"1\": ..., \"val_loss\": [...]}")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (``json`` would keep the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _epoch_key(key: str) -> int | None:
    """The epoch a spectrum key names: ``"3"`` -> 3; None for a key that is no number at all.
    A number not written plainly (``"03"``, ``"-1"``, ``"٣"``) is refused: ``int()`` would read
    ``"00"`` and ``"0"`` as one epoch, the one given last silently winning."""
    import re

    if re.fullmatch(r"0|[1-9][0-9]*", key, re.ASCII):
        return int(key)
    if re.fullmatch(r"\s*[+-]?\d+\s*", key):  # \d: any script's digits
        raise ValueError(f"key {key!r} is not an epoch as the format writes one: epochs are "
                         "0, 1, 2, ... in ASCII digits without sign or leading zeros, each "
                         "given once")
    return None


def _loss_values(values) -> list[float]:
    """``"val_loss"`` as floats: each a loss (>= 0), or a diverged run's non-finite loss as
    lepredict writes it: ``null`` (``--json``), ``"inf"``/``"nan"`` (the study's records,
    ``lepredict.records.jsonable``), or Python's ``Infinity``/``NaN`` tokens."""
    problem = ("\"val_loss\" must be a list of validation losses, one per epoch from 0: numbers "
               ">= 0, or null (also \"inf\", \"nan\") for a diverged run's loss that was not "
               "finite")
    if not isinstance(values, list):
        raise ValueError(f"{problem}; got {json.dumps(values)[:40]}.")
    out = []
    for epoch, v in enumerate(values):
        if v is None:
            v = math.nan
        elif isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                v = None
            if v is None or math.isfinite(v):  # "1.5" is a hand-typed number, not a marker
                raise ValueError(f"{problem}; val_loss[{epoch}] is {values[epoch]!r}.")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{problem}; val_loss[{epoch}] is {json.dumps(v)[:40]}.")
        v = float(v)
        if v < 0:
            raise ValueError(f"val_loss[{epoch}] is {v:g}, and a loss is never negative: give "
                             "the validation losses themselves (>= 0; not a log-likelihood or "
                             "a change in loss).")
        out.append(v)
    return out


def _positive_chance_loss(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise CLIError(f"{where} must be a positive finite number: the loss of the best "
                       "constant prediction, in the units of \"val_loss\" (1.0 if the losses "
                       f"are already normalised); got {json.dumps(value)[:40]}.")
    return float(value)


def _read_spectrum_file(path: str, *, chance_loss: float | None) -> dict:
    """Spectra measured elsewhere, checked: a prediction from a file with a bad key or a
    negative loss would look as confident as any other (:func:`_check_spectrum_losses` checks
    the epochs). ``chance_loss``: ``--chance-loss``, if given; the file's must agree with it."""

    def bad(problem: str) -> CLIError:
        return CLIError(f"--spectrum {path!r}: {problem}")

    try:
        data = json.loads(Path(path).read_text(), object_pairs_hook=_unique_keys)
    except OSError as err:
        raise bad(f"cannot read it ({err.strerror or err}).") from None
    except _DuplicateKey as err:
        raise bad(f"the key {err.args[0]!r} is given twice in one object; give each key "
                  "once.") from None
    except UnicodeDecodeError:
        raise bad(f"{_binary_file(path)}, not JSON: --spectrum reads spectra, not models; "
                  f"expected {_SPECTRUM_FORMAT}, an epoch's \"mean\" and \"std\" being "
                  "those of lepredict.lyapunov_spectrum(rnn, probe).") from None
    except json.JSONDecodeError as err:
        raise bad(f"not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise bad(f"holds a JSON {type(data).__name__}, not an object; expected "
                  f"{_SPECTRUM_FORMAT}.")
    try:
        if "spectra" in data:
            raw = data["spectra"]
            epochs = {}
            if isinstance(raw, dict):
                for key in raw:
                    epoch = _epoch_key(key)
                    if epoch is None:
                        raise ValueError(f"spectrum key {key!r} is not an epoch (0, 1, ...)")
                    epochs[key] = epoch
        else:
            raw = data
            epochs = {k: e for k in data if (e := _epoch_key(k)) is not None}
    except ValueError as err:
        raise bad(f"{err}.") from None
    if not isinstance(raw, dict) or not epochs:
        raise bad(f"holds no spectra; expected {_SPECTRUM_FORMAT}.")

    def numbers(where: str, values) -> list[float]:
        # null stands for NaN: strict JSON (`lepredict spectrum --json`) writes it so.
        if not isinstance(values, list) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                for v in values):
            raise bad(f"{where} must be a list of numbers.")
        return [math.nan if v is None else float(v) for v in values]

    spectra = {}
    for key, epoch in epochs.items():
        spec = raw[key]
        if not isinstance(spec, dict) or "mean" not in spec or "std" not in spec:
            raise bad(f"the spectrum of epoch {key} needs \"mean\" and \"std\" lists.")
        mean, std = numbers(f"epoch {key} mean", spec["mean"]), numbers(f"epoch {key} std",
                                                                         spec["std"])
        if not mean or len(mean) != len(std):
            raise bad(f"epoch {key}: \"mean\" and \"std\" must be non-empty and of one length, "
                      f"got {len(mean)} and {len(std)}.")
        share = spec.get("diverged", 0.0)  # optional: the share of diverged trajectories
        if not (isinstance(share, (int, float)) and not isinstance(share, bool)
                and 0.0 <= share <= 1.0):
            raise bad(f"epoch {key}: \"diverged\" is the share of diverged trajectories, a "
                      f"number in [0, 1], got {share!r}.")
        # The checks report_spectrum makes (a NaN exponent only where all trajectories
        # diverged, a known convention, n not below the exponents given), and its order:
        # descending, the spread permuted with it.
        try:
            checked = spectrum_dict(mean, std, diverged=share, state_size=spec.get("n"),
                                    convention=spec.get("convention"),
                                    trajectories=spec.get("trajectories"))
        except (TypeError, ValueError) as err:
            raise bad(f"epoch {key}: {err}") from None
        spectra[epoch] = {**spec, "mean": checked["mean"], "std": checked["std"],
                          "diverged": float(share)}
    status = data.get("status", "ok")
    if status not in ("ok", "diverged"):
        raise bad(f"\"status\" must be \"ok\" or \"diverged\", got {status!r}.")
    try:
        val = _loss_values(data.get("val_loss", []))
    except ValueError as err:
        raise bad(str(err)) from None
    # The losses' scale, named and meant as report_spectrum's chance_loss: the file's own, so
    # that normalised losses (chance_loss 1.0) or another task's are not read as this task's.
    given = None
    if "chance_loss" in data:
        given = _positive_chance_loss(data["chance_loss"], f"--spectrum {path!r}: "
                                      "\"chance_loss\"")
        if chance_loss is not None and given != chance_loss:
            raise bad(f"\"chance_loss\" is {given:g} but --chance-loss is {chance_loss:g}: "
                      "give the losses' scale once (drop --chance-loss, or fix the file).")
    config = data.get("config")
    if config is not None and not isinstance(config, dict):
        raise bad("\"config\" must be an object of hyperparameters.")
    task = data.get("task")
    task_name = task.get("name") if isinstance(task, dict) else None
    return {"spectra": spectra, "val_loss": val, "status": status, "config": config,
            "chance_loss": given, "task": task_name if isinstance(task_name, str) else None}


def _check_spectrum_losses(path: str, data: dict, budget: int, *, uses_loss: bool,
                           chance_loss: float) -> None:
    """Whether the file covers what the predictor reads, and whether its losses say the run
    diverged (``data["status"]`` becomes ``"diverged"`` then), by ``chance_loss``."""
    from lepredict.train import diverged_loss

    def bad(problem: str) -> CLIError:
        return CLIError(f"--spectrum {path!r}: {problem}")

    spectra, val = data["spectra"], data["val_loss"]
    # A diverged run has nothing from the epoch it diverged in on: its missing epochs are
    # features of their own. Any other run must cover every epoch the predictor reads.
    if data["status"] != "diverged":
        missing = [e for e in range(budget + 1) if e not in spectra]
        if missing:
            raise bad(f"no spectrum for epoch(s) {missing}; the budget-{budget} predictor reads "
                      f"epochs 0..{budget}: measure them, or pass a smaller --budget.")
        if uses_loss and len(val) < budget + 1:
            raise bad(f"the predictor reads the validation loss of epochs 0..{budget}, and "
                      f"\"val_loss\" has {len(val)}: add them, or use a model fitted on "
                      "spectra alone.")
        for epoch, loss in enumerate(val[:budget + 1]):
            if not math.isfinite(loss):
                raise bad(f"val_loss[{epoch}] is {loss}: a run whose loss is not finite "
                          "diverged; mark it \"status\": \"diverged\" or fix the value.")
        if any(diverged_loss(v, chance_loss) for v in val[:budget + 1]):
            data["status"] = "diverged"  # lepredict.train's rule, as a live run would
    elif 0 not in spectra:
        raise bad("no spectrum for epoch 0 (the initialisation), which every predictor reads.")


def _cmd_predict(args) -> int:
    """Train for the early budget (or read spectra measured elsewhere) and predict."""
    from lepredict.sweep import record_frame
    from lepredict.train import RunConfig, RunRecord, diverged_loss, train_run

    t0 = time.perf_counter()
    if args.chance_loss is not None:
        if not args.spectrum:
            raise CLIError("--chance-loss is the scale of the losses in a --spectrum file; a run "
                           "trained here is measured in its task's own: drop --chance-loss, or "
                           "add --spectrum FILE.")
        _positive_chance_loss(args.chance_loss, "--chance-loss")
    # The file before the model, which takes seconds to load: a typo in it is said at once.
    data = _read_spectrum_file(args.spectrum, chance_loss=args.chance_loss) if args.spectrum \
        else None
    models = _load_predictors(args.model, args.trust_model)
    budget = max(models) if args.budget is None else args.budget
    if budget not in models:
        raise CLIError(f"The model has no predictor for budget {budget}; it has {sorted(models)}: "
                       "pass --budget with one of those.")
    model = models[budget]
    options = _task_options(args.task_option)
    variant = None
    if not args.task_option:
        # The predictor knows the dynamics of the variant it was trained on (digits read row by
        # row, T=8), not the task's defaults (pixel by pixel, T=64, and eight times slower).
        variant = _trained_variant(model, args.task)
        options = variant or {}
    task = _get_task(args.task, options)
    uses_hparams = "hparams" in model.feature_sets
    config_from = "--config" if args.config else "options"
    chance, chance_from = task.chance_loss, "task"
    if data is not None:
        if data["chance_loss"] is not None:
            chance, chance_from = data["chance_loss"], "file"
        elif args.chance_loss is not None:
            chance, chance_from = args.chance_loss, "--chance-loss"
        elif data["task"] is not None and data["task"] not in (args.task, task.name):
            raise CLIError(f"--spectrum {args.spectrum!r}: the record is of task "
                           f"{data['task']!r}, read here as --task {args.task!r}, whose chance "
                           f"loss ({task.chance_loss:.4g}) would scale its losses: pass --task "
                           f"{data['task']}, or --chance-loss.")
        _check_spectrum_losses(args.spectrum, data, budget, uses_loss="loss" in
                               model.feature_sets, chance_loss=chance)
        if data["config"]:
            config, config_from = _completed_config(
                data["config"], f"the \"config\" of --spectrum {args.spectrum!r}", args), "file"
        elif args.config:
            config = _completed_config(_read_config_file(args.config),
                                       f"--config {args.config!r}", args)
        else:
            config = _config_from_args(args).to_dict()
        named = {"arch", "hidden", "layers"} & getattr(args, "given", set())
        if config_from != "options" or named:
            _check_spectrum_sizes(args.spectrum, data["spectra"], config,
                                  defaults=set() if config_from != "options"
                                  else {"arch", "hidden", "layers"} - named)
        else:
            sizes = sorted({len(spec["mean"]) for spec in data["spectra"].values()
                            if spec.get("n") is None})
            if sizes:
                # Nothing says what network they are of: leading exponents would pass as whole.
                print(f"note: --spectrum {args.spectrum!r} gives no state size (\"n\"), so its "
                      f"{' or '.join(map(str, sizes))} exponents are read as whole spectra; if "
                      "they are the leading ones of a larger state, give \"n\" and \"sum\" in "
                      "the file, or the network's --arch/--hidden/--layers.", file=sys.stderr)
        rec = RunRecord(config=config, task={"name": task.name}, val_loss=data["val_loss"],
                        spectra=data["spectra"], status=data["status"], epochs=budget)
        measured = 0.0
    else:
        _check_int("--probe-size", args.probe_size, 1, "validation sequences the spectrum "
                   "averages over")
        _check_probe_size(args.probe_size, task)
        _check_device(args.device)
        if args.config:
            config = RunConfig.from_dict(_completed_config(_read_config_file(args.config),
                                                           f"--config {args.config!r}", args))
        else:
            config = _config_from_args(args)
        rec = train_run(config, task, epochs=budget, le_epochs=range(budget + 1),
                        device=args.device, probe_size=args.probe_size)
        measured = rec.wall_time
    # Spectra from a file with no configuration: a predictor of spectra and losses alone read
    # none, so none is shown; one that reads hyperparameters read the options' (and defaults).
    shown_config = rec.config if (not args.spectrum or config_from == "file" or uses_hparams) \
        else None
    frame = record_frame(rec, task)
    frame["chance_loss"] = chance  # the features divide the losses by it
    try:  # a partial spectrum with fewer exponents than the features read, say
        p = float(model.predict_proba(frame)[0, 1])
        loss, low, high = (float(v[0]) for v in model.predict_loss(frame, interval=True))
        drivers = [(name, delta, _feature_words(name)) for name, delta in
                   model.explain(frame, top=5)[0]]
    except ValueError as err:
        raise CLIError(f"--spectrum {args.spectrum!r}: {err}" if args.spectrum
                       else str(err)) from None
    diverged = rec.status == "diverged"
    result = {
        # A run that diverged is labelled not trainable (lepredict.train), whatever P says.
        "p_trainable": p, "trainable": p >= model.cutoff and not diverged,
        "above_cutoff": p >= model.cutoff, "cutoff": model.cutoff,
        "final_loss": loss, "final_loss_interval":
        [low, high], "budget": budget, "status": rec.status, "drivers": drivers,
        "task": task.name, "task_options": task.options,
        "task_variant": "trained" if variant else ("given" if args.task_option else "default"),
        "config": shown_config, "config_from": None if shown_config is None else config_from,
        "chance_loss": chance, "chance_loss_from": chance_from, "train_seconds": measured,
        "seconds": time.perf_counter() - t0,
    }
    if args.json:
        print(_dumps(result))
        return 0
    why = {"trained": "the variant the predictor was trained on",
           "given": "as given by --task-option",
           "default": "the task's defaults: the predictor has no record of a variant of it"}
    # A spectrum file with its own chance loss uses nothing of the task.
    task_used = data is None or chance_from == "task"
    if task_used:
        print(f"task {args.task} {_options_text(task.options)} (T={task.seq_len}; "
              f"{why[result['task_variant']]})")
    if shown_config is not None:
        c = shown_config
        # torch's default initialisation has no scale: init_scale is not read.
        scale = "" if c["init"] == "default" else f" {c['init_scale']:g}"
        line = (f"{c['arch'].upper()} N={c['hidden']} x {c['layers']} layer(s), lr {c['lr']:g}, "
                f"init {c['init']}{scale}, {c['optimizer']}, batch {c['batch_size']}"
                + (f", clip {c['clip']:g}" if c.get("clip") else "")
                + (f", weight decay {c['weight_decay']:g}" if c.get("weight_decay") else ""))
        if args.spectrum and config_from == "file":
            line += " (the file's \"config\"" + (", completed by the options given)" if set(
                getattr(args, "given", ())) - set(data["config"]) else ")")
        elif args.spectrum and config_from == "--config":
            line += f" (from --config {args.config}: the file has no \"config\")"
        elif args.spectrum:
            read = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in c.items() if k != "seed"
                            and not (k == "init_scale" and c["init"] == "default"))
            line = (f"hyperparameters assumed: {read} (the file has no \"config\"; these are "
                    "--arch, --hidden, --lr... and their defaults: give the run's own with "
                    "those options, --config FILE, or a \"config\" object in the file)")
        print(line)
    if args.spectrum:
        scale = {"file": "the file's \"chance_loss\"", "--chance-loss": "--chance-loss",
                 "task": f"task {task.name}'s: for normalised losses, or another task's, give "
                 "\"chance_loss\" in the file or --chance-loss"}[chance_from]
        print(f"val_loss divided by the chance loss {chance:.4g} ({scale})")
    if diverged:
        # The first validation loss that says so; with none, the training loss broke in the
        # epoch after the last validated one (train_run stops before validating it).
        broke = next((e for e, v in enumerate(rec.val_loss)
                      if diverged_loss(v, chance)), len(rec.val_loss))
        broke = min(broke, budget)
        print(f"diverged {'at initialisation' if broke == 0 else f'in epoch {broke}'} of "
              f"{budget}: not trainable, whatever P(trainable) ({p:.3f}) says: a run that "
              "diverges is labelled not trainable")
    else:
        # P at or above the cut-off means "not pruned", not "will train": the cut-offs are low
        # (0.03-0.15), so a run kept with P = 0.15 more likely fails than trains.
        verdict = (f"{'at or above' if p >= model.cutoff else 'below'} the pruning cut-off "
                   f"{model.cutoff:.3f}")
        print(f"P(trainable) = {p:.3f}  ({verdict}; status after {budget} epoch(s): "
              f"{rec.status})")
    print(f"cut-off {model.cutoff:.3f}: the predictor's own, the P(trainable) LyapunovPruner "
          "prunes below")
    print(f"predicted final normalised loss {loss:.3f}  (10-90%: {low:.3f} - {high:.3f}"
          + (f"; trainable below {task.threshold:g})" if task_used else ")"))
    print("what drove it (P minus P with that feature at a typical value):")
    for name, delta, words in drivers:
        print(f"  {name:<22} {delta:+.3f}  {words}")
    print(f"took {result['seconds']:.1f} s ({measured:.1f} s training and spectra)")
    return 0


def _check_spectrum_sizes(path: str, spectra: dict, config: dict, *,
                          defaults: set[str] = frozenset()) -> None:
    """Spectra of a file without their state size ("n") are read as whole: where the network
    they are said to be of (a "config", --config or --arch/--hidden/--layers) has a larger
    state, they are its leading exponents, and read as whole they would mislead the features.
    ``defaults``: which of arch, hidden and layers are the options' defaults, not the user's."""
    def shown(name: str, text: str) -> str:
        return f"{text} (the default --{name})" if name in defaults else text

    for epoch, spec in sorted(spectra.items()):
        both = config["arch"] == "lstm" and spec.get("convention") != "hidden"
        n = state_size(config["arch"], config["hidden"], config["layers"],
                       lstm_state="full" if both else "hidden")
        k = len(spec["mean"])
        lstm = " (h and c of each layer)" if both else ""
        arch = config["arch"].upper()
        network = (f"{'an' if arch[0] in 'AEFHILMNORSX' else 'a'} {shown('arch', arch)} of "
                   f"{shown('hidden', str(config['hidden']))} units x "
                   f"{shown('layers', str(config['layers']))} layer(s)")
        given = spec.get("n")
        if given is not None and int(given) != n:
            # The features read the state size and the mean of all exponents with the
            # hyperparameters: of two different networks, they describe neither.
            raise CLIError(
                f"--spectrum {path!r}: epoch {epoch}'s spectrum is of a state of {int(given)} "
                f"(its \"n\"), but {network} has a state of {n}{lstm}: give the measured "
                "network's own --arch/--hidden/--layers (or --config), or a spectrum of this "
                "network.")
        if given is None and k != n:
            raise CLIError(
                f"--spectrum {path!r}: epoch {epoch} holds {k} exponents, but {network} has "
                f"a state of {n}{lstm}: "
                f"give all {n}, or with the leading ones the state size as \"n\": {n} (and "
                "the sum of all exponents as \"sum\"), or the network's own "
                "--arch/--hidden/--layers.")


def _feature_words(name: str) -> str:
    from lepredict.features import describe_feature

    try:
        return describe_feature(name)
    except ValueError:  # a model from another version, with features this one does not name
        return ""


#: What `lepredict analyze` cannot do without, by option: the trial, its state, its value (the
#: report reads the rest, from val_loss to the spectra, where an export has it). "value" may be
#: missing where the trials' normalised losses rank them instead (_ranked_by_losses).
_REPORT_COLUMNS = {"--data": ("number", "state", "value"),
                   "--reference": ("state", "final_normalised_loss", "param_*")}
_BY_LOSSES = ("val_loss", "chance_loss", "final_normalised_loss")
_NEEDS = {"--data": "number, state and value (a minimised study may give val_loss, chance_loss "
                    "and final_normalised_loss, for every trial, instead of value)",
          "--reference": "state, final_normalised_loss and a param_NAME column per "
                         "hyperparameter"}


def _ranked_by_losses(frame) -> bool:
    """Whether the report ranks the trials by their normalised losses, needing no "value":
    a minimised study whose trials with losses all have a chance loss, and whose finished trials
    all have a final normalised loss (lepredict.report._read)."""
    import pandas as pd

    if not set(_BY_LOSSES) <= set(frame.columns) or (
            "direction" in frame and (frame["direction"] == "maximize").any()):
        return False
    has_loss = frame["val_loss"].map(lambda v: isinstance(v, list) and len(v) > 0)
    chance = pd.to_numeric(frame["chance_loss"], errors="coerce")
    final = pd.to_numeric(frame["final_normalised_loss"], errors="coerce")
    return bool(has_loss.any() and (chance[has_loss] > 0).all()
                and final[frame["state"] == "COMPLETE"].notna().all())
_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")  # optuna.trial.TrialState
_STATUSES = ("ok", "diverged", "pruned", "failed", "running", "waiting")
#: Columns of numbers in an export (empty where unknown); the leE_* ones are matched apart.
_NUMBER_COLUMNS = ("value", "chance_loss", "threshold", "final_normalised_loss",
                   "final_val_loss", "epochs", "epochs_completed", "pruned_at", "predicted_at",
                   "predicted_p_trainable", "predicted_final_loss", "wall_time", "le_time")
#: Columns of lists, JSON in a CSV (as lepredict.sweep.read_trials decodes them).
_LIST_COLUMNS = ("train_loss", "val_loss", "grad_norm", "steps", "values")


def _is_list_column(column: str) -> bool:
    return column in _LIST_COLUMNS or (column.startswith("le")
                                       and column.endswith(("_mean", "_std")))


def _is_number(v) -> bool:
    import numbers

    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _empty(v) -> bool:
    return v is None or (_is_number(v) and math.isnan(v))


def _first_bad_list_cell(path: str) -> tuple[int, str, str] | None:
    """The first CSV cell that ``read_trials`` could not decode as JSON: (row, column, text)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    for column in frame.columns:
        if not _is_list_column(str(column)):
            continue
        for i, v in enumerate(frame[column]):
            if isinstance(v, str):
                try:
                    json.loads(v)
                except ValueError:
                    return i, str(column), v
    return None


def _export_problem(frame, option: str) -> tuple[int | None, str | None, str] | None:
    """What in an export read back would break the report, or give it wrong: (row, column,
    problem and fix), the first found."""
    have = [str(c) for c in frame.columns]
    needed = _REPORT_COLUMNS[option]
    lacking = [c for c in needed if (not any(h.startswith("param_") for h in have)
                                     if c == "param_*" else c not in have)]
    # Without "value", the losses may rank the trials: known once their cells are checked.
    maybe = lacking == ["value"] and set(_BY_LOSSES) <= set(have)
    if lacking and not maybe:
        names = ", ".join("param_NAME" if c == "param_*" else c for c in lacking)
        return None, None, (f"lacks the column(s) {names}: `lepredict analyze {option}` needs "
                            f"{_NEEDS[option]}, and reads the others an export has where "
                            "present; add them, or write the file with `lepredict export`")
    as_list = "a JSON list of numbers such as [2.3, 1.9] (null for a missing one), or empty"
    for column in have:
        values = frame[column]
        if column == "number":
            for i, v in enumerate(values):
                try:  # a column with one bad cell reads as text, its good cells too
                    whole = not isinstance(v, bool) and float(v).is_integer()
                except (TypeError, ValueError):
                    whole = False
                if not whole:
                    return i, column, (f"{_shown_cell(v)} is not a trial number: give each "
                                       "trial's number, an integer")
        elif column == "state":
            for i, v in enumerate(values):
                if v not in _STATES:
                    return i, column, (f"{_shown_cell(v)} is not a trial state: give one of "
                                       f"{', '.join(_STATES)}")
        elif column in ("status", "direction"):
            allowed = _STATUSES if column == "status" else ("minimize", "maximize")
            for i, v in enumerate(values):
                if not _empty(v) and v not in allowed:
                    return i, column, (f"{_shown_cell(v)} is not a {column}: give one of "
                                       f"{', '.join(allowed)}, or leave it empty")
        elif _is_list_column(column):
            whole = column == "steps"
            for i, v in enumerate(values):
                if _empty(v):
                    continue
                if not isinstance(v, list) or not all(
                        (_is_number(x) and (not whole or float(x).is_integer()))
                        or (x is None and not whole) for x in v):
                    what = ("a JSON list of the steps reported, integers such as [0, 1, 2], or "
                            "empty") if whole else as_list
                    return i, column, f"{_shown_cell(v)} is not {what}"
        elif column in _NUMBER_COLUMNS or (column.startswith("le") and column.endswith(
                ("_diverged", "_n", "_sum", "_sum_every", "_trajectories"))):
            for i, v in enumerate(values):
                if _empty(v):
                    continue
                try:
                    number = float(v)
                except (TypeError, ValueError):
                    return i, column, f"{_shown_cell(v)} is not a number: give one, or leave it empty"
                if column == "chance_loss" and not (math.isfinite(number) and number > 0):
                    return i, column, (f"{_shown_cell(v)} is no chance loss, which is positive: "
                                       "give the loss of the best constant prediction (1.0 for "
                                       "losses already divided by it), or leave it empty")
    if maybe and not _ranked_by_losses(frame):
        return None, None, ("lacks the column value, and its losses cannot rank the trials "
                            "instead (a trial with val_loss but no chance_loss, a finished one "
                            "without final_normalised_loss, or a maximised study): add value, "
                            "each trial's final value, or write the file with `lepredict "
                            "export`")
    if "steps" in have and "values" in have:
        for i, (steps, values) in enumerate(zip(frame["steps"], frame["values"])):
            if isinstance(steps, list) and isinstance(values, list) and steps and values \
                    and len(steps) != len(values):
                return i, "values", (f"{len(values)} values for the {len(steps)} steps in "
                                     "\"steps\": give one value per step reported")
    return None


def _shown_cell(v) -> str:
    text = json.dumps(v) if isinstance(v, (list, str)) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_exports(paths: list[str], option: str):
    """``--data`` or ``--reference`` of analyze, checked file by file: an export edited by hand
    fails in the report as a KeyError or TypeError naming nothing the user wrote."""
    import glob

    import pandas as pd

    frames = []
    for f in [f for p in paths for f in (sorted(glob.glob(p)) or [p])]:
        frame = _read_export(f, option)
        problem = _export_problem(frame, option)
        if problem is not None:
            i, column, text = problem
            where = "" if i is None else f", data row {i + 1}, column {column}"
            raise CLIError(f"{option} {f!r}{where}: {text}.")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _read_export(f: str, option: str):
    """One export file as a frame; a file that cannot be read as one is a one-line error
    naming it (and, in a CSV, the first cell that is not the JSON list it should be)."""
    from lepredict.sweep import read_trials

    if "://" in f:
        raise CLIError(f"{option} {f!r} is a database URL; {option} reads exports: write one "
                       "with `lepredict export --storage URL --study-name NAME -o runs.parquet`.")
    try:
        return read_trials(f)
    except FileNotFoundError:
        raise CLIError(f"No such data file: {f!r}; pass exports written by "
                       "`lepredict export` (.parquet or .csv).") from None
    except OSError as err:
        raise CLIError(f"Cannot read {option} {f!r}: {err.strerror or err}.") from None
    except UnicodeDecodeError as err:
        raise CLIError(f"{option} {f!r} is not UTF-8 text (byte {err.object[err.start]:#04x} "
                       f"at offset {err.start}): save it as UTF-8, as `lepredict export` "
                       "writes it.") from None
    except ValueError as err:
        bad = _first_bad_list_cell(f) if f.endswith(".csv") else None
        if bad is not None:
            i, column, text = bad
            raise CLIError(f"{option} {f!r}, data row {i + 1}, column {column}: "
                           f"{_shown_cell(text)} is not a JSON list such as [2.3, 1.9]: "
                           "write the list, or leave the cell empty.") from None
        if str(err).startswith("Cannot tell the format"):
            raise CLIError(str(err)) from None
        kind = "CSV" if f.endswith(".csv") else "Parquet"
        raise CLIError(f"{option} {f!r} cannot be read as {kind} ({_first_line(err)}): "
                       "write it with `lepredict export` (comma-separated for .csv).") from None


def _cmd_analyze(args) -> int:
    from lepredict import report
    from lepredict.sweep import trials_frame

    study = None
    if args.output is not None:
        _check_output(args.output, (".html",))
    if args.publish and (args.data or not args.study_name):
        raise CLIError("--publish saves figures into a study: use --study-name, not --data.")
    if args.data and (args.study_name or args.storage):
        raise CLIError("Give --data FILE or --study-name NAME [--storage URL], not both: "
                       "analyze reads one source.")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise CLIError(f"--threshold must be a finite number, got {args.threshold}.")
    _check_steps_per_epoch(args.steps_per_epoch)
    if args.steps_per_epoch is not None and args.data:
        raise CLIError("--steps-per-epoch reads a study's steps (--study-name); an export is "
                       "already by epoch: give it to `lepredict export` instead.")
    if args.data:
        frame = _read_exports(args.data, "--data")
        title = ", ".join(args.data)
    elif args.study_name:
        study = _open_study(args.storage, args.study_name)
        _check_readable(study, "analyze")
        frame = trials_frame(study, steps_per_epoch=args.steps_per_epoch)
        title = args.study_name
    else:
        raise CLIError("Say what to analyse: --study-name NAME [--storage URL], or --data FILE.")
    model = None
    if args.model != "none":
        models = _load_predictors(args.model, args.trust_model)
        if args.budget is None:  # 1 by default, or the nearest budget the model has
            model = models[min(models, key=lambda b: abs(b - 1))]
        elif args.budget in models:
            model = models[args.budget]
        else:
            raise CLIError(f"The model has no predictor for budget {args.budget}; it has "
                           f"{sorted(models)}: pass --budget with one of those.")
    reference = _read_exports(args.reference, "--reference") if args.reference else None
    # NAME: the study's, or the (first) export's file name without its suffix.
    name = args.study_name or (Path(args.data[0]).stem if args.data else "report")
    output = args.output or f"studies/{name}-report.html"
    try:
        sections = report.panels(frame, model=model, reference=reference,
                                 threshold=args.threshold)
        path = report.analyze(frame, output, model=model, title=title, reference=reference,
                              threshold=args.threshold, sections=sections)
        if args.publish:
            n = report.publish(study, {p.key: p.figure for p in sections if p.figure},
                               notes=[p for p in sections if p.figure is None])
            print(f"published {n} figures to study {study.study_name} for optuna-dashboard")
    except (ValueError, ImportError) as err:
        raise CLIError(str(err)) from None
    print(f"wrote {path}")
    for p in sections:
        if p.figure is None:
            print(f"  not drawn: {p.heading}: {p.text}")
    if study is not None:
        _note_report_steps(study, args.steps_per_epoch, "analyze")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a command line it cannot parse is one line, like every other bad
    input (argparse's own error prints the usage block first), with where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`.\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, as ``ArgumentDefaultsHelpFormatter`` does, but not for
    defaults that mean "not given" (None, a flag's False), which the help words instead, and
    lists as the command line takes them (``0 1 2 3``, not ``[0, 1, 2, 3]``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)).replace("%", "%%")
            return f"{text} (default: {shown})"
        return f"{text} (default: %(default)s)"


def _add_task_args(p: argparse.ArgumentParser, options_default: str | None = None) -> None:
    from lepredict import tasks

    p.add_argument("--task", default="digits",
                   help=f"task to train on: {', '.join(tasks.available())}; or a task of your "
                   "own as module:function (a function returning a lepredict.tasks.Task)")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="option of the task, e.g. --task-option mode=row (repeatable; VALUE is "
                   "read as JSON, else as a string); `lepredict tasks` lists each task's "
                   "options and defaults" + (f" (default: {options_default})"
                                             if options_default else ""))


def build_parser() -> argparse.ArgumentParser:
    from lepredict import __version__
    from lepredict.records import PROBE_SIZE

    parser = _Parser(
        prog="lepredict",
        description="Predict early in training whether an RNN's hyperparameters will train well.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lepredict {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
        p.set_defaults(command_parser=p)  # main() names the command in an unknown option's error
        return p

    def probe_size(p) -> None:
        p.add_argument("--probe-size", type=int, default=PROBE_SIZE,
                       help="validation sequences the spectrum averages over (default: "
                       "%(default)s; the shipped predictors were fitted on 8, and 4 moved their "
                       "AUROC by -0.006 to +0.002 from epoch 1 on)")

    def device(p) -> None:
        p.add_argument("--device", default="cpu", help="torch device to train on: cpu, cuda, "
                       "cuda:N or mps")

    def storage(p, default: str = "studies/NAME.db") -> None:
        p.add_argument("--storage", default=None,
                       help="Optuna storage: a database URL (sqlite:///FILE.db, "
                       f"postgresql://USER@HOST/DB) or a journal file (.log, .jsonl) (default: "
                       f"{default}, NAME the --study-name)")

    p = command("tasks", help="list the tasks and their options",
                description="List the tasks --task takes, what each is, and its options "
                "(--task-option KEY=VALUE) with their defaults. Tasks of your own run as "
                "--task module:function, or by name once a package declares them in the "
                "'lepredict.tasks' entry-point group.")
    p.add_argument("names", nargs="*", metavar="TASK",
                   help="tasks to describe, names or module:function (default: all of them)")
    p.add_argument("--json", action="store_true", help="print the descriptions as JSON")
    p.set_defaults(func=_cmd_tasks)

    p = command("spectrum", help="train a network briefly and print its Lyapunov spectra")
    _add_task_args(p)
    _add_config_args(p)
    p.add_argument("--epochs", type=int, default=1,
                   help="epochs to train; the spectrum is measured at 0 (initialisation) and "
                   "after each")
    probe_size(p)
    device(p)
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.set_defaults(func=_cmd_spectrum)

    p = command(
        "sweep", help="run or resume an Optuna sweep of short training runs",
        description="Run or resume an Optuna sweep of short training runs. Any number of "
        "workers may run it on one study (--storage postgresql://... or sqlite:///...); "
        "together they stop at --n-trials. Trials of killed workers are failed and run again "
        "once by the next sweep started more than --grace-period seconds after the kill (database "
        "storages); a trial stopped by Ctrl-C is run again first by the resumed sweep.",
        epilog="Exit status: 0 when every trial this run started completed or was pruned "
        "(diverged runs are complete), even if other workers' trials are still running (the "
        "summary lists them); 1 when a trial this run started failed with an error (the "
        "summary says which); 2 for bad input, including a finite search space whose every "
        "configuration is already in the study.")
    _add_task_args(p)
    p.add_argument("--n-trials", type=int, default=20, help="trials the study should hold in total")
    p.add_argument("--epochs", type=int, default=10, help="epochs each trial trains")
    p.add_argument("--le-epochs", type=int, nargs="+", default=None,
                   help="epochs at which to measure the spectrum (0 = initialisation; default: "
                   f"{' '.join(map(str, DEFAULT_LE_EPOCHS))}, those up to --epochs)")
    p.add_argument("--le-k", default=None,
                   help="leading exponents per spectrum, measured with the sum of all; 'all' for "
                   f"full spectra (default: {MEASURED_EXPONENTS}, what the predictor uses, or the "
                   "state size if smaller)")
    probe_size(p)
    p.add_argument("--space", default=None,
                   help="search space: NAME for studies/NAME.toml, or a path (default: "
                   "lepredict.sweep.DEFAULT_SPACE)")
    storage(p)
    p.add_argument("--study-name", default="lepredict",
                   help="study to create, or to resume when it exists")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"],
                   help="Optuna sampler")
    p.add_argument("--pruner", default="none", choices=["none", "lyapunov", "median", "hyperband"],
                   help="Optuna pruner: lyapunov prunes runs the stability predictor expects "
                   "not to train")
    p.add_argument("--pruner-model", default="default",
                   help="predictor of --pruner lyapunov: shipped name or directory")
    _add_trust_arg(p, "--pruner-model")
    p.add_argument("--pruner-mode", default="model", choices=["model", "online", "both"],
                   help="predictor --pruner lyapunov decides by: --pruner-model, one fitted "
                   "online on this study's finished trials, or the mean of both")
    p.add_argument("--pruner-threshold", type=float, default=None,
                   help="prune when P(trainable) is below this (default: the predictor's own, "
                   "which kept 99%% of the trainable runs in cross-validation)")
    p.add_argument("--pruner-warmup", type=int, default=1,
                   help="no stability pruning before this epoch (0: may prune at initialisation)")
    p.add_argument("--pruner-no-compare-to-best", action="store_true",
                   help="prune by P(trainable) alone, not also by the predicted final loss "
                   "against the best so far")
    p.add_argument("--pruner-wrap-median", action="store_true",
                   help="also prune by loss with a wrapped MedianPruner")
    p.add_argument("--n-jobs", type=int, default=1, help="trials at once in this process")
    p.add_argument("--population", type=int, default=1, metavar="K",
                   help="train up to K trials together as one batched computation (several "
                   "times the throughput for small networks; each trial is reported, pruned and "
                   "stored as on its own); fewer when fewer trials are left; trials of another "
                   "architecture, size, layers, optimizer or batch size form their own "
                   "population; 1 trains one trial at a time; not with --n-jobs > 1; on one "
                   "machine a journal file (--storage NAME.log) stores trials faster "
                   "than SQLite")
    p.add_argument("--same-shape", action="store_true",
                   help="with --population: each population's first trial is drawn as usual "
                   "and the others take its architecture, size, layers, optimizer and batch "
                   "size, drawing the rest, so populations stay full in a space that samples "
                   "those")
    device(p)
    p.add_argument("--seed", type=int, default=0,
                   help="with the trial number, seeds each trial's sampler and run: the same "
                   "seed and trial number give the same configuration, and workers started "
                   "alike draw distinct ones (default: %(default)s)")
    p.add_argument("--heartbeat-interval", type=int, default=30, metavar="SECONDS", action=_Given,
                   help="seconds between a running trial's heartbeats in a database storage "
                   "(default: %(default)s)")
    p.add_argument("--grace-period", type=int, default=90, metavar="SECONDS", action=_Given,
                   help="seconds without a heartbeat after which a running trial counts as "
                   "killed, is failed and run again (default: %(default)s; longer than "
                   "--heartbeat-interval)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="show Optuna's log (a line per trial) above the progress bar; without "
                   "it only Optuna's warnings show")
    p.add_argument("--report", action="store_true",
                   help="write the analysis report (studies/NAME-report.html) at the end")
    p.set_defaults(func=_cmd_sweep)

    p = command("export", help="write a study's trials to Parquet or CSV: a lepredict sweep, "
                "or any single-objective Optuna study of your own")
    storage(p)
    p.add_argument("--study-name", required=True, help="study to export")
    p.add_argument("-o", "--output", required=True, help="FILE.parquet or FILE.csv")
    p.add_argument("--finished-only", action="store_true",
                   help="export the finished trials (complete, pruned, failed) of a study that "
                   "still has trials running; without it such a study is refused")
    _add_steps_per_epoch_arg(p)
    p.set_defaults(func=_cmd_export)

    from lepredict.records import FEATURE_SETS

    p = command("fit", help="fit stability predictors on exported sweeps")
    p.add_argument("--data", nargs="+", required=True, help="exports (.parquet/.csv); globs work")
    p.add_argument("-o", "--output", required=True, help="model directory (one subdirectory "
                   "per budget)")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="early budgets in epochs (one predictor each)")
    p.add_argument("--features", nargs="+", default=["spectrum", "loss"], choices=FEATURE_SETS,
                   help="feature sets the predictors read")
    p.add_argument("--threshold", type=float, default=None,
                   help="trainability threshold on the final normalised loss (default: the task's)")
    p.add_argument("--no-cv", action="store_true", help="skip the held-out metrics")
    p.add_argument("--search", action="store_true",
                   help="choose the classifier's hyperparameters by grouped cross-validation")
    p.set_defaults(func=_cmd_fit)

    from lepredict.records import BASELINE, COMPARED, N_BOOT, SCHEMES

    p = command(
        "evaluate", help="cross-validated comparison with the baselines, with intervals; or "
        "the metrics of a saved predictor (--model)",
        description="Without --model: fits a predictor per feature set, early budget and fold "
        "on runs held out by each scheme, and prints AUROC of P(trainable) and Spearman "
        "correlation of the predicted final loss, with 95% bootstrap intervals (configurations "
        "resampled within tasks) and each set's paired difference from the baseline on the same "
        "resamples; overall and per group (task, or held-out group). With --model: that "
        "predictor's metrics on --data, with intervals.",
        epilog="Examples: lepredict evaluate --data studies/corpus-*.parquet; "
        "... --holdout arch=lstm --holdout 'hidden>=128'; ... --test-data "
        "studies/heldout-*.parquet; ... --nested --features spectrum+loss --schemes configs.")
    p.add_argument("--model", default=None, help="model directory or shipped name ('default') "
                   "to score on --data as they are (default: none, the cross-validated "
                   "comparison)")
    _add_trust_arg(p)
    p.add_argument("--data", nargs="+", required=True, help="exports (.parquet/.csv); globs work")
    p.add_argument("--test-data", nargs="+", default=None, metavar="FILE",
                   help="exports to evaluate on after fitting on all of --data (scheme 'test'; "
                   "default: none)")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="early budgets in epochs to compare (without --model)")
    p.add_argument("--features", nargs="+", default=list(COMPARED), metavar="SET",
                   help="feature sets to compare: spectrum, loss, weights, grad, hparams, or "
                   "several joined by '+'")
    p.add_argument("--baseline", default=BASELINE,
                   help="feature set every other is compared with, on the same folds and "
                   "resamples (evaluated even if not in --features)")
    p.add_argument("--schemes", nargs="+", default=None, choices=list(SCHEMES),
                   help="what the cross-validation holds out: configurations, whole tasks, or "
                   "whole architectures (default: configs task arch, or none when --holdout or "
                   "--test-data is given)")
    p.add_argument("--holdout", action="append", default=None, metavar="PREDICATE",
                   help="also hold out the runs a predicate selects and fit on the rest: "
                   "COLUMN OP VALUE, OP one of = != > >= < <=, COLUMN a hyperparameter (arch, "
                   "hidden, layers, init, ...) or task/study, e.g. arch=lstm, 'hidden>=128', "
                   "task=charlm,lorenz; conditions join with & (all) and | (any), e.g. "
                   "'layers>=2 | init!=uniform' fits on one-layer uniform runs only; "
                   "repeatable (default: none)")
    p.add_argument("--nested", action="store_true",
                   help="choose each fold's classifier by the grid search of `lepredict fit "
                   "--search`, on that fold's training runs only (nested cross-validation; "
                   "about 30 times slower)")
    p.add_argument("--n-boot", type=int, default=N_BOOT,
                   help="bootstrap resamples behind each interval (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seeds the folds, models and resamples")
    p.add_argument("--threshold", type=float, default=None,
                   help="trainability threshold on the final normalised loss (default: the "
                   "model's, else each run's task's)")
    p.add_argument("--n-jobs", type=int, default=None,
                   help="folds fitted in parallel (default: one at a time)")
    p.add_argument("--json", action="store_true", help="print every row as JSON")
    p.add_argument("-o", "--output", default=None,
                   help="also write every row (AP, Brier, MAE too) to FILE.csv or FILE.json "
                   "(default: none)")
    p.set_defaults(func=_cmd_evaluate)

    p = command("predict-stability", help="train for the early budget and predict whether "
                "a configuration will train")
    _add_task_args(p, "the variant the predictor was trained on, e.g. mode=row for digits; "
                   "the task's defaults for a task it was not")
    _add_config_args(p)
    p.add_argument("--config", default=None, help="hyperparameters from a TOML or JSON file "
                   "(instead of --arch, --hidden, ...)")
    p.add_argument("--spectrum", default=None, help="predict from spectra measured elsewhere "
                   "(JSON: a `lepredict spectrum --json` record, or {epoch: {mean, std}, "
                   "\"val_loss\": [...]}); \"val_loss\" is read as raw losses of --task unless "
                   "the file gives \"chance_loss\" (their scale: the loss of the best constant "
                   "prediction, 1.0 if already normalised) or --chance-loss does; the file's "
                   "\"config\", if any, stands for --config and --arch...")
    p.add_argument("--chance-loss", type=float, default=None,
                   help="with --spectrum: the chance loss of its \"val_loss\", in their units "
                   "(1.0 for losses already divided by it), for a file without \"chance_loss\" "
                   "(default: --task's)")
    p.add_argument("--model", default="default", help="shipped name or model directory")
    _add_trust_arg(p)
    p.add_argument("--budget", type=int, default=None,
                   help="early budget in epochs (default: the model's largest)")
    probe_size(p)
    device(p)
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(func=_cmd_predict)

    p = command("analyze", help="HTML report of a study (plotly figures): a lepredict sweep, "
                "or any single-objective Optuna study of your own")
    storage(p)
    p.add_argument("--study-name", default=None, help="study to analyse")
    p.add_argument("--data", nargs="+", default=None, help="exported trials instead of a study")
    p.add_argument("--model", default="default", help="predictor whose calibration is shown "
                   "('none' for no model)")
    _add_trust_arg(p)
    p.add_argument("--budget", type=int, default=None, help="early budget of the predictor "
                   "shown (and the epoch whose spectra are shown); default: 1, or the model's "
                   "nearest")
    p.add_argument("--threshold", type=float, default=None,
                   help="a finished trial trained when its final normalised loss is below this "
                   "(for a study without losses, when its value beats this in the study's "
                   "direction); default: the task's, else the median of the finished trials, "
                   "which splits them into better and worse halves but draws no calibration "
                   "(that needs a threshold recorded or given)")
    p.add_argument("--reference", nargs="+", default=None,
                   help="exports of full runs: what pruned configurations would have reached")
    p.add_argument("-o", "--output", default=None, help="report path (default: "
                   "studies/NAME-report.html, NAME the study's or the export's file name)")
    _add_steps_per_epoch_arg(p)
    p.add_argument("--publish", action="store_true",
                   help="also save the figures into the study for optuna-dashboard, one graph "
                   "per figure (pip install optuna-dashboard)")
    p.set_defaults(func=_cmd_analyze)
    return parser


def _add_trust_arg(p, option: str = "--model") -> None:
    p.add_argument("--trust-model", action="store_true",
                   help=f"load {option} even if loading it could run code from it (a pickled "
                   "model.joblib) or it is a shipped model that differs from its pinned hash; "
                   "only for files you trust")


def main(argv: list[str] | None = None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # said by the command's parser: "see `lepredict export --help`"
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        try:
            return args.func(args)
        except CLIError as err:
            # One line whatever the message quotes (a database's or a parser's multi-line error).
            print(f"lepredict {args.command}: error: {' '.join(str(err).split())}",
                  file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        # Ctrl-C: one line, not a traceback; what the study holds stays (a sweep resumes).
        command = (argv if argv is not None else sys.argv[1:])[:1]
        print(f"lepredict {' '.join(command)}: interrupted"
              + ("; the study keeps every trial told so far, and running the same command "
                 "again resumes it" if command == ["sweep"] else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output left early (`lepredict tasks | head -3`): as the Python
        # docs' "Note on SIGPIPE" advises, send what is still buffered to devnull so the
        # interpreter's final flush does not fail again, and exit 1, without a traceback.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
