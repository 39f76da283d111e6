"""The record schema every room shares: what a run measured, and how a trial stores it.

A run (:class:`RunRecord`, made by :func:`lepredict.train_run`) becomes one row of a *trials
frame*: the table that sweeps export, features are computed from, predictors are fitted on and
the pruner builds for a live trial. A trial stores its run in Optuna user attributes under the
prefix :data:`ATTR`; the names of those attributes and the columns of a row are defined here and
nowhere else, so the sweep, the pruner, the features and the exports agree without reaching into
each other.

User attributes of a trial (all optional but the spectra):

* ``lepredict:spectrum:STEP``: a spectrum measured at report step ``STEP`` (:func:`spectrum_dict`).
* ``lepredict:val_loss:STEP``: the validation loss at ``STEP``, when the study's own values are
  something else (an accuracy in a maximising study).
* ``lepredict:chance_loss``: the chance loss the trial's losses are divided by (1.0 when they are
  already normalised).
* ``lepredict:hparams``: the trial's generic hyperparameters (:data:`HPARAM_FIELDS`), as given to
  :func:`~lepredict.report_spectrum` (``hparams=``), inferred by
  :func:`~lepredict.measure_and_report`, or stored by ``lepredict sweep``: what predictors
  reading hyperparameters (the ``"screening"`` model) use, whatever the trial's own parameters
  are called.
* ``lepredict:run``, ``lepredict:status``, ``lepredict:error``: what ``lepredict sweep`` stores.
* ``lepredict:prediction:STEP``: what :class:`~lepredict.LyapunovPruner` predicted and decided.

Study attribute ``lepredict:setup``: what ``lepredict sweep`` ran (task, options, epochs, and the
task's chance loss and threshold).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
from collections.abc import Mapping

__all__ = [
    "ATTR",
    "HPARAM_FIELDS",
    "HParamField",
    "MEASURED_EXPONENTS",
    "RunRecord",
    "check_hparams",
    "check_steps_per_epoch",
    "complete_hparams",
    "exponent_total",
    "interrupted_reason",
    "is_count",
    "jsonable",
    "own_attrs",
    "retry_of",
    "run_row",
    "spectrum_dict",
    "spectrum_of",
    "steps_per_epoch_by_trial",
    "steps_per_epoch_of",
    "trial_row",
]

#: How many leading exponents a measurement takes by default (with the sum of all of them): what
#: the ``"spectrum"`` features of :mod:`lepredict.features` use, so nothing more is computed.
MEASURED_EXPONENTS = 16

#: Prefix of every user attribute lepredict writes.
ATTR = "lepredict:"
SPECTRUM = f"{ATTR}spectrum:"
VAL_LOSS = f"{ATTR}val_loss:"
PREDICTION = f"{ATTR}prediction:"
CHANCE_LOSS = f"{ATTR}chance_loss"
SETUP = f"{ATTR}setup"
RUN = f"{ATTR}run"
STATUS = f"{ATTR}status"
ERROR = f"{ATTR}error"
HPARAMS = f"{ATTR}hparams"
#: Marks a trial a Ctrl-C stopped (``{"trial": its number, "reason": ...}``; a retry inherits
#: the mark, with its original's number): failed, with no error of its own, so it is retried.
INTERRUPTED = f"{ATTR}interrupted"
#: Trial states of a trial that is over: it will report nothing more.
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")

#: Trials-frame columns of a study's own parameters, as Optuna holds them (a ``lepredict sweep``
#: trial's: its whole configuration) ...
PARAM_COLUMN = "param_"
#: ... and of the hyperparameters a trial of one's own loop declared to lepredict
#: (``measure_and_report``'s ``arch``, ``hidden``, ``layers``, ``report_spectrum(hparams=...)``),
#: kept apart: a loop's own ``hidden`` may be another layer's width.
HPARAM_COLUMN = "hparam_"


def hparam_value(row: Mapping, name: str):
    """A run's hyperparameter ``name`` as lepredict means it: what its trial declared
    (``hparam_NAME``), else its parameter of that name (``param_NAME``), else ``None``."""
    value = row.get(f"{HPARAM_COLUMN}{name}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return row.get(f"{PARAM_COLUMN}{name}")
    return value


#: Validation sequences a run's spectra average over, by default. The shipped predictors were
#: fitted on spectra over 8; fed spectra over the first 4 of those sequences instead, on 960
#: runs of configurations and tasks they never saw, their AUROC moved by -0.006 to +0.002 from
#: epoch 1 on (95% intervals within [-0.018, +0.009]; 94.8-98.8% of their pruning decisions
#: the same), for half the tangent work (studies/probe_size.log).
PROBE_SIZE = 4
#: The feature sets a predictor may read (:mod:`lepredict.features`).
FEATURE_SETS = ("spectrum", "spectrum_full", "loss", "weights", "grad", "hparams")
#: The evaluation's schemes without a parameter; ``"holdout:PREDICATE"`` and ``"test"`` are the
#: others (:mod:`lepredict.evaluation`).
SCHEMES = ("configs", "task", "arch")
#: Feature sets compared by default, by the name the tables show.
COMPARED = ("hparams+loss", "hparams+loss+spectrum", "spectrum+loss", "loss", "spectrum",
            "hparams")
#: The strongest baseline: hyperparameters and the early validation loss, no spectra.
BASELINE = "hparams+loss"
#: Bootstrap resamples behind each interval, unless told otherwise.
N_BOOT = 1000

ARCHS = ("rnn", "gru", "lstm")


def state_size(arch: str, hidden: int, layers: int, *, lstm_state: str = "full") -> int:
    """The size of the state whose exponents a spectrum holds (the engine's convention): the
    layers' hidden units, twice that for an LSTM's ``(h, c)`` (not its hidden-only map)."""
    return hidden * layers * (2 if arch == "lstm" and lstm_state == "full" else 1)


#: A spectrum's state convention: ``"full"`` (an LSTM's ``(h, c)``), ``"hidden"`` (an LSTM's
#: hidden-only map), ``None`` (any other module, whose state is its hidden state).
CONVENTIONS = ("full", "hidden", None)
OPTIMIZERS = ("sgd", "adam", "rmsprop")
INITS = ("uniform", "gain", "orthogonal", "default")


@dataclasses.dataclass(frozen=True)
class HParamField:
    """One generic hyperparameter: what values it may take and what a missing one means.

    Attributes:
        name: the key (``hparams={name: ...}``; the ``hparam_{name}`` column of a trials frame).
        kind: ``"choice"``, ``"int"`` or ``"float"``.
        choices: the allowed values of a ``"choice"``.
        low: the smallest allowed value of a number (inclusive).
        positive: a number must be ``> 0`` (``low`` is then 0, exclusive).
        default: the value a missing one takes, or ``None`` if it must be given.
        corpus: the values or range the shipped predictors were fitted on (outside it they
            extrapolate).
        help: what it is, in words.
    """

    name: str
    kind: str
    help: str
    choices: tuple = ()
    low: float | None = None
    positive: bool = False
    default: object = None
    corpus: str = ""

    @property
    def allowed(self) -> str:
        """The allowed values, in words (for error messages)."""
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = "an int" if self.kind == "int" else "a finite number"
        return f"{what} {'> 0' if self.positive else f'>= {self.low:g}'}"

    def check(self, value):
        """``value`` in its canonical type; ``ValueError`` naming the key and what is allowed."""
        if self.kind == "choice":
            if isinstance(value, str) and value.lower() in self.choices:
                return value.lower()
        elif not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            ok = math.isfinite(number) and (number > 0 if self.positive else number >= self.low)
            if ok and self.kind == "int" and number == int(number):
                return int(number)
            if ok and self.kind == "float":
                return number
        raise ValueError(f"hparams[{self.name!r}] must be {self.allowed} ({self.help}), got "
                         f"{value!r}.")


#: The generic hyperparameters a predictor may read (the ``"hparams"`` feature set of
#: :mod:`lepredict.features`), keyed by name: what ``report_spectrum(hparams=...)`` accepts and
#: ``lepredict sweep`` stores. Those with a default may be left out; ``init_scale`` is needed
#: unless ``init`` is ``"default"`` (PyTorch's own initialisation, which has no scale).
HPARAM_FIELDS: dict[str, HParamField] = {f.name: f for f in (
    HParamField("arch", "choice", "the recurrent cell: nn.RNN (tanh), nn.GRU or nn.LSTM",
                choices=ARCHS, corpus="rnn, gru, lstm"),
    HParamField("hidden", "int", "hidden units per layer", low=1, positive=True,
                corpus="16-256"),
    HParamField("layers", "int", "stacked recurrent layers", low=1, positive=True,
                corpus="1-3"),
    HParamField("lr", "float", "the learning rate", positive=True, corpus="1e-4 to 1"),
    HParamField("optimizer", "choice", "torch.optim.SGD, Adam or RMSprop", choices=OPTIMIZERS,
                corpus="sgd, adam, rmsprop"),
    HParamField("batch_size", "int", "training batch size", low=1, positive=True,
                corpus="16-128"),
    HParamField("init", "choice", "the initialisation scheme of the recurrent module "
                "(lepredict.RunConfig.init); 'default' is PyTorch's own, what a module that "
                "was not re-initialised has", choices=INITS, default="default",
                corpus="uniform, gain, orthogonal, default"),
    HParamField("init_scale", "float", "the bound p of 'uniform' (weights in [-p, p]) or the "
                "gain g of 'gain' and 'orthogonal'; ignored by 'default'", positive=True,
                corpus="0.02 to 3"),
    HParamField("clip", "float", "gradient clipping by global norm; 0 for none", low=0.0,
                default=0.0, corpus="0, 1, 5"),
    HParamField("weight_decay", "float", "the optimizer's weight_decay; 0 for none", low=0.0,
                default=0.0, corpus="0, 1e-4, 1e-3"),
)}
#: The ``init_scale`` stored for ``init="default"``, which has none: any value means the same.
NO_INIT_SCALE = 1.0


def check_hparams(hparams: Mapping) -> dict:
    """``hparams`` validated against :data:`HPARAM_FIELDS`, values in their canonical types
    (lower-case choices, ints, floats); any subset may be given.

    Raises:
        ValueError: an unknown key (naming the known ones) or a value outside what its key
            allows (naming the key and the allowed values).
    """
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a mapping such as {{'lr': 1e-3, 'optimizer': 'adam'}}, "
                        f"got {type(hparams).__name__}.")
    unknown = sorted(str(k) for k in hparams if k not in HPARAM_FIELDS)
    if unknown:
        raise ValueError(f"Unknown hparams {unknown}; known: {', '.join(HPARAM_FIELDS)} "
                         "(see lepredict.records.HPARAM_FIELDS for the allowed values).")
    return {k: HPARAM_FIELDS[k].check(v) for k, v in hparams.items()}


def complete_hparams(hparams: Mapping) -> tuple[dict, list[str]]:
    """``hparams`` with the defaults of the fields left out, and the names of those that have
    no default and are missing (``init_scale`` only when ``init`` is not ``"default"``; ``init``
    when an ``init_scale`` is given without it, since the scale is then of an unknown scheme)."""
    out = dict(hparams)
    missing = ["init"] if "init_scale" in out and "init" not in out else []
    for name, field in HPARAM_FIELDS.items():
        if name in out or name in missing:
            continue
        if field.default is not None:
            out[name] = field.default
        elif name == "init_scale" and out.get("init") == "default":
            out[name] = NO_INIT_SCALE
        else:
            missing.append(name)
    return out, missing


@dataclasses.dataclass
class RunRecord:
    """What a run measured. ``spectra`` maps an epoch to its spectrum summary.

    Attributes:
        config: the :class:`~lepredict.RunConfig` as a dict.
        task: the task's name and options.
        train_loss: mean training loss of each completed epoch (epochs 1..).
        val_loss: validation loss at epoch 0 (initialisation) and after each completed epoch.
        grad_norm: mean gradient norm (before clipping) of each completed epoch.
        weights: recurrent-weight statistics at epoch 0 and after each completed epoch.
        spectra: ``{epoch: spectrum_dict(...)}``.
        final_val_loss: validation loss after the last epoch (``inf`` if the run diverged).
        final_normalised_loss: ``final_val_loss / task.chance_loss``.
        status: ``"ok"`` or ``"diverged"``.
        epochs: epochs asked for; ``epochs_completed``: how many ran to the end.
        wall_time: seconds for the whole run; ``le_time``: seconds of it spent on spectra.
    """

    config: dict
    task: dict
    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    grad_norm: list[float] = dataclasses.field(default_factory=list)
    weights: list[dict] = dataclasses.field(default_factory=list)
    spectra: dict[int, dict] = dataclasses.field(default_factory=dict)
    final_val_loss: float = math.inf
    final_normalised_loss: float = math.inf
    status: str = "ok"
    epochs: int = 0
    epochs_completed: int = 0
    wall_time: float = 0.0
    le_time: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spectra"] = {str(k): v for k, v in self.spectra.items()}
        return d


def is_count(value) -> bool:
    """Whether ``value`` is a positive integer (a numpy one too; not a bool): a number of
    sequences, such as a probe's size or the trajectories a spectrum averages over."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


#: The keys a spectrum record (:func:`spectrum_dict`) may hold.
SPECTRUM_KEYS = frozenset({"mean", "std", "diverged", "n", "k", "convention", "sum", "floored",
                           "sum_every", "trajectories"})


def spectrum_dict(mean, std=None, *, diverged: float = 0.0, state_size: int | None = None,
                  convention: str | None = None, floored: int | None = None,
                  exponent_sum: float | None = None, sum_every: int = 1,
                  trajectories: int | None = None) -> dict:
    """A spectrum as records store it: the mean and spread over trajectories of the leading
    ``k = len(mean)`` exponents (descending), the share of diverged trajectories, the size ``n``
    of the state they are exponents of (``k < n`` for a partial spectrum), the state
    convention (``"full"`` or ``"hidden"`` for an LSTM, ``None`` otherwise) and the sum of all
    ``n`` exponents (``"sum"``; for a full spectrum the sum of ``mean``, else ``None`` unless
    measured; ``"sum_every"`` where it was estimated from every so-many steps' determinants)
    and, where given, how many trajectories (probe sequences) it averages over
    (``"trajectories"``).

    A ``mean`` not in descending order is sorted (largest first, as ``np.sort(mean)[::-1]``),
    ``std`` permuted with it: the records and the features read the exponents by rank. A sum
    of exponents beyond a float is stored as ``inf`` (``-inf``) rather than raising; no network
    that did not diverge grows that fast, and :class:`~lepredict.LyapunovPruner` prunes a
    spectrum whose sum is ``inf`` (or whose exponent is above the log of the largest float) as
    diverged. A NaN exponent is what :func:`~lepredict.lyapunov_spectrum` gives when all the
    trajectories diverged, so it is taken with ``diverged=1.0`` only.

    Raises:
        ValueError: an empty ``mean``, values that are not numbers, a NaN exponent in a spectrum
            not wholly diverged, ``std`` of another length, ``diverged`` outside ``[0, 1]``,
            an unknown ``convention``, ``state_size`` below ``len(mean)``, or ``trajectories``
            not a positive int.
    """
    if trajectories is not None and not is_count(trajectories):
        raise ValueError("trajectories is how many probe sequences the spectrum averages over, a "
                         f"positive int, got {trajectories=}.")
    mean, std = _numbers("mean", mean), None if std is None else _numbers("std", std)
    if not mean:
        raise ValueError("mean is empty: give the exponents of the spectrum, largest first.")
    std = [0.0] * len(mean) if std is None else std
    if len(std) != len(mean):
        raise ValueError(f"std has {len(std)} values but mean has {len(mean)}.")
    diverged = float(diverged)
    if not 0.0 <= diverged <= 1.0:
        raise ValueError(f"diverged is the share of trajectories that diverged, in [0, 1], got "
                         f"{diverged=}.")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS} (\"hidden\" for an LSTM's "
                         f"hidden-only map), got {convention=}.")
    # lepredict.lyapunov_spectrum averages over the trajectories that did not diverge: its
    # mean is NaN only when all of them diverged, and it says so with diverged=1.0.
    if any(math.isnan(v) for v in mean):
        if diverged < 1.0:
            raise ValueError(f"mean has a NaN exponent but {diverged=}: give the mean over the "
                             "trajectories that did not diverge and their share in 'diverged' "
                             "(1.0, with a NaN mean, when all did).")
    elif any(a < b for a, b in zip(mean, mean[1:])):
        order = sorted(range(len(mean)), key=lambda i: -mean[i])
        mean, std = [mean[i] for i in order], [std[i] for i in order]
    n = len(mean) if state_size is None else int(state_size)
    if n < len(mean):
        raise ValueError(f"state_size={n} is smaller than the {len(mean)} exponents given.")
    if exponent_sum is None and n == len(mean):
        exponent_sum = exponent_total(mean)
    out = {"mean": mean, "std": std, "diverged": diverged, "n": n, "k": len(mean),
           "convention": convention,
           "sum": None if exponent_sum is None else float(exponent_sum)}
    if floored is not None:
        out["floored"] = int(floored)
    if sum_every != 1 and out["sum"] is not None:
        out["sum_every"] = int(sum_every)
    if trajectories is not None:
        out["trajectories"] = int(trajectories)
    return out


