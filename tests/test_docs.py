"""The docs stay true: README.md's Python blocks and every shell command of README.md and docs/*.md, run or
checked against the smoke run (the conftest `smoke_run` fixture: `conceptcaps run --preset smoke` on the real CSV).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -rs tests/test_docs.py      # -rs lists what was skipped, and why

What is extracted: the fenced ```python blocks of README.md, and each line of the fenced ```bash blocks of
README.md and docs/*.md (backslash continuations joined, `# comments` dropped), one test per command, in the
order of the files. What happens to a command:
- `conceptcaps ...`: its options are parsed by the stage's own parser (a renamed flag fails here), then it runs
  in this process on a copy of the smoke run (runs/demo, runs/paper, runs/smoke and RUN all name that copy),
  unless NOT_RUN names it with the reason (Hub, GPU, paper-size work);
- `python -m MODULE`, `accelerate launch ... -m MODULE ...`: the module imports, the config file exists, and the
  `conceptcaps` command after the module parses;
- anything else (benchmarks, scripts, pip, hf, Slurm, a browser) is checked where there is something to check
  (the file exists, the extra is declared) and otherwise skipped with its reason (SKIP_TOOLS).
The commands share one copy and run in order, so a command may use what an earlier one wrote (captions.md's
`--zero_shot` captions are what evaluate.md's `--baseline zero_shot` scores), as a reader following the docs would.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import shutil
import statistics
from pathlib import Path

import pytest
from conceptcaps_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_NAMES = ("runs/demo", "runs/paper", "runs/smoke", "RUN")  # what the docs call a run directory

# `conceptcaps` commands that are parsed but not run here: (pattern searched in the command, reason).
NOT_RUN = [
    (r"^conceptcaps audio generate .*--model runs/tiny-musicgen", ("a timing on the tiny MusicGen over a run's captions "
                                                                  "(docs/performance.md); tests/test_audio_generate.py "
                                                                  "runs best of K on it")),
    (r"^conceptcaps audio generate\b", ("MusicGen from the Hub (facebook/musicgen-*; no network here); the smoke run's "
                                       "audio stage runs the same code on the tiny MusicGen")),
    (r"^conceptcaps captioner train --config generation/configs/captioner\.yaml",
     "QLoRA on Llama-3.1-8B-Instruct: the weights and a CUDA GPU (bitsandbytes)"),
    (r"--model /models/", "needs a local copy of Llama-3.1-8B-Instruct"),
    (r"^(OMP_NUM_THREADS=\d+ )?conceptcaps run --preset paper", "the paper-size run: GPU hours and models from the Hub"),
    (r"^conceptcaps vae train\b", ("the paper's VAE (150 epochs, 1024/256): minutes on 2 cores; the smoke run trains "
                                  "the same code for 30 epochs")),
    (r"--set tempo=|--axes tempo arousal", ("needs a VAE trained with --lsr (skipped above for time); "
                                           "tests/test_vae_lsr.py and tests/test_explore.py run it")),
    (r"--reference_audio", ("reference clips (GTZAN) from a folder or the Hub: none here; tests/test_metric_fad.py "
                           "computes FAD on clips")),
    (r"^conceptcaps tcav .*--model sanchit-gandhi/", ("the GTZAN classifier from the Hub; the smoke run's tcav stage "
                                                     "runs the same code on the tiny classifier")),
    (r"^conceptcaps captions generate\b", ("the tiny LLM writes noise, which the default checks refuse "
                                          "(--require_end_of_turn, --max_failure_rate; the smoke preset relaxes them), "
                                          "and the smoke run's captions were made with the preset's settings; the smoke "
                                          "run's captions stage runs this code")),
    (r"^conceptcaps captioner train --run \S+ --model runs/tiny-llm", ("a LoRA fine-tune on all 3,356 distilled pairs: "
                                                                      "minutes on CPU; tests/test_captioner.py runs it "
                                                                      "on 16")),
    (r"^conceptcaps evaluate\b", ("evaluate's default models (CLAP, BERTScore's and MAUVE's) come from the Hub; the "
                                 "smoke run's evaluate stage runs this code on tiny models, tests/test_baselines.py "
                                 "the baselines")),
    (r"^conceptcaps concepts export\b", ("concept sets of the paper's size (n=50 positives): the smoke release holds about "
                                        "11 per tag; tests/test_concepts.py exports from a release with a smaller --n")),
    (r"^conceptcaps build --run \S+ --repo_id", ("the card with a Hub id: tests/test_card.py builds exactly this "
                                               "(repo_id my-org/conceptcaps)")),
    (r"^conceptcaps push\b", "a Hub revision (network and a token); tests/test_push.py runs push on a local server"),
]

# Other tools: (pattern, reason). Checked where possible (see check_tool), never run.
SKIP_TOOLS = [
    (r"^bash scripts/install\.sh", ("the README's set-up commands: the install is this environment, smoke.sh is the "
                                   "smoke_run fixture (the same `run --preset smoke`), pytest is this suite")),
    (r"^\.venv/bin/python -m pytest", "this test suite"),
    (r"^pip install", "installs packages (network)"),
    (r"^hf ", "the Hub CLI (network, a token)"),
    (r"^srun ", "Slurm, several nodes with GPUs"),
    (r"^accelerate launch --config_file accelerate_configs/(single_gpu|multi_gpu|multi_node)\.yaml",
     "GPUs (one or many); the config file and the module are checked"),
    (r"^accelerate launch --config_file accelerate_configs/cpu\.yaml", ("two processes: the conftest audio_run fixture "
                                                                       "launches exactly this")),
    (r"^export ", "environment for the Slurm example above"),
    (r"\s\.\.\.(\s|$)", "a synopsis: `...` stands for the options of the command above it"),
    (r"^chromium ", "opens a browser window; tests/test_explore.py drives a headless Chromium"),
    (r"^([A-Z_]+=\S+ )*(\.venv/bin/)?python benchmarks/", "benchmarks print figures and take minutes; the script exists"),
    (r"^(\.venv/bin/)?python -m conceptcaps_pipeline\.testing\.", ("builds a tiny model; the conftest fixtures build "
                                                                   "them with the same functions; the module imports")),
]


def shell_commands(path: Path) -> list[str]:
    """The command lines of the ```bash blocks of one Markdown file (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL):
        pending = ""
        for line in block.splitlines():
            line = pending + line.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment (a `#` inside a word stays)
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL)


