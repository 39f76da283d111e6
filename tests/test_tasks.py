"""Tests for lepredict.tasks: registry, determinism, data layout, chance losses and the losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lepredict import tasks
from lepredict.tasks import Task

BUILTIN = ["adding", "charlm", "copy", "digits", "lorenz", "narma", "parity", "sines"]

# Small versions keep the parametrised tests fast; the defaults are covered by `default_tasks`.
SMALL = {
    "adding": {"n_train": 200, "n_val": 50},
    "charlm": {"n_train": 200, "n_val": 50},
    "copy": {"n_train": 200, "n_val": 50},
    "digits": {},
    "lorenz": {"n_train": 100, "n_val": 20, "burn_in": 300},
    "narma": {"n_train": 200, "n_val": 50},
    "parity": {"n_train": 200, "n_val": 50},
    "sines": {"n_train": 200, "n_val": 50},
}


@pytest.fixture(scope="module")
def default_tasks() -> dict[str, Task]:
    return {name: tasks.get(name) for name in BUILTIN}


@pytest.fixture
def clean_registry(monkeypatch):
    """Let a test register tasks without leaking them into other tests."""
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))


def _tiny_task(seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    return Task(
        name="tiny",
        x_train=torch.rand(4, 3, 2, generator=g),
        y_train=torch.rand(4, 1, generator=g),
        x_val=torch.rand(2, 3, 2, generator=g),
        y_val=torch.rand(2, 1, generator=g),
        input_size=2,
        output_size=1,
        kind="regression",
        chance_loss=1.0,
        threshold=0.5,
        options={"seed": seed},
        scored_steps=1,
    )


def _place(task: Task, outputs: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Write `scored` (laid out like the targets) into the scored steps of `outputs`."""
    steps = task.scored_steps or outputs.shape[1]
    outputs[:, -steps:] = scored.reshape(outputs.shape[0], steps, -1)
    return outputs


# ---------------------------------------------------------------------------- registry


def test_available_lists_builtins_sorted():
    names = tasks.available()
    assert set(BUILTIN) <= set(names)
    assert names == sorted(names)


def test_unknown_task_message_lists_names_and_how_to_register():
    with pytest.raises(ValueError) as info:
        tasks.get("no-such-task")
    message = str(info.value)
    assert "no-such-task" in message
    for name in BUILTIN:
        assert name in message
    assert "register" in message


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="'colour'") as info:
        tasks.get("digits", colour="red")
    assert "mode" in str(info.value)  # lists the valid options


@pytest.mark.parametrize(
    ("name", "options", "error", "word"),
    [
        ("digits", {"mode": "column"}, ValueError, "mode"),
        ("digits", {"val_fraction": 1.5}, ValueError, "val_fraction"),
        ("adding", {"seq_len": 1}, ValueError, "seq_len"),
        ("adding", {"seq_len": 50.0}, TypeError, "seq_len"),
        ("copy", {"n_symbols": True}, TypeError, "n_symbols"),
        ("charlm", {"n_train": 10**7}, ValueError, "n_train"),
        ("lorenz", {"seed": -1}, ValueError, "seed"),
        ("lorenz", {"dt": 0.5}, ValueError, "dt"),
        ("narma", {"order": 11}, ValueError, "order"),
        ("narma", {"order": 0}, ValueError, "order"),
        ("narma", {"seq_len": 0}, ValueError, "seq_len"),
        ("parity", {"n_bits": 5, "seq_len": 4}, ValueError, "n_bits"),
        ("parity", {"n_bits": 0}, ValueError, "n_bits"),
        ("parity", {"n_val": 2.0}, TypeError, "n_val"),
        ("sines", {"noise": -0.1}, ValueError, "noise"),
        ("sines", {"noise": float("nan")}, ValueError, "noise"),
        ("sines", {"noise": "loud"}, TypeError, "noise"),
        ("sines", {"n_classes": 1}, ValueError, "n_classes"),
        ("sines", {"n_classes": 20, "seq_len": 24}, ValueError, "n_classes"),
    ],
)
def test_bad_option_values_are_named(name, options, error, word):
    with pytest.raises(error, match=word):
        tasks.get(name, **options)


def test_register_custom_task(clean_registry):
    tasks.register("tiny", _tiny_task)
    assert "tiny" in tasks.available()
    task = tasks.get("tiny", seed=3)
    assert isinstance(task, Task)
    assert task.options == {"seed": 3}
    assert torch.equal(task.x_train, _tiny_task(3).x_train)


