"""The doctest examples of the library modules that carry them (concept sets, TCAV statistics)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["conceptcaps_pipeline.release.concepts", "conceptcaps_pipeline.tcav.stats", "conceptcaps_pipeline.cli", "conceptcaps_pipeline.audio.generate"])
def test_module_examples(name):
    module = importlib.import_module(name)
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0, results
