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

from importlib.metadata import PackageNotFoundError, version

from lepredict import features, records, sweep, tasks
from lepredict.lyapunov import (LyapunovSpectrum, lyapunov_spectra, lyapunov_spectrum,
                                lyapunov_spectrum_map)
from lepredict.records import RunRecord
from lepredict.tasks import chance_loss
from lepredict.train import RunConfig, train_run
from lepredict.pruner import LyapunovPruner, measure_and_report, report_spectrum

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
