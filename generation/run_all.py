"""Run every stage in order from a preset: distill, VAE, sampling, captioner, captions,
audio, evaluate, build (after evaluate, so that the dataset card shows the metrics), tcav (on
the release), explore; the stages and their order are the `in_run` entries of the stage table
(conceptcaps_pipeline.stages). Each stage skips what is already done, so re-running the same
command after a crash resumes where it stopped.

    conceptcaps run --preset smoke --source ../shared/data/musiccaps/musiccaps-public.csv --run runs/smoke
    conceptcaps run --preset paper --source google/MusicCaps --run runs/paper \\
        --audio_launcher "accelerate launch --config_file accelerate_configs/multi_gpu.yaml"
    conceptcaps run --preset my_preset.yaml --run runs/x --stages distill vae_train vae_sample

A preset (generation/presets/<name>.yaml, or any YAML path) has one section per stage
with that stage's options; `extends: <preset>` at its top starts from another preset's
sections and overrides them key by key (paper_lsr.yaml extends paper.yaml). "@tiny/<name>" in a preset stands for a tiny model (llm,
musicgen, clap, bert, classifier) that is built from a config into RUN/models/<name>, with
tokenizers trained on the distilled captions: the real loading and generation code runs,
but the output is noise.
"""

from __future__ import annotations

import importlib
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import atomic_dir, write_json, write_manifest
from conceptcaps_pipeline.stages import RUN_STAGES, by_name
from conceptcaps_pipeline.taxonomy.source import HUB_DEFAULT

logger = logging.getLogger(__name__)
PRESETS = Path(__file__).parent / "presets"
TINY = "@tiny/"

# The stages `conceptcaps run` runs, in order; a preset's sections are their names (conceptcaps_pipeline.stages).
RUN_ORDER = [entry.name for entry in RUN_STAGES]


@dataclass
class RunArguments:
    run: str = field(metadata={"aliases": ["--out"], "help": "Run directory (created if missing; an existing one is "
                                                            "resumed); --out is an alias."})
    preset: str = field(default="smoke", metadata={"help": "smoke, paper, or the path of a preset YAML file."})
    source: str = field(default=HUB_DEFAULT, metadata={"help": "MusicCaps-style source: a local CSV or a Hub dataset id."})
    stages: list[str] = field(default_factory=list, metadata={"help": f"Run only these stages (default: all of {RUN_ORDER})."})
    audio_launcher: str | None = field(
        default=None,
        metadata={"help": "Run the audio stage through this launcher, e.g. "
                          "'accelerate launch --config_file accelerate_configs/multi_gpu.yaml'."},
    )
    force: bool = field(default=False, metadata={"help": "Redo every selected stage even if its outputs are up to date."})


def load_preset(preset: str, _chain: tuple[str, ...] = ()) -> dict:
    """A preset's sections; `extends: NAME` at its top takes NAME's sections and overrides them key by key."""
    from conceptcaps_pipeline.options import read_config

    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESETS / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ConceptCapsError(f"preset {preset!r} not found ({path}): use one of {known} or the path of a YAML file.")
    try:
        config = read_config(path)
    except ConceptCapsError as err:
        raise ConceptCapsError(str(err).replace("--config", "preset", 1)) from None
    base = config.pop("extends", None)
    if base is not None:
        if not isinstance(base, str) or str(path.resolve()) in _chain:
            raise ConceptCapsError(f"preset {path}: `extends: {base!r}` must name another preset (no cycles).")
        if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
            base = str(path.parent / base)  # a path beside the extending preset
        config = merged(load_preset(base, (*_chain, str(path.resolve()))), config)
    unknown = sorted(set(config) - set(RUN_ORDER))
    if unknown:
        raise ConceptCapsError(f"preset {path} has unknown section(s) {unknown}; sections are stage names: {RUN_ORDER}.")
    for stage, section in config.items():
        if section is not None and not isinstance(section, dict):
            raise ConceptCapsError(f"preset {path}: section {stage!r} holds {section!r}, not a mapping of options.")
    return config


