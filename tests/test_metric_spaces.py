"""Every metric module folder is a Space as `evaluate-cli create` lays it out: app.py loads the
module beside it and opens its Gradio widget, and requirements.txt lists every third-party
package that the folder's Python files import (read with ast, so lazy imports inside functions
count too)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.parent.name for p in (ROOT / "eval").glob("*/*.py") if p.stem == p.parent.name)
# Packages of this repository: a metric module must run without them (a Space has only its folder).
FIRST_PARTY = {"conceptcaps_pipeline", "conceptcaps", "conceptcaps_eval"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_imports(path: Path) -> set[str]:
    """Absolute imports anywhere in the file (relative ones are files of the folder itself)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - {"__future__"}


def _requirements(folder: Path) -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (folder / "requirements.txt").read_text().splitlines())
    requirements = [Requirement(line) for line in lines if line]
    return {_normalize(r.name): r for r in requirements}


def test_every_metric_module_is_covered():
    assert MODULES == ["attribute_coverage", "caption_quality", "clap_score", "fad", "vae_metrics"]


@pytest.mark.parametrize("name", MODULES)
def test_app_loads_its_own_module_and_launches_its_widget(name):
    import evaluate

    app = ROOT / "eval" / name / "app.py"
    assert app.is_file(), f"eval/{name} has no app.py (its README declares app_file: app.py)"
    tree = ast.parse(app.read_text(), filename=str(app))
    *setup, last = tree.body
    # The last statement opens the widget of the module that the app loaded.
    assert isinstance(last, ast.Expr) and isinstance(last.value, ast.Call)
    assert ast.unparse(last.value.func) == "launch_gradio_widget" and len(last.value.args) == 1
    assert "from evaluate.utils import launch_gradio_widget" in {ast.unparse(n) for n in setup}
    # Everything before it runs for real (gradio, which only the widget needs, is not imported): this
    # repository's own app.py, less its last line, executed as `python app.py` would.
    namespace = {"__file__": str(app), "__name__": "app"}
    exec(compile(ast.Module(body=setup, type_ignores=[]), str(app), "exec"), namespace)  # noqa: S102
    module = namespace[ast.unparse(last.value.args[0])]
    assert isinstance(module, evaluate.EvaluationModule) and module.name == name
    assert type(module).__module__.split(".")[-1] == name  # loaded from eval/<name>/<name>.py
    assert f"{name}.py" in app.read_text()


@pytest.mark.parametrize("name", MODULES)
def test_requirements_list_every_third_party_import(name):
    folder = ROOT / "eval" / name
    assert (folder / "requirements.txt").is_file(), f"eval/{name} has no requirements.txt"
    required = _requirements(folder)
    assert "evaluate" in required  # what the template's requirements.txt always holds
    distributions = importlib.metadata.packages_distributions()
    imported = {}
    for path in sorted(folder.glob("*.py")):
        for top in _top_level_imports(path) - set(sys.stdlib_module_names):
            imported.setdefault(top, []).append(path.name)
    assert not FIRST_PARTY & set(imported), f"eval/{name} imports repository packages: {FIRST_PARTY & set(imported)}"
    missing = {}
    for top, files in sorted(imported.items()):
        names = {_normalize(d) for d in distributions.get(top, [top])}  # an import name of no installed package
        if not names & set(required):
            missing[top] = (sorted(names), files)
    assert not missing, f"eval/{name}/requirements.txt lacks (import: (distributions, files)): {missing}"
    # Each requirement is imported by some file of the folder (none is left over) and installable here.
    wanted = {_normalize(d) for top in imported for d in distributions.get(top, [top])}
    assert set(required) <= wanted, f"eval/{name}/requirements.txt lists unused {sorted(set(required) - wanted)}"
    for key, requirement in required.items():
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (key, installed, str(requirement))


def test_package_data_ships_the_space_files():
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in MODULES:
        assert {"README.md", "app.py", "requirements.txt"} <= set(package_data[f"conceptcaps_eval.{name}"]), name


def test_shared_files_are_plain_equal_copies():
    """A metric folder holds no symbolic link (a folder copied alone, or checked out on Windows, loads), and the
    windowing code that clap_score and fad share is one text in two byte-identical files."""
    links = [str(p.relative_to(ROOT)) for p in (ROOT / "eval").rglob("*") if p.is_symlink()]
    assert links == []
    first, second = (ROOT / "eval" / "clap_score" / "clap_windows.py"), (ROOT / "eval" / "fad" / "clap_windows.py")
    assert first.read_bytes() == second.read_bytes(), "eval/fad/clap_windows.py differs from eval/clap_score's: copy it"