def test_duplicate_registration_refused_unless_overwrite(clean_registry):
    tasks.register("tiny", _tiny_task)
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("tiny", lambda seed=0: _tiny_task(seed + 1))
    assert torch.equal(tasks.get("tiny").x_train, _tiny_task(0).x_train)
    tasks.register("tiny", lambda seed=0: _tiny_task(seed + 1), overwrite=True)
    assert torch.equal(tasks.get("tiny").x_train, _tiny_task(1).x_train)
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("digits", _tiny_task)


def test_register_rejects_non_callables_and_get_rejects_non_tasks(clean_registry):
    with pytest.raises(TypeError):
        tasks.register("bad", 42)
    tasks.register("bad", lambda: "not a task")
    with pytest.raises(TypeError, match="Task"):
        tasks.get("bad")


def test_task_validates_its_fields():
    good = _tiny_task()
    fields = {f: getattr(good, f) for f in Task.__dataclass_fields__}
    with pytest.raises(ValueError, match="kind"):
        Task(**{**fields, "kind": "ranking"})
    with pytest.raises(ValueError, match="chance_loss"):
        Task(**{**fields, "chance_loss": 0.0})
    with pytest.raises(ValueError, match="x_train"):
        Task(**{**fields, "x_train": good.x_train.double()})
    with pytest.raises(ValueError, match="y_train"):
        Task(**{**fields, "y_train": good.y_train.long()})


# ---------------------------------------------------------------------------- layout


EXPECTED_LAYOUT = {
    # name: (T, input_size, output_size, kind, y_train shape after n)
    "adding": (50, 2, 1, "regression", (1,)),
    "charlm": (50, 58, 58, "classification", (50,)),
    "copy": (30, 10, 8, "classification", (5,)),
    "digits": (64, 1, 10, "classification", ()),
    "lorenz": (50, 3, 3, "regression", (50, 3)),
    "narma": (50, 1, 1, "regression", (50, 1)),
    "parity": (50, 2, 2, "classification", ()),
    "sines": (50, 1, 4, "classification", ()),
}


@pytest.mark.parametrize("name", BUILTIN)
def test_default_shapes_and_dtypes(default_tasks, name):
    task = default_tasks[name]
    seq_len, input_size, output_size, kind, y_tail = EXPECTED_LAYOUT[name]
    assert task.name == name
    assert (task.input_size, task.output_size, task.kind) == (input_size, output_size, kind)
    assert task.seq_len == seq_len
    y_dtype = torch.long if kind == "classification" else torch.float32
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        assert x.dtype == torch.float32
        assert x.shape[1:] == (seq_len, input_size)
        assert y.dtype == y_dtype
        assert tuple(y.shape) == (x.shape[0], *y_tail)
        assert torch.isfinite(x).all()
    if kind == "classification":
        for y in (task.y_train, task.y_val):
            assert 0 <= int(y.min()) and int(y.max()) < output_size
    if name != "digits":
        assert task.x_train.shape[0] == 2000 and task.x_val.shape[0] == 400
    assert 0.0 < task.threshold < 1.0
    assert task.options["seed"] == 0


def test_digits_modes_hold_the_same_images():
    pixel = tasks.get("digits", mode="pixel", seed=2)
    row = tasks.get("digits", mode="row", seed=2)
    assert row.x_train.shape[1:] == (8, 8) and row.input_size == 8
    assert torch.equal(pixel.x_train.reshape(-1, 8, 8), row.x_train)
    assert torch.equal(pixel.y_val, row.y_val)
    assert 0.0 <= float(pixel.x_train.min()) and float(pixel.x_train.max()) == 1.0
    assert pixel.x_train.shape[0] + pixel.x_val.shape[0] == 1797


def test_digits_matches_sklearn_and_is_stratified():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    task = tasks.get("digits")
    x = torch.cat([task.x_train, task.x_val]).reshape(-1, 64).double() * 16
    y = torch.cat([task.y_train, task.y_val])
    # Same multiset of (image, label) pairs as load_digits.
    ours = sorted(map(tuple, torch.cat([x, y[:, None].double()], 1).tolist()))
    theirs = sorted(map(tuple, np.c_[bunch.data, bunch.target].tolist()))
    assert ours == theirs
    val_share = torch.bincount(task.y_val, minlength=10) / torch.bincount(y, minlength=10)
    assert torch.allclose(val_share, torch.full((10,), 0.2, dtype=val_share.dtype), atol=0.02)


