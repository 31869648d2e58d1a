"""Fill the dataset card template (dataset_card/template.md) from a run and its release.

    from conceptcaps_pipeline.dataset_card.card import write_card
    write_card("runs/demo", "runs/demo/release", infos=..., stats=...)   # called by `conceptcaps build`

The card is rendered by huggingface_hub: `DatasetCard.from_template(DatasetCardData(...),
template_path=dataset_card/template.md, **context)`. Its YAML header holds the licence, task
categories, size category, source datasets, `configs:` (the data files of every config and
split) and `dataset_info` (typed features and split sizes of every config, as `datasets` writes
them). Every number and name in the body comes from the run: the stage manifests in
RUN/manifests/ (models, arguments, package versions; the exact commands are rebuilt from the
recorded arguments), RUN/taxonomy.json, the written Parquet shards, RUN/eval/metrics.json when it
exists (with its per-clip CLAP scores), RUN/vae/history.json, and the figures drawn from them.

Beside the card it writes RELEASE/LICENSE.md (which licence applies to which config, decided
from the recorded models: dataset_card/licence.py), RELEASE/figures/ (dataset_card/figures.py)
and a few clips as RELEASE/examples/*.wav for the card's audio players (dataset_card/examples.py).
Nothing in them names a path of the machine that built the release.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
from pathlib import Path

from conceptcaps_pipeline.dataset_card.figures import (
    FigureData,
    clap_by_tag,
    fonts_read_once,
    frequency_correlation,
    write_figures,
)
from conceptcaps_pipeline.dataset_card.licence import LICENSE_FILE, release_licence, write_license_file
from conceptcaps_pipeline.dataset_card.manifests import read_manifests
from huggingface_hub import DatasetCard, DatasetCardData

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("template.md")
TASK_CATEGORIES = ["text-to-audio", "audio-classification"]
TAGS = ["music", "synthetic", "interpretability", "concept-based-explanations", "tcav"]  # Hub tags: kebab-case
TINY_TAG = "smoke-test"  # a release made with tiny random-weight models says so in its metadata too
PAPER_URL = "https://arxiv.org/abs/2601.14157"
MUSICCAPS_ID = "google/MusicCaps"

PAPER_BIBTEX = """@article{sienkiewicz2026conceptcaps,
  title   = {ConceptCaps -- a Distilled Concept Dataset for Interpretability in Music Models},
  author  = {Sienkiewicz and Neumann and Modrzejewski},
  journal = {arXiv preprint arXiv:2601.14157},
  year    = {2026}
}"""
MUSICCAPS_BIBTEX = """@article{agostinelli2023musiclm,
  title   = {MusicLM: Generating Music From Text},
  author  = {Agostinelli, Andrea and Denk, Timo I. and Borsos, Zal{\\'a}n and Engel, Jesse and Verzetti, Mauro and
             Caillon, Antoine and Huang, Qingqing and Jansen, Aren and Roberts, Adam and Tagliasacchi, Marco and
             Sharifi, Matt and Zeghidour, Neil and Frank, Christian},
  journal = {arXiv preprint arXiv:2301.11325},
  year    = {2023}
}"""

# Licences stated only where they are certain; anything else points at the model's own card.
MODEL_LICENSES = (
    ("facebook/musicgen", "CC-BY-NC 4.0 (MusicGen weights): non-commercial use only"),
    ("meta-llama/llama-3.1", "Llama 3.1 Community License"),
    ("meta-llama/meta-llama-3.1", "Llama 3.1 Community License"),
)

# What the card says of a model's licence by the kind dataset_card/licence.py found it to be.
KIND_LICENSES = {
    "tiny": "none: random weights built from a config by `conceptcaps run` (the smoke preset); the output is noise",
    "musicgen": "CC-BY-NC 4.0 (MusicGen weights): non-commercial use only",
}


def model_license(model: str | None) -> str:
    """The licence of a model id where it is known for certain, else where to look."""
    if not model:
        return "unknown"
    lowered = model.lower()
    for prefix, licence in MODEL_LICENSES:
        if lowered.startswith(prefix):
            return licence
    if Path(model).exists() or model.startswith(("/", ".")):
        return "a local checkpoint: see its own licence"
    return f"see the model card of `{model}`"


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def source_datasets(distill: dict | None) -> list[str]:
    """The Hub id of the distilled source; a local MusicCaps CSV stands for google/MusicCaps."""
    source = str(((distill or {}).get("arguments") or {}).get("source", ""))
    if not source:
        return ["original"]
    if "/" in source and not Path(source).exists() and not source.endswith(".csv"):
        return [source]
    return [MUSICCAPS_ID] if "musiccaps" in Path(source).name.lower() else ["original"]


def read_metrics(run: Path) -> list[dict] | None:
    """The rows of RUN/eval/metrics.json ({"rows": [{stage, metric, value, paper, better}, ...]}), if any."""
    path = run / "eval" / "metrics.json"
    if not path.is_file():
        return None
    from conceptcaps_pipeline.run_dir import read_json

    rows = read_json(path, fix=f"re-run `conceptcaps evaluate --run {run} --force`").get("rows") or []
    return [{**row, "value": _number(row.get("value")), "paper": _number(row.get("paper"))} for row in rows]


def _number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- commands rebuilt from manifests -----------------------------------------------------------
def _defaults(module_name: str, class_name: str) -> dict:
    import importlib

    cls = getattr(importlib.import_module(module_name), class_name)
    if class_name in ("SFTConfig",):
        return json.loads(json.dumps(cls(output_dir="trainer_output").to_dict(), default=str))
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return json.loads(json.dumps(defaults, default=str))


def public_path(value, run_path: str | Path | None, run: str | Path | None = None):
    """How the card names a path: `RUN/...` inside the run, the file name for anything else on this machine.

    A card is published; the layout of the machine that built it is nobody's business and
    would not work anywhere else. Hub ids (`facebook/musicgen-large`) pass unchanged. `run_path`
    is the run directory as a manifest recorded it (possibly relative to another working
    directory), `run` the run directory being built now.
    """
    if not isinstance(value, str) or not value:
        return value
    from conceptcaps_pipeline.run_dir import run_relative

    for base in (run_path, run):
        if base and (value == str(base) or value.startswith(str(base).rstrip("/") + "/")):
            return "RUN" + value[len(str(base).rstrip("/")):]
    local = value.startswith(("/", "~", "./", "../")) or ("/" in value and Path(value).expanduser().exists())
    if not local:
        return value
    for base in (run, run_path):
        relative = run_relative(value, base) if base else None
        if relative and relative.startswith("RUN"):
            return relative
    return Path(value).expanduser().name or value


def _flag(name: str, value, run_path: str | None, run: str | Path | None = None) -> list[str]:
    def text(v):
        return str(public_path(str(v), run_path, run))

    if value is True:
        return [f"--{name}"]
    if value is False:
        return [f"--{name}", "false"]
    if isinstance(value, list):
        return [f"--{name}", *(text(v) for v in value)] if value else []
    if isinstance(value, dict):
        return [f"--{name}", json.dumps(value)]
    return [f"--{name}", text(value)]


def stage_command(stem: str, manifest: dict, run: str | Path | None = None) -> str | None:
    """The command that wrote a manifest, with its non-default arguments; the run directory (`run`, or
    as the manifest recorded it) reads RUN."""
    from conceptcaps_pipeline.stages import by_record, by_words

    entry = by_record(stem) or by_words(tuple(str(manifest.get("stage", "")).split()))
    if entry is None or not isinstance(manifest.get("arguments"), dict):
        return None
    module_name, words = entry.module, entry.words
    arguments = manifest["arguments"]
    if entry.sections != (None,):  # captioner train: one mapping per dataclass (captioner, sft, model)
        sections = [(arguments.get(sub) or {}, name) for sub, name in zip(entry.sections, entry.arguments)]
    else:
        sections = [(arguments, entry.arguments[0])]
    run_path = next((str(s.get(k)) for s, _ in sections for k in ("run", "out") if s.get(k)), None)
    parts = ["conceptcaps", *words]
    for values, class_name in sections:
        try:
            defaults = _defaults(module_name, class_name)
        except Exception:  # noqa: BLE001 - an older manifest may name a class that moved: show every value
            defaults = {}
        for name, value in values.items():
            if name == "force" or value is None or (name in defaults and defaults[name] == value):
                continue
            parts += _flag(name, value, run_path, run)
    sessions = manifest.get("sessions") or []
    processes = max((s.get("processes", 1) for s in sessions), default=1)
    command = shlex.join(parts)
    if processes > 1:
        command = f"accelerate launch --num_processes {processes} -m conceptcaps_pipeline.cli " + shlex.join(parts[1:])
    return command


# -- context ----------------------------------------------------------------------------------
def _models(manifests: dict) -> list[dict]:
    """The models the run used, with their settings and licences, from the manifests."""
    models = []
    vae = manifests.get("vae_train")
    if vae:
        a = vae["arguments"]
        models.append({"role": "attribute sampler", "name": "beta-VAE trained in this run (RUN/vae)",
                       "detail": f"hidden {a.get('hidden_dim')}, latent {a.get('latent_dim')}, beta {a.get('beta')}, "
                                 f"{a.get('epochs')} epochs, lr {a.get('lr')}",
                       "license": "trained here (part of this dataset's tooling)"})
    captions = manifests.get("captions_generate")
    trained = manifests.get("captioner_train")
    base = ((captions or {}).get("plan") or {}).get("base_model") or \
        (((trained or {}).get("arguments") or {}).get("model") or {}).get("model_name_or_path")
    if base:
        detail = []
        if trained:
            m = trained["arguments"].get("model") or {}
            detail.append(f"LoRA r {m.get('lora_r')}, alpha {m.get('lora_alpha')}, dropout {m.get('lora_dropout')}"
                          f"{', 4-bit (QLoRA)' if m.get('load_in_4bit') else ''}, "
                          f"{(trained['arguments'].get('sft') or {}).get('num_train_epochs')} epochs")
        if captions:
            a = captions["arguments"]
            detail.append(f"sampling temperature {a.get('temperature')}, top-p {a.get('top_p')}" if a.get("do_sample")
                          else "greedy decoding")
        models.append({"role": "captioner", "name": base, "detail": "; ".join(detail), "license": model_license(base)})
    audio = manifests.get("audio")
    if audio:
        a = audio["arguments"]
        rate = (audio.get("codec") or {}).get("sampling_rate")
        models.append({"role": "audio", "name": a.get("model"),
                       "detail": f"{a.get('duration')} s clips, guidance {a.get('guidance_scale')}, top-k {a.get('top_k')}, "
                                 f"temperature {a.get('temperature')}" + (f", {rate} Hz" if rate else ""),
                       "license": model_license(a.get("model"))})
    return models


def _packages(manifests: dict) -> dict[str, str]:
    """Package versions recorded by the stages (the latest stage wins where they differ)."""
    versions = {}
    for manifest in manifests.values():
        versions.update(manifest.get("packages") or {})
    return dict(sorted(versions.items()))


def _taxonomy_rows(run: Path, stats: dict) -> tuple[dict, list[dict]]:
    """(taxonomy.json header, one row per tag with its count per split and in the source)."""
    from conceptcaps_pipeline.run_dir import read_json

    raw = read_json(run / "taxonomy.json", fix=f"re-run `conceptcaps distill --out {run} --force`")
    counts = stats["tag_counts"]
    rows = []
    for category, tags in raw["categories"].items():
        for tag, info in tags.items():
            per_split = {split: counts[split].get(tag, 0) for split in counts}
            rows.append({"category": category, "tag": tag, **per_split, "total": sum(per_split.values()),
                         "source": info.get("count", 0)})
    return raw, rows


def concept_summary(concepts: dict) -> dict:
    """Headline figures of concepts.json for the card: tags in every split, positives per tag in train."""
    import statistics

    default = [c["positives"]["default"] for c in concepts["concepts"]]
    splits = concepts["splits"]
    train = [p["train"] for p in default if p["train"] > 0]
    return {
        "present_everywhere": sum(all(p[s] > 0 for s in splits) for p in default),
        "train_min": min(train, default=0),
        "train_median": statistics.median(train) if train else 0,
        "train_max": max(train, default=0),
        "train_at_least_50": sum(n >= 50 for n in train) if train else None,
    }


def split_shares(rows: dict[str, int]) -> dict:
    """What the card says about the split sizes: each split's share of the samples in whole percent
    (largest remainders, so they add up to 100), the counts, and the shares the assignment aims at.

    >>> split_shares({"train": 30, "validation": 11, "test": 9})["actual"]
    '60/22/18'

    Why the actual shares and not the target: groups of samples with one label set go to one split
    and every tag with 3 or more samples is seeded into every split first, so a small release lands
    far from the target (the smoke run: 30/11/9 samples for a 70/15/15 target).
    """
    total = sum(rows.values())
    exact = {s: 100 * n / total if total else 0.0 for s, n in rows.items()}
    percent = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: (-(exact[s] - percent[s]), s))[:(100 - sum(percent.values())) if total else 0]:
        percent[s] += 1
    from conceptcaps_pipeline.release.splits import SPLIT_FRACTIONS  # the assignment's target

    target = "/".join(f"{100 * SPLIT_FRACTIONS[s]:g}" for s in rows) if set(SPLIT_FRACTIONS) == set(rows) else None
    return {"actual": "/".join(str(percent[s]) for s in rows), "counts": "/".join(f"{n:,}" for n in rows.values()),
            "splits": "/".join(rows), "target": target}


def card_data(infos: dict, stats: dict, manifests: dict, licence_yaml: dict, version: str,
              tiny: bool = False) -> DatasetCardData:
    """The YAML header: licence, tasks, sizes, source, configs with their files and version, dataset_info.

    `version` goes into every `configs:` entry: datasets builds a folder's configs from these
    entries, so `load_dataset(release, config).info.version` is the builder's VERSION.
    `download_size` is the bytes of the config's shipped Parquet files.
    """
    from datasets import DatasetInfo
    from datasets.info import DatasetInfosDict

    configs = []
    for name in infos:
        entry = {"config_name": name, "version": version,
                 "data_files": [{"split": split, "path": f"data/{name}/{split}-*.parquet"}
                                for split, files in stats["files"][name].items() if files]}
        if name == "default":
            entry["default"] = True
        configs.append(entry)
    data = DatasetCardData(
        **licence_yaml, language=["en"], pretty_name="ConceptCaps", task_categories=TASK_CATEGORIES,
        tags=TAGS + ([TINY_TAG] if tiny else []),
        size_categories=size_category(sum(stats["rows"]["default"].values())),
        source_datasets=source_datasets(manifests.get("distill")),
        annotations_creators=["machine-generated"], language_creators=["machine-generated"],
        multilinguality="monolingual", configs=configs,
    )
    sized = {}
    for name, info in infos.items():
        info = dict(info)
        info["download_size"] = stats["bytes"][name]
        info["dataset_size"] = info.get("dataset_size") or sum(s.get("num_bytes", 0) for s in info.get("splits", []))
        sized[name] = DatasetInfo._from_yaml_dict(info)
    DatasetInfosDict(sized).to_dataset_card_data(data)
    return data


def public_taxonomy(run: Path) -> dict:
    """RUN/taxonomy.json as the release ships it: `source_file` by its file name (or Hub id), never a local path."""
    from conceptcaps_pipeline.run_dir import read_json

    taxonomy = read_json(run / "taxonomy.json", fix=f"re-run `conceptcaps distill --run {run} --force`")
    if taxonomy.get("source_file"):
        taxonomy["source_file"] = public_path(str(taxonomy["source_file"]), None)
    return taxonomy


def _clap_scores(run: Path) -> dict[str, float]:
    """Per-clip CLAP scores (id -> cosine) that `conceptcaps evaluate` stored in RUN/eval/metrics.json, if any."""
    path = run / "eval" / "metrics.json"
    if not path.is_file():
        return {}
    from conceptcaps_pipeline.run_dir import read_json

    details = read_json(path, fix=f"re-run `conceptcaps evaluate --run {run} --force`").get("details") or {}
    scores = ((details.get("audio") or {}).get("clap") or {}).get("clap_scores") or {}
    return {str(k): float(v) for k, v in scores.items() if isinstance(v, int | float)}


def _vae_history(run: Path) -> list[dict]:
    path = run / "vae" / "history.json"
    if not path.is_file():
        return []
    from conceptcaps_pipeline.run_dir import read_json

    history = read_json(path, fix=f"re-run `conceptcaps vae train --run {run} --force`")
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def _read_one_split(load_path: str, files: dict[str, list[str]], local: bool) -> dict:
    """pandas and polars one-liners that read the train split of the default config (the split is in the file names)."""
    prefix = "" if local else f"hf://datasets/{load_path}/"
    root = f"{load_path}/" if local else prefix
    train = files.get("train") or []
    pattern = f"{root}data/default/train-*.parquet"
    if len(train) == 1:
        pandas = f'pd.read_parquet("{root}{train[0]}")'
    elif local:
        pandas = f'pd.concat(map(pd.read_parquet, sorted(glob.glob("{pattern}"))))'
    else:
        pandas = f'pd.concat(pd.read_parquet(f"hf://{{p}}") for p in HfFileSystem().glob("datasets/{load_path}/data/default/train-*.parquet"))'
    return {"polars": f'pl.read_parquet("{pattern}")', "pandas": pandas, "several": len(train) > 1, "local": local}


def markdown_text(value: str | None) -> str | None:
    """`value` as literal text in Markdown with HTML on: <, >, & escaped, and the characters that start links,
    images or emphasis backslash-escaped.

    >>> print(markdown_text('<img src=x onerror=alert(9)> [a](javascript:x) *b*'))
    &lt;img src=x onerror=alert(9)&gt; \\[a\\](javascript:x) \\*b\\*
    """
    import html

    if value is None:
        return None
    text = html.escape(str(value), quote=True)
    return re.sub(r"([\\`*_\[\]{}!|#])", r"\\\1", text)


def write_card(run: str | Path, release: str | Path, *, infos: dict, stats: dict, repo_id: str | None = None,
               build_command: str | None = None, revision: str = "main", code_url: str | None = None,
               card_authors: str | None = None, contact: str | None = None, version: str) -> Path:
    """Write LICENSE.md, the figures and example clips, then render the template into RELEASE/README.md.

    `version` is the dataset's version (`conceptcaps.VERSION`), passed in by `conceptcaps build`: the
    card code does not import the builder, whose audio configs read the card's licence (no import cycle).
    """
    import shutil

    from conceptcaps_pipeline.dataset_card.examples import write_examples
    from conceptcaps_pipeline.run_dir import atomic_dir, atomic_path, from_run_relative, read_table

    run, release = Path(run), Path(release)
    manifests = read_manifests(run)
    taxonomy, tag_rows = _taxonomy_rows(run, stats)
    release_sets = [tags for split in stats["aspect_lists"].values() for tags in split]
    source_sets = None
    if (run / "distilled.parquet").is_file():
        source_sets = read_table(run / "distilled.parquet", ["aspect_list"]).column("aspect_list").to_pylist()

    def public(value):
        return public_path(from_run_relative(value, run), None, run)

    licence = release_licence(run, list(infos), manifests, public=public)
    version = str(version)
    category_of = {tag: c for c, tags in taxonomy["categories"].items() for tag in tags}
    tags_of = {i: tags for split in stats["aspect_lists"] for i, tags in zip(stats["ids"][split], stats["aspect_lists"][split])}
    scores = {i: s for i, s in _clap_scores(run).items() if i in tags_of}
    figure_data = FigureData(
        release_sets=release_sets, source_sets=source_sets,
        categories={c: list(tags) for c, tags in taxonomy["categories"].items()},
        split_counts=stats["tag_counts"], clap_by_tag=clap_by_tag(scores, tags_of),
        clap_mean=sum(scores.values()) / len(scores) if scores else None, vae_history=_vae_history(run))
    # atomic: no figure of an older build stays behind; fonts read once (fonts_read_once says why)
    with atomic_dir(release / "figures") as folder, fonts_read_once():
        figures = write_figures(folder, figure_data)
        from conceptcaps_pipeline.dataset_card.evidence_figure import add_evidence_figure  # audio score's, if run

        add_evidence_figure(run, folder, figures)
    has_audio = any(name.endswith("audio") for name in infos)
    examples = write_examples(release, category_of, repo_id=repo_id, revision=revision) if has_audio else []
    if not has_audio and (release / "examples").exists():
        shutil.rmtree(release / "examples")  # a text-only rebuild ships no clips
    tags_per_sample = [len(set(t)) for t in release_sets]
    commands = [c for stem, m in manifests.items() if stem != "build" and (c := stage_command(stem, m, run))]
    if build_command:
        commands.append(build_command)
    audio = manifests.get("audio")
    captions = manifests.get("captions_generate")
    load_path = repo_id or "RUN/release"
    context = {
        "load_path": load_path,
        "repo_id": repo_id,
        "repo_url": f"https://huggingface.co/datasets/{repo_id}" if repo_id else None,
        # Flags land in Markdown that Hub pages render with HTML: escaped, so markup in them stays text.
        "code_url": markdown_text(code_url),
        "card_authors": markdown_text(card_authors),
        "contact": markdown_text(contact),
        "version": version,
        "licence": licence,
        "license_file": LICENSE_FILE,
        "config_table": [{"name": n, "rows": stats["rows"][n], "audio": n.endswith("audio"),
                          "size_mb": round(infos[n].get("dataset_size", 0) / 1e6, 1),
                          "download_mb": round(stats["bytes"][n] / 1e6, 1),
                          "licence": licence.configs[n].text} for n in infos],
        "rows": stats["rows"]["default"],
        "total_rows": sum(stats["rows"]["default"].values()),
        "split_shares": split_shares(stats["rows"]["default"]),
        "has_audio": has_audio,
        "read_split": _read_one_split(load_path, stats["files"]["default"], local=repo_id is None),
        "sampling_rate": next((f["dtype"]["audio"].get("sampling_rate") for n in infos for f in infos[n]["features"]
                               if isinstance(f.get("dtype"), dict) and "audio" in f["dtype"]), None),
        "audio_args": (audio or {}).get("arguments"),
        "audio_seconds": ((audio or {}).get("counts") or {}).get("audio_seconds_total"),
        "models": _models(manifests),
        "packages": _packages(manifests),
        "commands": commands,
        "taxonomy_version": taxonomy.get("version"),
        "categories": {c: [r for r in tag_rows if r["category"] == c] for c in taxonomy["categories"]},
        "tags_in_release": sum(r["total"] > 0 for r in tag_rows),
        "taxonomy_size": len(tag_rows),
        "unsatisfiable": stats["unsatisfiable"],
        "mean_tags": round(sum(tags_per_sample) / max(len(tags_per_sample), 1), 2),
        "min_tags": min(tags_per_sample, default=0),
        "max_tags": max(tags_per_sample, default=0),
        "subset_rule": stats["concepts"]["rules"]["subset_min_positives"],
        "concepts": concept_summary(stats["concepts"]),
        "correlation": (round(c, 3) if (c := frequency_correlation(release_sets, source_sets, [r["tag"] for r in tag_rows]))
                        is not None else None),
        "source_rows": len(source_sets) if source_sets is not None else None,
        "distill": manifests.get("distill"),
        "sample": manifests.get("vae_sample"),
        "captioner_model": ((captions or {}).get("plan") or {}).get("base_model"),
        "captioner_adapter": ((captions or {}).get("plan") or {}).get("adapter"),
        "caption_coverage": (captions or {}).get("coverage"),
        "caption_counts": (captions or {}).get("counts"),
        "verify": (manifests.get("audio_verify") or {}).get("counts"),
        "figures": figures,
        "examples": examples,
        "clap_scored": len(scores),
        # The audio configs' `evidence` column (build adds it when `audio score` ran): the card says which.
        "evidence_column": any(f.get("name") == "evidence" for n in infos for f in infos[n]["features"]),
        "metrics": read_metrics(run),
        "paper_url": PAPER_URL,
        "musiccaps_id": MUSICCAPS_ID,
        "example_tag": max(tag_rows, key=lambda r: (r["total"], r["tag"]))["tag"] if tag_rows else "piano",
        "citation_bibtex": PAPER_BIBTEX,
        "musiccaps_bibtex": MUSICCAPS_BIBTEX,
        "conceptcaps_version": next((m.get("conceptcaps_version") for m in manifests.values()), None),
    }
    kinds = {m.role: m.kind for m in licence.models}
    context["models"] = [{**m, "name": public(m.get("name")), "license": KIND_LICENSES.get(kinds.get(m["role"]), m["license"])}
                         for m in context["models"]]
    context["tiny_models"] = [public(m) for m in licence.tiny_models]
    context["captioner_model"] = public(context["captioner_model"])
    context["captioner_adapter"] = public(context["captioner_adapter"])
    if context["audio_args"]:
        context["audio_args"] = {**context["audio_args"], "model": public(context["audio_args"].get("model"))}
    if context["distill"]:
        arguments = dict(context["distill"].get("arguments") or {})
        arguments["source"] = public_path(arguments.get("source"), None)
        context["distill"] = {**context["distill"], "arguments": arguments}
    captioner = next((m for m in licence.models if m.role == "captioner"), None)
    write_license_file(release / LICENSE_FILE, licence, {
        "tiny_names": context["tiny_models"], "examples": bool(examples), "musiccaps_id": MUSICCAPS_ID,
        "captioner": {"name": public(captioner.recorded), "kind": captioner.kind} if captioner else None,
        "audio": {"name": public(licence.audio.recorded), "kind": licence.audio.kind} if licence.audio and has_audio else None,
    })
    card = DatasetCard.from_template(card_data(infos, stats, manifests, licence.yaml, version, bool(licence.tiny_models)),
                                     template_path=str(TEMPLATE), **context)
    path = release / "README.md"
    text = re.sub(r"\n{3,}", "\n\n", str(card))  # optional sections leave runs of blank lines
    with atomic_path(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return path
