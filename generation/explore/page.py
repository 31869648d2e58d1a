"""Write RUN/explorer/: a static web page to browse a release's concepts and listen to them,
and to walk two dimensions of the run's VAE.

    conceptcaps explore --run runs/demo
    conceptcaps explore --run runs/demo --clips_per_tag 3 --grid_size 31 --extent 2.5
    chromium runs/demo/explorer/index.html          # or any browser: no server needed

The page (generation/explore/static/: index.html, app.js, style.css, copied as they are) has two parts:
- a concept browser: every taxonomy tag with its category, its positives per config and split
  (RUN/release/concepts.json), the mean CLAP score of its clips when `conceptcaps evaluate` scored
  them (else "not evaluated"), and up to --clips_per_tag of its clips with captions, tags and an
  audio player; when the run was scored (`conceptcaps audio score`), its label-audio agreement
  (ROC-AUC with its bootstrap interval, and the top-k share, from concepts.json) and the
  --evidence_clips positives of highest and of lowest evidence (the release's `evidence` column,
  `extreme_clips`), to hear whether the audio carries the label before trusting the concept;
- a 2-D pad over two latent dimensions of RUN/vae: a --grid_size x --grid_size grid, decoded at
  build time with the run's decoding rule (that of `vae sample`: with `--sizes data`, its default,
  each point takes the per-category set sizes of a training set drawn with the run's seed, so
  pad sets are as long as the release's), shows the tag set under the pointer and the --nearest
  clips of the release whose label sets are closest to it (Jaccard).
  The two dimensions are the attribute-regularised ones when the VAE has them
  (generation/vae/lsr.py), else the two with the highest KL to the prior on the training sets
  (the dimensions the VAE uses most); the page says which.

Everything the page shows is in RUN/explorer/data.js (a `<script>` that sets a global, because
browsers refuse fetch() of file:// URLs), and the clips it plays are copied, as stored (FLAC),
from the release's `audio` shards into RUN/explorer/audio/. RUN/explorer/README.md carries the
YAML header of a static Hugging Face Space, so the folder can be uploaded as one as it is.
Re-running skips when the release, VAE, evaluation, page files and options are unchanged;
--force rewrites. Writes RUN/manifests/explore.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import finished, read_json, require, stage, write_manifest

logger = logging.getLogger(__name__)

STAGE = "explore"
OUT = "explorer"
ASSETS = Path(__file__).parent / "static"
ASSET_FILES = ("index.html", "app.js", "style.css")
DATA_FILE = "data.js"
DATA_GLOBAL = "CONCEPTCAPS_EXPLORER"  # the global data.js sets; app.js reads it
SUBSET_CONFIGS = ("default", "25pct", "10pct")  # the text configs whose counts the page shows


@dataclass
class ExploreArguments:
    run: str = field(metadata={"help": "Run directory with release/ (conceptcaps build) and vae/; writes RUN/explorer/."})
    clips_per_tag: int = field(
        default=5, metadata={"help": "Example clips per concept, with audio (clips shared by several tags count once)."}
    )
    grid_size: int = field(default=21, metadata={"help": "Points per side of the latent pad's grid (decoded at build time)."})
    extent: float = field(
        default=3.0,
        metadata={"help": "The pad spans [-extent, extent] (prior SDs) on an axis that is not regularised; a "
                          "regularised axis spans its attribute's training range."},
    )
    axes: list[str] = field(
        default_factory=list,
        metadata={"help": "The pad's two latent axes: regularised attributes (e.g. tempo arousal) or dimension numbers; "
                          "default: the VAE's first two regularised attributes, else its two dimensions of highest KL."},
    )
    nearest: int = field(default=3, metadata={"help": "Clips of the release listed (with audio) for each point of the pad."})
    evidence_clips: int = field(
        default=3, metadata={"help": "Per concept of a scored run: the positives of highest and of lowest evidence listed "
                                     "(with audio) each; 0: none."})
    title: str = field(default="ConceptCaps explorer", metadata={"help": "Title of the page and of the Space."})
    force: bool = field(default=False, metadata={"help": "Rewrite RUN/explorer even if it is up to date."})


def check_arguments(args: ExploreArguments) -> None:
    """Every option, before anything is read or written."""
    if args.clips_per_tag < 0:
        raise ConceptCapsError(f"--clips_per_tag {args.clips_per_tag}: give 0 (no example clips) or more.")
    if args.grid_size < 2:
        raise ConceptCapsError(f"--grid_size {args.grid_size}: give at least 2 points per side (21 is the default).")
    from conceptcaps_pipeline.run_dir import check_memory

    # Each point of the pad is decoded, keeps its tag set and nearest clips, and becomes page data: a few KiB
    # each (8 KiB is generous). Checked before the VAE decodes anything.
    check_memory(8192 * args.grid_size**2, f"explore --grid_size {args.grid_size} ({args.grid_size**2:,} points)",
                 "give a smaller --grid_size (21 is the default)")
    if not args.extent > 0:
        raise ConceptCapsError(f"--extent {args.extent}: give a positive half-width of the pad, in prior SDs (e.g. 3).")
    if args.axes and (len(args.axes) != 2 or args.axes[0] == args.axes[1]):
        raise ConceptCapsError(f"--axes {' '.join(args.axes)}: name two different axes (attributes or latent dimensions), "
                               f"e.g. --axes tempo arousal or --axes 0 5.")
    if args.nearest < 1:
        raise ConceptCapsError(f"--nearest {args.nearest}: list at least 1 clip per point of the pad.")
    if args.evidence_clips < 0:
        raise ConceptCapsError(f"--evidence_clips {args.evidence_clips}: give 0 (no evidence lists) or more.")


# -- the release ------------------------------------------------------------------------------------
def read_clips(release: Path, splits: list[str]) -> dict[str, dict]:
    """{id: {caption, tags, split}} of every row of the release's `default` config."""
    from conceptcaps_pipeline.run_dir import read_table

    clips = {}
    for split in splits:
        for path in sorted((release / "data" / "default").glob(f"{split}-*.parquet")):
            fix = "re-run `conceptcaps build --run RUN --force`"
            for row in read_table(path, ["id", "caption", "aspect_list"], fix=fix).to_pylist():
                clips[row["id"]] = {"caption": row["caption"], "tags": list(row["aspect_list"]), "split": split}
    return clips


