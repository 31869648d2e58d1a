"""`conceptcaps evaluate` on a run with every artifact, made by the real stages on tiny models:
metrics.json rows against the metric modules called directly, report.md and figures, skipped
metrics, VAE metrics recomputed, reference audio from dataset folders (save_to_disk, parquet,
audiofolder) read by `datasets`, clear errors for a wrong split or column."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.evaluate.metrics import PAPER
from conceptcaps_pipeline.evaluate.references import reference_clips
from conceptcaps_pipeline.evaluate.report import metrics_table
from conceptcaps_pipeline.evaluate.run import EvaluateArguments, evaluate_run
from conftest import ROOT

JACCARD_PAPER = "Jaccard, paper definition: 0.5 threshold, pooled (validation)"
JACCARD_RULE = "Jaccard, decoding rule, mean per set (validation)"
EXPECTED_ROWS = [
    ("VAE", JACCARD_PAPER), ("VAE", JACCARD_RULE), ("VAE", "Hamming loss, 0.5 threshold (validation)"),
    ("VAE", "Diversity (% unique sets)"), ("VAE", "Co-occurrence cosine"),
    ("VAE", "Co-occurrence cosine, random-tag control"), ("VAE", "Tags-per-set distance from the data (TVD)"),
    ("LLM", "BERTScore F1"), ("LLM", "BLEU (sacreBLEU / 100)"), ("LLM", "ROUGE-L"), ("LLM", "MAUVE"),
    ("LLM", "Recording-quality remarks (validation captions)"),
    ("LLM", "Attribute coverage (captions.parquet)"), ("LLM", "Full coverage rate"),
    ("LLM", "Unrequested tags per caption"), ("LLM", "Recording-quality remarks (captions.parquet)"),
    ("VAE", "Diversity (% unique sets, attributes.parquet)"), ("VAE", "Co-occurrence cosine (attributes.parquet)"),
    ("VAE", "Tags-per-set distance from the data, TVD (attributes.parquet)"),
    ("VAE", "Largest per-category size distance, TVD (attributes.parquet)"),
    ("audio", "CLAP score (raw cosine)"), ("audio", "FAD (CLAP embeddings)"), ("audio", "FAD∞ (CLAP embeddings)"),
]
N_CAPTIONS = 12


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory, distilled_run):
    """Tiny CLAP and BERT (random weights, tokenizers trained on the distilled MusicCaps captions)."""
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_bert, build_tiny_clap

    texts = pq.read_table(distilled_run / "distilled.parquet", columns=["caption"]).column("caption").to_pylist()
    folder = tmp_path_factory.mktemp("tiny_eval")
    return {"clap": str(build_tiny_clap(folder / "clap", texts)), "bert": str(build_tiny_bert(folder / "bert", texts))}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, captioner_run, tiny_musicgen):
    """captioner_run (distilled, VAE, attributes, captioner) plus captions and audio from the real stages."""
    from accelerate import PartialState
    from conceptcaps_pipeline.audio.generate import AudioArguments, generate_audio
    from conceptcaps_pipeline.captions.generate import CaptionsArguments, generate_captions

    run = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(captioner_run, run)
    # A 4-step tiny captioner rarely ends its turn: accept cut outputs, as the smoke preset does.
    generate_captions(CaptionsArguments(run=str(run), limit=N_CAPTIONS, max_new_tokens=24, require_end_of_turn=False,
                                        max_failure_rate=1.0, seed=1))
    existed = PartialState._shared_state != {}
    try:
        generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=1.0, batch_size=6))
    finally:
        if not existed:
            PartialState._reset_state()
    return run


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """Six tones and chords (FLAC and WAV, 22.05 kHz, 1.5 s) as a reference set for FAD."""
    folder = tmp_path_factory.mktemp("reference_audio")
    rate = 22050
    t = np.arange(int(1.5 * rate)) / rate
    for i, freq in enumerate((110, 220, 330, 440, 550, 880)):
        wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * 1.5 * freq * t)
        sf.write(folder / f"tone-{i}.{'flac' if i % 2 else 'wav'}", wave.astype(np.float32), rate)
    return folder


def _arguments(run, tiny_eval, **options) -> EvaluateArguments:
    defaults = {"clap_model": tiny_eval["clap"], "bertscore_model": tiny_eval["bert"], "mauve_model": tiny_eval["bert"],
                "mauve_pooling": "mean", "max_reference_captions": 24, "clap_batch_size": 4}
    return EvaluateArguments(run=str(run), **{**defaults, **options})


@pytest.fixture(scope="module")
def evaluated(full_run, tiny_eval, reference_folder):
    manifest = evaluate_run(_arguments(full_run, tiny_eval, reference_audio=str(reference_folder)))
    return full_run, manifest


def test_full_run_gets_every_row_and_a_complete_report(evaluated, tiny_eval, reference_folder):
    run, manifest = evaluated
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert [(r["stage"], r["metric"]) for r in metrics["rows"]] == EXPECTED_ROWS
    assert metrics["skipped"] == {}
    for r in metrics["rows"]:
        assert math.isfinite(r["value"]), r
        assert r["better"] in ("higher", "lower")
    papers = {r["metric"]: r["paper"] for r in metrics["rows"]}
    assert papers["BLEU (sacreBLEU / 100)"] == PAPER["bleu"] == 0.2465 and papers["FAD (CLAP embeddings)"] == 0.4603
    assert papers[JACCARD_PAPER] == 0.716 and papers[JACCARD_RULE] is None and papers["Full coverage rate"] is None
    assert papers["FAD∞ (CLAP embeddings)"] is None  # the paper reports no FAD∞

    report = (run / "eval" / "report.md").read_text()
    assert metrics_table(metrics) in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == 4
    for link in links:
        png = run / "eval" / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert sorted(p.name for p in (run / "eval" / "figures").iterdir()) == [
        "clap_scores.png", "tag_frequency.png", "tags_per_sample.png", "vae_latent_pca.png"]
    models = metrics["details"]["models"]
    assert models["CLAP (CLAP score, FAD)"] == tiny_eval["clap"] and models["MAUVE features"] == tiny_eval["bert"]
    assert models["captioner adapter"] == "RUN/captioner"  # a path inside the run, as RUN/... (portable runs)
    assert "Nothing was skipped." in report and f"- BERTScore: `{tiny_eval['bert']}`" in report
    assert "FAD∞ is FAD extrapolated to infinitely many clips" in report and "comparable across sample sizes" in report
    fad = metrics["details"]["audio"]["fad"]
    assert f"FAD∞: the line FAD = {fad['fad_inf']:.4g} + {fad['fad_inf_slope']:.4g} / n" in report
    assert f"| audio | FAD∞ (CLAP embeddings) | {fad['fad_inf']:.4g} | – | lower ↓ |" in report
    assert manifest["counts"] == {"rows": len(EXPECTED_ROWS), "skipped": 0, "figures": 4}

    again = evaluate_run(_arguments(run, tiny_eval, reference_audio=str(reference_folder)))
    assert again["finished_at"] == manifest["finished_at"]  # up to date: skipped


def test_rows_match_the_metric_modules_called_directly(evaluated, tiny_eval, reference_folder):
    import evaluate

    run, _ = evaluated
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    value = {r["metric"]: r["value"] for r in metrics["rows"]}
    details = metrics["details"]

    vae = json.loads((run / "vae" / "metrics.json").read_text())
    assert value[JACCARD_RULE] == vae["validation"]["jaccard"]
    assert value[JACCARD_PAPER] == vae["validation"]["threshold_0.5"]["jaccard_micro"]
    assert value["Diversity (% unique sets)"] == vae["samples"]["diversity"]

    # Caption quality: the validation captions written by the run's captioner, against the experts' captions.
    written = pq.read_table(run / "eval" / "validation_captions.parquet").to_pylist()
    distilled = pq.read_table(run / "distilled.parquet").to_pylist()
    validation = sorted((r for r in distilled if r["split"] == "validation"), key=lambda r: r["id"])[:24]
    assert [w["id"] for w in written] == [r["id"] for r in validation]
    assert [w["reference"] for w in written] == [r["caption"] for r in validation]
    usable = [w for w in written if w["failure"] is None]
    assert details["caption_quality"]["usable_captions"] == len(usable) >= 12
    quality = evaluate.load(str(ROOT / "eval" / "caption_quality"))
    direct = quality.compute(predictions=[w["caption"] for w in usable], references=[w["reference"] for w in usable],
                             metrics=["bleu", "rougeL"])
    assert value["BLEU (sacreBLEU / 100)"] == pytest.approx(direct["bleu"] / 100)
    assert details["caption_quality"]["scores"]["bleu"] == pytest.approx(direct["bleu"])
    assert value["ROUGE-L"] == pytest.approx(direct["rougeL"])

    # Coverage: the same module the captions stage used for its per-caption coverage column.
    captions = pq.read_table(run / "captions.parquet").to_pylist()
    assert value["Attribute coverage (captions.parquet)"] == pytest.approx(np.mean([c["coverage"] for c in captions]))

    # CLAP: every clip, scored again by eval/clap_score's own compute().
    clips = {}
    for shard in sorted((run / "audio").glob("shard-*.parquet")):
        clips.update({r["id"]: r["audio"] for r in pq.read_table(shard, columns=["id", "audio"]).to_pylist()})
    by_id = {c["id"]: c["caption"] for c in captions}
    assert set(clips) == set(by_id) and len(clips) == len(captions)
    scores = details["audio"]["clap"]["clap_scores"]
    ids = sorted(scores)
    clap = evaluate.load(str(ROOT / "eval" / "clap_score"))
    direct = clap.compute(predictions=[by_id[i] for i in ids], references=[{"bytes": clips[i]} for i in ids],
                          model=tiny_eval["clap"], batch_size=3)
    assert [scores[i] for i in ids] == pytest.approx(direct["clap_scores"], abs=1e-5)
    assert value["CLAP score (raw cosine)"] == pytest.approx(direct["clap_score"], abs=1e-6)

    # FAD: the run's clips against the reference folder, embedded and measured by eval/fad itself.
    fad = evaluate.load(str(ROOT / "eval" / "fad"))
    # In shard order, as the stage embeds them: FAD ignores the order, FAD∞'s seeded subsets do not.
    ours = fad.embed_audio([{"bytes": audio} for audio in clips.values()], model=tiny_eval["clap"])
    reference = fad.embed_audio(sorted(str(p) for p in reference_folder.iterdir()), model=tiny_eval["clap"])
    expected = fad.compute(predictions=ours, references=reference, seed=0)  # --seed 0, the default
    assert value["FAD (CLAP embeddings)"] == pytest.approx(expected["fad"], rel=1e-4)
    # FAD∞: the same subsets (seeded), the same line.
    assert value["FAD∞ (CLAP embeddings)"] == pytest.approx(expected["fad_inf"], rel=1e-4, abs=1e-6)
    assert details["audio"]["fad"]["fad_inf_r2"] == pytest.approx(expected["fad_inf_r2"], abs=1e-4)
    sizes = [n for n, _ in details["audio"]["fad"]["fad_inf_curve"]]
    assert sizes[0] == len(ids) // 2 and sizes[-1] == len(ids) and sizes == sorted(set(sizes))
    assert details["audio"]["fad"]["n_references"] == 6 and details["audio"]["fad"]["n_predictions"] == len(ids)


def test_run_without_audio_skips_clap_and_fad_and_recomputes_vae_metrics(full_run, tiny_eval, reference_folder, copy_run):
    run = copy_run(full_run)
    shutil.rmtree(run / "audio")
    shutil.rmtree(run / "eval", ignore_errors=True)
    (run / "vae" / "metrics.json").unlink()
    evaluate_run(_arguments(run, tiny_eval, reference_audio=str(reference_folder), skip=["caption_quality"]))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["skipped"]) == {"CLAP", "FAD", "caption quality"}
    assert "conceptcaps audio generate" in metrics["skipped"]["CLAP"]
    assert metrics["skipped"]["caption quality"] == "--skip caption_quality"
    assert {r["stage"] for r in metrics["rows"]} == {"VAE", "LLM"}

    # The VAE metrics are recomputed with eval/vae_metrics and the training settings: the same numbers.
    original = json.loads((full_run / "vae" / "metrics.json").read_text())
    value = {r["metric"]: r["value"] for r in metrics["rows"]}
    assert value[JACCARD_RULE] == pytest.approx(original["validation"]["jaccard"])
    assert value[JACCARD_PAPER] == pytest.approx(original["validation"]["threshold_0.5"]["jaccard_micro"])
    assert value["Co-occurrence cosine"] == pytest.approx(original["samples"]["cooccurrence_cosine"])

    report = (run / "eval" / "report.md").read_text()
    assert "- CLAP: no RUN/audio shards" in report and "CLAP score histogram: not drawn" in report
    assert not (run / "eval" / "figures" / "clap_scores.png").exists()
    assert len(re.findall(r"!\[", report)) == 3


def test_clap_score_reuses_the_audio_embeddings_of_audio_score(evaluated, tiny_eval, copy_run, tmp_path):
    """After `audio score` with the same CLAP model, evaluate reuses its audio embeddings: the same CLAP score as
    when it embeds every clip itself; another CLAP checkpoint's embeddings are not reused."""
    from conceptcaps_pipeline.audio.score import ScoreArguments, score_audio

    full_run, _ = evaluated
    computed = json.loads((full_run / "eval" / "metrics.json").read_text())["details"]["audio"]
    assert computed["clap_embeddings_reused"] == 0  # nothing stored: every clip embedded here
    run = copy_run(full_run)
    score_audio(ScoreArguments(run=str(run), model=tiny_eval["clap"], batch_size=5, n_bootstrap=0))
    only_clap = ["vae", "caption_quality", "coverage", "sets"]
    evaluate_run(_arguments(run, tiny_eval, skip=only_clap, force=True))
    reused = json.loads((run / "eval" / "metrics.json").read_text())["details"]["audio"]
    assert reused["clap_embeddings_reused"] == reused["clips_scored"] == computed["clips_scored"] > 0
    assert reused["clap"]["clap_score"] == pytest.approx(computed["clap"]["clap_score"], abs=1e-6)
    assert reused["clap"]["clap_scores"] == pytest.approx(computed["clap"]["clap_scores"], abs=1e-5)

    # Scored with another checkpoint (a copy elsewhere counts as another): evaluate embeds every clip itself.
    other = shutil.copytree(tiny_eval["clap"], tmp_path / "other_clap")
    score_audio(ScoreArguments(run=str(run), model=str(other), batch_size=5, n_bootstrap=0))
    evaluate_run(_arguments(run, tiny_eval, skip=only_clap, force=True))
    again = json.loads((run / "eval" / "metrics.json").read_text())["details"]["audio"]
    assert again["clap_embeddings_reused"] == 0
    assert again["clap"]["clap_scores"] == pytest.approx(computed["clap"]["clap_scores"], abs=1e-5)


