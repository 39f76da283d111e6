"""The predict-stability and analyze commands: results, and clear errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

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
    lines = capsys.readouterr().out.splitlines()
    # the model's largest budget: 1; the headline is the divergence, not a P(trainable) verdict
    assert any(x.startswith("diverged in epoch 1 of 1: not trainable") for x in lines), lines
    assert not any(x.startswith("P(trainable) =") for x in lines)


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


def test_analyze_an_export_writes_the_report(runs, tmp_path, capsys, monkeypatch):
    data = tmp_path / "runs.parquet"
    runs.to_parquet(data)
    out = tmp_path / "report.html"
    assert main(["analyze", "--data", str(data), "--model", "none", "-o", str(out)]) == 0
    assert out.is_file() and out.read_text().count('id="figure-') >= 3
    monkeypatch.chdir(tmp_path)  # without -o: studies/ named after the export
    assert main(["analyze", "--data", str(data), "--model", "none"]) == 0
    assert (tmp_path / "studies" / "runs-report.html").is_file()
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


# -- predict-stability --spectrum: the file's units, divergence, keys, configuration ----------

ROW = ["--task", "digits", "--task-option", "mode=row"]
DIGITS_CHANCE = 2.3025291696767534  # lepredict.tasks.get("digits", mode="row").chance_loss
EPOCHS = {"0": {"mean": [0.1, -0.5], "std": [0.01, 0.02]},
          "1": {"mean": [0.05, -0.6], "std": [0.01, 0.02]}}


def _predict(model_dir, tmp_path, capsys, text: str, *extra) -> tuple[int, str, str]:
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    code = main(["predict-stability", *ROW, "--model", str(model_dir), "--spectrum", str(spec),
                 *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(code: int, err: str, message: str, tmp_path: Path) -> None:
    """The CLI's rule for bad input: exit 2, one line naming the problem, nothing written (the
    test runs in ``tmp_path``)."""
    assert code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("lepredict "), err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


def test_predict_stability_reads_val_loss_in_the_files_chance_loss(model_dir, tmp_path,
                                                                   capsys):
    """Losses already normalised (chance_loss 1.0) predict as those losses in the task's own
    units do; read as raw digits losses (2.3 = chance), 1.0 would look like learning."""
    def p(val_loss, *extra, **keys):
        code, out, err = _predict(model_dir, tmp_path, capsys,
                                  json.dumps({**EPOCHS, "val_loss": val_loss, **keys}),
                                  "--json", *extra)
        assert code == 0, err
        return json.loads(out)

    raw = p([DIGITS_CHANCE, DIGITS_CHANCE])
    normalised = p([1.0, 1.0], chance_loss=1.0)
    assert normalised["chance_loss"] == 1.0 and normalised["chance_loss_from"] == "file"
    assert normalised["p_trainable"] == pytest.approx(raw["p_trainable"])
    assert p([1.0, 1.0])["p_trainable"] != pytest.approx(raw["p_trainable"])  # as digits losses
    given = p([1.0, 1.0], "--chance-loss", "1")
    assert given["chance_loss_from"] == "--chance-loss"
    assert given["p_trainable"] == pytest.approx(raw["p_trainable"])
    # The 1000x-chance divergence rule is in the same units: 1500 is 1500x a chance loss of 1.
    assert p([1.0, 1500.0], chance_loss=1.0)["status"] == "diverged"
    assert p([DIGITS_CHANCE, 1500.0])["status"] == "ok"
    code, out, err = _predict(model_dir, tmp_path, capsys,
                              json.dumps({**EPOCHS, "val_loss": [1.0, 1.0], "chance_loss": 1.0}))
    assert code == 0 and "val_loss divided by the chance loss 1 (the file's \"chance_loss\")" in out
    # Nothing says what network the 2 exponents are of: read as whole, and said so.
    assert "gives no state size (\"n\"), so its 2 exponents are read as whole spectra" in err


@pytest.mark.parametrize("keys, extra, message", [
    ({"chance_loss": 0}, [], "\"chance_loss\" must be a positive finite number"),
    ({"chance_loss": -2.3}, [], "\"chance_loss\" must be a positive finite number"),
    ({"chance_loss": "1.0"}, [], "\"chance_loss\" must be a positive finite number"),
    ({}, ["--chance-loss", "0"], "--chance-loss must be a positive finite number"),
    ({}, ["--chance-loss", "nan"], "--chance-loss must be a positive finite number"),
    ({"chance_loss": 1.0}, ["--chance-loss", "2.3"], "give the losses' scale once"),
])
def test_predict_stability_refuses_a_bad_chance_loss(model_dir, tmp_path, monkeypatch, capsys,
                                                     keys, extra, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _predict(model_dir, tmp_path, capsys,
                            json.dumps({**EPOCHS, "val_loss": [1.0, 1.0], **keys}), *extra)
    _refused(code, err, message, tmp_path)


def test_chance_loss_is_for_spectrum_files_only(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["predict-stability", *TINY, "--model", str(model_dir), "--chance-loss",
                 "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "drop --chance-loss, or add --spectrum" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("val_loss, status, broke", [
    ([2.3, 1e5], None, "in epoch 1"),  # over 1000x chance: lepredict.train's rule
    ([2.3, None], "diverged", "in epoch 1"),  # null: `lepredict spectrum --json`'s inf
    ([2.3, "inf"], "diverged", "in epoch 1"),  # as lepredict.records.jsonable writes it
    ([2.3], "diverged", "in epoch 1"),  # stopped before its epoch 1 was validated
])
def test_a_diverged_run_is_not_trainable_whatever_p(model_dir, tmp_path, capsys, val_loss,
                                                    status, broke):
    keys = {"val_loss": val_loss, **({"status": status} if status else {})}
    epochs = EPOCHS if len(val_loss) > 1 else {"0": EPOCHS["0"]}
    code, out, err = _predict(model_dir, tmp_path, capsys, json.dumps({**epochs, **keys}),
                              "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "diverged" and result["trainable"] is False
    assert result["above_cutoff"] == (result["p_trainable"] >= result["cutoff"])
    code, out, _ = _predict(model_dir, tmp_path, capsys, json.dumps({**epochs, **keys}))
    lines = out.splitlines()
    assert f"diverged {broke} of 1: not trainable" in out
    assert not any(x.startswith("P(trainable) =") for x in lines)
    assert f"({result['p_trainable']:.3f})" in out  # the model's P is still shown


def test_the_verdict_says_which_side_of_the_pruning_cutoff(model_dir, tmp_path, capsys):
    """P at or above the cut-off means "LyapunovPruner keeps it", not "likely to train": the
    cut-offs are a few percent."""
    text = json.dumps({**EPOCHS, "val_loss": [2.3, 1.9]})
    code, out, _ = _predict(model_dir, tmp_path, capsys, text, "--json")
    result = json.loads(out)
    side = "at or above" if result["p_trainable"] >= result["cutoff"] else "below"
    code, out, _ = _predict(model_dir, tmp_path, capsys, text)
    line = [x for x in out.splitlines() if x.startswith("P(trainable) =")][0]
    assert f"({side} the pruning cut-off {result['cutoff']:.3f};" in line
    assert "likely" not in out


SPEC0 = '{"mean": [0.1, -0.5], "std": [0.01, 0.02]}'


@pytest.mark.parametrize("text, message", [
    ('{"00": %s, "0": %s, "1": %s, "val_loss": [2.3, 1.9]}' % (SPEC0, SPEC0, SPEC0),
     "key '00' is not an epoch"),
    ('{"0": %s, "\\u0661": %s, "val_loss": [2.3, 1.9]}' % (SPEC0, SPEC0),
     "key '\u0661' is not an epoch"),
    ('{"0": %s, "-1": %s, "1": %s, "val_loss": [2.3, 1.9]}' % (SPEC0, SPEC0, SPEC0),
     "key '-1' is not an epoch"),
    ('{"0": %s, "1": %s, "1": %s, "val_loss": [2.3, 1.9]}' % (SPEC0, SPEC0, SPEC0),
     "the key '1' is given twice"),
    ('{"spectra": {"0": %s, "01": %s}, "val_loss": [2.3, 1.9]}' % (SPEC0, SPEC0),
     "key '01' is not an epoch"),
    ('{"0": %s, "1": %s, "val_loss": [2.3, -1.9]}' % (SPEC0, SPEC0),
     "val_loss[1] is -1.9, and a loss is never negative"),
    ('{"0": %s, "1": %s, "val_loss": [2.3, "-inf"], "status": "diverged"}' % (SPEC0, SPEC0),
     "val_loss[1] is -inf, and a loss is never negative"),
    ('{"0": %s, "1": %s, "val_loss": [2.3, "1.9"]}' % (SPEC0, SPEC0),
     "val_loss[1] is '1.9'"),
    # a record of another task: its losses are not in --task's units
    ('{"task": {"name": "adding"}, "0": %s, "1": %s, "val_loss": [0.2, 0.1]}' % (SPEC0, SPEC0),
     "the record is of task 'adding', read here as --task 'digits'"),
])
def test_predict_stability_refuses_bad_keys_and_losses(model_dir, tmp_path, monkeypatch, capsys,
                                                       text, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _predict(model_dir, tmp_path, capsys, text)
    _refused(code, err, message, tmp_path)


def test_predict_stability_shows_only_a_configuration_it_was_given(model_dir, tmp_path,
                                                                   capsys):
    """No made-up "LSTM N=32" for spectra from elsewhere: the file's configuration, or none
    for a model of spectra and losses; a model of hyperparameters says what it assumed."""
    bare = json.dumps({**EPOCHS, "val_loss": [2.3, 1.9]})
    code, out, _ = _predict(model_dir, tmp_path, capsys, bare)
    assert code == 0 and "N=32" not in out and "LSTM" not in out
    code, out, _ = _predict(model_dir, tmp_path, capsys, bare, "--json")
    assert json.loads(out)["config"] is None
    config = {"arch": "gru", "hidden": 2, "lr": 0.01}  # a state of 2, as EPOCHS has
    code, out, _ = _predict(model_dir, tmp_path, capsys,
                            json.dumps({**EPOCHS, "val_loss": [2.3, 1.9], "config": config}))
    assert code == 0 and "GRU N=2 x 1 layer(s), lr 0.01" in out and "(the file's \"config\")" in out
    screening = json.dumps({"0": {"mean": [0.1] + [-0.1] * 15, "std": [0.01] * 16},
                            "val_loss": [2.3]})
    code, out, err = _predict("screening", tmp_path, capsys, screening, "--budget", "0")
    assert code == 0, err
    line = [x for x in out.splitlines() if x.startswith("hyperparameters assumed:")][0]
    assert "arch=lstm hidden=32" in line and "--config FILE" in line
    code, out, _ = _predict("screening", tmp_path, capsys, screening, "--budget", "0", "--json")
    assert json.loads(out)["config_from"] == "options"


# -- analyze --data: exports edited by hand ----------------------------------------------------

HEADER = "number,study,state,status,value,chance_loss,final_normalised_loss,steps,values,val_loss"
ROW_OK = '0,mine,COMPLETE,ok,0.8,2.0,0.4,"[0, 1]","[1.6, 0.8]","[1.6, 0.8]"'


def _csv(*rows, header=HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


@pytest.mark.parametrize("text, message", [
    (_csv("mine,COMPLETE,ok,0.5,\"[1.0, 0.8]\"",
          header="study,state,status,final_normalised_loss,val_loss"),
     "lacks the column(s) number, value: `lepredict analyze --data` needs number, state and "
     "value"),
    (_csv(ROW_OK, ROW_OK.replace('"[1.6, 0.8]"', "hello")),
     "data row 2, column values: \"hello\" is not a JSON list"),
    (_csv(ROW_OK.replace(',"[0, 1]"', ',"[""a"", ""b""]"')),
     "data row 1, column steps: [\"a\", \"b\"] is not a JSON list of the steps reported"),
    (_csv(ROW_OK.replace("0,mine", "x,mine")),
     "data row 1, column number: \"x\" is not a trial number"),
    (_csv(ROW_OK.replace("COMPLETE", "DONE")),
     "data row 1, column state: \"DONE\" is not a trial state"),
    (_csv(ROW_OK.replace(",0.4,", ",abc,")),
     "data row 1, column final_normalised_loss: \"abc\" is not a number"),
    (_csv(ROW_OK.replace(",2.0,", ",0,")),
     "data row 1, column chance_loss: 0 is no chance loss"),
    (_csv(ROW_OK + ",[1.0, 2",
          header=HEADER + ",le1_mean").replace(",[1.0, 2", ',"[1.0, 2"'),
     "data row 1, column le1_mean: \"[1.0, 2\" is not a JSON list"),
    (_csv(ROW_OK + ",sideways", header=HEADER + ",direction"),
     "data row 1, column direction: \"sideways\" is not a direction"),
    (_csv(ROW_OK.replace("mine", "m\xe9")).encode("latin-1"),
     "is not UTF-8 text (byte 0xe9"),
])
def test_analyze_names_the_file_row_column_and_fix(tmp_path, monkeypatch, capsys, text,
                                                    message):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "mine.csv"
    data.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["analyze", "--data", "mine.csv", "--model", "none", "-o", "r.html"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("lepredict analyze: error: --data 'mine.csv'") and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.csv"]


def test_analyze_works_once_the_columns_it_names_are_added(tmp_path, monkeypatch, capsys):
    """The columns the error lists are all it needs: adding them (and nothing else) works."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.csv").write_text(_csv('mine,COMPLETE,ok,0.5,"[1.0, 0.8]"',
                                            'mine,COMPLETE,ok,0.9,"[1.0, 0.95]"',
                                            header="study,state,status,final_normalised_loss,"
                                            "val_loss"))
    argv = ["analyze", "--data", "mine.csv", "--model", "none", "-o", "r.html"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    named = err.split("lacks the column(s) ", 1)[1].split(":", 1)[0].split(", ")
    assert named == ["number", "value"]
    (tmp_path / "mine.csv").write_text(_csv('mine,COMPLETE,ok,0.5,"[1.0, 0.8]",0,0.8',
                                            'mine,COMPLETE,ok,0.9,"[1.0, 0.95]",1,0.95',
                                            header="study,state,status,final_normalised_loss,"
                                            "val_loss,number,value"))
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "r.html").is_file() and "wrote r.html" in capsys.readouterr().out


