"""The predict-stability and analyze commands: results, and clear errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from lepredict.cli import main

TINY = ["--task", "digits", "--task-option", "mode=row", "--arch", "gru", "--hidden", "8",
        "--lr", "0.01", "--init-scale", "0.5"]


def test_predict_stability_trains_the_budget_and_reports(model_dir, capsys):
    assert main(["predict-stability", *TINY, "--model", str(model_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["p_trainable"] <= 1.0 and out["budget"] == 1
    assert out["trainable"] == (out["p_trainable"] >= out["cutoff"])  # the pruner's cut-off
    low, high = out["final_loss_interval"]
    assert low <= out["final_loss"] <= high
    assert len(out["drivers"]) == 5 and out["train_seconds"] > 0 and out["status"] == "ok"
    assert main(["predict-stability", *TINY, "--model", str(model_dir)]) == 0
    text = capsys.readouterr().out
    assert "P(trainable) =" in text and "10-90%" in text and "what drove it" in text


def test_predict_stability_from_a_spectrum_measured_elsewhere(model_dir, tmp_path, capsys):
    assert main(["spectrum", *TINY, "--epochs", "1", "--json"]) == 0
    record = tmp_path / "record.json"
    record.write_text(capsys.readouterr().out)
    assert main(["predict-stability", "--task", "digits", "--task-option", "mode=row",
                 "--spectrum", str(record), "--model", str(model_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_seconds"] == 0.0 and out["config"]["arch"] == "gru"


@pytest.mark.parametrize("net", [
    # the validation loss over 1000x chance after epoch 1
    ["--arch", "lstm", "--lr", "1000", "--init-scale", "5"],
    # the training loss non-finite within epoch 1, before any validation of it
    ["--arch", "rnn", "--lr", "1e37", "--optimizer", "sgd", "--clip", "0"],
])
def test_predict_stability_says_when_a_run_diverged(model_dir, net, capsys):
    argv = ["predict-stability", "--task", "digits", "--task-option", "mode=row", "--hidden",
            "8", *net, "--model", str(model_dir)]
    assert main(argv) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("P(trainable)")][0]
    assert line.endswith("diverged in epoch 1 of 1)")  # the model's largest budget: 1


def test_predict_stability_with_the_screening_model_reads_the_hyperparameters(capsys):
    """The shipped "screening" predictors read the configuration too: at initialisation (no
    training) the same network with a learning rate of 1 is rated far less likely to train."""
    p = {}
    for lr in ("0.003", "1.0"):
        assert main(["predict-stability", *TINY, "--lr", lr, "--model", "screening",
                     "--budget", "0", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["budget"] == 0 and out["train_seconds"] > 0 and out["config"]["lr"] == float(lr)
        p[lr] = out["p_trainable"]
    assert p["0.003"] > p["1.0"] + 0.1


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "nope"),
    (["--hidden", "0"], "hidden"),
    (["--lr", "-1"], "lr"),
    (["--model", "missing-model"], "No model named 'missing-model'"),
    (["--budget", "7"], "no predictor for budget 7"),
])
def test_predict_stability_bad_input_is_a_clear_error(model_dir, args, message, capsys):
    defaults = {"--task": "digits", "--model": str(model_dir)}
    given = dict(zip(args[::2], args[1::2]))
    argv = ["predict-stability", "--task-option", "mode=row", "--arch", "gru", "--hidden", "8"]
    for key, value in {**defaults, **given}.items():
        argv += [key, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lepredict predict-stability: error:") and message in err


def test_analyze_an_export_writes_the_report(runs, tmp_path, capsys):
    data = tmp_path / "runs.parquet"
    runs.to_parquet(data)
    out = tmp_path / "report.html"
    assert main(["analyze", "--data", str(data), "--model", "none", "-o", str(out)]) == 0
    assert out.is_file() and out.read_text().count('id="figure-') >= 3
    assert main(["analyze"]) == 2
    assert "--study-name" in capsys.readouterr().err


def test_analyze_refuses_a_budget_the_model_has_not(runs, model_dir, tmp_path, capsys):
    data = tmp_path / "runs.parquet"
    runs.to_parquet(data)
    out = tmp_path / "report.html"
    argv = ["analyze", "--data", str(data), "--model", str(model_dir), "-o", str(out)]
    assert main([*argv, "--budget", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lepredict analyze: error: The model has no predictor for budget 7")
    assert "pass --budget with one of those" in err and not out.exists()
