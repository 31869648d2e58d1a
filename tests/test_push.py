"""`conceptcaps push`: everything up to the network call. The dry run lists exactly the release files,
the token never shows, bad input is refused; the calls a real push makes are checked against a
recording stand-in for `HfApi` (the Hub itself cannot be reached here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.build import BUILD_RECORD, release_files
from conceptcaps_pipeline.release.push import PushArguments, push_release
from conceptcaps_pipeline.run_dir import file_sha256, manifest_path, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "hf_SENTINELtokenDoNotPrint0123456789"


def conceptcaps(*args, env=None):
    environment = {**os.environ, "HF_TOKEN": SENTINEL, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "conceptcaps_pipeline.cli", *args], check=False, capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=environment)


def test_dry_run_lists_exactly_the_release_files_and_hides_the_token(release_run):
    result = conceptcaps("push", "--run", str(release_run), "--repo-id", "my-org/conceptcaps", "--dry-run", "--tag", "v1.0")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert SENTINEL not in output
    release = release_run / "release"
    expected = [p.as_posix() for p in release_files(release)]
    listed = [line.split(":   ", 1)[1].split()[0] for line in output.splitlines() if "conceptcaps_pipeline.release.push:   " in line]
    assert listed == expected
    # Every file is listed but the build record, which stays local (push checks the release against it).
    assert {p.as_posix() for p in release.rglob("*") if p.is_file()} == {
        (release / f).as_posix() for f in [*expected, BUILD_RECORD]}
    digest = file_sha256(manifest_path(release_run, "build"))
    assert f"commit message: ConceptCaps release: build manifest manifests/build.json sha256:{digest[:16]}" in output
    assert "tag the commit 'v1.0'" in output and "a Hub token is available" in output
    assert not (manifest_path(release_run, "push")).exists()


def test_dry_run_result_has_sizes(release_run, caplog):
    plan = push_release(PushArguments(run=str(release_run), repo_id="my-org/conceptcaps", dry_run=True))
    release = release_run / "release"
    assert plan["dry_run"] and plan["method"] == "upload_folder"
    assert [(f["path"], f["bytes"]) for f in plan["files"]] == [
        (p.as_posix(), (release / p).stat().st_size) for p in release_files(release)]
    assert plan["total_bytes"] == sum(f["bytes"] for f in plan["files"])


def test_push_without_a_release_is_a_clear_error(audio_run):
    result = conceptcaps("push", "--run", str(audio_run), "--repo-id", "my-org/conceptcaps", "--dry-run")
    assert result.returncode == 2
    assert "release not found" in result.stderr and "conceptcaps build --run" in result.stderr
    assert "Traceback" not in result.stderr and SENTINEL not in result.stdout + result.stderr


def test_bad_arguments_are_refused(release_run, copy_run):
    with pytest.raises(ConceptCapsError, match="ORG/NAME"):
        push_release(PushArguments(run=str(release_run), repo_id="conceptcaps", dry_run=True))
    with pytest.raises(ConceptCapsError, match="cannot be combined with --revision"):
        push_release(PushArguments(run=str(release_run), repo_id="a/b", revision="dev", create_pr=True, dry_run=True))
    run = copy_run(release_run)
    for shard in (run / "release" / "data" / "10pct").glob("test-*.parquet"):
        shard.unlink()
    with pytest.raises(ConceptCapsError, match="'10pct' split 'test' names 'data/10pct/test-\\*.parquet'"):
        push_release(PushArguments(run=str(run), repo_id="a/b", dry_run=True))


class RecordingHub:
    """Stands in for huggingface_hub.HfApi at the network boundary: records each call, answers like the Hub."""

    def __init__(self, branches=("main",)):
        self.calls = []
        self.branches = set(branches)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def revision_exists(self, repo_id, revision, **kwargs):
        self.calls.append(("revision_exists", repo_id, revision))
        return revision in self.branches

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))
        self.branches.add(kwargs["branch"])

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return SimpleNamespace(oid="c0ffee", commit_url="https://hub.invalid/commit/c0ffee", pr_url=None)

    def create_tag(self, repo_id, **kwargs):
        self.calls.append(("create_tag", repo_id, kwargs))


def test_push_calls_in_order_and_records_a_manifest(release_run, copy_run, caplog, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    run = copy_run(release_run)
    hub = RecordingHub()
    caplog.set_level("DEBUG")
    manifest = push_release(PushArguments(run=str(run), repo_id="my-org/conceptcaps", revision="v1-candidate",
                                          tag="v1.0", private=True), api=hub)
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "revision_exists", "create_branch", "upload_folder", "create_tag"]
    assert hub.calls[0][2] == {"repo_type": "dataset", "private": True, "exist_ok": True}
    upload = hub.calls[3][2]
    assert upload["folder_path"] == str(run / "release") and upload["repo_type"] == "dataset"
    assert upload["revision"] == "v1-candidate" and upload["create_pr"] is False
    assert upload["commit_message"].startswith("ConceptCaps release: build manifest manifests/build.json sha256:")
    assert upload["delete_patterns"] == ["data/*", "figures/*", "examples/*"]  # stale files of an older release go
    assert "token" not in upload  # huggingface_hub finds it itself
    assert hub.calls[4][2]["tag"] == "v1.0" and hub.calls[4][2]["revision"] == "c0ffee"
    assert manifest["commit"] == "c0ffee" and read_manifest(run, "push")["arguments"]["repo_id"] == "my-org/conceptcaps"
    assert SENTINEL not in caplog.text and SENTINEL not in manifest_path(run, "push").read_text()
    # An existing branch is not created again.
    hub = RecordingHub(branches=("main", "v1-candidate"))
    push_release(PushArguments(run=str(run), repo_id="my-org/conceptcaps", revision="v1-candidate"), api=hub)
    assert [c[0] for c in hub.calls] == ["create_repo", "revision_exists", "upload_folder"]


def test_a_failed_upload_is_one_clear_error(release_run, copy_run):
    class Offline(RecordingHub):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("network unreachable")

    with pytest.raises(ConceptCapsError, match="network unreachable.*re-run the same command"):
        push_release(PushArguments(run=str(copy_run(release_run)), repo_id="a/b"), api=Offline())


def test_label_indices_outside_their_names_are_refused(release_run, copy_run):
    """A shard whose `labels` hold 999 and -5 (a hand edit that a build record would not catch if it were
    re-recorded) is refused by name, before any upload."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.release.push import check_labels

    run = copy_run(release_run)
    check_labels(run / "release")  # the built release passes
    shard = min((run / "release" / "data" / "default").glob("train-*.parquet"))
    table = pq.read_table(shard)
    labels = table.column("labels").to_pylist()
    labels[0] = [999, -5]
    column = table.schema.get_field_index("labels")
    table = table.set_column(column, table.schema.field(column), pa.array(labels, table.schema.field(column).type))
    pq.write_table(table, shard)
    with pytest.raises(ConceptCapsError, match=rf"{shard.name}: column 'labels' holds label index -5, outside its \d+ "
                                               r"names.*build --run .* --force"):
        check_labels(run / "release")
