"""The dataset card written by `conceptcaps build`: it parses, its YAML matches the files, and its
body is filled from the run (manifests, taxonomy, statistics, figures, metrics)."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard

from conceptcaps import SPLITS
from dataset_card.card import model_license, read_manifests, size_category, source_datasets, stage_command
from generation.build import BuildArguments, build_release, release_files
from generation.run_dir import read_manifest


def load_card(run):
    return DatasetCard.load(run / "release" / "README.md")


def test_card_parses_and_configs_match_the_files(release_run):
    card = load_card(release_run)
    data = card.data.to_dict()
    assert data["license"] == "cc-by-sa-4.0"
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
    # the exact commands, rebuilt from the manifests' arguments
    # ... naming the source by its file name and a model outside the run by its folder's name
    assert "conceptcaps distill --out RUN --source musiccaps-public.csv" in body
    model = Path(audio["arguments"]["model"]).name
    assert (f"accelerate launch --num_processes 2 -m generation.cli audio generate --run RUN --model "
            f"{model} --duration 0.5 --batch_size 2") in body
    assert "conceptcaps build --run RUN --max_shard_size 5KB --rows_per_group 2" in body
    # models, versions, taxonomy, statistics, figures
    assert f"`{model}`" in body and "a local checkpoint: see its own licence" in body
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
    assert DatasetCard.load(run / "release" / "README.md").data.license == "cc-by-sa-4.0"


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
