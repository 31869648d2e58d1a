"""The dataset card written by `conceptcaps build`: it parses, its YAML matches the files, and its
body is filled from the run (manifests, taxonomy, statistics, figures, metrics)."""

from __future__ import annotations

import fnmatch
import html
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conceptcaps_pipeline.audio.shards import decode_flac
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.dataset_card.card import (
    model_license,
    read_manifests,
    size_category,
    source_datasets,
    stage_command,
)
from conceptcaps_pipeline.dataset_card.figures import clap_by_tag
from conceptcaps_pipeline.release.build import (
    AUDIO_CONFIGS,
    TEXT_CONFIGS,
    BuildArguments,
    build_release,
    config_names,
    release_files,
)
from conceptcaps_pipeline.run_dir import from_run_relative, read_manifest
from conftest import write_captions_parquet
from huggingface_hub import DatasetCard

from conceptcaps import SPLITS, ConceptCaps

CONFIGS = config_names(True)


def load_card(run):
    return DatasetCard.load(run / "release" / "README.md")


def test_card_parses_and_configs_match_the_files(release_run):
    card = load_card(release_run)
    data = card.data.to_dict()
    # The clips come from a local MusicGen checkpoint (model_type musicgen): MusicGen's CC BY-NC 4.0 is assumed.
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "conceptcaps-mixed", "LICENSE.md")
    assert data["tags"] == ["music", "synthetic", "interpretability", "concept-based-explanations", "tcav"]
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", tag) for tag in data["tags"])  # Hub tags are kebab-case
    assert data["source_datasets"] == ["google/MusicCaps"]
    assert data["size_categories"] == "n<1K" and "text-to-audio" in data["task_categories"]
    files = [p.as_posix() for p in release_files(release_run / "release")]
    parquet = {f for f in files if f.endswith(".parquet")}
    matched = set()
    configs = {c["config_name"]: c for c in data["configs"]}
    assert list(configs) == ["default", "audio", "25pct", "25pct_audio", "10pct", "10pct_audio"]
    assert configs["default"].get("default") is True and not any(c.get("default") for n, c in configs.items() if n != "default")
    for name, config in configs.items():
        assert [e["split"] for e in config["data_files"]] == list(SPLITS)
        for entry in config["data_files"]:
            hits = {f for f in parquet if fnmatch.fnmatch(f, entry["path"])}
            # exactly this config's shards of this split
            assert hits == {f for f in parquet if f.startswith(f"data/{name}/{entry['split']}-")} and hits
            matched |= hits
    assert matched == parquet


def test_card_dataset_info_matches_the_data(release_run):
    card = load_card(release_run)
    infos = {i["config_name"]: i for i in card.data.to_dict()["dataset_info"]}
    rows = read_manifest(release_run, "build")["counts"]["rows"]
    for name, info in infos.items():
        features = datasets.Features._from_yaml_list(info["features"])
        shard = min((release_run / "release" / "data" / name).glob("train-*.parquet"))
        assert features == datasets.Features.from_arrow_schema(pq.read_schema(shard))
        assert {s["name"]: s["num_examples"] for s in info["splits"]} == rows[name]
    assert "audio" in infos["audio"]["features"][-2]["dtype"]