def test_reference_audio_from_a_dataset_folder(tmp_path, reference_folder, tiny_eval):
    import datasets
    import evaluate

    files = sorted(str(p) for p in reference_folder.iterdir())
    data = datasets.Dataset.from_dict({"clip": [{"bytes": Path(f).read_bytes(), "path": Path(f).name} for f in files]},
                                      features=datasets.Features({"clip": datasets.Audio()}))
    data.save_to_disk(str(tmp_path / "reference"))
    args = EvaluateArguments(run="unused", reference_audio=str(tmp_path / "reference"), reference_column="clip",
                             max_reference_clips=5)
    description, chunks = reference_clips(args)
    items = [item for chunk in chunks for item in chunk]
    assert description.startswith("5 clips of") and len(items) == 5
    clap = evaluate.load(str(ROOT / "eval" / "clap_score"))
    from_dataset = clap.embed_audio(items, model=tiny_eval["clap"])
    from_files = clap.embed_audio(files[:5], model=tiny_eval["clap"])
    np.testing.assert_allclose(from_dataset, from_files, atol=1e-6)

    with pytest.raises(ConceptCapsError, match="--reference_column"):
        reference_clips(EvaluateArguments(run="unused", reference_audio=str(tmp_path / "reference")))
    with pytest.raises(ConceptCapsError, match="cannot load --reference_audio 'no-such-org/no-such-set'"):
        reference_clips(EvaluateArguments(run="unused", reference_audio="no-such-org/no-such-set"))