COMMANDS = [(doc, line) for doc in DOCS for line in shell_commands(doc)]


def reason(table: list[tuple[str, str]], command: str) -> str | None:
    return next((why for pattern, why in table if re.search(pattern, command)), None)


def substitute(command: str, run: Path, csv: Path, scratch: Path) -> list[str]:
    """The command's words with the docs' placeholders made real: run names -> the smoke copy, the tiny-model
    folders the docs build -> the smoke run's, the CSV -> the test CSV, an output folder -> scratch."""
    words = shlex.split(command)
    words = [w for w in words if not (w.startswith("[") or w.endswith("]"))]  # [optional] parts of a synopsis
    out = []
    for word in words:
        if word in ("runs/tiny-llm",):
            word = str(run / "models" / "llm")
        elif word in RUN_NAMES:
            word = str(run)
        elif word.endswith("musiccaps-public.csv"):
            word = str(csv)
        elif word == "sets/":
            word = str(scratch / "sets")
        out.append(word)
    return out


def conceptcaps_words(words: list[str]) -> list[str] | None:
    """The arguments after `conceptcaps` (or after `-m conceptcaps_pipeline.cli`), or None."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words and words[0] == "conceptcaps":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "conceptcaps_pipeline.cli":
        return words[words.index("-m") + 2:]
    return None


def parse_only(argv: list[str]) -> None:
    """Parse a conceptcaps command with its stage's parser, as `conceptcaps` does before running it."""
    from conceptcaps_pipeline.cli import _find
    from conceptcaps_pipeline.options import parse_options

    found = _find(argv)
    assert found is not None, f"unknown command {argv[:2]}"
    parse_options(*found)


