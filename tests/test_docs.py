"""The docstring examples run and print what they say."""

from __future__ import annotations

import doctest

import optuna
import pytest

import lepredict.evaluation
import lepredict.features
import lepredict.population
import lepredict.pruner
import lepredict.report
import lepredict.train


@pytest.mark.parametrize("module", [lepredict.pruner, lepredict.features, lepredict.train,
                                    lepredict.report, lepredict.population,
                                    lepredict.evaluation])
def test_docstring_examples(module):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
