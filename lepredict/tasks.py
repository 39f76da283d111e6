"""Sequence tasks for training small recurrent networks.

Every task is built deterministically from a seed, needs no download, and holds its data as torch
tensors: float32 inputs of shape ``(n, T, input_size)`` (batch first) and targets whose shape
depends on the task. A model is expected to apply a linear readout of size ``output_size`` at
every time step; :meth:`Task.loss` picks out the steps the task scores.

Built-in tasks (see each ``make_*`` function for the options):

* ``digits``: scikit-learn's 8x8 digit images read pixel by pixel (or row by row), 10 classes,
  cross-entropy on the last step.
* ``charlm``: next-character prediction on the English help text that ships with CPython
  (``pydoc_data.topics``), cross-entropy at every step.
* ``adding``: the adding problem (sum of the two marked values), MSE on the last step.
* ``copy``: the copy-memory task, cross-entropy over the recall window.
* ``lorenz``: one-step forecasting of Lorenz-63 trajectories, MSE at every step.
* ``narma``: NARMA-10 time-series regression, MSE at every step.
* ``parity``: the parity (XOR) of marked bits, cross-entropy on the last step (long memory).
* ``sines``: the frequency class of a noisy sinusoid, cross-entropy on the last step.

Tasks are looked up by name with :func:`get`; new ones are added with :func:`register`, by an
installed package through the ``lepredict.tasks`` entry-point group (:data:`ENTRY_POINT_GROUP`),
or named without registering as ``"module:function"``. :func:`describe` says what a task is and
which options it takes.

Example:
    >>> from lepredict import tasks
    >>> task = tasks.get("digits", mode="row", seed=1)
    >>> task.x_train.shape[1:], task.output_size
    (torch.Size([8, 8]), 10)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import importlib
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ENTRY_POINT_GROUP",
    "chance_loss",
    "Task",
    "available",
    "describe",
    "get",
    "make_adding",
    "make_charlm",
    "make_copy",
    "make_digits",
    "make_lorenz",
    "make_narma",
    "make_parity",
    "make_sines",
    "register",
]

CLASSIFICATION = "classification"
REGRESSION = "regression"

#: Characters of the ``charlm`` vocabulary; everything else (after lowercasing) maps to one extra
#: "other" symbol at index ``len(CHARLM_VOCAB)``. Chosen to cover nearly all of the corpus (about
#: 0.3% falls into "other") while keeping the readout small.
CHARLM_VOCAB = " \n" + "abcdefghijklmnopqrstuvwxyz" + "0123456789" + ".,:;'\"()[]-_=*+<>/|"


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A supervised sequence task with its train and validation data.

    Attributes:
        name: the task's registry name.
        x_train: ``(n_train, T, input_size)`` float32 inputs.
        y_train: training targets: long class indices for classification, float32 for regression.
            Tasks scored on the last step only store targets without a time axis (``(n,)`` class
            indices, or ``(n, output_size)`` values); the others store ``(n, S)`` or
            ``(n, S, output_size)`` for the ``S`` scored steps.
        x_val: validation inputs, laid out like ``x_train``.
        y_val: validation targets, laid out like ``y_train``.
        input_size: size of the input at each step.
        output_size: size of the linear readout the model applies at every time step.
        kind: ``"classification"`` (cross-entropy on logits) or ``"regression"`` (MSE).
        chance_loss: validation loss of the best constant prediction fitted on the training
            targets; ``normalised_loss`` divides by it, so 1.0 means "learned nothing".
        threshold: default trainability threshold on the normalised loss: a run whose final
            normalised validation loss is below it counts as having trained.
        options: the options the task was built with, defaults included (for the record).
        scored_steps: number of final time steps the loss scores; ``None`` scores every step.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    input_size: int
    output_size: int
    kind: str
    chance_loss: float
    threshold: float
    options: dict
    scored_steps: int | None = None

    def __post_init__(self) -> None:
        # Custom tasks come in through register(), so a malformed one should fail here, where
        # the message can say what is wrong, rather than deep inside a training loop.
        if self.kind not in (CLASSIFICATION, REGRESSION):
            raise ValueError(
                f"kind must be {CLASSIFICATION!r} or {REGRESSION!r}, got {self.kind!r}"
            )
        if not (math.isfinite(self.chance_loss) and self.chance_loss > 0):
            raise ValueError(f"chance_loss must be finite and > 0, got {self.chance_loss!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {self.threshold!r}")
        for split in ("train", "val"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dim() != 3 or x.shape[-1] != self.input_size or x.dtype != torch.float32:
                raise ValueError(
                    f"x_{split} must be float32 of shape (n, T, {self.input_size}), "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"x_{split} and y_{split} hold different numbers of sequences")
            wanted = torch.long if self.kind == CLASSIFICATION else torch.float32
            if y.dtype != wanted:
                raise ValueError(f"y_{split} must be {wanted} for {self.kind}, got {y.dtype}")
        if self.scored_steps is not None and not 1 <= self.scored_steps <= self.x_train.shape[1]:
            raise ValueError(f"scored_steps must be in [1, T], got {self.scored_steps}")

    @property
    def seq_len(self) -> int:
        """Number of time steps ``T`` of every input sequence."""
        return self.x_train.shape[1]

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over the scored steps.

        Args:
            outputs: ``(B, T, output_size)`` readout at every step (logits for classification).
            targets: targets for the same ``B`` sequences, laid out like ``y_train``.

        Returns:
            The scalar mean cross-entropy or MSE over the steps the task scores (the last step
            for ``digits`` and ``adding``, the recall window for ``copy``, every step for
            ``charlm`` and ``lorenz``).

        Raises:
            ValueError: if the shapes do not fit the task.
        """
        if outputs.dim() != 3 or outputs.shape[-1] != self.output_size:
            raise ValueError(
                f"outputs must have shape (B, T, {self.output_size}), got {tuple(outputs.shape)}"
            )
        scored = outputs if self.scored_steps is None else outputs[:, -self.scored_steps :]
        batch, steps, size = scored.shape
        if self.kind == CLASSIFICATION:
            expected = (batch, steps)
            if steps == 1 and tuple(targets.shape) == (batch,):
                targets = targets.unsqueeze(1)
        else:
            expected = (batch, steps, size)
            if steps == 1 and tuple(targets.shape) == (batch, size):
                targets = targets.unsqueeze(1)
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"task {self.name!r}: targets of shape {tuple(targets.shape)} do not fit outputs "
                f"of shape {tuple(outputs.shape)} (expected {expected} for the scored steps)"
            )
        if self.kind == CLASSIFICATION:
            return F.cross_entropy(scored.reshape(batch * steps, size), targets.reshape(-1))
        return F.mse_loss(scored, targets)

    def member_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """:meth:`loss` of K models at once (a population's members), ``(K,)``.

        Args:
            outputs: ``(K, B, T, output_size)``, each model's readout.
            targets: ``(K, ...)``, each model's targets laid out like ``y_train``.

        Each model's mean over its own scored rows, as :meth:`loss` takes it (to float
        rounding), in one call; a subclass that overrides :meth:`loss` has it called once per
        model instead.
        """
        if type(self).loss is not Task.loss:
            return torch.stack([self.loss(out, y) for out, y in zip(outputs, targets)])
        scored = outputs if self.scored_steps is None else outputs[:, :, -self.scored_steps:]
        K, size = scored.shape[0], scored.shape[-1]
        rows = scored.numel() // size
        classes = self.kind == CLASSIFICATION  # one class index per row, else one per value
        if targets.numel() != (rows if classes else scored.numel()):
            raise ValueError(f"task {self.name!r}: targets of shape {tuple(targets.shape)} "
                             f"do not fit outputs of shape {tuple(outputs.shape)}")
        if classes:
            losses = F.cross_entropy(scored.reshape(rows, size), targets.reshape(rows),
                                     reduction="none")
        else:
            losses = F.mse_loss(scored, targets.reshape(scored.shape), reduction="none")
        return losses.reshape(K, -1).mean(1)

    def normalised_loss(self, loss: float) -> float:
        """``loss / chance_loss``: 1.0 is the best constant prediction, 0.0 is perfect."""
        return float(loss) / self.chance_loss


