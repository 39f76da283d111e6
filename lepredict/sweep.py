"""Optuna sweeps of short training runs that record early spectra in the study's storage.

Each trial samples a :class:`~lepredict.train.RunConfig` from a search space, trains it with
:func:`~lepredict.train.train_run`, and stores in the trial's user attributes (prefix
``lepredict:``) its curves, weight statistics, spectra (one attribute per measured epoch, written
as soon as the epoch ends so a pruner can read it), status and timings; the trial's value is the
final normalised validation loss (``inf`` for a diverged run). Intermediate values are the
normalised validation loss per epoch, so Optuna's pruners work unchanged.

Storage is whatever Optuna takes: a SQLite or PostgreSQL URL (run with a heartbeat, so a trial
whose worker was killed is marked failed and retried when the sweep resumes), or a journal file.

With ``population=K`` a worker asks K trials at once and trains them together as one batched
computation (:mod:`lepredict.population`), reporting to each trial at every epoch and telling
each its outcome: the same records, several times the throughput for small networks.

Configurations are drawn per trial, from a sampler seeded with the sweep's seed and the trial
number, so workers started alike and resumed sweeps draw distinct configurations, and a
configuration already in the study is not drawn again (see :class:`_PerTrialSampler`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import socket
import threading
import time
import tomllib
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from lepredict import tasks
from lepredict.population import SHAPE_FIELDS, group_by_shape, train_population
from lepredict.records import (ATTR, FINISHED_STATES, HPARAM_FIELDS, HPARAMS, INTERRUPTED,
                               MEASURED_EXPONENTS, RunRecord, check_steps_per_epoch,
                               interrupted_reason, retry_of, run_row, steps_per_epoch_by_trial,
                               trial_row)
from lepredict.records import jsonable as _jsonable
from lepredict.train import PROBE_SIZE, RunConfig, checked_device, checked_schedule, train_run

if TYPE_CHECKING:  # pandas is imported where a frame is made, not with the module
    import pandas as pd

__all__ = [
    "ATTR",
    "DEFAULT_SPACE",
    "FINISHED_STATES",
    "INTERRUPTED_ATTR",
    "SearchSpace",
    "SpaceExhausted",
    "check_storage_file",
    "export_trials",
    "fill_fixed_params",
    "load_space",
    "make_storage",
    "read_trials",
    "record_frame",
    "run_sweep",
    "trial_row",
    "trials_frame",
]


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Distributions to sample plus fixed values, both keyed by :class:`RunConfig` field."""

    params: dict[str, BaseDistribution]
    fixed: dict

    def sample(self, trial: optuna.Trial) -> dict:
        out = dict(self.fixed)
        for name, dist in self.params.items():
            if isinstance(dist, CategoricalDistribution):
                out[name] = trial.suggest_categorical(name, dist.choices)
            elif isinstance(dist, IntDistribution):
                out[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                out[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        return out


def _parse_space(raw: dict, source: str) -> SearchSpace:
    unknown = set(raw) - {"params", "fixed"}
    if unknown:
        raise ValueError(f"{source}: unknown sections {sorted(unknown)}; use [params.NAME] and [fixed].")
    for section in ("params", "fixed"):
        if not isinstance(raw.get(section, {}), dict):
            raise ValueError(f"{source}: {section} must be a table ([{section}] or "
                             f"[{section}.NAME]), got {raw[section]!r}.")
    params: dict[str, BaseDistribution] = {}
    for name, spec in raw.get("params", {}).items():
        if not isinstance(spec, dict):
            raise ValueError(f"{source}: params.{name} must be a table with 'choices' or 'low'/'high'.")
        try:
            if "choices" in spec:
                if not isinstance(spec["choices"], list) or not spec["choices"]:
                    raise ValueError(f"choices must be a non-empty list, got {spec['choices']!r}.")
                params[name] = CategoricalDistribution(list(spec["choices"]))
            elif {"low", "high"} <= set(spec):
                low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
                if isinstance(low, int) and isinstance(high, int):
                    params[name] = IntDistribution(low, high, log=log, step=int(spec.get("step", 1)))
                else:
                    params[name] = FloatDistribution(float(low), float(high), log=log, step=spec.get("step"))
            else:
                raise ValueError("needs 'choices', or 'low' and 'high'.")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: params.{name}: {err}") from None
    fixed = dict(raw.get("fixed", {}))
    both = set(params) & set(fixed)
    if both:
        raise ValueError(f"{source}: {sorted(both)} are both sampled and fixed; keep one.")
    unknown = (set(params) | set(fixed)) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(
            f"{source}: unknown hyperparameters {sorted(unknown)}; known: {sorted(_CONFIG_FIELDS)}."
        )
    _check_values(params, fixed, source)
    return SearchSpace(params, fixed)


def _check_values(params: dict[str, BaseDistribution], fixed: dict, source: str) -> None:
    """Every value the space can give must make a valid :class:`RunConfig`; otherwise every
    trial that samples it fails, in a study already pinned to this setup. The fixed values are
    checked together, then each distribution's choices or bounds on top of them (RunConfig's
    rules are per field, and a range is valid when both its ends are)."""
    try:
        RunConfig(**fixed)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: [fixed]: {err}") from None
    for name, dist in params.items():
        values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        for value in values:
            try:
                RunConfig(**{**fixed, name: value})
            except (ValueError, TypeError) as err:
                raise ValueError(f"{source}: params.{name}: {err}") from None


#: The space used when none is given: stable, marginal and unstable configurations alike.
DEFAULT_SPACE = _parse_space(
    {
        "params": {
            "arch": {"choices": ["rnn", "gru", "lstm"]},
            "hidden": {"choices": [16, 32, 64]},
            "init_scale": {"low": 0.02, "high": 3.0, "log": True},
            "lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "optimizer": {"choices": ["sgd", "adam", "rmsprop"]},
        },
        "fixed": {"init": "uniform", "layers": 1, "batch_size": 64, "clip": 0.0},
    },
    "DEFAULT_SPACE",
)


def load_space(name_or_path: str | os.PathLike | None, *, studies_dir: str | os.PathLike = "studies") -> SearchSpace:
    """A search space from a TOML file: a path, or ``NAME`` for ``studies/NAME.toml``.

    ``None`` gives :data:`DEFAULT_SPACE`. The file holds ``[params.NAME]`` tables with
    ``choices = [...]`` or ``low``/``high`` (and optional ``log``, ``step``), and a ``[fixed]``
    table, all keyed by :class:`~lepredict.train.RunConfig` field.
    """
    if name_or_path is None:
        return DEFAULT_SPACE
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(studies_dir) / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"Search space {str(name_or_path)!r} not found (looked for {path}); "
                         f"pass a TOML file path or the name of one in {studies_dir}/.")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    return _parse_space(raw, str(path))


#: Tries at opening an RDB storage whose schema other workers may be creating at that moment.
SCHEMA_RETRIES = 5


def make_storage(url, study_name: str, *, studies_dir: str | os.PathLike = "studies",
                 heartbeat_interval: int = 30, grace_period: int = 90):
    """Optuna storage for ``url``: an RDB URL (SQLite, PostgreSQL...) with a heartbeat, a journal
    file (a path ending in ``.log`` or ``.jsonl``), ``None`` for ``studies/NAME.db``, or an Optuna
    storage object, returned as it is.

    Args:
        url: The storage, as above. ``postgresql://`` URLs use psycopg 3 (``lepredict[postgres]``).
        study_name: Names the SQLite file when ``url`` is ``None``.
        studies_dir: Where that file goes.
        heartbeat_interval: Seconds between a running trial's heartbeats (RDB storages).
        grace_period: Seconds without a heartbeat after which a running trial counts as killed:
            a sweep started after that fails it and runs its configuration again (once).

    Raises:
        ValueError: A URL that is neither a database nor a journal file, a file that is neither
            new nor an Optuna store (see :func:`check_storage_file`), a database driver that is
            not installed, or a grace period not longer than the heartbeat interval.
    """
    if isinstance(url, optuna.storages.BaseStorage):
        return url
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int (seconds), got {name}={value!r}.")
    if grace_period <= heartbeat_interval:
        # A live trial whose beat is merely late would be failed and run twice.
        raise ValueError(f"grace_period must be longer than heartbeat_interval, got "
                         f"{grace_period=}, {heartbeat_interval=}; make it several intervals.")
    if url is None:
        Path(studies_dir).mkdir(parents=True, exist_ok=True)
        url = _default_url(study_name, studies_dir)
    check_storage_file(url)
    if "://" not in url:
        if url.endswith((".log", ".jsonl")):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(url))
        raise ValueError(f"Storage {url!r} is neither a database URL (sqlite:///..., "
                         "postgresql://...) nor a journal file path ending in .log or .jsonl.")
    import sqlalchemy.exc

    # Workers started together on an empty database all try to create Optuna's schema; all but
    # one lose the race with a duplicate-key error. The schema then exists, so trying again works.
    for attempt in range(SCHEMA_RETRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    # The heartbeat lets a resumed sweep find trials whose worker died
                    # (RUNNING for ever otherwise), mark them failed, and run them again once.
                    heartbeat_stale_trial_callback=_RetryUnlessRetried(max_retry=1),
                    engine_kwargs={"pool_pre_ping": True},
                )
            if storage.engine.dialect.name == "sqlite":
                _write_ahead_log(storage.engine)
            return storage
        except ImportError as err:
            # SQLAlchemy imports the URL's driver only now; Optuna re-raises its failure as a
            # long traceback naming no module.
            module = getattr(err.__cause__, "name", None) or err.name or "its driver"
            raise ValueError(
                f"Storage {url.split('://')[0]}://... needs the Python module {module!r}, which "
                "is not installed; for postgresql:// URLs: pip install 'lepredict[postgres]' "
                "(psycopg 3).") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError) as err:
            # SQLite reports the same race as "table ... already exists" or a locked database.
            race = not isinstance(err, sqlalchemy.exc.OperationalError) or any(
                word in str(err) for word in ("already exists", "locked"))
            if not race or attempt == SCHEMA_RETRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _default_url(study_name: str, studies_dir: str | os.PathLike = "studies") -> str:
    """The SQLite URL of ``make_storage(None, study_name)``."""
    return f"sqlite:///{Path(studies_dir) / f'{study_name}.db'}"