def test_card_body_comes_from_the_run(release_run):
    text = (release_run / "release" / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]
    audio = read_manifest(release_run, "audio")
    distill = read_manifest(release_run, "distill")
    rows = read_manifest(release_run, "build")["counts"]["rows"]["default"]
    assert f"**{sum(rows.values())} samples**: {rows['train']} train, {rows['validation']} validation, {rows['test']} test." in body
    # The split shares the card states are this release's, in whole percent adding up to 100, beside the target.
    shares = re.search(r"The splits train/validation/test hold (\d+)/(\d+)/(\d+)% of the samples \((\d+)/(\d+)/(\d+)\)", body)
    assert shares and [int(n) for n in shares.groups()[3:]] == list(rows.values())
    assert sum(int(p) for p in shares.groups()[:3]) == 100 and all(
        abs(int(p) - 100 * n / sum(rows.values())) < 1 for p, n in zip(shares.groups()[:3], rows.values()))
    assert "about 70/15/15" not in body
    # the exact commands, rebuilt from the manifests' arguments
    # ... naming the source by its file name and a model outside the run by its folder's name
    assert re.search(r"conceptcaps distill --(out|run) RUN --source musiccaps-public.csv", body)
    model = Path(audio["arguments"]["model"]).name
    assert (f"accelerate launch --num_processes 2 -m conceptcaps_pipeline.cli audio generate --run RUN --model "
            f"{model} --duration 0.5 --batch_size 2") in body
    assert "conceptcaps build --run RUN --max_shard_size 5KB --rows_per_group 2" in body
    # models, versions, taxonomy, statistics, figures
    assert f"`{model}`" in body and "Licence: CC-BY-NC 4.0 (MusicGen weights)" in body
    # No path of the machine that built it: the card is published.
    assert not re.search(r"(?<![\w.:/])/(?:tmp|root|home|work|usr|var)/", text), re.findall(r"\S*/tmp/\S*", text)[:3]
    assert str(release_run) not in text and 'load_dataset("RUN/release")' in body
    assert f"transformers {audio['packages']['transformers']}" in body
    assert "taxonomy version 1.1.0" in body and "154 tags" in body
    assert f"{distill['counts']['kept']:,} (label set, caption) pairs" in body
    assert "no `vae sample` manifest" in body  # this run's captions are MusicCaps ones, and the card says so
    for figure in ("figures/tag_frequency.png", "figures/tags_per_sample.png"):
        assert f"]({figure})" in body
        assert (release_run / "release" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no RUN/eval/metrics.json" in body
    assert "@article{agostinelli2023musiclm" in body and "arXiv:2601.14157" in body
    assert "[More Information Needed]" not in text


def test_metrics_table_appears_after_evaluate(release_run, copy_run):
    run = copy_run(release_run)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "rows": [{"stage": "VAE", "metric": "Jaccard (validation)", "value": 0.813, "paper": 0.716, "better": "higher"},
                 {"stage": "audio", "metric": "CLAP score", "value": 0.21234567, "paper": None, "better": "higher"}],
        "skipped": [],
    }))
    build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2, repo_id="my-org/conceptcaps"))
    body = (run / "release" / "README.md").read_text()
    assert "| stage | metric | value | paper |" in body
    assert "| VAE | Jaccard (validation) | 0.813 | 0.716 |" in body
    assert "| audio | CLAP score | 0.2123 | – |" in body
    assert 'load_dataset("my-org/conceptcaps", "audio"' in body
    assert DatasetCard.load(run / "release" / "README.md").data.license == "other"


def test_stage_commands_leave_defaults_out(release_run):
    manifests = read_manifests(release_run)
    assert list(manifests)[:2] == ["distill", "audio"] and list(manifests)[-1] == "build"
    sample = {"stage": "vae_sample", "arguments": {"run": "/x/run", "n": 48, "seed": 0, "require": ["piano", "jazz"],
                                                   "exclude": [], "threshold": 0.5, "force": False}}
    assert stage_command("vae_sample", sample) == "conceptcaps vae sample --run RUN --n 48 --require piano jazz"
    captions = {"stage": "captions_generate", "arguments": {"run": "/x/run", "adapter": "/x/run/captioner",
                                                             "do_sample": False, "limit": None}}
    assert stage_command("captions_generate", captions) == (
        "conceptcaps captions generate --run RUN --adapter RUN/captioner --do_sample false")
    assert stage_command("unknown_stage", {"arguments": {}}) is None


def test_licences_and_metadata_helpers():
    assert model_license("facebook/musicgen-large").startswith("CC-BY-NC 4.0")
    assert model_license("meta-llama/Llama-3.1-8B-Instruct") == "Llama 3.1 Community License"
    assert model_license("laion/larger_clap_music") == "see the model card of `laion/larger_clap_music`"
    assert size_category(999) == "n<1K" and size_category(22_000) == "10K<n<100K"
    assert source_datasets({"arguments": {"source": "google/MusicCaps"}}) == ["google/MusicCaps"]
    assert source_datasets({"arguments": {"source": "/data/musiccaps-public.csv"}}) == ["google/MusicCaps"]
    assert source_datasets({"arguments": {"source": "/data/my-tags.csv"}}) == ["original"]


