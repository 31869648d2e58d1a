"""Models by Hub id or local folder: one resolution rule and one offline error for every stage.

A name that is an existing folder must hold a `save_pretrained` checkpoint and is used by
absolute path (so configs that record it stay valid from any working directory). Anything
else is a Hub id; when it cannot be loaded (no network, `HF_HUB_OFFLINE=1`, a wrong id)
the error names the command-line option and says how to use a local copy.
"""

from __future__ import annotations

from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import run_relative

CHECKPOINT_FILES = ("config.json", "adapter_config.json")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model(name: str, option: str = "model") -> str:
    """An existing checkpoint folder as an absolute path, else `name` as a Hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not any((path / f).exists() for f in CHECKPOINT_FILES):
            raise ConceptCapsError(
                f"--{option} {path} has no config.json: point it at a folder written by save_pretrained "
                f"(e.g. by `hf download MODEL_ID --local-dir {path}`)."
            )
        return str(path.resolve())
    if _looks_like_path(name):
        raise ConceptCapsError(f"--{option}: model folder {path} not found: pass an existing folder or a Hub id.")
    check_hub_access(name, option)
    return name


HUB_PROBE_SECONDS = 3.0


def check_hub_access(repo_id: str, option: str = "model", repo_type: str = "model") -> None:
    """Fail in seconds when `repo_id` is neither in the local cache nor reachable on the Hub.

    Why: with no network, huggingface_hub retries each request for about half a minute per file
    before transformers gives up; a missing copy should say so at once, with the way out.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    files = ("config.json", "adapter_config.json") if repo_type == "model" else ("README.md",)
    for filename in files:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str):
                return  # a cached copy: transformers and datasets use it offline
        except Exception:  # noqa: BLE001 - an id the cache cannot parse is checked by the loader itself
            return
    where = f"the local cache ({constants.HF_HUB_CACHE})"
    kind = " --repo-type dataset" if repo_type != "model" else ""
    fix = (f"where the Hub is reachable run `hf download {repo_id}{kind} --local-dir DIR` (gated repositories such as "
           f"Llama need `hf auth login` first) and pass --{option} DIR, or fill that cache with a copy that holds it")
    if constants.HF_HUB_OFFLINE:
        raise ConceptCapsError(f"--{option} {repo_id!r} is not in {where} and HF_HUB_OFFLINE is set: {fix}.")
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as err:
        raise ConceptCapsError(
            f"--{option} {repo_id!r} is not in {where} and the Hub ({constants.ENDPOINT}) cannot be reached ({err}): "
            f"{fix}; set HF_HUB_OFFLINE=1 to skip this check when working offline."
        ) from None


def load_pretrained(loader, name: str, option: str = "model", what: str = "model", **kwargs):
    """`loader.from_pretrained(name, **kwargs)` with one clear error when it cannot load."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if Path(name).exists():
            raise ConceptCapsError(
                f"cannot load the {what} from {name} (--{option}): {first_line}. Point --{option} at a folder "
                f"written by save_pretrained (config, weights and tokenizer or processor files)."
            ) from err
        short = name.rstrip("/").split("/")[-1]
        raise ConceptCapsError(
            f"cannot load the {what} {name!r} (--{option}): it is not a local folder, and the Hub is unreachable or "
            f"the id is wrong ({first_line}). To use a local copy, download it once where the Hub is reachable, "
            f"`hf download {name} --local-dir DIR` (e.g. DIR = models/{short}; gated models such as Llama need "
            f"`hf auth login` and accepted terms first), then pass --{option} DIR."
        ) from err


def is_tiny_model(model: str, run: str | Path, recorded_run: str | None = None) -> bool:
    """Whether `model` is a folder RUN/models/<name>: a tiny random-weight model built by `conceptcaps run`.

    Checked against the run as it is now and, when given, as a manifest recorded it, so a moved
    run still counts its tiny models (the recorded path then names the old place).
    """
    if str(model).startswith("RUN/models/"):  # as a manifest stores a model inside the run
        return True
    for base in (run, recorded_run):
        if base and (run_relative(model, base) or "").startswith("RUN/models/"):
            return True
    path = Path(model)
    return bool(recorded_run) and path.parent.name == "models" and path.parent.parent.name == Path(recorded_run).name


def tiny_models(run: str | Path, models: list[str | None]) -> list[str]:
    """Those of `models` that `conceptcaps run` built from configs into RUN/models/ (random weights: noise)."""
    return [run_relative(m, run) for m in models if m and is_tiny_model(m, run)]


def portable_adapter_config(folder: str | Path, run: str | Path) -> None:
    """Store a PEFT adapter's base model as `RUN/...` when it lives in the run (a tiny model in RUN/models/), so a
    copied run names nothing of the original; a Hub id or an outside folder stays as it is."""
    import json

    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return  # a full fine-tune: no adapter config
    config = json.loads(path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if base and run_relative(base, run) != base:
        config["base_model_name_or_path"] = run_relative(base, run)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
