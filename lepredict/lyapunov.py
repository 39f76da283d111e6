"""Lyapunov spectra of recurrent networks and of arbitrary differentiable maps.

The spectrum is computed with the standard QR (Benettin) method: an orthonormal tangent basis
``Q`` is pushed through the Jacobian of the state update, ``J_t @ Q``, and re-orthonormalised by a
QR decomposition; the exponents are the time averages of ``log|diag R|``. Exponents are in natural
log per step and each trajectory's row is sorted in descending order.

Two entry points:

* :func:`lyapunov_spectrum` for ``torch.nn.RNN``, ``nn.GRU`` and ``nn.LSTM``. Jacobian-times-basis
  products are written out analytically per layer, batched over trajectories, with no autograd and
  no Python loop over the batch.
  :func:`lyapunov_spectra` does the same for several modules of one shape in one batched
  computation (their weights stacked, their trajectories side by side).
* :func:`lyapunov_spectrum_map` for any differentiable ``step(h, x)`` on batched states; the
  Jacobians come from ``torch.func.vjp``.

Layout note: the tangent basis is kept as ``Qt`` of shape ``(B, k, n)`` (one tangent vector per
row). Then ``Qt @ W.T`` for a weight shared by the batch folds the batch into one large GEMM, and
``Qt`` read as ``(B, n, k)`` through ``transpose`` is already in the column-major layout LAPACK's
QR wants, so no copies are made around the QR.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "LyapunovSpectrum",
    "lyapunov_spectra",
    "lyapunov_spectrum",
    "lyapunov_spectrum_map",
    "rnn_step",
    "rnn_state_size",
]


@dataclasses.dataclass(frozen=True)
class LyapunovSpectrum:
    """The Lyapunov spectrum of a batch of trajectories.

    Attributes:
        exponents: ``(B, k)`` exponents in natural log per step, each row sorted descending.
            Rows of diverged trajectories are NaN.
        diverged: ``(B,)`` bool, True where the state or the tangent basis became non-finite.
        floored: ``(B,)`` number of ``|R_ii|`` values that were exactly zero (or below the
            smallest normal number of the dtype) and were floored to it, see :data:`LOG_FLOOR` (0
            where diverged).
            A non-zero count means a direction collapsed completely (a saturated unit), and the
            matching exponent is a lower bound rather than an estimate.
        steps: number of steps averaged (the sequence length minus ``warmup``).
        state_size: the size ``n`` of the state the exponents belong to (``k < n`` for the
            leading exponents only); ``None`` when not known.
        convention: the state of an LSTM's map, ``"full"`` (``(h, c)``) or ``"hidden"``;
            ``None`` for other maps.
        exponent_sum: ``(B,)`` the sum of all ``n`` exponents, the time average of
            ``log|det J_t|`` (NaN where diverged): the row sums of ``exponents`` for a full
            spectrum; for ``k < n`` measured from the Jacobians' determinants when asked for
            (``exponent_sum=True``), else ``None``.
        sum_every: the determinants behind ``exponent_sum`` were taken on every
            ``sum_every``-th averaged step (1: every step; see ``sum_every`` of
            :func:`lyapunov_spectrum`).
    """

    exponents: Tensor
    diverged: Tensor
    floored: Tensor
    steps: int
    state_size: int | None = None
    convention: str | None = None
    exponent_sum: Tensor | None = None
    sum_every: int = 1

    @property
    def mean(self) -> Tensor:
        """``(k,)`` mean over the trajectories that did not diverge (NaN if all diverged)."""
        ok = self.exponents[~self.diverged]
        if ok.shape[0] == 0:
            return torch.full_like(self.exponents[0], float("nan"))
        return ok.mean(0)

    @property
    def std(self) -> Tensor:
        """``(k,)`` population standard deviation over the trajectories that did not diverge.

        Population (``correction=0``) so a single trajectory gives 0 rather than NaN.
        """
        ok = self.exponents[~self.diverged]
        if ok.shape[0] == 0:
            return torch.full_like(self.exponents[0], float("nan"))
        return ok.std(0, correction=0)

    @property
    def n(self) -> int:
        """Number of exponents per trajectory."""
        return self.exponents.shape[1]


def _log_floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny)


#: ``log|R_ii|`` is floored at ``log(torch.finfo(dtype).tiny)`` (about -87.3 in float32 and -708.4
#: in float64) so that a direction annihilated by a saturated unit gives a very negative but finite
#: exponent instead of -inf; :attr:`LyapunovSpectrum.floored` counts how often it happened.
LOG_FLOOR = {torch.float32: _log_floor(torch.float32), torch.float64: _log_floor(torch.float64)}


# --------------------------------------------------------------------------------------------
# Argument checks shared by both entry points.


def _check_common(k: int | None, n: int, warmup: int, T: int, reorth_every: int | str,
                  sum_every: int = 1) -> int:
    if T < 1:
        raise ValueError(f"The input sequence is empty ({T=}); pass at least one time step.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup=}.")
    if warmup >= T:
        raise ValueError(
            f"warmup must be smaller than the number of steps, got {warmup=} for {T=} steps; "
            "lower warmup or pass a longer sequence."
        )
    if reorth_every != "auto" and (not isinstance(reorth_every, int) or reorth_every < 1):
        raise ValueError(f"reorth_every must be a positive int or 'auto', got {reorth_every=}.")
    if not isinstance(sum_every, int) or isinstance(sum_every, bool) or sum_every < 1:
        raise ValueError(f"sum_every must be a positive int (1: every step), got {sum_every=}.")
    if k is None:
        return n
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int or None for the full spectrum, got {k=}.")
    if k > n:
        raise ValueError(
            f"k cannot exceed the state dimension, got {k=} for a state of size {n}; "
            "pass k=None for the full spectrum."
        )
    return k


_META = ("The module or the inputs are on the meta device, which holds shapes but no values: a "
         "spectrum needs the weights and the data; load them first (module.to_empty(device=...) "
         "and its state dict).")


def _host(t: Tensor) -> np.ndarray:
    """``t`` as a numpy array, without a copy where it already lies in host memory."""
    return (t if t.device.type == "cpu" else t.cpu()).numpy()


def _check_finite(name: str, value) -> None:
    """Refuse NaN or infinite inputs: they would come out as "diverged" trajectories, which
    reads as a property of the network when it is a bug in the caller's data."""
    for part in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(part, Tensor) and part.is_floating_point() and not bool(torch.isfinite(part).all()):
            bad = int((~torch.isfinite(part)).sum())
            raise ValueError(f"{name} has {bad} NaN or infinite value(s); the spectrum of a "
                             "network is only defined for finite inputs: clean the data first.")


def _initial_basis(B: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(B, k, n)`` orthonormal rows: the identity for the full spectrum, else a fixed random
    basis (a coordinate subspace could be invariant, e.g. the units of an undriven layer)."""
    if k == n:
        return torch.eye(n, dtype=dtype, device=device).expand(B, n, n).clone()
    q = _random_rows(k, n).to(dtype=dtype, device=device)
    return q.expand(B, k, n).clone()


@functools.lru_cache(maxsize=64)
def _random_rows(k: int, n: int) -> Tensor:
    """The fixed ``(k, n)`` orthonormal rows of :func:`_initial_basis`, float64 on the CPU:
    kept, since drawing and factoring them was a few percent of a small network's
    measurement, which a sweep repeats at every epoch."""
    # A normal tensor even when first asked for under inference mode: later callers may not be.
    with torch.inference_mode(False):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, k, generator=g, dtype=torch.float64)
        return torch.linalg.qr(a).Q.T.contiguous()


def _householder_qr(a: Tensor) -> tuple[Tensor, Tensor]:
    """Thin Householder QR of ``a`` ``(B, n, k)``: ``Q`` and ``|diag R|``.

    On a CPU as LAPACK's two halves (``geqrf``, then ``orgqr`` forming ``Q``) with ``R``'s
    diagonal read off the factored matrix: the same numbers as ``torch.linalg.qr``, bit for bit,
    12-15% sooner from n = 128 (that call also copies out ``R``'s upper triangle, n^2 per
    matrix, which the spectrum never reads). Elsewhere ``torch.linalg.qr``, as measured there.
    """
    if a.device.type != "cpu":
        q, r = torch.linalg.qr(a)
        return q, r.diagonal(dim1=-2, dim2=-1).abs()
    factored, tau = torch.geqrf(a)
    return (torch.linalg.householder_product(factored, tau),
            factored.diagonal(dim1=-2, dim2=-1).abs())


#: Devices on which float32 bases are re-orthonormalised by Cholesky-QR on the float64 Gram
#: matrix (:func:`_gram_qr`) rather than by Householder QR. On CUDA, cuSOLVER's batched QR runs
#: one small factorisation after another (about 44 ms for 32 matrices of 256 x 256 on an H100,
#: against 0.6 ms for the Gram route); on CPUs LAPACK's QR is 2-4 times faster than the Gram route.
GRAM_QR_DEVICES = ("cuda",)
#: The Gram route is kept only while ``min R_ii / max R_ii`` of its first pass stays above this:
#: there its float64 error on ``R_ii`` (about ``eps64 * (max/min)**2``, so <= 1e-4 relative) is
#: below what float32 Householder QR makes (``eps32 * max/min``). Worse-conditioned matrices (a
#: saturated unit, a nearly collapsed direction) and non-finite ones go to Householder QR.
GRAM_QR_MIN_RATIO = 1e-6


def _gram_qr(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin QR of float32 ``a`` ``(B, n, k)`` by two Cholesky-QR passes in float64: ``Q`` (in
    ``a``'s dtype), ``|diag R|`` (float64) and a ``(B,)`` mask of the matrices it is accurate for.

    Only batched GEMMs, Cholesky factorisations and triangular solves, which GPUs run fast; the
    second pass restores the orthogonality the first loses to rounding.
    """
    q = a.double()
    diag = []
    ok = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)
        q = torch.linalg.solve_triangular(chol.mT, q, upper=True, left=False)
        diag.append(chol.diagonal(dim1=-2, dim2=-1))
        ok &= info == 0
    first = diag[0]
    ok &= torch.isfinite(q).flatten(1).all(-1)
    ok &= first.amin(-1) > GRAM_QR_MIN_RATIO * first.amax(-1)
    return q.to(a.dtype), (diag[0] * diag[1]).abs(), ok