def exponent_total(exponents) -> float:
    """The sum of ``exponents``, exactly rounded (``math.fsum``), or ``inf`` (``-inf``) where it
    is beyond a float (``fsum`` raises ``OverflowError`` then)."""
    try:
        return math.fsum(exponents)
    except OverflowError:
        return float(sum(exponents))  # overflows to +-inf rather than raising


def _numbers(name: str, values) -> list[float]:
    """``values`` as floats; ``ValueError`` naming ``name`` if they are not numbers."""
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers (one per exponent, largest first), "
                         f"got {values!r:.80}.") from None


def spectrum_of(spectrum, *, digits: int | None = None, floored: bool = False) -> dict:
    """:func:`spectrum_dict` of a :class:`~lepredict.LyapunovSpectrum` (any object with its
    ``mean``, ``std``, ``diverged``, ``state_size``, ``convention``, ``floored``,
    ``exponent_sum`` and ``sum_every``), its values rounded to ``digits`` if given and the count
    of floored exponents kept if asked. The sum is the mean over the trajectories that did not
    diverge."""
    def values(tensor):
        return [float(v) if digits is None else round(float(v), digits) for v in tensor]

    total = getattr(spectrum, "exponent_sum", None)
    if total is not None:
        kept = total[~spectrum.diverged]
        total = float(kept.mean()) if kept.numel() else math.nan
        total = total if digits is None else round(total, digits)
    return spectrum_dict(values(spectrum.mean), values(spectrum.std),
                         diverged=float(spectrum.diverged.float().mean()),
                         state_size=spectrum.state_size, convention=spectrum.convention,
                         floored=int(spectrum.floored.sum()) if floored else None,
                         exponent_sum=total,
                         sum_every=getattr(spectrum, "sum_every", 1),
                         trajectories=int(spectrum.diverged.numel()))


