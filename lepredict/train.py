"""Short training runs that record loss curves and early Lyapunov spectra.

A run trains one recurrent network on one task and returns a :class:`RunRecord`: per-epoch train
and validation loss, gradient norms, recurrent-weight statistics, and the spectrum (mean and
spread over a fixed probe batch of validation inputs, measured in eval mode) at the requested
epochs, epoch 0 being the initialisation. A run whose loss explodes (see
:data:`DIVERGED_LOSS_RATIO`) stops there and is recorded as ``diverged`` with what it had so far:
a result, not an error.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import operator
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lepredict.lyapunov import lyapunov_spectrum, rnn_state_size
from lepredict.records import (ARCHS, INITS, MEASURED_EXPONENTS, OPTIMIZERS, PROBE_SIZE,
                               RunRecord, is_count, spectrum_of)
from lepredict.tasks import Task

__all__ = ["DIVERGED_LOSS_RATIO", "RunConfig", "RunRecord", "SeqModel", "checked_schedule",
           "diverged_loss", "keep_freed_memory", "train_run", "weight_stats", "weight_stats_of"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Hyperparameters of one run.

    Attributes:
        arch: ``"rnn"`` (tanh), ``"gru"`` or ``"lstm"``.
        hidden: hidden size ``N`` per layer.
        layers: number of stacked layers.
        init: ``"uniform"``: recurrent and input weights uniform in ``[-p, p]`` with
            ``p = init_scale``, biases zero (as in Vogt et al.); ``"gain"``: Gaussian weights with
            standard deviation ``init_scale / sqrt(fan_in)`` (``init_scale`` is the gain ``g``,
            the edge of chaos of a tanh RNN at ``g = 1``), biases zero; ``"orthogonal"``: each
            ``N x N`` gate block of a recurrent weight matrix orthogonal
            (:func:`torch.nn.init.orthogonal_`) times the gain ``g = init_scale``, so every
            singular value of a block is ``g``, input weights Gaussian as for ``"gain"``, biases
            zero; ``"default"``: PyTorch's own initialisation, ``init_scale`` ignored. The
            readout keeps PyTorch's initialisation under every scheme.
        init_scale: ``p`` or ``g``, see ``init``.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"adam"`` or ``"rmsprop"``.
        batch_size: training batch size.
        clip: gradient clipping by global norm; 0 disables it.
        weight_decay: L2 penalty of every parameter (biases and readout included), passed to
            the optimizer as its ``weight_decay`` argument: ``weight_decay * w`` is added to
            the (clipped) gradient before the step, for Adam too (``torch.optim.Adam``'s
            coupled decay, not AdamW's decoupled one). 0 (the default, and what runs recorded
            before this field existed had) disables it.
        seed: seeds the initialisation and the batch order.
    """

    arch: str = "gru"
    hidden: int = 64
    layers: int = 1
    init: str = "uniform"
    init_scale: float = 0.1
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 64
    clip: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str):
            raise ValueError(msg)

        # A grid built with numpy, or a row read back from an export, holds numpy scalars.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.generic):
                object.__setattr__(self, field.name, value.item())

        if self.arch not in ARCHS:
            bad(f"arch must be one of {ARCHS}, got arch={self.arch!r}.")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got optimizer={self.optimizer!r}.")
        if self.init not in INITS:
            bad(f"init must be one of {INITS}, got init={self.init!r}.")
        for name in ("hidden", "layers", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive int, got {name}={value!r}.")
        for name in ("init_scale", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                bad(f"{name} must be a positive finite number, got {name}={value!r}.")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip >= 0):
            bad(f"clip must be >= 0 (0 disables clipping), got clip={self.clip!r}.")
        wd = self.weight_decay
        if isinstance(wd, bool) or not (isinstance(wd, (int, float)) and math.isfinite(wd)
                                        and wd >= 0):
            bad(f"weight_decay must be a finite number >= 0 (0: none), got weight_decay={wd!r}.")

    @classmethod
    def from_dict(cls, params: dict) -> RunConfig:
        """Build from a dict, refusing unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"Unknown hyperparameters {unknown}; known: {sorted(known)}.")
        return cls(**params)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SeqModel(nn.Module):
    """A stacked ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (batch first) with a linear readout at every step."""

    def __init__(self, input_size: int, output_size: int, config: RunConfig):
        super().__init__()
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[config.arch]
        self.rnn = cls(input_size, config.hidden, num_layers=config.layers, batch_first=True)
        self.readout = nn.Linear(config.hidden, output_size)
        self._init(config)

    def _init(self, config: RunConfig) -> None:
        if config.init == "default":
            return
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias"):
                    p.zero_()
                elif config.init == "uniform":
                    p.uniform_(-config.init_scale, config.init_scale)
                elif config.init == "orthogonal" and name.startswith("weight_hh"):
                    # One orthogonal matrix per gate: the blocks are the maps the gates apply
                    # to the state (weight_stats and the spectra read them so too).
                    for block in p.split(config.hidden):
                        nn.init.orthogonal_(block, gain=config.init_scale)
                else:  # "gain", and the input weights of "orthogonal"
                    p.normal_(0.0, config.init_scale / math.sqrt(p.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.readout(out)


#: Set to ``0`` to leave the C library's allocator as it is (see :func:`keep_freed_memory`).
KEEP_FREED_MEMORY_ENV = "LEPREDICT_KEEP_FREED_MEMORY"


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep the memory a training step frees for the next.

    Called by :func:`train_run` and :func:`~lepredict.population.train_population` on CPUs.
    Their tensors are often megabytes each (a population's gates at K = 32, a 512-unit LSTM's
    activations), and glibc serves blocks of that size with fresh ``mmap`` pages, or trims them
    off its heap when they are freed: every training step then page-faults its working set
    back in (260,000 faults in 4 epochs of 32 LSTM-32s, a third of their time; 2 million in two
    epochs of a 2-layer LSTM-512, a fifth). This raises the ``mmap`` threshold (1 GiB, or 32
    MiB where an older glibc refuses more) and the trim threshold (twice that, at most 2 GiB)
    once per process, as glibc's own dynamic threshold does for one block, and as a caching
    allocator does for GPU memory: the process keeps up to its peak use instead of returning
    freed memory to the system between steps.

    Nothing happens outside Linux with glibc, when ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or a ``glibc.malloc`` tunable in
    ``GLIBC_TUNABLES`` is set (the user's choice stands), or when the environment variable
    ``LEPREDICT_KEEP_FREED_MEMORY`` is ``0``. Another allocator preloaded (jemalloc, tcmalloc)
    does not read these settings.

    Returns:
        Whether the thresholds were set (in this call or an earlier one).
    """
    if (not sys.platform.startswith("linux") or os.environ.get(KEEP_FREED_MEMORY_ENV) == "0"
            or any(f"MALLOC_{name}_" in os.environ
                   for name in ("MMAP_THRESHOLD", "TRIM_THRESHOLD", "TOP_PAD"))
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # musl and others have no glibc thresholds to set
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    for threshold in (1 << 30, 32 << 20):
        if mallopt(m_mmap_threshold, threshold):
            return bool(mallopt(m_trim_threshold, min(2 * threshold, 2**31 - 1)))
    return False


def weight_stats(rnn: nn.Module) -> dict[str, float]:
    """Spectral radius and norms of the recurrent weights: a baseline feature set.

    For gated cells each gate's ``N x N`` recurrent block is a matrix of its own; the radius is
    the largest over gates and layers, the norms are over all recurrent (or input) weights.
    """
    return weight_stats_of([rnn])[0]


def weight_stats_of(rnns: Sequence[nn.Module]) -> list[dict[str, float]]:
    """:func:`weight_stats` of several networks of one shape (a population's members), with one
    batched eigenvalue and one batched singular-value call for all their gate blocks."""
    N, layers = rnns[0].hidden_size, rnns[0].num_layers
    with torch.no_grad():
        hh = torch.stack([torch.cat([getattr(r, f"weight_hh_l{layer}").detach().flatten()
                                     for layer in range(layers)]) for r in rnns]).double().cpu()
        ih = torch.stack([torch.cat([getattr(r, f"weight_ih_l{layer}").detach().flatten()
                                     for layer in range(layers)]) for r in rnns]).double().cpu()
        blocks = hh.view(len(rnns), -1, N, N)  # every gate block of every layer, per network
        finite = torch.isfinite(blocks).flatten(1).all(1)
        radius = torch.full((len(rnns),), math.inf, dtype=torch.float64)
        opnorm = radius.clone()
        if finite.any():
            ok = blocks[finite]
            radius[finite] = torch.linalg.eigvals(ok).abs().amax((1, 2))
            opnorm[finite] = torch.linalg.matrix_norm(ok, ord=2).amax(1)
        hh_norm = torch.where(finite, hh.square().sum(1).sqrt(), math.inf).tolist()
        ih_norm = torch.where(finite, ih.square().sum(1).sqrt(), math.inf).tolist()
    return [{"w_hh_radius": r, "w_hh_norm": h, "w_hh_opnorm": o, "w_ih_norm": i}
            for r, h, o, i in zip(radius.tolist(), hh_norm, opnorm.tolist(), ih_norm)]


#: The QR schedule of a default measurement: the leading exponents of a trained or untrained
#: network spread little (0.06-0.25 nats/step over the top 16 of RNN, GRU and LSTM of 64-128
#: units), so ``"auto"`` re-orthonormalises every few steps at the accuracy of a QR every step
#: (within 2e-3, tested), where the QR was a third of a small network's measurement.
MEASURED_REORTH = "auto"

#: The default measurement's exponent sum takes the LU behind ``log|det J_t|`` (the GRU, the
#: hidden-only LSTM map) on every 4th averaged step: those LUs were most of a large GRU's
#: measurement (O(N^3) against everything else's O(N^2 k)), and on GRUs of 64 to 256 units from
#: default to saturated scales the mean exponent moved by 1e-5 to 5e-3, the size of its spread
#: between the probe's trajectories; adding noise of 5e-3 per exponent to the sums of corpus
#: v2's 1,667 GRU runs moved the shipped predictor's AUROC by at most 0.002 from epoch 1.
MEASURED_SUM_EVERY = 4

#: ... but a short probe keeps at least this many steps in the sum (every step below 20).
MEASURED_SUM_STEPS = 10


def measured_sum_every(averaged_steps: int) -> int:
    """The default measurement's ``sum_every`` for a probe of ``averaged_steps`` steps after
    the warm-up: :data:`MEASURED_SUM_EVERY`, less where the sum would keep fewer than
    :data:`MEASURED_SUM_STEPS` steps."""
    return max(1, min(MEASURED_SUM_EVERY, averaged_steps // MEASURED_SUM_STEPS))


def measured_spectrum(rnn: nn.Module, probe: Tensor, *, warmup: int,
                      k: int | None = MEASURED_EXPONENTS):
    """The spectrum as lepredict measures it by default: the leading ``min(k, n)`` exponents
    and the sum of all (``k=None``: the full spectrum; LUs on the steps of
    :func:`measured_sum_every`), QRs on the :data:`MEASURED_REORTH` schedule. ``probe`` is
    ``(B, T, input_size)``, batch first."""
    return lyapunov_spectrum(rnn, probe, warmup=warmup,
                             **measured_options(rnn, probe.shape[1] - warmup, k))


def measured_options(rnn: nn.Module, averaged_steps: int, k: int | None = MEASURED_EXPONENTS,
                     *, lstm_state: str = "full") -> dict:
    """The engine's options (``k``, ``exponent_sum``, ``reorth_every``, ``sum_every``) of the
    default measurement of ``rnn`` on a probe of ``averaged_steps`` steps after the warm-up:
    what the sweep, populations and :func:`lepredict.measure_and_report` measure alike."""
    return {"k": measured_k(rnn, k, lstm_state=lstm_state), "exponent_sum": True,
            "reorth_every": MEASURED_REORTH, "sum_every": measured_sum_every(averaged_steps)}


def measured_k(rnn: nn.Module, k: int | None = MEASURED_EXPONENTS, *,
               lstm_state: str = "full") -> int | None:
    """The number of leading exponents a default measurement takes: ``k`` or the whole state
    if smaller (``None``: all)."""
    return None if k is None else min(k, rnn_state_size(rnn, lstm_state=lstm_state))


def _spectrum_summary(rnn: nn.Module, probe: Tensor, warmup: int, k: int | None) -> dict:
    return spectrum_of(measured_spectrum(rnn, probe, warmup=warmup, k=k), digits=6,
                       floored=True)


@torch.no_grad()
def _evaluate(model: SeqModel, task: Task, x: Tensor, y: Tensor, batch: int = 512) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        total += float(task.loss(model(xb), yb)) * xb.shape[0]
        count += xb.shape[0]
    return total / count


#: The divergence rule: a run diverges when its validation loss is not finite or exceeds this
#: multiple of the task's chance loss (the loss of the best constant prediction). The run stops
#: at that epoch with ``status="diverged"`` and ``final_normalised_loss = inf``. Waiting for an
#: overflow is not enough: with Adam a huge learning rate leaves the loss at 1e4-1e6 times
#: chance, finite for ever. In the 1,654 runs of ``studies/``, 30 recorded as ``ok`` had a
#: validation loss above 1000x chance at some epoch, and none of them ended trainable (the
#: best finished at 0.96x chance, no better than a constant), while at initialisation none was
#: above 23x chance, so the rule does not stop an untrained network by accident.
DIVERGED_LOSS_RATIO = 1e3


def diverged_loss(loss: float, chance_loss: float) -> bool:
    """Whether a validation loss means the run diverged (see :data:`DIVERGED_LOSS_RATIO`)."""
    return not math.isfinite(loss) or loss > DIVERGED_LOSS_RATIO * chance_loss


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` lepredict can train on, or a ``ValueError`` whose
    message (starting with the device as given) says what to use instead."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{str(device)!r} is not a device lepredict can train on; use cpu, "
                         "cuda, cuda:N or mps.")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{device}: no CUDA GPU is visible to torch here; use the cpu.")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{device}: there are only {torch.cuda.device_count()} CUDA "
                         "device(s), numbered from 0.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{device}: MPS is not available here; use the cpu.")
    return parsed


def checked_task(task) -> Task:
    """``task`` if it is a :class:`~lepredict.tasks.Task`, else a ``TypeError`` naming how to
    get one."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lepredict.tasks.Task, got {type(task).__name__}"
                        + (f" {task!r}: build it with lepredict.tasks.get({task!r})"
                           if isinstance(task, str) else "") + ".")
    return task


def checked_probe_size(probe_size: int, task: Task | None = None) -> int:
    """``probe_size`` as an int if it is a positive integer (a numpy one too), and no more than
    ``task``'s validation sequences (the probe is the first of them: more would silently be
    fewer); else a ``ValueError``."""
    if not is_count(probe_size):
        raise ValueError(f"probe_size must be a positive int (the validation sequences a "
                         f"spectrum averages over), got {probe_size=}.")
    probe_size = int(probe_size)
    have = None if task is None else int(task.x_val.shape[0])
    if have is not None and probe_size > have:
        raise ValueError(f"probe_size {probe_size} exceeds the {have} validation sequences of "
                         f"task {task.name!r}; pass at most {have} (by default spectra average "
                         f"over {PROBE_SIZE}).")
    return probe_size


def checked_schedule(epochs: int, le_epochs: Iterable[int], probe_size: int,
                     task: Task | None = None) -> list[int]:
    """The epochs after which a run of ``epochs`` epochs measures its spectrum.

    Args:
        epochs: training epochs of the run.
        le_epochs: epochs to measure after (0: at initialisation), in any order; those past
            ``epochs`` are dropped, so the default ``0..3`` serves shorter runs.
        probe_size: validation sequences each spectrum averages over.
        task: the task, whose validation sequences ``probe_size`` may not exceed (the probe is
            the first of them: more would silently be fewer).

    Returns:
        ``le_epochs`` up to ``epochs``, sorted, each once.

    Raises:
        ValueError: ``epochs`` not a non-negative int, an epoch in ``le_epochs`` that is not
            an integer >= 0, or ``probe_size`` not a positive int or more than ``task`` has;
            the message names it.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs=}.")
    try:
        given = list(le_epochs)
    except TypeError:
        raise ValueError(f"le_epochs must be the epochs to measure after (0: at "
                         f"initialisation), e.g. [0, 1, 2, 3]; got {le_epochs!r}.") from None
    try:  # any integer type (numpy's too), not floats or bools
        le_epochs = [operator.index(e) for e in given if not isinstance(e, bool)]
    except TypeError:
        le_epochs = []
    if len(le_epochs) != len(given) or any(e < 0 for e in le_epochs):
        raise ValueError(f"le_epochs must hold integer epochs >= 0 (0: the initialisation), got "
                         f"le_epochs={given!r}.")
    checked_probe_size(probe_size, task)
    return sorted({e for e in le_epochs if e <= epochs})


def train_run(
    config: RunConfig | dict,
    task: Task,
    *,
    epochs: int,
    le_epochs: Iterable[int] = (0, 1, 2, 3),
    device: str | torch.device = "cpu",
    probe_size: int = PROBE_SIZE,
    le_warmup: int | None = None,
    le_k: int | None = MEASURED_EXPONENTS,
    callback: Callable[[int, RunRecord], None] | None = None,
) -> RunRecord:
    """Train one network and record its curves and early spectra.

    Args:
        config: a :class:`RunConfig` or a dict of its fields.
        task: a :class:`lepredict.tasks.Task`.
        epochs: number of training epochs.
        le_epochs: epochs after which to measure the spectrum (0 = at initialisation); epochs
            beyond ``epochs`` are ignored.
        device: where to train (``"cpu"``, ``"cuda"``...).
        probe_size: number of validation sequences (the first ones, so the probe is the same
            for every run on the task) whose trajectories the spectrum averages over.
        le_warmup: spectrum warm-up steps; ``None`` uses ``T // 8``.
        le_k: number of leading exponents (at most the state size; the sum of all is measured
            too), by default what the predictor's features use; ``None`` for the full spectrum.
        callback: called as ``callback(epoch, record)`` after epoch 0 and each epoch, once the
            epoch's validation loss and spectrum are in the record; it may raise (for example
            ``optuna.TrialPruned``) to stop the run.

    Returns:
        The :class:`RunRecord`. A training loss that becomes NaN or infinite, or a validation
        loss that breaks :data:`DIVERGED_LOSS_RATIO`, ends the run with ``status="diverged"`` and
        ``final_normalised_loss = inf``.

    Raises:
        TypeError: ``task`` not a Task (a name: build it with ``lepredict.tasks.get``).
        ValueError: a bad configuration, schedule or ``probe_size`` (more than the task's
            validation sequences), or a device torch cannot train on here
            (:func:`checked_device`); the message names the fix.

    Example:
        >>> from lepredict import tasks, train_run
        >>> rec = train_run({"arch": "gru", "hidden": 8, "lr": 1e-2}, tasks.get("digits", mode="row"),
        ...                 epochs=1, le_epochs=[0, 1])
        >>> rec.status, len(rec.val_loss), sorted(rec.spectra)
        ('ok', 2, [0, 1])
    """
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    checked_task(task)
    le_epochs = checked_schedule(epochs, le_epochs, probe_size, task)
    device = checked_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = SeqModel(task.input_size, task.output_size, config).to(device)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
    optimizer = opt_cls[config.optimizer](model.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
    x_train, y_train = task.x_train.to(device), task.y_train.to(device)
    x_val, y_val = task.x_val.to(device), task.y_val.to(device)
    probe = x_val[:probe_size]
    warmup = task.seq_len // 8 if le_warmup is None else le_warmup
    gen = torch.Generator().manual_seed(config.seed)
    rec = RunRecord(config=config.to_dict(), task={"name": task.name, **task.options}, epochs=epochs)

    def measure(epoch: int) -> bool:
        """Validation loss, weights and spectrum after ``epoch``; False if the run diverged."""
        val = _evaluate(model, task, x_val, y_val)
        rec.val_loss.append(val)
        rec.weights.append(weight_stats(model.rnn))
        if diverged_loss(val, task.chance_loss):
            return False
        if epoch in le_epochs:
            t0 = time.perf_counter()
            rec.spectra[epoch] = _spectrum_summary(model.rnn, probe, warmup, le_k)
            rec.le_time += time.perf_counter() - t0
        return True

    ok = measure(0)
    if callback is not None:
        callback(0, rec)
    for epoch in range(1, epochs + 1):
        if not ok:
            break
        model.train()
        order = torch.randperm(x_train.shape[0], generator=gen).to(device)
        losses, norms = [], []
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            loss = task.loss(model(x_train[idx]), y_train[idx])
            if not torch.isfinite(loss):
                ok = False
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.clip if config.clip > 0 else math.inf
            )
            optimizer.step()
            losses.append(loss.item())
            norms.append(float(norm))
        if not ok:
            break
        rec.train_loss.append(sum(losses) / len(losses))
        rec.grad_norm.append(sum(norms) / len(norms))
        ok = measure(epoch)
        if not ok:
            break
        rec.epochs_completed = epoch
        if callback is not None:
            callback(epoch, rec)
    if ok:
        rec.final_val_loss = rec.val_loss[-1]
        rec.final_normalised_loss = task.normalised_loss(rec.final_val_loss)
    else:
        rec.status = "diverged"
    rec.wall_time = time.perf_counter() - t_start
    return rec