@pytest.mark.parametrize("name", BUILTIN)
def test_options_are_recorded_with_defaults(name):
    task = tasks.get(name, seed=1, **SMALL[name])
    assert task.options["seed"] == 1
    for key, value in SMALL[name].items():
        assert task.options[key] == value
    rebuilt = tasks.get(name, **task.options)
    assert torch.equal(rebuilt.x_val, task.x_val)


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", BUILTIN)
def test_same_seed_same_data_different_seed_differs(name):
    a = tasks.get(name, seed=5, **SMALL[name])
    b = tasks.get(name, seed=5, **SMALL[name])
    c = tasks.get(name, seed=6, **SMALL[name])
    for attr in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, attr), getattr(b, attr)), attr
    assert a.chance_loss == b.chance_loss
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_val, c.x_val)


@pytest.mark.parametrize("name", ["adding", "copy", "lorenz", "narma", "parity", "sines"])
def test_validation_set_does_not_depend_on_n_train(name):
    a = tasks.get(name, **SMALL[name])
    b = tasks.get(name, **{**SMALL[name], "n_train": SMALL[name]["n_train"] + 7})
    if name == "lorenz":
        # Standardisation uses train statistics, so the two agree up to an affine map per
        # coordinate, which standardising each with its own validation statistics removes.
        def own(x):
            return (x - x.mean((0, 1))) / x.std((0, 1))

        assert torch.allclose(own(a.x_val), own(b.x_val), atol=1e-4)
        assert not torch.allclose(a.x_val, b.x_val, atol=1e-4)
    else:
        assert torch.equal(a.x_val, b.x_val)
    assert b.x_train.shape[0] == a.x_train.shape[0] + 7


# ---------------------------------------------------------------------------- task contents


def test_charlm_split_by_position_without_overlap(default_tasks):
    task = default_tasks["charlm"]
    text = tasks._charlm_corpus()
    opts = task.options
    train_starts, val_starts, split = tasks._charlm_starts(
        len(text), opts["seq_len"], opts["val_fraction"], opts["n_train"], opts["n_val"], 0
    )
    width = opts["seq_len"] + 1
    assert split == int(len(text) * 0.9)
    assert train_starts.max() + width <= split <= val_starts.min()
    # The tensors are exactly those windows of the text.
    offsets = np.arange(opts["seq_len"])
    train_chars = torch.from_numpy(text[train_starts[:, None] + offsets])
    assert torch.equal(task.x_train.argmax(-1), train_chars)
    assert torch.equal(task.y_val, torch.from_numpy(text[val_starts[:, None] + offsets + 1]))
    # Windows are disjoint, so no character position is used twice.
    covered = (np.concatenate([train_starts, val_starts])[:, None] + np.arange(width)).ravel()
    assert len(np.unique(covered)) == len(covered)


def test_charlm_targets_are_next_characters(default_tasks):
    task = default_tasks["charlm"]
    assert 30 <= task.output_size <= 70
    assert torch.equal(task.x_train.sum(-1), torch.ones(task.x_train.shape[:2]))
    assert torch.equal(task.y_train[:, :-1], task.x_train[:, 1:].argmax(-1))
    # Mostly letters and spaces: the text really is English, not "other" symbols.
    other = len(tasks.CHARLM_VOCAB)
    assert (task.y_train == other).float().mean() < 0.02
    assert (task.y_train == tasks.CHARLM_VOCAB.index(" ")).float().mean() > 0.1


def test_adding_targets_are_sums_of_marked_values(default_tasks):
    task = default_tasks["adding"]
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        values, markers = x[..., 0], x[..., 1]
        assert torch.equal(markers.sum(1), torch.full((x.shape[0],), 2.0))
        assert torch.equal(markers[:, :25].sum(1), torch.ones(x.shape[0]))  # one per half
        assert ((values >= 0) & (values < 1)).all()
        assert torch.allclose(y[:, 0], (values * markers).sum(1), atol=1e-6)