@pytest.fixture(scope="module")
def docs_run(smoke_run, tmp_path_factory) -> Path:
    """A copy of the smoke run that the docs' commands may change."""
    run = tmp_path_factory.mktemp("docs") / "run"
    shutil.copytree(smoke_run[0], run)
    return run


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """datasets' cache under tmp_path (the README's builder block writes a prepared copy there)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path / "hf-datasets"


# README's Python lines that need the Hub, by their exact text, with the reason.
SKIP_PYTHON_LINES = {
    'ds = load_dataset("ORG/conceptcaps")': "a Hub dataset (network); the next line loads the smoke release instead",
}


@pytest.mark.parametrize("index", range(len(python_blocks(DOCS[0]))), ids=lambda i: f"README-python-{i}")
def test_readme_python_block_runs(index, smoke_run, offline_cache, monkeypatch, tmp_path):
    run, _ = smoke_run
    block = python_blocks(DOCS[0])[index]
    lines = []
    for line in block.splitlines():
        code = line.split("  #")[0].strip()
        if code in SKIP_PYTHON_LINES:
            continue  # listed above with its reason
        lines.append(line)
    source = "\n".join(lines).replace("runs/smoke", str(run))
    assert str(run) in source, "the block does not use the smoke run: the harness would test nothing"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(source, f"README.md python block {index}", "exec"), namespace)  # noqa: S102 - the README's own code
    if "positives" in namespace:  # the concept-set block: positives hold the tag, randoms never do
        positives, randoms = namespace["positives"], namespace["randoms"]
        piano = namespace["piano"]
        assert len(positives) and all(piano in r for r in positives["labels"])
        assert len(randoms) == 10 and all(piano not in r for s in randoms for r in s["labels"])
    if "builder" in namespace:
        assert len(namespace["ds"]["train"]) and "audio" in namespace["ds"]["train"].features


@pytest.mark.parametrize(("doc", "command"), COMMANDS,
                         ids=[f"{doc.name}:{i}" for i, (doc, _) in enumerate(COMMANDS)])
def test_doc_command(doc, command, docs_run, musiccaps_csv, tmp_path, offline_cache):
    words = substitute(command, docs_run, musiccaps_csv, tmp_path)
    argv = conceptcaps_words(words)
    if "-m" in words:  # python -m X / accelerate launch -m X: the module imports
        module = words[words.index("-m") + 1]
        if module != "pytest":
            assert importlib.util.find_spec(module) is not None, f"{doc.name}: `-m {module}` does not import"
    if "--config_file" in words:
        assert (ROOT / words[words.index("--config_file") + 1]).is_file()
    skip = reason(SKIP_TOOLS, command)
    if argv is not None and skip is None:
        parse_only(argv)
    if skip is not None or argv is None:
        check_tool(words)
        pytest.skip(skip or f"not a conceptcaps command: {command}")
    not_run = reason(NOT_RUN, command)
    if not_run is not None:
        pytest.skip(f"parsed, not run: {not_run}")
    assert main(argv) == 0, f"{doc.name}: `{command}` failed"


def check_tool(words: list[str]) -> None:
    """What can be checked of a command that is not run: the script or file it names exists, the extra exists."""
    for word in words:
        if re.fullmatch(r"(benchmarks|scripts)/[\w./-]+\.(py|sh)", word):
            assert (ROOT / word).is_file(), f"{word} does not exist"
    if words[:2] == ["pip", "install"]:
        extras = re.findall(r"\.\[([\w,]+)\]", " ".join(words))
        declared = re.search(r"\[project\.optional-dependencies\](.*?)(\n\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.DOTALL)
        for extra in (e for group in extras for e in group.split(",")):
            assert declared and re.search(rf"^{extra}\s*=", declared.group(1), re.MULTILINE), f"extra [{extra}] not declared"


def test_every_command_is_extracted_and_the_skip_lists_are_used():
    """The harness sees the docs' commands, and no NOT_RUN or SKIP_TOOLS entry is stale (matches nothing)."""
    commands = [c for _, c in COMMANDS]
    assert sum(c.startswith("conceptcaps ") for c in commands) >= 30
    for pattern, _ in NOT_RUN + SKIP_TOOLS:
        assert any(re.search(pattern, c) for c in commands), f"skip entry {pattern!r} matches no command: drop it"