#: ``reorth_every="auto"`` lets the tangent basis run without a QR for ``m`` steps while the
#: product of ``m`` Jacobians keeps the exponents above :data:`AUTO_ACCURATE_ABOVE` accurate:
#: its columns then differ in growth by ``exp(m * spread)``, ``spread`` being the range of the
#: per-step rates of the last QR down to the last such exponent, and rounding errors grow with
#: that condition number. ``m * spread`` is kept under this budget for the dtype. The budgets are
#: measured, not derived: the rates within an interval spread wider than their averages, and a
#: 2-layer GRU at scale 3 in float64 is off by 5e-6 at ``m * spread`` about 12 and by 4e-2 at 24
#: (``tests/test_lyapunov.py`` checks 2e-3 on RNN, GRU and LSTM spectra in both dtypes).
AUTO_CONDITION_BUDGET = {torch.float32: 4.0, torch.float64: 10.0}
#: ... and ``m * max|rate|`` under this, so no tangent vector over- or underflows between QRs.
AUTO_GROWTH_BUDGET = {torch.float32: 40.0, torch.float64: 300.0}
#: Exponents below this (natural log per step) may lose accuracy under ``"auto"``.
AUTO_ACCURATE_ABOVE = -20.0
#: The longest run of steps without a QR under ``"auto"``.
AUTO_MAX_EVERY = 16


class _Accumulator:
    """Runs the QR schedule and accumulates ``log|diag R|`` with divergence handling.

    Trajectories whose state or basis turns non-finite are marked diverged, their state and basis
    are reset to harmless values so batched kernels never see NaN again, and they stop counting.
    """

    def __init__(self, B: int, k: int, n: int, T: int, warmup: int, reorth_every: int | str,
                 dtype: torch.dtype, device: torch.device):
        self.T, self.warmup = T, warmup
        self.auto = reorth_every == "auto"
        self.every = 1 if self.auto else reorth_every
        self.next_qr, self.last_qr = 1, 0
        self.dtype = dtype
        self.log_floor = _log_floor(dtype)
        self.tiny = torch.finfo(dtype).tiny
        # float64 sums: T float32 increments would otherwise lose digits over long runs.
        self.sum = torch.zeros(B, k, dtype=torch.float64, device=device)
        self.logdet = torch.zeros(B, dtype=torch.float64, device=device)
        # The steps whose log|det J_t| are in ``logdet``: every ``sum_every``-th averaged one.
        self.sum_every, self.logdet_steps = 1, 0
        self.floored = torch.zeros(B, dtype=torch.int64, device=device)
        self.diverged = torch.zeros(B, dtype=torch.bool, device=device)
        self.basis0 = _initial_basis(B, k, n, dtype, device)
        # A host sync per step is free on CPU but stalls the CUDA launch queue, so on GPUs the
        # divergence check runs every few steps; a NaN row cannot leak into other rows meanwhile
        # because every batched kernel here treats rows independently. (The Gram route still
        # syncs once per QR, to send the rows it cannot factor to Householder QR.)
        self.check_every = 1 if device.type == "cpu" else 16
        self.gram = device.type in GRAM_QR_DEVICES and dtype == torch.float32
        # Deferred (the two-pass engine): the QRs' diagonals are kept and summed at the end in
        # one operation, and divergence is read off once (:meth:`finish`), not every step.
        self.defer, self.diagonals = False, []

    def needs_qr(self, t: int) -> bool:
        """QR after step ``t`` (1-based): on schedule, at the end of warm-up, and at the end."""
        on_schedule = t >= self.next_qr if self.auto else t % self.every == 0
        return on_schedule or t == self.warmup or t == self.T

    def schedule(self, t: int, d: Tensor) -> None:
        """Under ``"auto"``, the next QR from the per-step rates of the QR just made."""
        # The warm-up follows the schedule too: the QR that ends it is always taken, and the
        # subspaces a QR leaves are those of the product of the Jacobians since the last one, so
        # the skipped ones change where the averaged steps start only by rounding.
        steps, self.last_qr = t - self.last_qr, t
        # A (rows, k) matrix: numpy's per-call cost is a fraction of torch's dispatch (widened
        # to float64 by numpy, not by a torch call; |R_ii| or NaN: log warns on neither).
        rates = np.log(np.maximum(_host(d), self.tiny, dtype=np.float64)) / steps
        rates = rates[~_host(self.diverged) & np.isfinite(rates).all(-1)]
        if rates.size == 0:
            self.next_qr = t + 1
            return
        # Columns up to the last one that must stay accurate; a collapsed direction above it
        # makes the spread large, and the schedule falls back to a QR every step.
        accurate = np.flatnonzero((rates > AUTO_ACCURATE_ABOVE).any(0))
        kept = rates[:, :accurate[-1] + 1 if accurate.size else 1]
        spread = float((kept.max(-1) - kept.min(-1)).max())
        growth = float(np.abs(rates).max())
        m = min(AUTO_CONDITION_BUDGET[self.dtype] / max(spread, 1e-12),
                AUTO_GROWTH_BUDGET[self.dtype] / max(growth, 1e-12), AUTO_MAX_EVERY)
        self.next_qr = t + max(int(m), 1)

    def qr(self, t: int, qt: Tensor) -> Tensor:
        a = qt.transpose(-1, -2)
        if self.gram:
            q, d, ok = _gram_qr(a)
            self.householder_where_not(ok, a, q, d)
        else:
            q, d = _householder_qr(a)
        self.accumulate(t, d)
        if self.auto:
            self.schedule(t, d)
        return q.transpose(-1, -2)

    @staticmethod
    def householder_where_not(ok: Tensor, a: Tensor, q: Tensor, d: Tensor) -> None:
        """Redo by Householder QR, in place in ``q`` and ``d``, the rows the Gram route flagged."""
        if not bool(ok.all()):
            bad = (~ok).nonzero().squeeze(-1)
            q_bad, d_bad = _householder_qr(a[bad])
            q[bad] = q_bad
            d[bad] = d_bad.to(d.dtype)

    def accumulate(self, t: int, d: Tensor) -> None:
        if t <= self.warmup:
            return
        if self.defer:
            self.diagonals.append(d)
        else:
            small = d < self.tiny
            self.floored += small.sum(-1)
            self.sum += d.clamp_min(self.tiny).log().to(torch.float64)

    def takes_logdet(self, t: int) -> bool:
        """Whether step ``t`` (from 1) is one whose ``log|det J_t|`` the sum averages."""
        return t > self.warmup and (t - self.warmup - 1) % self.sum_every == 0

    def accumulate_logdet(self, t: int, logdet: Tensor) -> None:
        """Add step ``t``'s ``log|det J_t|`` (``(B,)``) if the sum takes that step."""
        if self.takes_logdet(t):
            self.logdet += logdet.to(torch.float64)
            self.logdet_steps += 1

    def check(self, t: int, state: list[Tensor], qt: Tensor) -> tuple[list[Tensor], Tensor]:
        if t % self.check_every and t != self.T:
            return state, qt
        # A row's sum is non-finite exactly when one of its entries is (or when the sum
        # overflows, itself divergence): one reduction per tensor, not a test of every entry,
        # since on small networks these per-step checks were a fifth of the measurement.
        total = qt.flatten(1).sum(-1).to(torch.float64) + self.sum.sum(-1)
        for s in state:
            total += s.flatten(1).sum(-1)
        bad = ~torch.isfinite(total)
        new = bad & ~self.diverged
        if not bool(new.any()):
            return state, qt
        self.diverged |= new
        keep = ~self.diverged
        state = [torch.where(keep.view(-1, *([1] * (s.dim() - 1))), s, 0) for s in state]
        qt = torch.where(keep[:, None, None], qt, self.basis0)
        self.sum = torch.where(keep[:, None], self.sum, 0)
        self.logdet = torch.where(keep, self.logdet, 0)
        return state, qt

    def finish(self, finite: Tensor) -> None:
        """Deferred mode: sum the kept diagonals; rows not ``finite`` (``(B,)``: their states
        and final basis) or whose sum is not are the diverged ones."""
        if self.diagonals:
            d = torch.stack(self.diagonals)
            self.floored += (d < self.tiny).sum((0, -1))
            self.sum += d.clamp_min(self.tiny).log().to(torch.float64).sum(0)
            self.diagonals = []
        self.diverged |= ~(finite & torch.isfinite(self.sum.sum(-1)))

    def result(self, dtype: torch.dtype, n: int, logdet: bool) -> LyapunovSpectrum:
        """The spectrum; ``logdet``: the per-step ``log|det J_t|`` were accumulated."""
        steps = self.T - self.warmup
        ex = (self.sum / steps).sort(dim=-1, descending=True).values.to(dtype)
        ex = torch.where(self.diverged[:, None], float("nan"), ex)
        if self.sum.shape[1] == n:
            total = (self.sum.sum(-1) / steps).to(dtype)
        elif logdet:
            total = (self.logdet / max(self.logdet_steps, 1)).to(dtype)
        else:
            total = None
        if total is not None:
            total = torch.where(self.diverged, float("nan"), total)
        # A diverged row's count means nothing (and differs between the loops that reset its
        # state and those that let its NaNs run): 0, as its exponents are NaN.
        floored = torch.where(self.diverged, 0, self.floored)
        return LyapunovSpectrum(ex, self.diverged.clone(), floored, steps,
                                exponent_sum=total,
                                sum_every=self.sum_every if logdet and total is not None else 1)


# --------------------------------------------------------------------------------------------
# nn.RNN / nn.GRU / nn.LSTM: analytic tangent propagation.