def _write_reference_datasets(root: Path, reference_folder: Path) -> dict:
    """The six reference clips as a parquet dataset (splits train/test, audio column `clip`) and as an
    audiofolder (train/ with metadata.csv): the layouts of a Hub dataset downloaded with `hf download`."""
    import datasets

    files = sorted(reference_folder.iterdir())
    features = datasets.Features({"clip": datasets.Audio(), "genre": datasets.Value("string")})
    parquet = root / "parquet" / "data"
    parquet.mkdir(parents=True)
    for split, part in (("train", files[:4]), ("test", files[4:])):
        records = {"clip": [{"bytes": f.read_bytes(), "path": f.name} for f in part], "genre": ["tone"] * len(part)}
        datasets.Dataset.from_dict(records, features=features).to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    audiofolder = root / "audiofolder" / "train"
    audiofolder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, audiofolder / f.name)
    (audiofolder / "metadata.csv").write_text("file_name,genre\n" + "".join(f"{f.name},tone\n" for f in files))
    return {"parquet": root / "parquet", "audiofolder": root / "audiofolder", "files": [str(f) for f in files]}


def test_reference_audio_from_parquet_and_audiofolder_datasets(tmp_path, reference_folder, tiny_eval):
    """Local dataset folders go through datasets.load_dataset, split and column chosen by the options."""
    import evaluate

    layouts = _write_reference_datasets(tmp_path, reference_folder)
    clap = evaluate.load(str(ROOT / "eval" / "clap_score"))
    from_files = clap.embed_audio(layouts["files"], model=tiny_eval["clap"])

    args = EvaluateArguments(run="unused", reference_audio=str(layouts["parquet"]), reference_column="clip")
    description, chunks = reference_clips(args)
    items = [item for chunk in chunks for item in chunk]
    assert description == f"4 clips of {layouts['parquet']} (train)" and len(items) == 4
    np.testing.assert_allclose(clap.embed_audio(items, model=tiny_eval["clap"]), from_files[:4], atol=1e-6)
    test_args = EvaluateArguments(run="unused", reference_audio=str(layouts["parquet"]), reference_split="test",
                                  reference_column="clip")
    items = [item for chunk in reference_clips(test_args)[1] for item in chunk]
    np.testing.assert_allclose(clap.embed_audio(items, model=tiny_eval["clap"]), from_files[4:], atol=1e-6)

    # An audiofolder: audio files with metadata.csv, read as a dataset (column `audio`), not file by file.
    args = EvaluateArguments(run="unused", reference_audio=str(layouts["audiofolder"]), max_reference_clips=5)
    description, chunks = reference_clips(args)
    items = [item for chunk in chunks for item in chunk]
    assert description == f"5 clips of {layouts['audiofolder']} (train)"
    assert sorted(Path(item["path"]).name for item in items) == sorted(Path(f).name for f in layouts["files"])[:5]
    by_name = dict(zip((Path(f).name for f in layouts["files"]), from_files))
    embedded = clap.embed_audio(items, model=tiny_eval["clap"])
    np.testing.assert_allclose(embedded, [by_name[Path(item["path"]).name] for item in items], atol=1e-6)