# --------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str, factory: Callable[..., Task], *, overwrite: bool = False) -> None:
    """Make a task available to :func:`get` under ``name``.

    Args:
        name: registry name.
        factory: called as ``factory(**options)``; must return a :class:`Task`. Its keyword
            parameters are the task's options.
        overwrite: replace an existing registration of the same name instead of refusing.

    Raises:
        ValueError: if ``name`` is taken and ``overwrite`` is false, or ``name`` is empty.
        TypeError: if ``name`` is not a string or ``factory`` is not callable.
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("task name must not be empty")
    if not callable(factory):
        raise TypeError(f"factory for task {name!r} must be callable, got {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"task {name!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[name] = factory


#: Entry-point group through which an installed package makes its tasks available by name: in
#: its ``pyproject.toml``, ``[project.entry-points."lepredict.tasks"]`` then ``waves =
#: "mypkg.tasks:make_waves"``. A name registered in this process wins over an entry point's.
ENTRY_POINT_GROUP = "lepredict.tasks"


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Sorted names of the registered tasks and of those installed packages declare in the
    :data:`ENTRY_POINT_GROUP` entry-point group (not imported until used)."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _import_factory(spec: str) -> Callable[..., Task]:
    """The callable a ``"module:function"`` spec names (``function`` may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"task {spec!r}: a task of your own is named as module:function, "
                         "e.g. mypkg.tasks:make_waves")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name + ".").startswith(err.name + "."):
            raise ValueError(f"task {spec!r}: no module named {err.name!r} can be imported; "
                             "check the name, and that it is installed or on PYTHONPATH (or "
                             "in the current directory)") from None
        raise ValueError(f"task {spec!r}: importing {module_name!r} failed: {err}") from err
    except Exception as err:  # the user's module fails to import: say so in one line
        raise ValueError(f"task {spec!r}: importing {module_name!r} failed: "
                         f"{type(err).__name__}: {err}") from err
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"task {spec!r}: module {module_name!r} has no {attr!r}; check "
                             "the function's name (module:function)") from None
    if not callable(obj):
        raise ValueError(f"task {spec!r}: {attr!r} in {module_name!r} is a "
                         f"{type(obj).__name__}, not a function returning a Task")
    return obj


def _factory(name: str) -> tuple[Callable[..., Task], bool]:
    """The factory of ``name`` and whether it is outside lepredict's control (an entry point or
    a ``module:function`` spec), whose errors are any exception rather than ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    if name in _REGISTRY:
        return _REGISTRY[name], False
    if ":" in name:
        return _import_factory(name), True
    entry = _entry_points().get(name)
    if entry is not None:
        try:
            return entry.load(), True
        except Exception as err:
            raise ValueError(f"task {name!r}: loading its entry point {entry.value!r} (group "
                             f"{ENTRY_POINT_GROUP}) failed: {type(err).__name__}: {err}"
                             ) from err
    raise ValueError(
        f"unknown task {name!r}; known tasks: {', '.join(available()) or '(none)'}. "
        "To add one, call lepredict.tasks.register(name, factory) with a factory that "
        "takes keyword options and returns a lepredict.tasks.Task, name it as module:function, "
        f"or declare it in the {ENTRY_POINT_GROUP!r} entry-point group of a package."
    )


def get(name: str, **options) -> Task:
    """Build the task ``name``.

    Args:
        name: a registered name (one of :func:`available`), the name of an entry point in the
            :data:`ENTRY_POINT_GROUP` group, or ``"module:function"``: the function (of a module
            importable from ``sys.path``) is called with ``options`` and must return a
            :class:`Task`.
        **options: the factory's keyword options, e.g. ``seed=3`` or ``mode="row"``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), a bad option value,
            a ``module:function`` that cannot be imported, or a task of one's own whose factory
            raised (the message says what it raised).
        TypeError: for an option the task does not take (the message lists the valid ones), or a
            factory that does not return a :class:`Task`.

    Example:
        >>> get("digits", mode="row").seq_len
        8
    """
    factory, external = _factory(name)
    _check_option_names(name, factory, options)
    if external:
        try:
            task = factory(**options)
        except Exception as err:
            what = getattr(factory, "__qualname__", repr(factory))
            raise ValueError(f"task {name!r}: {what}() raised {type(err).__name__}: {err}"
                             ) from err
    else:
        task = factory(**options)
    if not isinstance(task, Task):
        raise TypeError(f"factory for task {name!r} returned {type(task).__name__}, not a Task; "
                        "name a function that returns a lepredict.tasks.Task")
    return task


def _arg_docs(doc: str) -> dict[str, str]:
    """``{name: text}`` from the ``Args:`` section of a Google-style docstring."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    current = None
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):
            break  # the next section
        body = line.strip()
        head, sep, text = body.partition(":")
        if sep and line.startswith("    ") and not line.startswith("     ") \
                and head.replace("_", "").isalnum():
            current = head
            out[current] = text.strip()
        elif current and body:
            out[current] += " " + body
    return out


