"""The one table of the pipeline's commands: every stage is declared here once.

    from conceptcaps_pipeline.stages import STAGES, RUN_STAGES, by_name, by_words
    by_words(("vae", "sample")).module        # 'conceptcaps_pipeline.vae.sample'
    [s.name for s in RUN_STAGES]              # what `conceptcaps run` does, in order

The CLI's command list and parsers (cli.py, options.py), `conceptcaps run`'s order and preset
sections (run_all.py), the lock's clean-up and the "run X first" hints (run_dir.py), the
dataset card's commands and the README's stage table all read this table. A new stage is one
module (an `...Arguments` dataclass and one function under `@stage(...)` from run_dir.py) plus
one entry here.

Why the table imports nothing of the project: everything reads it, so it must depend on
nothing (no import cycle); the stage modules are imported by name only when their command
runs, so `conceptcaps --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One command of the `conceptcaps` CLI, and the stage of the run directory it is."""

    name: str  # the stage's name: its manifest RUN/manifests/<manifest>.json, its lock, its preset section
    words: tuple[str, ...]  # the command words after `conceptcaps`
    module: str  # the module that holds the arguments dataclasses and the function
    function: str  # the function the command runs with the parsed dataclasses
    arguments: tuple[str, ...]  # the dataclass names in `module`, in the function's argument order
    help: str  # the one line `conceptcaps --help` shows
    outputs: tuple[str, ...] = ()  # what it writes, relative to RUN: leftovers cleaned under its lock, hints
    usage: str = "--run RUN"  # the flags a "run X first" hint shows after the command words
    sections: tuple[str | None, ...] = (None,)  # the preset sub-section of each dataclass (None: the section itself)
    in_run: bool = False  # whether `conceptcaps run` runs it (in the table's order)
    manifest: str | None = None  # the manifest and lock name when it is not `name` (audio generate: "audio")

    @property
    def command(self) -> str:
        """`conceptcaps vae sample`."""
        return " ".join(("conceptcaps", *self.words))

    @property
    def record(self) -> str:
        """The name of its manifest and lock in RUN."""
        return self.manifest or self.name


