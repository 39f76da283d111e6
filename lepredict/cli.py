"""The ``lepredict`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

__all__ = ["main"]


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _task_options(pairs: list[str]) -> dict:
    """``["seq_len=30", "mode=row"]`` -> ``{"seq_len": 30, "mode": "row"}`` (JSON values)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CLIError(f"--task-option takes KEY=VALUE, got {pair!r}.")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _get_task(name: str, options: dict):
    from lepredict import tasks

    try:
        return tasks.get(name, **options)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from lepredict.train import RunConfig

    d = RunConfig()
    p.add_argument("--arch", default="lstm", choices=["rnn", "gru", "lstm"])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--init", default=d.init, choices=["uniform", "gain", "default"])
    p.add_argument("--init-scale", type=float, default=d.init_scale)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam", "rmsprop"])
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument("--seed", type=int, default=d.seed)


def _config_from_args(args):
    from lepredict.train import RunConfig

    try:
        return RunConfig(arch=args.arch, hidden=args.hidden, layers=args.layers, init=args.init,
                         init_scale=args.init_scale, lr=args.lr, optimizer=args.optimizer,
                         batch_size=args.batch_size, clip=args.clip, seed=args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _cmd_spectrum(args) -> int:
    """Train briefly and print the spectrum at each measured epoch."""
    from lepredict.features import kaplan_yorke
    from lepredict.train import train_run

    task = _get_task(args.task, _task_options(args.task_option))
    config = _config_from_args(args)
    le_epochs = list(range(args.epochs + 1))
    t0 = time.perf_counter()
    rec = train_run(config, task, epochs=args.epochs, le_epochs=le_epochs, device=args.device,
                    probe_size=args.probe_size)
    if args.json:
        print(json.dumps(rec.to_dict()))
        return 0
    print(f"task {task.name} (T={task.seq_len}), {config.arch.upper()} N={config.hidden} x "
          f"{config.layers} layer(s), init {config.init} {config.init_scale:g}; spectrum over "
          f"{args.probe_size} validation sequences, nats/step")
    print(f"{'epoch':>5} {'val loss':>9} {'norm.':>6} {'lambda_1':>16} {'mean':>8} {'#>0':>4} "
          f"{'KY dim':>7}   leading exponents")
    for epoch, spec in sorted(rec.spectra.items()):
        mean, std = spec["mean"], spec["std"]
        val = rec.val_loss[epoch]
        print(f"{epoch:>5} {val:>9.4f} {task.normalised_loss(val):>6.3f} "
              f"{mean[0]:>8.4f}±{std[0]:<7.4f} {sum(mean) / len(mean):>8.4f} "
              f"{sum(v > 0 for v in mean):>4} {kaplan_yorke(mean):>7.2f}   "
              + " ".join(f"{v:.3f}" for v in mean[:6]))
    print(f"status {rec.status}; {time.perf_counter() - t0:.1f} s, of which spectra {rec.le_time:.1f} s")
    return 0


def _pruner(args):
    import optuna

    name = args.pruner
    median = lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)  # noqa: E731
    if name == "lyapunov":
        from lepredict.predictor import ModelFileError
        from lepredict.pruner import LyapunovPruner

        try:
            return LyapunovPruner(model=args.pruner_model, mode=args.pruner_mode,
                                  threshold=args.pruner_threshold,
                                  n_warmup_steps=args.pruner_warmup,
                                  compare_to_best=not args.pruner_no_compare_to_best,
                                  n_startup_trials=10,
                                  wrapped_pruner=median() if args.pruner_wrap_median else None)
        except (ModelFileError, ValueError) as err:
            raise CLIError(str(err)) from None
    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": median,
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
    }
    return pruners[name]()