def choose_examples(tags: list[str], clips: dict[str, dict], k: int) -> dict[str, list[str]]:
    """Up to k clip ids per tag: clips already chosen for another tag first, then by id.

    Why reuse: a clip holds several tags, so preferring clips already on the page keeps the
    number of audio files (and the page's size) small at the paper's scale.
    """
    holders: dict[str, list[str]] = {t: [] for t in tags}
    for clip_id in sorted(clips):
        for tag in clips[clip_id]["tags"]:
            if tag in holders:
                holders[tag].append(clip_id)
    chosen: set[str] = set()
    examples = {}
    for tag in tags:
        ids = sorted(holders[tag], key=lambda i: (i not in chosen, i))[:k]
        chosen.update(ids)
        examples[tag] = ids
    return examples


def extract_audio(release: Path, ids: set[str], folder: Path) -> dict[str, str]:
    """Copy the encoded clips of `ids` from the `audio` config's shards into folder; {id: path relative to the page}.

    Only the row groups that hold a wanted id are read, so a large release is not loaded whole.
    """
    import errno

    import pyarrow.parquet as pq

    paths: dict[str, str] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for shard in sorted((release / "data" / "audio").glob("*.parquet")):
        try:
            handle = pq.ParquetFile(shard)
            for group in range(handle.num_row_groups):
                wanted = set(handle.read_row_group(group, columns=["id"]).column("id").to_pylist()) & ids
                if not wanted:
                    continue
                for row in handle.read_row_group(group, columns=["id", "audio"]).to_pylist():
                    if row["id"] not in wanted:
                        continue
                    audio = row["audio"] or {}
                    if not audio.get("bytes"):
                        raise ConceptCapsError(f"{shard}: clip {row['id']} has no audio bytes: re-run "
                                               f"`conceptcaps build --run RUN --force`.")
                    suffix = Path(audio.get("path") or "").suffix or ".flac"
                    name = f"{row['id']}{suffix}"
                    (folder / name).write_bytes(audio["bytes"])
                    paths[row["id"]] = f"{folder.name}/{name}"
        except ConceptCapsError:
            raise
        except Exception as err:  # a truncated or foreign file: one line that names it
            if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise  # writing the clip failed (full or read-only disk): the CLI says so, the shard is fine
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConceptCapsError(f"{shard} cannot be read as Parquet ({reason}): re-run "
                                   f"`conceptcaps build --run RUN --force`.") from err
    missing = sorted(ids - set(paths))
    if missing:
        raise ConceptCapsError(f"{release / 'data' / 'audio'}: no clip for {len(missing)} row(s) of the default config "
                               f"(first: {missing[0]}): re-run `conceptcaps build --run RUN --force`.")
    return paths


