"""The `conceptcaps` command: one sub-command per pipeline stage.

    conceptcaps --help
    conceptcaps distill --help
    conceptcaps vae train --run runs/demo --epochs 150

Every sub-command parses its dataclass(es) of arguments the TRL way: `--config FILE.yaml`
gives defaults, command-line flags override them. Stage modules are imported only when
their command runs, so `--help` stays fast. A `ConceptCapsError` (bad input, missing
artifact) is printed as one message, without a traceback, and exits with status 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# command words -> (module, function, dataclass names in that module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, tuple[str, ...], str]] = {
    ("distill",): ("generation.distill", "distill", ("DistillArguments",),
                   "Map MusicCaps tags onto the taxonomy and keep (attributes, caption) pairs."),
    ("taxonomy", "propose"): ("generation.taxonomy_propose", "propose", ("ProposeArguments",),
                              "Print candidate tags per category with counts, for revising the taxonomy."),
    ("vae", "train"): ("generation.vae_train", "train_vae", ("VaeTrainArguments",),
                       "Train the beta-VAE on the distilled multi-hot attribute vectors."),
    ("vae", "sample"): ("generation.vae_sample", "sample_attributes", ("VaeSampleArguments",),
                        "Sample plausible attribute sets from the trained VAE."),
    ("captioner", "train"): ("generation.captioner_train", "train_captioner",
                             ("CaptionerArguments", "SFTConfig", "ModelConfig"),
                             "Fine-tune an LLM (LoRA/QLoRA via TRL SFTTrainer) to caption attribute sets."),
    ("captions", "generate"): ("generation.captions_generate", "generate_captions", ("CaptionsArguments",),
                               "Write one caption per sampled attribute set, resumably."),
    ("audio", "generate"): ("generation.audio_generate", "generate_audio", ("AudioArguments",),
                            "Synthesize one MusicGen clip per caption (accelerate launch for many GPUs)."),
    ("audio", "verify"): ("generation.audio_verify", "verify_audio", ("VerifyArguments",),
                          "Check every caption has exactly one sound, decodable, non-silent clip."),
    ("build",): ("generation.build", "build_release", ("BuildArguments",),
                 "Write RUN/release/: Parquet shards per config and split, and the dataset card."),
    ("evaluate",): ("generation.evaluate_run", "evaluate_run", ("EvaluateArguments",),
                    "Score the run with the eval/ metric modules; write RUN/eval/."),
    ("concepts", "export"): ("generation.concepts_export", "export_concepts", ("ExportArguments",),
                             "Write concept and random sets of a release as audio folders (TCAV layout) or id lists."),
    ("tcav",): ("generation.tcav", "run_tcav", ("TcavArguments",),
                "Test which concepts an audio classifier uses for its classes (TCAV, corrected statistics)."),
    ("push",): ("generation.push", "push_release", ("PushArguments",),
                "Upload RUN/release/ to the Hub as a new revision (branch, tag or PR)."),
    ("run",): ("generation.run_all", "run_pipeline", ("RunArguments",),
               "Run every stage in order from a preset (smoke, paper), resumably."),
}


def _usage() -> str:
    width = max(len(" ".join(words)) for words in COMMANDS)
    lines = [
        "usage: conceptcaps <command> [options]   (conceptcaps <command> --help for its options)",
        "",
        "Build, evaluate and publish the ConceptCaps dataset. Stages share one run directory.",
        "",
        "commands:",
    ]
    lines += [f"  {' '.join(words):<{width}}  {entry[3]}" for words, entry in COMMANDS.items()]
    return "\n".join(lines)


def _find(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for length in (2, 1):
        words = tuple(argv[:length])
        if words in COMMANDS:
            return words, argv[length:]
    return None


def make_parser(words: tuple[str, ...]):
    """The TrlParser of one sub-command (YAML `--config` plus command-line overrides)."""
    from trl import TrlParser

    module_name, _, class_names, help_line = COMMANDS[words]
    module = importlib.import_module(module_name)
    types = [getattr(module, name) for name in class_names]
    description = (module.__doc__ or help_line).strip()
    import argparse

    return TrlParser(
        types, prog=f"conceptcaps {' '.join(words)}", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run_command(argv: list[str]):
    """Parse argv for the sub-command it names and run it; returns the stage's result."""
    found = _find(argv)
    if found is None:
        raise SystemExit(f"{_usage()}\n\nconceptcaps: unknown command {' '.join(argv[:2])!r}")
    words, rest = found
    module_name, function_name, _, _ = COMMANDS[words]
    arguments = make_parser(words).parse_args_and_config(rest)
    function = getattr(importlib.import_module(module_name), function_name)
    return function(*arguments)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    logging.basicConfig(
        level=os.environ.get("CONCEPTCAPS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .errors import ConceptCapsError

    try:
        run_command(argv)
    except ConceptCapsError as err:
        print(f"conceptcaps: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
