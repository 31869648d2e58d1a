"""Upload RUN/release/ to the Hugging Face Hub as a new revision of a dataset repository.

    conceptcaps push --run runs/demo --repo_id my-org/conceptcaps --dry_run        # list what would go up
    conceptcaps push --run runs/demo --repo_id my-org/conceptcaps --tag v1.0
    conceptcaps push --run runs/demo --repo_id my-org/conceptcaps --revision v1-candidate
    conceptcaps push --run runs/demo --repo_id my-org/conceptcaps --create_pr --private

Steps: check the release (its card parses and every `configs:` pattern matches release files);
create the dataset repository if needed (`HfApi.create_repo(..., exist_ok=True)`); create the
branch named by --revision if it does not exist; upload the folder with a commit message that
names the run's build manifest (its sha256) and deletes the repository's old data/ and figures/
files that this release does not have (otherwise a changed shard count would leave stale shards
matched by the card's globs); tag the commit when --tag is given. Folders above
--large_folder_threshold_mb go through `HfApi.upload_large_folder` where the installed
huggingface_hub has it (several commits, resumable); huggingface_hub >= 2 dropped it because
`upload_folder` itself commits large folders in batches and resumes when re-run (with hf_xet).

The token comes only from huggingface_hub's own sources (the HF_TOKEN variable or the file
written by `hf auth login`); this module never passes, prints, logs or writes it (the dry run
only says whether one is available). --dry_run makes no network call: it lists every file with
its size and the commit that would be made. Writes
RUN/manifests/push.json after a real push (repository, revision, commit, tag).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import file_sha256, manifest_path, read_manifest, stage, write_manifest

logger = logging.getLogger(__name__)

STAGE = "push"
REPLACED = ["data/*", "figures/*", "examples/*"]  # remote paths a release owns: stale ones are deleted on upload
HIDDEN = [".*", "*/.*"]  # never uploaded: the temporary folder of an interrupted build (see build.release_files)


@dataclass
class PushArguments:
    run: str = field(metadata={"help": "Run directory whose release/ folder (from `conceptcaps build`) is uploaded."})
    repo_id: str = field(metadata={"help": "Dataset repository on the Hub, ORG/NAME (created if missing)."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to commit to (created from main if missing); default: main."}
    )
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request against main instead of committing to it."})
    tag: str | None = field(default=None, metadata={"help": "Tag the uploaded commit (e.g. v1.0)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private (an existing one is left as it is)."})
    dry_run: bool = field(default=False, metadata={"help": "List the files and sizes that would be uploaded; no network call."})
    large_folder_threshold_mb: float = field(
        default=1024.0, metadata={"help": "Above this size use upload_large_folder (where available) instead of upload_folder."}
    )
    allow_tiny_models: bool = field(
        default=False,
        metadata={"help": "Push a release made with the tiny random-weight models of the smoke preset (noise), "
                          "e.g. to try a repository; refused without it."},
    )


@dataclass
class PushPlan:
    """What a push does, decided before any network call."""

    repo_id: str
    release: Path
    files: list[tuple[str, int]]  # (path in the repository, bytes)
    method: str  # upload_folder or upload_large_folder
    commit_message: str
    commit_description: str
    revision: str | None
    create_pr: bool
    tag: str | None
    private: bool

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# Git's rules for a ref name (git check-ref-format), which the Hub applies to branches and tags; huggingface_hub
# validates repository ids (validate_repo_id) but not revisions, so they are checked here before any upload.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(/|$)|^[/.]|[/.]$|^@$|^-")


def check_ref_name(value: str | None, flag: str) -> None:
    """Refuse a branch or tag name the Hub would refuse (git ref rules), naming the flag and the fix."""
    if value is None:
        return
    if value.startswith("refs/pr/") and value[len("refs/pr/"):].isdigit() and flag == "--revision":
        return  # a pull request's ref, which the Hub accepts as a revision
    if not value or len(value.encode()) > 255 or _BAD_REF.search(value):
        raise ConceptCapsError(
            f"{flag} {value!r} is not a name the Hub accepts for a branch or tag (no spaces, control characters, "
            f"'..', '~^:?*[\\', '@{{', leading '-', '/' or '.', trailing '/', '.' or '.lock'; at most 255 bytes): "
            f"give a name such as v1.0 or release-2026-12.")


def check_repo_id(repo_id: str) -> None:
    """ORG/NAME as huggingface_hub validates it (validate_repo_id), before any network call."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConceptCapsError(f"--repo_id {repo_id!r} must be ORG/NAME (for example my-org/conceptcaps).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConceptCapsError(f"--repo_id {repo_id!r} is not a Hub repository id ({str(err).splitlines()[0]}): use "
                               f"letters, digits, '-', '_' and '.', as in my-org/conceptcaps.") from None