def clap_by_clip(run: Path) -> dict[str, float] | None:
    """The per-clip CLAP scores that `conceptcaps evaluate` wrote to RUN/eval/metrics.json, or None."""
    path = run / "eval" / "metrics.json"
    if not path.is_file():
        return None
    metrics = read_json(path, fix=f"re-run `conceptcaps evaluate --run {run} --force`")
    scores = (((metrics.get("details") or {}).get("audio") or {}).get("clap") or {}).get("clap_scores")
    return {str(k): float(v) for k, v in scores.items()} if scores else None


def concept_clap(tags: list[str], clips: dict[str, dict], scores: dict[str, float]) -> dict[str, dict]:
    """{tag: {mean, n}}: the mean CLAP score of the release's clips that hold the tag (every split)."""
    sums = {t: [] for t in tags}
    for clip_id, clip in clips.items():
        if clip_id in scores:
            for tag in set(clip["tags"]):
                if tag in sums:
                    sums[tag].append(scores[clip_id])
    return {t: {"mean": float(np.mean(v)), "n": len(v)} for t, v in sums.items() if v}


def release_evidence(release: Path) -> dict[str, dict[str, float | None]] | None:
    """{id: {label: evidence}} from the `evidence` column of the release's `audio` config, or None (not scored)."""
    import pyarrow.parquet as pq

    shards = sorted((release / "data" / "audio").glob("*.parquet"))
    if not shards or "evidence" not in pq.read_schema(shards[0]).names:
        return None
    import datasets

    # The label names from the shard's own features (the ClassLabel that `labels` indexes).
    names = datasets.Features.from_arrow_schema(pq.read_schema(shards[0]))["labels"].feature.names
    found = {}
    for shard in shards:
        for row in pq.read_table(shard, columns=["id", "labels", "evidence"]).to_pylist():
            found[row["id"]] = {names[k]: e for k, e in zip(row["labels"], row["evidence"] or [])}
    return found


def concept_evidence(concepts: dict, evidence: dict | None, tags: list[str], n: int) -> dict[str, dict]:
    """{tag: {auc, auc_interval, top_k_share, top_k_interval, k, chance, positives, highest, lowest}}: the agreement
    `build` put into concepts.json, and the n positives of highest and lowest evidence ([id, evidence] pairs)."""
    from conceptcaps_pipeline.release.evidence import extreme_clips

    agreement = ((concepts.get("evidence") or {}).get("concepts")) or {}
    out = {}
    for tag in tags:
        entry = dict(agreement.get(tag) or {})
        extremes = extreme_clips(evidence, tag, n) if evidence is not None and n else {"highest": [], "lowest": []}
        entry.update({side: [[i, round(e, 4)] for i, e in pairs] for side, pairs in extremes.items()})
        out[tag] = entry
    return out


# -- the latent pad ---------------------------------------------------------------------------------
def _latent_attributes(run: Path) -> dict | None:
    """RUN/vae/lsr.json (generation/vae/lsr.py): the VAE's attribute-regularised dimensions, or None."""
    from conceptcaps_pipeline.vae.lsr import load_lsr

    record = load_lsr(run)
    return record if record and record.get("attributes") else None