def _module_info(rnn: nn.Module, lstm_state: str) -> tuple[str, int, int, int]:
    """Validate the module and return (cell, N, layers, state size per layer)."""
    if isinstance(rnn, nn.LSTM):
        cell = "lstm"
    elif isinstance(rnn, nn.GRU):
        cell = "gru"
    elif isinstance(rnn, nn.RNN):
        cell = "rnn_" + rnn.nonlinearity
    else:
        # A model that holds its RNN (model.rnn, say) is the common case: name the attribute.
        inner = next((name for name, m in rnn.named_modules()
                      if isinstance(m, (nn.RNN, nn.GRU, nn.LSTM))), None) \
            if isinstance(rnn, nn.Module) else None
        hint = (f"pass the recurrent module it holds (.{inner}), or " if inner
                else "")
        raise ValueError(
            f"Unsupported module {type(rnn).__name__}: lyapunov_spectrum takes torch.nn.RNN, "
            f"nn.GRU or nn.LSTM; {hint}wrap any other cell as step(h, x) and use "
            "lyapunov_spectrum_map."
        )
    if rnn.bidirectional:
        raise ValueError(
            "A bidirectional RNN is not a forward-in-time dynamical system and has no Lyapunov "
            "spectrum; pass the forward direction as a unidirectional module."
        )
    if getattr(rnn, "proj_size", 0):
        raise ValueError(
            f"LSTM with proj_size={rnn.proj_size} is not supported; use proj_size=0, or write the "
            "step as step(h, x) and use lyapunov_spectrum_map."
        )
    if lstm_state not in ("full", "hidden"):
        raise ValueError(f"lstm_state must be 'full' or 'hidden', got {lstm_state=}.")
    N = rnn.hidden_size
    per_layer = 2 * N if (cell == "lstm" and lstm_state == "full") else N
    return cell, N, rnn.num_layers, per_layer


def _warn_if_forward_overridden(rnn: nn.Module) -> None:
    """The engine runs PyTorch's equations on the module's weights: a subclass whose own
    ``forward`` changes what the recurrence receives or does is not what gets measured."""
    base = next(c for c in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(rnn, c))
    if type(rnn).forward is not base.forward:
        warnings.warn(
            f"{type(rnn).__name__} overrides nn.{base.__name__}.forward: the spectrum is that of "
            f"nn.{base.__name__}'s own recurrence with this module's weights, driven by the "
            "inputs as passed, not of what its forward computes. Pass the inputs the recurrence "
            "receives, or measure your step function with lepredict.lyapunov_spectrum_map.",
            UserWarning, stacklevel=4)


def rnn_state_size(rnn: nn.Module, *, lstm_state: str = "full") -> int:
    """Dimension of the state whose spectrum :func:`lyapunov_spectrum` measures."""
    _, _, layers, per_layer = _module_info(rnn, lstm_state)
    return layers * per_layer


def _weights(rnn: nn.Module, dtype: torch.dtype) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """Per layer: (W_ih, W_hh, combined bias or None), detached and cast."""
    out = []
    for layer in range(rnn.num_layers):
        w_ih = getattr(rnn, f"weight_ih_l{layer}").detach().to(dtype)
        w_hh = getattr(rnn, f"weight_hh_l{layer}").detach().to(dtype)
        b = None
        if rnn.bias:
            b_ih = getattr(rnn, f"bias_ih_l{layer}").detach().to(dtype)
            b_hh = getattr(rnn, f"bias_hh_l{layer}").detach().to(dtype)
            b = (b_ih, b_hh)
        out.append((w_ih, w_hh, b))
    return out


def _initial_state(rnn: nn.Module, h0, B: int, cell: str, dtype, device) -> list[Tensor]:
    """Flat list of per-layer state tensors: [h_0, ..., h_{L-1}] or [h_0, c_0, h_1, c_1, ...]."""
    L, N = rnn.num_layers, rnn.hidden_size
    expect = (L, B, N)
    if h0 is None:
        parts = [torch.zeros(expect, dtype=dtype, device=device)]
        if cell == "lstm":
            parts.append(torch.zeros(expect, dtype=dtype, device=device))
    else:
        if cell == "lstm":
            if not (isinstance(h0, (tuple, list)) and len(h0) == 2):
                raise ValueError(
                    "For nn.LSTM, h0 must be a tuple (h0, c0) of tensors of shape "
                    f"(num_layers, B, hidden_size) = {expect}, as nn.LSTM itself takes."
                )
            parts = list(h0)
        else:
            if not isinstance(h0, Tensor):
                raise ValueError(f"h0 must be a tensor of shape (num_layers, B, hidden_size) = {expect}.")
            parts = [h0]
        for p in parts:
            if tuple(p.shape) != expect:
                raise ValueError(
                    f"h0 has shape {tuple(p.shape)}, expected (num_layers, B, hidden_size) = {expect}."
                )
        parts = [p.detach().to(dtype=dtype, device=device) for p in parts]
    if cell == "lstm":
        h, c = parts
        return [t for layer in range(L) for t in (h[layer], c[layer])]
    return [parts[0][layer] for layer in range(L)]


# Weights come either from one module, ``(out, in)`` matrices and ``(out,)`` biases, or from K
# modules of one shape stacked (:func:`lyapunov_spectra`), ``(K, out, in)`` and ``(K, out)``. Then
# every state, input and tangent tensor holds the K networks' rows one network after another
# (``K * B`` rows), so the element-wise work is the same code either way; only products with a
# weight (``_xwt``, ``_plus``, ``_gates_jacobian_t``) tell the two apart.


