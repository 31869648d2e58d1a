"""`conceptcaps explore`: the static explorer page of a release, opened in a real headless Chromium.

The run is the conftest release (10 real MusicCaps captions, tiny-MusicGen clips, built with
`conceptcaps build`) plus the conftest VAE (trained on the distilled real CSV). The page is
driven with Playwright on the Debian Chromium (scripts/install.sh installs it; nothing is
downloaded at test time); the browser tests are skipped only where no Chromium is installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.explore.page import DATA_GLOBAL, ExploreArguments, explore

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """$CONCEPTCAPS_CHROMIUM, else the first Chromium on PATH."""
    if os.environ.get("CONCEPTCAPS_CHROMIUM"):
        return os.environ["CONCEPTCAPS_CHROMIUM"]
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def explorer_run(tmp_path_factory, release_run, vae_run) -> Path:
    """release_run plus the VAE of vae_run (same distilled taxonomy), explored with small options."""
    run = tmp_path_factory.mktemp("explore") / "run"
    shutil.copytree(release_run, run)
    shutil.copytree(vae_run / "vae", run / "vae")
    explore(ExploreArguments(run=str(run), clips_per_tag=2, grid_size=15, nearest=2))
    return run


def page_data(run: Path) -> dict:
    text = (run / "explorer" / "data.js").read_text(encoding="utf-8")
    prefix = f"window.{DATA_GLOBAL} = "
    assert text.startswith(prefix) and text.rstrip().endswith(";")
    return json.loads(text[len(prefix):].rstrip().rstrip(";"))


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install chromium, as scripts/install.sh does; or set "
                    "CONCEPTCAPS_CHROMIUM to a Chromium binary)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to start its sandbox as root (CI containers run as root).
        instance = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield instance
        instance.close()


def open_page(browser, run: Path):
    """The explorer's index.html from file://, with every console error, page error and failed request recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.goto((run / "explorer" / "index.html").resolve().as_uri())
    page.wait_for_selector("body[data-ready=true]", timeout=15000)
    return page, problems


def test_page_shows_the_release_and_moves_over_the_latent_pad(browser, explorer_run):
    concepts = json.loads((explorer_run / "release" / "concepts.json").read_text())
    data = page_data(explorer_run)
    page, problems = open_page(browser, explorer_run)

    # The concept list is concepts.json: every tag, in order, with its category and default-config positives.
    listed = page.eval_on_selector_all(
        "#concept-list li[data-tag]",
        "items => items.map(li => [li.dataset.tag, li.dataset.category, Number(li.querySelector('.count').textContent)])")
    expected = [[c["tag"], c["category"], sum(c["positives"]["default"].values())] for c in concepts["concepts"]]
    assert listed == expected

    # Choosing a concept shows its counts per split and its clips, each of which holds the tag.
    tag = max(concepts["concepts"], key=lambda c: sum(c["positives"]["default"].values()))
    page.click(f"#concept-list li[data-tag='{tag['tag']}'] button")
    assert page.inner_text("#concept-tag") == tag["tag"]
    row = page.eval_on_selector_all("#concept tr[data-config=default] td", "cells => cells.map(c => Number(c.textContent))")
    counts = [tag["positives"]["default"][s] for s in concepts["splits"]]
    assert row == [*counts, sum(counts)]
    clip_ids = page.eval_on_selector_all("#concept .clip", "cards => cards.map(c => c.dataset.clip)")
    assert clip_ids and all(tag["tag"] in data["clips"][i]["tags"] for i in clip_ids)
    assert page.inner_text("#concept-clap") == "CLAP score: not evaluated"  # this run has no RUN/eval
    assert page.inner_text("#concept-evidence") == "Label evidence: not scored (conceptcaps audio score)"
    assert page.eval_on_selector_all("#concept-evidence-clips .clip", "cards => cards.length") == 0

    # An audio player loads its clip (the FLAC copied from the release's audio shards) from file://.
    page.wait_for_function("() => { const a = document.querySelector('#concept audio'); "
                           "return a && a.readyState >= 1 && a.duration > 0; }", timeout=15000)
    duration = page.eval_on_selector("#concept audio", "a => a.duration")
    assert duration == pytest.approx(0.5, abs=0.05)  # the fixture's clips are 0.5 s

    # Moving the pointer over the pad shows the decoded tag set of the point under it.
    pad = data["pad"]
    size = pad["size"]
    first = pad["cells"][0]
    other = next(i for i, s in enumerate(pad["cells"]) if s != first)  # the grid decodes to more than one set
    page.locator("#pad").scroll_into_view_if_needed()  # mouse events land where the pad is on screen
    box = page.locator("#pad").bounding_box()
    shown = []
    for cell in (0, other):
        row_, col = divmod(cell, size)
        page.mouse.move(box["x"] + (col + 0.5) * box["width"] / size, box["y"] + (row_ + 0.5) * box["height"] / size)
        shown.append(page.eval_on_selector_all("#pad-tags li", "chips => chips.map(c => c.dataset.tag)"))
        assert page.get_attribute("#pad", "data-col") == str(col) and page.get_attribute("#pad", "data-row") == str(row_)
        nearest = page.eval_on_selector_all("#pad-clips .clip", "cards => cards.map(c => c.dataset.clip)")
        assert nearest == [clip_id for clip_id, _ in pad["nearest"][pad["cells"][cell]]]
    assert shown == [pad["sets"][first], pad["sets"][pad["cells"][other]]] and shown[0] != shown[1]
    assert problems == []
    page.close()