def describe(name: str) -> dict:
    """What the task ``name`` is and which options it takes, from its factory.

    Args:
        name: as for :func:`get` (a ``module:function`` or entry-point task is imported).

    Returns:
        ``{"name", "description", "options", "required", "help"}``: ``description`` is the
        first line of the factory's docstring (``""`` if it has none); ``options`` maps each
        keyword option with a default to that default; ``required`` lists options without one;
        ``help`` maps options to their text in the docstring's ``Args:`` section.

    Raises:
        ValueError: as :func:`get` for a name it cannot find or import.

    Example:
        >>> describe("digits")["options"]
        {'mode': 'pixel', 'val_fraction': 0.2, 'seed': 0}
    """
    factory, _ = _factory(name)
    doc = inspect.getdoc(factory) or ""
    options: dict = {}
    required: list[str] = []
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: options unknown
        params = []
    for p in params:
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        if p.default is p.empty:
            required.append(p.name)
        else:
            options[p.name] = p.default
    return {"name": name, "description": doc.splitlines()[0].strip() if doc else "",
            "options": options, "required": required, "help": _arg_docs(doc)}


def _check_option_names(name: str, factory: Callable[..., Task], options: dict) -> None:
    # Python's own "unexpected keyword argument" error names the factory function rather than
    # the task and does not say what is allowed, so check up front where we can.
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"task {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )


# --------------------------------------------------------------------------------------------
# Shared helpers


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but seq_len=True is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"option {name!r} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"option {name!r} must be >= {minimum}, got {value}")
    return int(value)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"option {name!r} must be a float, got {type(value).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"option {name!r} must be strictly between 0 and 1, got {value}")
    return float(value)


def _split_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Independent streams for train and validation, so that changing n_train leaves the
    # validation set unchanged.
    train, val = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(train), np.random.default_rng(val)


def _one_hot(indices: np.ndarray, size: int) -> Tensor:
    return F.one_hot(torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)), size).float()


def _constant_cross_entropy(y_train: Tensor, y_val: Tensor, n_classes: int) -> float:
    """Cross-entropy on ``y_val`` of the train label frequencies (add-one smoothed).

    The smoothing keeps the loss finite when a class absent from training shows up in validation.
    """
    counts = torch.bincount(y_train.reshape(-1), minlength=n_classes).double() + 1.0
    log_p = torch.log(counts / counts.sum())
    return float(-log_p[y_val.reshape(-1)].mean())


def _constant_mse(y_train: Tensor, y_val: Tensor) -> float:
    """MSE on ``y_val`` of the per-output mean of the training targets."""
    size = y_train.shape[-1]
    mean = y_train.reshape(-1, size).double().mean(0)
    return float(((y_val.reshape(-1, size).double() - mean) ** 2).mean())


def _is_one_hot(y: Tensor) -> bool:
    """Whether ``y`` holds rows of 0s with a single 1 (two or more classes)."""
    if y.dim() < 2 or y.shape[-1] < 2:
        return False
    binary = ((y == 0) | (y == 1)).all()
    return bool(binary and (y.sum(-1) == 1).all())


def _is_binary(y: Tensor) -> bool:
    """Whether ``y`` holds a binary cross-entropy's targets: floats of only 0s and 1s, or bools
    (integers are class indices, which a 0/1 matrix of one label a step also is)."""
    if y.dtype == torch.bool:
        return True
    return torch.is_floating_point(y) and bool(((y == 0) | (y == 1)).all())


def _check_outputs_agree(y_train: Tensor, y_val: Tensor, what: str) -> None:
    """Refuse ``y_val`` of other outputs than ``y_train``'s several (one output takes any
    shape, as ``(N, T, 1)`` against ``(M, T)``)."""
    if y_train.dim() > 1 and y_train.shape[-1] > 1 and (
            y_val.dim() < 2 or y_val.shape[-1] != y_train.shape[-1]):
        raise ValueError(f"y_train has {y_train.shape[-1]} {what} a row (shape "
                         f"{tuple(y_train.shape)}) but y_val's rows differ (shape "
                         f"{tuple(y_val.shape)}): pass the validation targets of the same "
                         "outputs.")


