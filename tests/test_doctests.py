"""The ``Examples:`` sections of the library's public functions run as doctests, under the suite's
8-device CPU conftest: an example whose printed output no longer matches fails here."""

from __future__ import annotations

import doctest
import importlib

import pytest

# The log-prob and model examples share one tiny model: one test, so that its init compiles once.
MODEL_MODULES = ("alignjax.models.model", "alignjax.logprobs")
LOSS_MODULES = (
    "alignjax.losses.common",
    "alignjax.losses.pairwise",
    "alignjax.losses.reference_free",
    "alignjax.losses.unpaired",
    "alignjax.losses.listwise",
    "alignjax.losses.token_level",
    "alignjax.losses.supervised",
    "alignjax.losses.reward",
    "alignjax.losses.policy_gradient",
    "alignjax.losses.step_level",
    "alignjax.losses.metrics",
    "alignjax.losses.diffusion",
    "alignjax.losses.logic",
    "alignjax.losses.registry",
)


def _run(name: str) -> None:
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    assert tests, f"{name} has no Examples: to run"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see above)"


@pytest.mark.parametrize("name", LOSS_MODULES)
def test_loss_examples(name):
    _run(name)


def test_model_and_logprobs_examples():
    for name in MODEL_MODULES:
        _run(name)
