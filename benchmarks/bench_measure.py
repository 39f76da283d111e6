"""What one spectrum measurement costs, as a share of one training epoch of the same network.

The workload of a user's loop: a probe of 48 steps, and one training epoch of 40
batches of 32 x 48 (Adam, MSE on a linear read-out), for RNN, GRU and LSTM of N = 64 to 512
units and 1 or 2 layers. Columns, each timed in the same process as the epoch it is divided by:

* default: ``lepredict.measure_and_report``'s measurement (the first ``PROBE_SIZE`` (4)
  sequences, the 16 leading exponents and the sum of all, QRs on the ``"auto"`` schedule,
  warm-up T/8: ``lepredict.train.measured_spectrum``; ``--probe 8`` for the probe the shipped
  predictors were fitted on),
  the mean of 5 runs after each of ``--repeats`` timed epochs; "of epoch" is the median of those
  repeats' ratios and "range" their lowest and highest.
* full: the whole spectrum, a QR every step (the default before; timed up to ``--full-up-to``
  state size, since a 2-layer LSTM-512 takes dozens of epochs).

Targets: default <= 15% of an epoch for the 512-unit networks, <= 5% up to 128 units.

Run: ``python benchmarks/bench_measure.py`` (``--sizes 64 128`` for a quick look,
``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lepredict import lyapunov_spectrum
from lepredict.lyapunov import rnn_state_size
from lepredict.train import PROBE_SIZE, measured_spectrum

ARCHS = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}
T, BATCH, BATCHES, INPUT = 48, 32, 40, 16


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat: int = 1, warm: bool = True) -> float:
    if warm:
        fn()  # warm the allocator and kernels
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def training_epoch(rnn, device):
    """One epoch of the workload above as a function of no arguments."""
    head = torch.nn.Linear(rnn.hidden_size, INPUT).to(device)
    opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1e-3)
    x = torch.randn(BATCHES, BATCH, T, INPUT, device=device)

    def epoch():
        rnn.train()
        for b in range(BATCHES):
            out, _ = rnn(x[b])
            loss = torch.nn.functional.mse_loss(head(out), x[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--full-up-to", type=int, default=256,
                    help="largest state size whose full spectrum is timed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--probe", type=int, default=PROBE_SIZE,
                    help="probe sequences (default: measure_and_report's, %(default)s)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="epochs timed per row, each followed by the measurement (5 runs)")
    args = ap.parse_args()
    if args.probe < 1:
        ap.error(f"--probe must be at least 1 (sequences in the probe), got {args.probe}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"device: {name}; torch {torch.__version__}; probe {args.probe} x {T} steps; epoch "
          f"{BATCHES} batches of {BATCH} x {T}, Adam")
    head = (f"{'arch':5} {'N':>4} {'L':>2} {'n':>5} | {'epoch s':>8} | {'default s':>9} "
            f"{'of epoch':>9} {'range':>13} | {'full s':>8} {'of epoch':>9} {'full/default':>12}")
    print(head)
    print("-" * len(head))
    for arch in args.archs:
        for layers in args.layers:
            for N in args.sizes:
                rnn = ARCHS[arch](INPUT, N, num_layers=layers, batch_first=True).to(device)
                n = rnn_state_size(rnn)
                probe = torch.randn(args.probe, T, INPUT, device=device)
                epoch = training_epoch(rnn, device)
                epoch()  # warm
                t_epochs, t_defaults = [], []
                # Epoch and measurement alternate, so a slower spell of the machine falls on
                # both; each repeat's ratio is taken, and their median and range shown.
                for _ in range(args.repeats):
                    t_epochs.append(_timed(epoch, device, warm=False))
                    rnn.eval()
                    with torch.no_grad():
                        t_defaults.append(_timed(
                            lambda: measured_spectrum(rnn, probe, warmup=T // 8), device,
                            repeat=5))
                ratios = sorted(d / e for d, e in zip(t_defaults, t_epochs))
                t_epoch, t_default = statistics.median(t_epochs), statistics.median(t_defaults)
                full = ""
                if n <= args.full_up_to:
                    with torch.no_grad():
                        t_full = _timed(lambda: lyapunov_spectrum(rnn, probe, warmup=T // 8),
                                        device)
                    full = (f"{t_full:>8.3f} {t_full / t_epoch:>8.1%} "
                            f"{t_full / t_default:>11.0f}x")
                spread = f"[{ratios[0]:.1%}-{ratios[-1]:.1%}]"
                print(f"{arch:5} {N:>4} {layers:>2} {n:>5} | {t_epoch:>8.2f} | {t_default:>9.3f} "
                      f"{statistics.median(ratios):>8.1%} {spread:>13} | {full}", flush=True)

if __name__ == "__main__":
    main()