_SQLITE_HEADER = b"SQLite format 3\x00"


def check_storage_file(url: str) -> None:
    """Raise ValueError for a storage file that is neither new nor an Optuna store (a SQLite
    database with Optuna's tables or none, or a journal file), or that is a directory.

    Checked by reading only, before Optuna opens it: opening another application's SQLite file
    creates Optuna's tables in it (and switches it to write-ahead logging), and a journal
    backend appends its records to any text file."""
    if "://" in url:
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(url)
        except Exception:  # not a URL: Optuna's own message follows
            return
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return
        path, kind = Path(parsed.database), "SQLite database"
    else:
        path, kind = Path(url), "journal file"
    if path.is_dir():
        example = path / ("study.log" if kind == "journal file" else "study.db")
        raise ValueError(f"Storage {url!r} names a directory, not a {kind}; name a file in it "
                         f"(e.g. {str(example)!r}).")
    if not path.is_file() or path.stat().st_size == 0:
        return  # new: the sweep creates it
    if kind == "journal file":
        with path.open("rb") as f:
            first = f.readline(1 << 20)
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "op_code" not in record:
            raise ValueError(f"{str(path)!r} is not an Optuna journal file (its first line is no "
                             "journal record); name a new file ending in .log or .jsonl, or an "
                             "Optuna journal.")
        return
    with path.open("rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        raise ValueError(f"{str(path)!r} is not a SQLite database; name a new file "
                         "(sqlite:///new.db) or an Optuna study database.")
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro",
                                                uri=True)) as conn:
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as err:
        raise ValueError(f"Cannot read the SQLite database {str(path)!r}: {err}; check the "
                         "file, or name a new one.") from None
    if tables and "studies" not in tables:
        shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        raise ValueError(f"{str(path)!r} is a SQLite database of another application (tables "
                         f"{shown}; no Optuna study tables), and a sweep would add Optuna's "
                         "tables to it; name a new file (sqlite:///new.db).")


def _check_sweep_study(study: optuna.Study, study_name: str) -> None:
    """A sweep resumes only a study it can have made: one minimised value (the normalised
    loss) and either lepredict's setup or no trials yet but enqueued ones (a study created
    empty, to pass options Optuna's create_study takes, or configurations to run first).
    Anything else is someone else's study, which a sweep would fill with trials of other
    parameters and values of another meaning."""
    if len(study.directions) > 1:
        raise ValueError(f"Study {study_name!r} is multi-objective ({len(study.directions)} "
                         "objectives); a sweep minimises one value, the normalised loss: pick "
                         "another --study-name.")
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise ValueError(f"Study {study_name!r} maximises its value; a sweep minimises the "
                         "normalised loss: pick another --study-name.")
    if f"{ATTR}setup" not in study.user_attrs:
        trials = study.get_trials(deepcopy=False)
        n = sum(t.state != optuna.trial.TrialState.WAITING for t in trials)
        if n:
            raise ValueError(f"Study {study_name!r} holds {n} trial{'s' if n != 1 else ''} that "
                             "no lepredict sweep made (it has no lepredict setup); pick another "
                             "--study-name, or another --storage.")


def _check_enqueued(study: optuna.Study, space: SearchSpace, trials: list) -> None:
    """Trials enqueued in the study (of its ``trials``) set only parameters the space samples:
    a value for any other name would be dropped without a word (the sweep suggests only the
    space's)."""
    for trial in (t for t in trials if t.state == optuna.trial.TrialState.WAITING):
        extra = sorted(set(trial.system_attrs.get("fixed_params", {})) - set(space.params))
        if extra:
            fixed = sorted(set(extra) & set(space.fixed))
            raise ValueError(
                f"Trial {trial.number} of study {study.study_name!r} was enqueued with "
                f"{', '.join(extra)}, which the search space does not sample"
                + (f" ({', '.join(fixed)} fixed in it)" if fixed else "")
                + f"; enqueue only {', '.join(sorted(space.params)) or 'nothing'}, or sample "
                "the others in the space.")
        for name, value in trial.system_attrs.get("fixed_params", {}).items():
            if not _in_distribution(value, space.params[name]):
                raise ValueError(
                    f"Trial {trial.number} of study {study.study_name!r} was enqueued with "
                    f"{name}={value!r}, outside the search space's {space.params[name]!r}; "
                    "enqueue a value the space holds (an int for an int parameter), or widen "
                    "it.")


def _check_space_kinds(study: optuna.Study, space: SearchSpace, trials: list) -> None:
    """The space samples each parameter as the study's ``trials`` hold it: Optuna keeps one
    kind (range or choices), one log setting and one set of choices per parameter and study,
    and fails every trial that suggests another, after the trial has started."""
    held: dict[str, tuple[BaseDistribution, list[int]]] = {}
    for trial in trials:
        for name, dist in trial.distributions.items():
            if name in space.params:
                held.setdefault(name, (dist, []))[1].append(trial.number)
    for name, (dist, numbers) in sorted(held.items()):
        try:
            optuna.distributions.check_distribution_compatibility(dist, space.params[name])
        except ValueError:
            raise ValueError(
                f"The search space samples {name} as {_shown_distribution(space.params[name])}, "
                f"but study {study.study_name!r} holds it as {_shown_distribution(dist)} "
                f"({len(numbers)} trial{'s' if len(numbers) != 1 else ''}, from trial "
                f"{numbers[0]}); Optuna keeps one kind, log setting and set of choices per "
                f"parameter in a study: sample {name} as the study does, or pick another "
                "--study-name.") from None


def _shown_distribution(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    kind = "an integer range" if isinstance(dist, IntDistribution) else "a range"
    return f"{kind} {dist.low:g} to {dist.high:g}{', log-scaled' if dist.log else ''}"


def _in_distribution(value, dist: BaseDistribution) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, IntDistribution) and not isinstance(value, int):
        return False  # 32.0 (pandas' hidden size, say) is not an int: the run would refuse it
    return dist.low <= value <= dist.high


