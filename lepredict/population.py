"""Population training: several runs of one shape trained together as one batched computation.

A 32-unit GRU leaves a CPU core (let alone a GPU) nearly idle: each of its operations costs more
in dispatch than in arithmetic. :func:`train_population` trains ``K`` configurations that share
an architecture, size, depth, optimizer and batch size as one network with stacked parameters:
one batched matrix product per gate and time step serves every member. Each member keeps its
own initialisation, seed, learning rate, clipping, weight decay, initialisation scale and data
order, and its record is what :func:`~lepredict.train_run` gives for its configuration alone
(to float32 rounding: the batched products round differently from ``nn.GRU``'s own kernels).
Members leave independently: one that diverges, or that ``on_epoch`` stops (a pruned trial),
is taken out of the stacks and the others carry on untouched. The spectra of all members at an
epoch are measured in one call of :func:`~lepredict.lyapunov.lyapunov_spectra`.

Configurations of different shapes cannot share stacks: :func:`group_by_shape` splits a list of
them into populations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

import torch
from optuna.exceptions import TrialPruned
from torch import Tensor

from lepredict.lyapunov import lyapunov_spectra
from lepredict.records import MEASURED_EXPONENTS, RunRecord, spectrum_of
from lepredict.tasks import Task
from lepredict.train import (PROBE_SIZE, RunConfig, SeqModel, checked_device, checked_schedule,
                             checked_task, diverged_loss, keep_freed_memory, measured_options,
                             weight_stats_of)

__all__ = ["SHAPE_FIELDS", "group_by_shape", "shape_of", "train_population"]

#: The :class:`~lepredict.RunConfig` fields members of one population share: they fix the
#: shapes of the stacked parameters and of the optimizer state, and the number of steps per
#: epoch. The other fields (``init``, ``init_scale``, ``lr``, ``clip``, ``weight_decay``,
#: ``seed``) may differ.
SHAPE_FIELDS = ("arch", "hidden", "layers", "optimizer", "batch_size")

_ADAM = (0.9, 0.999, 1e-8)  # torch.optim.Adam's defaults, which train_run uses
_RMSPROP = (0.99, 1e-8)  # torch.optim.RMSprop's alpha and eps


def shape_of(config: RunConfig | dict) -> tuple:
    """The values of :data:`SHAPE_FIELDS` of ``config``: equal for members of one population."""
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    return tuple(getattr(config, name) for name in SHAPE_FIELDS)


def group_by_shape(configs: Iterable[RunConfig | dict]) -> list[list[int]]:
    """Indices of ``configs`` grouped by :func:`shape_of`, groups in order of first appearance.

    Example:
        >>> from lepredict.population import group_by_shape
        >>> group_by_shape([{"arch": "gru", "lr": 1e-2}, {"arch": "lstm"}, {"arch": "gru"}])
        [[0, 2], [1]]
    """
    groups: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(shape_of(config), []).append(i)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# The stacked network: SeqModel's forward for K members at once, sequences laid out (K, T, B, .)
# so that each time step is a (K, B, .) slice of contiguous (B, .) blocks, and the outputs of a
# layer are the next layer's inputs as they lie.


class _GRURecurrence(torch.autograd.Function):
    """A GRU layer of K members over T steps, ``(K, T, B, N)`` hidden states from the input
    projections ``gi`` ``(K, T, B, 3N)`` (input bias included), with a hand-written backward
    through time. The hidden bias ``b_hh`` goes inside the reset gate, which takes the hidden
    product alone: so the input projections are computed apart, unlike :class:`_Recurrence`'s.

    Autograd through a Python loop of cell operations spends much of its time on the
    zero-filled full-size gradients of every gate slice; here each step of the backward pass
    writes each gate's gradient into its slice with PyTorch's fused ``tanh_backward`` and
    ``sigmoid_backward`` kernels, and the recurrent weight's gradient is one batched product
    over all steps. The equations are PyTorch's GRU cell's; only the order of roundings differs.
    """

    @staticmethod
    def forward(ctx, gi: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        K, T, B, G = gi.shape
        N = w_hh.shape[-1]
        wt = w_hh.mT
        hs = gi.new_empty(K, T, B, N)
        h = gi.new_zeros(K, B, N)
        # r, z, n; n = tanh(gi_n + r * (W_hn h + b_hn)), h' = (h - n) z + n
        act, b = gi.new_empty(K, T, B, G), b_hh[:, None]
        ghn = gi.new_empty(K, T, B, N)
        for t in range(T):
            gh, a, g = torch.baddbmm(b, h, wt), act[:, t], gi[:, t]
            torch.sigmoid(gh[..., :2 * N].add_(g[..., :2 * N]), out=a[..., :2 * N])
            ghn[:, t] = gh[..., 2 * N:]
            n = _tanh(torch.addcmul(g[..., 2 * N:], a[..., :N], gh[..., 2 * N:]),
                      out=a[..., 2 * N:])
            h = torch.addcmul(n, h - n, a[..., N:2 * N], out=hs[:, t])
        ctx.save_for_backward(w_hh, hs, act, ghn)
        return hs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        w_hh, hs, act, ghn = ctx.saved_tensors
        K, T, B, N = hs.shape
        G = w_hh.shape[-2]
        # Step by step, on (K, B, .) slices: factors precomputed for all steps at once are
        # tensors of many megabytes at K = 32, and streaming them from memory cost more than
        # the few extra kernels per step.
        di_all = hs.new_empty(K, T, B, G)  # gradient of the pre-activations, input side
        dg_all = torch.empty_like(di_all)  # hidden side
        dh_next = hs.new_zeros(K, B, N)
        zeros = hs.new_zeros(K, B, N)
        # h' = (h - n) z + n, n = tanh(a_n + r ghn), r and z sigmoids
        for t in reversed(range(T)):
            a, di, dg = act[:, t], di_all[:, t], dg_all[:, t]
            r, z, n = a[..., :N], a[..., N:2 * N], a[..., 2 * N:]
            hprev = hs[:, t - 1] if t else zeros
            dh = dout[:, t] + dh_next
            dn = _TANH_BACKWARD(torch.addcmul(dh, dh, z, value=-1), n,
                                grad_input=di[..., 2 * N:])
            torch.mul(dn, r, out=dg[..., 2 * N:])
            _SIGMOID_BACKWARD(dh * (hprev - n), z, grad_input=dg[..., N:2 * N])
            _SIGMOID_BACKWARD(dn * ghn[:, t], r, grad_input=dg[..., :N])
            di[..., :2 * N] = dg[..., :2 * N]
            dh_next = torch.baddbmm(dh * z, dg, w_hh)
        # dW_hh = sum over steps of dgh_t^T h_{t-1}; h_{-1} = 0 drops the first step.
        d_w = dg_all[:, 1:].reshape(K, (T - 1) * B, G).mT @ hs[:, :-1].reshape(K, (T - 1) * B, N)
        return di_all, d_w, dg_all.sum((1, 2))


class _Recurrence(torch.autograd.Function):
    """An RNN or LSTM layer of K members over T steps with its input projection inside:
    ``(K, T, B, N)`` hidden states from the inputs ``x`` ``(K, T, B, I)``, each step one batched
    product of ``[x_t, h_{t-1}]`` with ``[W_ih, W_hh]`` (the bias ``b`` ``(K, G)``, input and
    hidden summed, added by it). The input projections of all steps at once were a tensor of
    megabytes written and read back, and the input weight's gradient a product with an output
    of a few columns, slow in any BLAS; here it is a slice of the one weight-gradient product.
    The backward through time is hand-written, as :class:`_GRURecurrence`'s (see there why);
    the equations are PyTorch's cells', only the order of roundings differs."""

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor, arch: str) -> Tensor:
        K, T, B, I = x.shape
        G, N = w_hh.shape[-2:]
        wt = torch.cat([w_ih, w_hh], -1).mT  # (K, I + N, G)
        # Step t's operand [x_t, h_{t-1}] is xh[:, t]; each new h is written into the next
        # step's slab, so the hidden states are a view of xh.
        xh = x.new_empty(K, T + 1, B, I + N)
        xh[:, :T, :, :I] = x
        xh[:, 0, :, I:] = 0
        hs = xh[:, 1:, :, I:]
        bias = b[:, None]
        if arch == "rnn":
            for t in range(T):
                _tanh(torch.baddbmm(bias, xh[:, t], wt), out=hs[:, t])
            saved = ()
        else:
            act = x.new_empty(K, T, B, G)  # i, f, g, o
            cs, tcs = x.new_empty(K, T, B, N), x.new_empty(K, T, B, N)
            c = x.new_zeros(K, B, N)
            for t in range(T):
                pre, a = torch.baddbmm(bias, xh[:, t], wt), act[:, t]
                _lstm_gates(pre, N, out=a)
                c = torch.mul(a[..., N:2 * N], c, out=cs[:, t]).addcmul_(a[..., :N],
                                                                          a[..., 2 * N:3 * N])
                torch.mul(a[..., 3 * N:], _tanh(c, out=tcs[:, t]), out=hs[:, t])
            saved = (act, cs, tcs)
        ctx.arch, ctx.input_size = arch, I
        ctx.save_for_backward(w_ih, w_hh, xh, *saved)
        return hs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        w_ih, w_hh, xh, *saved = ctx.saved_tensors
        I = ctx.input_size
        K, T1, B, _ = xh.shape
        T, (G, N) = T1 - 1, w_hh.shape[-2:]
        hs = xh[:, 1:, :, I:]
        dpre = xh.new_empty(K, T, B, G)
        if ctx.arch == "rnn":
            dh = dout[:, T - 1]
            for t in reversed(range(T)):
                _TANH_BACKWARD(dh, hs[:, t], grad_input=dpre[:, t])
                if t:
                    dh = torch.baddbmm(dout[:, t - 1], dpre[:, t], w_hh)
        else:
            act, cs, tcs = saved
            dc_next = zeros = xh.new_zeros(K, B, N)
            dh = dout[:, T - 1]
            for t in reversed(range(T)):
                a, d = act[:, t], dpre[:, t]
                i, f, g, o = a.split_with_sizes((N,) * 4, -1)
                _SIGMOID_BACKWARD(dh * tcs[:, t], o, grad_input=d[..., 3 * N:])
                dc = torch.ops.aten.tanh_backward(dh * o, tcs[:, t]).add_(dc_next)
                _SIGMOID_BACKWARD(dc * g, i, grad_input=d[..., :N])
                _SIGMOID_BACKWARD(dc * (cs[:, t - 1] if t else zeros), f,
                                  grad_input=d[..., N:2 * N])
                _TANH_BACKWARD(dc * i, g, grad_input=d[..., 2 * N:3 * N])
                if t:  # the next (earlier) step's dh: its own output's gradient plus the carry
                    dc_next = dc.mul_(f)
                    dh = torch.baddbmm(dout[:, t - 1], d, w_hh)
        flat = dpre.view(K, T * B, G)
        # One product for both weights: the gradient of [W_ih, W_hh] is sum_t dpre_t^T xh_t.
        d_w = flat.mT @ xh[:, :T].reshape(K, T * B, -1)
        dx = (flat @ w_ih).view(K, T, B, I) if ctx.needs_input_grad[0] else None
        return dx, d_w[..., :I], d_w[..., I:], dpre.sum((1, 2)), None


def _tanh(x: Tensor, *, out: Tensor) -> Tensor:
    """``tanh(x)`` into ``out`` as ``2 sigmoid(2x) - 1``: three cheap kernels, which together
    cost about half of PyTorch's CPU tanh (to within 2e-7 of it: float32 rounding). GPUs
    have a fast tanh, and each kernel there costs a launch."""
    if out.is_cuda:
        return torch.tanh(x, out=out)
    return torch.sigmoid(torch.mul(x, 2, out=out), out=out).mul_(2).sub_(1)


def _lstm_gates(pre: Tensor, N: int, *, out: Tensor) -> None:
    """The LSTM's gates ``i, f, g, o`` from their pre-activations ``pre`` ``(..., 4N)`` into
    ``out``: sigmoids, and the candidate's tanh. On CPUs that tanh is ``2 sigmoid(2x) - 1``
    inside the one sigmoid of all four (``pre``'s candidate slice is scaled in place), as in
    :func:`_tanh`; on GPUs three kernels, as before."""
    if out.is_cuda:
        torch.sigmoid(pre[..., :2 * N], out=out[..., :2 * N])
        torch.tanh(pre[..., 2 * N:3 * N], out=out[..., 2 * N:3 * N])
        torch.sigmoid(pre[..., 3 * N:], out=out[..., 3 * N:])
        return
    pre[..., 2 * N:3 * N].mul_(2)
    torch.sigmoid(pre, out=out)
    out[..., 2 * N:3 * N].mul_(2).sub_(1)


_TANH_BACKWARD = torch.ops.aten.tanh_backward.grad_input  # grad * (1 - y^2), into grad_input
_SIGMOID_BACKWARD = torch.ops.aten.sigmoid_backward.grad_input  # grad * y (1 - y)


def _forward(params: dict[str, Tensor], arch: str, layers: int, x: Tensor, last: int) -> Tensor:
    """Readout of the last ``last`` steps, ``(K, B, last, output_size)``, of every member.

    ``x`` is ``(K, B, T, d)``, each member its own batch, or ``(B, T, d)``, one batch for all.
    """
    K = params["readout.weight"].shape[0]
    *_, B, T, d = x.shape
    inp = x.transpose(-3, -2)  # (K or 1, T, B, d)
    if inp.dim() == 3:
        inp = inp[None]
    for layer in range(layers):
        w_ih, w_hh = params[f"rnn.weight_ih_l{layer}"], params[f"rnn.weight_hh_l{layer}"]
        b_ih, b_hh = params[f"rnn.bias_ih_l{layer}"], params[f"rnn.bias_hh_l{layer}"]
        if arch == "gru":
            flat = inp.reshape(inp.shape[0], T * B, -1).expand(K, -1, -1)
            gi = torch.baddbmm(b_ih[:, None], flat, w_ih.mT)
            inp = _GRURecurrence.apply(gi.view(K, T, B, -1), w_hh, b_hh)
        else:  # one bias added once, not a second pass over every pre-activation
            inp = _Recurrence.apply(inp.expand(K, -1, -1, -1), w_ih, w_hh, b_ih + b_hh, arch)
    out = torch.baddbmm(params["readout.bias"][:, None],
                        inp[:, T - last:].reshape(K, last * B, inp.shape[-1]),
                        params["readout.weight"].mT)
    return out.view(K, last, B, -1).transpose(1, 2)


class _Population:
    """The live members' stacked parameters, optimizer state and per-member settings."""

    def __init__(self, configs: list[RunConfig], task: Task, device: torch.device):
        self.arch, self.layers = configs[0].arch, configs[0].layers
        self.optimizer = configs[0].optimizer
        self.models = []
        for config in configs:  # as train_run builds its model: same seed, same draws
            torch.manual_seed(config.seed)
            self.models.append(SeqModel(task.input_size, task.output_size, config).to(device))
        names = [name for name, _ in self.models[0].named_parameters()]
        self.params = {name: torch.stack([m.get_parameter(name).detach() for m in self.models])
                       .requires_grad_() for name in names}
        moments = {"adam": ("exp_avg", "exp_avg_sq"), "rmsprop": ("square_avg",), "sgd": ()}
        self.state = {name: {m: torch.zeros_like(p) for m in moments[self.optimizer]}
                      for name, p in self.params.items()}
        self.steps = 0
        self.lrs = [float(c.lr) for c in configs]
        self.max_norms = torch.tensor([c.clip if c.clip > 0 else math.inf for c in configs],
                                      device=device)
        self.decays = torch.tensor([float(c.weight_decay) for c in configs], device=device)
        self.any_decay = any(c.weight_decay != 0 for c in configs)  # no device sync per step
        self._bind()

    def __len__(self) -> int:
        return len(self.models)

    def _bind(self) -> None:
        """Each member's own module shows its rows of the stacks (read by the spectrum and the
        weight statistics); the optimizer updates the stacks in place, so the views stay live."""
        for i, model in enumerate(self.models):
            for name, param in model.named_parameters():
                param.data = self.params[name].detach()[i]

    def keep(self, rows: list[int]) -> None:
        """Keep the members at ``rows`` (positions in the stacks); the others leave."""
        index = torch.tensor(rows, device=self.max_norms.device)
        self.params = {name: p.detach().index_select(0, index).requires_grad_()
                       for name, p in self.params.items()}
        self.state = {name: {m: t.index_select(0, index) for m, t in moments.items()}
                      for name, moments in self.state.items()}
        self.lrs = [self.lrs[r] for r in rows]
        self.max_norms = self.max_norms.index_select(0, index)
        self.decays = self.decays.index_select(0, index)
        self.any_decay = self.any_decay and bool((self.decays != 0).any())
        self.models = [self.models[r] for r in rows]
        self._bind()

    def forward(self, x: Tensor, last: int) -> Tensor:
        return _forward(self.params, self.arch, self.layers, x, last)

    @torch.no_grad()
    def step(self) -> Tensor:
        """Clip each member's gradient by its own global norm, add its weight decay and apply
        its optimizer step, as ``clip_grad_norm_`` and ``torch.optim`` (single-tensor path,
        coupled ``weight_decay``) do; returns the ``(K,)`` norms before clipping."""
        grads = {name: p.grad for name, p in self.params.items()}
        K = len(self)
        per_param = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), dim=1)
                                 for g in grads.values()], 1)
        norms = torch.linalg.vector_norm(per_param, dim=1)
        coef = (self.max_norms / (norms + 1e-6)).clamp(max=1.0)
        self.steps += 1
        if self.optimizer == "adam":
            beta1, beta2, eps = _ADAM
            correction1 = 1 - beta1 ** self.steps
            correction2_sqrt = (1 - beta2 ** self.steps) ** 0.5
            scale = [-lr / correction1 for lr in self.lrs]
        else:
            scale = [-lr for lr in self.lrs]
        scale = torch.tensor(scale, dtype=norms.dtype, device=norms.device)
        for name, p in self.params.items():
            view = (K,) + (1,) * (p.dim() - 1)
            g = grads[name].mul_(coef.view(view))
            if self.any_decay:
                # torch.optim adds weight_decay * w to the gradient only where it is nonzero
                # (0 * inf would put NaN into a member's gradient).
                wd = self.decays.view(view)
                g.add_(torch.where(wd != 0, p * wd, 0.0))
            state = self.state[name]
            if self.optimizer == "sgd":
                p.add_(g * scale.view(view))
            elif self.optimizer == "adam":
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / correction2_sqrt).add_(eps)
                # addcdiv_(a, d, value=v) computes (v * a) / d: the same roundings.
                p.addcdiv_(state["exp_avg"] * scale.view(view), denom)
            else:
                alpha, eps = _RMSPROP
                state["square_avg"].mul_(alpha).addcmul_(g, g, value=1 - alpha)
                p.addcdiv_(g * scale.view(view), state["square_avg"].sqrt().add_(eps))
            p.grad = None
        return norms