def test_copy_targets_are_the_symbols_shown(default_tasks):
    task = default_tasks["copy"]
    n_symbols, copy_len, delay = 8, 5, 20
    blank, delimiter = n_symbols, n_symbols + 1
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        assert torch.equal(x.sum(-1), torch.ones(x.shape[:2]))
        tokens = x.argmax(-1)
        assert torch.equal(tokens[:, :copy_len], y)
        assert (tokens[:, copy_len + delay - 1] == delimiter).all()
        rest = torch.cat([tokens[:, copy_len : copy_len + delay - 1], tokens[:, -copy_len:]], 1)
        assert (rest == blank).all()
    assert task.scored_steps == copy_len


def test_copy_options_change_the_layout():
    task = tasks.get("copy", seq_len=7, n_symbols=3, copy_len=2, n_train=30, n_val=10)
    assert task.x_train.shape == (30, 2 + 7 + 2, 5)
    assert task.y_val.shape == (10, 2) and task.output_size == 3
    assert int(task.y_train.max()) <= 2


def _lorenz_rk4(state: np.ndarray, dt: float) -> np.ndarray:
    """An independent RK4 step of Lorenz-63 (sigma=10, rho=28, beta=8/3)."""

    def field(s):
        x, y, z = s[..., 0], s[..., 1], s[..., 2]
        return np.stack([10 * (y - x), x * (28 - z) - y, x * y - 8 / 3 * z], -1)

    k1 = field(state)
    k2 = field(state + dt / 2 * k1)
    k3 = field(state + dt / 2 * k2)
    k4 = field(state + dt * k3)
    return state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def test_lorenz_is_standardised_shifted_and_follows_the_dynamics():
    options = {
        "seq_len": 20,
        "n_train": 300,
        "n_val": 60,
        "subsample": 10,
        "dt": 0.01,
        "burn_in": 1000,
        "seed": 4,
    }
    task = tasks.get("lorenz", **options)
    assert torch.equal(task.y_train[:, :-1], task.x_train[:, 1:])
    assert torch.equal(task.y_val[:, :-1], task.x_val[:, 1:])
    mean = task.x_train.double().mean((0, 1))
    std = task.x_train.double().std((0, 1))
    assert torch.allclose(mean, torch.zeros(3, dtype=mean.dtype), atol=1e-4)
    assert torch.allclose(std, torch.ones(3, dtype=std.dtype), atol=1e-2)

    raw = tasks._lorenz_paths(**options)
    # The tensors are the raw states standardised with the training inputs' statistics.
    train_inputs = raw[:300, :-1].reshape(-1, 3)
    standardised = (raw - train_inputs.mean(0)) / train_inputs.std(0)
    assert np.allclose(task.x_val.numpy(), standardised[300:, :-1], atol=1e-5)
    assert np.allclose(task.y_train.numpy(), standardised[:300, 1:], atol=1e-5)
    # An independent integrator carries each recorded state to the next one.
    state = raw[:, :-1]
    for _ in range(10):
        state = _lorenz_rk4(state, 0.01)
    assert np.allclose(state, raw[:, 1:], rtol=1e-9, atol=1e-9)
    # Burnt in onto the attractor: the z coordinate oscillates around rho - 1 = 27 ...
    assert 18 < raw[..., 2].mean() < 30
    assert np.abs(raw).max() < 60
    # ... and each sequence starts from its own initial condition.
    assert len(np.unique(raw[:, 0].round(6), axis=0)) == len(raw)


def _narma_by_hand(u: np.ndarray, order: int) -> np.ndarray:
    """NARMA-n of one input sequence, step by step from rest: y[t] is y_{t+1}."""
    y = [0.0]  # y_0
    for t in range(len(u)):
        recent = sum(y[max(0, t - order + 1):t + 1])
        delayed = u[t - order + 1] if t - order + 1 >= 0 else 0.0
        y.append(0.3 * y[t] + 0.05 * y[t] * recent + 1.5 * delayed * u[t] + 0.1)
    return np.array(y[1:])


@pytest.mark.parametrize("order", [10, 3])
def test_narma_follows_the_recurrence_from_rest(order):
    task = tasks.get("narma", seq_len=30, n_train=60, n_val=20, order=order, seed=2)
    assert task.scored_steps is None and task.y_train.shape == (60, 30, 1)
    u_train = task.x_train[..., 0].double().numpy() * 0.5 / math.sqrt(12) + 0.25
    u_val = task.x_val[..., 0].double().numpy() * 0.5 / math.sqrt(12) + 0.25
    assert u_train.min() >= -1e-6 and u_train.max() <= 0.5 + 1e-6
    y_train = np.stack([_narma_by_hand(row, order) for row in u_train])
    y_val = np.stack([_narma_by_hand(row, order) for row in u_val])
    # Targets standardised with the training targets' statistics.
    mean, std = y_train.mean(), y_train.std()
    assert np.allclose(task.y_train[..., 0].numpy(), (y_train - mean) / std, atol=1e-4)
    assert np.allclose(task.y_val[..., 0].numpy(), (y_val - mean) / std, atol=1e-4)
    assert task.chance_loss == pytest.approx(1.0, abs=0.15)