def _xwt(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T``; with stacked weights, each network's rows of ``x`` by its own matrix, as one
    batched GEMM."""
    if w.dim() == 2:
        return x @ w.T
    K = w.shape[0]
    return (x.reshape(K, -1, x.shape[-1]) @ w.mT).view(*x.shape[:-1], w.shape[-2])


def _plus(g: Tensor, b: Tensor) -> Tensor:
    """``g + b`` for a bias ``b``; with stacked biases, each network's rows by its own."""
    if b.dim() == 1:
        return g + b
    K = b.shape[0]
    return (g.reshape(K, -1, g.shape[-1]) + b[:, None]).view(g.shape)


def _plus_xwt(g: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``g + x @ w.T`` as one fused product, ``x`` being ``(rows, in)`` and ``g`` per row or a
    bias; with stacked weights (``baddbmm``) each network's rows by its own matrix, and ``g``
    per row or one bias per network ``(K, out)`` (the same thing when each network has one
    row)."""
    if w.dim() == 2:
        return torch.addmm(g, x, w.T)
    K = w.shape[0]
    g = g.reshape(K, -1, g.shape[-1]) if g.shape[0] == x.shape[0] else g[:, None]
    return torch.baddbmm(g, x.reshape(K, -1, x.shape[-1]), w.mT).view(x.shape[0], w.shape[-2])


def lyapunov_spectrum(
    rnn: nn.Module,
    inputs: Tensor,
    *,
    k: int | None = None,
    warmup: int = 0,
    h0=None,
    reorth_every: int | str = 1,
    dtype: torch.dtype | None = None,
    lstm_state: str = "full",
    exponent_sum: bool = False,
    sum_every: int = 1,
) -> LyapunovSpectrum:
    """Lyapunov spectrum of an ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` driven by ``inputs``.

    The state is the concatenation over layers of ``h`` (RNN, GRU) or of ``(h, c)`` (LSTM, ``2N``
    per layer). The Jacobian at step ``t`` is that of the map ``state_{t-1} -> state_t`` taken at
    ``(state_{t-1}, x_t)``; deeper layers see the new state of the layer below, so the Jacobian is
    that of the whole stacked step.

    Args:
        rnn: the module; any ``num_layers``, with or without bias, ``batch_first`` either way.
            Its weights are read, never modified; dropout plays no part (eval-mode dynamics).
        inputs: ``(B, T, input_size)`` if ``rnn.batch_first`` else ``(T, B, input_size)``.
            Each of the ``B`` sequences drives one trajectory.
        k: number of leading exponents; ``None`` for the full spectrum.
        warmup: the first ``warmup`` steps evolve the state and the basis (with QR) but are not
            averaged.
        h0: initial state in the module's own convention, ``(num_layers, B, N)`` or a tuple
            ``(h0, c0)`` for the LSTM; ``None`` starts from zeros.
        reorth_every: QR every this many steps (and at the end of warm-up and at the end); or
            ``"auto"``: after each QR, as many steps as the spread of the last rates allows for
            the exponents above :data:`AUTO_ACCURATE_ABOVE` to keep their accuracy (on CUDA,
            where the Gram-route QR is cheap and steps run as a graph, every step).
        dtype: computation dtype (``torch.float64`` runs everything in double); ``None`` uses the
            module's parameter dtype.
        lstm_state: ``"full"`` for the ``(h, c)`` state; ``"hidden"`` for the hidden-only map of
            the papers' code, ``h_{t-1} -> h_t`` with ``c_{t-1}`` held fixed (``N`` per layer).
        exponent_sum: with ``k < n``, also measure the sum of all ``n`` exponents
            (:attr:`LyapunovSpectrum.exponent_sum`) as the mean ``log|det J_t|``: a few
            elementwise operations per step for the RNN and the full LSTM state, an LU
            factorisation per layer and step for the GRU and the hidden-only LSTM map. A full
            spectrum always has it.
        sum_every: where the sum needs LUs (the GRU, the hidden-only LSTM map), take them on
            every ``sum_every``-th averaged step only: the same time average estimated from
            fewer steps, at ``1 / sum_every`` of the LUs' cost (the default measurement's 4
            moved the GRU's mean exponent by about the spread between its trajectories).
            Closed-form determinants (the RNN, the full LSTM state) take every step anyway.

    Returns:
        A :class:`LyapunovSpectrum`.

    Raises:
        ValueError: unsupported module, wrong input or ``h0`` shape, NaN or infinite values in
            ``inputs`` or ``h0``, ``k`` larger than the state, ``warmup >= T``.

    Example:
        >>> import torch, lepredict
        >>> rnn = torch.nn.LSTM(3, 16, num_layers=2, batch_first=True)
        >>> spec = lepredict.lyapunov_spectrum(rnn, torch.randn(8, 200, 3), warmup=50)
        >>> spec.exponents.shape, spec.mean.shape
        (torch.Size([8, 64]), torch.Size([64]))
    """
    return _spectra([rnn], inputs, k=k, warmup=warmup, h0=h0, reorth_every=reorth_every,
                    dtype=dtype, lstm_state=lstm_state, exponent_sum=exponent_sum,
                    sum_every=sum_every)[0]


def lyapunov_spectra(
    rnns,
    inputs: Tensor,
    *,
    k: int | None = None,
    warmup: int = 0,
    h0=None,
    reorth_every: int | str = 1,
    dtype: torch.dtype | None = None,
    lstm_state: str = "full",
    exponent_sum: bool = False,
    sum_every: int = 1,
) -> list[LyapunovSpectrum]:
    """Lyapunov spectra of several networks of one shape, driven by the same inputs, in one
    batched computation: what :func:`lyapunov_spectrum` gives for each, at the cost of about one
    call while the networks are small (a population trained together, a sweep's trials).

    Args:
        rnns: a sequence of ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` modules of one class, size,
            depth, nonlinearity, bias, layout, dtype and device; their weights may differ.
        inputs, k, warmup, h0, reorth_every, dtype, lstm_state, exponent_sum, sum_every: as in
            :func:`lyapunov_spectrum`, the same for every network (one QR schedule for all
            under ``reorth_every="auto"``).

    Returns:
        One :class:`LyapunovSpectrum` per module, in order.

    Raises:
        ValueError: no module, modules of different shapes, or what :func:`lyapunov_spectrum`
            refuses.

    Example:
        >>> import torch, lepredict
        >>> rnns = [torch.nn.GRU(3, 8, batch_first=True) for _ in range(4)]
        >>> specs = lepredict.lyapunov_spectra(rnns, torch.randn(2, 50, 3), warmup=10)
        >>> len(specs), specs[0].exponents.shape
        (4, torch.Size([2, 8]))
    """
    rnns = list(rnns)
    if not rnns:
        raise ValueError("rnns is empty; pass at least one module.")
    return _spectra(rnns, inputs, k=k, warmup=warmup, h0=h0, reorth_every=reorth_every,
                    dtype=dtype, lstm_state=lstm_state, exponent_sum=exponent_sum,
                    sum_every=sum_every)


def _shape_of(rnn: nn.Module) -> tuple:
    """What must agree for modules to be stacked into one batched computation."""
    p = next(rnn.parameters())
    return (type(rnn).__name__, getattr(rnn, "nonlinearity", None), rnn.input_size,
            rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first, p.dtype, p.device)


def _stacked_weights(rnns: list[nn.Module], dtype: torch.dtype):
    """:func:`_weights` of each module, stacked: ``(K, out, in)`` weights, ``(K, out)`` biases."""
    per_module = [_weights(rnn, dtype) for rnn in rnns]
    out = []
    for layer in range(len(per_module[0])):
        w_ih = torch.stack([w[layer][0] for w in per_module])
        w_hh = torch.stack([w[layer][1] for w in per_module])
        b = None
        if per_module[0][layer][2] is not None:
            b = tuple(torch.stack([w[layer][2][i] for w in per_module]) for i in (0, 1))
        out.append((w_ih, w_hh, b))
    return out


def _spectra(rnns: list[nn.Module], inputs: Tensor, *, k, warmup, h0, reorth_every, dtype,
             lstm_state, exponent_sum, sum_every=1) -> list[LyapunovSpectrum]:
    rnn = rnns[0]
    cell, N, L, per_layer = _module_info(rnn, lstm_state)
    shapes = [_shape_of(r) for r in rnns]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"rnns[{i}] differs from rnns[0] in class, sizes, layers, nonlinearity, bias, "
                f"layout, dtype or device ({shape} vs {shapes[0]}); spectra are batched over "
                "modules of one shape only: group the modules by shape and call once per group."
            )
    K = len(rnns)
    _warn_if_forward_overridden(rnn)
    if any(p.is_meta for r in rnns for p in r.parameters()) or (
            isinstance(inputs, Tensor) and inputs.is_meta):
        raise ValueError(_META)
    if not isinstance(inputs, Tensor) and hasattr(inputs, "__array__"):
        raise ValueError(f"inputs is a {type(inputs).__name__}, not a torch.Tensor; convert it "
                         "with torch.as_tensor(inputs).")
    if not isinstance(inputs, Tensor) or inputs.dim() != 3:
        raise ValueError(
            "inputs must be a 3-D tensor, (B, T, input_size) with batch_first=True or "
            f"(T, B, input_size) otherwise; got {getattr(inputs, 'shape', type(inputs).__name__)}."
        )
    x = inputs if rnn.batch_first else inputs.transpose(0, 1)
    B, T, d_in = x.shape
    if d_in != rnn.input_size:
        raise ValueError(
            f"inputs have {d_in} features per step but the module expects input_size={rnn.input_size}."
        )
    if B < 1:
        raise ValueError("inputs hold no sequence (batch size 0).")
    _check_finite("inputs", x)
    _check_finite("h0", h0)
    n = L * per_layer
    convention = lstm_state if cell == "lstm" else None
    k = _check_common(k, n, warmup, T, reorth_every, sum_every)
    param = next(rnn.parameters())
    dtype = dtype or param.dtype
    if dtype not in (torch.float32, torch.float64):
        # A half-precision model is measured in float32 (the QRs need its range): say how.
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype=}; for a "
                         "half-precision model pass dtype=torch.float32 (its weights are read "
                         "in that precision, not changed).")
    device = param.device
    x = x.detach().to(dtype=dtype, device=device)
    if reorth_every == "auto" and device.type in GRAM_QR_DEVICES:
        reorth_every = 1
    map_name = cell if cell != "lstm" else f"lstm_{lstm_state}"

    # On a CPU, inference mode: no version counters or autograd bookkeeping on the hundreds of
    # small operations of a measurement (LSTM-64 and -128, 1 and 2 layers: 0.90-0.92x of the
    # time under no_grad). The results are copied out as normal tensors below.
    with torch.inference_mode() if device.type == "cpu" else torch.no_grad():
        weights = _weights(rnn, dtype) if K == 1 else _stacked_weights(rnns, dtype)
        state = _initial_state(rnn, h0, B, cell, dtype, device)
        if K > 1:  # every network starts from the same state: rows network after network
            state = [s.repeat(K, 1) for s in state]
        acc = _Accumulator(K * B, k, n, T, warmup, reorth_every, dtype, device)
        qt = acc.basis0.clone()
        # Input projection of layer 0 for all steps at once: one GEMM instead of T small ones.
        w_ih0, _, b0 = weights[0]
        ops = _CELLS[map_name]
        bias0 = _layer_bias(ops, b0)
        if K == 1:
            gi0 = _xwt_all(bias0, x, w_ih0)
        else:  # (B * T, d) by each network's (d, G): (K, B * T, G), read as (K * B, T, G)
            gi0 = (x.reshape(B * T, d_in) @ w_ih0.mT).view(K * B, T, w_ih0.shape[-2])
            if bias0 is not None:
                gi0 = _plus(gi0, bias0)
        logdet = (_logdet_constants(map_name, weights, N, B) if exponent_sum and k < n
                  else None)
        if ops.lu:
            acc.sum_every = sum_every
        # An LU (the GRU's and the hidden-only LSTM's log-determinant) waits on the host for
        # cuSOLVER's pivots, which a graph capture forbids; the closed forms capture.
        if (acc.gram and qt.is_cuda and reorth_every == 1 and T >= CUDA_GRAPH_MIN_STEPS
                and (logdet is None or not ops.lu)):
            _run_graphed(_make_step(ops), weights, state, qt, gi0, N, acc, logdet)
        else:
            # PyTorch's fused recurrences serve one network's weights; on CUDA, cuDNN would
            # want them in one flat buffer (and warn), and graphs replay most runs there.
            _run_two_pass(ops, weights, state, qt, gi0, N, acc, logdet,
                          x if K == 1 and device.type == "cpu" else None)
        whole = acc.result(dtype, n, logdet is not None)

    def rows(tensor, i):
        return None if tensor is None else tensor[i * B:(i + 1) * B].clone()

    return [LyapunovSpectrum(rows(whole.exponents, i), rows(whole.diverged, i),
                             rows(whole.floored, i), whole.steps, state_size=n,
                             convention=convention, exponent_sum=rows(whole.exponent_sum, i),
                             sum_every=whole.sum_every)
            for i in range(K)]


#: On CUDA (float32, a QR every step), sequences at least this long run their steps as replays
#: of one captured CUDA graph: a step is otherwise dozens of small kernel launches, whose host
#: overhead exceeds their arithmetic at these sizes.
CUDA_GRAPH_MIN_STEPS = 16


class _GraphedStep:
    """One time step (state update, tangent propagation, Gram QR) captured as a CUDA graph that
    reads and writes its own static buffers: ``state``, ``qt`` and the input ``x``. After each
    replay ``pre`` holds the tangent rows before the QR, ``d`` and ``ok`` the Gram QR's
    diagonal and mask, and ``logdet`` the step's ``log|det J_t|`` (``None`` unless the step's
    ``logdet`` constants were given); ``qt`` already holds the new basis."""

    def __init__(self, step, weights, state: list[Tensor], qt: Tensor, x: Tensor, N: int,
                 logdet=None):
        self.state = [s.clone() for s in state]
        self.qt, self.x = qt.clone(), x.clone()

        def body():
            new_state, pre, step_logdet = step(weights, self.state, self.qt, self.x, N, logdet)
            q, d, ok = _gram_qr(pre.transpose(-1, -2))
            for old, new in zip(self.state, new_state):
                old.copy_(new)
            self.qt.copy_(q.transpose(-1, -2))
            return pre, d, ok, step_logdet

        # Warm up on a side stream (cuBLAS and cuSOLVER set up workspaces on first use), then put
        # the buffers back: capturing records the kernels without running them.
        saved = [b.clone() for b in (*self.state, self.qt)]
        side = torch.cuda.Stream(device=qt.device)
        side.wait_stream(torch.cuda.current_stream(qt.device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(qt.device).wait_stream(side)
        for buffer, value in zip((*self.state, self.qt), saved):
            buffer.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.pre, self.d, self.ok, self.logdet = body()


def _run_graphed(step, weights, state, qt, gi0, N, acc: _Accumulator, logdet=None) -> None:
    """The time loop of :func:`lyapunov_spectrum` by graph replays, with the same fallback to
    Householder QR and the same divergence checks as the eager loop."""
    g = _GraphedStep(step, weights, state, qt, gi0[:, 0], N, logdet)
    for t in range(1, acc.T + 1):
        g.x.copy_(gi0[:, t - 1])
        g.graph.replay()
        acc.householder_where_not(g.ok, g.pre.transpose(-1, -2), g.qt.transpose(-1, -2), g.d)
        acc.accumulate(t, g.d)
        if g.logdet is not None:
            acc.accumulate_logdet(t, g.logdet)
        new_state, new_qt = acc.check(t, g.state, g.qt)
        if new_qt is not g.qt:  # diverged rows were reset
            for buffer, value in zip(g.state, new_state):
                buffer.copy_(value)
            g.qt.copy_(new_qt)


# Each cell is a few small functions on one layer, written for any leading dimensions so that
# the same code serves one step, ``(B, ...)``, and a whole sequence at once, ``(B, T, ...)``:
#
# * ``advance(gi, w_hh, b, state) -> (new_state, saved)``: the state recursion, ``gi`` being the
#   input-side pre-activations (bias included); ``saved`` is what the Jacobian needs of the step;
# * ``hidden_trajectory(x, w_ih, w_hh, b, state)`` and ``replay(gi, w_hh, b, state, hs)``: the
#   same for a whole sequence of one network, the first by PyTorch's fused recurrence (its
#   ``h``), the second recovering ``saved`` and the states before and after every step from it;
# * ``coefficients(saved, state, new_state)``: the chain rule folded into per-unit vectors, so
#   each ``(B, k, N)`` tangent block costs a few fused multiply-adds;
# * ``logdet(coefficients, w_hh, N, constant)``: the layer block's ``log|det|`` (the step's
#   Jacobian is block lower triangular over layers, so the layers' parts add up);
# * ``for_push(coefficients)``: those vectors laid out as ``push`` takes them, which is given
#   them with a broadcast dimension for the tangent rows, ``(B, 1, ...)``;
# * ``push(coefficients, qt, dq_below, w_ih, w_hh, out, N)``: the layer's tangent rows from its
#   own old ones and the new ones of the layer below (its input), written into ``out``;
#   returns the new ``h`` rows, the next layer's input.
#
# Off CUDA graphs the engine runs in two passes (:func:`_run_two_pass`): the state recursion
# alone, one layer after another over the whole sequence, then every coefficient and
# log-determinant for all steps in a few large operations, and only then the tangent loop, whose
# steps hold nothing but the products with the weights and the QR. On small networks a step is
# otherwise dozens of tiny operations whose dispatch costs more than their arithmetic.


def _tangent_pre(qt_h: Tensor, w_hh: Tensor, dq_below: Tensor | None, w_ih: Tensor) -> Tensor:
    """Tangent of the pre-activations: ``dh @ W_hh.T + d(input) @ W_ih.T``; layer 0's input is
    the data, which is not perturbed."""
    d = _xwt(qt_h, w_hh)
    if dq_below is None:
        return d
    if w_ih.dim() == 2:  # accumulated in place by the GEMM: no temporary, no addition
        d.view(-1, d.shape[-1]).addmm_(dq_below.reshape(-1, dq_below.shape[-1]), w_ih.T)
        return d
    return d.add_(_xwt(dq_below, w_ih))


def _sig_pair(pre: Tensor) -> tuple[Tensor, Tensor]:
    """``sigmoid(pre)`` and ``1 - sigmoid(pre)``, the latter as ``sigmoid(-pre)``: subtracting a
    saturated gate from 1 in float32 would leave few correct digits in a derivative."""
    return torch.sigmoid(pre), torch.sigmoid(-pre)


def _dtanh(pre: Tensor) -> Tensor:
    """``1 - tanh(pre)**2`` as ``cosh(pre)**-2``, exact where tanh saturates in float32."""
    return torch.cosh(pre).pow(-2)


def _log_abs(v: Tensor, tiny: float) -> Tensor:
    """The sum over units (last dimension) of ``log|v|``, each floored like ``log|R_ii|``."""
    return v.abs().clamp_min(tiny).log().sum(-1)


def _rows(a: Tensor) -> Tensor:
    """``(B, [T,] N)`` coefficients as ``(B * T, 1, N)`` rows, network after network (the
    leading dimension is network-major), the layout :func:`_gates_jacobian_t` takes."""
    return a.reshape(-1, 1, a.shape[-1])


def _add_constant(part: Tensor, constant) -> Tensor:
    """``part`` ``(B, ...)`` plus a per-layer constant: a float, or one value per row."""
    if isinstance(constant, Tensor):
        constant = constant.view(-1, *([1] * (part.dim() - 1)))
    return part + constant


#: The GRU's Jacobian is formed explicitly once the tangent rows number at least ``N`` over this
#: (full spectra, typically); for a few leading exponents the gates' GEMMs are cheaper.
GRU_EXPLICIT_SHARE = 4


def _gates_jacobian_t(w: Tensor, coefficients, N: int) -> Tensor:
    """``(B, N, N)``: the transposed Jacobian ``sum_g diag(a_g) W_g`` over the gate blocks of
    ``w`` (``len(coefficients) * N``, N), each coefficient ``a_g`` of shape ``(B, 1, N)``
    scaling its gate's rows; with stacked weights ``(K, G * N, N)``, each network's rows by its
    own blocks."""
    blocks = [w[..., g * N:(g + 1) * N, :].mT for g in range(len(coefficients))]
    if w.dim() == 3:  # stacked: (K, 1, N, N) blocks against (K, B / K, 1, N) coefficients
        K = w.shape[0]
        blocks = [block[:, None] for block in blocks]
        coefficients = [a.view(K, -1, *a.shape[1:]) for a in coefficients]
    jac_t = blocks[0] * coefficients[0]
    for block, a in zip(blocks[1:], coefficients[1:]):
        jac_t.addcmul_(block, a)
    return jac_t.reshape(-1, N, N)


#: On a CPU, the LUs of matrices larger than this run one matrix at a time: once
#: ``torch.set_num_threads`` has been called (2 or more threads), MKL's batched LU of matrices
#: from about 152 rows up hangs after "Parameter 6 was incorrect on entry to SLASWP"
#: (pytorch/pytorch#141358; torch 2.13's MKL 2024.2), or with 16 or 32 threads returns wrong
#: determinants at 150 rows; one matrix at a time it does neither, and batched it was exact
#: from 129 to 149 rows. The loop costs 2.1x the batched LU's time at 256 rows and the same at
#: 512; below this size the batched LU runs, at a margin from where the trouble starts.
CPU_BATCHED_LU_MAX = 128


def _slogdet(a: Tensor) -> Tensor:
    """``log|det|`` of a batch of matrices, one at a time where a batched LU can hang."""
    n = a.shape[-1]
    if a.device.type == "cpu" and n > CPU_BATCHED_LU_MAX and a.shape[:-2].numel() > 1:
        if torch.get_num_threads() > _available_cores():
            # MKL's one-matrix LU with more threads than cores took 0.3 s a 256-row matrix
            # (2 ms on as many threads as cores); numpy's LAPACK does not share its threads,
            # at 3-5x the in-core loop's time.
            return torch.from_numpy(np.linalg.slogdet(a.detach().contiguous().numpy())[1])
        return torch.stack([torch.linalg.slogdet(m).logabsdet
                            for m in a.reshape(-1, n, n)]).view(a.shape[:-2])
    return torch.linalg.slogdet(a).logabsdet


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _logabsdet(jac: Tensor) -> Tensor:
    """``(B,)`` float64 ``log|det|`` of a batch of Jacobian blocks, floored like the exponents
    (a singular block gives ``N * log(tiny)`` rather than ``-inf``).

    The LU runs in ``jac``'s own dtype: on float32 GRU Jacobians (N = 64 to 512, default to
    saturated scales) a float64 LU moved the mean exponent by at most 5e-7, and cost 2.5 times
    as much; the Jacobian's own float32 rounding already bounds what a wider LU could add."""
    floor = jac.shape[-1] * _log_floor(jac.dtype)
    out = _slogdet(jac).to(torch.float64)
    if jac.dtype != torch.float64:
        # A float32 LU can overflow or meet 0/0 where float64's does not (corpus v2 held 4 runs,
        # 3-layer GRUs trained at large learning rates, whose sums came out NaN): redo those.
        redo = ~torch.isfinite(out)
        if bool(redo.any()):
            out[redo] = _slogdet(jac[redo].double())
    return out.clamp_min(floor)