# -- licence, version, sizes, figures and example clips, on releases built by the real stages -------
@pytest.fixture(scope="module")
def smoke_release(tmp_path_factory, vae_run):
    """A release as the smoke preset makes it: vae_run plus 10 real MusicCaps captions, then the preset's
    audio, evaluate and build stages (`conceptcaps run --stages ...`): clips from the tiny random MusicGen
    that `run` builds into RUN/models/musicgen, per-clip CLAP scores from the tiny CLAP, the VAE's history."""
    run = tmp_path_factory.mktemp("smoke_release") / "run"
    shutil.copytree(vae_run, run)
    write_captions_parquet(run, 10)
    assert main(["run", "--preset", "smoke", "--out", str(run), "--stages", "audio_generate", "evaluate", "build"]) == 0
    return run


def licence_table(release: Path) -> dict[str, str]:
    """config -> licence column of RELEASE/LICENSE.md's table."""
    rows = re.findall(r"^\| `([\w]+)` \| (.+?) \| .+ \|$", (release / "LICENSE.md").read_text(), flags=re.MULTILINE)
    return dict(rows)


def text_files(release: Path) -> list[Path]:
    return sorted(p for p in release.rglob("*") if p.suffix in (".md", ".json"))


def test_a_tiny_model_release_says_so_and_stays_cc_by_sa(smoke_release):
    release = smoke_release / "release"
    data = DatasetCard.load(release / "README.md").data.to_dict()
    assert data["license"] == "cc-by-sa-4.0" and "license_name" not in data and "license_link" not in data
    assert "smoke-test" in data["tags"]
    model = read_manifest(smoke_release, "audio")["arguments"]["model"]
    # how `run` records "@tiny/musicgen": a path inside the run, stored run-relative so a copied run stays valid
    assert model == "RUN/models/musicgen"
    assert Path(from_run_relative(model, smoke_release)) == (smoke_release / "models" / "musicgen").resolve()
    assert read_manifest(smoke_release, "build")["tiny_models"] == [model]
    body = (release / "README.md").read_text()
    assert "**This release is a pipeline check, not data.**" in body and "`RUN/models/musicgen`" in body
    licence = (release / "LICENSE.md").read_text()
    assert "**This release was made with tiny random-weight models**" in licence
    assert licence_table(release) == {c: "CC BY-SA 4.0" for c in CONFIGS}
    assert "[LICENSE.md](LICENSE.md)" in body


def test_a_musicgen_release_is_licensed_per_config(release_run, copy_run):
    """A run whose audio manifest records MusicGen by its Hub id (what `audio generate --model
    facebook/musicgen-large` writes): the audio configs carry CC BY-NC 4.0, the card says `license: other`."""
    run = copy_run(release_run)
    path = run / "manifests" / "audio.json"
    manifest = json.loads(path.read_text())
    manifest["arguments"]["model"] = "facebook/musicgen-large"
    path.write_text(json.dumps(manifest))
    build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2, repo_id="my-org/conceptcaps"))
    release = run / "release"
    data = DatasetCard.load(release / "README.md").data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "conceptcaps-mixed", "LICENSE.md")
    assert "smoke-test" not in data["tags"]
    table = licence_table(release)
    assert {c: table[c] for c in TEXT_CONFIGS} == {c: "CC BY-SA 4.0" for c in TEXT_CONFIGS}
    for config in AUDIO_CONFIGS:
        assert table[config] == "`audio` column: CC BY-NC 4.0 (non-commercial); other columns: CC BY-SA 4.0"
    licence = (release / "LICENSE.md").read_text()
    assert "MusicGen (`facebook/musicgen-large`)" in licence and "tiny random" not in licence
    body = (release / "README.md").read_text()
    assert "for non-commercial use only" in body and "pipeline check" not in body
    # The builder says the same per config.
    assert "CC BY-NC 4.0" in ConceptCaps(config_name="audio", data_dir=str(run)).info.license
    assert ConceptCaps(config_name="default", data_dir=str(run)).info.license == "cc-by-sa-4.0"
    # The example players point at the Hub repository's files.
    sources = re.findall(r'<audio controls preload="none" src="([^"]+)">', body)
    assert sources and all(s.startswith("https://huggingface.co/datasets/my-org/conceptcaps/resolve/main/examples/")
                           for s in sources)
    # Without the audio configs the same run is CC BY-SA 4.0 throughout, and ships no clips.
    build_release(BuildArguments(run=str(run), audio=False))
    data = DatasetCard.load(release / "README.md").data.to_dict()
    assert data["license"] == "cc-by-sa-4.0" and "license_name" not in data
    assert licence_table(release) == {c: "CC BY-SA 4.0" for c in TEXT_CONFIGS}
    assert not (release / "examples").exists() and "<audio" not in (release / "README.md").read_text()


