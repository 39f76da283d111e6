"""Optuna sweeps of short training runs that record early spectra in the study's storage.

Each trial samples a :class:`~lepredict.train.RunConfig` from a search space, trains it with
:func:`~lepredict.train.train_run`, and stores in the trial's user attributes (prefix
``lepredict:``) its curves, weight statistics, spectra (one attribute per measured epoch, written
as soon as the epoch ends so a pruner can read it), status and timings; the trial's value is the
final normalised validation loss (``inf`` for a diverged run). Intermediate values are the
normalised validation loss per epoch, so Optuna's pruners work unchanged.

Storage is whatever Optuna takes: a SQLite or PostgreSQL URL (run with a heartbeat, so a trial
whose worker was killed is marked failed and retried when the sweep resumes), or a journal file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from lepredict import tasks
from lepredict.records import ATTR, RunRecord, run_row, trial_row
from lepredict.records import jsonable as _jsonable
from lepredict.train import PROBE_SIZE, RunConfig, train_run

__all__ = [
    "ATTR",
    "DEFAULT_SPACE",
    "SearchSpace",
    "export_trials",
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
    storage object, returned as it is."""
    if isinstance(url, optuna.storages.BaseStorage):
        return url
    if url is None:
        Path(studies_dir).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(studies_dir) / f'{study_name}.db'}"
    if "://" not in url:
        if url.endswith((".log", ".jsonl")):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(url))
        raise ValueError(f"Storage {url!r} is neither a database URL (sqlite:///..., "
                         "postgresql://...) nor a journal file path ending in .log or .jsonl.")
    # The heartbeat lets a resumed sweep find trials whose worker died (RUNNING forever
    # otherwise), mark them failed, and run them again once.
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback",
                    optuna.storages.RetryFailedTrialCallback)
    import sqlalchemy.exc

    # Workers started together on an empty database all try to create Optuna's schema; all but
    # one lose the race with a duplicate-key error. The schema then exists, so trying again works.
    for attempt in range(SCHEMA_RETRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=retry(max_retry=1),
                    engine_kwargs={"pool_pre_ping": True},
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError) as err:
            # SQLite reports the same race as "table ... already exists" or a locked database.
            race = not isinstance(err, sqlalchemy.exc.OperationalError) or any(
                word in str(err) for word in ("already exists", "locked"))
            if not race or attempt == SCHEMA_RETRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