def latent_axes(run: Path, model, sets: list[list[str]], choice: list[str], extent: float) -> list[dict]:
    """The pad's two axes: {dim, label, attribute, range, ...} each.

    `choice` names two regularised attributes or latent dimensions; by default the VAE's first
    two regularised attributes, filled up with the dimensions of highest KL on `sets` (the
    dimensions the VAE uses most). A regularised axis spans the latent values its attribute
    takes on the training sets; any other spans [-extent, extent] (prior SDs).
    """
    record = _latent_attributes(run)
    regularised = {name: int(entry["dim"]) for name, entry in ((record or {}).get("attributes") or {}).items()}
    from conceptcaps_pipeline.vae.model import kl_per_dimension

    kl = kl_per_dimension(model, sets)
    if choice:
        dims = []
        for item in choice:
            if item in regularised:
                dims.append(regularised[item])
            elif item.isdigit() and int(item) < model.latent_dim:
                dims.append(int(item))
            else:
                known = f"the regularised attributes {list(regularised)} or " if regularised else ""
                raise ConceptCapsError(f"--axes {item!r}: give {known}latent dimensions 0 to {model.latent_dim - 1}.")
    else:
        dims = list(regularised.values())[:2]
        dims += [int(d) for d in np.argsort(-kl, kind="stable") if int(d) not in dims][:2 - len(dims)]
    by_dim = {dim: name for name, dim in regularised.items()}
    axes = []
    for dim in dims:
        axis = {"dim": dim, "kl": round(float(kl[dim]), 4), "attribute": by_dim.get(dim)}
        if axis["attribute"]:
            axis.update(_attribute_axis(record, axis["attribute"], extent))
        else:
            axis.update(label=f"z[{dim}] (KL {kl[dim]:.2f} nats)", range=[-extent, extent])
        axes.append(axis)
    return axes


def _attribute_axis(record: dict, name: str, extent: float) -> dict:
    """The span and label of an axis on a regularised dimension: the latent values of its attribute's map."""
    entry = record["attributes"][name]
    latent = entry["map"]["latent"]
    low, high = (min(latent), max(latent)) if latent and max(latent) > min(latent) else (-extent, extent)
    return {"label": f"z[{entry['dim']}] = {name} ({entry['units']})", "units": entry["units"], "range": [low, high],
            "attribute_range": entry["map"]["range"]}


def axis_values(axis: dict, size: int, record: dict | None) -> tuple[list[float], list[float] | None]:
    """The grid's latent values along an axis, and its attribute's value at each (None off regularised axes)."""
    values = [float(v) for v in np.linspace(axis["range"][0], axis["range"][1], size)]
    if not axis["attribute"]:
        return values, None
    from conceptcaps_pipeline.vae.lsr import latent_to_attribute

    return values, [round(latent_to_attribute(record, axis["attribute"], v), 4) for v in values]


def pad_note(axes: list[dict]) -> str:
    """What the page says about the pad's axes."""
    named = [a["attribute"] for a in axes if a["attribute"]]
    if len(named) == 2:
        return f"two attribute-regularised latent dimensions ({named[0]}, {named[1]}; docs/latent.md)"
    if named:
        return (f"the attribute-regularised dimension of {named[0]} and the other latent dimension of highest KL to "
                f"the prior on the training tag sets")
    return ("this VAE has no attribute-regularised dimensions (conceptcaps vae train --lsr ...): the pad shows the "
            "two latent dimensions with the highest KL to the prior on the training tag sets, the ones the VAE uses most")


def pad_rule(run: Path) -> dict:
    """The decoding rule `vae sample` used on this run (its manifest's arguments), for the pad.

    Without a vae_sample manifest, the sampler's defaults (`--sizes data`). A manifest from
    before `--sizes` existed was sampled with the threshold rule, so the pad uses that one.
    """
    from conceptcaps_pipeline.run_dir import read_manifest

    manifest = read_manifest(run, "vae_sample")
    sampled = (manifest or {}).get("arguments") or {}
    sizes = sampled.get("sizes", "threshold" if manifest else "data")
    return {"sizes": sizes, "threshold": sampled.get("threshold", 0.5),
            "min_categories": sampled.get("min_categories", 3), "seed": sampled.get("seed", 0)}