def test_narma_redraws_escaping_sequences(monkeypatch):
    # A tight bound makes many sequences "escape": they are drawn again until all fit.
    monkeypatch.setattr(tasks, "NARMA_BOUND", 0.6)
    task = tasks.get("narma", seq_len=40, n_train=300, n_val=50)
    u = task.x_train[..., 0].double().numpy() * 0.5 / math.sqrt(12) + 0.25
    raw = np.stack([_narma_by_hand(row, 10) for row in u])
    assert raw.max() <= 0.6 and raw.max() > 0.5
    monkeypatch.setattr(tasks, "NARMA_BOUND", 0.12)  # y_2 >= 0.13: every sequence escapes
    with pytest.raises(ValueError, match="escaping"):
        tasks.get("narma", seq_len=5, n_train=10, n_val=5)


def test_parity_labels_are_the_parity_of_the_marked_bits():
    task = tasks.get("parity", seq_len=12, n_bits=3, n_train=300, n_val=50, seed=1)
    assert task.scored_steps == 1 and task.output_size == 2
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        bits, markers = x[..., 0], x[..., 1]
        assert set(bits.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(markers.sum(1), torch.full((x.shape[0],), 3.0))
        for lo, hi in ((0, 4), (4, 8), (8, 12)):  # one mark in each third
            assert torch.equal(markers[:, lo:hi].sum(1), torch.ones(x.shape[0]))
        ones = ((bits > 0) & (markers > 0)).sum(1)
        assert torch.equal(y, ones % 2)
    assert 0.35 < float(task.y_train.float().mean()) < 0.65
    assert task.chance_loss == pytest.approx(math.log(2), abs=0.01)


def test_sines_classes_are_frequencies():
    task = tasks.get("sines", seq_len=32, n_classes=4, noise=0.0, n_train=200, n_val=40)
    assert task.scored_steps == 1 and task.output_size == 4 and task.input_size == 1
    freqs = np.linspace(*tasks.SINES_BAND, 4)
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        s = x[..., 0].double().numpy()
        # A pure sinusoid obeys s[t+1] + s[t-1] = 2 cos(2 pi f) s[t]: fit cos(2 pi f) per row.
        c = ((s[:, 2:] + s[:, :-2]) * s[:, 1:-1]).sum(1) / (2 * (s[:, 1:-1] ** 2).sum(1))
        f = np.arccos(np.clip(c, -1, 1)) / (2 * np.pi)
        assert np.allclose(f, freqs[y.numpy()], atol=1e-4)
        assert np.abs(s).max() <= 1.0 + 1e-6
    assert set(task.y_train.tolist()) == {0, 1, 2, 3}
    noisy = tasks.get("sines", seq_len=32, noise=0.5, n_train=200, n_val=40)
    assert torch.equal(noisy.y_train, task.y_train)  # the noise changes the inputs only
    residual = (noisy.x_train - task.x_train).std()
    assert float(residual) == pytest.approx(0.5, rel=0.05)


# ---------------------------------------------------------------------------- chance and losses


@pytest.mark.parametrize("name", BUILTIN)
def test_chance_loss_positive(default_tasks, name):
    task = default_tasks[name]
    assert math.isfinite(task.chance_loss) and task.chance_loss > 0
    assert task.normalised_loss(task.chance_loss) == pytest.approx(1.0)
    assert task.normalised_loss(0.5 * task.chance_loss) == pytest.approx(0.5)


def test_digits_chance_loss_matches_direct_computation(default_tasks):
    task = default_tasks["digits"]
    counts = np.bincount(task.y_train.numpy(), minlength=10) + 1.0  # add-one smoothing
    p = counts / counts.sum()
    direct = -np.mean(np.log(p[task.y_val.numpy()]))
    assert task.chance_loss == pytest.approx(direct, rel=1e-9)
    assert task.chance_loss == pytest.approx(math.log(10), abs=0.01)


def test_known_chance_levels(default_tasks):
    adding = default_tasks["adding"]
    direct = float(((adding.y_val - adding.y_train.mean()) ** 2).mean())
    assert adding.chance_loss == pytest.approx(direct, rel=1e-5)
    assert adding.chance_loss == pytest.approx(1 / 6, rel=0.15)
    assert default_tasks["copy"].chance_loss == pytest.approx(math.log(8), abs=0.03)
    assert default_tasks["lorenz"].chance_loss == pytest.approx(1.0, abs=0.1)
    assert default_tasks["narma"].chance_loss == pytest.approx(1.0, abs=0.1)
    assert default_tasks["parity"].chance_loss == pytest.approx(math.log(2), abs=0.01)
    assert default_tasks["sines"].chance_loss == pytest.approx(math.log(4), abs=0.03)
    # Unigram entropy of English-ish text in nats: well above 0, well below log(vocab).
    charlm = default_tasks["charlm"]
    assert 2.0 < charlm.chance_loss < math.log(charlm.output_size) - 0.3


def test_chance_loss_of_one_hot_targets():
    """One-hot float rows are regression targets unless said otherwise, with a warning (a
    cross-entropy takes them too, and its chance loss is 25 times theirs here); with
    kind='classification' they are the classes they mark."""
    import warnings

    from lepredict import chance_loss

    labels = torch.arange(400) % 10
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    with pytest.warns(UserWarning, match="one-hot rows of 10 classes.*kind='classification'"):
        assert chance_loss(one_hot) == pytest.approx(0.09)
    assert chance_loss(one_hot, kind="classification") == pytest.approx(chance_loss(labels))
    assert chance_loss(labels) == pytest.approx(math.log(10), abs=1e-3)
    # Integer one-hot rows are classes whatever is said (their 0s and 1s are no labels).
    as_ints = torch.nn.functional.one_hot(labels, 10)
    assert chance_loss(as_ints) == chance_loss(as_ints, kind="classification") \
        == pytest.approx(chance_loss(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other float targets: no word
        chance_loss(torch.rand(50, 3))
        chance_loss(one_hot * 0.5)


def test_chance_loss_of_binary_float_targets():
    """Float 0/1 targets (what BCEWithLogitsLoss takes) are regression targets unless said
    otherwise, with a warning; with kind='classification' the chance loss is the binary
    cross-entropy of the best constant: BCEWithLogitsLoss of the training frequencies' logits,
    one column or several labels (averaged over labels, as that loss does)."""
    from lepredict import chance_loss

    rate = torch.tensor([0.1, 0.5, 0.8])
    labels = (torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) < rate).float()
    with pytest.warns(UserWarning, match="floats of 0 and 1.*BCEWithLogitsLoss.*kind='class"):
        assert chance_loss(labels[:, 0]) == pytest.approx(float(labels[:, 0].var(
            correction=0)), rel=1e-6)
    for y in (labels[:, :1], labels[:, 0], labels):
        p = y.reshape(-1, y.shape[-1] if y.dim() > 1 else 1).mean(0)
        constant = torch.logit(p).expand(y.reshape(len(y), -1).shape)
        bce = float(torch.nn.functional.binary_cross_entropy_with_logits(
            constant, y.reshape(len(y), -1)))
        assert chance_loss(y, kind="classification") == pytest.approx(bce, rel=1e-3)
        # Bools are labels too, whatever the kind; integers stay class indices (pooled).
        assert chance_loss(y.bool().numpy()) == pytest.approx(bce, rel=1e-3)
    pooled = chance_loss(labels.long(), kind="classification")
    assert pooled == pytest.approx(chance_loss(labels.long().reshape(-1)))
    assert pooled != pytest.approx(chance_loss(labels, kind="classification"), rel=1e-2)
    # Validation targets of other outputs are refused, not cut to the shorter rows.
    with pytest.raises(ValueError, match=r"y_train has 3 labels a row .* y_val's rows differ"):
        chance_loss(labels, labels[:, :2], kind="classification")
    with pytest.raises(ValueError, match=r"y_train has 3 outputs a row"):
        chance_loss(torch.randn(8, 3), torch.randn(6, 2))
    # One output takes any layout of its values: (N, T, 1) against (M, T), (N,) against (M, 1).
    y_train, y_val = torch.randn(8, 5, 1), torch.randn(6, 5, 1)
    for val in (y_val, y_val[..., 0], y_val.reshape(-1)):
        assert chance_loss(y_train, val) == pytest.approx(chance_loss(y_train, y_val))
    assert chance_loss(y_train[..., 0].reshape(-1), y_val) == pytest.approx(
        chance_loss(y_train, y_val))


@pytest.mark.parametrize("name", BUILTIN)
def test_best_constant_prediction_scores_chance(default_tasks, name):
    task = default_tasks[name]
    n, steps = task.y_val.shape[0], task.seq_len
    if task.kind == "classification":
        counts = torch.bincount(task.y_train.reshape(-1), minlength=task.output_size) + 1.0
        constant = torch.log(counts / counts.sum())
    else:
        constant = task.y_train.reshape(-1, task.output_size).mean(0)
    outputs = constant.float().expand(n, steps, task.output_size).clone()
    assert float(task.loss(outputs, task.y_val)) == pytest.approx(task.chance_loss, rel=1e-4)


@pytest.mark.parametrize("name", BUILTIN)
def test_perfect_prediction_beats_chance(default_tasks, name):
    task = default_tasks[name]
    n, steps = task.y_val.shape[0], task.seq_len
    # Noise at the unscored steps must not matter.
    noise = torch.randn(n, steps, task.output_size, generator=torch.Generator().manual_seed(0))
    outputs = 100.0 * noise
    if task.kind == "classification":
        perfect = 50.0 * torch.nn.functional.one_hot(task.y_val, task.output_size).float()
        loss = float(task.loss(_place(task, outputs, perfect), task.y_val))
        assert loss < 1e-6
        shifted = (task.y_val + 1) % task.output_size
        wrong = 50.0 * torch.nn.functional.one_hot(shifted, task.output_size).float()
        assert float(task.loss(_place(task, outputs, wrong), task.y_val)) > 10 * task.chance_loss
    else:
        if task.scored_steps is None:
            outputs = task.y_val.clone()
        else:
            outputs = _place(task, outputs, task.y_val)
        assert float(task.loss(outputs, task.y_val)) == pytest.approx(0.0, abs=1e-12)
        worse = outputs + 1.0
        assert float(task.loss(worse, task.y_val)) == pytest.approx(1.0, rel=1e-5)


def test_loss_scores_only_the_last_step_for_digits(default_tasks):
    task = default_tasks["digits"]
    y = task.y_val[:8]
    outputs = torch.zeros(8, task.seq_len, 10)
    outputs[:, -1] = 30.0 * torch.nn.functional.one_hot(y, 10)
    outputs[:, -2] = 30.0 * torch.nn.functional.one_hot((y + 1) % 10, 10)  # wrong, unscored
    assert float(task.loss(outputs, y)) < 1e-6
    # Targets with an explicit time axis of one step are accepted too.
    assert float(task.loss(outputs, y[:, None])) < 1e-6


def test_loss_is_differentiable_and_rejects_bad_shapes(default_tasks):
    task = default_tasks["charlm"]
    outputs = torch.zeros(4, task.seq_len, task.output_size, requires_grad=True)
    loss = task.loss(outputs, task.y_train[:4])
    loss.backward()
    assert loss.dim() == 0 and outputs.grad is not None
    assert loss.item() == pytest.approx(math.log(task.output_size), rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        task.loss(outputs, task.y_train[:4, :-1])
    with pytest.raises(ValueError, match="outputs"):
        task.loss(outputs[..., :-1], task.y_train[:4])
    adding = default_tasks["adding"]
    with pytest.raises(ValueError, match="targets"):
        adding.loss(torch.zeros(3, adding.seq_len, 1), adding.y_val[:4])


@pytest.mark.parametrize("name", ["digits", "adding", "copy", "charlm", "lorenz"])
def test_member_losses_are_each_models_loss(default_tasks, name):
    """Several models' losses in one call: each model's ``loss`` on its own outputs (the
    scored steps taken from whole sequences), targets that do not fit a clear error."""
    task = default_tasks[name]
    K, B = 3, 6
    outputs = torch.randn(K, B, task.seq_len, task.output_size,
                          generator=torch.Generator().manual_seed(0))
    targets = torch.stack([task.y_train[k * B:(k + 1) * B] for k in range(K)])
    expected = torch.stack([task.loss(out, y) for out, y in zip(outputs, targets)])
    assert torch.allclose(task.member_losses(outputs, targets), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        task.member_losses(outputs, targets[:, :B - 1])
