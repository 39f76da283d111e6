"""Speed of the Lyapunov engine against two references measured in the same process.

For RNN, GRU and LSTM at N = 64, 128, 256 (B = 32 trajectories, T = 500 steps, full spectrum):

* engine: ``lepredict.lyapunov_spectrum`` on the module.
* per-trajectory: the straightforward implementation, one trajectory at a time, with
  ``torch.autograd.functional.jacobian`` of the module's own one-step map and a QR each step. It is
  linear in B and T, so it is timed on ``--ref-traj`` trajectories x ``--ref-steps`` steps and
  scaled to B x T (the table says so).
* unavoidable: only the work no implementation can skip, on the same shapes: per step one batched
  Jacobian-times-basis product ``(B, n, n) @ (B, n, n)`` and one batched QR of ``(B, n, n)``, in
  the engine's memory layout and by the engine's QR for the device (LAPACK's Householder QR on
  CPUs; on CUDA the Cholesky-QR route, since cuSOLVER's batched QR is far slower there).

* auto: the engine with ``reorth_every="auto"`` (a QR only as often as accuracy requires).
* Householder floor (on a GPU only; on a CPU it is the unavoidable column): the unavoidable work
  with a Householder QR (cuSOLVER) every step instead of the Gram-matrix route, the floor the
  engine's targets are stated against.

Run: ``python benchmarks/bench_lyapunov.py`` (``--quick`` for T = 100, ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

import lepredict
from lepredict.lyapunov import GRAM_QR_DEVICES, _gram_qr, _householder_qr, rnn_step

ARCHS = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_engine(rnn, x, device, reorth_every=1) -> float:
    lepredict.lyapunov_spectrum(rnn, x[:, :5])  # warm the allocator and kernels
    return _timed(lambda: lepredict.lyapunov_spectrum(rnn, x, reorth_every=reorth_every), device)


def time_unavoidable(B: int, n: int, T: int, device, householder: bool = False) -> float:
    """Per step one batched Jacobian-times-basis product and one batched QR, in the engine's
    layout (no copies around the QR) and by the QR the engine uses on ``device`` (Householder's
    everywhere with ``householder=True``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    jac_t = (torch.randn(B, n, n, generator=g) / n**0.5).to(device).mT
    qt0 = torch.eye(n, device=device).expand(B, n, n).contiguous()
    gram = device.type in GRAM_QR_DEVICES and not householder

    def run(steps):
        qt = qt0
        for _ in range(steps):
            a = torch.bmm(qt, jac_t).mT  # J @ Q, read column-major
            if gram:
                q, d, _ = _gram_qr(a)
            else:
                q, d = _householder_qr(a)
            d.log()
            qt = q.mT

    run(2)
    return _timed(lambda: run(T), device)


def time_per_trajectory(rnn, x, n_traj: int, n_steps: int, device) -> float:
    """Seconds for ``n_traj`` trajectories of ``n_steps`` steps, one trajectory at a time."""
    step = rnn_step(rnn)
    n = lepredict.lyapunov.rnn_state_size(rnn)

    def run(steps):
        for b in range(n_traj):
            h = torch.zeros(1, n, device=device)
            q = torch.eye(n, device=device)
            total = torch.zeros(n, device=device)
            xb = x[b:b + 1]
            for t in range(steps):
                xt = xb[:, t]
                jac = torch.autograd.functional.jacobian(lambda s: step(s[None], xt)[0], h[0])
                with torch.no_grad():
                    h = step(h, xt)
                q, r = torch.linalg.qr(jac @ q)
                total += r.diagonal().abs().log()

    run(2)
    return _timed(lambda: run(n_steps), device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="T = 100")
    ap.add_argument("--ref-traj", type=int, default=2)
    ap.add_argument("--ref-steps", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    T = 100 if args.quick else args.steps
    B = args.batch
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; B={B}, T={T}, float32, full spectrum")
    print(f"per-trajectory reference timed on {args.ref_traj} trajectories x {args.ref_steps} steps, scaled to B x T")
    head = (f"{'arch':5} {'N':>4} {'n':>4} | {'engine s':>9} {'per-traj s':>10} {'speed-up':>8} | "
            f"{'unavoid s':>9} {'engine/unavoid':>14} | {'auto s':>7} {'auto/unavoid':>12}")
    gpu = device.type in GRAM_QR_DEVICES
    if gpu:
        head += f" | {'HH floor s':>10} {'engine/HH':>9} {'auto/HH':>7}"
    print(head)
    print("-" * len(head))
    for arch in args.archs:
        for N in args.sizes:
            rnn = ARCHS[arch](1, N, batch_first=True).to(device).eval()
            x = torch.randn(B, T, 1, device=device)
            n = lepredict.lyapunov.rnn_state_size(rnn)
            t_eng = time_engine(rnn, x, device)
            t_ref = time_per_trajectory(rnn, x, args.ref_traj, args.ref_steps, device)
            t_ref *= (B * T) / (args.ref_traj * args.ref_steps)
            t_min = time_unavoidable(B, n, T, device)
            t_auto = time_engine(rnn, x, device, reorth_every="auto")
            row = (f"{arch:5} {N:>4} {n:>4} | {t_eng:>9.2f} {t_ref:>10.1f} {t_ref / t_eng:>7.0f}x | "
                   f"{t_min:>9.2f} {t_eng / t_min:>14.2f} | {t_auto:>7.2f} {t_auto / t_min:>12.2f}")
            if gpu:
                t_hh = time_unavoidable(B, n, T, device, householder=True)
                row += f" | {t_hh:>10.2f} {t_eng / t_hh:>9.2f} {t_auto / t_hh:>7.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