def test_reference_dataset_errors_name_what_exists(tmp_path, reference_folder, full_run, tiny_eval, copy_run):
    layouts = _write_reference_datasets(tmp_path, reference_folder)
    parquet = str(layouts["parquet"])
    with pytest.raises(ConceptCapsError, match=r"no split 'validation' \(splits: train, test\); pass --reference_split"):
        reference_clips(EvaluateArguments(run="unused", reference_audio=parquet, reference_split="validation",
                                          reference_column="clip"))
    with pytest.raises(ConceptCapsError, match=r"no column 'audio' in split 'train' \(columns: clip, genre\); "
                                               r"pass --reference_column"):
        reference_clips(EvaluateArguments(run="unused", reference_audio=parquet))
    with pytest.raises(ConceptCapsError, match=r"no split 'test' \(splits: train\)"):
        reference_clips(EvaluateArguments(run="unused", reference_audio=str(layouts["audiofolder"]),
                                          reference_split="test"))
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no clips here")
    with pytest.raises(ConceptCapsError, match="the folder holds no audio file"):
        reference_clips(EvaluateArguments(run="unused", reference_audio=str(empty)))
    # The stage stops on it with the same one-line message.
    run = copy_run(full_run)
    with pytest.raises(ConceptCapsError) as err:
        evaluate_run(_arguments(run, tiny_eval, reference_audio=parquet, reference_split="dev", force=True))
    assert "no split 'dev'" in str(err.value) and "\n" not in str(err.value)


