"""lepredict: predict early in training whether an RNN's hyperparameters will train well."""

from __future__ import annotations

from lepredict.lyapunov import LyapunovSpectrum, lyapunov_spectrum, lyapunov_spectrum_map

__version__ = "0.1.0"

__all__ = ["LyapunovSpectrum", "lyapunov_spectrum", "lyapunov_spectrum_map", "__version__"]