def _cmd_sweep(args) -> int:
    from lepredict.sweep import load_space, run_sweep

    options = _task_options(args.task_option)
    _get_task(args.task, options)  # a clear error before any storage is touched
    mine = []  # the trials this worker ran, for the exit code

    def record(study, trial) -> None:
        mine.append(trial)

    try:
        space = load_space(args.space)
        study = run_sweep(
            args.task, n_trials=args.n_trials, epochs=args.epochs, le_epochs=args.le_epochs,
            storage=args.storage, study_name=args.study_name, space=space, task_options=options,
            device=args.device, n_jobs=args.n_jobs, sampler=args.sampler,
            pruner=_pruner(args), seed=args.seed, le_k=args.le_k, probe_size=args.probe_size,
            show_progress_bar=not args.quiet, callbacks=[record],
            heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    _print_summary(study, args.epochs, grace_period=args.grace_period)
    if args.report:
        from lepredict import report
        from lepredict.predictor import ModelFileError, load_models, resolve_model
        from lepredict.sweep import trials_frame

        model = None
        try:
            models = load_models(resolve_model(args.pruner_model))
            model = models[min(models, key=lambda b: abs(b - 1))]
        except ModelFileError:
            pass  # the report without the predictor's figures
        frame = trials_frame(study)
        try:
            path = report.analyze(frame, f"studies/{args.study_name}-report.html", model=model,
                                  title=args.study_name)
            print(f"  {'report':<15} {path}")
        except ValueError as err:
            print(f"  {'report':<15} not written: {err}")
    errors = [t.number for t in mine if t.state.name == "FAIL"]
    if errors:
        print(f"lepredict sweep: {_numbers(errors, 'trial')} of this run failed with an error "
              "(see 'failed' above)", file=sys.stderr)
        return 1
    return 0


def _numbers(numbers: list[int], noun: str = "trial", most: int = 6) -> str:
    """``[3, 5, 9]`` -> ``"trials 3, 5, 9"``, the list cut short after ``most``."""
    shown = ", ".join(str(n) for n in numbers[:most])
    more = f" and {len(numbers) - most} more" if len(numbers) > most else ""
    return f"{noun}{'s' if len(numbers) != 1 else ''} {shown}{more}"


def _print_summary(study, epochs: int, grace_period: int | None = None) -> None:
    import optuna

    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    count = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState}
    diverged = sum(t.user_attrs.get("lepredict:status") == "diverged" for t in trials)
    # Epochs each trial trained: to its end, to its pruning, or to the epoch it diverged in.
    spent = 0
    for t in trials:
        run = t.user_attrs.get("lepredict:run", {})
        if t.state == optuna.trial.TrialState.PRUNED:
            spent += int(run.get("pruned_at", t.last_step or 0))
        elif t.state == optuna.trial.TrialState.COMPLETE:
            done = int(run.get("epochs_completed", epochs))
            spent += done if run.get("status") != "diverged" else min(done + 1, epochs)
    finished = count["complete"] + count["pruned"]
    full = finished * epochs
    waiting = f"; {count['waiting']} waiting" if count["waiting"] else ""
    rows = [
        ("trials run", f"{len(states) - count['waiting']} ({count['complete']} complete, "
                       f"{diverged} of them diverged; {count['fail']} failed; "
                       f"{count['running']} running{waiting})"),
    ]
    if count["fail"]:
        rows.append(("failed", _failures(trials)))
    if count["running"]:
        # This worker finished all it started: what still runs is another worker's, or was a
        # killed worker's whose heartbeat has not been missing for the grace period yet.
        running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        after = f"{grace_period} s" if grace_period else "the grace period"
        rows.append(("still running", f"{_numbers(running)}: in other workers, or killed ones "
                                      f"not yet {after} without a heartbeat (a sweep started "
                                      "after that fails and retries them)"))
    if count["waiting"]:
        rows.append(("waiting", f"{count['waiting']} (retries of killed trials, or enqueued): "
                                "the next sweep runs them"))
    rows += [
        ("pruned", f"{count['pruned']}"),
        ("epochs trained", f"{spent} of {full} without pruning"),
        ("compute saved", f"{100 * (1 - spent / full):.0f}% of the epochs" if full else "-"),
    ]
    finite = [t for t in trials if t.value is not None and math.isfinite(t.value)]
    if finite:
        best = min(finite, key=lambda t: t.value)
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best.params.items())
        rows.append(("best result", f"normalised loss {best.value:.4f} (trial {best.number}: "
                                    f"{params})"))
    print(f"study {study.study_name}")
    for key, value in rows:
        print(f"  {key:<15} {value}")