def _check_existing_study(url: str | None, study_name: str, space: SearchSpace) -> bool:
    """:func:`_check_sweep_study` and :func:`_check_space_kinds` of ``study_name`` if the store
    ``url`` (as :func:`make_storage` takes it) already holds it, read without writing anything:
    no table, file, journal record or journal mode is created. Returns whether the store could
    be read (the study checked, or not there); False leaves the checks to be made once Optuna
    has opened the store."""
    if url is None:
        url = _default_url(study_name)
    check_storage_file(url)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" not in url:
        if not (url.endswith((".log", ".jsonl")) and Path(url).is_file()
                and Path(url).stat().st_size):
            return True  # a new journal file (make_storage names what else is wrong)
        store = JournalStorage(JournalFileBackend(url))
    else:
        import sqlalchemy.exc
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
                return True  # a new database: connecting would create the file
            store = optuna.storages.RDBStorage(url, skip_table_creation=True)
        except (ImportError, ValueError, RuntimeError, optuna.exceptions.OptunaError,
                sqlalchemy.exc.SQLAlchemyError):
            return False  # no Optuna tables (yet), or unreachable: make_storage says what is wrong
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        return True  # not there yet
    except optuna.exceptions.StorageInternalError:
        return False  # workers racing to create the schema
    else:
        _check_sweep_study(study, study_name)
        if isinstance(store, JournalStorage):
            # Opening a journal study appends a record; a database's is checked once opened,
            # with the read the sweep makes anyway (thousands of trials take a second or two).
            _check_space_kinds(study, space, study.get_trials(deepcopy=False))
        return True
    finally:
        if isinstance(store, optuna.storages.RDBStorage):
            store.engine.dispose()


def _write_ahead_log(engine) -> None:
    """Put a SQLite study in write-ahead-log mode with ``synchronous=NORMAL``: a trial's dozen
    and more commits (each parameter, report and attribute is one) then append to the log
    instead of each syncing the whole database, about a third of the time per trial, and
    readers no longer block the workers' writes. A killed process loses nothing committed; a
    power cut can lose the last commits, never the database's consistency. The mode is kept in
    the file (WAL needs the file on a local disk, as SQLite's locking does anyway; workers on
    several machines use PostgreSQL)."""
    import sqlite3

    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(connection, _record):
        cursor = connection.cursor()
        try:
            # Switching needs the file to itself for a moment: a worker that finds it busy
            # ("database is locked") leaves the switch to another (the mode, once set, is the
            # file's).
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            pass
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()  # the connections made so far (the schema's) had neither


#: Draws from the trial's sampler before a configuration already in the study is accepted as
#: unavoidable (finite spaces then pick among the unseen configurations directly).
MAX_RESAMPLE = 20

#: Finite spaces up to this many configurations are enumerated to find the unseen ones.
ENUMERATE_LIMIT = 100_000


class SpaceExhausted(ValueError):
    """Every configuration of a finite search space is already in the study."""