def verify_against_build(run: Path, release: Path) -> None:
    """Refuse a release that is not, file for file, the one its build published (missing, extra or changed files,
    an interrupted build, a record in manifests/ of another build): `conceptcaps build` fixes each."""
    from conceptcaps_pipeline.release.build import BUILD_RECORD, verify_release

    fix = f"rebuild it with `conceptcaps build --run {run} --force`"
    problems = verify_release(release)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConceptCapsError(f"{release} is not the release its build wrote: {'; '.join(problems[:3])}{more}: {fix}.")
    published = read_manifest(run, "build") or {}
    from conceptcaps_pipeline.run_dir import read_json

    inside = read_json(release / BUILD_RECORD, fix=fix)
    if published.get("release_record") != inside.get("release_record"):
        raise ConceptCapsError(f"{manifest_path(run, 'build')} describes another build than {release} (a build was "
                               f"interrupted after publishing): {fix}.")


def check_labels(release: Path) -> None:
    """Every ClassLabel index in the shards is one of its names (a hand-edited row can hold 999 or -5)."""
    import json

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for shard in sorted(release.glob("data/*/*.parquet")):
        try:
            schema = pq.read_schema(shard)
            features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file
            raise ConceptCapsError(f"{shard} cannot be read as Parquet ({type(err).__name__}): rebuild the release "
                                   f"with `conceptcaps build --run {release.parent} --force`.") from None
        for column, feature in features.items():
            inner = feature.get("feature") if isinstance(feature, dict) else None
            names = (inner or {}).get("names") if isinstance(inner, dict) and inner.get("_type") == "ClassLabel" else None
            if names is None or column not in schema.names:
                continue
            values = pc.list_flatten(pq.read_table(shard, columns=[column]).column(column))
            if len(values) and (pc.min(values).as_py() < 0 or pc.max(values).as_py() >= len(names)):
                bad = pc.min(values).as_py() if pc.min(values).as_py() < 0 else pc.max(values).as_py()
                raise ConceptCapsError(
                    f"{shard}: column {column!r} holds label index {bad}, outside its {len(names)} names: the shard "
                    f"was edited by hand; rebuild with `conceptcaps build --run {release.parent} --force`.")


def check_release(release: Path) -> list[str]:
    """Refuse a release whose card is missing or whose `configs:` patterns match no file; returns the config names."""
    from huggingface_hub import DatasetCard

    card_path = release / "README.md"
    if not card_path.is_file():
        raise ConceptCapsError(f"{card_path} not found: the release has no dataset card. Run `conceptcaps build --run {release.parent}`.")
    try:
        card = DatasetCard.load(card_path)
        card.data.to_dict()
    except Exception as err:  # noqa: BLE001 - YAML, encoding or structure: one message
        raise ConceptCapsError(
            f"{card_path}: its YAML header cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}): "
            f"rebuild the card with `conceptcaps build --run {release.parent}`.") from None
    configs = card.data.to_dict().get("configs") or []
    if not configs:
        raise ConceptCapsError(f"{card_path} lists no `configs:`; rebuild it with `conceptcaps build --run {release.parent}`.")
    files = [p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()]
    for config in configs:
        for entry in config.get("data_files") or []:
            patterns = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
            for pattern in patterns:
                if not any(fnmatch.fnmatch(f, pattern) for f in files):
                    raise ConceptCapsError(
                        f"{card_path}: config {config['config_name']!r} split {entry.get('split')!r} names {pattern!r}, "
                        f"which matches no file in {release}. Rebuild with `conceptcaps build --run {release.parent} --force`."
                    )
    return [c["config_name"] for c in configs]


