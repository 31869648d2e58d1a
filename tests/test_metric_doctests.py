"""Run the doctests of every metric module, loaded the way users load them: evaluate.load("eval/<name>")."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MODULES = ["clap_score", "fad", "caption_quality", "vae_metrics", "attribute_coverage"]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctest(name, monkeypatch):
    if not (ROOT / "eval" / name / f"{name}.py").is_file():
        pytest.skip(f"eval/{name} is not in this checkout")
    import evaluate

    monkeypatch.chdir(ROOT)  # the examples load modules by their path from the repository root
    metric = evaluate.load(f"eval/{name}")
    module = sys.modules[type(metric).__module__]
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [test for test in finder.find(module, module.__name__) if test.examples]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"eval/{name} has no doctest examples"
    assert results.failed == 0, f"{results.failed} doctest example(s) of eval/{name} failed (see the output above)"