def _lu_logdet(jac_t: Tensor, lead: torch.Size, constant) -> Tensor:
    return _add_constant(_logabsdet(jac_t).view(lead), constant)


def _fused_args(w_ih: Tensor, w_hh: Tensor, b) -> tuple[list[Tensor], bool]:
    """One layer's weights as ``torch.rnn_tanh``/``gru``/``lstm`` (what ``nn.RNN``, ``nn.GRU``
    and ``nn.LSTM`` call) take them, and whether there are biases. Their other positional
    arguments, as the callers pass them: 1 layer, no dropout, not training, one direction,
    batch first."""
    return ([w_ih, w_hh] if b is None else [w_ih, w_hh, *b]), b is not None


def _before(first: Tensor, trajectory: Tensor) -> Tensor:
    """``(B, T, N)``: the states each step starts from, ``first`` then all but the last."""
    return torch.cat([first[:, None], trajectory[:, :-1]], 1)


def _xwt_all(g: Tensor | None, x: Tensor, w: Tensor) -> Tensor:
    """``g + x @ w.T`` for a whole ``(B, T, in)`` sequence as one GEMM; ``g`` per step, a bias
    or ``None``."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w.T if g is None else torch.addmm(g.reshape(-1, g.shape[-1]), flat, w.T)
    return out.view(*x.shape[:-1], w.shape[0])


class _RNNCell:
    state_parts = 1
    tangent_parts = 1  # each layer's tangent rows: h alone
    # The hidden bias joins the input side's (once for all steps in the two-pass engine); the
    # GRU's cannot, since r multiplies its candidate part.
    fold_hidden_bias = True
    lu = False  # log|det| in closed form: det(W_hh) prod_i deriv_i

    def __init__(self, act: str):
        self.act = act

    def hidden_trajectory(self, x, w_ih, w_hh, b, state):
        params, biased = _fused_args(w_ih, w_hh, b)
        run = torch.rnn_tanh if self.act == "tanh" else torch.rnn_relu
        return run(x, state[0][None], params, biased, 1, 0.0, False, False, True)[0]

    def replay(self, gi, w_hh, b, state, hs):
        h_prev = _before(state[0], hs)
        return (_xwt_all(gi, h_prev, w_hh),), (h_prev,), (hs,)

    def advance(self, gi, w_hh, b, state):
        pre = _plus_xwt(gi, state[0], w_hh)
        return (torch.tanh(pre) if self.act == "tanh" else torch.relu(pre),), (pre,)

    def coefficients(self, saved, state, new_state):
        (pre,) = saved
        return (_dtanh(pre) if self.act == "tanh" else (pre > 0).to(pre.dtype),)

    def logdet(self, coefficients, w_hh, N, constant):
        (deriv,) = coefficients
        return _add_constant(_log_abs(deriv, torch.finfo(deriv.dtype).tiny), constant)

    @staticmethod
    def for_push(coefficients):
        return coefficients

    def push(self, coefficients, qt, dq_below, w_ih, w_hh, out, N, jac_t=None):
        (deriv,) = coefficients
        torch.mul(_tangent_pre(qt, w_hh, dq_below, w_ih), deriv, out=out)
        return out


class _GRUCell:
    state_parts = 1
    tangent_parts = 1
    fold_hidden_bias = False
    lu = True

    @staticmethod
    def hidden_trajectory(x, w_ih, w_hh, b, state):
        params, biased = _fused_args(w_ih, w_hh, b)
        return torch.gru(x, state[0][None], params, biased, 1, 0.0, False, False, True)[0]

    @staticmethod
    def replay(gi, w_hh, b, state, hs):
        h_prev = _before(state[0], hs)
        return (gi, _xwt_all(None if b is None else b[1], h_prev, w_hh)), (h_prev,), (hs,)

    def advance(self, gi, w_hh, b, state):
        (h,) = state
        N = h.shape[-1]
        gh = _xwt(h, w_hh) if b is None else _plus_xwt(b[1], h, w_hh)
        # Few, wide operations: on small networks each costs its dispatch, not its arithmetic.
        rz = torch.sigmoid(gi[..., :2 * N] + gh[..., :2 * N])
        c = torch.tanh(torch.addcmul(gi[..., 2 * N:], rz[..., :N], gh[..., 2 * N:]))
        return (torch.lerp(c, h, rz[..., N:]),), (gi, gh)

    def coefficients(self, saved, state, new_state):
        # h' = (1 - z) c + z h with c = tanh(a_n + r * ghn): coefficients of each pre-activation.
        gi, gh = saved
        (h,) = state
        N = h.shape[-1]
        r, r_off = _sig_pair(gi[..., :N] + gh[..., :N])
        z, z_off = _sig_pair(gi[..., N:2 * N] + gh[..., N:2 * N])
        ghn = gh[..., 2 * N:]
        pre_n = gi[..., 2 * N:] + r * ghn
        c = torch.tanh(pre_n)
        e = z_off * _dtanh(pre_n)
        return z, e * ghn * r * r_off, (h - c) * z * z_off, e * r, e

    @staticmethod
    def jacobian_t(coefficients, w_hh, N):
        """``(rows, N, N)``: the transposed hidden block of the Jacobian."""
        z, a_r, a_z, a_n, _ = coefficients
        jac_t = _gates_jacobian_t(w_hh, (_rows(a_r), _rows(a_z), _rows(a_n)), N)
        jac_t.diagonal(dim1=-2, dim2=-1).add_(z.reshape(-1, N))
        return jac_t

    def jacobian_t_by_step(self, coefficients, w_hh, N):
        """``(T, rows, N, N)`` from ``(rows, T, N)`` coefficients: step-major, so that each
        step's blocks are contiguous for its batched product and the averaged steps' for one
        LU. One network's rows can be laid out so directly; stacked networks' are formed
        network after network (as :func:`_gates_jacobian_t` reads them) and then transposed."""
        rows, T = coefficients[0].shape[:2]
        if w_hh.dim() == 2:
            by_step = tuple(a.transpose(0, 1) for a in coefficients)
            return self.jacobian_t(by_step, w_hh, N).view(T, rows, N, N)
        return (self.jacobian_t(coefficients, w_hh, N).view(rows, T, N, N).transpose(0, 1)
                .contiguous())

    def logdet(self, coefficients, w_hh, N, constant):
        return _lu_logdet(self.jacobian_t(coefficients, w_hh, N), coefficients[0].shape[:-1],
                          constant)

    for_push = staticmethod(_RNNCell.for_push)

    def push(self, coefficients, qt, dq_below, w_ih, w_hh, out, N, jac_t=None):
        z, a_r, a_z, a_n, e = coefficients
        many = qt.shape[1] * GRU_EXPLICIT_SHARE >= N
        if jac_t is not None or many:
            # Many tangent rows: form each trajectory's Jacobian blocks, (B, N, N) for the hidden
            # and the input side, and push the rows through them with one batched product each,
            # a third of the GEMM work of pushing them through the three gates' weights.
            torch.bmm(qt, self.jacobian_t(coefficients, w_hh, N) if jac_t is None else jac_t,
                      out=out)
            if dq_below is not None and many:
                out.baddbmm_(dq_below, _gates_jacobian_t(w_ih, (a_r, a_z, e), N))
        else:
            dgh = _xwt(qt, w_hh).split_with_sizes((N,) * 3, -1)
            torch.mul(qt, z, out=out)
            out.addcmul_(dgh[0], a_r).addcmul_(dgh[1], a_z).addcmul_(dgh[2], a_n)
        if dq_below is not None and not many:
            # A few rows from the layer below: through the gates' weights, not blocks formed
            # for them alone.
            dgi = _xwt(dq_below, w_ih).split_with_sizes((N,) * 3, -1)
            out.addcmul_(dgi[0], a_r).addcmul_(dgi[1], a_z).addcmul_(dgi[2], e)
        return out


class _LSTMCell:
    """``full``: the ``(h, c)`` state; else the hidden-only map, ``c_{t-1}`` held fixed."""

    state_parts = 2
    fold_hidden_bias = True

    def __init__(self, full: bool):
        self.full = full
        self.tangent_parts = 2 if full else 1  # (h, c), or h alone
        # Subtracting beta times the c' rows from the h' rows of the full map leaves
        # [[diag(a_o) W_o, 0], [dc'/dh, diag(f)]]: det = det(W_o) prod a_o prod f.
        self.lu = not full

    def advance(self, gi, w_hh, b, state):
        h, c = state
        N = h.shape[-1]
        g = _plus_xwt(gi, h, w_hh)
        # One sigmoid over all four gates (the candidate's share is unused): few, wide
        # operations, since on small networks each costs its dispatch, not its arithmetic.
        s = torch.sigmoid(g)
        c_new = torch.addcmul(s[..., N:2 * N] * c, s[..., :N], torch.tanh(g[..., 2 * N:3 * N]))
        return (s[..., 3 * N:] * torch.tanh(c_new), c_new), (g,)

    @staticmethod
    def hidden_trajectory(x, w_ih, w_hh, b, state):
        params, biased = _fused_args(w_ih, w_hh, b)
        return torch.lstm(x, (state[0][None], state[1][None]), params, biased, 1, 0.0, False,
                          False, True)[0]

    @staticmethod
    def replay(gi, w_hh, b, state, hs):
        # PyTorch's fused recurrence returns h alone; c_t = f_t c_{t-1} + i_t g_t again from the
        # gates, a multiply-add per step (its products are the bulk GEMM here).
        h_prev, (h0, c) = _before(state[0], hs), state
        N = h0.shape[-1]
        g = _xwt_all(gi, h_prev, w_hh)
        s = torch.sigmoid(g[..., :2 * N])
        drive = s[..., :N] * torch.tanh(g[..., 2 * N:3 * N])
        cs = torch.empty_like(hs)
        # Each step's views from one unbind apiece: indexing three tensors a step cost more
        # than the multiply-adds on small networks.
        for drive_t, f_t, c_t in zip(drive.unbind(1), s[..., N:].unbind(1), cs.unbind(1)):
            c = torch.addcmul(drive_t, f_t, c, out=c_t)
        return (g,), (h_prev, _before(state[1], cs)), (hs, cs)

    def coefficients(self, saved, state, new_state):
        # c' = f c + i g and h' = o tanh(c').
        (g,) = saved
        c, c_new = state[1], new_state[1]
        N = c.shape[-1]
        # The three gates' sigmoids in two wide calls (the candidate's share goes unused).
        (i, f, _, o), (i_off, f_off, _, o_off) = (s.split_with_sizes((N,) * 4, -1)
                                                  for s in _sig_pair(g))
        gg = torch.tanh(g[..., 2 * N:3 * N])
        tc = torch.tanh(c_new)
        return (f, i * i_off * gg, f * f_off * c, _dtanh(g[..., 2 * N:3 * N]) * i,
                o * o_off * tc, o * _dtanh(c_new))

    def logdet(self, coefficients, w_hh, N, constant):
        f, a_i, a_f, a_g, a_o, beta = coefficients
        if self.full:
            tiny = torch.finfo(f.dtype).tiny
            return _add_constant(_log_abs(a_o, tiny) + _log_abs(f, tiny), constant)
        rows = [_rows(beta * a) for a in (a_i, a_f, a_g)] + [_rows(a_o)]
        return _lu_logdet(_gates_jacobian_t(w_hh, rows, N), f.shape[:-1], constant)

    @staticmethod
    def for_push(coefficients):
        # The four gates' coefficients side by side scale the gates' tangent in one product.
        f, a_i, a_f, a_g, a_o, beta = coefficients
        return torch.cat([a_i, a_f, a_g, a_o], -1), f, beta

    def push(self, coefficients, qt, dq_below, w_ih, w_hh, out, N, jac_t=None):
        # The full map's rows come as their (h, c) parts, in and out.
        gates, f, beta = coefficients
        (q_h, q_c), (dh_new, dc_new) = (qt, out) if self.full else ((qt, None), (out, None))
        dg = _tangent_pre(q_h, w_hh, dq_below, w_ih).mul_(gates)
        # split_with_sizes: one call for the four views (Tensor.split's Python wrapper costs more
        # than the additions it feeds on small networks).
        dg_i, dg_f, dg_g, dg_o = dg.split_with_sizes((N,) * 4, -1)
        if self.full:  # built in its output, in place: no temporary (a fifth of a small step)
            drive = torch.add(dg_i, dg_f, out=dc_new).add_(dg_g).addcmul_(q_c, f)
        else:
            drive = torch.add(dg_i, dg_f).add_(dg_g)
        return torch.addcmul(dg_o, drive, beta, out=dh_new)


def _logdet_constants(cell: str, weights, N: int, rows_per_network: int) -> list:
    """Per layer the weight determinant the step's ``log|det J_t|`` needs (``log|det W_hh|`` for
    the RNN, ``log|det W_ho|`` for the full LSTM state), computed once in float64: a float, or
    with stacked weights one value per row (each network's for its rows)."""
    if cell.startswith("rnn_"):
        blocks = [w_hh for _, w_hh, _ in weights]
    elif cell == "lstm_full":
        blocks = [w_hh[..., 3 * N:, :] for _, w_hh, _ in weights]
    else:
        return [0.0] * len(weights)
    if blocks[0].dim() == 2:
        # torch's LU, not numpy's: numpy's LAPACK threads wait on torch's just used (a 256-row
        # block took 15 ms after a GEMM, against 1.4 ms by torch).
        return [float(_logabsdet(w[None].double())[0]) for w in blocks]
    return [_logabsdet(w.double()).to(w.dtype).repeat_interleave(rows_per_network)
            for w in blocks]


_CELLS = {
    "rnn_tanh": _RNNCell("tanh"),
    "rnn_relu": _RNNCell("relu"),
    "gru": _GRUCell(),
    "lstm_full": _LSTMCell(True),
    "lstm_hidden": _LSTMCell(False),
}


def _make_step(cell):
    """One whole time step of the stacked layers, for the CUDA-graph path: advances the state,
    pushes the tangent rows ``qt`` ``(B, k, n)`` and, given the ``logdet`` constants, returns
    the step's ``log|det J_t|`` ``(B,)``."""

    def step(weights, state, qt, gi0, N, logdet=None):
        out = torch.empty_like(qt)
        parts = cell.state_parts
        q_parts, out_parts = qt.split(N, -1), out.split(N, -1)
        new_state, h_below, dq_below, total = [], None, None, None
        for layer, (w_ih, w_hh, b) in enumerate(weights):
            old = state[layer * parts:(layer + 1) * parts]
            new, saved = cell.advance(_layer_input(cell, weights, layer, gi0, h_below), w_hh, b,
                                      old)
            coefficients = cell.coefficients(saved, old, new)
            dq_below = cell.push(tuple(a[:, None] for a in cell.for_push(coefficients)),
                                 _layer_tangent(cell, q_parts, layer), dq_below, w_ih, w_hh,
                                 _layer_tangent(cell, out_parts, layer), N)
            if logdet is not None:
                part = cell.logdet(coefficients, w_hh, N, logdet[layer])
                total = part if total is None else total + part
            new_state += new
            h_below = new[0]
        return new_state, out, total

    return step


def _layer_tangent(cell, parts, layer: int):
    """A layer's tangent rows among the ``(B, k, N)`` ``parts`` of all layers' (each layer's
    ``cell.tangent_parts`` in turn): one part, or the LSTM's ``(h, c)`` pair."""
    count = cell.tangent_parts
    return parts[layer] if count == 1 else tuple(parts[layer * count:(layer + 1) * count])


def _layer_bias(cell, b) -> Tensor | None:
    """A layer's input-side bias: ``b_ih``, plus ``b_hh`` where the cell folds it in (one
    vector, so the pre-activations of all steps take a single addition)."""
    if b is None:
        return None
    return b[0] + b[1] if cell.fold_hidden_bias else b[0]


def _layer_input(cell, weights, layer: int, gi0: Tensor, below: Tensor) -> Tensor:
    """Input-side pre-activations of ``layer`` (one step or a whole sequence of ``below``),
    with the hidden bias where the cell folds it in (layer 0's ``gi0`` holds its biases)."""
    if layer == 0:
        return gi0
    w_ih, _, b = weights[layer]
    gi = _xwt(below, w_ih)
    bias = _layer_bias(cell, b)
    return gi if bias is None else _plus(gi, bias)


#: The two-pass engine computes LU log-determinants (GRU, hidden-only LSTM) for as many steps at
#: once as fit in this many bytes of Jacobian blocks (larger batches of LUs ran slower on a
#: 2-core CPU: 336 LUs of 256 x 256 took 150 ms in batches of 8 or 32, 196 ms in one) ...
LOGDET_CHUNK_BYTES = 1 << 23
#: ... and keeps a GRU's blocks of all steps for the tangent loop when they fit in this many.
JACOBIAN_BYTES = 1 << 27


def _run_two_pass(cell, weights, state: list[Tensor], qt: Tensor, gi0: Tensor, N: int,
                  acc: "_Accumulator", logdet=None, x: Tensor | None = None) -> None:
    """The eager time loop of :func:`lyapunov_spectrum`, in two passes (see above) over windows
    of steps: within each, the state recursion and every step's coefficients and
    ``log|det J_t|`` first, then the tangent loop with its QRs. The windows bound the memory the
    first pass keeps to :data:`TWO_PASS_WINDOW_BYTES` however long the sequence. A trajectory
    that diverges keeps its NaNs to itself (every batched operation here treats rows
    independently) and is marked at the end.

    Given the inputs ``x`` (one network's weights, on the CPU), the first pass runs each layer's
    state recursion as PyTorch's fused RNN, GRU or LSTM does, in C++, and recovers the
    pre-activations of all steps from the hidden states with one GEMM."""
    acc.defer = True
    rows = qt.shape[0]
    per_step = rows * len(weights) * 16 * N * qt.element_size()
    window = max(1, TWO_PASS_WINDOW_BYTES // per_step)
    finite = torch.ones(rows, dtype=torch.bool, device=qt.device)
    state = list(state)
    # The tangent rows as contiguous (B, k, N) parts (each layer's h, and c for the LSTM), in
    # two sets of buffers that the steps write in turn (never the one they read): element-wise
    # operations on column slices of one (B, k, n) tensor ran at half the speed, and nothing is
    # allocated per step. The QRs see the parts joined.
    first = [p.contiguous() for p in qt.split(N, -1)]
    basis = (first, (first, [torch.empty_like(p) for p in first]))
    for t0 in range(0, acc.T, window):
        state, basis = _two_pass_window(cell, weights, state, basis, gi0[:, t0:t0 + window],
                                        t0, N, acc, logdet, finite,
                                        None if x is None else x[:, t0:t0 + window])
    for part in basis[0]:
        finite &= torch.isfinite(part.flatten(1).sum(-1))
    acc.finish(finite)


#: What the first pass of the two-pass engine keeps (states, pre-activations, coefficients,
#: about 16 values per unit, layer, row and step) is bounded to about this many bytes by running
#: long sequences in windows of steps.
TWO_PASS_WINDOW_BYTES = 1 << 28


def _two_pass_window(cell, weights, state, basis, gi0, t_start, N, acc, logdet, finite,
                     x=None):
    """Steps ``t_start + 1 .. t_start + len`` of :func:`_run_two_pass`; returns the state and
    the ``basis`` (its tangent parts, and the two sets of buffers the steps write in turn) after
    them, and clears ``finite`` for rows whose states left the finite numbers."""
    T, warmup = gi0.shape[1], max(acc.warmup - t_start, 0)
    parts = cell.state_parts
    q_parts, buffers = basis
    rows, k = q_parts[0].shape[:2]
    dtype_size = q_parts[0].element_size()
    device = q_parts[0].device
    # The GRU's Jacobian blocks are formed for all steps at once when its log-determinant needs
    # every step's anyway (sum_every 1; then the tangent rows go through them too: a third of
    # the gates' GEMM work), or when the rows are many (GRU_EXPLICIT_SHARE), as far as they fit
    # in memory. Under sum_every > 1 only the LU steps' blocks are formed, for the LU alone.
    gru_blocks = isinstance(cell, _GRUCell) and (
        (logdet is not None and acc.sum_every == 1) or k * GRU_EXPLICIT_SHARE >= N)
    coefficients, jacobians, new_state = [], [], []
    h_below, total = None, None
    if logdet is not None:
        # Only the steps the sum averages get a determinant (an LU for the GRU): not the
        # warm-up's, and under sum_every one in so many; the same steps in every layer.
        taken = [i for i in range(warmup, T) if acc.takes_logdet(t_start + i + 1)]
        acc.logdet_steps += len(taken)
    for layer, (w_ih, w_hh, b) in enumerate(weights):
        # The layer below's whole trajectory drives this one: one GEMM for all steps.
        gi = _layer_input(cell, weights, layer, gi0, h_below)
        old = tuple(state[layer * parts:(layer + 1) * parts])
        if x is not None:
            hs = cell.hidden_trajectory(x if layer == 0 else h_below, w_ih, w_hh, b, old)
            saved, before, after = cell.replay(gi, w_hh, b, old, hs)
        else:
            trajectory, saved_steps = [old], []
            for t in range(T):
                new, saved = cell.advance(gi[:, t], w_hh, b, trajectory[-1])
                trajectory.append(new)
                saved_steps.append(saved)
            saved = tuple(torch.stack(s, 1) for s in zip(*saved_steps))
            before = tuple(torch.stack(s, 1) for s in zip(*trajectory[:-1]))
            after = tuple(torch.stack(s, 1) for s in zip(*trajectory[1:]))
        new_state += tuple(a[:, -1] for a in after)
        for s in after:
            finite &= torch.isfinite(s.flatten(1).sum(-1))
        layer_coefficients = cell.coefficients(saved, before, after)
        # Step-major for the tangent loop, each step's tensors ready to broadcast over its rows.
        coefficients.append(list(zip(*(a.transpose(0, 1).unsqueeze(2).contiguous().unbind(0)
                                       for a in cell.for_push(layer_coefficients)))))
        h_below = after[0]
        block_bytes = rows * N * N * dtype_size
        jac_all = None
        if gru_blocks and T * block_bytes <= JACOBIAN_BYTES:
            jac_all = cell.jacobian_t_by_step(layer_coefficients, w_hh, N)
        jacobians.append(jac_all)
        if logdet is None:
            continue
        chunk = max(1, LOGDET_CHUNK_BYTES // block_bytes) if cell.lu else T
        for c0 in range(0, len(taken), chunk):
            steps = taken[c0:c0 + chunk]
            index = slice(steps[0], steps[-1] + 1) if len(steps) == steps[-1] - steps[0] + 1 \
                else torch.tensor(steps, device=device)
            if jac_all is None:
                window = tuple(a[:, index] for a in layer_coefficients)
                part = cell.logdet(window, w_hh, N, logdet[layer]).to(torch.float64).sum(-1)
            else:  # the blocks are step-major: sum over the steps, then a constant per step
                blocks = jac_all[index]
                part = _logabsdet(blocks.reshape(-1, N, N)).view(blocks.shape[0], rows).sum(0)
                part = _add_constant(part, logdet[layer] * blocks.shape[0])
            total = part if total is None else total + part
    if total is not None:
        acc.logdet += total

    for t in range(1, T + 1):
        dq_below = None
        # The buffers not read this step (after a QR, its views are read: either set).
        target = buffers[1] if q_parts is buffers[0] else buffers[0]
        for layer, (w_ih, w_hh, _) in enumerate(weights):
            jac_t = None if jacobians[layer] is None else jacobians[layer][t - 1]
            dq_below = cell.push(coefficients[layer][t - 1], _layer_tangent(cell, q_parts, layer),
                                 dq_below, w_ih, w_hh, _layer_tangent(cell, target, layer), N,
                                 jac_t=jac_t)
        q_parts = target
        if acc.needs_qr(t_start + t):
            q = acc.qr(t_start + t, torch.cat(q_parts, -1) if len(q_parts) > 1 else q_parts[0])
            # The QR's basis as it is (views, read once by the next step into its buffers).
            q_parts = list(q.split(N, -1))
    return new_state, (q_parts, buffers)


def rnn_step(rnn: nn.Module, *, lstm_state: str = "full") -> Callable[[Tensor, Tensor], Tensor]:
    """The module's one-step state map as a pure function ``step(s, x) -> s_next``.

    ``s`` is the flat state ``(B, n)`` that :func:`lyapunov_spectrum` uses (layers concatenated,
    ``(h, c)`` per layer for the full LSTM state) and ``x`` is ``(B, input_size)``. The step calls
    the module's own forward, so passing it to :func:`lyapunov_spectrum_map` gives an independent
    autograd reference for the analytic engine (full LSTM state only).
    """
    cell, N, L, per_layer = _module_info(rnn, lstm_state)
    if cell == "lstm" and lstm_state == "hidden":
        raise ValueError("rnn_step supports the full LSTM state only; use lstm_state='full'.")

    def step(s: Tensor, x: Tensor) -> Tensor:
        B = s.shape[0]
        layers = s.reshape(B, L, per_layer).transpose(0, 1)
        if cell == "lstm":
            hc = (layers[..., :N].contiguous(), layers[..., N:].contiguous())
        else:
            hc = layers.contiguous()
        xin = x[:, None] if rnn.batch_first else x[None]
        # cuDNN's RNN has no backward in eval mode; the native kernels do, and compute the same map.
        with torch.backends.cudnn.flags(enabled=False):
            _, out = rnn(xin, hc)
        if cell == "lstm":
            out = torch.cat(out, -1)
        return out.transpose(0, 1).reshape(B, L * per_layer)

    return step


# --------------------------------------------------------------------------------------------
# Any differentiable map: torch.func.


def _repeat(t: Tensor | None, k: int) -> Tensor | None:
    """``(B, ...) -> (B * k, ...)``, each row repeated ``k`` times in place."""
    if t is None:
        return None
    return t[:, None].expand(t.shape[0], k, *t.shape[1:]).reshape(t.shape[0] * k, *t.shape[1:])


def _jq(step, h, x, qt, logdet: bool = False):
    """``h_next`` and the rows of ``(J @ Q).T``, with the Jacobians from one ``torch.func.vjp``.

    The map runs once on ``B * n`` copies of the states; because trajectories do not interact, the
    cotangent ``e_i`` on copy ``i`` of trajectory ``b`` gives row ``i`` of ``J_b``, so a single
    backward pass yields every Jacobian, with no vmap and no loop. Reverse mode because every
    operator has a backward rule, and because forward mode (``jvp`` or dual tensors) runs many
    operators, even a multiplication by a Python scalar, through Python decompositions: several
    times slower per step for the small maps this path usually serves.
    """
    B, k, n = qt.shape
    xr = _repeat(x, n)
    out, vjp_fn = torch.func.vjp((lambda s: step(s, xr)) if x is not None else step, _repeat(h, n))
    eye = torch.eye(n, dtype=h.dtype, device=h.device).expand(B, n, n).reshape(B * n, n)
    jac = vjp_fn(eye)[0].view(B, n, n)
    return out.view(B, n, n)[:, 0], qt @ jac.transpose(-1, -2), _logabsdet(jac) if logdet else None


def lyapunov_spectrum_map(
    step: Callable[..., Tensor],
    h0: Tensor,
    inputs: Tensor | None = None,
    *,
    steps: int | None = None,
    k: int | None = None,
    warmup: int = 0,
    reorth_every: int | str = 1,
    dtype: torch.dtype | None = None,
    exponent_sum: bool = False,
    sum_every: int = 1,
) -> LyapunovSpectrum:
    """Lyapunov spectrum of any differentiable map on batched states.

    Args:
        step: ``step(h, x) -> h_next`` on ``h`` of shape ``(B, n)`` and ``x`` of shape
            ``(B, ...)``, or ``step(h) -> h_next`` when ``inputs`` is None. Trajectories must not
            interact (row ``b`` of the output depends on row ``b`` of the input only), and the
            function must work under ``torch.func`` transforms (pure torch operations). It is
            called on ``B * n`` rows at once (each state repeated once per state dimension), so
            it must not assume a batch size.
        h0: ``(B, n)`` initial states, one per trajectory.
        inputs: ``(B, T, ...)`` drive, batch first; ``None`` for an autonomous map.
        steps: number of steps ``T`` for an autonomous map (ignored when ``inputs`` is given,
            where ``T`` is ``inputs.shape[1]``).
        k, warmup, reorth_every: as in :func:`lyapunov_spectrum`.
        dtype: computation dtype; ``None`` keeps ``h0``'s (floating) dtype.
        exponent_sum: with ``k < n``, also the sum of all exponents, from ``log|det J_t|`` of
            the Jacobians this path forms anyway (an LU per step).
        sum_every: the sum's LU on every ``sum_every``-th averaged step only, as in
            :func:`lyapunov_spectrum`.

    Returns:
        A :class:`LyapunovSpectrum`.

    Raises:
        ValueError: ``step`` not callable, wrong ``h0`` or ``inputs`` shape, NaN or infinite
            values in ``h0`` or ``inputs``, ``k`` larger than the state, ``warmup >= T``.

    Example:
        >>> import torch, lepredict
        >>> def henon(h):
        ...     x, y = h[:, 0], h[:, 1]
        ...     return torch.stack([1 - 1.4 * x**2 + y, 0.3 * x], -1)
        >>> spec = lepredict.lyapunov_spectrum_map(henon, torch.full((4, 2), 0.1, dtype=torch.float64),
        ...                                        steps=5000, warmup=100)
        >>> [round(v, 1) for v in spec.mean.tolist()]
        [0.4, -1.6]
    """
    if not callable(step):
        raise ValueError(f"step must be callable, got {type(step).__name__}.")
    if not isinstance(h0, Tensor) or h0.dim() != 2:
        raise ValueError(
            f"h0 must be a (B, n) tensor of initial states, got {getattr(h0, 'shape', type(h0).__name__)}."
        )
    dtype = dtype or (h0.dtype if h0.is_floating_point() else torch.get_default_dtype())
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype=}.")
    if h0.is_meta or (isinstance(inputs, Tensor) and inputs.is_meta):
        raise ValueError(_META)
    B, n = h0.shape
    device = h0.device
    _check_finite("h0", h0)
    if inputs is None:
        if steps is None:
            raise ValueError("An autonomous map needs steps=T; or pass inputs of shape (B, T, ...).")
        T = int(steps)
        xs = None
    else:
        if not isinstance(inputs, Tensor) or inputs.dim() < 2 or inputs.shape[0] != B:
            raise ValueError(
                f"inputs must be a (B, T, ...) tensor with B={B} matching h0, got "
                f"{getattr(inputs, 'shape', type(inputs).__name__)}."
            )
        T = inputs.shape[1]
        _check_finite("inputs", inputs)
        xs = inputs.detach().to(device=device, dtype=dtype) if inputs.is_floating_point() else inputs
    k = _check_common(k, n, warmup, T, reorth_every, sum_every)

    acc = _Accumulator(B, k, n, T, warmup, reorth_every, dtype, device)
    acc.sum_every = sum_every
    h = h0.detach().to(dtype)
    qt = acc.basis0.clone()
    logdet = exponent_sum and k < n
    with torch.no_grad():
        for t in range(1, T + 1):
            h, qt, step_logdet = _jq(step, h, xs[:, t - 1] if xs is not None else None, qt,
                                     logdet and acc.takes_logdet(t))
            if step_logdet is not None:
                acc.accumulate_logdet(t, step_logdet)
            if acc.needs_qr(t):
                qt = acc.qr(t, qt)
            (h,), qt = acc.check(t, [h], qt)
    return dataclasses.replace(acc.result(dtype, n, logdet), state_size=n)
