"""Training runs: records, divergence as a result, configs, the spectrum CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lepredict
from lepredict import tasks
from lepredict.cli import main
from lepredict.train import RunConfig, SeqModel, train_run, weight_stats


@pytest.fixture(scope="module")
def digits_row():
    return tasks.get("digits", mode="row")


def test_run_record_has_curves_and_spectra(digits_row):
    cfg = {"arch": "gru", "hidden": 12, "lr": 1e-2, "batch_size": 128}
    rec = lepredict.train_run(cfg, digits_row, epochs=3, le_epochs=[0, 1, 2, 9])
    assert rec.status == "ok"
    assert rec.epochs_completed == 3
    assert len(rec.train_loss) == 3 and len(rec.grad_norm) == 3
    assert len(rec.val_loss) == 4 and len(rec.weights) == 4
    assert sorted(rec.spectra) == [0, 1, 2]  # epoch 9 is beyond the run
    for spec in rec.spectra.values():
        assert spec["n"] == 12 and len(spec["mean"]) == 12 and len(spec["std"]) == 12
        assert spec["mean"] == sorted(spec["mean"], reverse=True)
    # Training on digits with Adam must lower the validation loss.
    assert rec.val_loss[-1] < rec.val_loss[0]
    assert rec.final_normalised_loss == pytest.approx(rec.val_loss[-1] / digits_row.chance_loss)
    assert 0 < rec.le_time < rec.wall_time
    json.dumps(rec.to_dict())  # storable as is


def test_spectrum_in_record_matches_engine_on_probe(digits_row):
    cfg = RunConfig(arch="lstm", hidden=6, layers=2, init_scale=0.5)
    rec = lepredict.train_run(cfg, digits_row, epochs=0, le_epochs=[0], probe_size=8)
    torch.manual_seed(cfg.seed)
    model = SeqModel(digits_row.input_size, digits_row.output_size, cfg)
    # The default measurement: the 16 leading of the 24 exponents, with the sum of all.
    spec = lepredict.lyapunov_spectrum(model.rnn, digits_row.x_val[:8], k=16, exponent_sum=True,
                                       warmup=digits_row.seq_len // 8)
    assert rec.spectra[0]["n"] == 24
    assert rec.spectra[0]["mean"] == pytest.approx(spec.mean.tolist(), abs=1e-5)
    assert rec.spectra[0]["sum"] == pytest.approx(float(spec.exponent_sum.mean()), abs=1e-4)


def test_default_measurement_is_16_exponents_with_the_sum_the_predictor_reads(digits_row):
    """A network larger than 16: the record holds 16 leading exponents and the sum of all (as
    the full spectrum gives it), and the predictor's spectrum features build from it."""
    from lepredict.features import build_features
    from lepredict.sweep import record_frame

    cfg = RunConfig(arch="gru", hidden=40, seed=3)
    rec = lepredict.train_run(cfg, digits_row, epochs=0, le_epochs=[0])
    spec = rec.spectra[0]
    assert (spec["n"], spec["k"], len(spec["mean"])) == (40, 16, 16)
    full = lepredict.train_run(cfg, digits_row, epochs=0, le_epochs=[0], le_k=None).spectra[0]
    assert spec["sum"] == pytest.approx(full["sum"], rel=1e-4)
    assert full["sum"] == pytest.approx(math.fsum(full["mean"]), rel=1e-4)
    features = build_features(record_frame(rec, digits_row), budget=0, sets=["spectrum"])
    assert features["spec_e0_mean"].iloc[0] == pytest.approx(spec["sum"] / 40, rel=1e-6)


@pytest.mark.parametrize("averaged, every", [(1, 1), (7, 1), (19, 1), (20, 2), (42, 4),
                                             (500, 4)])
def test_the_default_sum_takes_every_4th_step_but_keeps_10(averaged, every):
    from lepredict.train import measured_sum_every

    assert measured_sum_every(averaged) == every
    assert averaged // every >= min(averaged, 10)


def test_same_seed_same_record(digits_row):
    cfg = {"arch": "rnn", "hidden": 8, "lr": 1e-2, "batch_size": 256, "seed": 3}
    a = lepredict.train_run(cfg, digits_row, epochs=1, le_epochs=[1])
    b = lepredict.train_run(cfg, digits_row, epochs=1, le_epochs=[1])
    assert a.val_loss == b.val_loss and a.spectra == b.spectra


def test_diverging_run_is_a_result_not_a_crash(digits_row):
    cfg = {"arch": "rnn", "hidden": 16, "init": "uniform", "init_scale": 3.0, "lr": 1e38,
           "optimizer": "sgd", "batch_size": 256}
    rec = lepredict.train_run(cfg, digits_row, epochs=4, le_epochs=[0, 1, 2, 3])
    assert rec.status == "diverged"
    assert rec.epochs_completed < 4
    assert math.isinf(rec.final_normalised_loss)
    assert 0 in rec.spectra  # what it had before diverging is kept
    json.dumps(rec.to_dict())