def test_a_partial_config_in_a_spectrum_file_is_completed_by_the_options_given(model_dir,
                                                                              tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    """A file's "config" that names the network alone: the learning rate, optimiser and batch
    size given as options complete it (not their defaults, silently), the defaults it still
    takes are named in a note, and an option against a value the file gives is refused."""
    monkeypatch.chdir(tmp_path)
    spec = {"mean": [0.1 - 0.05 * i for i in range(32)], "std": [0.0] * 32}
    text = json.dumps({"0": spec, "1": spec, "val_loss": [2.3, 1.0],
                       "config": {"arch": "gru", "hidden": 32, "layers": 1}})
    code, out, err = _predict(model_dir, tmp_path, capsys, text, "--lr", "0.4", "--optimizer",
                              "sgd", "--batch-size", "40", "--budget", "1", "--json")
    assert code == 0, err
    config = json.loads(out)["config"]
    assert (config["lr"], config["optimizer"], config["batch_size"]) == (0.4, "sgd", 40)
    assert config["arch"] == "gru" and config["hidden"] == 32
    assert 'note: the "config" of --spectrum' in err and "gives no init, init_scale, clip, " \
        "weight_decay: read as init=uniform" in err
    assert "give them in the file or as --init, --init-scale, --clip, --weight-decay." in err
    code, _, err = _predict(model_dir, tmp_path, capsys, text, "--hidden", "64")
    _refused(code, err, "says hidden=32, but --hidden 64 was given, and the file's value is the "
                        "one read; drop --hidden", tmp_path)
    # A bad value in the file is the one line said, not after a note about what it lacks.
    bad = json.dumps({"0": spec, "1": spec, "val_loss": [2.3, 1.0],
                      "config": {"arch": "GRU", "hidden": 32}})
    code, _, err = _predict(model_dir, tmp_path, capsys, bad, "--budget", "1")
    _refused(code, err, "arch must be one of", tmp_path)


def test_a_spectrum_file_shorter_than_the_networks_state_is_refused(model_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """Exponents without "n" are a whole spectrum: 8 of them said to be a GRU-32's are its
    leading ones, refused (read as whole they predict another network); with "n" they are
    leading exponents, and fewer than the predictor reads are one line, not a traceback."""
    monkeypatch.chdir(tmp_path)
    mean = [0.1 - 0.05 * i for i in range(32)]

    def spectra(k, **extra):
        spec = {"mean": mean[:k], "std": [0.0] * k, **extra}
        return json.dumps({"0": spec, "1": spec, "val_loss": [2.3, 1.0]})

    shape = ("--arch", "gru", "--hidden", "32", "--budget", "1")
    code, _, err = _predict(model_dir, tmp_path, capsys, spectra(8), *shape)
    _refused(code, err, "epoch 0 holds 8 exponents, but a GRU of 32 units x 1 (the default "
                        "--layers) layer(s) has a state of 32: give all 32, or with the leading "
                        "ones the state size as \"n\": 32", tmp_path)
    # Named by --layers alone, the rest is the options' defaults, said as such.
    code, _, err = _predict(model_dir, tmp_path, capsys, spectra(8), "--layers", "2")
    _refused(code, err, "but an LSTM (the default --arch) of 32 (the default --hidden) units x 2 "
                        "layer(s) has a state of 128", tmp_path)
    for text, extra in ((spectra(32), shape), (spectra(8), ("--budget", "1"))):
        assert _predict(model_dir, tmp_path, capsys, text, *extra)[0] == 0
    code, _, err = _predict("default", tmp_path, capsys, spectra(8, n=32), *shape)
    _refused(code, err, "8 exponents of a state of size 32, but the predictor uses the leading "
                        "16", tmp_path)
    # A state size ("n") of another network than the options name: refused, not read as this
    # one's (the state size and the mean of all exponents would describe another network).
    code, _, err = _predict(model_dir, tmp_path, capsys, spectra(32, n=64), *shape)
    _refused(code, err, "epoch 0's spectrum is of a state of 64 (its \"n\"), but a GRU of 32 "
                        "units x 1 (the default --layers) layer(s) has a state of 32", tmp_path)