def chance_loss(y_train, y_val=None, *, kind: str | None = None,
                n_classes: int | None = None) -> float:
    """The loss of the best constant prediction: what a model that learned nothing scores, and
    the scale :class:`~lepredict.LyapunovPruner` and the shipped predictors read losses on
    (``loss / chance_loss``, 1.0 = learned nothing).

    Args:
        y_train: training targets (tensor or array): integer class indices for cross-entropy
            (or one-hot rows, with ``kind="classification"``; or the 0/1 targets of a binary
            cross-entropy, one column or several labels, as floats, which
            ``BCEWithLogitsLoss`` takes, with ``kind="classification"``, or as bools: an
            integer 0/1 matrix, such as ``MultiLabelBinarizer``'s, is read as class indices,
            one label a step), floats (last axis = output size) for mean squared error.
        y_val: the targets the loss is measured on; ``None`` uses ``y_train``.
        kind: ``"classification"`` or ``"regression"``; ``None`` decides by the dtype (and
            warns where float targets are one-hot rows or all 0 and 1, which a cross-entropy
            loss may take).
        n_classes: number of classes (default: the largest index + 1).

    Returns:
        For classification the cross-entropy of the (add-one smoothed) training class
        frequencies on ``y_val`` (for several 0/1 labels a column, what
        ``BCEWithLogitsLoss`` averages: the mean over labels of each one's); for regression the
        mean squared error of the per-output training mean on ``y_val``.

    Example:
        >>> import torch, lepredict
        >>> round(lepredict.chance_loss(torch.tensor([0, 1, 2, 3] * 25)), 4)  # ln 4
        1.3863
    """
    y_train = torch.as_tensor(np.asarray(y_train) if not torch.is_tensor(y_train) else y_train)
    y_val = y_train if y_val is None else torch.as_tensor(
        np.asarray(y_val) if not torch.is_tensor(y_val) else y_val)
    if kind not in (None, CLASSIFICATION, REGRESSION):
        raise ValueError(f"kind must be {CLASSIFICATION!r} or {REGRESSION!r}, got {kind=}.")
    if y_train.numel() == 0 or y_val.numel() == 0:
        raise ValueError("chance_loss needs at least one target.")
    one_hot = _is_one_hot(y_train) and _is_one_hot(y_val)
    if kind is None:
        kind = REGRESSION if torch.is_floating_point(y_train) else CLASSIFICATION
        if kind == REGRESSION and one_hot:
            # F.cross_entropy takes such rows as class probabilities: a chance loss of the
            # squared error there is 25 times too small, and every trial looks diverged.
            warnings.warn(
                f"chance_loss: the targets are one-hot rows of {y_train.shape[-1]} classes, "
                "taken as regression targets (the mean squared error of the best constant); "
                "if the model is trained with cross-entropy, pass kind='classification' (or "
                "the class indices).", UserWarning, stacklevel=2)
        elif kind == REGRESSION and _is_binary(y_train) and _is_binary(y_val):
            # BCEWithLogitsLoss takes float 0/1 targets: its chance loss is a cross-entropy.
            warnings.warn(
                "chance_loss: the targets are floats of 0 and 1, taken as regression targets "
                "(the mean squared error of the best constant); if the model is trained with a "
                "binary cross-entropy (BCEWithLogitsLoss), pass kind='classification'.",
                UserWarning, stacklevel=2)
    multi_label = (kind == CLASSIFICATION and not one_hot and y_train.dim() >= 2
                   and y_train.shape[-1] > 1 and _is_binary(y_train) and _is_binary(y_val))
    if multi_label:  # one binary cross-entropy a label, averaged as BCEWithLogitsLoss does
        _check_outputs_agree(y_train, y_val, "labels")
        columns = zip(y_train.flatten(0, -2).long().T, y_val.flatten(0, -2).long().T)
        return float(np.mean([_constant_cross_entropy(a, b, 2) for a, b in columns]))
    if kind == CLASSIFICATION:
        if one_hot:  # rows marking their class, of floats or ints: the classes they mark
            n_classes = y_train.shape[-1] if n_classes is None else n_classes
            y_train, y_val = y_train.argmax(-1), y_val.argmax(-1)
        y_train, y_val = y_train.long(), y_val.long()
        n = int(max(y_train.max(), y_val.max())) + 1 if n_classes is None else int(n_classes)
        if int(min(y_train.min(), y_val.min())) < 0 or n <= int(max(y_train.max(), y_val.max())):
            raise ValueError(f"class indices must lie in [0, {n_classes=}).")
        return _constant_cross_entropy(y_train, y_val, n)
    _check_outputs_agree(y_train, y_val, "outputs")
    y_train, y_val = y_train.double(), y_val.double()
    if y_train.dim() == 1:
        y_train, y_val = y_train[:, None], y_val.reshape(-1, 1)
    return _constant_mse(y_train, y_val)


# --------------------------------------------------------------------------------------------
# digits


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of scikit-learn's digits: ``(1797, 8, 8)`` values 0..16, ``(1797,)``.

    Reads the CSV that ``sklearn.datasets.load_digits`` reads, located without importing
    scikit-learn: ``import sklearn`` alone takes over a second, most of this task's build time.
    Falls back to ``load_digits`` should the file ever move.
    """
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            with gzip.open(path, "rt") as handle:
                data = np.loadtxt(handle, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def _stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation indices holding out ``round(val_fraction * n_c)`` of each class."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(val_fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(f"option 'val_fraction'={val_fraction} leaves an empty train or val set")
    return train_idx, val_idx


def make_digits(*, mode: str = "pixel", val_fraction: float = 0.2, seed: int = 0) -> Task:
    """scikit-learn's 1797 8x8 handwritten digits, classified from the last step.

    Pixels are scaled to [0, 1]. In ``"pixel"`` mode the image is read one pixel per step in
    row-major order (``T=64``, ``input_size=1``), a long-memory problem; in ``"row"`` mode one row
    per step (``T=8``, ``input_size=8``). The train/validation split is stratified by class and
    seeded (1438/359 images at the default ``val_fraction``).

    Threshold 0.5: chance is ~log(10) = 2.3 nats, so 0.5 asks for a cross-entropy below ~1.15,
    roughly 60-70% accuracy. A network only gets there by carrying information across most of
    the sequence, yet it is far from what a tuned model reaches, so the threshold separates
    "learned" from "stuck" without demanding a well-tuned model. (In pixel mode a 64-unit GRU,
    Adam at 3e-3, batch 64, passes it after ~10 epochs.)

    Args:
        mode: ``"pixel"`` or ``"row"``.
        val_fraction: fraction of each class held out for validation.
        seed: seed of the split.
    """
    if mode not in ("pixel", "row"):
        raise ValueError(f"option 'mode' must be 'pixel' or 'row', got {mode!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    seed = _check_int("seed", seed, 0)

    images, labels = _load_digits()
    images = (images / 16.0).astype(np.float32)  # pixel values are 0..16
    x = images.reshape(len(images), 64, 1) if mode == "pixel" else images
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    y_train = torch.from_numpy(labels[train_idx])
    y_val = torch.from_numpy(labels[val_idx])
    return Task(
        name="digits",
        x_train=torch.from_numpy(x[train_idx]),
        y_train=y_train,
        x_val=torch.from_numpy(x[val_idx]),
        y_val=y_val,
        input_size=x.shape[-1],
        output_size=10,
        kind=CLASSIFICATION,
        chance_loss=_constant_cross_entropy(y_train, y_val, 10),
        threshold=0.5,
        options={"mode": mode, "val_fraction": val_fraction, "seed": seed},
        scored_steps=1,
    )


# --------------------------------------------------------------------------------------------
# charlm


@functools.lru_cache(maxsize=1)
def _charlm_corpus() -> np.ndarray:
    """The encoded ``pydoc_data`` text as vocabulary indices (read-only int64 array)."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics)).lower()
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    other = len(CHARLM_VOCAB)
    table = np.full(128, other, dtype=np.int64)
    table[[ord(c) for c in CHARLM_VOCAB]] = np.arange(len(CHARLM_VOCAB))
    # Non-ASCII code points (curly quotes, dashes, ...) would index past the table.
    encoded = np.where(codes < 128, table[np.minimum(codes, 127)], other)
    encoded.flags.writeable = False
    return encoded