def test_offline_hub_model_id_names_the_option(full_run, tiny_eval, copy_run):
    run = copy_run(full_run)
    with pytest.raises(ConceptCapsError, match=r"--clap_model") as err:
        evaluate_run(_arguments(run, tiny_eval, clap_model="no-such-org/no-such-clap", force=True))
    assert "hf download no-such-org/no-such-clap" in str(err.value)
    with pytest.raises(ConceptCapsError, match=r"--mauve_model"):
        evaluate_run(_arguments(run, tiny_eval, mauve_model="no-such-org/no-such-gpt", force=True))
    with pytest.raises(ConceptCapsError, match=r"--captioner_model"):
        evaluate_run(_arguments(run, tiny_eval, captioner_adapter="none", force=True))


def test_metrics_table_formats_ours_beside_the_paper():
    table = metrics_table({"rows": [
        {"stage": "VAE", "metric": "Jaccard (validation)", "value": 0.81312, "paper": 0.716, "better": "higher"},
        {"stage": "LLM", "metric": "Full coverage rate", "value": 0.5, "paper": None, "better": "higher"},
        {"stage": "audio", "metric": "FAD (CLAP embeddings)", "value": 1.23456, "paper": 0.4603, "better": "lower"},
    ]})
    assert table.splitlines() == [
        "| stage | metric | ConceptCaps (this run) | paper | better |",
        "| --- | --- | --- | --- | --- |",
        "| VAE | Jaccard (validation) | 0.8131 | 0.716 | higher ↑ |",
        "| LLM | Full coverage rate | 0.5 | – | higher ↑ |",
        "| audio | FAD (CLAP embeddings) | 1.235 | 0.4603 | lower ↓ |",
    ]