def jsonable(value):
    """Floats as Optuna's JSON storage takes them: inf and NaN become strings
    (``float(...)`` reads them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _float(v):
    if v is None:
        return None
    return float(v)  # float("inf") parses the strings jsonable wrote


def run_row(meta: dict, run: Mapping, params: Mapping, spectra: Mapping,
            hparams: Mapping | None = None) -> dict:
    """One trials-frame row: ``meta`` (study, number, state, task...), the stored run, the
    parameters (``param_*`` columns), the declared hyperparameters (``hparam_*``) and the
    spectra by epoch (``leE_*`` columns)."""
    row = dict(meta)
    row.update({f"{PARAM_COLUMN}{k}": v for k, v in params.items()})
    row.update({f"{HPARAM_COLUMN}{k}": v for k, v in (hparams or {}).items()})
    for key in ("final_normalised_loss", "final_val_loss", "wall_time", "le_time",
                "epochs_completed", "pruned_at"):
        row[key] = _float(run.get(key)) if key in run else None
    for key in ("train_loss", "val_loss", "grad_norm"):
        row[key] = [_float(v) for v in run.get(key, [])]
    row["weights"] = json.dumps(run.get("weights", []))
    for epoch, spec in spectra.items():
        row[f"le{epoch}_mean"] = [_float(v) for v in spec["mean"]]
        row[f"le{epoch}_std"] = [_float(v) for v in spec.get("std", [0.0] * len(spec["mean"]))]
        row[f"le{epoch}_diverged"] = _float(spec.get("diverged", 0.0))
        row[f"le{epoch}_n"] = int(spec.get("n", len(spec["mean"])))
        row[f"le{epoch}_sum"] = _float(spec.get("sum"))
        # 1: the sum averaged every step's log|det J_t|; s: every s-th step's (an estimate)
        row[f"le{epoch}_sum_every"] = int(spec.get("sum_every", 1))
        # probe sequences averaged over; unknown (None) for records older than the key
        trajectories = spec.get("trajectories")
        row[f"le{epoch}_trajectories"] = None if trajectories is None else int(trajectories)
    return row


def attrs_by_step(user_attrs: Mapping, prefix: str) -> dict[int, object]:
    """The user attributes ``PREFIX + STEP`` of a trial (:data:`SPECTRUM`, :data:`VAL_LOSS`,
    :data:`PREDICTION`), keyed by the step as an int."""
    return {int(key[len(prefix):]): value for key, value in user_attrs.items()
            if key.startswith(prefix) and key[len(prefix):].isdigit()}


#: A trial's ``status`` column when lepredict stored none, by its Optuna state.
_STATUS = {"PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def retry_of(t) -> int | None:
    """The number of the trial ``t`` retries directly (Optuna's retry callbacks list the trials
    a retry repeats in ``retry_history``, its direct original last); ``None`` for a trial that
    is no retry."""
    history = (getattr(t, "system_attrs", None) or {}).get("retry_history")
    return history[-1] if history else None


def interrupted_reason(t, attrs: Mapping | None = None) -> str | None:
    """Why a trial failed where a Ctrl-C stopped it (its :data:`INTERRUPTED` mark, not one a
    retry inherited from its original); ``None`` otherwise. ``attrs``: its user attributes, if
    already read."""
    mark = (t.user_attrs if attrs is None else attrs).get(INTERRUPTED)
    if isinstance(mark, Mapping) and mark.get("trial") == t.number:
        return mark.get("reason")
    return None


def _is_steps_per_epoch(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_steps_per_epoch(steps_per_epoch) -> None:
    """Refuse a ``steps_per_epoch`` that is not a positive int (``ValueError``)."""
    if not _is_steps_per_epoch(steps_per_epoch):
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch=}.")


def steps_per_epoch_of(t) -> int | None:
    """The ``steps_per_epoch`` a :class:`~lepredict.LyapunovPruner` read trial ``t``'s steps
    with (it writes it into each decision it records); ``None`` where no decision says."""
    for record in attrs_by_step(t.user_attrs, PREDICTION).values():
        spe = record.get("steps_per_epoch") if isinstance(record, Mapping) else None
        if _is_steps_per_epoch(spe):
            return spe
    return None


def steps_per_epoch_by_trial(trials, given: int | None = None) -> dict[int, int]:
    """Per trial number, the steps per epoch its steps are read with: ``given``, else what its
    pruner recorded (:func:`steps_per_epoch_of`), else the value the study's trials recorded
    most often (a trial pruned by another pruner, or never judged), else 1."""
    recorded = {t.number: steps_per_epoch_of(t) for t in trials}
    usual = collections.Counter(v for v in recorded.values() if v is not None).most_common(1)
    default = usual[0][0] if usual else 1
    return {n: given or spe or default for n, spe in recorded.items()}


def by_epoch(items: Mapping[int, object], steps_per_epoch: int) -> dict[int, object]:
    """Values keyed by report step, keyed by epoch: those at the ends of epochs (steps
    ``e * steps_per_epoch``) only."""
    return {s // steps_per_epoch: v for s, v in items.items() if s % steps_per_epoch == 0}


def own_attrs(t) -> Mapping:
    """A trial's user attributes without those a retry inherited from its failed attempt.

    Optuna's retry callbacks copy the attempt's user attributes into the retry, so a retry
    pruned at epoch 2 would otherwise show its attempt's spectra and predictions of epochs 3
    and on. A retry's lepredict attributes of a step count only up to the last step it
    reported itself (each step it reached it wrote again), and its outcome's only once it has
    one of its own (stored when it ends).
    """
    attrs = t.user_attrs
    if retry_of(t) is None:
        return attrs
    last = -1 if t.last_step is None else t.last_step
    finished = t.state.name in FINISHED_STATES
    own = {}
    for key, value in attrs.items():
        step = next((key[len(p):] for p in (SPECTRUM, VAL_LOSS, PREDICTION)
                     if key.startswith(p)), None)
        if step is not None:
            if step.lstrip("-").isdigit() and int(step) > last:
                continue
        elif key in (RUN, STATUS, ERROR) and not finished:
            continue
        own[key] = value
    return own


def _own_run(t, attrs: Mapping, setup: Mapping, chance: float | None, direction: str,
             steps_per_epoch: int = 1) -> dict:
    """What a trial of a loop of one's own (or a sweep trial still running) holds, as a stored
    run: its losses (those given to ``report_spectrum(val_loss=...)``, else the values it
    reported in a minimising study), how it ended and where it was pruned, by epoch (steps
    ``e * steps_per_epoch``; a pruned trial's ``pruned_at`` and ``epochs_completed`` are the
    epochs it completed)."""
    reported = by_epoch({int(s): _float(v) for s, v in t.intermediate_values.items()},
                        steps_per_epoch)
    given = by_epoch({s: _float(v) for s, v in attrs_by_step(attrs, VAL_LOSS).items()},
                     steps_per_epoch)
    scale = 1.0
    if given:
        losses = given
    elif setup.get("reported") == "normalised":  # a sweep trial that has not stored its run
        losses, scale = reported, chance or 1.0
    elif direction == "minimize":
        losses = reported
    else:
        losses = {}  # a maximised value (an accuracy) is not a loss
    # Indexed by epoch: an epoch without a loss at its end is a gap (None), not a shift.
    val = [losses[e] * scale if e in losses else None for e in range(max(losses, default=-1) + 1)]
    run: dict = {"val_loss": val}
    last = None if t.last_step is None else t.last_step // steps_per_epoch
    state = t.state.name
    if last is not None:
        run["epochs_completed"] = last
    if state == "PRUNED" and last is not None:
        run["pruned_at"] = last
    if state == "COMPLETE":
        value = _float(t.value)
        if losses and (last is None or max(losses) >= last):
            final = val[-1]  # the loss at the trial's last step
        elif not losses and not given and direction == "minimize":
            final = value  # nothing reported: the value is the loss
        else:
            final = None  # losses given for the early epochs only
        ok = all(v is None or math.isfinite(v) for v in (value, final))
        run["status"] = "ok" if ok else "diverged"
        if final is not None:
            run["final_val_loss"] = final if ok else math.inf
            if chance:
                run["final_normalised_loss"] = final / chance if ok else math.inf
    return run


def trial_row(t, study_name: str, setup: Mapping, chance_loss: float | None = None,
              threshold: float | None = None, *, direction: str = "minimize",
              steps_per_epoch: int = 1) -> dict:
    """A trial of any single-objective study as a trials-frame row.

    A ``lepredict sweep`` trial gives its stored run. A trial of a loop of one's own gives what
    it reported: the values of ``trial.report`` (``steps``, ``values``, as reported), its
    losses (those given to :func:`~lepredict.report_spectrum` with ``val_loss=``, else the
    reported values when the study minimises), the chance loss given to ``report_spectrum``,
    how it ended (``status``, ``final_normalised_loss``; ``pruned_at``, the last epoch of a
    pruned trial) and spectra. Losses and spectra are by epoch, as the features read them: a
    loop that reports by iteration gives ``steps_per_epoch`` (what its
    :class:`~lepredict.LyapunovPruner` was given), and those at the ends of epochs count.
    Either way the row carries what :class:`~lepredict.LyapunovPruner` decided last
    (``predicted_p_trainable``, ``predicted_final_loss``, at step ``predicted_at``) and, for a
    trial it pruned, why (``prune_reason``).
    """
    attrs = own_attrs(t)
    spectra = {attr[len(SPECTRUM):]: spec for attr, spec in attrs.items()
               if attr.startswith(SPECTRUM)}
    sweep_trial = bool(setup.get("task")) or RUN in attrs
    if sweep_trial:
        steps_per_epoch = 1  # a sweep reports once per epoch
    else:
        spectra = by_epoch({int(s): v for s, v in spectra.items() if s.isdigit()},
                           steps_per_epoch)
    own_chance = attrs.get(CHANCE_LOSS)
    chance = _float(own_chance) if own_chance is not None else (
        chance_loss if chance_loss is not None else _float(setup.get("chance_loss")))
    reported = sorted((int(s), _float(v)) for s, v in t.intermediate_values.items())
    decisions = attrs_by_step(attrs, PREDICTION)
    predicted = [(s, d) for s, d in sorted(decisions.items())
                 if isinstance(d, Mapping) and d.get("p_trainable") is not None]
    pruned = [d for s, d in sorted(decisions.items()) if isinstance(d, Mapping) and d.get("pruned")]
    meta = {
        "study": study_name,
        "number": t.number,
        "state": t.state.name,
        "value": _float(t.value),
        "direction": direction,
        "status": attrs.get(STATUS, _STATUS.get(t.state.name)),
        "task": setup.get("task"),
        "task_options": json.dumps(setup.get("task_options", {}), sort_keys=True),
        "epochs": setup.get("epochs"),
        "chance_loss": chance,
        "threshold": threshold if threshold is not None else setup.get("threshold"),
        "fail_reason": attrs.get(ERROR) or interrupted_reason(t, attrs),
        "steps": [s for s, _ in reported],
        "values": [v for _, v in reported],
        "prune_reason": pruned[-1].get("reason") if pruned and t.state.name == "PRUNED" else None,
        "predicted_at": predicted[-1][0] if predicted else None,
        "predicted_p_trainable": _float(predicted[-1][1]["p_trainable"]) if predicted else None,
        "predicted_final_loss": _float(predicted[-1][1].get("final_loss")) if predicted else None,
        "steps_per_epoch": steps_per_epoch,
    }
    hparams = attrs.get(HPARAMS)
    hparams = hparams if isinstance(hparams, Mapping) else {}
    run = attrs.get(RUN)
    if run is None:
        run = _own_run(t, attrs, setup, chance, direction, steps_per_epoch)
        if meta["status"] is None:
            meta["status"] = run.pop("status", None)
        run.pop("status", None)
    if sweep_trial:
        # A sweep's trial (its run stored, or failed or still running): the whole config (fixed
        # values included), then the params; its parameters are lepredict's own.
        return run_row(meta, run, {**run.get("config", {}), **t.params, **hparams}, spectra)
    # A loop's own parameters as Optuna holds them, and apart what it declared to lepredict:
    # the names may coincide and mean other things (a head's "hidden", a schedule's "lr").
    return run_row(meta, run, dict(t.params), spectra, hparams)