def _failures(trials) -> str:
    """What became of the failed trials: killed (retried or not) or an error, with the first."""
    fail = [t for t in trials if t.state.name == "FAIL"]
    # A retry lists the trials it repeats in "retry_history", its direct original last.
    retry_of = {t.system_attrs["retry_history"][-1]: t.number for t in trials
                if t.system_attrs.get("retry_history")}
    errors = [t for t in fail if "lepredict:error" in t.user_attrs]
    killed = [t.number for t in fail if "lepredict:error" not in t.user_attrs]
    retried = [n for n in killed if n in retry_of]
    parts = []
    if retried:
        parts.append(f"{_numbers(retried)} killed, retried as "
                     f"{', '.join(str(retry_of[n]) for n in retried[:6])}")
    if len(retried) < len(killed):
        lost = [n for n in killed if n not in retry_of]
        parts.append(f"{_numbers(lost)} killed, not retried (retries of killed trials are "
                     "not retried again)")
    if errors:
        first = errors[0]
        parts.append(f"{_numbers([t.number for t in errors])} raised an error (trial "
                     f"{first.number}: {first.user_attrs['lepredict:error'][:200]})")
    return f"{len(fail)}: " + "; ".join(parts)


def _cmd_export(args) -> int:
    import optuna

    from lepredict.sweep import export_trials, make_storage

    try:
        study = optuna.load_study(study_name=args.study_name,
                                  storage=make_storage(args.storage, args.study_name))
        n = export_trials(study, args.output)
    except KeyError:
        raise CLIError(f"No study named {args.study_name!r} in {args.storage or 'studies/'}; "
                       "check --study-name and --storage.") from None
    except ValueError as err:
        raise CLIError(str(err)) from None
    print(f"wrote {n} trials to {args.output}")
    return 0


def _read_data(paths: list[str]):
    """Exports named on the command line (globs already expanded by the shell), as one frame."""
    import glob

    import pandas as pd

    from lepredict.sweep import read_trials

    files = [f for p in paths for f in (sorted(glob.glob(p)) or [p])]
    frames = []
    for f in files:
        try:
            frames.append(read_trials(f))
        except FileNotFoundError:
            raise CLIError(f"No such data file: {f!r}; pass exports written by "
                           "`lepredict export` (.parquet or .csv).") from None
        except ValueError as err:
            raise CLIError(str(err)) from None
    if not frames:
        raise CLIError("No data: pass --data FILE [FILE ...].")
    return pd.concat(frames, ignore_index=True)


def _cmd_fit(args) -> int:
    from lepredict.evaluation import cross_validate
    from lepredict.predictor import StabilityPredictor

    frame = _read_data(args.data)
    # Model selection by grouped cross-validation (groups = study) over a small grid.
    grid = {"histgradientboostingclassifier__learning_rate": [0.03, 0.1],
            "histgradientboostingclassifier__max_leaf_nodes": [7, 15, 31]} if args.search else None
    for budget in args.budgets:
        try:
            metrics = {}
            model = StabilityPredictor(budget=budget, feature_sets=tuple(args.features),
                                       threshold=args.threshold, param_grid=grid).fit(frame)
            if not args.no_cv:
                # Held out, the classifier the search chose: the figures and LyapunovPruner's
                # default threshold describe the predictor that is saved.
                chosen = model.classifier_.estimator if grid else None
                metrics["held_out_configs"] = cross_validate(
                    frame, budget=budget, sets=args.features, scheme="configs",
                    threshold=args.threshold, classifier=chosen)
                model.prune_threshold_ = metrics["held_out_configs"]["p_at_99_recall"]
        except ValueError as err:
            raise CLIError(str(err)) from None
        out = model.save(f"{args.output}/budget-{budget}", metrics=metrics)
        auroc = metrics.get("held_out_configs", {}).get("auroc")
        extra = f", held-out AUROC {auroc:.3f}" if auroc is not None else ""
        print(f"budget {budget}: fitted on {model.training_summary_['runs']} runs{extra} -> {out}")
    return 0


def _cmd_evaluate(args) -> int:
    from lepredict.evaluation import compare, format_summary, format_table
    from lepredict.features import completed_runs, outcomes
    from lepredict.predictor import ModelFileError, load_models, metric_table, resolve_model

    frame = _read_data(args.data)
    if args.model is None:
        try:
            table = compare(frame, budgets=args.budgets, schemes=args.schemes,
                            threshold=args.threshold, progress=not args.json, n_jobs=args.n_jobs)
        except ValueError as err:
            raise CLIError(str(err)) from None
        if args.json:
            print(table.to_json(orient="records", indent=1))
        else:
            print(format_table(table))
            print()
            print(format_summary(table))
        return 0
    try:
        models = load_models(resolve_model(args.model))
    except ModelFileError as err:
        raise CLIError(str(err)) from None
    runs = completed_runs(frame)
    rows = []
    for budget, model in sorted(models.items()):
        out = outcomes(runs, threshold=args.threshold if args.threshold else model.threshold)
        m = metric_table(out["trainable"], model.predict_proba(runs)[:, 1], out["final_loss"],
                         model.predict_loss(runs))
        rows.append({"budget": budget, **m})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'budget':>6} {'runs':>6} {'AUROC':>7} {'AP':>7} {'Brier':>7} {'Spearman':>9} {'MAE':>7}")
    for r in rows:
        print(f"{r['budget']:>6} {r['n']:>6} {r['auroc']:>7.3f} {r['ap']:>7.3f} {r['brier']:>7.3f} "
              f"{r['spearman']:>9.3f} {r['mae']:>7.3f}")
    return 0


