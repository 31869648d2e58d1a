"""Integrity: no stale or unreadable clip ships, --force and --repair lose nothing, one writer per
stage, moved runs resume, outputs are readable by others, no leftovers, no machine paths, and
clips that do not depend on how the work was spread."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conceptcaps_pipeline.audio.generate import AudioArguments, generate_audio
from conceptcaps_pipeline.audio.shards import read_shards, shard_paths
from conceptcaps_pipeline.audio.verify import VerifyArguments, verify_audio
from conceptcaps_pipeline.captions.generate import CaptionsArguments, generate_captions
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.build import BuildArguments, build_release
from conceptcaps_pipeline.run_dir import read_manifest, stage_lock
from conftest import ROOT, launch_audio_generate


def rewrite_captions(run: Path, change) -> dict[str, str]:
    """Apply `change(caption) -> caption` to every caption of RUN/captions.parquet; returns id -> new caption."""
    table = pq.read_table(run / "captions.parquet")
    captions = [change(c) for c in table.column("caption").to_pylist()]
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string()))
    pq.write_table(table, run / "captions.parquet")
    return dict(zip(table.column("id").to_pylist(), captions))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. Stale audio ---------------------------------------------------------------------------------
def test_changed_captions_are_remade_and_never_shipped_with_old_clips(audio_run, copy_run, tiny_musicgen,
                                                                     single_process_state):
    run = copy_run(audio_run)
    before = {r["id"]: r["audio"] for r in read_shards(run / "audio").to_pylist()}
    new = rewrite_captions(run, lambda caption: caption + " With a new ending.")
    # build refuses: every clip was made from the old caption
    with pytest.raises(ConceptCapsError, match=r"10 clip\(s\) .* were made from another caption.*audio generate"):
        build_release(BuildArguments(run=str(run)))
    # verify says the same
    with pytest.raises(ConceptCapsError, match=r"stale 10"):
        verify_audio(VerifyArguments(run=str(run)))
    # generate remakes them (the old clips are set aside, then dropped once the new ones are made)
    manifest = generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=0.5, batch_size=2))
    assert manifest["sessions"][-1]["stale_replaced"] == 10 and manifest["counts"]["generated"] == 10
    after = read_shards(run / "audio").to_pylist()
    assert Counter(r["id"] for r in after) == Counter(new.keys())
    # Each clip now carries the fingerprint of its new caption (the tiny model's sound hardly depends on it).
    from conceptcaps_pipeline.audio.shards import caption_sha256

    assert all(r["caption_sha256"] == caption_sha256(new[r["id"]]) for r in after) and len(before) == 10
    assert verify_audio(VerifyArguments(run=str(run)))["failing_ids"] == 0
    assert not (run / ".set-aside").exists()
    build_release(BuildArguments(run=str(run)))


# 3. --force checks before it sets anything aside --------------------------------------------------
def test_force_with_a_misspelt_model_keeps_every_clip_and_caption(audio_run, captioner_run, copy_run, tmp_path,
                                                                 capsys, single_process_state):
    run = copy_run(audio_run)
    before = snapshot(run / "audio")
    code = main(["audio", "generate", "--run", str(run), "--model", "facebook/musicgen-smal", "--force"])
    assert code == 2 and "musicgen-smal" in capsys.readouterr().err
    assert snapshot(run / "audio") == before and not (run / ".set-aside").exists()

    captions_run = tmp_path / "captions"
    shutil.copytree(captioner_run, captions_run)
    generate_captions(CaptionsArguments(run=str(captions_run), max_new_tokens=16, require_end_of_turn=False,
                                        max_failure_rate=1.0, limit=8))
    kept = snapshot(captions_run / "captions") | {"captions.parquet": (captions_run / "captions.parquet").read_bytes()}
    code = main(["captions", "generate", "--run", str(captions_run), "--model", str(tmp_path / "no-such-model"),
                 "--force", "--limit", "8"])
    assert code == 2 and "no-such-model" in capsys.readouterr().err
    after = snapshot(captions_run / "captions") | {"captions.parquet": (captions_run / "captions.parquet").read_bytes()}
    assert after == kept



def test_a_failed_force_puts_the_old_captions_back_and_says_so(captioner_run, tmp_path, capsys):
    """captions generate --force that fails after setting the old captions aside (here: too many degenerate
    captions from the tiny model) leaves the run with its old captions, not without them."""
    run = tmp_path / "run"
    shutil.copytree(captioner_run, run)
    quick = ["--max_new_tokens", "8", "--require_end_of_turn", "false", "--max_failure_rate", "1", "--limit", "8"]
    assert main(["captions", "generate", "--run", str(run), *quick]) == 0
    kept = snapshot(run / "captions") | {"captions.parquet": (run / "captions.parquet").read_bytes()}
    strict = ["--max_new_tokens", "2", "--require_end_of_turn", "true", "--max_failure_rate", "0", "--limit", "8",
              "--max_attempts", "1", "--force"]
    code = main(["captions", "generate", "--run", str(run), *strict])
    err = capsys.readouterr().err
    assert code == 2 and "The earlier output is back in place (RUN/captions" in err, err[-1500:]
    after = snapshot(run / "captions") | {"captions.parquet": (run / "captions.parquet").read_bytes()}
    assert after == kept and not (run / ".set-aside").exists()

# 4. One writer per stage; launched children die with their parent --------------------------------
def test_a_second_writer_is_refused_with_the_first_ones_pid(audio_captions_run, copy_run, tiny_musicgen, capsys):
    run = copy_run(audio_captions_run)
    with stage_lock(run, "audio"):
        code = main(["audio", "generate", "--run", str(run), "--model", str(tiny_musicgen), "--duration", "0.5"])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {os.getpid()}" in err and "audio is already running" in err
        assert not shard_paths(run / "audio")
    assert not (run / ".locks").exists()  # released: nothing left behind
    # Two real processes started together: whichever is second to the lock is refused (or, if the first
    # finished before, finds nothing to do); either way every id ends up exactly once.
    options = ("--duration", "4.0", "--batch-size", "1")
    processes = [launch_audio_generate(run, tiny_musicgen, *options, processes=1, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.communicate(timeout=600)[1], p.returncode) for p in processes]
    assert sum(code == 0 for _, code in outcomes) >= 1
    for err, code in outcomes:
        assert code == 0 or "audio is already running" in err, err[-500:]
    ids = read_shards(run / "audio", columns=["id"]).column("id").to_pylist()
    assert Counter(ids) == Counter(pq.read_table(run / "captions.parquet", columns=["id"]).column("id").to_pylist())


def test_killing_conceptcaps_run_kills_its_audio_launcher(audio_captions_run, tiny_musicgen, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audio_captions_run, run)
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"audio_generate:\n  model: {tiny_musicgen}\n  duration: 1.0\n  batch_size: 1\n")
    launcher = (f"{sys.executable} -m accelerate.commands.launch --config_file "
                f"{ROOT / 'accelerate_configs' / 'cpu.yaml'} --num_processes 2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONCEPTCAPS_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "conceptcaps_pipeline.cli", "run", "--preset", str(preset), "--run",
                                str(run), "--audio_launcher", launcher], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not shard_paths(run / "audio") and time.time() < deadline:
        time.sleep(0.05)
    assert shard_paths(run / "audio"), "the audio stage should have written a shard"
    process.send_signal(signal.SIGKILL)  # only `conceptcaps run`, not its process group
    process.wait()
    time.sleep(3)
    count = len(shard_paths(run / "audio"))
    time.sleep(3)
    assert len(shard_paths(run / "audio")) == count  # nothing is writing any more
    # ... and the next run of the same command resumes alone: every id once.
    assert main(["run", "--preset", str(preset), "--run", str(run)]) == 0
    ids = read_shards(run / "audio", columns=["id"]).column("id").to_pylist()
    assert Counter(ids) == Counter(pq.read_table(run / "captions.parquet", columns=["id"]).column("id").to_pylist())


# 5. Moved runs resume -------------------------------------------------------------------------------
def test_a_moved_run_resumes_captions_and_audio(captioner_run, tiny_musicgen, tmp_path, single_process_state):
    run = tmp_path / "here" / "run"
    shutil.copytree(captioner_run, run)
    shutil.copytree(tiny_musicgen, run / "models" / "musicgen")  # a tiny model inside the run, as `run` builds it
    quick = {"max_new_tokens": 16, "require_end_of_turn": False, "max_failure_rate": 1.0, "limit": 12, "batch_size": 4}
    generate_captions(CaptionsArguments(run=str(run), **quick))
    plan = (run / "captions" / "plan.json").read_text()
    assert str(run) not in plan and "RUN/captioner" in plan
    (run / "captions.parquet").unlink()
    shutil.rmtree(run / "captions")
    generate_captions(CaptionsArguments(run=str(run), **{**quick, "limit": 4}))
    audio = {"model": str(run / "models" / "musicgen"), "duration": 0.5, "batch_size": 2}
    manifest = generate_audio(AudioArguments(run=str(run), **audio))
    assert manifest["counts"]["clips"] == 4
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run, moved)
    shutil.rmtree(run)  # the old place is gone: nothing may point there
    generate_captions(CaptionsArguments(run=str(moved), **{**quick, "limit": 4}))  # up to date, resumable
    clips = read_shards(moved / "audio").to_pylist()
    assert {r["model"] for r in clips} == {"RUN/models/musicgen"}
    # Resume in the copy what a kill left: the last caption shard and the last audio shard, unassembled.
    captions_before = pq.read_table(moved / "captions.parquet").to_pylist()
    (moved / "captions.parquet").unlink()
    (moved / "manifests" / "captions_generate.json").unlink()
    max((moved / "captions").glob("shard-*.parquet")).unlink()
    generate_captions(CaptionsArguments(run=str(moved), **{**quick, "limit": 4}))
    assert pq.read_table(moved / "captions.parquet").column("id").to_pylist() == [r["id"] for r in captions_before]
    audio_shards = shard_paths(moved / "audio")
    audio_shards[-1].unlink()
    (moved / "manifests" / "audio.json").unlink()
    survivors = {r["id"]: r["audio"] for r in read_shards(moved / "audio").to_pylist()} if audio_shards[:-1] else {}
    manifest = generate_audio(AudioArguments(run=str(moved), **{**audio, "model": str(moved / "models" / "musicgen")}))
    assert manifest["counts"]["clips"] == 4 and manifest["counts"]["missing"] == 0
    after = {r["id"]: r["audio"] for r in read_shards(moved / "audio").to_pylist()}
    assert len(after) == 4 and all(after[i] == data for i, data in survivors.items())  # kept clips are not redone
    # The card is rebuilt in the copy and names nothing of the original.
    build = build_release(BuildArguments(run=str(moved)))
    assert (moved / "release" / "README.md").is_file() and build["counts"]["rows"]["audio"]["train"] == 4, build["counts"]
    # Nothing stored in the copy names the original's place (adapter config, manifests, plans, shards, card).
    original = os.fsencode(str(run))
    naming = [p.relative_to(moved).as_posix() for p in moved.rglob("*") if p.is_file() and original in p.read_bytes()]
    assert naming == []


# 6. Undecodable audio is not shipped -----------------------------------------------------------------
def test_build_refuses_a_clip_that_does_not_decode(audio_run, copy_run, capsys):
    run = copy_run(audio_run)
    shard = shard_paths(run / "audio")[0]
    table = pq.read_table(shard)
    audio = table.column("audio").to_pylist()
    audio[0] = b"fLaC" + b"\x00" * 200  # looks like FLAC, is not
    pq.write_table(table.set_column(1, "audio", pa.array(audio, pa.binary())), shard)
    code = main(["build", "--run", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "do not open as FLAC" in err and table.column("id")[0].as_py() in err
    assert not (run / "release").exists()


# 7. Outputs follow the umask ------------------------------------------------------------------------
def test_outputs_are_readable_by_others(release_run, copy_run):
    run = copy_run(release_run)
    old = os.umask(0o022)
    try:
        build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2, force=True))
    finally:
        os.umask(old)
    files = [run / "release" / "README.md", run / "release" / "concepts.json", run / "manifests" / "build.json",
             *(run / "release" / "data" / "default").glob("*.parquet")]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for folder in (run / "release" / "data", run / "release" / "data" / "default"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


# 8. Leftovers of interrupted writes are removed on resume ---------------------------------------------
def test_leftovers_of_interrupted_writes_are_removed(release_run, copy_run):
    run = copy_run(release_run)
    leftovers = [run / ".build-k3j2", run / "release" / ".data.x1y2.tmp", run / "release" / ".README.md.ab12.tmp",
                 run / ".captioner.zz99.tmp"]
    for path in leftovers:
        if "README" in path.name:
            path.write_text("half a card")
        else:
            path.mkdir()
            (path / "part").write_text("half")
    build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2))
    assert [p for p in leftovers[:3] if p.exists()] == []
    from conceptcaps_pipeline.run_dir import remove_leftovers

    assert remove_leftovers(run, ["captioner"]) == 1 and not leftovers[3].exists()


# 9. No symlink out of the release ---------------------------------------------------------------------
def test_push_refuses_a_symlink_in_the_release(release_run, copy_run, tmp_path):
    from conceptcaps_pipeline.release.push import PushArguments, push_release

    run = copy_run(release_run)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (run / "release" / "notes.txt").symlink_to(secret)
    with pytest.raises(ConceptCapsError, match=r"notes.txt is a symbolic link.*only files inside"):
        push_release(PushArguments(run=str(run), repo_id="my-org/conceptcaps", dry_run=True))


# Reproducibility ---------------------------------------------------------------------------------------
def test_clips_do_not_depend_on_how_many_processes_made_them(audio_run, audio_captions_run, copy_run, tiny_musicgen,
                                                           single_process_state):
    """audio_run was made by two processes; one process with the same settings makes the same bytes."""
    run = copy_run(audio_captions_run)
    generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=0.5, batch_size=2))
    two = {r["id"]: r["audio"] for r in read_shards(audio_run / "audio").to_pylist()}
    one = {r["id"]: r["audio"] for r in read_shards(run / "audio").to_pylist()}
    assert one == two
    determinism = read_manifest(run, "audio")["sessions"][-1]["determinism"]
    assert determinism["threads"] == 1 and determinism["batch_size"] == 2 and determinism["device"] == "cpu"


# 10. Publication survives a kill at every filesystem step ------------------------------------------------
KILLER = r'''
import os, shutil, signal, sys
from pathlib import Path
from conceptcaps_pipeline import run_dir

mode, k, final = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
if mode == "journal":
    run_dir.exchange = lambda a, b: False  # the fallback: a two-phase swap with a journal
steps = 0

def dies_at_step_k(function):
    def step(*args, **kwargs):
        global steps
        steps += 1
        if steps == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return step

for module, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree"),
                     (run_dir, "exchange")):
    setattr(module, name, dies_at_step_k(getattr(module, name)))
with run_dir.atomic_dir(final) as tmp:
    for name in ("a.txt", "sub/b.txt", "sub/c.txt"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text("new " + name)
print("published after", steps, "steps")
'''


@pytest.mark.parametrize("mode", ["exchange", "journal"])
def test_a_kill_at_any_step_of_publication_leaves_the_old_or_the_new_output(tmp_path, mode):
    """SIGKILL from inside os.rename/os.replace/os.unlink/shutil.rmtree (and the exchange) at step k = 1, 2, ...:
    after each, the next process that publishes there finds exactly the old or the new complete folder."""
    from conceptcaps_pipeline.run_dir import recover

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    old = {"a.txt": "old a", "old-only.txt": "old"}
    new = {"a.txt": "new a.txt", "sub/b.txt": "new sub/b.txt", "sub/c.txt": "new sub/c.txt"}
    outcomes = Counter()
    for k in range(1, 40):
        parent = tmp_path / f"k{k}"
        final = parent / "out"
        final.mkdir(parents=True)
        for name, text in old.items():
            (final / name).write_text(text)
        done = subprocess.run([sys.executable, str(script), mode, str(k), str(final)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
        recover(final)  # what the next command does first (atomic_dir and stage_lock call it)
        found = {p.relative_to(final).as_posix(): p.read_text() for p in final.rglob("*") if p.is_file()}
        assert found in (old, new), (k, found)
        assert [p.name for p in parent.iterdir()] == ["out"], (k, list(parent.iterdir()))  # no leftovers
        outcomes["new" if found == new else "old"] += 1
        if done.returncode == 0:
            assert found == new
            break
    else:
        pytest.fail("publication did not finish within 39 steps")
    # Killed before the swap: the old output; at or after it: the new one. Both happen.
    assert outcomes["old"] >= 1 and outcomes["new"] >= 2, outcomes


def test_a_folder_that_is_not_the_commands_own_output_is_refused(tmp_path):
    from conceptcaps_pipeline.run_dir import atomic_dir

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("a user's file")
    with pytest.raises(ConceptCapsError, match=r"mine exists and is not an earlier output of this command .*marker"), \
            atomic_dir(folder, marker="marker.json") as tmp:
        (tmp / "marker.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and (folder / "keep.txt").read_text() == "a user's file"


# Both killer scripts below: SIGKILL at the k-th filesystem step for which `publishes(path)` holds.
DIES_AT_STEP_K = r'''
def dies_at_step_k(function):
    def step(*args, **kwargs):
        global steps
        if args and publishes(args[0]):
            steps += 1
            if steps == k:
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return step

for module, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (shutil, "rmtree"), (run_dir, "exchange")):
    setattr(module, name, dies_at_step_k(getattr(module, name)))
'''

BUILD_KILLER = r'''
import os, shutil, signal, sys
from pathlib import Path
from conceptcaps_pipeline import run_dir
from conceptcaps_pipeline.release.build import BuildArguments, build_release

run, k = Path(sys.argv[1]).resolve(), int(sys.argv[2])
steps = 0

def publishes(path) -> bool:  # a step that changes what the run holds: its release, its manifests
    try:
        return Path(os.fsdecode(path)).resolve().parent in (run, run / "manifests")
    except TypeError:
        return False

''' + DIES_AT_STEP_K + r'''# Text configs only: the same publication steps as with audio, in a fifth of the time.
build_release(BuildArguments(run=str(run), max_shard_size="1MB", rows_per_group=2, audio=False))
print("built after", steps, "steps")
'''


def test_a_build_killed_at_any_step_leaves_a_whole_release_and_push_takes_only_a_consistent_one(release_run,
                                                                                                copy_run, tmp_path):
    """SIGKILL at each step k of `build` that changes the run (the release swap, the removal of the old one, the
    manifest): the release is always the old or the new one whole (as its own record says), push accepts it only
    when manifests/build.json is its record, and the next build leaves a release push accepts."""
    from conceptcaps_pipeline.release.build import BUILD_RECORD, verify_release
    from conceptcaps_pipeline.release.push import PushArguments, push_release
    from conceptcaps_pipeline.run_dir import read_json

    run = copy_run(release_run)
    script = tmp_path / "build_killer.py"
    script.write_text(BUILD_KILLER)
    push = PushArguments(run=str(run), repo_id="my-org/conceptcaps", dry_run=True, allow_tiny_models=True)
    seen = Counter()
    for k in range(1, 20):
        done = subprocess.run([sys.executable, str(script), str(run), str(k)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "CONCEPTCAPS_LOG_LEVEL": "WARNING"},
                              check=False)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
        release = run / "release"
        assert verify_release(release) == [], (k, verify_release(release))
        shard_size = read_json(release / BUILD_RECORD)["arguments"]["max_shard_size"]
        assert shard_size in ("5KB", "1MB")
        try:
            push_release(push)
            accepted = True
        except ConceptCapsError as err:
            assert "describes another build" in str(err), (k, str(err))
            accepted = False
        assert accepted == (read_manifest(run, "build")["release_record"] ==
                            read_json(release / BUILD_RECORD)["release_record"]), k
        assert not [p.name for p in run.iterdir() if p.name.startswith((".release.", ".build-"))] or \
            done.returncode != 0, k
        seen[(shard_size, accepted)] += 1
        if done.returncode == 0:
            break
        # Back to the old release for the next k: each trial starts from the same state.
        shutil.rmtree(run)
        shutil.copytree(release_run, run)
    else:
        pytest.fail("build did not finish within 19 steps")
    assert seen[("5KB", True)] >= 1 and seen[("1MB", True)] >= 1, seen
    build_release(BuildArguments(run=str(run), max_shard_size="1MB", rows_per_group=2, audio=False))  # the next command
    assert verify_release(run / "release") == [] and push_release(push)["dry_run"]
    assert not [p.name for p in run.iterdir() if p.name.startswith((".release.", ".build-"))]


# 11. "Up to date" means verified, and upstream changes propagate ------------------------------------------
def test_up_to_date_means_the_files_match_their_record_and_stale_inputs_are_refused(tmp_path):
    """A stage is up to date only while its outputs match the sizes and hashes its manifest recorded; an input
    that an earlier stage made from inputs that changed since is refused with the command that remakes it."""
    from conceptcaps_pipeline.run_dir import finished, write_manifest

    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "n": [1, 2]}), run / "attributes.parquet")
    made_from = {"attributes": run / "attributes.parquet"}
    # `captions generate` makes captions.parquet from attributes.parquet ...
    assert finished(run, "captions_generate", {"seed": 0}, made_from, [run / "captions.parquet"]) is None
    pq.write_table(pa.table({"id": ["a", "b"], "caption": ["x", "y"]}), run / "captions.parquet")
    manifest = write_manifest(run, "captions_generate", {"seed": 0}, inputs=made_from, started=time.time())
    assert manifest["outputs"]["RUN/captions.parquet"]["rows"] == 2 and manifest["input_files"] == {
        "attributes": "RUN/attributes.parquet"}
    # ... and a consumer makes out.json from captions.parquet.
    consumer = ("build_like", {"k": 1}, {"captions": run / "captions.parquet"}, [run / "out.json"])
    assert finished(run, *consumer) is None
    (run / "out.json").write_text("made")
    write_manifest(run, "build_like", {"k": 1}, inputs=consumer[2], started=time.time())
    assert finished(run, *consumer) is not None  # up to date: the files are what was recorded
    (run / "out.json").write_text("edit")  # same size, other bytes
    assert finished(run, *consumer) is None
    (run / "out.json").write_text("made")
    assert finished(run, *consumer) is not None
    # A stage's own folder is recorded whole (the stage table): the explorer without app.js is not up to date.
    page = ("explore", {"k": 1}, {"captions": run / "captions.parquet"}, [run / "explorer" / "index.html"])
    assert finished(run, *page) is None
    (run / "explorer").mkdir()
    for name in ("index.html", "app.js"):
        (run / "explorer" / name).write_text(name)
    write_manifest(run, "explore", {"k": 1}, inputs=page[2], started=time.time())
    assert finished(run, *page) is not None
    (run / "explorer" / "app.js").unlink()
    assert finished(run, *page) is None
    # attributes.parquet is sampled again, captions are not remade: the consumer refuses, never "up to date".
    pq.write_table(pa.table({"id": ["a", "b", "c"], "n": [1, 2, 3]}), run / "attributes.parquet")
    with pytest.raises(ConceptCapsError, match=r"RUN/captions.parquet was made by `captions generate` from an older "
                                               r"RUN/attributes.parquet .*`conceptcaps captions generate --run .* --force`"):
        finished(run, *consumer)


# 12. Values from flags stay text in the card, also where it is rendered with HTML on ---------------------------
PAYLOAD = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>[x](javascript:alert(1))"


def test_markup_in_flags_is_text_in_the_rendered_card(release_run, copy_run, tmp_path):
    """--card_authors, --contact and --code_url with markup: the card rendered by markdown-it-py with HTML on holds
    no element or script from them; in headless Chromium (where installed) nothing of it runs."""
    from html.parser import HTMLParser

    from markdown_it import MarkdownIt

    run = copy_run(release_run)
    build_release(BuildArguments(run=str(run), audio=False, card_authors=PAYLOAD, contact=PAYLOAD, code_url=PAYLOAD))
    card = (run / "release" / "README.md").read_text(encoding="utf-8")
    body = card.split("\n---\n", 1)[1]  # after the YAML header
    page = MarkdownIt("commonmark", {"html": True}).enable("table").render(body)

    class Elements(HTMLParser):
        found: list = []  # noqa: RUF012 - one parser per test: the class list is its result

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, dict(attrs)))

    parser = Elements()
    parser.feed(page)
    assert not [t for t, a in parser.found if t == "script" or a.get("src") == "x" or any(k.startswith("on") for k in a)]
    assert not [a["href"] for t, a in parser.found if t == "a" and a.get("href", "").startswith("javascript:")]
    assert page.count("document.title=") >= 3  # the payload is there, as text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return
    html_file = tmp_path / "card.html"
    html_file.write_text(f"<html><head><title>card</title></head><body>{page}</body></html>", encoding="utf-8")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          html_file.as_uri()], capture_output=True, text=True, timeout=120, check=False).stdout
    assert "<title>card</title>" in dom and "pwned</title>" not in dom and '<img src="x"' not in dom


# 12. explore, concepts export and tcav survive a kill at every filesystem step ------------------------------
STAGE_KILLER = r'''
import os, shutil, signal, sys
from pathlib import Path
from conceptcaps_pipeline import run_dir
from conceptcaps_pipeline.cli import main

k, run, names, argv = int(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3].split(","), sys.argv[4:]
steps = 0

def publishes(path) -> bool:  # a step that changes what the command owns: its output folders (and their
    try:                        # temporary siblings .NAME.*), its manifests
        parts = Path(os.fsdecode(path)).resolve().relative_to(run).parts
    except (TypeError, ValueError):
        return False
    return bool(parts) and any(parts[0] == name or parts[0].startswith(f".{name}.") for name in names)

''' + DIES_AT_STEP_K + r'''code = main(argv)
print("finished after", steps, "steps")
sys.exit(code)
'''

TEMPORARY = (".tmp", ".old", ".partial", ".journal")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(run: Path) -> list[str]:
    """Temporary files or folders anywhere in the run (an interrupted write's traces) and stage locks."""
    return [p.relative_to(run).as_posix() for p in run.rglob("*")
            if p.name.startswith(".") and (p.name.endswith(TEMPORARY) or ".tmp" in p.name or ".journal" in p.name)
            or p.suffix == ".lock"]


def kill_at_every_step(tmp_path, base: Path, argv_of, outputs, owned: list[str], new: dict, old: dict | None,
                       limit: int = 40, cache: str | None = None, canonical=None) -> Counter:
    """For k = 1, 2, ...: copy `base` (the old state), run argv with a SIGKILL at filesystem step k in the run's
    folders named `owned` (or their temporary siblings) and its manifests, then check each output folder is the old or the new complete one (after `recover`, which the next
    command does first), re-run the command to completion and check the new output and no leftovers.
    `cache`: a sub-folder of the output whose files are checked as whole entries (never partial, never lost).
    `canonical(name, data)`: what of a file must match (e.g. without the wall times a result records)."""
    from conceptcaps_pipeline.run_dir import recover

    def files(folder: Path) -> dict:
        found = files_of(folder) if folder.is_dir() else {}
        return {name: canonical(name, data) for name, data in found.items()} if canonical else found

    if canonical:
        new = {key: {name: canonical(name, data) for name, data in value.items()} for key, value in new.items()}
        old = old and {key: {name: canonical(name, data) for name, data in value.items()} for key, value in old.items()}

    script = tmp_path / "stage_killer.py"
    script.write_text(STAGE_KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONCEPTCAPS_LOG_LEVEL": "WARNING"}
    seen = Counter()
    for k in range(1, limit):
        work = tmp_path / "trial"
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(base, work)
        argv = argv_of(work)
        done = subprocess.run([sys.executable, str(script), str(k), str(work), ",".join([*owned, "manifests"]), *argv],
                              capture_output=True, text=True, env=env, check=False)
        assert done.returncode in (0, -signal.SIGKILL), (k, done.stderr[-2000:])
        state = {}
        for name, folder in outputs(work).items():
            recover(folder)
            found = files(folder)
            if cache:  # a cache keeps whole entries of the new run and loses none of the old run's
                entries = {f: b for f, b in found.items() if f.startswith(cache)}
                assert entries.items() <= {f: b for f, b in new[name].items() if f.startswith(cache)}.items(), k
                assert old is None or {f for f in old[name] if f.startswith(cache)} <= set(entries), k
            found, want, before = ({f: b for f, b in files.items() if not (cache and f.startswith(cache))}
                                   for files in (found, new[name], (old or {}).get(name)))
            assert found == want or (old is not None and found == before), \
                (k, name, sorted(set(found) ^ set(want)), [f for f in found if f in want and found[f] != want[f]])
            state[name] = "new" if found == want else "old"
        seen[tuple(sorted(state.items()))] += 1
        assert main(argv) == 0, k  # the next command: the new output, whole, and nothing temporary left
        for name, folder in outputs(work).items():
            assert files(folder) == new[name], (k, name)
        assert leftovers(work) == [], (k, leftovers(work))
        if done.returncode == 0:
            seen["steps"] = k
            return seen
    pytest.fail(f"{argv[:2]} did not finish within {limit - 1} steps")


def test_explore_killed_at_any_step_leaves_the_old_or_the_new_explorer(release_run, vae_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(release_run, base)
    shutil.copytree(vae_run / "vae", base / "vae")
    old_args = ["--clips_per_tag", "1", "--grid_size", "11", "--nearest", "1"]
    assert main(["explore", "--run", str(base), *old_args]) == 0
    old = {"explorer": files_of(base / "explorer")}
    fresh = tmp_path / "fresh"
    shutil.copytree(base, fresh)
    new_args = ["--clips_per_tag", "2", "--grid_size", "11", "--nearest", "1"]
    assert main(["explore", "--run", str(fresh), *new_args]) == 0
    new = {"explorer": files_of(fresh / "explorer")}
    assert new != old
    shutil.rmtree(fresh)
    seen = kill_at_every_step(tmp_path, base, lambda run: ["explore", "--run", str(run), *new_args],
                              lambda run: {"explorer": run / "explorer"},
                              ["explorer"],
                              new, old)
    assert seen[(("explorer", "old"),)] >= 1 and seen[(("explorer", "new"),)] >= 1, seen


def test_concepts_export_killed_at_any_step_leaves_the_old_or_the_new_sets(release_run, tmp_path):
    from conceptcaps import load_release

    train = load_release(release_run / "release", "default", "train")
    counts = Counter(t for tags in train["aspect_list"] for t in set(tags))
    tag = next(t for t, c in counts.most_common() if c >= 2 and c <= len(train) - 2)
    base = tmp_path / "base"
    shutil.copytree(release_run, base)
    common = ["--tags", tag, "--n", "2", "--n_random", "2", "--random_size", "1"]
    assert main(["concepts", "export", "--run", str(base), "--dest", str(base / "sets"), *common,
                 "--format", "ids"]) == 0
    old = {"sets": files_of(base / "sets")}
    fresh = tmp_path / "fresh"
    shutil.copytree(base, fresh)
    def new_argv(run: Path) -> list[str]:  # other sets (seed), with audio, over the earlier ids-only export
        return ["concepts", "export", "--run", str(run), "--dest", str(run / "sets"), *common, "--seed", "1", "--force"]

    assert main(new_argv(fresh)) == 0
    new = {"sets": files_of(fresh / "sets")}
    assert new != old and any(name.endswith(".wav") for name in new["sets"])
    shutil.rmtree(fresh)
    seen = kill_at_every_step(tmp_path, base, new_argv, lambda run: {"sets": run / "sets"},
                              ["sets"], new, old)
    assert seen[(("sets", "old"),)] >= 1 and seen[(("sets", "new"),)] >= 1, seen


def without_cost(name: str, data: bytes):
    """scores.json less what a run measures of itself: wall times, and how many clips the cache spared."""
    if name != "scores.json":
        return data
    document = json.loads(data)
    document.pop("cost_s")
    document["clips"].pop("forwarded_now")
    return document


def test_tcav_killed_at_any_step_leaves_the_old_or_the_new_scores_and_a_whole_cache(tmp_path):
    from conceptcaps_pipeline.testing.tcav_world import PLANTED, tone_rows, write_release

    base = tmp_path / "base"
    write_release(base / "release", {"train": tone_rows(30, 0), "test": tone_rows(6, 1)})
    factory = "conceptcaps_pipeline.testing.tcav_world:tone_classifier"

    def argv_of(run: Path, target: str, seed: str) -> list[str]:  # the new run: another target, other sets
        return ["tcav", "--run", str(run), "--model", factory, "--layers", "mix", "--concepts", PLANTED, "--targets",
                target, "--n", "4", "--n_cavs", "10", "--n_random", "10", "--n_inputs", "4", "--batch_size", "16",
                "--num_threads", "1", "--seed", seed]

    assert main(argv_of(base, "jazz", "0")) == 0
    old = {"tcav": files_of(base / "tcav")}
    fresh = tmp_path / "fresh"
    shutil.copytree(base, fresh)
    assert main(argv_of(fresh, "rock", "1")) == 0
    new = {"tcav": files_of(fresh / "tcav")}
    cached = [{name for name in files["tcav"] if name.startswith("activations/")} for files in (old, new)]
    # At this size the first run caches the whole pool; the check below still holds every kill to "no entry
    # partial, none of the old run's lost" (the swap links the cache into the new folder).
    assert cached[0] <= cached[1]
    shutil.rmtree(fresh)
    seen = kill_at_every_step(tmp_path, base, lambda run: argv_of(run, "rock", "1"), lambda run: {"tcav": run / "tcav"},
                              ["tcav"], new, old,
                              cache="activations/", canonical=without_cost)
    assert seen[(("tcav", "old"),)] >= 1 and seen[(("tcav", "new"),)] >= 1, seen
