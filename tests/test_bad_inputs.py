"""Every bad input: one line naming the problem and the fix, exit status 2, no traceback, nothing changed.

Each row is (name, setup, command, pattern): `setup(run)` damages a copy of a real run (MusicCaps
data, tiny models), `command` is the `conceptcaps` argv with RUN for that run, `pattern` must
match the one error line. The run directory is compared byte for byte before and after.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conceptcaps_pipeline.cli import main

TINY = {}  # filled by the `full` fixture: name -> path of a tiny model


def garbage(relative: str):
    def damage(run: Path):
        (run / relative).write_bytes(b"\x00\x13 not what it should be \xff" * 3)
    return damage


def truncate(relative: str):
    def damage(run: Path):
        data = (run / relative).read_bytes()
        (run / relative).write_bytes(data[: len(data) // 2])
    return damage


def write(relative: str, content: str | bytes):
    def make(run: Path):
        path = run / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def nothing(run: Path):
    pass


def env(**variables: str):
    """Environment variables for the command (RUN in a value is the run's path); set by the test, then restored."""
    def make(run: Path):
        return {name: value.replace("RUN", str(run)) for name, value in variables.items()}
    return make


QUICK_CAPTIONS = ["--max_new_tokens", "8", "--require_end_of_turn", "false", "--max_failure_rate", "1", "--limit", "8",
                  "--batch_size", "4"]


def interrupted_captions(run: Path, corrupt: bool = False):
    """Two real caption shards, as a killed `captions generate` leaves them; the first one damaged if asked."""
    from conceptcaps_pipeline.captions.generate import generate_captions
    from conceptcaps_pipeline.options import parse_options

    generate_captions(*parse_options(("captions", "generate"), ["--run", str(run), *QUICK_CAPTIONS]))
    (run / "captions.parquet").unlink()
    (run / "manifests" / "captions_generate.json").unlink()
    if corrupt:
        (run / "captions" / "shard-000000.parquet").write_bytes(b"PAR1 damaged after it was written")


NESTED = "[" * 5000 + "]" * 5000
CSV_HEADER = "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval\n"

CASES = [
    # the command line, config files and presets
    ("unknown command", nothing, ["dance"], r"unknown command 'dance'.*--help"),
    ("unknown sub-command", nothing, ["vae", "samp", "--run", "RUN"], r"unknown command 'vae samp'.*vae train, vae sample"),
    ("misspelt flag", nothing, ["vae", "sample", "--run", "RUN", "--nn", "5"], r"unknown option '--nn'.*--n"),
    ("unknown flag", nothing, ["build", "--run", "RUN", "--bogus"], r"unknown option '--bogus'"),
    ("missing --run", nothing, ["vae", "sample"], r"required: --run"),
    ("flag of the wrong type", nothing, ["vae", "sample", "--run", "RUN", "--n", "abc"], r"--n: invalid int value: 'abc'"),
    ("bool flag of the wrong value", nothing, ["vae", "sample", "--run", "RUN", "--force", "maybe"], r"--force"),
    ("missing --config file", nothing, ["vae", "sample", "--run", "RUN", "--config", "RUN/none.yaml"],
     r"--config .*none.yaml not found"),
    ("malformed YAML", write("c.yaml", "n: [1,\n"), ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"],
     r"not valid YAML at line"),
    ("unknown config key", write("c.yaml", "nn: 3\n"), ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"],
     r"unknown option 'nn'; did you mean n"),
    ("config value of the wrong type", write("c.yaml", "n: abc\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"n = 'abc' is not an integer"),
    ("config list for a number", write("c.yaml", "n: [1, 2]\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"n = \[1, 2\] is a list"),
    ("config not a mapping", write("c.yaml", "- a\n- b\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"holds a list, not a mapping"),
    ("config not UTF-8", write("c.yaml", b"n: \xff\xfe\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"not UTF-8 text: re-encode"),
    ("malformed preset", write("p.yaml", "vae_sample: {n: \n"), ["run", "--preset", "RUN/p.yaml", "--run", "RUN"],
     r"preset .*p.yaml is not valid YAML"),
    ("unknown preset section", write("p.yaml", "dance: {}\n"), ["run", "--preset", "RUN/p.yaml", "--run", "RUN"],
     r"unknown section\(s\) \['dance'\]"),
    ("unknown key in a preset", write("p.yaml", "vae_sample:\n  nn: 3\n"),
     ["run", "--preset", "RUN/p.yaml", "--run", "RUN"], r"preset section 'vae_sample': unknown option 'nn'"),
    ("wrong type in a preset", write("p.yaml", "vae_sample:\n  n: many\n"),
     ["run", "--preset", "RUN/p.yaml", "--run", "RUN"], r"preset section 'vae_sample': n = 'many' is not an integer"),
    ("preset section not a mapping", write("p.yaml", "vae_sample: 5\n"),
     ["run", "--preset", "RUN/p.yaml", "--run", "RUN"], r"section 'vae_sample' holds 5, not a mapping"),
    ("unknown preset", nothing, ["run", "--preset", "nope", "--run", "RUN"], r"preset 'nope' not found"),
    ("unknown stage", nothing, ["run", "--run", "RUN", "--stages", "dance"], r"unknown stage\(s\) \['dance'\]"),
    # distill and its source
    ("missing source", nothing, ["distill", "--run", "RUN", "--source", "RUN/none.csv"], r"source file .*none.csv not found"),
    ("empty source", write("s.csv", ""), ["distill", "--run", "RUN", "--source", "RUN/s.csv"], r"s.csv is empty"),
    ("source not UTF-8", write("s.csv", CSV_HEADER.encode() + b"a,0,10,x,\"['rock']\",caf\xe9 music,1,False,False\n"),
     ["distill", "--run", "RUN", "--source", "RUN/s.csv"], r"not UTF-8 text.*re-encode it as UTF-8"),
    ("source without a column", write("s.csv", "ytid,caption\na,b\n"),
     ["distill", "--run", "RUN", "--source", "RUN/s.csv"], r"lacks column\(s\) \['aspect_list'\]"),
    ("deeply nested aspect_list", write("s.csv", CSV_HEADER + f'a,0,10,x,"{NESTED}",a caption,1,False,False\n'),
     ["distill", "--run", "RUN", "--source", "RUN/s.csv"], r"line 2 \(ytid 'a'\): field 'aspect_list'.*--max_bad_rows"),
    ("validation share out of range", nothing, ["distill", "--run", "RUN", "--validation_fraction", "2"],
     r"--validation_fraction 2.0: give a share in \[0, 1\)"),
    ("too many categories", nothing, ["distill", "--run", "RUN", "--min_categories", "9"], r"--min_categories 9: give 1 to 4"),
    ("missing taxonomy", nothing, ["distill", "--run", "RUN", "--source", "MUSICCAPS", "--taxonomy", "RUN/t.yaml"],
     r"taxonomy file .*t.yaml not found"),
    ("malformed taxonomy", write("t.yaml", "categories: [\n"),
     ["distill", "--run", "RUN", "--source", "MUSICCAPS", "--taxonomy", "RUN/t.yaml"], r"taxonomy file .*t.yaml cannot be read"),
    # the VAE
    ("corrupt distilled.parquet", garbage("distilled.parquet"), ["vae", "train", "--run", "RUN", "--force"],
     r"distilled.parquet cannot be read as Parquet.*conceptcaps distill"),
    ("truncated distilled.parquet", truncate("distilled.parquet"), ["vae", "train", "--run", "RUN", "--force"],
     r"distilled.parquet cannot be read as Parquet"),
    ("corrupt taxonomy.json", garbage("taxonomy.json"), ["vae", "train", "--run", "RUN", "--force"],
     r"taxonomy.json cannot be read.*distill --force"),
    ("no epochs", nothing, ["vae", "train", "--run", "RUN", "--epochs", "0"], r"--epochs 0: give at least 1"),
    ("negative learning rate", nothing, ["vae", "train", "--run", "RUN", "--lr", "-1"], r"--lr -1.0: give a positive"),
    ("training threshold out of range", nothing, ["vae", "train", "--run", "RUN", "--threshold", "5"],
     r"--threshold 5.0: give a probability"),
    ("no batch", nothing, ["vae", "train", "--run", "RUN", "--batch_size", "0"], r"--batch_size 0: give at least 1"),
    ("sampling threshold out of range", nothing, ["vae", "sample", "--run", "RUN", "--threshold", "5", "--force"],
     r"--threshold 5.0: give a probability"),
    ("no samples", nothing, ["vae", "sample", "--run", "RUN", "--n", "0", "--force"], r"--n 0: ask for at least one"),
    ("negative sampling temperature", nothing, ["vae", "sample", "--run", "RUN", "--temperature", "-1", "--force"],
     r"--temperature -1.0: give a positive"),
    ("corrupt VAE weights", garbage("vae/model.safetensors"), ["vae", "sample", "--run", "RUN", "--force"],
     r"cannot load the VAE from .*vae.*vae train --run .* --force"),
    ("corrupt VAE config", garbage("vae/config.json"), ["vae", "sample", "--run", "RUN", "--force"],
     r"cannot load the VAE"),
    ("negative quota", nothing, ["vae", "sample", "--run", "RUN", "--min_per_tag", "-1", "--force"], r"--min_per_tag -1"),
    ("misspelt required tag", nothing, ["vae", "sample", "--run", "RUN", "--require", "pianoo", "--force"],
     r"unknown --require tag 'pianoo'.*'piano'"),
    ("corrupt manifest", garbage("manifests/vae_sample.json"), ["vae", "sample", "--run", "RUN"],
     r"vae_sample.json is not valid JSON.*re-run `conceptcaps vae sample"),
    # the captioner
    ("missing model folder", nothing, ["captioner", "train", "--run", "RUN", "--model", "./RUN/no-model"],
     r"model folder .*no-model not found"),
    ("model not available offline", nothing, ["captioner", "train", "--run", "RUN", "--model", "acme/no-such-llm"],
     r"'acme/no-such-llm' is not in the local cache .*HF_HUB_OFFLINE"),
    ("negative epochs", nothing, ["captioner", "train", "--run", "RUN", "--model", "LLM", "--num_train_epochs", "-1"],
     r"--num_train_epochs -1.0: give a positive"),
    ("dropout out of range", nothing, ["captioner", "train", "--run", "RUN", "--model", "LLM", "--lora_dropout", "1.5"],
     r"--lora_dropout 1.5: give a share"),
    ("QLoRA without a GPU", nothing, ["captioner", "train", "--run", "RUN", "--model", "LLM", "--load_in_4bit"],
     r"--load_in_4bit .*needs a CUDA GPU"),
    # captions
    ("no new tokens", nothing, ["captions", "generate", "--run", "RUN", "--max_new_tokens", "0"],
     r"--max_new_tokens 0: give at least 1"),
    ("negative caption temperature", nothing, ["captions", "generate", "--run", "RUN", "--temperature", "-0.5"],
     r"--temperature -0.5: give a positive"),
    ("top_p out of range", nothing, ["captions", "generate", "--run", "RUN", "--top_p", "1.5"], r"--top_p 1.5: give a probability"),
    ("no caption batch", nothing, ["captions", "generate", "--run", "RUN", "--batch_size", "0"], r"--batch_size 0: give at least 1"),
    ("unknown caption dtype", nothing, ["captions", "generate", "--run", "RUN", "--dtype", "float13"],
     r"--dtype 'float13': use one of auto"),
    ("failure share out of range", nothing, ["captions", "generate", "--run", "RUN", "--max_failure_rate", "2"],
     r"--max_failure_rate 2.0: give a share"),
    ("corrupt attributes.parquet", garbage("attributes.parquet"), ["captions", "generate", "--run", "RUN"],
     r"attributes.parquet cannot be read as Parquet.*vae sample"),
    ("corrupt caption shard", lambda run: interrupted_captions(run, corrupt=True), ["captions", "generate", "--run", "RUN",
                                                                                   *QUICK_CAPTIONS],
     r"shard-000000.parquet cannot be read as Parquet.*its batch is made again"),
    ("caption shards of other settings", lambda run: interrupted_captions(run), ["captions", "generate", "--run", "RUN",
                                                                                *QUICK_CAPTIONS, "--seed", "9"],
     r"holds shards made with other settings \(seed differ.*--force"),
    ("missing adapter", nothing, ["captions", "generate", "--run", "RUN", "--adapter", "RUN/none"],
     r"adapter folder .*none not found"),
    # audio
    ("negative top-k", nothing, ["audio", "generate", "--run", "RUN", "--top_k", "-1"], r"--top_k -1: give 0"),
    ("negative audio temperature", nothing, ["audio", "generate", "--run", "RUN", "--temperature", "-1"],
     r"--temperature -1.0: give a positive"),
    ("zero duration", nothing, ["audio", "generate", "--run", "RUN", "--duration", "0"], r"--duration 0.0: give a positive"),
    ("unknown audio dtype", nothing, ["audio", "generate", "--run", "RUN", "--dtype", "float13"],
     r"--dtype 'float13': use one of auto"),
    ("unknown FLAC subtype", nothing, ["audio", "generate", "--run", "RUN", "--flac_subtype", "PCM_13"],
     r"--flac_subtype 'PCM_13': use one of PCM_S8, PCM_16, PCM_24"),
    ("audio model not available offline", nothing, ["audio", "generate", "--run", "RUN", "--model", "acme/no-musicgen"],
     r"'acme/no-musicgen' is not in the local cache .*hf download acme/no-musicgen"),
    ("corrupt captions.parquet", garbage("captions.parquet"), ["audio", "generate", "--run", "RUN", "--model", "MUSICGEN"],
     r"captions.parquet cannot be read as captions"),
    ("corrupt audio shard", garbage("audio/shard-r000-000099.parquet"),
     ["audio", "generate", "--run", "RUN", "--model", "MUSICGEN", "--duration", "0.5", "--batch_size", "2"],
     r"audio shard .*shard-r000-000099.parquet cannot be read.*move it out"),
    ("negative RMS floor", nothing, ["audio", "verify", "--run", "RUN", "--min_rms", "-1"], r"--min_rms -1.0: give 0 or more"),
    ("clipped share out of range", nothing, ["audio", "verify", "--run", "RUN", "--max_clipped_fraction", "2"],
     r"--max_clipped_fraction 2.0: give a share"),
    ("dry run without repair", nothing, ["audio", "verify", "--run", "RUN", "--dry_run"], r"--dry_run .* pass --repair"),
    # build, evaluate, push
    ("no rows per group", nothing, ["build", "--run", "RUN", "--rows_per_group", "0"], r"--rows_per_group 0: give at least 1"),
    ("unparsable shard size", nothing, ["build", "--run", "RUN", "--max_shard_size", "lots"],
     r"--max_shard_size 'lots': give a positive size"),
    ("negative shard size", nothing, ["build", "--run", "RUN", "--max_shard_size=-5MB"],
     r"--max_shard_size '-5MB': give a positive size"),
    ("zero shard size", nothing, ["build", "--run", "RUN", "--max_shard_size", "0MB"],
     r"--max_shard_size '0MB': give a positive size"),
    ("corrupt captions for build", garbage("captions.parquet"), ["build", "--run", "RUN"],
     r"captions.parquet cannot be read as Parquet.*captions generate"),
    ("missing CLAP folder", nothing, ["evaluate", "--run", "RUN", "--clap_model", "./RUN/no-clap", "--skip",
                                      "caption_quality", "--force"],
     r"no-clap not found"),
    ("no tags in the figure", nothing, ["evaluate", "--run", "RUN", "--top_tags", "0"], r"--top_tags 0: give at least 1"),
    ("malformed repo id", nothing, ["push", "--run", "RUN", "--repo_id", "a/b/c", "--dry_run"],
     r"--repo_id 'a/b/c' must be ORG/NAME"),
    # concepts and TCAV
    ("too few random concepts", nothing, ["tcav", "--run", "RUN", "--model", "MUSICGEN", "--layers", "x", "--concepts",
                                          "piano", "--targets", "jazz", "--n_random", "5"], r"--n_random 5: use at least 10"),
    ("TCAV model missing", nothing, ["tcav", "--run", "RUN", "--model", "./RUN/no-model", "--layers", "x", "--concepts",
                                     "piano", "--targets", "jazz"], r"model folder .*no-model not found"),
    ("unknown export format", nothing, ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "wav"],
     r"--format 'wav': use one of tcav, ids"),
    ("empty export sets", nothing, ["concepts", "export", "--run", "RUN", "--tags", "piano", "--n", "0"],
     r"--n \(0\) and --random_size must be positive"),
]


def release_as_link(run: Path):
    """RUN/release a symbolic link to a release elsewhere in the run."""
    (run / "release").rename(run / "real-release")
    (run / "release").symlink_to(run / "real-release", target_is_directory=True)


def first_shard(config: str):
    def find(run: Path) -> Path:
        return min((run / "release" / "data" / config).glob("train-*.parquet"))
    return find


def damage_shard(config: str, how):
    def damage(run: Path):
        how(first_shard(config)(run))
    return damage


def other_build_record(run: Path):
    import json

    path = run / "manifests" / "build.json"
    manifest = json.loads(path.read_text())
    manifest["release_record"] = {"data/default/train-00000-of-00001.parquet": {"bytes": 1, "sha256": None}}
    path.write_text(json.dumps(manifest))


def caption_id(new_id: str):
    """The first row of RUN/captions.parquet gets id `new_id` (a hand-edited or hostile file)."""
    def damage(run: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(run / "captions.parquet")
        ids = table.column("id").to_pylist()
        ids[0] = new_id
        pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string())),
                       run / "captions.parquet")
    return damage


PUSH = ["push", "--run", "RUN", "--repo_id", "my-org/conceptcaps", "--dry_run", "--allow_tiny_models"]

# Integrity II: hostile option files, values and names; releases that are not what their build wrote; output
# folders that are not the command's own.
CASES += [
    ("config with an alias", write("c.yaml", "a: &x [1, 2]\nn: *x\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"alias \*x \(aliases are not accepted"),
    ("config with a duplicate key", write("c.yaml", "n: 3\nn: 4\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"key 'n' is given twice"),
    ("oversized config", write("c.yaml", "# " + "x" * (1 << 20) + "\nn: 3\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"more than an option file's 1048576"),
    ("config with an infinite number", write("c.yaml", "temperature: .inf\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"temperature = inf: give a finite number"),
    ("config with NaN", write("c.yaml", "lr: .nan\n"),
     ["vae", "train", "--run", "RUN", "--config", "RUN/c.yaml"], r"lr = nan: give a finite number"),
    ("config that is a folder", nothing, ["vae", "sample", "--run", "RUN", "--config", "RUN/vae"],
     r"--config .*vae is not a file"),
    ("missing --config=FILE", nothing, ["vae", "sample", "--run", "RUN", "--config=RUN/none.yaml"],
     r"--config .*none.yaml not found"),
    ("malformed --config=FILE", write("c.yaml", "n: [1,\n"), ["vae", "sample", "--run", "RUN", "--config=RUN/c.yaml"],
     r"not valid YAML at line"),
    ("repeated --config", write("c.yaml", "n: 3\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml", "--config=RUN/c.yaml"], r"--config is given 2 times"),
    ("--config without a path", nothing, ["vae", "sample", "--run", "RUN", "--config="], r"--config needs the path"),
    ("env key that is no variable name", write("c.yaml", "env:\n  'A B': 1\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"`env` key 'A B' is not a variable name"),
    ("env value that is a list", write("c.yaml", "env:\n  HF_HOME: [1, 2]\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"`env` value of HF_HOME must be one short"),
    ("env that is a list", write("c.yaml", "env: [1]\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"`env` must map variable names"),
    ("NaN temperature", nothing, ["vae", "sample", "--run", "RUN", "--temperature", "nan", "--force"],
     r"--temperature nan: give a finite number"),
    ("infinite learning rate", nothing, ["vae", "train", "--run", "RUN", "--lr", "inf"], r"--lr inf: give a finite"),
    ("infinite audio duration", nothing, ["audio", "generate", "--run", "RUN", "--duration", "inf"],
     r"--duration inf: give a finite"),
    ("NaN top_p", nothing, ["captions", "generate", "--run", "RUN", "--top_p", "nan"], r"--top_p nan: give a finite"),
    ("VAE larger than memory", nothing, ["vae", "train", "--run", "RUN", "--hidden_dim", "4000000000"],
     r"vae train with --hidden_dim 4000000000 .* needs about [\d.]+ GiB of memory, more than the"),
    ("--run that is a file", nothing, ["vae", "sample", "--run", "RUN/taxonomy.json"], r"taxonomy.json: it is not a folder"),
    ("--run that is a device", nothing, ["build", "--run", "/dev/null"], r"--run /dev/null: it is not a folder"),
    ("--run with an over-long name", nothing, ["distill", "--run", "RUN/" + "x" * 300], r"at most 255 bytes"),
    ("--id_prefix leaving the run", nothing, ["vae", "sample", "--run", "RUN", "--id_prefix", "../../../x", "--force"],
     r"--id_prefix '../../../x': ids use only letters, digits"),
    ("--id_prefix with markup", nothing,
     ["vae", "sample", "--run", "RUN", "--id_prefix", "<img src=x onerror=alert(9)>", "--force"],
     r"--id_prefix '<img src=x onerror=alert\(9\)>': ids use only"),
    ("--id_prefix hidden", nothing, ["vae", "sample", "--run", "RUN", "--id_prefix", ".x", "--force"],
     r"--id_prefix '.x': ids use only"),
    ("build --repo_id with markup", nothing, ["build", "--run", "RUN", "--repo_id", "my-org/<img src=x onerror=alert(9)>"],
     r"--repo_id 'my-org/<img src=x onerror=alert\(9\)>' is not a Hub repository id"),
    ("build --repo_id with a path", nothing, ["build", "--run", "RUN", "--repo_id", "<b>x</b>/y"],
     r"--repo_id '<b>x</b>/y' must be ORG/NAME"),
    ("push --repo_id with --", nothing, ["push", "--run", "RUN", "--repo_id", "my-org/con--caps", "--dry_run"],
     r"--repo_id 'my-org/con--caps' is not a Hub repository id"),
    ("push tag with a space", nothing, [*PUSH, "--tag", "v 1"], r"--tag 'v 1' is not a name the Hub accepts"),
    ("push tag ending in .lock", nothing, [*PUSH, "--tag", "v1.lock"], r"--tag 'v1.lock' is not a name"),
    ("push revision with ..", nothing, [*PUSH, "--revision", "a..b"], r"--revision 'a..b' is not a name"),
    ("push revision starting with -", nothing, [*PUSH, "--revision=-main"], r"--revision '-main' is not a name"),
    ("push a release that is a link", release_as_link, PUSH, r"release is a symbolic link .*Remove the link"),
    ("push a release without a shard", lambda run: first_shard("audio")(run).unlink(), PUSH,
     r"not the release its build wrote: data/audio/train-00000-of-\d+.parquet is missing.*build --run .* --force"),
    ("push a release with an extra shard", write("release/data/default/train-extra.parquet", b"PAR1"), PUSH,
     r"data/default/train-extra.parquet is not part of it \(extra file\)"),
    ("push a release with a truncated shard", damage_shard("default", lambda p: p.write_bytes(p.read_bytes()[:-100])),
     PUSH, r"data/default/train-00000-of-\d+.parquet has \d+ bytes, not the \d+ recorded"),
    ("push a release with a changed shard", damage_shard("default", lambda p: p.write_bytes(
        p.read_bytes()[:50] + bytes([p.read_bytes()[50] ^ 1]) + p.read_bytes()[51:])),
     PUSH, r"data/default/train-00000-of-\d+.parquet changed since it was written"),
    ("push a release with a changed concepts.json", write("release/concepts.json", "{}"), PUSH,
     r"concepts.json has 2 bytes, not the"),
    ("push a release without its build record", lambda run: (run / "release" / ".build.json").unlink(), PUSH,
     r"\.build\.json is missing"),
    ("push a card with broken YAML", write("release/README.md", "---\nconfigs: [\n---\n# card\n"), PUSH,
     r"README.md: its YAML header cannot be read"),
    ("push with the record of another build", other_build_record, PUSH, r"build.json describes another build than"),
    ("concepts export from a release without a shard", lambda run: first_shard("default")(run).unlink(),
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--n", "2", "--n_random", "1"],
     r"release is not the release its build wrote: data/default/train-00000-of-\d+.parquet is missing"),
    ("concepts export from a changed release", write("release/concepts.json", "{}"),
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--n", "2", "--n_random", "1"],
     r"release is not the release its build wrote: concepts.json has 2 bytes"),
    ("config with a duplicate env key", write("c.yaml", "env:\n  HF_HOME: a\n  HF_HOME: b\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"key 'HF_HOME' is given twice"),
    ("env key starting with a digit", write("c.yaml", "env:\n  1A: x\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"`env` key '1A' is not a variable name"),
    ("env value with a NUL", write("c.yaml", 'env:\n  HF_HOME: "a\\0b"\n'),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"`env` value of HF_HOME must be one short"),
    ("config with -inf", write("c.yaml", "threshold: -.inf\n"),
     ["vae", "sample", "--run", "RUN", "--config", "RUN/c.yaml"], r"threshold = -inf: give a finite number"),
    ("config with a NaN weight", write("c.yaml", "lsr_gamma: .nan\n"),
     ["vae", "train", "--run", "RUN", "--config", "RUN/c.yaml"], r"lsr_gamma = nan: give a finite number"),
    ("config that is a device", nothing, ["vae", "sample", "--run", "RUN", "--config", "/dev/zero"],
     r"--config /dev/zero is not a file"),
    ("preset with an alias", write("p.yaml", "vae_sample: &s {n: 3}\nvae_train: *s\n"),
     ["run", "--preset", "RUN/p.yaml", "--run", "RUN"], r"alias \*s"),
    ("NaN beta", nothing, ["vae", "train", "--run", "RUN", "--beta", "nan"], r"--beta nan: give a finite number"),
    ("NaN sampling threshold", nothing, ["vae", "sample", "--run", "RUN", "--threshold", "nan", "--force"],
     r"--threshold nan: give a finite"),
    ("infinite caption temperature", nothing, ["captions", "generate", "--run", "RUN", "--temperature", "inf"],
     r"--temperature inf: give a finite"),
    ("infinite audio temperature", nothing, ["audio", "generate", "--run", "RUN", "--temperature=-inf"],
     r"--temperature -inf: give a finite"),
    ("NaN RMS floor", nothing, ["audio", "verify", "--run", "RUN", "--min_rms", "nan"], r"--min_rms nan: give a finite"),
    ("NaN validation share", nothing, ["distill", "--run", "RUN", "--validation_fraction", "nan"],
     r"--validation_fraction nan: give a finite"),
    ("infinite upload threshold", nothing, [*PUSH, "--large_folder_threshold_mb", "inf"],
     r"--large_folder_threshold_mb inf: give a finite"),
    ("--run that is a Parquet file", nothing, ["build", "--run", "RUN/distilled.parquet"],
     r"distilled.parquet: it is not a folder"),
    ("--run that is a pipe", lambda run: __import__("os").mkfifo(run / "fifo"), ["vae", "train", "--run", "RUN/fifo"],
     r"fifo: it is not a folder"),
    ("--run with an over-long path", nothing, ["build", "--run", "/".join(["RUN", *["d" * 200] * 25])],
     r"at most 255 bytes \(a path 4096\)"),
    ("empty --id_prefix", nothing, ["vae", "sample", "--run", "RUN", "--id_prefix", "", "--force"],
     r"--id_prefix '': ids use only"),
    ("--id_prefix with a slash", nothing, ["vae", "sample", "--run", "RUN", "--id_prefix", "a/b", "--force"],
     r"--id_prefix 'a/b': ids use only"),
    ("--id_prefix starting with -", nothing, ["vae", "sample", "--run", "RUN", "--id_prefix=-x", "--force"],
     r"--id_prefix '-x': ids use only"),
    ("over-long --id_prefix", nothing, ["vae", "sample", "--run", "RUN", "--id_prefix", "a" * 200, "--force"],
     r"--id_prefix 'a{10,}.*ids use only"),
    ("empty push tag", nothing, [*PUSH, "--tag", ""], r"--tag '' is not a name the Hub accepts"),
    ("push tag with ~", nothing, [*PUSH, "--tag", "v1~2"], r"--tag 'v1~2' is not a name"),
    ("push revision with @{", nothing, [*PUSH, "--revision", "main@{1}"], r"--revision 'main@\{1\}' is not a name"),
    ("push revision ending in /", nothing, [*PUSH, "--revision", "feature/"], r"--revision 'feature/' is not a name"),
    ("concepts export over the VAE", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--out", "RUN/vae", "--force"],
     r"vae exists and is not an earlier output of this command"),
    ("concepts export over the manifests", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--out", "RUN/manifests", "--force"],
     r"manifests exists and is not an earlier output"),
    ("caption id leaving the run", caption_id("../../../x"), ["build", "--run", "RUN", "--audio", "false"],
     r"captions.parquet: id '../../../x': ids use only .*vae sample --run"),
    ("caption id with markup", caption_id("<img src=x onerror=alert(9)>"), ["build", "--run", "RUN", "--audio", "false"],
     r"captions.parquet: id '<img src=x onerror=alert\(9\)>': ids use only"),
    ("explore a release without a shard", lambda run: first_shard("default")(run).unlink(), ["explore", "--run", "RUN"],
     r"release is not the release its build wrote: data/default/train-00000-of-\d+.parquet is missing"),
    ("concepts export over the run", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--n", "5", "--n_random", "3", "--out",
      "RUN", "--force"], r"--out .* is the run directory .*: the sets need a folder of their own"),
    ("concepts export over the release", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--out", "RUN/release", "--force"],
     r"release exists and is not an earlier output of this command"),
    ("concepts export over a file", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--out", "RUN/taxonomy.json",
      "--force"], r"taxonomy.json exists and is not an earlier output"),
    ("concepts export --dest the run", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--dest", "RUN", "--force"],
     r"--dest .* is the run directory .*: the sets need a folder of their own, e.g. --dest .*concepts"),
    ("concepts export --out the run", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--out", "RUN/", "--force"],
     r"--out .* is the run directory"),
    ("concepts export --dest above the run", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--dest", "RUN/..", "--force"],
     r"--dest .* is the run directory .* or holds it"),
    ("concepts export --dest and --out differ", nothing,
     ["concepts", "export", "--run", "RUN", "--tags", "piano", "--format", "ids", "--dest", "RUN/a", "--out", "RUN/b"],
     r"--out is the deprecated spelling of --dest; give only --dest"),
    # environment variables the project reads
    ("thread count that is text", env(CONCEPTCAPS_NUM_THREADS="many"), ["vae", "sample", "--run", "RUN", "--force"],
     r"\$CONCEPTCAPS_NUM_THREADS='many' is not a thread count: give a whole number from 1"),
    ("thread count zero", env(CONCEPTCAPS_NUM_THREADS="0"), ["vae", "sample", "--run", "RUN", "--force"],
     r"\$CONCEPTCAPS_NUM_THREADS='0' is not a thread count"),
    ("negative OMP_NUM_THREADS", env(OMP_NUM_THREADS="-3"), ["vae", "sample", "--run", "RUN", "--force"],
     r"\$OMP_NUM_THREADS='-3' is not a thread count"),
    ("huge OMP_NUM_THREADS", env(OMP_NUM_THREADS="99999999,2"), ["vae", "sample", "--run", "RUN", "--force"],
     r"\$OMP_NUM_THREADS='99999999,2' is not a thread count.*4096"),
    ("free memory that is text", env(CONCEPTCAPS_FREE_MEMORY="lots"), ["vae", "sample", "--run", "RUN", "--force"],
     r"\$CONCEPTCAPS_FREE_MEMORY='lots': give bytes"),
    ("free memory NaN for a rank", env(CONCEPTCAPS_FREE_MEMORY="4e9,nan"), ["vae", "sample", "--run", "RUN", "--force"],
     r"\$CONCEPTCAPS_FREE_MEMORY='4e9,nan'.*'nan' is not a finite number"),
    ("unknown log level", env(CONCEPTCAPS_LOG_LEVEL="LOUD"), ["vae", "sample", "--run", "RUN", "--force"],
     r"CONCEPTCAPS_LOG_LEVEL='LOUD' is not a logging level"),
    ("HF_HOME under a file", env(HF_HOME="RUN/taxonomy.json/hf"), ["concepts", "export", "--run", "RUN", "--tags",
     "piano", "--format", "ids"], r"\$HF_HOME=.*is an impossible cache folder: .*taxonomy.json is a file"),
    ("datasets cache that is a file", env(HF_DATASETS_CACHE="RUN/taxonomy.json"), ["build", "--run", "RUN", "--force"],
     r"\$HF_DATASETS_CACHE=.*impossible cache folder"),
    ("empty hub cache", env(HF_HUB_CACHE=""), ["captions", "generate", "--run", "RUN"], r"\$HF_HUB_CACHE is set but empty"),
    ("cache name over 255 bytes", env(HF_HOME="RUN/" + "c" * 300), ["vae", "sample", "--run", "RUN", "--force"],
     r"\$HF_HOME=.*impossible path \(a name over 255 bytes"),
    ("torch compile cache under a file", env(TORCHINDUCTOR_CACHE_DIR="RUN/distilled.parquet/x"),
     ["audio", "generate", "--run", "RUN", "--model", "MUSICGEN"], r"\$TORCHINDUCTOR_CACHE_DIR=.*impossible cache folder"),
    # counts bounded by memory, checked before allocating
    ("more samples than memory", nothing, ["vae", "sample", "--run", "RUN", "--n", "1000000000000000", "--force"],
     r"vae sample --n 1000000000000000 .* needs about [\d.]+ GiB of memory, more than the .*ask for fewer sets"),
    ("quota larger than memory", nothing, ["vae", "sample", "--run", "RUN", "--min_per_tag", "10000000000000", "--force"],
     r"vae sample --n \d+ --min_per_tag 10000000000000 .* needs about [\d.]+ GiB"),
    ("quota on named tags larger than memory", nothing,
     ["vae", "sample", "--run", "RUN", "--min_per_tag", "100000000000000", "--tags", "piano", "--force"],
     r"needs about [\d.]+ GiB of memory"),
    ("pad larger than memory", nothing, ["explore", "--run", "RUN", "--grid_size", "100000000"],
     r"explore --grid_size 100000000 .*needs about [\d.]+ GiB of memory.*smaller --grid_size"),
    ("wide VAE hidden layer", nothing, ["vae", "train", "--run", "RUN", "--hidden_dim", "100000000000", "--force"],
     r"vae train with --hidden_dim 100000000000 .* needs about"),
]


@pytest.fixture(scope="module")
def full(tmp_path_factory, captioner_run, release_run, tiny_llm, tiny_musicgen, musiccaps_csv):
    """One run with every artifact: the VAE, samples, adapter, captions, clips and the release."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(captioner_run, run)
    for name in ("captions.parquet", "audio", "release"):
        source = release_run / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, run / name)
    for manifest in (release_run / "manifests").glob("*.json"):
        shutil.copy(manifest, run / "manifests" / manifest.name)
    TINY.update(LLM=str(tiny_llm), MUSICGEN=str(tiny_musicgen), MUSICCAPS=str(musiccaps_csv))
    return run


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, setup, command, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(full, tmp_path, capsys, monkeypatch, name, setup, command, pattern):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    for variable, value in (setup(run) or {}).items():
        monkeypatch.setenv(variable, value)
    argv = [str(run) if part == "RUN" else part.replace("RUN/", f"{run}/") for part in command]
    argv = [TINY.get(part, part) for part in argv]
    before = tree(run)
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("conceptcaps")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert tree(run) == before  # nothing damaged, nothing left behind


def test_the_table_covers_every_stage():
    commands = {" ".join(c[2][:2]) for c in CASES}
    for stage in ("distill --run", "vae train", "vae sample", "captioner train", "captions generate", "audio generate",
                  "audio verify", "build --run", "evaluate --run", "push --run", "tcav --run", "concepts export", "run --preset"):
        assert stage in commands, stage
    assert len(CASES) >= 150


def can_mount() -> bool:
    probe = Path("/tmp/conceptcaps-mount-probe")
    probe.mkdir(exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(probe)]
    ok = subprocess.run(command, capture_output=True, check=False).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=False)
    return ok


@pytest.mark.skipif(sys.platform != "linux" or not can_mount(),
                    reason="needs `mount` (root in a Linux machine or container) to make a read-only and a full disk")
def test_read_only_and_full_disks_are_one_line(full, tmp_path, capsys):
    # Read-only: a bind mount of a copy of the run.
    run = tmp_path / "run"
    shutil.copytree(full, run)
    view = tmp_path / "ro"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(run), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        code = main(["vae", "sample", "--run", str(view), "--n", "4", "--force"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and re.search(r"cannot write .*Read-only file system.*writable", err)
        # A cache folder on the read-only disk is named as such before any work.
        import os

        os.environ["HF_DATASETS_CACHE"], saved = str(view / "hf-cache"), os.environ.get("HF_DATASETS_CACHE")
        try:
            code = main(["build", "--run", str(run), "--force"])
        finally:
            os.environ.pop("HF_DATASETS_CACHE")
            if saved is not None:
                os.environ["HF_DATASETS_CACHE"] = saved
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert re.search(r"\$HF_DATASETS_CACHE=.*hf-cache' is not writable \(.*ro cannot be written: read-only", err), err
    finally:
        subprocess.run(["umount", str(view)], check=False)
    # Full: a 128 KB disk for the output of distill.
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], check=True)
    try:
        code = main(["distill", "--run", str(disk / "run"), "--source", TINY["MUSICCAPS"]])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and re.search(r"cannot write .*No space left.*free space", err), err
        assert not [p for p in (disk / "run").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_ctrl_c_is_one_line_and_exit_130(audio_captions_run, tiny_musicgen, tmp_path):
    import os
    import signal
    import time

    run = tmp_path / "run"
    shutil.copytree(audio_captions_run, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "conceptcaps_pipeline.cli", "audio", "generate", "--run", str(run), "--model",
                                str(tiny_musicgen), "--duration", "20", "--batch_size", "1"],
                               cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    # Interrupt once generation is under way (the first clip's file exists), not while the model
    # loads: on a loaded machine a fixed delay can land anywhere from import to the last batch.
    before = set((run / "audio").rglob("*")) if (run / "audio").exists() else set()
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None and not (
            (run / ".locks" / "audio.lock").exists() and (run / "audio").exists()
            and set((run / "audio").rglob("*")) - before):
        time.sleep(0.05)
    assert process.poll() is None, "audio generate ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "conceptcaps: interrupted; re-run the same command to resume")
    assert not (run / ".locks").exists()


@pytest.mark.parametrize("argv", [
    ["distill", "--run", "NEW", "--validation_fraction", "nan"],
    ["distill", "--run", "NEW", "--config", "NEW.yaml"],
    ["vae", "sample", "--run", "NEW", "--id_prefix", "../x"],
    ["build", "--run", "NEW", "--repo_id", "a/<b>"],
])
def test_a_refused_command_creates_nothing(tmp_path, capsys, argv):
    """A command refused for its options leaves no run directory (nor lock folder) behind."""
    (tmp_path / "NEW.yaml").write_text("n: &a 1\nm: *a\n")
    argv = [str(tmp_path / part) if part.startswith("NEW") else part for part in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("conceptcaps")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NEW.yaml"]


def everything(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (folders as None, files as their bytes): a temp file or folder left behind shows."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if p.name != "filler"}


# Each stage is given a copy of the run on a disk with `room` bytes left: enough to start, too little to finish
# (each writes far more than that), so the disk fills mid-way through the stage's own writes.
FULL_DISK = [
    ("build", ["build", "--run", "RUN", "--force", "--max_shard_size", "5KB", "--rows_per_group", "2"], 96 * 1024),
    ("vae train", ["vae", "train", "--run", "RUN", "--force", "--epochs", "1"], 32 * 1024),
    ("concepts export", ["concepts", "export", "--run", "RUN", "--tags", "TAG", "--format", "tcav", "--n", "2",
                         "--n_random", "1", "--dest", "RUN/sets"], 8 * 1024),
    ("explore", ["explore", "--run", "RUN", "--force", "--grid_size", "3"], 64 * 1024),
]


@pytest.mark.skipif(sys.platform != "linux" or not can_mount(),
                    reason="needs `mount` (root in a Linux machine or container) to make a full disk")
@pytest.mark.parametrize("name, command, room", FULL_DISK, ids=[c[0] for c in FULL_DISK])
def test_a_disk_that_fills_during_a_stage_is_one_line_and_changes_nothing(full, tmp_path, capsys, name, command, room):
    import json
    import os

    used = sum(p.stat().st_size for p in full.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 8 * 2**20}", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        shutil.copytree(full, run)
        tag = max(json.loads((run / "release" / "concepts.json").read_text())["concepts"],
                  key=lambda c: c["positives"]["audio"]["train"])["tag"]  # the tag with the most clips
        stats = os.statvfs(disk)
        with open(disk / "filler", "wb") as filler:  # leaves `room` bytes free
            filler.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - room))
        before = everything(run)
        argv = [str(run) if part == "RUN" else part.replace("RUN/", f"{run}/") for part in command]
        code = main([tag if part == "TAG" else part for part in argv])
        err = capsys.readouterr().err
        errors = re.findall(r"conceptcaps: [^\r\n]*", err)  # a progress bar may share the error's line on stderr
        assert code == 2, err[-2000:]
        assert "Traceback" not in err and len(errors) == 1, err[-2000:]
        assert re.search(r"cannot write .*No space left on device.*free space on that disk", errors[0]), errors[0]
        after = everything(run)
        assert sorted(set(after) - set(before)) == [] and sorted(set(before) - set(after)) == []  # nothing left, nothing lost
        assert after == before  # the earlier outputs byte for byte
        open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                      if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [f for f in open_files if f.startswith(str(disk))], open_files  # no file left open there
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)  # detach it even so


@pytest.mark.skipif(sys.platform != "linux" or not can_mount(),
                    reason="needs `mount` (root in a Linux machine or container) to make a full disk")
def test_a_disk_that_fills_during_tcav_leaves_no_activation_cache(tmp_path, capsys):
    """tcav on a tones-world run with 16 KiB free: its activation cache (RUN/tcav/activations) fills the disk."""
    import os

    from conceptcaps_pipeline.testing.tcav_world import tone_rows, write_release

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        write_release(run / "release", {"train": tone_rows(60, 0), "test": tone_rows(10, 1)})
        stats = os.statvfs(disk)
        with open(disk / "filler", "wb") as filler:
            filler.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - 16 * 1024))
        before = everything(run)
        code = main(["tcav", "--run", str(run), "--model", "conceptcaps_pipeline.testing.tcav_world:tone_classifier",
                     "--layers", "conv", "--concepts", "piano", "--targets", "jazz", "--n", "10", "--n_cavs", "10",
                     "--n_random", "10", "--batch_size", "32", "--num_threads", "1"])
        err = capsys.readouterr().err
        errors = re.findall(r"conceptcaps: [^\r\n]*", err)
        assert code == 2, err[-2000:]
        assert "Traceback" not in err and len(errors) == 1, err[-2000:]
        assert re.search(r"cannot write .*No space left on device.*free space on that disk", errors[0]), errors[0]
        after = everything(run)
        assert {k: v for k, v in after.items() if not k.startswith("tcav")} == before  # the release, no lock left
        # What the cache kept is whole entries only (a resumed tcav reuses them): no temporary or partial file.
        import numpy as np

        cached = [k for k, v in after.items() if k.startswith("tcav") and v is not None]
        assert all(k.startswith("tcav/activations/") and k.endswith(".npy") for k in cached), cached
        assert all(np.load(run / k).size > 0 for k in cached)
        assert not (run / "tcav" / "scores.json").exists()
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)