def test_cli_on_an_empty_run_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "conceptcaps_pipeline.cli", "evaluate", "--run", str(tmp_path)],
                            check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert "distilled.parquet not found" in result.stderr and "conceptcaps distill" in result.stderr
    assert "Traceback" not in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "conceptcaps_pipeline.cli", "evaluate", "--help"],
                               check=False, capture_output=True, text=True, timeout=300, cwd=ROOT).stdout
    assert "--reference_audio" in help_text and "--clap_model" in help_text and "--skip" in help_text
    assert "--reference_split" in help_text and "--reference_column" in help_text and "Hub dataset" in help_text


def test_paper_preset_computes_fad_against_gtzan_from_the_hub(tmp_path):
    """The paper preset scores FAD the paper's way (CLAP against GTZAN): a parquet copy of GTZAN on the
    Hub, named by id, split and column (a loading-script copy would not load with datasets>=4)."""
    from conceptcaps_pipeline.run_all import load_preset

    section = load_preset("paper")["evaluate"]
    args = EvaluateArguments(run=str(tmp_path), **section)
    assert (args.reference_audio, args.reference_split, args.reference_column) == (
        "sanchit-gandhi/gtzan", "train", "audio")
    assert args.clap_model == "laion/larger_clap_music" and "fad" not in args.skip
    # Offline (as in the tests) the id fails with the one-line fix, naming the id and split.
    with pytest.raises(ConceptCapsError, match=r"cannot load --reference_audio 'sanchit-gandhi/gtzan' split 'train'.*"
                                               r"hf download sanchit-gandhi/gtzan --repo-type dataset"):
        reference_clips(args)