def test_module_names_and_paths_in_the_docs_exist():
    """Every `-m MODULE`, `conceptcaps_pipeline.x.y` name and repository path the docs mention exists."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for module in set(re.findall(r"-m\s+([a-z_][\w.]*)", text)) - {"pytest"}:
            assert importlib.util.find_spec(module) is not None, f"{doc.name}: `-m {module}` does not import"
        for dotted in set(re.findall(r"\bconceptcaps_pipeline(?:\.\w+)+", text)):
            parts = dotted.split(".")
            k = 1
            while k < len(parts) and _is_module(".".join(parts[:k + 1])):
                k += 1
            obj = importlib.import_module(".".join(parts[:k]))
            for name in parts[k:]:
                assert hasattr(obj, name), f"{doc.name}: {dotted} does not exist"
                obj = getattr(obj, name)
        for path in set(re.findall(r"(?<![\w/.-])((?:generation|dataset_card|eval|benchmarks|scripts|accelerate_configs|"
                                   r"tests)/[\w./-]*\w)", text)):
            assert (ROOT / path).exists(), f"{doc.name}: {path} does not exist"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module (a function), not a sub-module
        return False


# -- the numbers the README and docs quote, against their source ---------------------------------------------
def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_readme_distill_figures_are_the_runs(smoke_run):
    """The distill table and the caption-cleaning sentence are the smoke run's distill manifest (the full CSV)."""
    run, _ = smoke_run
    counts = json.loads((run / "manifests" / "distill.json").read_text())["counts"]
    readme = DOCS[0].read_text(encoding="utf-8")
    header = re.search(r"On the MusicCaps CSV \(([\d,]+) rows, taxonomy (\d+\.\d+\.\d+)[;)]", readme)
    assert header and _number(header.group(1)) == counts["source_rows"] and header.group(2) == counts["taxonomy_version"]
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([^|]+?) \| (.+?) \|", readme, flags=re.MULTILINE)}
    assert table["rows parsed"].startswith(f"{counts['parsed_rows']:,} ({counts['bad_rows']} unparsable)")
    assert table["distilled pairs"] == (f"**{counts['kept']:,}** ({counts['train']:,} train / "
                                        f"{counts['validation']:,} validation)")
    assert _number(table["dropped: < 3 categories"]) == counts["dropped"]["too_few_categories"]
    assert _number(table["dropped: contradictory tags"]) == counts["dropped"]["contradictory_tags"]
    assert table["taxonomy size"] == f"{counts['tags_used']} tags"
    four = re.search(r"\(([\d,]+) rows cover all four categories\)", readme)
    assert four and _number(four.group(1)) == counts["categories_covered_histogram"]["4"]
    cleaning = counts["caption_cleaning"]
    sentence = re.search(r"([\d,]+) of ([\d,]+) captions\s+changed \(([\d.]+)%; ([\d,]+) sentences dropped, ([\d,]+) "
                         r"edited\)", readme)
    assert sentence and [_number(g) for g in sentence.groups()] == [
        cleaning["captions_changed"], counts["kept"], round(100 * cleaning["share_changed"], 1),
        cleaning["sentences_dropped"], cleaning["sentences_edited"]]


def test_readme_split_shares_are_the_smoke_releases(smoke_run):
    """The README's split shares of the smoke release are what its card states (dataset_card/card.py)."""
    from conceptcaps_pipeline.dataset_card.card import split_shares

    run, _ = smoke_run
    rows = json.loads((run / "manifests" / "build.json").read_text())["counts"]["rows"]["default"]
    readme = " ".join(DOCS[0].read_text(encoding="utf-8").split())
    shares = split_shares(rows)
    assert f"aiming at {shares['target']};" in readme and f"{shares['actual']} on the smoke run" in readme


def test_readme_smoke_release_size(smoke_run):
    """The size of the smoke release the README quotes is the build manifest's (within 0.3 MB: figures change)."""
    run, _ = smoke_run
    size = json.loads((run / "manifests" / "build.json").read_text())["counts"]["bytes"] / 1e6
    quoted = re.search(r"leaves a ([\d.]+) MB release folder", " ".join(DOCS[0].read_text(encoding="utf-8").split()))
    assert quoted and abs(float(quoted.group(1)) - size) <= 0.3, (quoted and quoted.group(1), round(size, 2))


