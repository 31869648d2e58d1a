"""`conceptcaps vae explain` on an attribute-regularised VAE trained on the real MusicCaps distill:
what the explanations say, certainty and withholding, resume, --force, determinism, errors."""

import json

import pytest
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import read_manifest
from conceptcaps_pipeline.vae.explain import VaeExplainArguments, explain_vae

SMALL = {"anchors": 24, "seeds": 2, "steps": 7, "top_kl": 3}


@pytest.fixture(scope="module")
def explained_run(tmp_path_factory, lsr_run):
    import shutil

    run = tmp_path_factory.mktemp("explained") / "run"
    shutil.copytree(lsr_run, run)
    explain_vae(VaeExplainArguments(run=str(run), **SMALL))
    return run


def by_dim(run) -> dict[int, dict]:
    return {e["dim"]: e for e in json.loads((run / "vae" / "explain.json").read_text())["dims"]}


def test_regularised_dimensions_are_explained_by_their_attribute(explained_run):
    dims = by_dim(explained_run)
    assert [dims[d]["kind"] for d in range(4)] == ["regularised: tempo", "regularised: instrument_count",
                                                   "regularised: vocal", "regularised: arousal"]
    tempo = dims[0]
    assert tempo["raises"][0]["tag"] == "fast tempo" and "slow tempo" in [t["tag"] for t in tempo["lowers"]]
    assert tempo["certainty"] >= 0.7 and tempo["explanation"].startswith("raises: fast tempo")
    assert tempo["raises"][0]["monotonicity"] > 0.8
    assert tempo["attribute"]["at_range"][0] < 0.2 and tempo["attribute"]["at_range"][1] > 0.8
    vocal = dims[2]
    assert "instrumental" in [t["tag"] for t in vocal["lowers"]]
    assert {"male vocal", "female vocal"} & {t["tag"] for t in vocal["raises"]}
    arousal = dims[3]
    assert {"mellow", "relaxing", "calming", "emotional", "sentimental"} & {t["tag"] for t in arousal["lowers"]}
    # three further dimensions by KL, none of them regularised
    assert len(dims) == 7 and all(dims[d]["kind"] == "top KL" for d in list(dims)[4:])


def test_explain_md_has_a_line_per_dimension(explained_run):
    text = (explained_run / "vae" / "explain.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 7
    assert any("regularised: tempo" in row and "raises: fast tempo" in row for row in rows)


def test_low_certainty_is_withheld(explained_run, copy_run):
    run = copy_run(explained_run)
    # four anchors per seed and a low effect bar: weak dimensions get readings the seeds disagree on
    explain_vae(VaeExplainArguments(run=str(run), anchors=4, seeds=4, min_effect=0.1, top_kl=12, force=True))
    entries = list(by_dim(run).values())
    assert len(entries) == 16
    uncertain = [e for e in entries if e["explanation"] == "uncertain"]
    assert uncertain and len(uncertain) < len(entries)
    for entry in entries:
        assert (entry["explanation"] == "uncertain") == (entry["certainty"] < 0.7)
        assert entry["evidence"]  # the withheld reading stays in the JSON
    assert entries[0]["explanation"] != "uncertain"  # tempo holds even on four anchors
    assert "| uncertain |" in (run / "vae" / "explain.md").read_text()


def test_resume_skips_force_redoes_and_the_seed_fixes_the_output(explained_run, copy_run):
    run = copy_run(explained_run)
    first = (run / "vae" / "explain.json").read_text()
    stamp = (run / "vae" / "explain.json").stat().st_mtime_ns
    assert main(["vae", "explain", "--run", str(run), "--anchors", "24", "--seeds", "2", "--steps", "7",
                 "--top_kl", "3"]) == 0
    assert (run / "vae" / "explain.json").stat().st_mtime_ns == stamp
    explain_vae(VaeExplainArguments(run=str(run), force=True, **SMALL))
    assert (run / "vae" / "explain.json").read_text() == first
    assert read_manifest(run, "vae_explain")["counts"]["dims"] == 7


def test_a_vae_without_latent_attributes_is_explained_by_kl(explained_run, copy_run):
    run = copy_run(explained_run)
    (run / "vae" / "lsr.json").unlink()  # what a VAE trained without --lsr leaves
    explain_vae(VaeExplainArguments(run=str(run), force=True, anchors=16, seeds=2, steps=5, top_kl=2))
    dims = by_dim(run)
    assert len(dims) == 2 and all(e["kind"] == "top KL" and "attribute" not in e for e in dims.values())
    with pytest.raises(ConceptCapsError, match=r"nothing to explain.*--top_kl"):
        explain_vae(VaeExplainArguments(run=str(run), force=True, top_kl=0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dims": [16]}, r"--dims 16: the VAE has latent dimensions 0 to 15"),
        ({"anchors": 1}, r"--anchors 1: give at least 2"),
        ({"steps": 2}, r"--steps 2: give at least 3"),
        ({"min_certainty": 1.5}, r"--min_certainty 1.5"),
    ],
)
def test_bad_arguments(explained_run, copy_run, kwargs, message):
    run = copy_run(explained_run)
    with pytest.raises(ConceptCapsError, match=message):
        explain_vae(VaeExplainArguments(run=str(run), force=True, **kwargs))


def test_explain_without_a_vae_is_a_clear_error(distilled_run, copy_run):
    run = copy_run(distilled_run)
    with pytest.raises(ConceptCapsError, match=r"vae not found.*conceptcaps vae train"):
        explain_vae(VaeExplainArguments(run=str(run)))