# In pipeline order: `conceptcaps run` runs the `in_run` stages in this order, and
# `conceptcaps --help` lists the commands in it.
STAGES: tuple[Stage, ...] = (
    Stage("distill", ("distill",), "conceptcaps_pipeline.taxonomy.distill", "distill", ("DistillArguments",),
          "Map MusicCaps tags onto the taxonomy and keep (attributes, caption) pairs.",
          outputs=("taxonomy.json", "distilled.parquet"), usage="--source SOURCE --run RUN", in_run=True),
    Stage("taxonomy_propose", ("taxonomy", "propose"), "conceptcaps_pipeline.taxonomy.propose", "propose",
          ("ProposeArguments",), "Print candidate tags per category with counts, for revising the taxonomy.",
          usage="--source SOURCE"),
    Stage("vae_train", ("vae", "train"), "conceptcaps_pipeline.vae.train", "train_vae", ("VaeTrainArguments",),
          "Train the beta-VAE on the distilled multi-hot attribute vectors.", outputs=("vae",), in_run=True),
    Stage("vae_sample", ("vae", "sample"), "conceptcaps_pipeline.vae.sample", "sample_attributes",
          ("VaeSampleArguments",), "Sample plausible attribute sets from the trained VAE.",
          outputs=("attributes.parquet",), usage="--run RUN --n N", in_run=True),
    # what each latent dimension does; needs only the VAE
    Stage("vae_explain", ("vae", "explain"), "conceptcaps_pipeline.vae.explain", "explain_vae",
          ("VaeExplainArguments",),
          "Explain each latent dimension by traversal: the tags it raises and lowers, with certainty.",
          outputs=("vae/explain.json", "vae/explain.md"), in_run=True),
    Stage("captioner_train", ("captioner", "train"), "conceptcaps_pipeline.captions.train", "train_captioner",
          ("CaptionerArguments", "SFTConfig", "ModelConfig"),
          "Fine-tune an LLM (LoRA/QLoRA via TRL SFTTrainer) to caption attribute sets.",
          outputs=("captioner",), usage="--run RUN --model MODEL", sections=("captioner", "sft", "model"),
          in_run=True),
    Stage("captions_generate", ("captions", "generate"), "conceptcaps_pipeline.captions.generate",
          "generate_captions", ("CaptionsArguments",), "Write one caption per sampled attribute set, resumably.",
          outputs=("captions.parquet",), in_run=True),
    Stage("audio_generate", ("audio", "generate"), "conceptcaps_pipeline.audio.generate", "generate_audio",
          ("AudioArguments",), "Synthesize one MusicGen clip per caption (accelerate launch for many GPUs).",
          outputs=("audio",), in_run=True, manifest="audio"),
    Stage("audio_verify", ("audio", "verify"), "conceptcaps_pipeline.audio.verify", "verify_audio",
          ("VerifyArguments",), "Check every caption has exactly one sound, decodable, non-silent clip."),
    # per-clip, per-label evidence that the audio carries its labels (CLAP, zero-shot; docs/evidence.md)
    Stage("audio_score", ("audio", "score"), "conceptcaps_pipeline.audio.score", "score_audio", ("ScoreArguments",),
          "Score every clip against every tag with CLAP: per-label evidence and per-concept agreement.",
          outputs=("audio_evidence",), in_run=True),
    # evaluate before build, so that the dataset card carries the metrics table
    Stage("evaluate", ("evaluate",), "conceptcaps_pipeline.evaluate.run", "evaluate_run", ("EvaluateArguments",),
          "Score the run with the eval/ metric modules; write RUN/eval/.", outputs=("eval",), in_run=True),
    Stage("build", ("build",), "conceptcaps_pipeline.release.build", "build_release", ("BuildArguments",),
          "Write RUN/release/: Parquet shards per config and split, and the dataset card.", outputs=("release",),
          in_run=True),
    Stage("concepts_export", ("concepts", "export"), "conceptcaps_pipeline.release.export", "export_concepts",
          ("ExportArguments",),
          "Write concept and random sets of a release as audio folders (TCAV layout) or id lists.",
          usage="--run RUN --tags TAG ..."),
    # tcav reads the release: which of its concepts a classifier uses
    Stage("tcav", ("tcav",), "conceptcaps_pipeline.tcav.stage", "run_tcav", ("TcavArguments",),
          "Test which concepts an audio classifier uses for its classes (TCAV, corrected statistics).",
          outputs=("tcav",), in_run=True),
    # explore last: its page shows the release, the evaluation and the VAE's latent pad
    Stage("explore", ("explore",), "conceptcaps_pipeline.explore.page", "explore", ("ExploreArguments",),
          "Write RUN/explorer/: a static page to browse concepts, listen to clips and walk the VAE's latent space.",
          outputs=("explorer",), in_run=True),
    Stage("push", ("push",), "conceptcaps_pipeline.release.push", "push_release", ("PushArguments",),
          "Upload RUN/release/ to the Hub as a new revision (branch, tag or PR).", usage="--run RUN --repo_id ORG/NAME"),
    Stage("run", ("run",), "conceptcaps_pipeline.run_all", "run_pipeline", ("RunArguments",),
          "Run every stage in order from a preset (smoke, paper), resumably.", usage="--preset PRESET --run RUN"),
    Stage("env", ("env",), "conceptcaps_pipeline.env_report", "env_report", ("EnvArguments",),
          "Print the versions, devices and paths a bug report needs.", usage=""),
)

# The stages `conceptcaps run` runs, in order (their names are a preset's sections).
RUN_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.in_run)

_BY_NAME = {s.name: s for s in STAGES}
_BY_WORDS = {s.words: s for s in STAGES}


def by_name(name: str) -> Stage | None:
    """The stage called `name` (`vae_sample`), or None."""
    return _BY_NAME.get(name)


def by_words(words: tuple[str, ...]) -> Stage | None:
    """The stage of a command (`("vae", "sample")`), or None."""
    return _BY_WORDS.get(tuple(words))


def by_record(record: str) -> Stage | None:
    """The stage whose manifest or lock is `record` (`audio` is audio generate's), or None."""
    return next((s for s in STAGES if s.record == record), None)


def producer(output: str) -> Stage | None:
    """The stage that writes `output` (a path relative to RUN, e.g. `vae` or `captions.parquet`), or None."""
    return next((s for s in STAGES if output in s.outputs), None)


def groups() -> set[str]:
    """Command words that only name a group (`vae`, `audio`, ...): they need a verb after them."""
    return {s.words[0] for s in STAGES if len(s.words) > 1} - {s.words[0] for s in STAGES if len(s.words) == 1}
