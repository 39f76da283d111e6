"""Sweep throughput: one trial at a time against populations, and the spectra's share of a run.

Two parts, both through the real ``run_sweep`` path on SQLite studies:

* ``populations``: digits read by rows (``mode=row``, T = 8), GRU and LSTM of 32 and 64 units,
  learning rate and initialisation scale sampled (TPE), spectra at epochs 0-3, no pruner.
  Trials per minute one at a time (``population=1``) and with populations of 8, 16, 32 and 64
  (each population size runs that many trials, so every population is full), measured in one
  process, one after the other, with the task built and the study created beforehand
  (start-up excluded); the ratio to one at a time is the figure to read on a busy machine,
  and trials per minute of process CPU time (not counting waits on the disk or on other
  processes) beside the wall-clock ones.
* ``spectra``: digits read pixel by pixel (T = 64), N = 64, 10 epochs, spectra (the sweep's
  default measurement: 16 leading exponents and the sum, over 4 validation sequences) after
  epochs 1, 2 and 3, one trial per architecture and seed; the share of each run's wall time
  spent on spectra (target: at most 10%).

* ``corpus`` (not in ``all``): the corpus search space (``studies/corpus-v2.toml``: shapes
  sampled, 1-3 layers of 16-128 units), digits by rows, random sampler, 4 epochs: populations
  of K with ``same_shape=True`` against the very same configurations and seeds enqueued in a
  study run one at a time, both through ``run_sweep`` on journal files, in one process; a
  round's ratio is the sequential wall time over the populations' (``--corpus-trials`` trials,
  ``--repeats`` rounds, each drawing its own configurations).

Run: ``python benchmarks/bench_sweep.py`` (``--device cuda`` on a GPU, ``--part populations``
for the first part only, ``--threads 1`` to pin torch to one thread, ``--repeats 3`` for
interleaved rounds and the range of their ratios, ``--storage journal`` for Optuna journal files
in place of SQLite).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution

from lepredict import tasks
from lepredict.population import shape_of
from lepredict.sweep import ATTR, SearchSpace, load_space, make_storage, run_sweep


def populations(args) -> None:
    task = tasks.get("digits", mode="row")
    sizes = [1] + args.populations
    print(f"digits (row, T=8), {args.epochs} epochs, spectra at epochs 0-3, lr and init_scale "
          f"sampled (TPE), device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.storage} storage")
    if args.repeats > 1:
        print(f"{args.repeats} rounds, each running one by one and every population size in turn; "
              "rates are the median over rounds, ratios the median [lowest-highest] of each "
              "round's population against that round's one by one")
    header = "".join(f"{'K=' + str(k) if k > 1 else 'one by one':>12}" for k in sizes)
    if args.repeats > 1:
        header = f"{'one by one':>12}" + "".join(f"{'K=' + str(k):>24}" for k in sizes[1:])
    print(f"{'network':10}{header}   (trials/minute; x: ratio to one by one)")
    print("(rows 'cpu': trials per minute of this process's CPU time, which waits on the disk "
          "and on other processes leave out)")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for hidden in args.hidden:
                space = SearchSpace(
                    {"lr": FloatDistribution(1e-3, 3e-2, log=True),
                     "init_scale": FloatDistribution(0.2, 1.5, log=True)},
                    {"arch": arch, "hidden": hidden, "optimizer": "adam", "batch_size": 64},
                )
                # rates[r][i]: round r, population size sizes[i]
                rates, cpu_rates = [], []
                for round_ in range(args.repeats):
                    rates.append([])
                    cpu_rates.append([])
                    for k in sizes:
                        n = max(k, args.sequential_trials) if k == 1 else k
                        name = f"{arch}{hidden}-{k}-{round_}"
                        storage = (str(Path(tmp) / f"{name}.log") if args.storage == "journal"
                                   else f"sqlite:///{Path(tmp) / f'{name}.db'}")
                        optuna.create_study(storage=make_storage(storage, "bench"),
                                            study_name="bench")
                        t0, c0 = time.perf_counter(), time.process_time()
                        run_sweep(task, n_trials=n, epochs=args.epochs, le_epochs=[0, 1, 2, 3],
                                  storage=storage, study_name="bench", space=space,
                                  device=args.device, population=k, show_progress_bar=False)
                        rates[-1].append(n / (time.perf_counter() - t0) * 60)
                        cpu_rates[-1].append(n / (time.process_time() - c0) * 60)
                for label, values in (("", rates), (" cpu", cpu_rates)):
                    print(f"{arch + '-' + str(hidden) + label:10}{_cells(values)}", flush=True)


def _cells(rounds: list[list[float]]) -> str:
    """One row: the one-by-one rate, then each population's rate and its ratio to one by one;
    over several rounds, medians and the range of the rounds' own ratios."""
    if len(rounds) == 1:
        values = rounds[0]
        return "".join(f"{r:>12.1f}" if i == 0 else f"{r:>6.1f} {r / values[0]:>4.1f}x"
                       for i, r in enumerate(values))
    columns = list(zip(*rounds))
    cells = f"{statistics.median(columns[0]):>12.1f}"
    for column in columns[1:]:
        ratios = [rate / one for rate, one in zip(column, columns[0])]
        cell = (f"{statistics.median(column):.1f} {statistics.median(ratios):.1f}x "
                f"[{min(ratios):.1f}-{max(ratios):.1f}]")
        cells += f"{cell:>24}"
    return cells