def _sum_task() -> tasks.Task:
    """Regress the sum of 5 uniform inputs: small, and its MSE stays finite under Adam however
    large the learning rate, so only the loss-ratio rule can call such a run diverged."""
    g = torch.Generator().manual_seed(0)
    x_train, x_val = torch.rand(128, 5, 1, generator=g), torch.rand(64, 5, 1, generator=g)
    y_train, y_val = x_train.sum(1), x_val.sum(1)
    chance = float(((y_val - y_train.mean()) ** 2).mean())
    return tasks.Task(name="sum", x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                      input_size=1, output_size=1, kind="regression", chance_loss=chance,
                      threshold=0.5, options={}, scored_steps=1)


def test_exploding_but_finite_loss_is_diverged(monkeypatch):
    from lepredict import train

    task = _sum_task()
    cfg = {"arch": "rnn", "hidden": 4, "lr": 100.0, "optimizer": "adam", "batch_size": 32}
    rec = lepredict.train_run(cfg, task, epochs=3, le_epochs=[0, 1])
    peak = rec.val_loss[-1] / task.chance_loss
    assert math.isfinite(peak) and peak > train.DIVERGED_LOSS_RATIO  # finite, yet diverged
    assert rec.status == "diverged" and rec.epochs_completed == 0
    assert math.isinf(rec.final_normalised_loss) and sorted(rec.spectra) == [0]
    json.dumps(rec.to_dict())
    # The constant is what decides: above that peak, the same run trains to the end as "ok".
    monkeypatch.setattr(train, "DIVERGED_LOSS_RATIO", 10 * peak)
    rec = lepredict.train_run(cfg, task, epochs=3, le_epochs=[])
    assert rec.status == "ok" and rec.epochs_completed == 3
    # A sane learning rate on the same task is not affected.
    monkeypatch.undo()
    rec = lepredict.train_run({**cfg, "lr": 1e-2}, task, epochs=2, le_epochs=[])
    assert rec.status == "ok" and max(rec.val_loss) < train.DIVERGED_LOSS_RATIO * task.chance_loss


def test_init_schemes():
    cfg = RunConfig(arch="rnn", hidden=200, init="uniform", init_scale=0.3)
    m = SeqModel(1, 2, cfg)
    w = m.rnn.weight_hh_l0
    assert w.abs().max() <= 0.3 and w.abs().max() > 0.29
    assert float(m.rnn.bias_hh_l0.detach().abs().max()) == 0.0
    g = SeqModel(1, 2, RunConfig(arch="rnn", hidden=400, init="gain", init_scale=0.5))
    assert weight_stats(g.rnn)["w_hh_radius"] == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("arch, gates", [("rnn", 1), ("gru", 3), ("lstm", 4)])
def test_orthogonal_init_is_orthogonal_per_gate_times_the_gain(arch, gates):
    torch.manual_seed(0)
    m = SeqModel(3, 2, RunConfig(arch=arch, hidden=40, layers=2, init="orthogonal",
                                 init_scale=1.5))
    eye = torch.eye(40)
    for layer in range(2):
        w_hh = getattr(m.rnn, f"weight_hh_l{layer}").detach()
        blocks = w_hh.split(40)
        assert len(blocks) == gates
        for block in blocks:  # every singular value is the gain
            assert torch.allclose(block @ block.T, 2.25 * eye, atol=1e-4)
        assert not torch.allclose(blocks[0], blocks[-1]) or gates == 1  # one draw per gate
        w_ih = getattr(m.rnn, f"weight_ih_l{layer}").detach()
        fan_in = w_ih.shape[1]
        assert float(w_ih.std()) == pytest.approx(1.5 / math.sqrt(fan_in), rel=0.1)
        for name in ("bias_hh", "bias_ih"):
            assert float(getattr(m.rnn, f"{name}_l{layer}").detach().abs().max()) == 0.0
    assert weight_stats(m.rnn)["w_hh_opnorm"] == pytest.approx(1.5, rel=1e-4)


