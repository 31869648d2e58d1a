"""ConceptCaps as a `datasets` builder that reads a ConceptCaps run directory.

    from conceptcaps import ConceptCaps
    builder = ConceptCaps(config_name="audio", data_dir="runs/demo")      # or "default", "25pct", ...
    builder.download_and_prepare()
    ds = builder.as_dataset()                                             # DatasetDict: train/validation/test

datasets >= 4 does not run loading scripts (`load_dataset("conceptcaps.py")` is refused), so the
builder is used by instantiating the class, as above. The published form of the dataset is the
Parquet release that `conceptcaps build --run RUN` writes into RUN/release/ with this file's
features, configs and rows (`make_example`), in one pass over the audio
(`load_dataset("RUN/release", "audio")`), see docs/release.md.

The run directory must hold `captions.parquet` and `taxonomy.json`, and `audio/` for the audio
configs. Reading and planning a run lives in conceptcaps_pipeline.release.plan, the 70/15/15 split
and the 25% / 10% subsets in conceptcaps_pipeline.release.splits.

Configs: `default` (captions and labels), `audio` (the same rows plus the clip), `25pct`,
`25pct_audio`, `10pct`, `10pct_audio` (the same deterministic share of every split, with and
without audio). Rows are keyed by their id. When the run was scored (`conceptcaps audio score`),
the audio configs also carry `evidence`: per label, aligned with `labels`, the evidence that the
clip carries it (release/rows.py; null where there is none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.concepts import ConceptSets, concept_sets, load_release, tag_mask, to_captum_concepts  # noqa: F401 - the public API
from conceptcaps_pipeline.release.plan import (  # noqa: F401 - public helpers, importable from here as before
    CAPTION_COLUMNS,
    load_tags,
    load_taxonomy,
    plan_run,
    read_audio_index,
    run_fingerprint,
)
from conceptcaps_pipeline.release.rows import CONFIGS, VERSION, features, label_evidence, make_example, tag_categories
from conceptcaps_pipeline.release.splits import SPLITS, SUBSETS, assign_splits, nested_subsets, subset_min_positives  # noqa: F401
from conceptcaps_pipeline.release.stream import stream_release  # noqa: F401 - streaming a row group at a time
from conceptcaps_pipeline.taxonomy import Taxonomy
from conceptcaps_pipeline.tcav import run as tcav_run  # noqa: F401 - TCAV on any torch model (docs/tcav.md)

logger = logging.getLogger(__name__)

# -- constants ----------------------------------------------------------------------------------
_CITATION = """\
@article{sienkiewicz2026conceptcaps,
  title   = {ConceptCaps -- a Distilled Concept Dataset for Interpretability in Music Models},
  author  = {Sienkiewicz and Neumann and Modrzejewski},
  journal = {arXiv preprint arXiv:2601.14157},
  year    = {2026}
}
"""
_DESCRIPTION = (
    "Synthetic music for concept-based interpretability (TCAV and similar): every clip has an explicit "
    "label set from a four-category taxonomy (genre, mood, instrument, tempo), a caption that states "
    "those labels, and audio generated from the caption."
)
_HOMEPAGE = "https://arxiv.org/abs/2601.14157"
_LICENSE = "cc-by-sa-4.0"  # the captions and labels (MusicCaps); an audio config adds its model's terms (_info)
# VERSION (the dataset's version, every config's) lives with the configs table in release/rows.py.


@dataclass
class ConceptCapsConfig(datasets.BuilderConfig):
    """A ConceptCaps config: with or without the audio column, and the share of each split kept."""

    with_audio: bool = False
    fraction: float = 1.0  # 1.0: every row; 0.25 / 0.10: the subsets (the same share of every split)


def _configs() -> list[ConceptCapsConfig]:
    configs = []
    for name, (with_audio, fraction) in CONFIGS.items():
        if fraction >= 1.0:
            text = "Captions, concept labels and the audio." if with_audio else "Captions and concept labels (no audio)."
        else:
            text = f"{fraction:.0%} of every split, {'with' if with_audio else 'no'} audio."
        configs.append(ConceptCapsConfig(name=name, version=VERSION, with_audio=with_audio, fraction=fraction,
                                         description=text))
    return configs


BUILDER_CONFIGS = _configs()


# -- the DatasetInfo of a config ------------------------------------------------------------------
def config_info(config: ConceptCapsConfig, taxonomy: Taxonomy, sampling_rate: int | None, licence: str | None = None,
                evidence: bool = False) -> datasets.DatasetInfo:
    """The DatasetInfo of one config (features, licence, citation): `_info` and `conceptcaps build` share it.
    `evidence`: the run was scored, so an audio config has the `evidence` column."""
    return datasets.DatasetInfo(
        description=_DESCRIPTION,
        features=features(taxonomy, sampling_rate if config.with_audio else None, evidence=config.with_audio and evidence),
        homepage=_HOMEPAGE, license=licence or _LICENSE, citation=_CITATION,
    )


# -- the builder --------------------------------------------------------------------------------
class ConceptCaps(datasets.GeneratorBasedBuilder):
    """ConceptCaps rows from a run directory: `ConceptCaps(config_name=..., data_dir=RUN)`."""

    VERSION = VERSION
    BUILDER_CONFIG_CLASS = ConceptCapsConfig
    BUILDER_CONFIGS = BUILDER_CONFIGS
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *args, hash: str | None = None, **kwargs):
        data_dir = kwargs.get("data_dir")
        if data_dir is None:
            raise ConceptCapsError("ConceptCaps needs data_dir=RUN, a run directory with captions.parquet and taxonomy.json.")
        # Why: the cache folder is keyed by this hash, so a run that changed (or was scored again) is
        # prepared again instead of being served from an old cache.
        super().__init__(*args, hash=hash or _fingerprint(data_dir), **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        run = Path(self.config.data_dir)
        rate, licence, self._evidence = None, None, None
        if self.config.with_audio:
            rate = read_audio_index(run).sampling_rate
            if rate is None:
                raise ConceptCapsError(
                    f"config {self.config.name!r} needs clips in {run / 'audio'}, and there are none: run "
                    f"`conceptcaps audio generate --run {run}` first, or use a config without audio."
                )
            from conceptcaps_pipeline.dataset_card.licence import release_licence

            # The clips carry the terms of the weights that made them (MusicGen: CC BY-NC 4.0).
            licence = release_licence(run, [self.config.name]).configs[self.config.name].text
            # The per-label evidence of `audio score` (None when not scored; evidence of other clips is refused).
            self._evidence = label_evidence(run)
        return config_info(self.config, load_taxonomy(run), rate, licence, evidence=self._evidence is not None)

    def _split_generators(self, dl_manager):
        self._plan = plan_run(self.config.data_dir, self.info.features["labels"].feature.names,
                              with_audio=self.config.with_audio, fractions=[self.config.fraction])
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split}) for split in SPLITS]

    def _generate_examples(self, split: str):
        import pyarrow.parquet as pq

        plan, columns = self._plan, self.info.features
        category_of = tag_categories(columns)
        ids = plan.split_ids(split, self.config.fraction)
        if not self.config.with_audio:
            for clip_id in ids:
                yield clip_id, make_example(plan.rows[clip_id], columns, category_of=category_of)
            return
        wanted = set(ids)
        # Shard by shard, in stored order (= row order): each shard is read once per split.
        for shard, stored in plan.audio.shards:
            mine = [i for i in stored if i in wanted]
            if mine:
                clips = {r["id"]: r for r in pq.read_table(shard, columns=["id", "audio", "duration_s"]).to_pylist()}
                for clip_id in mine:
                    evidence = (getattr(self, "_evidence", None) or {}).get(clip_id, {})
                    yield clip_id, make_example(plan.rows[clip_id], columns, clips[clip_id], category_of, evidence)


def _fingerprint(run: str | Path) -> str:
    """run_fingerprint (captions, taxonomy, audio shards) and the per-label evidence, if the run was scored."""
    import hashlib

    evidence = Path(run) / "audio_evidence" / "evidence.parquet"
    if not evidence.is_file():
        return run_fingerprint(run)
    return hashlib.sha256(f"{run_fingerprint(run)}:{evidence.stat().st_size}:{evidence.stat().st_mtime_ns}"
                          .encode()).hexdigest()[:16]


def label_names(dataset) -> list[str]:
    """The taxonomy tags behind the `labels` ClassLabel of a loaded ConceptCaps split."""
    return dataset.features["labels"].feature.names


if __name__ == "__main__":  # pragma: no cover - a quick look at a run
    import sys

    logging.basicConfig(level=logging.INFO)
    _builder = ConceptCaps(config_name=sys.argv[2] if len(sys.argv) > 2 else "default", data_dir=sys.argv[1])
    _builder.download_and_prepare()
    logger.info("%s", _builder.as_dataset())