def corpus(args) -> None:
    task = tasks.get("digits", mode="row")
    space = load_space(Path(__file__).resolve().parents[1] / "studies" / "corpus-v2.toml")
    n, k = args.corpus_trials, args.corpus_population
    print(f"corpus-v2 space, digits (row), 4 epochs, spectra at epochs 0-3, random sampler, "
          f"{n} trials a round, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'round':>5} {'shapes':>6} {'K=' + str(k) + ' same shape s':>20} "
          f"{'one by one s':>13} {'ratio':>6}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            common = dict(epochs=4, le_epochs=[0, 1, 2, 3], space=space, device=args.device,
                          sampler="random", seed=1000 + round_, show_progress_bar=False)
            times, drawn = [], []  # drawn: the populations' configurations, in their order
            for population in (k, 1):
                storage = str(Path(tmp) / f"{round_}-{population}.log")
                study = optuna.create_study(storage=make_storage(storage, "bench"),
                                            study_name="bench")
                for params in drawn:
                    study.enqueue_trial(params)
                t0 = time.perf_counter()
                done = run_sweep(task, n_trials=n, storage=storage, study_name="bench",
                                 population=population, same_shape=population > 1, **common)
                times.append(time.perf_counter() - t0)
                assert not drawn or [t.params for t in done.trials] == drawn
                drawn = [t.params for t in done.trials]
            shapes = len({shape_of(params | dict(space.fixed)) for params in drawn})
            ratios.append(times[1] / times[0])
            print(f"{round_:>5} {shapes:>6} {times[0]:>20.1f} {times[1]:>13.1f} "
                  f"{ratios[-1]:>5.2f}x", flush=True)
    if len(ratios) > 1:
        print(f"median ratio {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")


def spectra(args) -> None:
    archs = ["rnn", "gru", "lstm"]
    space = SearchSpace(
        {"arch": CategoricalDistribution(archs)},
        {"hidden": 64, "init_scale": 0.1, "lr": 3e-3, "batch_size": 64},
    )
    n = args.trials_per_arch * len(archs)
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'bench.db'}"
        study = optuna.create_study(storage=storage, study_name="bench")
        for i in range(n):  # the same number of trials for each architecture, in a fixed order
            study.enqueue_trial({"arch": archs[i % len(archs)]})
        t0 = time.perf_counter()
        study = run_sweep("digits", n_trials=n, epochs=10, le_epochs=[1, 2, 3],
                          storage=storage, study_name="bench", space=space, device=args.device,
                          show_progress_bar=False)
        elapsed = time.perf_counter() - t0
    print(f"digits (pixel, T=64), N=64, 10 epochs, spectra at epochs 1-3, device {args.device}")
    print(f"{'arch':5} {'trials':>6} {'s/trial':>8} {'spectra s/trial':>16} {'spectra share':>14}")
    for arch in archs:
        runs = [t.user_attrs[f"{ATTR}run"] for t in study.trials if t.params["arch"] == arch]
        wall = sum(r["wall_time"] for r in runs) / len(runs)
        le = sum(r["le_time"] for r in runs) / len(runs)
        print(f"{arch:5} {len(runs):>6} {wall:>8.1f} {le:>16.2f} {le / wall:>13.1%}")
    print(f"throughput: {n / elapsed * 60:.1f} trials/minute ({n} trials in {elapsed:.0f} s, "
          "including storage)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "populations", "spectra", "corpus"],
                    default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own, one per core)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per trial (populations part)")
    ap.add_argument("--archs", nargs="+", default=["gru", "lstm"])
    ap.add_argument("--hidden", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--populations", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--sequential-trials", type=int, default=16,
                    help="trials one by one per network (populations part)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of one by one and every population size, interleaved "
                         "(populations part); medians and ranges of the ratios")
    ap.add_argument("--storage", choices=["sqlite", "journal"], default="sqlite",
                    help="the studies' storage (populations part): SQLite or an Optuna journal "
                         "file")
    ap.add_argument("--trials-per-arch", type=int, default=2, help="spectra part")
    ap.add_argument("--corpus-trials", type=int, default=64, help="trials a round (corpus part)")
    ap.add_argument("--corpus-population", type=int, default=16,
                    help="population size (corpus part)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.part in ("all", "populations"):
        populations(args)
    if args.part in ("all", "spectra"):
        spectra(args)
    if args.part == "corpus":
        corpus(args)


if __name__ == "__main__":
    main()