class _Objective:
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
            # Optuna logs a failed trial's error but does not store it: keep it for analysis.
            trial.set_user_attr(f"{ATTR}error", f"{type(err).__name__}: {err}")
            trial.set_user_attr(f"{ATTR}status", "failed")
            raise

    def _run(self, trial: optuna.Trial) -> float:
        # Optuna's heartbeat thread writes its first beat whenever it gets scheduled; a worker
        # killed before then leaves a trial with no beat, which is never found stale and stays
        # RUNNING for ever. One beat written here makes every started trial recoverable.
        storage = trial.study._storage
        if getattr(storage, "get_heartbeat_interval", lambda: None)():
            storage.record_heartbeat(trial._trial_id)
        params = self.space.sample(trial)
        params.setdefault("seed", self.seed + trial.number)
        config = RunConfig.from_dict(params)

        def on_epoch(epoch: int, rec: RunRecord) -> None:
            if epoch in rec.spectra:
                trial.set_user_attr(f"{ATTR}spectrum:{epoch}", _jsonable(rec.spectra[epoch]))
            val = rec.val_loss[-1]
            trial.report(self.task.normalised_loss(val) if math.isfinite(val) else math.inf, epoch)
            if trial.should_prune():
                _store(trial, rec, pruned_at=epoch)
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        rec = train_run(config, self.task, epochs=self.epochs, le_epochs=self.le_epochs,
                        device=self.device, callback=on_epoch, le_k=self.le_k,
                        probe_size=self.probe_size)
        for epoch, spec in rec.spectra.items():  # epochs the callback never saw (divergence)
            trial.set_user_attr(f"{ATTR}spectrum:{epoch}", _jsonable(spec))
        _store(trial, rec)
        return rec.final_normalised_loss


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
    le_k: int | None = None,
    probe_size: int = PROBE_SIZE,
    show_progress_bar: bool = True,
    callbacks: list[Callable] | None = None,
) -> optuna.Study:
    """Run (or resume) a sweep until the study holds ``n_trials`` trials.

    ``n_trials`` counts the study's trials in any state but waiting, so several workers (processes or
    machines) pointed at the same study share the work and together stop at about ``n_trials``
    (Optuna's ``MaxTrialsCallback``: at most ``n_workers - 1`` over, never a lost trial).
    ``storage`` is a URL, a journal file path, ``None`` (``studies/STUDY_NAME.db``) or an Optuna
    storage object (see :func:`make_storage`).
    """
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials=}.")
    if not isinstance(n_jobs, int) or n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive int, got {n_jobs=}.")
    task_options = dict(task_options or {})
    task_obj = task if isinstance(task, tasks.Task) else tasks.get(task, **task_options)
    space = space or DEFAULT_SPACE
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    if sampler not in samplers:
        raise ValueError(f"sampler must be one of {sorted(samplers)}, got {sampler=}.")
    study = optuna.create_study(
        storage=make_storage(storage, study_name),
        study_name=study_name,
        direction="minimize",
        sampler=samplers[sampler](),
        pruner=pruner or optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    setup = {"task": task_obj.name, "task_options": task_obj.options, "epochs": epochs,
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
    # Enqueued (WAITING) trials are work to do, not work done.
    counted = tuple(s for s in optuna.trial.TrialState if s != optuna.trial.TrialState.WAITING)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=counted))
    if remaining <= 0:
        return study
    objective = _Objective(task_obj, space, epochs=epochs, le_epochs=le_epochs, device=device,
                           seed=seed, le_k=le_k, probe_size=probe_size)
    bar = _Progress(remaining, study) if show_progress_bar else None
    cbs = [optuna.study.MaxTrialsCallback(n_trials, states=counted)] + list(callbacks or [])
    if bar is not None:
        cbs.append(bar)
    try:
        study.optimize(objective, n_trials=remaining, n_jobs=n_jobs, callbacks=cbs,
                       catch=(Exception,))
    finally:
        if bar is not None:
            bar.close()
    return study


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


def trials_frame(study: optuna.Study):
    """One row per trial: params, outcome, curves and spectra per epoch (lists in cells)."""
    import pandas as pd

    setup = study.user_attrs.get(f"{ATTR}setup", {})
    chance, threshold = None, None
    if setup.get("task"):
        try:  # the task's chance loss and threshold travel with the export, for offline labels
            task = tasks.get(setup["task"], **setup.get("task_options", {}))
            chance, threshold = task.chance_loss, task.threshold
        except (KeyError, ValueError, TypeError):
            pass  # a custom task not registered in this process
    rows = [trial_row(t, study.study_name, setup, chance, threshold)
            for t in study.get_trials(deepcopy=False)]
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


def export_trials(study: optuna.Study, path: str | os.PathLike) -> int:
    """Write :func:`trials_frame` to Parquet (``.parquet``) or CSV (``.csv``, list cells as
    JSON); returns the number of rows."""
    path = Path(path)
    frame = trials_frame(study)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        listy = [c for c in frame.columns if frame[c].map(lambda v: isinstance(v, list)).any()]
        out = frame.copy()
        for c in listy:
            out[c] = out[c].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
        out.to_csv(path, index=False)
    else:
        raise ValueError(f"Cannot tell the format of {str(path)!r}: name it .parquet or .csv.")
    return len(frame)


def read_trials(path: str | os.PathLike):
    """Read an export back, with list cells as lists whichever the format."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        for c in frame.columns:
            if frame[c].map(lambda v: hasattr(v, "tolist") and not isinstance(v, str)).any():
                frame[c] = frame[c].map(lambda v: v.tolist() if hasattr(v, "tolist") else v)
        return frame
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        for c in frame.columns:
            if c in ("train_loss", "val_loss", "grad_norm") or (c.startswith("le") and c.endswith(("_mean", "_std"))):
                frame[c] = frame[c].map(lambda v: json.loads(v) if isinstance(v, str) else v)
        return frame
    raise ValueError(f"Cannot tell the format of {str(path)!r}: expected .parquet or .csv.")