def _values(dist: BaseDistribution) -> list | None:
    """Every value ``dist`` can take, or ``None`` when it is continuous."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = int(round((dist.high - dist.low) / dist.step)) + 1
        return [dist.low + i * dist.step for i in range(n)]
    return None


def _single_value(dist: BaseDistribution):
    """The value Optuna gives a one-valued distribution without asking the sampler."""
    if not dist.single():
        return None
    return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low


def _space_size(space: dict[str, BaseDistribution]) -> int | None:
    """Configurations in ``space``; ``None`` when a parameter is continuous."""
    size = 1
    for dist in space.values():
        if isinstance(dist, (CategoricalDistribution, IntDistribution)) or (
                isinstance(dist, FloatDistribution) and dist.step is not None):
            size *= len(_values(dist))
        else:
            return None
    return size


def _configs(trials, names: list[str]) -> set[tuple]:
    """The configurations of ``trials`` over ``names`` (trials missing one are left out)."""
    return {tuple(t.params[n] for n in names) for t in trials if all(n in t.params for n in names)}


def _exhausted_message(study: optuna.Study, space: dict[str, BaseDistribution], size: int) -> str:
    return (f"Search space exhausted: study {study.study_name!r} already holds all {size} "
            f"configurations of {sorted(space)}; widen the space (or sample a continuous "
            "parameter), or lower the trial count.")


def _is_exhausted(study: optuna.Study, space: dict[str, BaseDistribution],
                  trials=None) -> bool:
    size = _space_size(space)
    if not space or size is None:
        return False
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    return len(_configs(trials, sorted(space))) >= size


def _cached_trials(study: optuna.Study) -> list:
    """The study's trials through the cache Optuna keeps for the trial being asked (TPE reads
    it too): one database read per trial for both. Every read loads every unfinished trial
    in full, which with a population of running trials costs tens of milliseconds."""
    try:
        return study._get_trials(deepcopy=False, use_cache=True)
    except (AttributeError, TypeError):  # not a plain Study: read as the public API does
        return study.get_trials(deepcopy=False)


class _PerTrialSampler(optuna.samplers.BaseSampler):
    """Samples each trial with its own sampler, seeded from the sweep's seed and the trial number.

    A sampler seeded once per process draws the same sequence in every worker started with the
    same seed, and again in a resumed sweep, so workers and resumes repeated each other's
    configurations. The storage hands out every trial number once across workers, so a seed
    derived from it differs everywhere, while the same seed and trial number still give the same
    configuration (for TPE: given the same finished trials). Optuna has no public way to reseed a
    sampler with a chosen seed, hence a fresh inner sampler per trial (cheap to build).

    All of a trial's parameters are drawn at once, as Optuna's "relative" sampling, so that a
    draw repeating a configuration already in the study can be rejected and drawn again.
    Workers sampling at the same moment do not see each other's draws (nor, in a population
    sweep, what other workers drew while the population was being asked, see
    :meth:`share_read`): in a small finite space two of them can still pick one configuration.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int,
                 space: dict[str, BaseDistribution]):
        self._make, self._seed, self._space = make, seed, dict(space)
        self._inner: dict[int, optuna.samplers.BaseSampler] = {}
        self._shared: tuple[list, list] | None = None  # see share_read
        self._pinned: dict = {}  # see pin
        self._lock = threading.Lock()  # n_jobs > 1 runs trials in threads

    def trial_seed(self, number: int) -> int:
        """The seed of trial ``number``'s sampler (any int seed, a 32-bit result)."""
        digest = hashlib.sha256(f"lepredict:{self._seed}:{number}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def _sampler(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.BaseSampler:
        with self._lock:
            if trial.number not in self._inner:
                self._inner[trial.number] = self._make(self.trial_seed(trial.number))
            return self._inner[trial.number]

    def reseed_rng(self) -> None:
        pass  # draws depend on the seed and the trial number alone, by design

    def before_trial(self, study, trial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        with self._lock:
            self._inner.pop(trial.number, None)

    def share_read(self, trials: list | None, drawn: list = ()) -> None:
        """Draw the next trials from ``trials``, one read of the study, plus the configurations
        of ``drawn`` (trials asked since, their parameters set), instead of reading the study
        for each trial; ``None``: read for each trial again.

        A read loads every running trial in full, so a population of K trials asked one by one
        read O(K^2) trials: a fifth of a 64-member population's time. Trials other workers
        start or finish meanwhile are seen at the next read, as two workers drawing at the same
        moment never see each other's draws anyway.
        """
        with self._lock:
            self._shared = None if trials is None else (list(trials), list(drawn))

    def pin(self, params: dict | None) -> None:
        """Give the next trials these parameter values (those in the space; the others are
        drawn as usual, still never repeating a configuration); ``None``: pin nothing. A
        population with ``same_shape`` pins its first trial's shape for the rest."""
        with self._lock:
            self._pinned = dict(params or {})

    def _trials_to_draw_from(self, study) -> tuple[list, list]:
        with self._lock:
            shared = self._shared
        # Hyperband hands samplers a study of one bracket's trials: that one reads for itself.
        if shared is None or type(study) is not optuna.Study:
            return _cached_trials(study), []
        trials, drawn = shared
        # TPE reads the study through the cache Optuna keeps per ask: point it at the same read.
        study._thread_local.cached_all_trials = trials
        return trials, drawn

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(self, study, trial, search_space) -> dict:
        # A retry or an enqueued trial comes with its parameters: those are not drawn.
        given = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        with self._lock:
            pinned = {n: v for n, v in self._pinned.items()
                      if n in search_space and n not in given}
        if pinned:
            # Where every configuration with the pinned values is in the study, the trial is
            # drawn from the whole space instead (a population of another shape).
            params = self._draw(study, trial, search_space, {**given, **pinned}, pinned=True)
            if params is not None:
                return {**pinned, **params}
        return self._draw(study, trial, search_space, given)

    def _draw(self, study, trial, search_space, given: dict, *, pinned: bool = False):
        """The values of the parameters not ``given``, a configuration not yet in the study;
        ``pinned``: ``None`` where there is none (else :class:`SpaceExhausted`)."""
        todo = {n: d for n, d in search_space.items() if n not in given and not d.single()}
        if not todo and not pinned:
            return {}
        names = sorted(search_space)
        trials, drawn = self._trials_to_draw_from(study)
        others = [t for t in [*trials, *drawn] if t.number != trial.number]
        seen = _configs(others, names)
        inner = self._sampler(trial)

        def key(params: dict) -> tuple:
            full = {**given, **params}
            return tuple(full[n] if n in full else _single_value(search_space[n]) for n in names)

        if not todo:
            return None if key({}) in seen else {}
        for _ in range(MAX_RESAMPLE):
            params = {n: inner.sample_independent(study, trial, n, d) for n, d in todo.items()}
            if key(params) not in seen:
                return params
        size = _space_size(todo)
        if size is None or size > ENUMERATE_LIMIT:
            # Continuous or huge: repeats are the sampler converging, and rare; run it.
            optuna.logging.get_logger("lepredict").warning(
                f"Trial {trial.number}: {MAX_RESAMPLE} draws all repeated configurations "
                "already in the study; running a repeat.")
            return params
        # A guided sampler can keep proposing the same few configurations of a small space:
        # pick one it has not run, uniformly (and reproducibly).
        unseen = [dict(zip(todo, combo)) for combo in
                  itertools.product(*(_values(d) for d in todo.values()))
                  if key(dict(zip(todo, combo))) not in seen]
        if not unseen:
            if pinned:
                return None
            raise SpaceExhausted(_exhausted_message(study, todo, size))
        return random.Random(self.trial_seed(trial.number)).choice(unseen)


class _Objective:
    """A trial's life, step by step, for the sequential sweep (``__call__``, Optuna's objective)
    and the population sweep (:func:`_run_populations`) alike, so both store the same things."""

    def __init__(self, task: tasks.Task, space: SearchSpace, *, epochs: int, le_epochs, device: str,
                 seed: int, le_k: int | None, probe_size: int):
        self.task, self.space, self.epochs, self.le_epochs = task, space, epochs, list(le_epochs)
        self.device, self.seed, self.le_k, self.probe_size = device, seed, le_k, probe_size

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            self.failed(trial, err)
            raise
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):  # the storage may be what failed
                self.interrupted(trial)
            raise

    @staticmethod
    def failed(trial: optuna.Trial, err: Exception) -> None:
        # Optuna logs a failed trial's error but does not store it: keep it for analysis.
        trial.set_user_attr(f"{ATTR}error", f"{type(err).__name__}: {err}")
        trial.set_user_attr(f"{ATTR}status", "failed")

    @staticmethod
    def interrupted(trial: optuna.Trial) -> None:
        # Its retry is queued now, by the one worker that knows the trial was stopped and not
        # killed: so the next sweep runs it first on any storage (a journal file keeps no
        # heartbeats to find it by) without waiting out a grace period, and no two resuming
        # workers both queue one. Any number of times: a Ctrl-C is no fault of the
        # configuration's, unlike a kill that may be (out of memory), which is retried once.
        # First, so that a second Ctrl-C in what follows loses no retry; from a copy, as the
        # callback appends to the retry history it is given (an in-memory storage hands out its
        # own objects).
        retry = _retry_callback(max_retry=None)
        retry(trial.study, copy.deepcopy(trial.study._storage.get_trial(trial._trial_id)))
        # Not an error of its own. With its number: a retry inherits its original's
        # attributes, the mark included.
        trial.set_user_attr(INTERRUPTED_ATTR, {"trial": trial.number, "reason": (
            "the sweep stopped before this trial's result was told (interrupted)")})
        trial.set_user_attr(f"{ATTR}status", "failed")

    def start(self, trial: optuna.Trial) -> RunConfig:
        """First heartbeat, worker mark, and the trial's configuration."""
        # Optuna's heartbeat thread writes its first beat whenever it gets scheduled; a worker
        # killed before then leaves a trial with no beat, which is never found stale and stays
        # RUNNING for ever. One beat written here makes every started trial recoverable.
        storage = trial.study._storage
        if _heartbeat_interval(storage):
            storage.record_heartbeat(trial._trial_id)
            # Killed before this beat, a trial has no heartbeat at all: the mark tells
            # _fail_stale_trials that one without it, older than the grace period, is dead.
            trial.set_user_attr(_WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(),
                                               "trial": trial.number})
        params = self.space.sample(trial)
        params.setdefault("seed", self.seed + trial.number)
        config = RunConfig.from_dict(params)
        # The generic hyperparameters, fixed ones included, where a pruner reading them (the
        # "screening" model) finds them while the trial runs, as report_spectrum(hparams=) does.
        trial.set_user_attr(HPARAMS, {k: v for k, v in config.to_dict().items()
                                      if k in HPARAM_FIELDS})
        return config

    def report(self, trial: optuna.Trial, epoch: int, rec: RunRecord) -> bool:
        """Store the epoch's spectrum, report its loss; True (the record stored) if pruned."""
        if epoch in rec.spectra:
            trial.set_user_attr(f"{ATTR}spectrum:{epoch}", _jsonable(rec.spectra[epoch]))
        val = rec.val_loss[-1]
        trial.report(self.task.normalised_loss(val) if math.isfinite(val) else math.inf, epoch)
        # should_prune reads the whole trial back from the storage before asking the pruner:
        # a wasted read per epoch where the pruner is Optuna's "never prune". After the last
        # epoch nothing is left to save, and a prune would only discard the finished run.
        if (epoch < self.epochs and type(trial.study.pruner) is not optuna.pruners.NopPruner
                and trial.should_prune()):
            _store(trial, rec, pruned_at=epoch)
            return True
        return False

    @staticmethod
    def finish(trial: optuna.Trial, rec: RunRecord) -> float:
        """Store a run that ended (trained or diverged); its value."""
        stored = trial.user_attrs
        for epoch, spec in rec.spectra.items():  # epochs the callback never saw
            key, value = f"{ATTR}spectrum:{epoch}", _jsonable(spec)
            if stored.get(key) != value:  # each write is a database transaction
                trial.set_user_attr(key, value)
        _store(trial, rec)
        return rec.final_normalised_loss

    def _run(self, trial: optuna.Trial) -> float:
        config = self.start(trial)

        def on_epoch(epoch: int, rec: RunRecord) -> None:
            if self.report(trial, epoch, rec):
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        rec = train_run(config, self.task, epochs=self.epochs, le_epochs=self.le_epochs,
                        device=self.device, callback=on_epoch, le_k=self.le_k,
                        probe_size=self.probe_size)
        return self.finish(trial, rec)


