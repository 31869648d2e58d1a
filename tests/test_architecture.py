"""The shape of the code: no import cycles, a small top level, one stage table that everything lists.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_architecture.py

The import graph is read with `ast` from the source files (nothing is imported): every
`import` and `from ... import` at any depth, inside functions too, since an import cycle that
only a function closes still ties two modules into one (neither can be read, moved or tested
without the other). Only `if TYPE_CHECKING:` blocks are left out: they never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject.toml's package-dir), and the builder module.
PACKAGES = {"generation": "conceptcaps_pipeline", "dataset_card": "conceptcaps_pipeline.dataset_card",
            "eval": "conceptcaps_eval"}
MAX_TOP_LEVEL = 12


def project_modules() -> dict[str, Path]:
    """Every module of the project by its import name."""
    modules = {"conceptcaps": ROOT / "conceptcaps.py"}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def deepest(dotted: str) -> str | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # `if TYPE_CHECKING:` blocks never run: an import there serves annotations only (evaluate/metrics.py
    # names run.py's EvaluateArguments), so it ties no module to another.
    unused = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
              for n in ast.walk(block) if n is not block}
    for node in ast.walk(tree):
        if id(node) in unused:
            continue
        if isinstance(node, ast.Import):
            targets = [deepest(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: from the module's package up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else deepest(base) for a in node.names]
        else:
            continue
        found.update(t for t in targets if t and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected group of modules."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for group in groups:  # a shortest way back to the group's first module, for the message
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & group)
            if start in nxt:
                found.append([*path, start])
                break
            for n in nxt:
                if n not in seen:
                    seen.add(n)
                    paths.append([*path, n])
    return found


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    """The walker is real: it finds a known import made inside a function, and relative imports."""
    graph = import_graph()
    assert "conceptcaps_pipeline.options" in graph["conceptcaps_pipeline.cli"]  # imported inside run_command
    assert "conceptcaps_pipeline.stages" in graph["conceptcaps_pipeline.run_all"]
    assert any(g for name, g in graph.items() if name.startswith("conceptcaps_eval."))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_generation_top_level_is_small():
    """generation/ holds the CLI, the stage table and shared helpers; the rest lives in sub-packages by concern."""
    top = sorted(p.name for p in (ROOT / "generation").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def test_cli_run_and_readme_list_the_stages_of_the_one_table():
    from conceptcaps_pipeline.cli import _usage
    from conceptcaps_pipeline.run_all import RUN_ORDER, load_preset
    from conceptcaps_pipeline.stages import RUN_STAGES, STAGES

    commands = [" ".join(s.words) for s in STAGES]
    assert len(set(commands)) == len(commands) and len({s.name for s in STAGES}) == len(STAGES)

    # The CLI's command list, in the table's order.
    listed = [line.split("  ")[1] for line in _usage().splitlines() if line.startswith("  ") and
              not line.lstrip().startswith("-")]
    assert [line.strip() for line in listed] == commands

    # `conceptcaps run`: the table's run stages in its order; every preset section is one of them.
    assert RUN_ORDER == [s.name for s in RUN_STAGES]
    assert RUN_ORDER.index("evaluate") < RUN_ORDER.index("build") < RUN_ORDER.index("tcav")
    for preset in ("smoke", "paper", "paper_lsr"):
        assert set(load_preset(preset)) <= set(RUN_ORDER)

    # The README's stage table: one command per table entry, no other.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| stage | command |"):]
    table = table[: table.index("\n\n")]
    documented = []
    for row in table.splitlines()[2:]:
        command = row.split("|")[2]
        documented += re.findall(r"`conceptcaps ([a-z]+(?: [a-z]+)?)(?=[ `])", command)
    assert sorted(set(documented)) == sorted(commands), (sorted(set(documented) ^ set(commands)))


def test_every_stage_entry_is_importable_and_decorated():
    """Each table entry names a real function and dataclasses; a stage that takes a lock does it through `@stage`."""
    import importlib

    from conceptcaps_pipeline.stages import STAGES

    for entry in STAGES:
        module = importlib.import_module(entry.module)
        function = getattr(module, entry.function)
        for name in entry.arguments:
            assert isinstance(getattr(module, name), type), (entry.name, name)
        assert len(entry.sections) == len(entry.arguments), entry.name
        if "stage_lock" in Path(module.__file__).read_text(encoding="utf-8"):
            raise AssertionError(f"{entry.module} takes the lock itself: use @stage({entry.name!r}) from run_dir")
        if entry.outputs:
            assert getattr(function, "stage", None) is entry, f"{entry.module}.{entry.function} lacks @stage"


def test_the_stage_skeleton_checks_then_takes_the_stages_own_lock(tmp_path):
    """`@stage`: a bad option fails before the lock is asked for; the lock is the stage's (a baseline's own)."""
    import pytest
    from conceptcaps_pipeline.errors import ConceptCapsError
    from conceptcaps_pipeline.run_dir import stage_lock
    from conceptcaps_pipeline.vae.sample import VaeSampleArguments, sample_attributes
    from conceptcaps_pipeline.vae.train import VaeTrainArguments, train_vae

    with stage_lock(tmp_path, "vae_train"):
        with pytest.raises(ConceptCapsError, match="--epochs 0: give at least 1"):
            train_vae(VaeTrainArguments(run=str(tmp_path), epochs=0))
        with pytest.raises(ConceptCapsError, match=f"vae_train is already running on {tmp_path}.*pid"):
            train_vae(VaeTrainArguments(run=str(tmp_path)))
    with stage_lock(tmp_path, "vae_sample_random"):
        with pytest.raises(ConceptCapsError, match="vae_sample_random is already running"):
            sample_attributes(VaeSampleArguments(run=str(tmp_path), random_control=True))
        with pytest.raises(ConceptCapsError, match="taxonomy.json not found"):  # the real sets' lock is free
            sample_attributes(VaeSampleArguments(run=str(tmp_path)))
    assert not (tmp_path / ".locks").exists()  # every lock was released