def test_readme_taxonomy_presets_and_version_figures():
    """Tags per category, the dataset version, and the smoke and paper presets' figures the README quotes."""
    from conceptcaps_pipeline.run_all import load_preset
    from conceptcaps_pipeline.taxonomy import Taxonomy

    from conceptcaps import ConceptCaps

    readme = " ".join(DOCS[0].read_text(encoding="utf-8").split())  # line breaks fall anywhere in a paragraph
    taxonomy = Taxonomy.load(ROOT / "generation" / "data" / "taxonomy.yaml")
    sizes = [sum(taxonomy.category_of[t] == c for t in taxonomy.tags) for c in ("genre", "mood", "instrument", "tempo")]
    quoted = re.search(r"genre \((\d+) tags\), mood \((\d+)\), instrument \((\d+), vocals included\), tempo \((\d+)\)",
                       readme)
    assert quoted and [int(g) for g in quoted.groups()] == sizes
    assert f"the dataset version ({ConceptCaps.VERSION})" in readme

    smoke = load_preset("smoke")
    sample, audio = smoke["vae_sample"], smoke["audio_generate"]
    assert len(sample["tags"]) == 4 and (f"{sample['n']} prior attribute sets topped up to {sample['min_per_tag']} sets "
                                         f"for each of four concepts, {audio['duration']:g}-second clips") in readme
    paper = load_preset("paper")
    sample, audio = paper["vae_sample"], paper["audio_generate"]
    assert f"guidance {audio['guidance_scale']:g}, top-k {audio['top_k']}" in readme
    assert (f"{audio['duration']:g} s clips, {sample['n']:,} prior attribute sets topped up to "
            f"{sample['min_per_tag']} per tag") in readme


def test_explorer_doc_figures_are_the_smoke_runs(smoke_run):
    """docs/explorer.md's smoke figures (concepts, clips, audio, grid) are the smoke run's explore manifest, and the
    pad's sets are as long as the release's (both decoded with the run's set sizes)."""
    import pyarrow.parquet as pq

    run, _ = smoke_run
    counts = json.loads((run / "manifests" / "explore.json").read_text())["counts"]
    doc = " ".join((ROOT / "docs" / "explorer.md").read_text(encoding="utf-8").split())
    quoted = re.search(r"On the smoke run the stage takes about [\d.]+ s \(([\d,]+) concepts, ([\d,]+) clips, ([\d.]+) MB "
                       r"of audio, (\d+) x (\d+) grid[;)]", doc)
    assert quoted
    assert [int(quoted.group(i)) for i in (1, 2, 4, 5)] == [counts["concepts"], counts["clips_with_audio"],
                                                             counts["grid_size"], counts["grid_size"]]
    assert float(quoted.group(3)) == round(counts["audio_bytes"] / 1e6, 1)

    text = (run / "explorer" / "data.js").read_text(encoding="utf-8")
    pad = json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))["pad"]
    per_point = [len(pad["sets"][cell]) for cell in pad["cells"]]
    release = [len(r["aspect_list"]) for shard in (run / "release" / "data" / "default").glob("*.parquet")
               for r in pq.read_table(shard, columns=["aspect_list"]).to_pylist()]
    assert abs(statistics.mean(per_point) - statistics.mean(release)) < 1.0, (statistics.mean(per_point),
                                                                              statistics.mean(release))


def test_cpu_accelerate_config_does_what_its_comments_say():
    """accelerate_configs/cpu.yaml: torchrun starts its two processes (MULTI_GPU), `use_cpu` does not reach them
    (no ACCELERATE_USE_CPU in their environment: the stage's --cpu or a machine without GPUs puts them on CPU),
    and with OMP_NUM_THREADS unset it splits the physical cores between the processes."""
    import os

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = ROOT / "accelerate_configs" / "cpu.yaml"
    comments = config.read_text()
    assert re.search(r"^use_cpu: true\s+# .*does not", comments, flags=re.MULTILINE)
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), "-m", "conceptcaps_pipeline.cli", "audio", "generate"])
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        args, _, _ = _validate_launch_command(args)
        env = prepare_multi_gpu_env(args)
    finally:
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    assert args.multi_gpu and not args.cpu and args.use_cpu and args.num_processes == 2
    assert "ACCELERATE_USE_CPU" not in env or env["ACCELERATE_USE_CPU"] == os.environ.get("ACCELERATE_USE_CPU")
    import psutil

    per_process = int(psutil.cpu_count(logical=False) / 2)
    assert env["OMP_NUM_THREADS"] == str(max(1, per_process))
