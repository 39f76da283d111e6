"""lepredict: predict early in training whether an RNN's hyperparameters will train well.

The pieces, each in a module named after what it holds:

* :mod:`lepredict.lyapunov`: Lyapunov spectra of ``nn.RNN``/``nn.GRU``/``nn.LSTM`` and of any
  differentiable map (:func:`lyapunov_spectrum`, :func:`lyapunov_spectrum_map`).
* :mod:`lepredict.tasks`: sequence tasks (``digits``, ``charlm``, ``adding``, ``copy``, ``lorenz``).
* :mod:`lepredict.records`: the record schema the rooms share (runs, trial attributes, rows).
* :mod:`lepredict.train`: short training runs that record curves and early spectra
  (:func:`train_run`).
* :mod:`lepredict.population`: many runs of one shape trained together as one batched
  computation (:func:`~lepredict.population.train_population`).
* :mod:`lepredict.sweep`: Optuna sweeps of such runs, their storage and exports.
* :mod:`lepredict.features`, :mod:`lepredict.predictor`, :mod:`lepredict.evaluation`: features of
  early training, the :class:`~lepredict.predictor.StabilityPredictor`, and its honest evaluation.
* :mod:`lepredict.pruner`: the Optuna pruner plugin (:class:`LyapunovPruner`,
  :func:`report_spectrum`, :func:`measure_and_report`).
* :mod:`lepredict.report`: the HTML analysis of a sweep.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

# The public names load their modules on first use (PEP 562): `lepredict --help`, or a script
# that needs only the records, does not wait seconds for torch, Optuna and scikit-learn.
_FROM = {
    "LyapunovSpectrum": "lyapunov", "lyapunov_spectra": "lyapunov",
    "lyapunov_spectrum": "lyapunov", "lyapunov_spectrum_map": "lyapunov",
    "RunRecord": "records", "chance_loss": "tasks", "RunConfig": "train", "train_run": "train",
    "LyapunovPruner": "pruner", "measure_and_report": "pruner", "report_spectrum": "pruner",
}
_MODULES = ("cli", "evaluation", "features", "lyapunov", "population", "predictor", "pruner",
            "records", "report", "sweep", "tasks", "train")


def __getattr__(name: str):
    if name in _FROM:
        value = getattr(importlib.import_module(f"lepredict.{_FROM[name]}"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"lepredict.{name}")
    else:
        raise AttributeError(f"module 'lepredict' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM, *_MODULES})


try:
    __version__ = version("lepredict")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LyapunovPruner",
    "LyapunovSpectrum",
    "RunConfig",
    "RunRecord",
    "__version__",
    "chance_loss",
    "lyapunov_spectra",
    "lyapunov_spectrum",
    "lyapunov_spectrum_map",
    "measure_and_report",
    "report_spectrum",
    "features",
    "records",
    "sweep",
    "tasks",
    "train_run",
]