def decode_pad(run: Path, model, taxonomy, axes: list[dict], size: int, rule: dict) -> tuple[list[list[str]], list[int]]:
    """Decode the size x size grid (every other latent dimension at 0, the prior's mean) with `rule` (pad_rule).

    With `--sizes data` (the sampler's default) each point takes the per-category sizes of a
    training set drawn with the run's seed (RUN/vae/set_sizes.json), exactly as `vae sample`
    gives each sample; why: a 0.5 threshold on prior-region probabilities gave pad sets of about
    4 tags where the release's sets hold about 8 (generation/vae/sizes.py). So neighbouring
    points may differ in length, as two samples do. Returns (distinct tag sets, the set index of
    each point): row-major, the first row at the top of the pad (the highest value of the second axis).
    """
    import torch
    from conceptcaps_pipeline.vae.model import decode_sets
    from conceptcaps_pipeline.vae.sizes import SetSizes

    xs, ys = (a["values"] for a in axes)
    z = torch.zeros(size * size, model.latent_dim)
    z[:, axes[0]["dim"]] = torch.tensor(xs, dtype=torch.float32).repeat_interleave(size)  # point i * size + j: xs[i], ys[j]
    z[:, axes[1]["dim"]] = torch.tensor(ys, dtype=torch.float32).repeat(size)
    drawn = None
    if rule["sizes"] == "data":
        drawn = SetSizes.load(run / "vae").draw(size * size, torch.Generator().manual_seed(int(rule["seed"])))
    with torch.no_grad():
        flat = decode_sets(torch.sigmoid(model.decode(z)), model.tags, model.categories, taxonomy, sizes=drawn,
                           threshold=rule["threshold"], min_categories=rule["min_categories"])
    grid = [flat[i * size:(i + 1) * size] for i in range(size)]  # grid[i][j]: xs[i], ys[j]
    distinct: dict[tuple[str, ...], int] = {}
    cells = [distinct.setdefault(tuple(grid[col][size - 1 - row]), len(distinct))
             for row in range(size) for col in range(size)]
    return [list(s) for s in distinct], cells


def nearest_clips(sets: list[list[str]], clips: dict[str, dict], k: int) -> list[list[tuple[str, float]]]:
    """For each tag set, the k clips whose label sets have the highest Jaccard with it (ties: by id)."""
    ids = sorted(clips)
    if not ids:
        return [[] for _ in sets]
    vocabulary = sorted({t for c in clips.values() for t in c["tags"]} | {t for s in sets for t in s})
    index = {t: i for i, t in enumerate(vocabulary)}
    labels = np.zeros((len(ids), len(vocabulary)), dtype=np.float32)
    for row, clip_id in enumerate(ids):
        labels[row, [index[t] for t in set(clips[clip_id]["tags"])]] = 1
    sizes = labels.sum(1)
    result = []
    for tag_set in sets:
        query = np.zeros(len(vocabulary), dtype=np.float32)
        query[[index[t] for t in set(tag_set)]] = 1
        overlap = labels @ query
        jaccard = overlap / np.maximum(sizes + query.sum() - overlap, 1)
        order = np.lexsort((np.arange(len(ids)), -jaccard))[:k]  # highest Jaccard, then id order
        result.append([(ids[i], round(float(jaccard[i]), 4)) for i in order])
    return result


# -- the stage --------------------------------------------------------------------------------------
def _inputs(run: Path, release: Path) -> dict:
    """What the page depends on (hashed into the manifest): a change to any of them rewrites it."""
    inputs = {"concepts": release / "concepts.json", "build": run / "manifests" / "build.json",
              "vae": run / "vae" / "model.safetensors", "taxonomy": run / "taxonomy.json"}
    for optional in ("eval/metrics.json", "manifests/vae_sample.json", "vae/set_sizes.json"):
        if (run / optional).is_file():
            inputs[optional] = run / optional
    # The page's own files and the code that fills data.js: a new version rewrites the page.
    inputs.update({f"page/{name}": ASSETS / name for name in ASSET_FILES}, code=Path(__file__))
    return inputs


def _tiny_models(run: Path) -> list[str]:
    """The tiny random-weight models (noise) the run's captions and clips came from, if any."""
    from conceptcaps_pipeline.models import tiny_models
    from conceptcaps_pipeline.run_dir import from_run_relative, read_manifest

    captions = ((read_manifest(run, "captions_generate") or {}).get("plan") or {}).get("base_model")
    audio = ((read_manifest(run, "audio") or {}).get("arguments") or {}).get("model")
    return tiny_models(run, [from_run_relative(captions, run), from_run_relative(audio, run)])


