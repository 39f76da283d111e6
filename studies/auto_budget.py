"""How far ``reorth_every="auto"`` could stretch its QRs in float32, and how accurate float32
spectra are at all, on 96 networks: RNN (tanh), GRU and LSTM of 48 and 128 units, 1 and 2
layers, weights scaled by 0.5 to 3 from PyTorch's initialisation, 1 or 16 inputs; 4 trajectories
of 200 steps (warm-up 20) each.

Part 1, per network: the float32 QR-every-step spectrum against float64's (``f32 vs f64``), and
for condition budgets of 4 (the shipped :data:`lepredict.lyapunov.AUTO_CONDITION_BUDGET`), 6, 8
and 10 nats the ``"auto"`` schedule's largest error against float32 QR every step (the scheme's
own error, on the same trajectories) and against float64, with the number of QRs it took (of
200). Errors are the largest over trajectories and over the exponents above -20.

Part 2: where in the LSTM's spectrum float32 loses its digits (exponents grouped by their
float64 value).

Run: ``python studies/auto_budget.py`` (about 6 minutes on 2 CPU cores); the output is in
``studies/auto_budget.log``.
"""

import itertools

import torch
from torch import nn

import lepredict
import lepredict.lyapunov as engine

ARCHS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
BUDGETS = [4.0, 6.0, 8.0, 10.0]


def network(arch, hidden, layers, scale, inputs):
    torch.manual_seed(1)
    m = ARCHS[arch](inputs, hidden, num_layers=layers, batch_first=True)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def auto_with_budget(m, x, budget):
    """The "auto" spectrum under ``budget`` and how many QRs it took."""
    saved, qr = dict(engine.AUTO_CONDITION_BUDGET), engine._Accumulator.qr
    calls = [0]

    def counted(self, t, qt):
        calls[0] += 1
        return qr(self, t, qt)

    engine.AUTO_CONDITION_BUDGET[torch.float32] = budget
    engine._Accumulator.qr = counted
    try:
        spec = lepredict.lyapunov_spectrum(m, x, warmup=20, reorth_every="auto")
    finally:
        engine.AUTO_CONDITION_BUDGET.update(saved)
        engine._Accumulator.qr = qr
    return spec.exponents.double(), calls[0]


def part1():
    print("arch N L scale inputs | f32 vs f64 | top, lowest kept | "
          "budget: error vs f32 every step, error vs f64, QRs", flush=True)
    for arch, N, layers, scale, inputs in itertools.product(
            ARCHS, [48, 128], [1, 2], [0.5, 1.0, 2.0, 3.0], [1, 16]):
        m = network(arch, N, layers, scale, inputs)
        x = torch.randn(4, 200, inputs)
        f64 = lepredict.lyapunov_spectrum(m, x, warmup=20, dtype=torch.float64).exponents
        every = lepredict.lyapunov_spectrum(m, x, warmup=20).exponents.double()
        kept = every > -20
        cells = []
        for budget in BUDGETS:
            auto, qrs = auto_with_budget(m, x, budget)
            cells.append(f"{budget:g}: {(auto - every)[kept].abs().max():.1e} "
                         f"{(auto - f64)[kept].abs().max():.1e} {qrs}")
        print(f"{arch} {N} {layers} {scale} {inputs} | {(every - f64)[kept].abs().max():.1e} | "
              f"{every.mean(0)[0]:.2f}, {every[kept].min():.1f} | " + " | ".join(cells),
              flush=True)


def part2():
    print("\nLSTM, float32 QR every step against float64: largest error per band of exponents")
    for N, layers in [(48, 1), (128, 1), (48, 2), (128, 2)]:
        m = network("lstm", N, layers, 1.0, 16)
        x = torch.randn(4, 200, 16)
        f64 = lepredict.lyapunov_spectrum(m, x, warmup=20, dtype=torch.float64).exponents
        f32 = lepredict.lyapunov_spectrum(m, x, warmup=20).exponents.double()
        error, mean = (f32 - f64).abs().amax(0), f64.mean(0)
        bands = []
        for low in (-2, -4, -6, -8, -20):
            inside = mean > low
            bands.append(f"above {low}: {int(inside.sum())} of {len(mean)}, "
                         f"{error[inside].max():.1e}")
        print(f"lstm {N} L={layers} | " + " | ".join(bands), flush=True)


if __name__ == "__main__":
    part1()
    part2()