def test_weight_decay_reaches_the_optimizer(digits_row):
    """Coupled decay, as torch.optim.Adam(weight_decay=...) applies it: a run with decay is the
    run without, plus weight_decay * w in every gradient."""
    cfg = {"arch": "gru", "hidden": 8, "lr": 1e-2, "batch_size": 256, "init_scale": 0.5}
    plain = lepredict.train_run(cfg, digits_row, epochs=1, le_epochs=[])
    decayed = lepredict.train_run({**cfg, "weight_decay": 0.1}, digits_row, epochs=1,
                                  le_epochs=[])
    assert decayed.config["weight_decay"] == 0.1 and plain.config["weight_decay"] == 0.0
    # Decay shrinks the weights against the run without it.
    assert decayed.weights[-1]["w_hh_norm"] < plain.weights[-1]["w_hh_norm"] - 1e-3
    # The same run by hand: torch's Adam given the same decay.
    torch.manual_seed(0)
    model = SeqModel(digits_row.input_size, digits_row.output_size,
                     RunConfig.from_dict({**cfg, "weight_decay": 0.1}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    order = torch.randperm(len(digits_row.x_train), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(order), 256):
        idx = order[i:i + 256]
        loss = digits_row.loss(model(digits_row.x_train[idx]), digits_row.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert weight_stats(model.rnn)["w_hh_norm"] == pytest.approx(
        decayed.weights[-1]["w_hh_norm"], rel=1e-5)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"arch": "transformer"}, r"arch must be one of .*, got arch='transformer'\.$"),
        ({"hidden": 0}, "hidden must be a positive int"),
        ({"lr": -1.0}, "lr must be a positive"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"clip": float("nan")}, "clip must be"),
        ({"weight_decay": -1e-4}, r"weight_decay must be .*, got weight_decay=-0\.0001\.$"),
        ({"weight_decay": float("inf")}, "weight_decay must be"),
        ({"init": "xavier"}, "init must be one of"),
        ({"width": 3}, "Unknown hyperparameters"),
    ],
)
def test_bad_config(params, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(params)


@pytest.mark.parametrize("train", ["run", "population"])
@pytest.mark.parametrize("kwargs, match", [
    ({"le_epochs": [-1]}, r"le_epochs must hold integer epochs >= 0 .*got le_epochs=\[-1\]"),
    ({"le_epochs": [0.5]}, r"le_epochs must hold integer epochs >= 0"),
    ({"probe_size": 0}, r"probe_size must be a positive int .*got probe_size=0"),
    ({"epochs": -2}, r"epochs must be a non-negative int, got epochs=-2"),
])
def test_bad_schedule_names_the_argument(train, kwargs, match):
    from lepredict.population import train_population

    task = tasks.get("digits", mode="row")
    kwargs = {"epochs": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        if train == "run":
            train_run({"hidden": 2}, task, **kwargs)
        else:
            train_population([{"hidden": 2}], task, **kwargs)


def test_cli_spectrum_prints_table(capsys):
    rc = main(["spectrum", "--task", "digits", "--task-option", "mode=row", "--arch", "gru",
               "--hidden", "8", "--epochs", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "lambda_1" in out and "status ok" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2


def test_cli_unknown_task_is_a_clear_error(capsys):
    rc = main(["spectrum", "--task", "nope"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope" in err and "digits" in err


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_weight_stats_of_many_networks_are_each_ones(arch):
    """A population's members get their statistics in one batched call: each as its own, a
    member with a non-finite weight all infinite, the others untouched by it."""
    from lepredict.train import weight_stats_of

    rnns = [SeqModel(8, 10, RunConfig(arch=arch, hidden=12, layers=2, seed=s,
                                      init_scale=0.5 + s)).rnn for s in range(4)]
    with torch.no_grad():
        rnns[1].weight_hh_l1[5, 3] = float("nan")
    many = weight_stats_of(rnns)
    assert set(many[1].values()) == {math.inf}
    for i in (0, 2, 3):
        assert many[i] == pytest.approx(weight_stats(rnns[i]), rel=1e-12)
        # Each gate's N x N block of each layer on its own, one matrix at a time.
        hh = [getattr(rnns[i], f"weight_hh_l{layer}").detach().double() for layer in (0, 1)]
        ih = [getattr(rnns[i], f"weight_ih_l{layer}").detach().double() for layer in (0, 1)]
        blocks = [b for w in hh for b in w.split(12)]
        assert many[i] == pytest.approx({
            "w_hh_radius": max(float(torch.linalg.eigvals(b).abs().max()) for b in blocks),
            "w_hh_opnorm": max(float(torch.linalg.matrix_norm(b, ord=2)) for b in blocks),
            "w_hh_norm": math.sqrt(sum(float(w.square().sum()) for w in hh)),
            "w_ih_norm": math.sqrt(sum(float(w.square().sum()) for w in ih))}, rel=1e-12)


def test_library_calls_name_the_fix_for_what_users_pass():
    """A task by name, a device torch cannot train on here, no epochs to measure, one config
    where a list is wanted: errors that say what to pass. Numpy scalars (a grid built with
    numpy, a row read back from an export) are taken as the numbers they hold."""
    import numpy as np

    from lepredict.population import train_population

    task = lepredict.tasks.get("digits", mode="row")
    with pytest.raises(TypeError, match=r"build it with lepredict.tasks.get\('digits'\)"):
        lepredict.train_run({"arch": "gru", "hidden": 4}, "digits", epochs=1)
    with pytest.raises(ValueError, match="'gpu' is not a device lepredict can train on"):
        lepredict.train_run({"arch": "gru", "hidden": 4}, task, epochs=1, device="gpu")
    with pytest.raises(ValueError, match="le_epochs must be the epochs to measure after"):
        train_population([{"arch": "gru", "hidden": 4}], task, epochs=1, le_epochs=None)
    with pytest.raises(TypeError, match=r"for one, pass \[config\]"):
        train_population({"arch": "gru", "hidden": 4}, task, epochs=1)
    config = lepredict.RunConfig(hidden=np.int64(8), lr=np.float32(0.01), layers=np.int32(1))
    assert type(config.hidden) is int and type(config.lr) is float and config.hidden == 8