def test_no_absolute_path_anywhere_in_the_release(smoke_release, release_run):
    absolute = re.compile(r"""(?:^|[\s"'(`=\[])(/(?:[\w.~-]+/)+[\w.~-]*)""")
    for run in (smoke_release, release_run):
        release = run / "release"
        files = text_files(release)
        assert {p.name for p in files} >= {"README.md", "LICENSE.md", "concepts.json", "taxonomy.json"}
        for path in files:
            text = path.read_text()
            assert not absolute.findall(text), (path, absolute.findall(text)[:3])
            assert not [c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"], path  # text, not binary
            assert str(run) not in text and str(run.resolve()) not in text and str(Path.home()) not in text, path
    # The taxonomy ships with its source named by file name; RUN/taxonomy.json keeps the full path.
    shipped = json.loads((smoke_release / "release" / "taxonomy.json").read_text())
    local = json.loads((smoke_release / "taxonomy.json").read_text())
    assert Path(local["source_file"]).is_absolute() and shipped["source_file"] == Path(local["source_file"]).name
    assert {k: v for k, v in shipped.items() if k != "source_file"} == {k: v for k, v in local.items() if k != "source_file"}


def test_sizes_and_version_of_every_config(smoke_release, tmp_path):
    release = smoke_release / "release"
    data = DatasetCard.load(release / "README.md").data.to_dict()
    version = str(ConceptCaps.VERSION)
    assert {c["config_name"]: c["version"] for c in data["configs"]} == {c: version for c in CONFIGS}
    for info in data["dataset_info"]:
        shipped = sum(p.stat().st_size for p in (release / "data" / info["config_name"]).glob("*.parquet"))
        assert info["download_size"] == shipped > 0
        assert info["dataset_size"] == sum(s["num_bytes"] for s in info["splits"]) > 0
    for config in CONFIGS:  # what datasets makes of the folder's card
        builder = datasets.load_dataset_builder(str(release), config, cache_dir=str(tmp_path))
        assert str(builder.info.version) == version and builder.info.download_size > 0
    loaded = datasets.load_dataset(str(release), "25pct_audio", split="train", cache_dir=str(tmp_path))
    assert str(loaded.info.version) == version


def test_figures_are_drawn_and_embedded(smoke_release):
    release = smoke_release / "release"
    body = (release / "README.md").read_text().split("\n---\n", 1)[1]
    present = {t for r in pq.read_table(release / "data" / "default").to_pylist() for t in r["aspect_list"]}
    categories = json.loads((smoke_release / "taxonomy.json").read_text())["categories"]
    expected = {"tag_frequency.png", "tags_per_sample.png", "split_counts.png", "clap_per_concept.png", "vae_loss.png"}
    expected |= {f"cooccurrence_{c}.png" for c, tags in categories.items() if len(present & set(tags)) >= 2}
    drawn = {p.name for p in (release / "figures").iterdir()}
    assert drawn == expected and len(expected) >= 7
    for name in drawn:
        assert (release / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](figures/{name})" in body
    assert set(re.findall(r"\]\(figures/([^)]+)\)", body)) == drawn


def test_clap_per_concept_is_the_mean_of_the_clips_scores(smoke_release):
    """The per-concept means drawn in clap_per_concept.png, recomputed from metrics.json and the release rows."""
    scores = json.loads((smoke_release / "eval" / "metrics.json").read_text())["details"]["audio"]["clap"]["clap_scores"]
    rows = pq.read_table(smoke_release / "release" / "data" / "default").to_pylist()
    assert {r["id"] for r in rows} == set(scores)
    tags_of = {r["id"]: r["aspect_list"] for r in rows}
    by_tag = clap_by_tag(scores, tags_of)
    for tag in {t for r in rows for t in r["aspect_list"]}:
        mine = [scores[r["id"]] for r in rows if tag in r["aspect_list"]]
        assert by_tag[tag][2] == len(mine) and by_tag[tag][0] == pytest.approx(sum(mine) / len(mine))


def test_example_clips_play_the_audio_config(smoke_release):
    release = smoke_release / "release"
    body = (release / "README.md").read_text()
    players = re.findall(r'<tr><td><audio controls preload="none" src="(examples/[^"]+\.wav)"></audio>'
                         r'<br><code>([^<]+)</code> \((\w+)\)</td><td>([^<]*)</td>', body)
    assert 4 <= len(players) <= 6
    clips = {r["id"]: r for r in pq.read_table(release / "data" / "audio").to_pylist()}
    assert {p.name for p in (release / "examples").iterdir()} == {Path(src).name for src, *_ in players}
    for src, clip_id, split, caption in players:
        row = clips[clip_id]
        assert caption == html.escape(row["caption"])
        in_split = {i for shard in (release / "data" / "audio").glob(f"{split}-*.parquet")
                    for i in pq.read_table(shard, columns=["id"]).column("id").to_pylist()}
        assert clip_id in in_split
        wav, rate = sf.read(release / src, dtype="float32")
        flac, flac_rate = decode_flac(row["audio"]["bytes"])
        assert sf.info(release / src).format == "WAV" and rate == flac_rate
        np.testing.assert_allclose(wav, flac.reshape(wav.shape), atol=1 / 2**15)
    shown = [set(clips[clip_id]["aspect_list"]) for _, clip_id, _, _ in players]
    assert len(set().union(*shown)) > max(len(s) for s in shown)  # together they show more than one clip does


def test_push_refuses_a_tiny_model_release(smoke_release):
    command = [sys.executable, "-m", "conceptcaps_pipeline.cli", "push", "--run", str(smoke_release), "--repo_id", "my-org/x",
               "--dry_run"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1 and "--allow_tiny_models" in refused.stderr
    assert "RUN/models/musicgen" in refused.stderr
    allowed = subprocess.run([*command, "--allow_tiny_models"], capture_output=True, text=True, env=env, timeout=300,
                             check=False)
    assert allowed.returncode == 0, allowed.stderr
    assert "dry run: nothing uploaded" in allowed.stderr and "tiny random-weight models" in allowed.stderr


def test_example_captions_are_printable():
    """A noisy model's caption may hold NUL or other control codes; the card shows U+FFFD instead."""
    from conceptcaps_pipeline.dataset_card.examples import printable

    assert printable("a\x00b\x11c\nd\te") == "a\ufffdb\ufffdc\nd\te"
    assert printable("plain caption, déjà vu") == "plain caption, déjà vu"


FONT_PROBE = """
import sys
from pathlib import Path
from conceptcaps_pipeline.dataset_card.figures import fonts_read_once, plot_cooccurrence

def read_mb():
    with open("/proc/self/io") as io:
        return int(io.readline().split()[1]) / 1e6

tags = [f"tag {i}" for i in range(10)]
sets = [[tags[i], tags[(i * 7 + k) % 10]] for i in range(10) for k in range(1, 8)]
plot_cooccurrence(Path(sys.argv[1]) / "warm.png", "genre", tags, sets)  # imports and font lookup out of the way
before = read_mb()
plot_cooccurrence(Path(sys.argv[1]) / "file.png", "genre", tags, sets)
middle = read_mb()
with fonts_read_once():
    plot_cooccurrence(Path(sys.argv[1]) / "memory.png", "genre", tags, sets)
print(middle - before, read_mb() - middle)
"""


def test_card_figures_read_each_font_once(tmp_path):
    """The same pixels with the fonts opened from memory, and far fewer bytes read (matplotlib reads glyphs from the
    font file again for each text drawn); afterwards matplotlib opens fonts from files again."""
    from matplotlib import font_manager, ft2font

    done = subprocess.run([sys.executable, "-c", FONT_PROBE, str(tmp_path)], capture_output=True, text=True,
                          check=True, timeout=120)
    from_file, from_memory = map(float, done.stdout.split())
    assert from_file > 5 * from_memory + 1, (from_file, from_memory)
    assert np.array_equal(_pixels(tmp_path / "file.png"), _pixels(tmp_path / "memory.png"))
    from conceptcaps_pipeline.dataset_card.figures import fonts_read_once

    with fonts_read_once():
        assert font_manager.ft2font is not ft2font
    assert font_manager.ft2font is ft2font


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)