#: Validation sequences per batched forward pass of the whole population.
EVAL_ROWS = 64


def _member_losses(task: Task, outputs: Tensor, targets: Tensor, shared: bool) -> Tensor:
    """``task.loss`` of each member, ``(K,)``, as train_run takes it; ``shared``: one set of
    targets for all members (validation). At K = 64 a call of ``task.loss`` per member cost
    a few percent of the training, forward and backward: :meth:`Task.member_losses`."""
    if shared:
        targets = targets.expand(outputs.shape[0], *targets.shape)
    return task.member_losses(outputs, targets)


def _stops(decision: Future) -> bool:
    """A pending ``on_epoch`` answer: whether it stops its member (True, or TrialPruned)."""
    try:
        return bool(decision.result())
    except TrialPruned:
        return True


def train_population(
    configs: Sequence[RunConfig | dict],
    task: Task,
    *,
    epochs: int,
    le_epochs: Iterable[int] = (0, 1, 2, 3),
    device: str | torch.device = "cpu",
    probe_size: int = PROBE_SIZE,
    le_warmup: int | None = None,
    le_k: int | None = MEASURED_EXPONENTS,
    on_epoch: Callable[[int, int, RunRecord], bool | Future | None] | None = None,
) -> list[RunRecord]:
    """Train configurations of one shape together and record each as :func:`train_run` would.

    Args:
        configs: :class:`~lepredict.RunConfig` objects or dicts of their fields, all with the
            same :data:`SHAPE_FIELDS` (split a mixed list with :func:`group_by_shape`). Repeats
            are allowed (two members with one seed train identically).
        task: a :class:`lepredict.tasks.Task`.
        epochs, le_epochs, device, probe_size, le_warmup, le_k: as in :func:`train_run`, the
            same for every member.
        on_epoch: called as ``on_epoch(member, epoch, record)`` for each live member, where
            ``member`` is its index in ``configs``, at the moments :func:`train_run` calls its
            callback (after epoch 0 and after each completed epoch); return True (or raise
            ``optuna.TrialPruned``, as in a loop of :func:`train_run`) to stop that member: it
            leaves with ``status="pruned"`` and its record as it stood. It may
            instead return a :class:`concurrent.futures.Future` of that answer (a decision
            that waits on a database, say): the member trains the next epoch meanwhile, and if
            the answer is True that epoch is dropped and the record is what the callback saw
            (but for ``wall_time``, which counts the dropped epoch at the end). Nothing touches
            the record until the answer is known. Any other exception raised by ``on_epoch``
            or its future stops the whole population.

    Returns:
        One :class:`~lepredict.RunRecord` per configuration, in order. Its ``wall_time`` and
        ``le_time`` are the member's share of the population's: each stretch of time divided
        among the members alive during it.

    Raises:
        ValueError: no configuration, configurations of different shapes, or bad arguments.

    Example:
        >>> from lepredict import tasks
        >>> from lepredict.population import train_population
        >>> task = tasks.get("digits", mode="row")
        >>> configs = [{"arch": "gru", "hidden": 8, "lr": lr, "seed": s}
        ...            for s, lr in enumerate([1e-3, 1e-2, 3e-2, 1e6])]
        >>> stop_at_1 = lambda member, epoch, rec: member == 0 and epoch == 1
        >>> recs = train_population(configs, task, epochs=2, le_epochs=[0, 1], on_epoch=stop_at_1)
        >>> [r.status for r in recs], [len(r.val_loss) for r in recs]
        (['pruned', 'ok', 'ok', 'diverged'], [2, 3, 3, 2])
    """
    if isinstance(configs, (dict, RunConfig)):  # one configuration: iterating a dict reads keys
        raise TypeError("configs must be a list of configurations (RunConfig objects or dicts); "
                        "for one, pass [config], or use lepredict.train_run.")
    configs = [RunConfig.from_dict(c) if isinstance(c, dict) else c for c in configs]
    if not configs:
        raise ValueError("configs is empty; pass at least one configuration.")
    for i, config in enumerate(configs):
        if not isinstance(config, RunConfig):
            raise ValueError(f"configs[{i}] must be a RunConfig or a dict, got "
                             f"{type(config).__name__}.")
        for name in SHAPE_FIELDS:
            if getattr(config, name) != getattr(configs[0], name):
                raise ValueError(
                    f"configs[{i}] has {name}={getattr(config, name)!r} but configs[0] has "
                    f"{name}={getattr(configs[0], name)!r}; a population shares {SHAPE_FIELDS}: "
                    "split the configurations with group_by_shape and train each group.")
    checked_task(task)
    le_epochs = checked_schedule(epochs, le_epochs, probe_size, task)
    device = checked_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    clock = time.perf_counter()
    pop = _Population(configs, task, device)
    x_train, y_train = task.x_train.to(device), task.y_train.to(device)
    x_val, y_val = task.x_val.to(device), task.y_val.to(device)
    probe = x_val[:probe_size]
    warmup = task.seq_len // 8 if le_warmup is None else le_warmup
    last = task.scored_steps or task.seq_len  # only the scored steps need the readout
    gens = [torch.Generator().manual_seed(c.seed) for c in configs]
    recs = [RunRecord(config=c.to_dict(), task={"name": task.name, **task.options},
                      epochs=epochs) for c in configs]
    alive = list(range(len(configs)))  # member of each row of the stacks

    spent = [0.0] * len(configs)
    pending: dict[int, Future] = {}  # member -> its on_epoch decision, not yet known

    def charge() -> None:
        """Share the time since the last charge among the members alive during it (written to
        the records not waiting on a decision: those are not touched meanwhile)."""
        nonlocal clock
        now = time.perf_counter()
        for m in alive:
            spent[m] += (now - clock) / len(alive)
            if m not in pending:
                recs[m].wall_time = spent[m]
        clock = now

    def leave(rows_out: set[int]) -> None:
        nonlocal alive
        if rows_out:
            rows = [r for r in range(len(alive)) if r not in rows_out]
            alive = [alive[r] for r in rows]
            if rows:
                pop.keep(rows)

    @torch.no_grad()
    def evaluate() -> list[float]:
        totals, count = [0.0] * len(alive), 0
        for i in range(0, x_val.shape[0], 512):  # as train_run's _evaluate, chunk by chunk
            xb, yb = x_val[i:i + 512], y_val[i:i + 512]
            # The forward in pieces of a training batch: K members' activations for 512
            # sequences are tens of megabytes, slow to stream; rows do not interact.
            out = torch.cat([pop.forward(xb[j:j + EVAL_ROWS], last)
                             for j in range(0, xb.shape[0], EVAL_ROWS)], 1)
            losses = _member_losses(task, out, yb, shared=True).tolist()
            totals = [t + v * xb.shape[0] for t, v in zip(totals, losses)]
            count += xb.shape[0]
        return [t / count for t in totals]

    def measure(epoch: int) -> set[int]:
        """Validation loss, weights and spectrum after ``epoch``; the rows that diverged."""
        diverged = set()
        stats = weight_stats_of([model.rnn for model in pop.models])
        for row, (m, val) in enumerate(zip(alive, evaluate())):
            recs[m].val_loss.append(val)
            recs[m].weights.append(stats[row])
            if diverged_loss(val, task.chance_loss):
                diverged.add(row)
        measured = [r for r in range(len(alive)) if r not in diverged]
        charge()
        if epoch in le_epochs and measured:
            rnns = [pop.models[r].rnn for r in measured]
            specs = lyapunov_spectra(rnns, probe, warmup=warmup,
                                     **measured_options(rnns[0], probe.shape[1] - warmup, le_k))
            for r, spec in zip(measured, specs):
                recs[alive[r]].spectra[epoch] = spectrum_of(spec, digits=6, floored=True)
            spent = time.perf_counter() - clock
            charge()
            for r in measured:
                recs[alive[r]].le_time += spent / len(measured)
        return diverged

    def call_back(epoch: int, rows: list[int]) -> None:
        if on_epoch is not None:
            for r in rows:
                try:
                    decision = on_epoch(alive[r], epoch, recs[alive[r]])
                except TrialPruned:
                    decision = True
                if isinstance(decision, Future):
                    pending[alive[r]] = decision
                elif decision:
                    recs[alive[r]].status = "pruned"

    def decide(rows: Iterable[int]) -> set[int]:
        """Wait for the pending decisions of ``rows``; the rows stopped (now or before)."""
        stopped = set()
        for r in rows:
            decision = pending.pop(alive[r], None)
            if decision is not None and _stops(decision):
                recs[alive[r]].status = "pruned"
            if recs[alive[r]].status == "pruned":
                stopped.add(r)
        return stopped

    def diverge(rows: set[int]) -> None:
        """``rows`` diverged; one already stopped at the epoch before stays pruned."""
        for r in rows - decide(rows):
            recs[alive[r]].status = "diverged"

    diverged = measure(0)
    call_back(0, list(range(len(alive))))  # train_run calls back at 0 in any case
    diverge(diverged)
    stopped = {r for r in range(len(alive)) if recs[alive[r]].status == "pruned"}
    charge()
    leave(diverged | stopped)
    for epoch in range(1, epochs + 1):
        if not alive:
            break
        # Members whose decision on the last epoch is still pending train on meanwhile: if it
        # stops them, what they did since is dropped before it reaches their record.
        orders = torch.stack([torch.randperm(x_train.shape[0], generator=gens[m])
                              for m in alive]).to(device)
        losses: list[list[float]] = [[] for _ in alive]
        norms: list[list[float]] = [[] for _ in alive]
        batch = configs[0].batch_size
        for i in range(0, orders.shape[1], batch):
            idx = orders[:, i:i + batch]
            loss = _member_losses(task, pop.forward(x_train[idx], last), y_train[idx],
                                  shared=False)
            # Each member's gradient comes from its own loss alone, whatever the others' are.
            loss.sum().backward()
            norm = pop.step().tolist()
            bad = set()
            for r, (v, n) in enumerate(zip(loss.tolist(), norm)):
                if math.isfinite(v):
                    losses[r].append(v)
                    norms[r].append(n)
                else:  # train_run stops before this step: what the step did to it is dropped
                    bad.add(r)
            if bad:
                diverge(bad)
                charge()
                keep = [r for r in range(len(alive)) if r not in bad]
                orders = orders[keep]
                losses = [losses[r] for r in keep]
                norms = [norms[r] for r in keep]
                leave(bad)
                if not alive:
                    break
        if not alive:
            break
        stopped = decide(range(len(alive)))
        if stopped:
            keep = [r for r in range(len(alive)) if r not in stopped]
            losses = [losses[r] for r in keep]
            norms = [norms[r] for r in keep]
            charge()
            leave(stopped)
            if not alive:
                break
        for r, m in enumerate(alive):
            recs[m].train_loss.append(sum(losses[r]) / len(losses[r]))
            recs[m].grad_norm.append(sum(norms[r]) / len(norms[r]))
        charge()
        diverged = measure(epoch)
        diverge(diverged)
        ok = [r for r in range(len(alive)) if r not in diverged]
        for r in ok:
            recs[alive[r]].epochs_completed = epoch
        call_back(epoch, ok)
        stopped = {r for r in ok if recs[alive[r]].status == "pruned"}
        charge()
        leave(diverged | stopped)
    decide(range(len(alive)))
    charge()
    for m, rec in enumerate(recs):
        rec.wall_time = spent[m]
        if rec.status == "ok":
            rec.final_val_loss = rec.val_loss[-1]
            rec.final_normalised_loss = task.normalised_loss(rec.final_val_loss)
    return recs