def refuse_links(release: Path) -> None:
    """A symbolic link in release/ could upload files from anywhere on this machine: refuse it."""
    import os

    for folder, dirs, files in os.walk(release, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                raise ConceptCapsError(
                    f"{path} is a symbolic link (to {os.readlink(path)}): push uploads only files inside {release}. "
                    f"Replace the link with the file itself, or rebuild with `conceptcaps build --run {release.parent} "
                    f"--force`."
                )


def refuse_tiny_models(run: Path, configs: list[str], allowed: bool) -> None:
    """A release whose captions or audio come from the tiny random-weight models is noise: not for the Hub unless asked."""
    from conceptcaps_pipeline.dataset_card.licence import release_licence

    tiny = release_licence(run, configs).tiny_models
    if tiny and not allowed:
        from conceptcaps_pipeline.run_dir import run_relative

        names = ", ".join(run_relative(m, run) for m in tiny)
        raise ConceptCapsError(
            f"{run / 'release'} was made with tiny random-weight models ({names}; the smoke preset), so its captions "
            f"and audio are noise: pass --allow_tiny_models to push it anyway (e.g. to try a repository).")
    if tiny:
        logger.warning("push: the release was made with tiny random-weight models (%s); its card says so", ", ".join(tiny))


def check_audio_links(card: Path, repo_id: str, revision: str | None) -> None:
    """Warn when the card's audio players point at another repository or revision than this push goes to."""
    import re

    target = (repo_id, revision or "main")
    linked = set(re.findall(r"https://huggingface\.co/datasets/([^/\s\"]+/[^/\s\"]+)/resolve/([^/\s\"]+)/examples/",
                            card.read_text(encoding="utf-8")))
    for repo, rev in sorted(linked - {target}):
        logger.warning("push: the card's example clips link to %s@%s, not %s@%s: they will not play there until "
                       "rebuilt with `conceptcaps build --run RUN --repo_id %s --revision %s`", repo, rev, *target, *target)


def plan_push(args: PushArguments) -> PushPlan:
    """Check the arguments and the release; decide the files, the upload method and the commit message."""
    from conceptcaps_pipeline.release.build import release_files

    run = Path(args.run)
    release = run / "release"
    check_repo_id(args.repo_id)
    check_ref_name(args.revision, "--revision")
    check_ref_name(args.tag, "--tag")
    if release.is_symlink():
        raise ConceptCapsError(
            f"{release} is a symbolic link (to {release.readlink()}): push uploads only a release built in the run. "
            f"Remove the link and run `conceptcaps build --run {run}`.")
    if not release.is_dir():
        raise ConceptCapsError(
            f"{release} not found: there is no release to push. Run `conceptcaps build --run {run}` first."
        )
    if args.create_pr and args.revision:
        raise ConceptCapsError(
            "--create_pr opens a pull request against main and cannot be combined with --revision: leave out "
            "--revision to open a PR, or leave out --create_pr to commit to the branch."
        )
    refuse_links(release)
    configs = check_release(release)
    verify_against_build(run, release)
    check_labels(release)
    refuse_tiny_models(run, configs, args.allow_tiny_models)
    check_audio_links(release / "README.md", args.repo_id, args.revision)
    files = [(p.as_posix(), (release / p).stat().st_size) for p in release_files(release)]
    build = read_manifest(run, "build")
    if build is None:
        raise ConceptCapsError(f"{manifest_path(run, 'build')} not found: run `conceptcaps build --run {run}` first.")
    digest = file_sha256(manifest_path(run, "build"))
    message = f"ConceptCaps release: build manifest manifests/build.json sha256:{digest[:16]}"
    rows = (build.get("counts") or {}).get("rows", {})
    description = "\n".join([
        (f"Built by conceptcaps {build.get('conceptcaps_version')} at {build.get('finished_at')} "
         f"(build manifest sha256 {digest})."),
        f"Configs: {', '.join(configs)}.",
        *(f"- {name}: " + ", ".join(f"{split} {n}" for split, n in splits.items()) for name, splits in rows.items()),
    ])
    total = sum(size for _, size in files)
    method = "upload_folder"
    if total > args.large_folder_threshold_mb * 1e6:
        from huggingface_hub import HfApi

        if hasattr(HfApi, "upload_large_folder"):
            method = "upload_large_folder"
            if args.create_pr:
                raise ConceptCapsError(
                    f"the release is {_human(total)}, above --large_folder_threshold_mb {args.large_folder_threshold_mb}: "
                    f"upload_large_folder cannot open a pull request. Push to a branch with --revision NAME instead."
                )
    return PushPlan(args.repo_id, release, files, method, message, description, args.revision, args.create_pr,
                    args.tag, args.private)


def log_plan(plan: PushPlan) -> None:
    target = f"a pull request on {plan.repo_id}" if plan.create_pr else f"{plan.repo_id}@{plan.revision or 'main'}"
    logger.info("push: %d files, %s, to dataset %s with %s", len(plan.files), _human(plan.total_bytes), target, plan.method)
    width = max((len(path) for path, _ in plan.files), default=0)
    for path, size in plan.files:
        logger.info("  %-*s  %10s", width, path, _human(size))
    logger.info("commit message: %s", plan.commit_message)
    if plan.tag:
        logger.info("then tag the commit %r", plan.tag)


def execute(plan: PushPlan, api) -> dict:
    """The network part: repository, branch, upload, tag. `api` is a huggingface_hub.HfApi."""
    api.create_repo(plan.repo_id, repo_type="dataset", private=plan.private, exist_ok=True)
    if plan.revision and not api.revision_exists(plan.repo_id, plan.revision, repo_type="dataset"):
        api.create_branch(plan.repo_id, branch=plan.revision, repo_type="dataset", exist_ok=True)
    stale = []
    if plan.method == "upload_large_folder":
        api.upload_large_folder(repo_id=plan.repo_id, folder_path=str(plan.release), repo_type="dataset",
                                revision=plan.revision, private=plan.private, ignore_patterns=list(HIDDEN))
        # upload_large_folder cannot delete: remove the old release's files in one more commit.
        from huggingface_hub import CommitOperationDelete

        ours = {path for path, _ in plan.files}
        remote = api.list_repo_files(plan.repo_id, repo_type="dataset", revision=plan.revision)
        stale = [f for f in remote if f not in ours and any(fnmatch.fnmatch(f, p) for p in REPLACED)]
        commit = api.create_commit(
            plan.repo_id, repo_type="dataset", revision=plan.revision, commit_message=plan.commit_message,
            commit_description=plan.commit_description,
            operations=[CommitOperationDelete(path_in_repo=f) for f in stale],
        ) if stale else None
        oid = commit.oid if commit else api.dataset_info(plan.repo_id, revision=plan.revision).sha
        url = commit.commit_url if commit else None
    else:
        commit = api.upload_folder(
            repo_id=plan.repo_id, folder_path=str(plan.release), repo_type="dataset", revision=plan.revision,
            create_pr=plan.create_pr, commit_message=plan.commit_message, commit_description=plan.commit_description,
            delete_patterns=REPLACED, ignore_patterns=list(HIDDEN),
        )
        oid, url = commit.oid, commit.commit_url
    if plan.tag:
        api.create_tag(plan.repo_id, tag=plan.tag, tag_message=plan.commit_message, revision=oid, repo_type="dataset")
    return {"commit": oid, "commit_url": url, "pr_url": getattr(commit, "pr_url", None), "stale_deleted": stale}


@stage(STAGE, lock="build")
def push_release(args: PushArguments, api=None) -> dict:
    """Run the stage: plan, then (unless --dry_run) upload; returns the plan or the push manifest.

    Holds the build lock: a release is never uploaded while `conceptcaps build` rewrites it.
    """
    started = time.time()
    plan = plan_push(args)
    log_plan(plan)
    summary = {"repo_id": plan.repo_id, "files": [{"path": p, "bytes": s} for p, s in plan.files],
               "total_bytes": plan.total_bytes, "method": plan.method, "commit_message": plan.commit_message}
    if args.dry_run:
        from huggingface_hub import get_token

        # Whether a token is there, never what it is.
        logger.info("dry run: nothing uploaded (a Hub token is %s)", "available" if get_token() else "not set")
        return {**summary, "dry_run": True}
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from HF_TOKEN or the saved login, inside huggingface_hub
    try:
        result = execute(plan, api)
    except Exception as err:  # network, permission or repository errors: one clear message
        if isinstance(err, ConceptCapsError):
            raise
        raise ConceptCapsError(
            f"pushing {plan.release} to {plan.repo_id} failed: {type(err).__name__}: {err}. Check the network, that "
            f"you are logged in (`hf auth login` or HF_TOKEN) with write access to {plan.repo_id.split('/')[0]}, and "
            f"re-run the same command: finished files are not uploaded again."
        ) from err
    logger.info("push: %s committed %s%s", plan.repo_id, result["commit"], f", tagged {plan.tag}" if plan.tag else "")
    return write_manifest(args.run, STAGE, asdict(args), inputs={"build": manifest_path(args.run, "build")},
                          counts={"files": len(plan.files), "bytes": plan.total_bytes}, started=started,
                          extra={**result, "method": plan.method, "commit_message": plan.commit_message})