class _Heartbeats:
    """Beats for every trial of a population, from one thread (Optuna's own heartbeat thread
    serves the one trial of ``study.optimize``)."""

    def __init__(self, storage):
        self.storage = storage
        self.interval = _heartbeat_interval(storage)
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = None
        if self.interval:
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = sorted(self.ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # a lost connection: the next beat tries again
                    optuna.logging.get_logger("lepredict").warning(f"Heartbeat failed: {err}")

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()


def _tell(study: optuna.Study, trial: optuna.Trial, callbacks, heartbeats: _Heartbeats,
          value: float | None = None, state=None) -> None:
    """Finish a population's trial and run the sweep's callbacks on it; a trial another worker
    finished first (it found the heartbeat late, failed it and queued its retry) keeps that
    outcome, as in the sequential sweep."""
    heartbeats.discard(trial._trial_id)
    try:
        frozen = study.tell(trial, value, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError as err:
        optuna.logging.get_logger("lepredict").warning(
            f"{err} Another worker finished it first; carrying on.")
        return
    if frozen.state == optuna.trial.TrialState.COMPLETE:  # as study.optimize logs it
        optuna.logging.get_logger("lepredict").info(
            f"Trial {frozen.number} finished with value: {frozen.value} and parameters: "
            f"{frozen.params}.")
    for callback in callbacks:
        callback(study, frozen)


def _fail(study: optuna.Study, trial: optuna.Trial, err: Exception, callbacks,
          heartbeats: _Heartbeats) -> None:
    """Fail a population's trial with its error stored, as the sequential sweep does."""
    try:
        _Objective.failed(trial, err)
    except optuna.exceptions.UpdateFinishedTrialError:
        heartbeats.discard(trial._trial_id)
        return  # another worker finished it first
    _tell(study, trial, callbacks, heartbeats, state=optuna.trial.TrialState.FAIL)


def _ask(study: optuna.Study, *, pop_waiting: bool) -> optuna.Trial:
    """``study.ask()``; without its read of the study for a waiting trial to take when the
    caller's read found none (every read loads every running trial in full)."""
    if not pop_waiting and type(study) is optuna.Study:
        # As ask() does: a sampler other than ours reads the study afresh for the new trial.
        study._thread_local.cached_all_trials = None
        return optuna.Trial(study, study._storage.create_new_trial(study._study_id))
    with warnings.catch_warnings():
        # "Heartbeat ... supposed to be used with Study.optimize": the population beats itself.
        warnings.simplefilter("ignore", UserWarning)
        return study.ask()


def _run_populations(study: optuna.Study, objective: _Objective, *, n_trials: int,
                     population: int, space: SearchSpace, grace: int | None,
                     callbacks: list[Callable], same_shape: bool = False) -> bool:
    """The sweep's loop with populations: ask up to ``population`` trials (fewer when fewer
    are left), train them together (one population per shape, see
    :func:`lepredict.population.group_by_shape`), tell each its outcome; until the study holds
    ``n_trials`` and no retry waits. ``same_shape``: the first trial's shape is pinned for the
    others (:meth:`_PerTrialSampler.pin`). Returns whether the space ran out of
    configurations."""
    log = optuna.logging.get_logger("lepredict")
    exhausted = False
    while not exhausted:
        _fail_stale_trials(study, grace)
        heartbeats = _Heartbeats(study._storage)
        members: list[tuple[optuna.Trial, RunConfig]] = []
        told: set[int] = set()
        # One read of the study per population, not per trial (see _PerTrialSampler.share_read):
        # the count of trials left then follows the numbers of the trials created, each the
        # count of the study's trials before it, whoever created them. A trial that may pop a
        # waiting one (a retry), or whose start failed, reads the study again.
        share = getattr(study.sampler, "share_read", None)
        pin = getattr(study.sampler, "pin", None) if same_shape else None
        asked: list[optuna.Trial] = []  # this population's trials, failed starts included
        mine: list[optuna.Trial] = []  # every trial asked here, whatever became of it
        stopped_by: BaseException | None = None
        try:
            read = study.get_trials(deepcopy=False)
            remaining, waiting = _work_left(study, n_trials, read)
            known = len(read)
            while len(members) < population:
                # One trial at a time, counting again each time: several workers together stop
                # at n_trials as in the sequential sweep, and a population shrinks to what is
                # left. Each trial's parameters are drawn before the next is asked, so the
                # next draw sees them (no repeated configuration within a population).
                if remaining <= 0 and waiting == 0:
                    break
                if waiting == 0 and _is_exhausted(study, space.params, [*read, *asked]):
                    exhausted = True
                    break
                if share is not None:
                    share(read, asked)
                try:
                    trial = _ask(study, pop_waiting=waiting > 0)
                except SpaceExhausted:
                    exhausted = True
                    break
                asked.append(trial)
                mine.append(trial)
                heartbeats.add(trial._trial_id)
                try:
                    members.append((trial, objective.start(trial)))
                    started = True
                    if pin is not None:
                        # The first member's shape, or the one a member had to take once the
                        # pinned shape's configurations ran out: the next members join it.
                        pin({n: trial.params[n] for n in SHAPE_FIELDS if n in trial.params})
                except Exception as err:
                    told.add(trial.number)
                    _fail(study, trial, err, callbacks, heartbeats)
                    if isinstance(err, SpaceExhausted):  # other workers took the last ones
                        exhausted = True
                        break
                    started = False
                if waiting > 0 or not started:
                    read = study.get_trials(deepcopy=False)
                    remaining, waiting = _work_left(study, n_trials, read)
                    known = len(read)
                    asked = [t for t in asked if t.number >= known]
                elif trial.number + 1 > known:
                    remaining -= trial.number + 1 - known
                    known = trial.number + 1
            if not members:
                break
            _train_members(study, objective, members, told, callbacks, heartbeats, log)
        except BaseException as err:
            stopped_by = err
            raise
        finally:
            if share is not None:
                share(None)
            if pin is not None:
                pin(None)
            # Stopped: whatever was not told fails; by Ctrl-C without an error of its own, so a
            # later sweep retries it, as the sequential sweep leaves an interrupted trial. (A
            # trial asked but stopped while it started, before joining, too.)
            for trial in mine:
                if trial.number not in told:
                    told.add(trial.number)
                    with contextlib.suppress(Exception):  # the storage may be what failed
                        if isinstance(stopped_by, KeyboardInterrupt):
                            objective.interrupted(trial)
                        else:
                            objective.failed(trial, stopped_by)
                    _tell(study, trial, callbacks, heartbeats, state=optuna.trial.TrialState.FAIL)
            heartbeats.close()
    return exhausted


def _train_members(study, objective: _Objective, members, told: set[int], callbacks,
                   heartbeats: _Heartbeats, log) -> None:
    for group in group_by_shape([config for _, config in members]):
        trials = [members[i][0] for i in group]

        def decide(member: int, epoch: int, rec: RunRecord) -> bool:
            trial = trials[member]
            try:
                pruned = objective.report(trial, epoch, rec)
            except optuna.exceptions.UpdateFinishedTrialError as err:
                log.warning(f"{err} Another worker finished it first; carrying on.")
                told.add(trial.number)
                heartbeats.discard(trial._trial_id)
                return True
            except Exception as err:
                told.add(trial.number)
                _fail(study, trial, err, callbacks, heartbeats)
                return True
            if pruned:
                told.add(trial.number)
                log.info(f"Trial {trial.number} pruned after epoch {epoch}.")
                _tell(study, trial, callbacks, heartbeats, state=optuna.trial.TrialState.PRUNED)
            return pruned

        # Storing an epoch and asking the pruner is a few database transactions per trial,
        # as long as the population's epoch of training on a busy disk: one thread does them,
        # in order, while the members train on (a member it prunes drops that epoch).
        writer = ThreadPoolExecutor(1, thread_name_prefix="lepredict-population")
        try:
            recs = train_population([members[i][1] for i in group], objective.task,
                                    epochs=objective.epochs, le_epochs=objective.le_epochs,
                                    device=objective.device, le_k=objective.le_k,
                                    probe_size=objective.probe_size,
                                    on_epoch=lambda *args: writer.submit(decide, *args))
        except Exception as err:  # the whole group fails, as one trial's error fails it
            writer.shutdown(wait=True)
            for trial in trials:
                if trial.number not in told:
                    told.add(trial.number)
                    _fail(study, trial, err, callbacks, heartbeats)
            continue
        finally:
            writer.shutdown(wait=True)
        for trial, rec in zip(trials, recs):
            if trial.number in told:
                continue
            told.add(trial.number)
            try:
                value = objective.finish(trial, rec)
            except optuna.exceptions.UpdateFinishedTrialError as err:
                log.warning(f"{err} Another worker finished it first; carrying on.")
                heartbeats.discard(trial._trial_id)
                continue
            except Exception as err:
                _fail(study, trial, err, callbacks, heartbeats)
                continue
            _tell(study, trial, callbacks, heartbeats, value=value)


def _store(trial: optuna.Trial, rec: RunRecord, pruned_at: int | None = None) -> None:
    d = rec.to_dict()
    d.pop("spectra")
    if pruned_at is not None:
        d["status"] = "pruned"
        d["pruned_at"] = pruned_at
    trial.set_user_attr(f"{ATTR}run", _jsonable(d))
    trial.set_user_attr(f"{ATTR}status", d["status"])


def run_sweep(
    task: str | tasks.Task,
    *,
    n_trials: int,
    epochs: int = 10,
    le_epochs=(0, 1, 2, 3),
    storage=None,
    study_name: str = "lepredict",
    space: SearchSpace | None = None,
    task_options: dict | None = None,
    device: str = "cpu",
    n_jobs: int = 1,
    sampler: str = "tpe",
    pruner: optuna.pruners.BasePruner | None = None,
    seed: int = 0,
    le_k: int | None = MEASURED_EXPONENTS,
    probe_size: int = PROBE_SIZE,
    show_progress_bar: bool = True,
    callbacks: list[Callable] | None = None,
    heartbeat_interval: int = 30,
    grace_period: int = 90,
    population: int = 1,
    same_shape: bool = False,
) -> optuna.Study:
    """Run (or resume) a sweep until the study holds ``n_trials`` trials.

    ``n_trials`` counts the study's trials in any state but waiting (a killed trial that was
    retried counts through its retry), so several workers (processes or machines) pointed at the
    same study share the work and together stop at about ``n_trials`` (at most ``n_workers - 1``
    over, never a lost trial). First, trials whose worker was killed
    (no heartbeat for ``grace_period`` seconds) are failed and their retries queued; queued
    (waiting) trials always run, even once the count is reached. When this returns, no trial of
    this worker is left running; trials still running belong to other workers (or to killed ones
    not yet past the grace period).

    Configurations come from a sampler seeded per trial with ``seed`` and the trial number, so
    workers started alike and resumed sweeps draw distinct ones, and the same seed and trial
    number give the same configuration. A configuration already in the study is not drawn
    again.

    Args:
        task: Task name, ``"module:function"`` of a task of one's own (stored as given, so a
            resume rebuilds it; see :func:`lepredict.tasks.get`), or a task object.
        n_trials: Trials the study should hold in total, failed ones included except killed
            ones that were retried (their retry counts instead).
        epochs: Training epochs per trial.
        le_epochs: Epochs after which to measure the spectrum (0: at initialisation).
        storage: A URL, a journal file path, ``None`` (``studies/STUDY_NAME.db``) or an Optuna
            storage object (see :func:`make_storage`).
        study_name: The study to create or resume.
        space: The search space (default :data:`DEFAULT_SPACE`).
        task_options: Options of ``task`` when it is a name.
        device: Torch device of the training runs.
        n_jobs: Trials at once in this process (threads).
        sampler: ``"tpe"`` or ``"random"``.
        pruner: Optuna pruner (default: none).
        seed: Seeds the sampler (per trial, with the trial number) and each run's initialisation
            (``seed + trial number`` unless the space sets ``seed``).
        le_k: Leading exponents per spectrum (at most the state size), with the sum of all;
            by default what the predictor uses; ``None`` for full spectra.
        probe_size: Validation sequences each spectrum averages over.
        show_progress_bar: A tqdm bar over this worker's trials.
        callbacks: Optuna callbacks, called after each of this worker's trials.
        heartbeat_interval: Seconds between heartbeats (see :func:`make_storage`); ignored when
            ``storage`` is a storage object.
        grace_period: Seconds without a heartbeat after which a trial counts as killed.
        population: Trials trained together as one batched computation
            (:func:`lepredict.population.train_population`): this worker asks up to this many
            trials at once (fewer when fewer are left to run), trains them together, and
            reports each trial's losses and spectra to it at every epoch, so the pruner prunes
            members one by one; each trial stores what a sequential run stores. Trials whose
            shapes differ (:data:`lepredict.population.SHAPE_FIELDS`: architecture, size,
            layers, optimizer, batch size) are trained as separate populations, one after the
            other: a space that samples those gives smaller populations. 1 (the default) trains
            one trial after another; more than 1 cannot be combined with ``n_jobs > 1``.
        same_shape: With ``population > 1``: the first trial of each population is drawn as
            usual, and the others take its shape (the :data:`~lepredict.population.SHAPE_FIELDS`
            the space samples) and draw the rest, so populations stay full in a space that
            samples shapes. Each trial's shape is still the sampler's draw for the first, and
            the first's for the others (as if drawn once per population); where every
            configuration of that shape is in the study, a trial is drawn from the whole space.

    Returns:
        The study.

    Raises:
        ValueError: Bad arguments, a study run with another setup, or a finite search space whose
            every configuration is already in the study (:class:`SpaceExhausted`) while trials
            are still to run.
    """
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials=}.")
    if not isinstance(n_jobs, int) or n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive int, got {n_jobs=}.")
    if not isinstance(population, int) or isinstance(population, bool) or population < 1:
        raise ValueError(f"population must be a positive int (1: one trial at a time), got "
                         f"{population=}.")
    if same_shape and population == 1:
        raise ValueError("same_shape=True shapes populations: give population > 1 with it.")
    if population > 1 and n_jobs > 1:
        raise ValueError(f"population={population} and n_jobs={n_jobs} cannot be combined: a "
                         "population already keeps the cores busy; use one of them.")
    # Before the study exists: inside each trial these would fail every trial, and the study
    # would keep the bad setup. (The setup stores le_epochs as given, as it always has.)
    le_epochs = list(le_epochs)
    task_options = dict(task_options or {})
    task_obj = task if isinstance(task, tasks.Task) else tasks.get(task, **task_options)
    checked_schedule(epochs, le_epochs, probe_size, task_obj)
    checked_device(device)
    space = space or DEFAULT_SPACE
    samplers = {"tpe": lambda s: optuna.samplers.TPESampler(seed=s),
                "random": lambda s: optuna.samplers.RandomSampler(seed=s)}
    if sampler not in samplers:
        raise ValueError(f"sampler must be one of {sorted(samplers)}, got {sampler=}.")
    # Before make_storage, whose SQLite connections switch the file to write-ahead logging: a
    # store that is refused is left as it was.
    checked = (not isinstance(storage, optuna.storages.BaseStorage)
               and _check_existing_study(storage, study_name, space))
    store = make_storage(storage, study_name, heartbeat_interval=heartbeat_interval,
                         grace_period=grace_period)
    if getattr(store, "heartbeat_interval", None):  # as Optuna's default when none is set
        grace = getattr(store, "grace_period", None) or 2 * store.heartbeat_interval
    else:
        grace = None  # no heartbeat: killed workers' trials cannot be told from running ones
    if not checked:  # a storage object given, or a store that could not be read before
        try:
            _check_sweep_study(optuna.load_study(study_name=study_name, storage=store),
                               study_name)
        except KeyError:
            pass  # a new study
    study = optuna.create_study(
        storage=store,
        study_name=study_name,
        direction="minimize",
        sampler=_PerTrialSampler(samplers[sampler], seed, space.params),
        pruner=pruner or optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    trials = study.get_trials(deepcopy=False)
    _check_space_kinds(study, space, trials)
    _check_enqueued(study, space, trials)
    # A task of one's own is stored as the module:function that builds it, not the name its
    # Task carries: a resume, and trials_frame, rebuild it from what is stored.
    task_name = task if isinstance(task, str) and ":" in task else task_obj.name
    setup = {"task": task_name, "task_options": task_obj.options, "epochs": epochs,
             "le_epochs": sorted(int(e) for e in le_epochs)}
    previous = study.user_attrs.get(f"{ATTR}setup")
    if previous is None:
        # The values it reports are normalised losses (chance loss 1.0); the task's own chance
        # loss and threshold travel with the study for readers that cannot rebuild the task.
        study.set_user_attr(f"{ATTR}setup", _jsonable({
            **setup, "chance_loss": task_obj.chance_loss, "threshold": task_obj.threshold,
            "reported": "normalised"}))
    elif {k: previous.get(k) for k in setup} != _jsonable(setup):
        raise ValueError(
            f"Study {study_name!r} was run with {previous}, not {setup}; resume it with the same "
            "task and epochs, or pick another --study-name."
        )
    if n_jobs > 1:
        # Threads share the process: split the cores instead of oversubscribing them, which
        # slows small-tensor work by orders of magnitude.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))
    # Optuna looks for killed workers' trials only before starting one: a resume with the count
    # already reached would otherwise leave them RUNNING, and their retries WAITING, for ever.
    _fail_stale_trials(study, grace)
    remaining, waiting = _work_left(study, n_trials)
    if remaining <= 0 and waiting == 0:
        return study
    if waiting == 0 and _is_exhausted(study, space.params):
        raise SpaceExhausted(_exhausted_message(study, space.params, _space_size(space.params)))
    objective = _Objective(task_obj, space, epochs=epochs, le_epochs=le_epochs, device=device,
                           seed=seed, le_k=le_k, probe_size=probe_size)
    bar = _Progress(max(remaining, 0) + waiting, study) if show_progress_bar else None
    stop = _StopWhenDone(n_trials, space.params, grace)
    cbs = [stop] + list(callbacks or [])
    if bar is not None:
        cbs.append(bar)
    if population > 1:
        try:
            exhausted = _run_populations(study, objective, n_trials=n_trials,
                                         population=population, space=space, grace=grace,
                                         callbacks=cbs[1:], same_shape=same_shape)
        finally:
            if bar is not None:
                bar.close()
        if exhausted:
            raise SpaceExhausted(_exhausted_message(study, space.params,
                                                    _space_size(space.params)))
        return study
    try:
        while True:
            try:
                # No trial count: the callback stops this worker when the study's count is
                # reached and no retry waits, whoever ran the trials and however many retries
                # turned up meanwhile.
                study.optimize(objective, n_trials=None, n_jobs=n_jobs, callbacks=cbs,
                               catch=(Exception,))
            except optuna.exceptions.UpdateFinishedTrialError as err:
                # Another worker finished this trial first: it found the heartbeat late (a busy
                # machine or database) and failed it, retrying it; or, on SQLite, which has no
                # row locks, it took the same waiting retry. Its outcome stands: carry on.
                optuna.logging.get_logger("lepredict").warning(
                    f"{err} Another worker finished it first; carrying on.")
                remaining, waiting = _work_left(study, n_trials)
                if not stop.exhausted and (remaining > 0 or waiting > 0):
                    continue
            break
    finally:
        if bar is not None:
            bar.close()
    if stop.exhausted:
        raise SpaceExhausted(_exhausted_message(study, space.params, _space_size(space.params)))
    return study


def _retried(trials) -> set[int]:
    """Numbers of the trials that have a retry (a retry lists its original last in its history)."""
    return {n for n in map(retry_of, trials) if n is not None}


def _work_left(study: optuna.Study, n_trials: int, trials=None) -> tuple[int, int]:
    """(trials still to start to reach ``n_trials``, possibly negative; waiting trials).

    Waiting trials (retries, enqueued ones) are work to do, not work done; a killed trial that
    has a retry does not count, its retry does: killing workers does not shrink the sweep.
    ``trials``: the study's trials if just read, else they are read now.
    """
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    retried = _retried(trials)
    replaced = sum(t.state == optuna.trial.TrialState.FAIL and t.number in retried for t in trials)
    return n_trials - (len(trials) - waiting - replaced), waiting


def _retry_callback(max_retry: int | None):
    """Optuna's callback that queues a failed trial's retry (renamed in Optuna 4.9)."""
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return (retry or optuna.storages.RetryFailedTrialCallback)(max_retry=max_retry)


class _RetryUnlessRetried:
    """A database's stale-trial callback: Optuna's retry, unless the trial has one queued
    already, or the kills in its retry history (its own included) exceed ``max_retry``.

    A Ctrl-C queues the retry of the trial it stops before Optuna fails that trial: a kill in
    between leaves it running, to be found stale later, and retried a second time. And only
    kills count, as Ctrl-Cs are no fault of the configuration's: Optuna's own count would
    let an earlier Ctrl-C use up the retry a later kill is due."""

    def __init__(self, max_retry: int | None):
        self.max_retry = max_retry
        self._retry = _retry_callback(max_retry=None)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        if trial.number not in _retried(trials) and not retries_used_up(trial, trials,
                                                                        self.max_retry):
            self._retry(study, trial)


def retries_used_up(trial, trials, max_retry: int | None = 1) -> bool:
    """Whether a stopped ``trial`` (one of the study's ``trials``) is retried no more: its
    retry history, itself included, holds more than ``max_retry`` kills (a database retries a
    killed trial once; Ctrl-Cs do not count, being no fault of the configuration's)."""
    if max_retry is None:
        return False
    by_number = {t.number: t for t in trials}
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    return sum(not interrupted_here(by_number.get(n, trial)) for n in history) > max_retry


def _heartbeat_interval(storage) -> int | None:
    """The storage's heartbeat interval; ``None`` for one that keeps no heartbeats."""
    return getattr(storage, "get_heartbeat_interval", lambda: None)()


def retries_stopped_trials(study: optuna.Study) -> bool:
    """Whether a later sweep fails and retries this study's killed trials: its storage keeps
    heartbeats (a database made by :func:`make_storage`; a journal file none). A trial a
    Ctrl-C stopped has its retry queued at once, on any storage."""
    return bool(_heartbeat_interval(study._storage))


def interrupted_here(trial) -> bool:
    """Whether a Ctrl-C stopped ``trial`` itself (its :data:`INTERRUPTED_ATTR`, not one a
    retry inherited from its original)."""
    return interrupted_reason(trial) is not None


#: Written right after a trial's first heartbeat: the worker (host, pid) and trial number.
_WORKER_ATTR = f"{ATTR}worker"
#: Marks a trial a Ctrl-C stopped (:data:`lepredict.records.INTERRUPTED`).
INTERRUPTED_ATTR = INTERRUPTED


def _fail_stale_trials(study: optuna.Study, grace_period: int | None) -> None:
    """Fail the running trials whose worker was killed and queue their retries (RDB storages).

    Optuna's ``fail_stale_trials`` misses two ways a killed worker loses a trial, both found by
    killing workers at random: killed between creating a trial and writing its first heartbeat
    (milliseconds, longer while the database is busy), the trial has no heartbeat and stays
    RUNNING for ever; killed while failing another worker's stale trial, between failing it and
    queueing its retry, that trial is never retried. So a running trial without the mark written
    after the first beat, started more than the grace period ago, is failed and retried; and a
    failed trial without an error of its own (killed or interrupted, not raised) and without a
    retry, failed more than the grace period ago, gets its retry. Two workers repairing the same
    trial in the same instant could both queue one; that needs a second kill in that window.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if not grace_period:
        return
    storage = study._storage
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace_period)
    retry = storage.get_heartbeat_stale_trial_callback()
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    for t in trials:
        # A retry inherits its original's user attributes, the mark included: it must be its own.
        marked = (t.user_attrs.get(_WORKER_ATTR) or {}).get("trial") == t.number
        if (t.state == optuna.trial.TrialState.RUNNING and not marked
                and t.datetime_start is not None and t.datetime_start < cutoff):
            try:
                if not storage.set_trial_state_values(t._trial_id,
                                                      state=optuna.trial.TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first, and retries it
            if retry is not None:
                retry(study, storage.get_trial(t._trial_id))
        elif (t.state == optuna.trial.TrialState.FAIL and t.number not in retried
              and f"{ATTR}error" not in t.user_attrs and t.datetime_complete is not None
              and t.datetime_complete < cutoff and retry is not None):
            retry(study, copy.deepcopy(t))  # it declines once the trial's retries are used up


class _StopWhenDone:
    """Stops the worker once the study holds ``n_trials`` counted trials and no retry waits.

    Unlike Optuna's ``MaxTrialsCallback``, a retry queued for a killed trial still runs when the
    count is reached; and a finite space whose configurations have all been run stops the sweep
    rather than failing one trial after another.
    """

    def __init__(self, n_trials: int, space: dict[str, BaseDistribution],
                 grace_period: int | None):
        self.n_trials, self.space, self.grace_period = n_trials, space, grace_period
        self.exhausted = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        _fail_stale_trials(study, self.grace_period)  # a killed worker's trial found now runs now
        remaining, waiting = _work_left(study, self.n_trials)
        if remaining <= 0 and waiting == 0:
            study.stop()
        elif waiting == 0 and _is_exhausted(study, self.space):
            self.exhausted = True
            study.stop()


class _Progress:
    """tqdm bar over this worker's trials with the study's done/pruned/diverged/failed counts."""

    def __init__(self, total: int, study: optuna.Study):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=study.study_name, unit="trial")
        self.counts = {"ok": 0, "pruned": 0, "diverged": 0, "failed": 0}

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = trial.state
        if state == optuna.trial.TrialState.PRUNED:
            key = "pruned"
        elif state == optuna.trial.TrialState.FAIL:
            key = "failed"
        else:
            key = "diverged" if trial.user_attrs.get(f"{ATTR}status") == "diverged" else "ok"
        self.counts[key] += 1
        self.bar.set_postfix(self.counts, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def trials_frame(study: optuna.Study, *, finished_only: bool = False,
                 steps_per_epoch: int | None = None):
    """One row per trial: params, outcome, curves and spectra per epoch (lists in cells).

    Any single-objective study reads: one made by ``lepredict sweep``, or by a loop of one's
    own (see :func:`lepredict.records.trial_row` for what its rows hold). ``epochs`` is the
    sweep's, or for a study of one's own the last epoch its finished trials reported (its
    horizon). ``finished_only`` leaves out running and waiting trials.

    ``steps_per_epoch``: a loop of one's own that reports by iteration (``trial.report(loss,
    step)`` every so many batches) has its losses and spectra read at the ends of epochs, steps
    ``e * steps_per_epoch``. By default each trial's is what its
    :class:`~lepredict.LyapunovPruner` read it with (recorded with its decisions), else the
    study's most common such value, else 1 (steps are epochs).

    Raises:
        ValueError: a study with several objectives, a ``steps_per_epoch`` that is not a
            positive int.
    """
    import pandas as pd

    if len(study.directions) > 1:
        raise ValueError(
            f"Study {study.study_name!r} has {len(study.directions)} objectives ("
            f"{', '.join(d.name.lower() for d in study.directions)}); lepredict reads "
            "single-objective studies: make one with optuna.create_study(direction=...).")
    direction = study.direction.name.lower()
    setup = dict(study.user_attrs.get(f"{ATTR}setup", {}))
    chance, threshold = None, None
    if setup.get("task"):
        try:  # the task's chance loss and threshold travel with the export, for offline labels
            task = tasks.get(setup["task"], **setup.get("task_options", {}))
            chance, threshold = task.chance_loss, task.threshold
        except (KeyError, ValueError, TypeError):
            pass  # a custom task not registered in this process
    if steps_per_epoch is not None:
        check_steps_per_epoch(steps_per_epoch)
    trials = study.get_trials(deepcopy=False)
    spe = steps_per_epoch_by_trial(trials, steps_per_epoch)
    if finished_only:
        trials = [t for t in trials if t.state.name in FINISHED_STATES]
    if setup.get("epochs") is None:
        ends = [t.last_step // spe[t.number] for t in trials if t.state.name == "COMPLETE"
                and t.last_step is not None]
        setup["epochs"] = max(ends) if ends else None
    rows = [trial_row(t, study.study_name, setup, chance, threshold, direction=direction,
                      steps_per_epoch=spe[t.number])
            for t in trials]
    return pd.DataFrame(rows)


def record_frame(record: RunRecord, task: tasks.Task) -> pd.DataFrame:
    """A :class:`RunRecord` as a one-row trials frame, to get features of a run made outside a
    study."""
    import pandas as pd

    meta = {
        "study": "", "number": 0, "state": "COMPLETE", "value": record.final_normalised_loss,
        "status": record.status, "task": task.name,
        "task_options": json.dumps(task.options, sort_keys=True), "epochs": record.epochs,
        "chance_loss": task.chance_loss, "threshold": task.threshold, "fail_reason": None,
    }
    run = _jsonable(record.to_dict())
    return pd.DataFrame([run_row(meta, run, record.config, run["spectra"])])


def _as_one_type(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each column Parquet cannot hold as one type (a categorical parameter's
    choices 32 and "auto") as text, as a CSV holds it (lists as JSON); missing values stay
    missing."""
    import pyarrow as pa

    def text(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return json.dumps(v) if isinstance(v, list) else str(v)

    out = frame
    for column in frame.columns[frame.dtypes == object]:
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            out = out.copy() if out is frame else out
            out[column] = frame[column].map(text)
    return out


def export_trials(study: optuna.Study, path: str | os.PathLike, *,
                  finished_only: bool = False, steps_per_epoch: int | None = None) -> int:
    """Write :func:`trials_frame` to Parquet (``.parquet``) or CSV (``.csv``, list cells as
    JSON); returns the number of rows. ``finished_only`` leaves out running and waiting
    trials; ``steps_per_epoch`` as :func:`trials_frame` takes it."""
    path = Path(path)
    frame = trials_frame(study, finished_only=finished_only, steps_per_epoch=steps_per_epoch)
    if path.suffix == ".parquet":
        _as_one_type(frame).to_parquet(path, index=False)
    elif path.suffix == ".csv":
        listy = [c for c in frame.columns if frame[c].map(lambda v: isinstance(v, list)).any()]
        out = frame.copy()
        for c in listy:
            out[c] = out[c].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
        out.to_csv(path, index=False)
    else:
        raise ValueError(f"Cannot tell the format of {str(path)!r}: name it .parquet or .csv.")
    return len(frame)


def fill_fixed_params(frame, space: SearchSpace | str | os.PathLike):
    """``frame`` (an export read back) with the hyperparameters ``space`` did not sample filled
    in: each ``[fixed]`` value, and :class:`~lepredict.train.RunConfig`'s default for a field
    the space neither samples nor fixes (what ``lepredict sweep`` ran with that space).

    Exports record every run's whole configuration (``param_*`` columns); exports written by
    lepredict before they did hold only the sampled ones, and the ``"hparams"`` features would
    read a missing value as their own default (batch size 64, not the 32 the corpus ran with).
    This fills only cells that are missing (a missing column, or NaN), so a complete export is
    returned unchanged. ``space``: a :class:`SearchSpace` or what :func:`load_space` takes.

    Raises:
        ValueError: a run whose recorded value of a fixed hyperparameter differs from the
            space's: the export was not swept in that space.

    Example:
        >>> import pandas as pd
        >>> old = pd.DataFrame({"study": ["s"], "param_arch": ["gru"], "param_lr": [0.01]})
        >>> filled = fill_fixed_params(old, "studies/corpus.toml")  # doctest: +SKIP
        >>> int(filled.loc[0, "param_batch_size"]), filled.loc[0, "param_init"]  # doctest: +SKIP
        (32, 'uniform')
    """
    import pandas as pd

    if not isinstance(space, SearchSpace):
        space = load_space(space)
    defaults = RunConfig().to_dict()
    values = {name: space.fixed.get(name, defaults[name]) for name in defaults
              if name not in space.params and name != "seed"}
    frame = frame.copy()
    for name, value in values.items():
        column = f"param_{name}"
        if column not in frame:
            frame[column] = [value] * len(frame)
            continue
        given = frame[column].notna()
        differs = given & (frame[column].astype(object) != value)
        if isinstance(value, float):
            differs = given & ~pd.to_numeric(frame[column], errors="coerce").eq(value)
        if differs.any():
            first = frame.loc[differs].iloc[0]
            recorded = first[column].item() if hasattr(first[column], "item") else first[column]
            raise ValueError(
                f"Run {first.get('study')}#{first.get('number')} has {name}={recorded!r}, but "
                f"the search space fixes {name}={value!r}: it was not swept in that space.")
        if given.all():
            continue
        filled = frame[column].astype(object).where(given, value)
        # NaN made an int column float: give it back its type.
        kind = "int64" if isinstance(value, int) and not isinstance(value, bool) else (
            "float64" if isinstance(value, float) else object)
        frame[column] = filled.astype(kind)
    return frame


def read_trials(path: str | os.PathLike):
    """Read an export back, with list cells as lists whichever the format."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        from pyarrow import types as pa_types

        table = pq.read_table(path)
        frame = table.to_pandas()
        for field in table.schema:
            if pa_types.is_list(field.type) or pa_types.is_large_list(field.type):
                # Through arrow's own lists: pandas would read a null entry (an epoch without
                # a loss) as NaN, a diverged run's value.
                frame[field.name] = table.column(field.name).to_pylist()
        return frame
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        for c in frame.columns:
            if c in ("train_loss", "val_loss", "grad_norm", "steps", "values") or (c.startswith("le") and c.endswith(("_mean", "_std"))):
                frame[c] = frame[c].map(lambda v: json.loads(v) if isinstance(v, str) else v)
        return frame
    raise ValueError(f"Cannot tell the format of {str(path)!r}: expected .parquet or .csv.")