def space_readme(title: str, concepts: dict, counts: dict) -> str:
    """README.md of the folder as a static Hugging Face Space (YAML header + what the page shows)."""
    rows = concepts.get("rows", {}).get("default", {})
    return "\n".join([
        "---",
        f"title: {json.dumps(title)}",
        "emoji: 🎵",
        "colorFrom: indigo",
        "colorTo: pink",
        "sdk: static",
        "app_file: index.html",
        "pinned: false",
        "license: cc-by-sa-4.0",
        "tags: [conceptcaps, music, interpretability, tcav]",
        "---",
        "",
        f"# {title}",
        "",
        ("A static page to browse the concepts of a ConceptCaps release and listen to them, and to walk two "
         "dimensions of the beta-VAE that sampled its tag sets. It runs in the browser: open `index.html` "
         "(no server needed), or upload this folder as a static Space."),
        "",
        f"- release rows: {', '.join(f'{s} {n}' for s, n in rows.items())} (taxonomy {concepts.get('taxonomy_version')})",
        f"- concepts: {counts['concepts']}; example clips with audio: {counts['clips_with_audio']}",
        f"- latent pad: {counts['grid_size']} x {counts['grid_size']} points, {counts['pad_sets']} distinct tag sets",
        "",
        ("Written by `conceptcaps explore --run RUN` (https://arxiv.org/abs/2601.14157). The tags come from "
         "MusicCaps (CC BY-SA 4.0)."),
        "",
    ])


def check_run(args: ExploreArguments) -> None:
    """The options, and the release and VAE the page shows: before the lock is taken."""
    check_arguments(args)
    run = Path(args.run)
    release = require(run, "release")
    for name in ("concepts.json", "data/default"):
        if not (release / name).exists():
            raise ConceptCapsError(f"{release / name} not found: run `conceptcaps build --run {run}` first.")
    from conceptcaps_pipeline.release.concepts import check_built_release

    check_built_release(release)  # the page shows the release its build wrote, or nothing
    require(run, "vae")