def _charlm_starts(
    n_chars: int,
    seq_len: int,
    val_fraction: float,
    n_train: int | None,
    n_val: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Start positions of the train and validation windows, and the split position.

    Each window covers ``seq_len + 1`` characters (inputs plus the shifted targets). Windows are
    disjoint, train windows end at or before the split and validation windows start at or after
    it, so no character is seen on both sides.
    """
    width = seq_len + 1
    split = int(n_chars * (1.0 - val_fraction))
    candidates = {
        "train": np.arange(0, split - width + 1, width),
        "val": np.arange(split, n_chars - width + 1, width),
    }
    wanted = {"train": n_train, "val": n_val}
    starts = {}
    for (part, pool), rng in zip(candidates.items(), _split_rngs(seed)):
        n = wanted[part]
        if len(pool) == 0:
            raise ValueError(f"seq_len={seq_len} leaves no {part} sequence in the text")
        if n is None:
            starts[part] = pool
        elif n > len(pool):
            raise ValueError(
                f"option 'n_{part}'={n} exceeds the {len(pool)} {part} sequences of length "
                f"{seq_len} the text holds"
            )
        else:
            # Sorted so that the data read in text order; training shuffles anyway.
            starts[part] = np.sort(rng.choice(pool, size=n, replace=False))
    return starts["train"], starts["val"], split


def make_charlm(
    *,
    seq_len: int = 50,
    n_train: int | None = 2000,
    n_val: int | None = 400,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Next-character prediction on CPython's bundled help text (``pydoc_data.topics``).

    The topics (joined in sorted-key order, about 465k characters) are lowercased and mapped onto
    :data:`CHARLM_VOCAB` plus one "other" symbol (58 symbols). Inputs are one-hot characters,
    targets the next character at every step. The text is split by position: windows from the
    first ``1 - val_fraction`` of it train, windows from the rest validate; ``n_train`` and
    ``n_val`` seeded random windows are kept (``None`` keeps all).

    Threshold 0.7: chance (unigram cross-entropy) is ~3.2 nats; a bigram model, which needs no
    memory beyond the current character, reaches ~0.72 of it on this text and a trigram ~0.54.
    So 0.7 asks for at least some use of the recurrent state while staying reachable in a short
    CPU training run (a 64-unit tanh RNN or GRU passes it after ~5 epochs).

    Args:
        seq_len: characters per input sequence.
        n_train: number of training sequences (``None``: all, about 8000 at ``seq_len=50``).
        n_val: number of validation sequences (``None``: all, about 900 at ``seq_len=50``).
        val_fraction: fraction of the text, at its end, reserved for validation.
        seed: seed of the choice of windows.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    if n_train is not None:
        n_train = _check_int("n_train", n_train, 1)
    if n_val is not None:
        n_val = _check_int("n_val", n_val, 1)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    seed = _check_int("seed", seed, 0)

    text = _charlm_corpus()
    train_starts, val_starts, _ = _charlm_starts(
        len(text), seq_len, val_fraction, n_train, n_val, seed
    )
    vocab_size = len(CHARLM_VOCAB) + 1
    offsets = np.arange(seq_len + 1)

    def windows(starts: np.ndarray) -> tuple[Tensor, Tensor]:
        chars = text[starts[:, None] + offsets]
        return _one_hot(chars[:, :-1], vocab_size), torch.from_numpy(chars[:, 1:].copy())

    x_train, y_train = windows(train_starts)
    x_val, y_val = windows(val_starts)
    return Task(
        name="charlm",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        input_size=vocab_size,
        output_size=vocab_size,
        kind=CLASSIFICATION,
        chance_loss=_constant_cross_entropy(y_train, y_val, vocab_size),
        threshold=0.7,
        options={
            "seq_len": seq_len,
            "n_train": n_train,
            "n_val": n_val,
            "val_fraction": val_fraction,
            "seed": seed,
        },
        scored_steps=None,
    )


# --------------------------------------------------------------------------------------------
# adding


def make_adding(
    *, seq_len: int = 50, n_train: int = 2000, n_val: int = 400, seed: int = 0
) -> Task:
    """The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015).

    Channel 0 holds values drawn uniformly from [0, 1); channel 1 is a marker that is 1 at exactly
    two steps, one in the first half of the sequence and one in the second. The target, read
    from the last step, is the sum of the two marked values.

    Threshold 0.25: chance is Var(U1 + U2) = 1/6. A model that remembers only one of the two
    values (and adds 0.5 for the other) scores exactly Var(U) / Var(U1 + U2) = 0.5, so the
    threshold sits halfway below that and counts only models that combine both values. (A
    64-unit GRU sits on the plateau for ~8 epochs, then passes it after ~11.)

    Args:
        seq_len: sequence length ``T`` (at least 2).
        n_train: number of training sequences.
        n_val: number of validation sequences.
        seed: data seed.
    """
    seq_len = _check_int("seq_len", seq_len, 2)
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    seed = _check_int("seed", seed, 0)
    half = seq_len // 2

    def sample(rng: np.random.Generator, n: int) -> tuple[Tensor, Tensor]:
        values = rng.random((n, seq_len))
        rows = np.arange(n)
        first = rng.integers(0, half, size=n)
        second = rng.integers(half, seq_len, size=n)
        markers = np.zeros((n, seq_len))
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        x = np.stack([values, markers], axis=-1).astype(np.float32)
        # Summed from the float32 inputs so the target is exactly what the model can see.
        target = x[rows, first, 0] + x[rows, second, 0]
        return torch.from_numpy(x), torch.from_numpy(target[:, None])

    train_rng, val_rng = _split_rngs(seed)
    x_train, y_train = sample(train_rng, n_train)
    x_val, y_val = sample(val_rng, n_val)
    return Task(
        name="adding",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        input_size=2,
        output_size=1,
        kind=REGRESSION,
        chance_loss=_constant_mse(y_train, y_val),
        threshold=0.25,
        options={"seq_len": seq_len, "n_train": n_train, "n_val": n_val, "seed": seed},
        scored_steps=1,
    )


# --------------------------------------------------------------------------------------------
# copy


def make_copy(
    *,
    seq_len: int = 20,
    n_symbols: int = 8,
    copy_len: int = 5,
    n_train: int = 2000,
    n_val: int = 400,
    seed: int = 0,
) -> Task:
    """The copy-memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016).

    A sequence of ``T = copy_len + seq_len + copy_len`` one-hot tokens over ``n_symbols + 2``
    channels: ``copy_len`` random symbols, then ``seq_len`` steps of delay (blanks, channel
    ``n_symbols``) whose last step is the delimiter (channel ``n_symbols + 1``), then
    ``copy_len`` blanks during which the network must output the symbols in order. Only that
    recall window is scored, so the readout has ``n_symbols`` classes and no blank class.

    Threshold 0.5: chance is log(n_symbols) (uniform symbols), the plateau memoryless networks
    sit on; 0.5 asks that about half of the information in the symbols be recalled. The task is
    slow to learn: a 64-unit GRU stays on the plateau for ~6 epochs and passes 0.5 after ~19, a
    tanh RNN after ~29.

    Args:
        seq_len: delay between the last symbol and the first recall step.
        n_symbols: size of the symbol alphabet.
        copy_len: number of symbols to remember.
        n_train: number of training sequences.
        n_val: number of validation sequences.
        seed: data seed.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    n_symbols = _check_int("n_symbols", n_symbols, 2)
    copy_len = _check_int("copy_len", copy_len, 1)
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    seed = _check_int("seed", seed, 0)
    blank, delimiter = n_symbols, n_symbols + 1
    total = copy_len + seq_len + copy_len

    def sample(rng: np.random.Generator, n: int) -> tuple[Tensor, Tensor]:
        symbols = rng.integers(0, n_symbols, size=(n, copy_len))
        tokens = np.full((n, total), blank, dtype=np.int64)
        tokens[:, :copy_len] = symbols
        tokens[:, copy_len + seq_len - 1] = delimiter
        return _one_hot(tokens, n_symbols + 2), torch.from_numpy(symbols.astype(np.int64))

    train_rng, val_rng = _split_rngs(seed)
    x_train, y_train = sample(train_rng, n_train)
    x_val, y_val = sample(val_rng, n_val)
    return Task(
        name="copy",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        input_size=n_symbols + 2,
        output_size=n_symbols,
        kind=CLASSIFICATION,
        chance_loss=_constant_cross_entropy(y_train, y_val, n_symbols),
        threshold=0.5,
        options={
            "seq_len": seq_len,
            "n_symbols": n_symbols,
            "copy_len": copy_len,
            "n_train": n_train,
            "n_val": n_val,
            "seed": seed,
        },
        scored_steps=copy_len,
    )