def test_stage_writes_a_space_folder_and_skips_when_up_to_date(explorer_run):
    out = explorer_run / "explorer"
    data = page_data(explorer_run)
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and "\nsdk: static\n" in readme and "\napp_file: index.html\n" in readme
    for name in ("index.html", "app.js", "style.css"):
        assert (out / name).read_bytes() == (Path(__file__).parents[1] / "generation" / "explore" / "static" / name).read_bytes()

    # At most clips_per_tag examples per concept, each holding it; every clip on the page has its audio file,
    # byte for byte the FLAC stored in the release.
    import pyarrow.parquet as pq

    stored = {}
    for shard in (explorer_run / "release" / "data" / "audio").glob("*.parquet"):
        stored.update({r["id"]: r["audio"]["bytes"] for r in pq.read_table(shard, columns=["id", "audio"]).to_pylist()})
    for concept in data["concepts"]:
        assert len(concept["clips"]) <= 2 and all(concept["tag"] in data["clips"][i]["tags"] for i in concept["clips"])
    assert data["clips"] and {p.name for p in (out / "audio").iterdir()} == {f"{i}.flac" for i in data["clips"]}
    for clip_id, clip in data["clips"].items():
        assert (out / clip["audio"]).read_bytes() == stored[clip_id]

    # The pad: two distinct latent dimensions of highest KL (this VAE has no regularised ones), and its nearest
    # clips really are the release's closest by Jaccard.
    pad = data["pad"]
    assert len(pad["cells"]) == 15 * 15 and len(pad["sets"]) == len(set(pad["cells"])) > 1
    assert [a["attribute"] for a in pad["axes"]] == [None, None] and pad["axes"][0]["dim"] != pad["axes"][1]["dim"]
    assert "highest KL" in pad["note"]
    labels = {}
    for shard in (explorer_run / "release" / "data" / "default").glob("*.parquet"):
        labels.update({r["id"]: set(r["aspect_list"]) for r in pq.read_table(shard, columns=["id", "aspect_list"]).to_pylist()})
    for tag_set, nearest in zip(pad["sets"], pad["nearest"]):
        best = max(len(set(tag_set) & t) / len(set(tag_set) | t) for t in labels.values())
        assert nearest[0][1] == pytest.approx(best, abs=1e-4)
        assert [j for _, j in nearest] == sorted((j for _, j in nearest), reverse=True)

    manifest = json.loads((explorer_run / "manifests" / "explore.json").read_text())
    assert manifest["counts"]["concepts"] == len(data["concepts"]) and manifest["counts"]["pad_sets"] == len(pad["sets"])
    stamp = (out / "data.js").stat().st_mtime_ns
    again = explore(ExploreArguments(run=str(explorer_run), clips_per_tag=2, grid_size=15, nearest=2))
    assert again["finished_at"] == manifest["finished_at"] and (out / "data.js").stat().st_mtime_ns == stamp
    forced = explore(ExploreArguments(run=str(explorer_run), clips_per_tag=2, grid_size=15, nearest=2, force=True))
    assert (out / "data.js").stat().st_mtime_ns != stamp and forced["counts"] == manifest["counts"]