# The lock also clears what an interrupted write of RUN/explorer/ left (its outputs in the stage table).
@stage(STAGE, check=check_run)
def explore(args: ExploreArguments) -> dict:
    """Run the stage: write RUN/explorer/ unless it is up to date; returns the stage manifest."""
    from conceptcaps_pipeline.run_dir import atomic_dir
    from conceptcaps_pipeline.taxonomy import Taxonomy
    from conceptcaps_pipeline.vae.model import BetaVAE

    started = time.time()
    run = Path(args.run)
    release, out = run / "release", run / OUT
    inputs = _inputs(run, release)
    done = finished(run, STAGE, args, inputs, [out / "index.html", out / DATA_FILE])
    if done and not args.force:
        logger.info("explore: %s is up to date; --force rewrites it", out)
        return done

    # 1. The release: concepts, rows, CLAP scores.
    concepts = read_json(release / "concepts.json", fix=f"re-run `conceptcaps build --run {run} --force`")
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    tags = [c["tag"] for c in concepts.get("concepts", [])]
    if tags != taxonomy.tags:
        raise ConceptCapsError(f"{release / 'concepts.json'} lists other tags than {run / 'taxonomy.json'}: re-run "
                               f"`conceptcaps build --run {run} --force`.")
    splits = list(concepts.get("splits") or [])
    clips = read_clips(release, splits)
    scores = clap_by_clip(run)
    per_concept = concept_clap(tags, clips, scores) if scores else {}
    # Label-audio agreement (audio score, through build): per concept, and the clips to hear it by.
    evidence = release_evidence(release)
    scored = evidence is not None and bool(concepts.get("evidence"))
    per_concept_evidence = concept_evidence(concepts, evidence, tags, args.evidence_clips) if scored else {}

    # 2. The latent pad, decoded with the rule the run sampled its tag sets with (set sizes from the data).
    try:
        model = BetaVAE.from_pretrained(str(run / "vae")).eval()
    except Exception as err:
        raise ConceptCapsError(f"cannot load the VAE from {run / 'vae'} ({err}); re-run "
                               f"`conceptcaps vae train --run {run} --force`.") from err
    if list(model.tags) != taxonomy.tags:
        raise ConceptCapsError(f"{run / 'vae'} was trained on another taxonomy than {run / 'taxonomy.json'}: retrain "
                               f"it with `conceptcaps vae train --run {run} --force`.")
    rule = pad_rule(run)
    axes = latent_axes(run, model, _training_sets(run, clips), args.axes, args.extent)
    record = _latent_attributes(run)
    for axis in axes:
        axis["values"], axis["attribute_values"] = axis_values(axis, args.grid_size, record)
    pad_sets, cells = decode_pad(run, model, taxonomy, axes, args.grid_size, rule)
    neighbours = nearest_clips(pad_sets, clips, args.nearest)

    # 3. The clips on the page (examples per concept and the pad's neighbours), and their audio.
    examples = choose_examples(tags, clips, args.clips_per_tag)
    shown = set().union(*examples.values(), *({i for i, _ in n} for n in neighbours),
                        *({i for side in ("highest", "lowest") for i, _ in e[side]} for e in per_concept_evidence.values()))
    shown &= set(clips)
    has_audio = (release / "data" / "audio").is_dir()
    if not has_audio:
        logger.warning("explore: %s has no audio config (built with --audio false): the page has no players", release)

    with atomic_dir(out) as tmp:
        audio = extract_audio(release, shown, tmp / "audio") if has_audio and shown else {}
        data = {
            "title": args.title,
            "taxonomy_version": concepts.get("taxonomy_version"),
            "splits": splits,
            "configs": [c for c in SUBSET_CONFIGS if c in (concepts.get("configs") or [])],
            "rows": concepts.get("rows", {}),
            "tiny_models": _tiny_models(run),
            "has_audio": has_audio,
            "clap": {"evaluated": scores is not None, "what": "mean CLAP score (raw cosine) of the concept's clips"},
            "evidence": {"scored": scored, "model": (concepts.get("evidence") or {}).get("model"),
                         "confidence": ((concepts.get("evidence") or {}).get("settings") or {}).get("confidence", 0.95)},
            "concepts": [{"tag": c["tag"], "category": c["category"], "positives": c["positives"],
                          "clap": per_concept.get(c["tag"]), "clips": examples[c["tag"]],
                          "evidence": per_concept_evidence.get(c["tag"])}
                         for c in concepts["concepts"]],
            "clips": {i: {**clips[i], "clap": (scores or {}).get(i), "audio": audio.get(i)} for i in sorted(shown)},
            "pad": {"size": args.grid_size, "axes": axes, "note": pad_note(axes), "rule": rule, "sets": pad_sets,
                    "cells": cells, "nearest": neighbours},
        }
        (tmp / DATA_FILE).write_text(f"window.{DATA_GLOBAL} = {json.dumps(data, ensure_ascii=True)};\n", encoding="utf-8")
        for name in ASSET_FILES:
            shutil.copyfile(ASSETS / name, tmp / name)
        counts = {"concepts": len(tags), "release_rows": len(clips), "clips_shown": len(shown),
                  "clips_with_audio": len(audio), "audio_bytes": sum((tmp / p).stat().st_size for p in audio.values()),
                  "grid_size": args.grid_size, "pad_sets": len(pad_sets), "pad_dims": [a["dim"] for a in axes],
                  "pad_attributes": [a["attribute"] for a in axes], "concepts_with_clap": len(per_concept),
                  "concepts_with_auc": sum(e.get("auc") is not None for e in per_concept_evidence.values())}
        (tmp / "README.md").write_text(space_readme(args.title, concepts, counts), encoding="utf-8")
    logger.info("explore: wrote %s (%d concepts, %d clips with audio, %.1f MB; pad %dx%d over %s with %d distinct "
                "tag sets)", out / "index.html", counts["concepts"], counts["clips_with_audio"],
                counts["audio_bytes"] / 1e6, args.grid_size, args.grid_size, [a["label"] for a in axes], counts["pad_sets"])
    return write_manifest(run, STAGE, args, inputs=inputs, counts=counts, started=started)


def _training_sets(run: Path, clips: dict[str, dict]) -> list[list[str]]:
    """The tag sets the VAE was trained on (RUN/distilled.parquet, train split), else the release's label sets."""
    from conceptcaps_pipeline.run_dir import read_table

    path = run / "distilled.parquet"
    if path.is_file():
        rows = read_table(path, ["aspect_list", "split"], fix=f"re-run `conceptcaps distill --run {run} --force`")
        sets = [r["aspect_list"] for r in rows.to_pylist() if r["split"] == "train"]
        if sets:
            return sets
    return [c["tags"] for c in clips.values()]