def _load_predictors(name: str):
    from lepredict.predictor import ModelFileError, load_models, resolve_model

    try:
        return load_models(resolve_model(name))
    except ModelFileError as err:
        raise CLIError(str(err)) from None


def _read_config_file(path: str) -> dict:
    import tomllib

    try:
        text = open(path, "rb").read()
    except OSError as err:
        raise CLIError(f"Cannot read --config {path!r}: {err.strerror}.") from None
    try:
        return json.loads(text) if path.endswith(".json") else tomllib.loads(text.decode())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"--config {path!r} is not valid {'JSON' if path.endswith('.json') else 'TOML'}:"
                       f" {err}") from None


def _cmd_predict(args) -> int:
    """Train for the early budget (or read spectra measured elsewhere) and predict."""
    from lepredict.sweep import record_frame
    from lepredict.train import RunConfig, RunRecord, train_run

    t0 = time.perf_counter()
    models = _load_predictors(args.model)
    budget = max(models) if args.budget is None else args.budget
    if budget not in models:
        raise CLIError(f"The model has no predictor for budget {budget}; it has {sorted(models)}.")
    model = models[budget]
    task = _get_task(args.task, _task_options(args.task_option))
    if args.spectrum:
        try:
            data = json.loads(open(args.spectrum).read())
        except (OSError, json.JSONDecodeError) as err:
            raise CLIError(f"Cannot read --spectrum {args.spectrum!r}: {err}") from None
        spectra = data.get("spectra", data if "0" in data else None)
        if not isinstance(spectra, dict) or not spectra:
            raise CLIError(f"{args.spectrum!r} holds no spectra: expected a run record from "
                           "`lepredict spectrum --json`, or {\"0\": {\"mean\": [...], "
                           "\"std\": [...]}, ...}.")
        config = data.get("config") or (_read_config_file(args.config) if args.config else
                                         _config_from_args(args).to_dict())
        val = data.get("val_loss", [])
        if "loss" in model.feature_sets and len(val) < budget + 1:
            raise CLIError(f"The predictor uses the validation loss of epochs 0..{budget}, which "
                           f"{args.spectrum!r} lacks: add \"val_loss\": [...] or pick a model "
                           "fitted on spectra alone.")
        try:
            config = RunConfig.from_dict(config).to_dict()
        except (ValueError, TypeError) as err:
            raise CLIError(str(err)) from None
        rec = RunRecord(config=config, task={"name": task.name}, val_loss=list(val),
                        spectra={int(k): v for k, v in spectra.items()}, epochs=budget)
        measured = 0.0
    else:
        if args.config:
            try:
                config = RunConfig.from_dict(_read_config_file(args.config))
            except (ValueError, TypeError) as err:
                raise CLIError(str(err)) from None
        else:
            config = _config_from_args(args)
        rec = train_run(config, task, epochs=budget, le_epochs=range(budget + 1),
                        device=args.device, probe_size=args.probe_size)
        measured = rec.wall_time
    frame = record_frame(rec, task)
    p = float(model.predict_proba(frame)[0, 1])
    loss, low, high = (float(v[0]) for v in model.predict_loss(frame, interval=True))
    drivers = model.explain(frame, top=5)[0]
    result = {
        "p_trainable": p, "trainable": p >= 0.5, "final_loss": loss, "final_loss_interval":
        [low, high], "budget": budget, "status": rec.status, "drivers": drivers,
        "task": task.name, "config": rec.config, "train_seconds": measured,
        "seconds": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    verdict = "likely to train" if p >= 0.5 else "likely NOT to train"
    print(f"{task.name}: {rec.config['arch'].upper()} N={rec.config['hidden']}, lr "
          f"{rec.config['lr']:g}, init {rec.config['init']} {rec.config['init_scale']:g}, "
          f"{rec.config['optimizer']}")
    print(f"P(trainable) = {p:.3f}  ({verdict}; status after {budget} epoch(s): {rec.status})")
    print(f"predicted final normalised loss {loss:.3f}  (10-90%: {low:.3f} - {high:.3f}; "
          f"trainable below {task.threshold:g})")
    print("what drove it (P minus P with that feature at a typical value):")
    for name, delta in drivers:
        print(f"  {name:<22} {delta:+.3f}")
    print(f"took {result['seconds']:.1f} s ({measured:.1f} s training and spectra)")
    return 0


def _cmd_analyze(args) -> int:
    import optuna

    from lepredict import report
    from lepredict.sweep import make_storage, trials_frame

    study = None
    if args.data:
        frame = _read_data(args.data)
        title = ", ".join(args.data)
    elif args.study_name:
        try:
            study = optuna.load_study(study_name=args.study_name,
                                      storage=make_storage(args.storage, args.study_name))
        except KeyError:
            raise CLIError(f"No study named {args.study_name!r} in {args.storage or 'studies/'}; "
                           "check --study-name and --storage.") from None
        frame = trials_frame(study)
        title = args.study_name
    else:
        raise CLIError("Say what to analyse: --study-name NAME [--storage URL], or --data FILE.")
    model = None
    if args.model != "none":
        models = _load_predictors(args.model)
        model = models[min(models, key=lambda b: abs(b - args.budget))]
    reference = _read_data(args.reference) if args.reference else None
    output = args.output or f"studies/{(args.study_name or 'report')}-report.html"
    try:
        path = report.analyze(frame, output, model=model, title=title, reference=reference)
        if args.publish:
            if study is None:
                raise CLIError("--publish saves figures into a study: use --study-name.")
            n = report.publish(study, report.figures(frame, model=model, reference=reference))
            print(f"published {n} figures to study {study.study_name} for optuna-dashboard")
    except (ValueError, ImportError) as err:
        raise CLIError(str(err)) from None
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lepredict import __version__
    from lepredict.train import PROBE_SIZE

    parser = argparse.ArgumentParser(
        prog="lepredict",
        description="Predict early in training whether an RNN's hyperparameters will train well.",
    )
    parser.add_argument("--version", action="version", version=f"lepredict {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spectrum", help="train a network briefly and print its Lyapunov spectra")
    p.add_argument("--task", default="digits")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="task option, e.g. --task-option mode=row (repeatable)")
    _add_config_args(p)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--probe-size", type=int, default=PROBE_SIZE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.set_defaults(func=_cmd_spectrum)

    p = sub.add_parser(
        "sweep", help="run or resume an Optuna sweep of short training runs",
        description="Run or resume an Optuna sweep of short training runs. Any number of "
        "workers may run it on one study (--storage postgresql://... or sqlite:///...); "
        "together they stop at --n-trials. Trials of killed workers are failed and run again "
        "once by the next sweep started more than --grace-period seconds after the kill.",
        epilog="Exit status: 0 when every trial this run started completed or was pruned "
        "(diverged runs are complete), even if other workers' trials are still running (the "
        "summary lists them); 1 when a trial this run started failed with an error (the "
        "summary says which); 2 for bad input, including a finite search space whose every "
        "configuration is already in the study.")
    p.add_argument("--task", default="digits")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--n-trials", type=int, default=20, help="trials the study should hold in total")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--le-epochs", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="epochs at which to measure the spectrum (0 = initialisation)")
    p.add_argument("--le-k", type=int, default=None, help="exponents per spectrum (default: all)")
    p.add_argument("--probe-size", type=int, default=PROBE_SIZE,
                   help="validation sequences the spectrum averages over (default: "
                   "%(default)s, as the shipped predictor was fitted with)")
    p.add_argument("--space", default=None, help="search space: NAME for studies/NAME.toml, or a path")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL or journal file (default: sqlite:///studies/NAME.db)")
    p.add_argument("--study-name", default="lepredict")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    p.add_argument("--pruner", default="none", choices=["none", "lyapunov", "median", "hyperband"])
    p.add_argument("--pruner-model", default="default",
                   help="predictor of --pruner lyapunov: shipped name or directory")
    p.add_argument("--pruner-mode", default="model", choices=["model", "online", "both"])
    p.add_argument("--pruner-threshold", type=float, default=None,
                   help="prune when P(trainable) is below this (default: the predictor's own, "
                   "which kept 99%% of the trainable runs in cross-validation)")
    p.add_argument("--pruner-warmup", type=int, default=1,
                   help="no stability pruning before this epoch (0: may prune at initialisation)")
    p.add_argument("--pruner-no-compare-to-best", action="store_true",
                   help="prune by P(trainable) alone, not also by the predicted final loss "
                   "against the best so far")
    p.add_argument("--pruner-wrap-median", action="store_true",
                   help="also prune by loss with a wrapped MedianPruner")
    p.add_argument("--n-jobs", type=int, default=1, help="trials at once in this process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0,
                   help="with the trial number, seeds each trial's sampler and run: the same "
                   "seed and trial number give the same configuration, and workers started "
                   "alike draw distinct ones (default: %(default)s)")
    p.add_argument("--heartbeat-interval", type=int, default=30, metavar="SECONDS",
                   help="seconds between a running trial's heartbeats in a database storage "
                   "(default: %(default)s)")
    p.add_argument("--grace-period", type=int, default=90, metavar="SECONDS",
                   help="seconds without a heartbeat after which a running trial counts as "
                   "killed, is failed and run again (default: %(default)s; longer than "
                   "--heartbeat-interval)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true",
                   help="write the analysis report (studies/NAME-report.html) at the end")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("export", help="write a study's trials to Parquet or CSV")
    p.add_argument("--storage", default=None)
    p.add_argument("--study-name", required=True)
    p.add_argument("-o", "--output", required=True, help="FILE.parquet or FILE.csv")
    p.set_defaults(func=_cmd_export)

    from lepredict.features import FEATURE_SETS

    p = sub.add_parser("fit", help="fit stability predictors on exported sweeps")
    p.add_argument("--data", nargs="+", required=True, help="exports (.parquet/.csv); globs work")
    p.add_argument("-o", "--output", required=True, help="model directory (one subdirectory "
                   "per budget)")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="early budgets in epochs (one predictor each)")
    p.add_argument("--features", nargs="+", default=["spectrum", "loss"], choices=FEATURE_SETS)
    p.add_argument("--threshold", type=float, default=None,
                   help="trainability threshold on the final normalised loss (default: the task's)")
    p.add_argument("--no-cv", action="store_true", help="skip the held-out metrics")
    p.add_argument("--search", action="store_true",
                   help="choose the classifier's hyperparameters by grouped cross-validation")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("evaluate", help="metrics of a predictor on data, or the cross-validated "
                       "comparison with the baselines (without --model)")
    p.add_argument("--model", default=None, help="model directory or shipped name ('default')")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--schemes", nargs="+", default=["configs", "task", "arch"],
                   choices=["configs", "task", "arch"])
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--n-jobs", type=int, default=None, help="folds fitted in parallel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict-stability", help="train for the early budget and predict whether "
                       "a configuration will train")
    p.add_argument("--task", default="digits")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE")
    _add_config_args(p)
    p.add_argument("--config", default=None, help="hyperparameters from a TOML or JSON file")
    p.add_argument("--spectrum", default=None, help="predict from spectra measured elsewhere "
                   "(JSON: a `lepredict spectrum --json` record, or {epoch: {mean, std}})")
    p.add_argument("--model", default="default", help="shipped name or model directory")
    p.add_argument("--budget", type=int, default=None,
                   help="early budget in epochs (default: the model's largest)")
    p.add_argument("--probe-size", type=int, default=PROBE_SIZE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("analyze", help="HTML report of a sweep (plotly figures)")
    p.add_argument("--storage", default=None)
    p.add_argument("--study-name", default=None)
    p.add_argument("--data", nargs="+", default=None, help="exported trials instead of a study")
    p.add_argument("--model", default="default", help="predictor to show ('none' for no model)")
    p.add_argument("--budget", type=int, default=1, help="early budget of the predictor shown")
    p.add_argument("--reference", nargs="+", default=None,
                   help="exports of full runs: what pruned configurations would have reached")
    p.add_argument("-o", "--output", default=None, help="report path (default: "
                   "studies/NAME-report.html)")
    p.add_argument("--publish", action="store_true",
                   help="also save the figures into the study for optuna-dashboard")
    p.set_defaults(func=_cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"lepredict {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