# --------------------------------------------------------------------------------------------
# lorenz

LORENZ_SIGMA, LORENZ_RHO, LORENZ_BETA = 10.0, 28.0, 8.0 / 3.0


def _lorenz_field(state: np.ndarray) -> np.ndarray:
    x, y, z = state[..., 0], state[..., 1], state[..., 2]
    return np.stack(
        [LORENZ_SIGMA * (y - x), x * (LORENZ_RHO - z) - y, x * y - LORENZ_BETA * z], axis=-1
    )


def _rk4_step(state: np.ndarray, dt: float) -> np.ndarray:
    k1 = _lorenz_field(state)
    k2 = _lorenz_field(state + 0.5 * dt * k1)
    k3 = _lorenz_field(state + 0.5 * dt * k2)
    k4 = _lorenz_field(state + dt * k3)
    return state + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def _lorenz_paths(
    seq_len: int, n_train: int, n_val: int, subsample: int, dt: float, burn_in: int, seed: int
) -> np.ndarray:
    """Raw ``(n_train + n_val, seq_len + 1, 3)`` states, train trajectories first."""
    train_rng, val_rng = _split_rngs(seed)
    origin = np.array([0.0, 0.0, LORENZ_RHO - 1.0])  # near the centre of the attractor
    # Train and validation trajectories are independent, so integrate them as one batch.
    state = origin + 10.0 * np.concatenate(
        [train_rng.standard_normal((n_train, 3)), val_rng.standard_normal((n_val, 3))]
    )
    for _ in range(burn_in):
        state = _rk4_step(state, dt)
    path = np.empty((len(state), seq_len + 1, 3))
    for t in range(seq_len + 1):
        path[:, t] = state
        for _ in range(subsample):
            state = _rk4_step(state, dt)
    if not np.isfinite(path).all():
        raise ValueError(f"integration diverged with dt={dt}; use a smaller dt")
    return path


