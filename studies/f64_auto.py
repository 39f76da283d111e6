"""Would float64 tangents, with the fewer QRs the "auto" schedule allows them, beat the float32
engine that takes a QR every step on a CPU? Full spectra, B = 32, T = 100, warm-up 12; the two
alternate 5 times in one process (after one warm run each), and the ratio of each pair is
taken (median and range). Also the error of the exponents above -20 against float64 with a QR
every step.

    python studies/f64_auto.py | tee studies/f64_auto.log
"""
import statistics
import time

import torch

import lepredict

CASES = (("rnn", 64), ("rnn", 128), ("rnn", 256), ("gru", 128), ("lstm", 64))


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=32, T=100, "
          "full spectra")
    for arch, N in CASES:
        module = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[arch]
        rnn = module(16, N, batch_first=True)
        x = torch.randn(32, 100, 16)
        runs = {"f32": lambda: lepredict.lyapunov_spectrum(rnn, x, warmup=12),
                "f64auto": lambda: lepredict.lyapunov_spectrum(
                    rnn, x, warmup=12, reorth_every="auto", dtype=torch.float64)}
        with torch.no_grad():
            ref = lepredict.lyapunov_spectrum(rnn, x, warmup=12, dtype=torch.float64)
            errors = {k: float((run().mean.double() - ref.mean)[ref.mean > -20].abs().max())
                      for k, run in runs.items()}  # also the warm runs
            times = {k: [] for k in runs}
            for _ in range(5):
                for k, run in runs.items():
                    times[k].append(timed(run))
        ratios = sorted(b / a for a, b in zip(times["f32"], times["f64auto"]))
        print(f"{arch} {N}: f32 QR every step {statistics.median(times['f32']):.3f} s; float64 "
              f"auto / it {statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]; "
              f"max error above -20: f32 {errors['f32']:.1e}, f64 auto {errors['f64auto']:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