def test_pad_decodes_with_the_runs_set_sizes(explorer_run, copy_run):
    """The pad decodes like `vae sample` (--sizes data by default): its sets are as long as the release's and the
    training sets', not the ~4 tags a 0.5 threshold gives; a run sampled with --sizes threshold gets that rule."""
    import statistics

    import pyarrow.parquet as pq
    from conceptcaps_pipeline.vae.sample import VaeSampleArguments, sample_attributes

    pad = page_data(explorer_run)["pad"]
    per_point = [len(pad["sets"][cell]) for cell in pad["cells"]]
    release = [len(r["aspect_list"]) for shard in (explorer_run / "release" / "data" / "default").glob("*.parquet")
               for r in pq.read_table(shard, columns=["aspect_list"]).to_pylist()]
    training = json.loads((explorer_run / "vae" / "set_sizes.json").read_text())["summary"]["mean_tags"]
    assert pad["rule"]["sizes"] == "data" and len(per_point) == 15 * 15
    # 225 points drawn from the training sets' size patterns: their mean is within a few standard errors of it.
    assert statistics.mean(per_point) == pytest.approx(training, abs=0.5)
    assert statistics.mean(per_point) == pytest.approx(statistics.mean(release), abs=1.5)
    assert len(set(per_point)) > 1  # sizes vary point to point, as between samples

    run = copy_run(explorer_run)
    sample_attributes(VaeSampleArguments(run=str(run), n=8, seed=3, sizes="threshold"))
    explore(ExploreArguments(run=str(run), clips_per_tag=2, grid_size=15, nearest=2))
    threshold = page_data(run)["pad"]
    assert threshold["rule"] == {**pad["rule"], "sizes": "threshold", "seed": 3}
    assert [threshold["sets"][c] for c in threshold["cells"]] != [pad["sets"][c] for c in pad["cells"]]


def test_clap_scores_per_concept_after_evaluate(browser, explorer_run, copy_run, distilled_run):
    """After `conceptcaps evaluate` (tiny CLAP), each concept shows the mean CLAP score of its clips."""
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.evaluate.run import EvaluateArguments, evaluate_run
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap

    run = copy_run(explorer_run)
    texts = pq.read_table(distilled_run / "distilled.parquet", columns=["caption"]).column("caption").to_pylist()
    clap = build_tiny_clap(run / "models" / "clap", texts)
    evaluate_run(EvaluateArguments(run=str(run), clap_model=str(clap), skip=["vae", "caption_quality", "coverage"],
                                   clap_batch_size=4))
    explore(ExploreArguments(run=str(run), clips_per_tag=2, grid_size=15, nearest=2))  # the evaluation is new input
    scores = json.loads((run / "eval" / "metrics.json").read_text())["details"]["audio"]["clap"]["clap_scores"]
    data = page_data(run)
    assert data["clap"]["evaluated"]
    tags_of = {}
    for shard in (run / "release" / "data" / "default").glob("*.parquet"):
        tags_of.update({r["id"]: r["aspect_list"] for r in pq.read_table(shard, columns=["id", "aspect_list"]).to_pylist()})
    concept = next(c for c in data["concepts"] if c["clips"])
    holders = [scores[i] for i, tags in tags_of.items() if concept["tag"] in tags]
    assert concept["clap"]["n"] == len(holders) and concept["clap"]["mean"] == pytest.approx(sum(holders) / len(holders))

    page, problems = open_page(browser, run)
    page.click(f"#concept-list li[data-tag='{concept['tag']}'] button")
    assert page.inner_text("#concept-clap") == (f"CLAP score {concept['clap']['mean']:.3f} (mean over {len(holders)} "
                                                f"clip{'' if len(holders) == 1 else 's'})")
    assert problems == []
    page.close()


def test_concept_evidence_after_audio_score(browser, explorer_run, copy_run, distilled_run):
    """After `audio score` (tiny CLAP) and `build`, each concept shows its AUC with its interval and the positives of
    highest and lowest evidence, with players."""
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.score import ScoreArguments, score_audio
    from conceptcaps_pipeline.release.build import BuildArguments, build_release
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap

    run = copy_run(explorer_run)
    texts = pq.read_table(distilled_run / "distilled.parquet", columns=["caption"]).column("caption").to_pylist()
    clap = build_tiny_clap(run / "models" / "clap", texts[:500])
    score_audio(ScoreArguments(run=str(run), model=str(clap), batch_size=4, n_bootstrap=50))
    build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2))
    explore(ExploreArguments(run=str(run), clips_per_tag=2, grid_size=15, nearest=2, evidence_clips=2))
    data = page_data(run)
    agreement = json.loads((run / "release" / "concepts.json").read_text())["evidence"]["concepts"]
    assert data["evidence"]["scored"] and data["evidence"]["model"] == str(clap)
    # Every positive's evidence for each tag, from the release's audio config.
    evidence = {}
    for shard in (run / "release" / "data" / "audio").glob("*.parquet"):
        for r in pq.read_table(shard, columns=["id", "aspect_list", "evidence", "labels"]).to_pylist():
            names = data_label_names(shard)
            for k, e in zip(r["labels"], r["evidence"]):
                if e is not None:
                    evidence.setdefault(names[k], {})[r["id"]] = e
    concept = next(c for c in data["concepts"] if c["evidence"]["auc"] is not None and len(evidence[c["tag"]]) >= 3)
    tag, shown = concept["tag"], concept["evidence"]
    assert shown["auc"] == agreement[tag]["auc"] and shown["auc_interval"] == agreement[tag]["auc_interval"]
    values = sorted(evidence[tag].values())
    for side, expected in (("highest", values[::-1][:2]), ("lowest", values[:2])):
        assert [e for _, e in shown[side]] == pytest.approx(expected, abs=1e-4)
        assert all(evidence[tag][i] == pytest.approx(e, abs=1e-4) for i, e in shown[side])
        assert all(data["clips"][i]["audio"] for i, _ in shown[side])  # each with its clip

    page, problems = open_page(browser, run)
    page.click(f"#concept-list li[data-tag='{tag}'] button")
    low, high = shown["auc_interval"]
    text = page.inner_text("#concept-evidence")
    assert text.startswith(f"Label evidence: AUC {shown['auc']:.2f} [{low:.2f}, {high:.2f}] (95% interval) over "
                           f"{shown['positives']} positives"), text
    for side in ("highest", "lowest"):
        cards = page.eval_on_selector_all(f"#concept-evidence-clips [data-side={side}] .clip",
                                          "cards => cards.map(c => c.dataset.clip)")
        assert cards == [i for i, _ in shown[side]]
    page.wait_for_function("() => { const a = document.querySelector('#concept-evidence-clips audio'); "
                           "return a && a.readyState >= 1 && a.duration > 0; }", timeout=15000)
    assert problems == []
    page.close()