def make_lorenz(
    *,
    seq_len: int = 50,
    n_train: int = 2000,
    n_val: int = 400,
    subsample: int = 10,
    dt: float = 0.01,
    burn_in: int = 1000,
    seed: int = 0,
) -> Task:
    """One-step forecasting of the Lorenz-63 system (sigma=10, rho=28, beta=8/3).

    Each sequence is its own trajectory: a random initial condition is integrated with RK4 (step
    ``dt``) for ``burn_in`` steps to land on the attractor, then ``seq_len + 1`` states are
    recorded every ``subsample`` steps. States are standardised per coordinate with the mean and
    standard deviation of the training inputs. The input at step t is the state x_t, the target
    x_{t+1}; every step is scored.

    Threshold 0.05: chance (predicting the mean) is ~1.0 after standardisation. At the default
    sampling interval (``subsample * dt = 0.1``) predicting no change scores ~0.47 and the best
    affine one-step map ~0.32, so the threshold, about a sixth of the affine error, counts only
    networks that learned the nonlinear map. The map needs no memory and is smooth, so it is an
    easy task: a 64-unit tanh RNN or GRU trained with Adam passes 0.05 within 2-3 epochs and
    reaches ~0.005 later; a looser threshold would pass nearly every run that moves at all.

    Args:
        seq_len: number of input steps ``T``.
        n_train: number of training trajectories.
        n_val: number of validation trajectories.
        subsample: RK4 steps between recorded states.
        dt: RK4 step size.
        burn_in: RK4 steps discarded before recording.
        seed: seed of the initial conditions.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    subsample = _check_int("subsample", subsample, 1)
    burn_in = _check_int("burn_in", burn_in, 0)
    seed = _check_int("seed", seed, 0)
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not 0.0 < dt <= 0.05:
        # RK4 on Lorenz-63 loses accuracy and then stability well before dt ~ 0.1.
        raise ValueError(f"option 'dt' must be a float in (0, 0.05], got {dt!r}")
    dt = float(dt)

    path = _lorenz_paths(seq_len, n_train, n_val, subsample, dt, burn_in, seed)
    inputs = path[:n_train, :-1].reshape(-1, 3)
    path = (path - inputs.mean(0)) / inputs.std(0)
    path = torch.from_numpy(path.astype(np.float32))
    x_train, y_train = path[:n_train, :-1].contiguous(), path[:n_train, 1:].contiguous()
    x_val, y_val = path[n_train:, :-1].contiguous(), path[n_train:, 1:].contiguous()
    return Task(
        name="lorenz",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        input_size=3,
        output_size=3,
        kind=REGRESSION,
        chance_loss=_constant_mse(y_train, y_val),
        threshold=0.05,
        options={
            "seq_len": seq_len,
            "n_train": n_train,
            "n_val": n_val,
            "subsample": subsample,
            "dt": dt,
            "burn_in": burn_in,
            "seed": seed,
        },
        scored_steps=None,
    )


# --------------------------------------------------------------------------------------------
# narma

#: A NARMA sequence whose output leaves ``[-NARMA_BOUND, NARMA_BOUND]`` is escaping to infinity
#: (the recurrence has no bounded solution from there); it is drawn again. Bounded sequences of
#: NARMA-10 stay below 1.45 over 1000 steps.
NARMA_BOUND = 1.5

#: Longest NARMA order: with these coefficients most sequences escape within 50 steps at order
#: 15, and some already at 12 (0.2%), where at order 10 none does before step 56.
NARMA_MAX_ORDER = 10

#: Redraws of escaping NARMA sequences before giving up.
_NARMA_REDRAWS = 100


def _narma_outputs(u: np.ndarray, order: int) -> np.ndarray:
    """``y_{t+1}`` for ``t = 0..T-1`` of each row of inputs ``u`` ``(n, T)``, from rest (``y`` and
    ``u`` zero before step 0)."""
    n, T = u.shape
    y = np.zeros((n, T + 1))
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T):
            recent = y[:, max(0, t - order + 1):t + 1].sum(1)
            delayed = u[:, t - order + 1] if t >= order - 1 else 0.0
            y[:, t + 1] = 0.3 * y[:, t] + 0.05 * y[:, t] * recent + 1.5 * delayed * u[:, t] + 0.1
    return y[:, 1:]


def make_narma(
    *, seq_len: int = 50, n_train: int = 2000, n_val: int = 400, order: int = 10, seed: int = 0
) -> Task:
    """NARMA-10 time-series regression (Atiya & Parlos 2000), scored at every step.

    The reservoir-computing benchmark: inputs ``u_t`` uniform in [0, 0.5] drive
    ``y_{t+1} = 0.3 y_t + 0.05 y_t (y_t + ... + y_{t-order+1}) + 1.5 u_{t-order+1} u_t + 0.1``,
    each sequence from rest (``y`` and ``u`` zero before its first step), so every target is a
    function of inputs the network has seen. The input at step t is ``u_t``, standardised with
    its known mean 0.25 and standard deviation 0.5/sqrt(12); the target is ``y_{t+1}``,
    standardised with the mean and standard deviation of the training targets. The rare
    sequence that escapes to infinity (none in 2000 of 50 steps at order 10) is drawn again.

    Threshold 0.25: chance (the mean) is ~1.0 after standardisation. Memoryless use of ``u_t``
    scores ~0.9; the best linear filter of the last ``order`` inputs ~0.22-0.27 (T = 24-50);
    one that also knows the step (the transient from rest) ~0.11, and a quadratic one of the last
    10 inputs with the step ~0.06-0.11. So 0.25 asks for memory of about ``order`` steps, on
    the way to the nonlinear map. (At T = 32 with 1000 sequences a 32-unit GRU, Adam at 1e-2,
    batch 32, passes it after 2 epochs and reaches 0.15 after 6.)

    Args:
        seq_len: number of input steps ``T``.
        n_train: number of training sequences.
        n_val: number of validation sequences.
        order: the delay ``n`` of NARMA-n (1 to 10; longer orders blow up with these
            coefficients).
        seed: data seed.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    order = _check_int("order", order, 1)
    if order > NARMA_MAX_ORDER:
        raise ValueError(f"option 'order' must be <= {NARMA_MAX_ORDER} (longer NARMA orders "
                         f"blow up with these coefficients), got {order}")
    seed = _check_int("seed", seed, 0)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        u = rng.uniform(0.0, 0.5, size=(n, seq_len))
        y = _narma_outputs(u, order)
        for _ in range(_NARMA_REDRAWS):
            bad = ~(np.abs(y) <= NARMA_BOUND).all(1)  # NaN counts as escaped
            if not bad.any():
                return u, y
            u[bad] = rng.uniform(0.0, 0.5, size=(int(bad.sum()), seq_len))
            y[bad] = _narma_outputs(u[bad], order)
        raise ValueError(f"NARMA-{order} sequences of {seq_len} steps keep escaping to "
                         "infinity; use a shorter seq_len or a lower order")

    train_rng, val_rng = _split_rngs(seed)
    u_train, y_train = sample(train_rng, n_train)
    u_val, y_val = sample(val_rng, n_val)
    u_mean, u_std = 0.25, 0.5 / math.sqrt(12.0)  # of U[0, 0.5]
    y_mean, y_std = y_train.mean(), y_train.std()
    y_std = y_std if y_std > 0 else 1.0  # seq_len=1: every target is 0.1

    def tensors(u: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        x = ((u - u_mean) / u_std).astype(np.float32)[..., None]
        return torch.from_numpy(x), torch.from_numpy(((y - y_mean) / y_std).astype(np.float32)
                                                     [..., None])

    x_train, y_train_t = tensors(u_train, y_train)
    x_val, y_val_t = tensors(u_val, y_val)
    return Task(
        name="narma",
        x_train=x_train,
        y_train=y_train_t,
        x_val=x_val,
        y_val=y_val_t,
        input_size=1,
        output_size=1,
        kind=REGRESSION,
        chance_loss=_constant_mse(y_train_t, y_val_t),
        threshold=0.25,
        options={"seq_len": seq_len, "n_train": n_train, "n_val": n_val, "order": order,
                 "seed": seed},
        scored_steps=None,
    )


# --------------------------------------------------------------------------------------------
# parity


def make_parity(
    *, seq_len: int = 50, n_bits: int = 2, n_train: int = 2000, n_val: int = 400, seed: int = 0
) -> Task:
    """Parity (delayed XOR) of marked bits, classified from the last step: a long-memory task.

    Channel 0 holds random bits, shown as -1 and +1; channel 1 is a marker that is 1 at
    ``n_bits`` steps, one in each of ``n_bits`` equal segments of the sequence (as the adding
    problem marks one value in each half). The label, read from the last step, is the parity
    (XOR) of the marked bits: 2 classes.

    Threshold 0.5: chance is log 2. Parity gives no partial credit: knowing all but one of the
    marked bits says nothing about the label, so a network either combines every marked bit
    (and its loss falls towards 0) or sits at chance; 0.5 (0.35 nats) counts the first.
    Short runs split sharply: at T = 12 with 1000 sequences a 128-unit LSTM (RMSprop at 1e-3,
    orthogonal init) passes it after 3 epochs while a 64-unit GRU (Adam at 3e-3) stays at chance
    for 6; at T = 24 a 32-unit GRU and a 64-unit LSTM (Adam) stay at chance for 6.

    Args:
        seq_len: sequence length ``T`` (at least ``n_bits``).
        n_bits: number of marked bits (2: delayed XOR; 1: recall one bit).
        n_train: number of training sequences.
        n_val: number of validation sequences.
        seed: data seed.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    n_bits = _check_int("n_bits", n_bits, 1)
    if n_bits > seq_len:
        raise ValueError(f"option 'n_bits'={n_bits} needs seq_len >= n_bits, got {seq_len=}")
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    seed = _check_int("seed", seed, 0)
    edges = np.linspace(0, seq_len, n_bits + 1).astype(np.int64)  # n_bits non-empty segments

    def sample(rng: np.random.Generator, n: int) -> tuple[Tensor, Tensor]:
        bits = rng.integers(0, 2, size=(n, seq_len))
        marked = np.stack([rng.integers(edges[k], edges[k + 1], size=n) for k in range(n_bits)],
                          1)
        rows = np.arange(n)[:, None]
        markers = np.zeros((n, seq_len))
        markers[rows, marked] = 1.0
        x = np.stack([2.0 * bits - 1.0, markers], axis=-1).astype(np.float32)
        label = bits[rows, marked].sum(1) % 2
        return torch.from_numpy(x), torch.from_numpy(label.astype(np.int64))

    train_rng, val_rng = _split_rngs(seed)
    x_train, y_train = sample(train_rng, n_train)
    x_val, y_val = sample(val_rng, n_val)
    return Task(
        name="parity",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        input_size=2,
        output_size=2,
        kind=CLASSIFICATION,
        chance_loss=_constant_cross_entropy(y_train, y_val, 2),
        threshold=0.5,
        options={"seq_len": seq_len, "n_bits": n_bits, "n_train": n_train, "n_val": n_val,
                 "seed": seed},
        scored_steps=1,
    )


# --------------------------------------------------------------------------------------------
# sines

#: Frequencies of the ``sines`` classes, in cycles per step: evenly spaced from the lowest (a
#: period of 20 steps) to the highest (a period of 4 steps, half of Nyquist's limit).
SINES_BAND = (0.05, 0.25)


def make_sines(
    *,
    seq_len: int = 50,
    n_classes: int = 4,
    noise: float = 0.5,
    n_train: int = 2000,
    n_val: int = 400,
    seed: int = 0,
) -> Task:
    """The frequency class of a noisy sinusoid, classified from the last step.

    Each sequence is ``sin(2 pi f t + phase) + noise * e_t`` for ``t = 0..T-1``, with the phase
    uniform in [0, 2 pi), ``e_t`` standard Gaussian and ``f`` one of ``n_classes`` frequencies
    evenly spaced over :data:`SINES_BAND` (0.05 to 0.25 cycles per step), the class drawn
    uniformly. One sample says nothing about ``f``: the network has to follow the signal over
    a few periods.

    Threshold 0.5: chance is ~log(n_classes) (1.39 nats for 4 classes), so 0.5 asks for a
    cross-entropy below half of it. At the default noise and 4 classes the classes are
    separable (the largest of the 4 Fourier coefficients classifies 2000 of 2000 validation
    sequences right at T = 24, 32 and 50), so the threshold counts networks that learned a
    frequency detector at all, not a near-optimal one. (At T = 32 with 1000 sequences a
    32-unit GRU, Adam at 1e-2, passes it after 2 epochs; a 64-unit LSTM at 3e-3 ends at 0.6
    after 6.)

    Args:
        seq_len: number of steps ``T`` (the frequencies must be at least ``1 / T`` apart).
        n_classes: number of frequency classes (at least 2).
        noise: standard deviation of the Gaussian noise (the signal's amplitude is 1).
        n_train: number of training sequences.
        n_val: number of validation sequences.
        seed: data seed.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    n_classes = _check_int("n_classes", n_classes, 2)
    low, high = SINES_BAND
    if (high - low) / (n_classes - 1) < 1.0 / seq_len:
        raise ValueError(
            f"option 'n_classes'={n_classes} puts frequencies {(high - low) / (n_classes - 1):.3g} "
            f"cycles per step apart, closer than 1/seq_len = {1 / seq_len:.3g}: the classes "
            "cannot be told apart; use a longer seq_len or fewer classes")
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.floating)):
        raise TypeError(f"option 'noise' must be a float, got {type(noise).__name__}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"option 'noise' must be a finite number >= 0, got {noise}")
    noise = float(noise)
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    seed = _check_int("seed", seed, 0)
    freqs = np.linspace(low, high, n_classes)
    steps = np.arange(seq_len)

    def sample(rng: np.random.Generator, n: int) -> tuple[Tensor, Tensor]:
        label = rng.integers(0, n_classes, size=n)
        phase = rng.uniform(0.0, 2 * math.pi, size=(n, 1))
        x = np.sin(2 * math.pi * freqs[label][:, None] * steps + phase)
        x = x + noise * rng.standard_normal((n, seq_len))
        return torch.from_numpy(x.astype(np.float32)[..., None]), torch.from_numpy(label)

    train_rng, val_rng = _split_rngs(seed)
    x_train, y_train = sample(train_rng, n_train)
    x_val, y_val = sample(val_rng, n_val)
    return Task(
        name="sines",
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        input_size=1,
        output_size=n_classes,
        kind=CLASSIFICATION,
        chance_loss=_constant_cross_entropy(y_train, y_val, n_classes),
        threshold=0.5,
        options={"seq_len": seq_len, "n_classes": n_classes, "noise": noise,
                 "n_train": n_train, "n_val": n_val, "seed": seed},
        scored_steps=1,
    )


register("digits", make_digits)
register("charlm", make_charlm)
register("adding", make_adding)
register("copy", make_copy)
register("lorenz", make_lorenz)
register("narma", make_narma)
register("parity", make_parity)
register("sines", make_sines)