def merged(base: dict, override: dict) -> dict:
    """`base` with `override`'s values, mappings merged key by key (a section's sub-sections too)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_tiny_model(name: str, run: Path) -> Path:
    """RUN/models/<name>, built once from a config (skipped when already there)."""

    target = run / "models" / name
    if (target / "config.json").exists():
        return target
    from conceptcaps_pipeline.run_dir import read_table

    texts = read_table(run / "distilled.parquet", ["caption"], fix=f"re-run `conceptcaps distill --run {run} --force`"
                       ).column("caption").to_pylist()
    logger.info("run: building tiny %s model into %s", name, target)
    with atomic_dir(target) as tmp:
        if name == "llm":
            from conceptcaps_pipeline.testing.tiny_llm import TinyLlmConfig, build_tiny_llm

            build_tiny_llm(tmp, texts, TinyLlmConfig(vocab_size=1024))
        elif name == "musicgen":
            from conceptcaps_pipeline.testing.tiny_musicgen import build_tiny_musicgen

            build_tiny_musicgen(tmp, texts)
        elif name == "clap":
            from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap

            build_tiny_clap(tmp, texts)
        elif name == "bert":
            from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_bert

            build_tiny_bert(tmp, texts)
        elif name == "classifier":
            from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_audio_classifier

            build_tiny_audio_classifier(tmp)
        else:
            raise ConceptCapsError(f"unknown tiny model {TINY}{name}: use llm, musicgen, clap, bert or classifier.")
    return target


def resolve_tiny(options: dict, run: Path) -> dict:
    """Replace "@tiny/<name>" values by the folder of that tiny model, building it if needed."""
    return {
        key: str(build_tiny_model(value[len(TINY):], run)) if isinstance(value, str) and value.startswith(TINY) else value
        for key, value in options.items()
    }


def stage_arguments(stage: str, section: dict, args: RunArguments) -> list:
    """The dataclass instances of one stage: its preset section, checked and converted like the stage's flags."""
    from conceptcaps_pipeline.options import parse_options

    entry = by_name(stage)
    options: dict = {}
    for sub in entry.sections:
        values = (section.get(sub) or {}) if sub else section
        if not isinstance(values, dict):
            raise ConceptCapsError(f"preset section {stage!r}: {sub!r} holds {values!r}, not a mapping of options.")
        options.update(values)
    options = resolve_tiny(options, Path(args.run))
    options["run"] = args.run
    if stage == "distill":
        options["source"] = args.source
    if args.force:
        options["force"] = True
    return parse_options(entry.words, [], options, where=f"preset section {stage!r}")


def _die_with_parent() -> None:
    """In the launched child: the kernel kills it when `conceptcaps run` dies, even by kill -9.

    Why: an orphaned launcher would go on writing clips beside the next run of the same command.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch_audio(launcher: str, section: dict, args: RunArguments) -> None:
    """The audio stage as `LAUNCHER -m conceptcaps_pipeline.cli audio generate --config ...`."""
    import yaml

    run = Path(args.run)
    options = resolve_tiny(dict(section), run)
    config = run / "manifests" / "audio_generate.preset.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({**options, "run": args.run, "force": args.force}))
    command = [*shlex.split(launcher), "-m", "conceptcaps_pipeline.cli", "audio", "generate", "--config", str(config)]
    logger.info("run: %s", shlex.join(command))
    if subprocess.run(command, check=False, preexec_fn=_die_with_parent).returncode != 0:
        raise ConceptCapsError(f"audio stage failed under `{launcher}`; fix the error above and re-run the same command to resume.")


def run_pipeline(args: RunArguments) -> dict:
    """Run the selected stages in order; returns the run manifest with each stage's wall time."""
    started = time.time()
    preset = load_preset(args.preset)
    unknown = sorted(set(args.stages) - set(RUN_ORDER))
    if unknown:
        raise ConceptCapsError(f"unknown stage(s) {unknown}: choose from {RUN_ORDER}.")
    selected = [s for s in RUN_ORDER if s in preset and (not args.stages or s in args.stages)]
    timings = {}
    for stage in selected:
        stage_started = time.time()
        logger.info("run: stage %s", stage)
        if stage == "audio_generate" and args.audio_launcher:
            launch_audio(args.audio_launcher, preset[stage] or {}, args)
        else:
            entry = by_name(stage)
            instances = stage_arguments(stage, preset[stage] or {}, args)
            getattr(importlib.import_module(entry.module), entry.function)(*instances)
        timings[stage] = round(time.time() - stage_started, 2)
        logger.info("run: stage %s done in %.1f s", stage, timings[stage])
    write_json(Path(args.run) / "manifests" / "run.preset.json", preset)
    return write_manifest(
        args.run, "run", args, counts={"stages": selected, "stage_wall_time_s": timings}, started=started,
        extra={"command": shlex.join(["conceptcaps", *sys.argv[1:]]) if sys.argv[1:2] == ["run"] else None},
    )