def data_label_names(shard: Path) -> list[str]:
    """The `labels` ClassLabel names of a release shard (its features metadata)."""
    import datasets
    import pyarrow.parquet as pq

    return datasets.Features.from_arrow_schema(pq.read_schema(shard))["labels"].feature.names


def test_clear_errors(tmp_path, explorer_run, copy_run):
    with pytest.raises(ConceptCapsError, match=r"release not found.*Run `conceptcaps build --run"):
        explore(ExploreArguments(run=str(tmp_path)))
    for bad, message in [({"grid_size": 1}, "--grid_size 1"), ({"extent": 0}, "--extent 0"),
                         ({"clips_per_tag": -1}, "--clips_per_tag -1"), ({"nearest": 0}, "--nearest 0"),
                         ({"axes": ["0"]}, "--axes 0: name two different axes"),
                         ({"axes": ["3", "3"]}, "--axes 3 3: name two different axes")]:
        with pytest.raises(ConceptCapsError, match=message):
            explore(ExploreArguments(run=str(explorer_run), **bad))
    with pytest.raises(ConceptCapsError, match=r"--axes 'tempo': give latent dimensions 0 to 31"):
        explore(ExploreArguments(run=str(explorer_run), axes=["tempo", "0"], force=True))
    run = copy_run(explorer_run)
    shutil.rmtree(run / "vae")
    with pytest.raises(ConceptCapsError, match=r"vae not found.*conceptcaps vae train --run"):
        explore(ExploreArguments(run=str(run)))


def test_pad_uses_regularised_dimensions_when_the_vae_has_them(browser, explorer_run, copy_run):
    """A VAE trained with --lsr tempo arousal: the pad's axes are those two dimensions, labelled in attribute units."""
    from conceptcaps_pipeline.vae.lsr import latent_to_attribute, load_lsr
    from conceptcaps_pipeline.vae.train import VaeTrainArguments, train_vae

    run = copy_run(explorer_run)
    train_vae(VaeTrainArguments(run=str(run), epochs=5, hidden_dim=128, latent_dim=8, lsr=["tempo", "arousal"],
                                lsr_compare=False, diversity_samples=50, num_threads=1, force=True))
    explore(ExploreArguments(run=str(run), clips_per_tag=1, grid_size=11, nearest=1))
    pad = page_data(run)["pad"]
    record = load_lsr(run)
    assert [(a["attribute"], a["dim"]) for a in pad["axes"]] == [("tempo", 0), ("arousal", 1)]
    assert "attribute-regularised" in pad["note"]
    for axis in pad["axes"]:
        # The axis spans the latent values of its attribute's training range, with the attribute's value at each point.
        latent = record["attributes"][axis["attribute"]]["map"]["latent"]
        assert axis["range"] == [min(latent), max(latent)] and len(axis["values"]) == 11
        assert axis["attribute_values"] == [round(latent_to_attribute(record, axis["attribute"], v), 4)
                                            for v in axis["values"]]
        assert axis["attribute_values"] == sorted(axis["attribute_values"])

    page, problems = open_page(browser, run)
    position = page.inner_text("#pad-position")
    assert "z[0] = " in position and "(tempo ≈ " in position and "z[1] = " in position and "(arousal ≈ " in position
    assert problems == []
    page.close()
