"""The licence of every config of a release, decided from the models recorded in the run.

    from conceptcaps_pipeline.dataset_card.licence import release_licence
    licence = release_licence("runs/demo", ["default", "audio", "25pct", "25pct_audio", "10pct", "10pct_audio"])
    licence.yaml          # the card's licence fields: {"license": "cc-by-sa-4.0"} or license: other + name + link
    licence.configs       # config -> ConfigLicence (what applies to it, and why)
    licence.tiny_models   # the tiny random-weight models that made the data (the smoke preset), if any

The captions, tags and labels derive from MusicCaps (CC BY-SA 4.0), so every config carries
CC BY-SA 4.0. The audio configs also carry the licence of the weights that made the clips:
MusicGen's weights are CC BY-NC 4.0, so their clips are for non-commercial use; a model whose
licence is not known here makes the card say so and point at that model. A release with an
audio config under other terms than CC BY-SA 4.0 states `license: other` with
`license_name: conceptcaps-mixed` and `license_link: LICENSE.md`, the file (written from
dataset_card/license_template.md) that says per config which licence applies.

The models are read from the stage manifests: the audio model from RUN/manifests/audio.json
(`arguments.model`), the captioner's base model from captions_generate.json (`plan.base_model`)
or captioner_train.json. A model inside RUN/models/ is one of the tiny random-weight models that
`conceptcaps run` builds for "@tiny/<name>" (the smoke preset): it makes noise and has no licence
of its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

LICENSE_FILE = "LICENSE.md"
TEMPLATE = Path(__file__).with_name("license_template.md")
MIXED_NAME = "conceptcaps-mixed"

BY_SA = {"id": "cc-by-sa-4.0", "name": "CC BY-SA 4.0", "url": "https://creativecommons.org/licenses/by-sa/4.0/"}
BY_NC = {"id": "cc-by-nc-4.0", "name": "CC BY-NC 4.0", "url": "https://creativecommons.org/licenses/by-nc/4.0/"}
MUSICGEN_TYPES = ("musicgen", "musicgen_melody")  # config.json model_type of MusicGen checkpoints
LLAMA_PREFIXES = ("meta-llama/llama-3.1", "meta-llama/meta-llama-3.1")


@dataclass
class ModelUse:
    """A model that made part of the release: its role, how the card names it, and what it means for the licence."""

    role: str  # "captioner" or "audio"
    recorded: str  # as the manifest records it (a Hub id or a local folder)
    kind: str  # "tiny", "musicgen", "llama" or "other"

    @property
    def tiny(self) -> bool:
        return self.kind == "tiny"


@dataclass
class ConfigLicence:
    config: str
    ids: list[str]  # SPDX-style ids of the licences that apply (every one of them)
    text: str  # one line for the table: which licence covers which columns
    reason: str


@dataclass
class ReleaseLicence:
    configs: dict[str, ConfigLicence]
    models: list[ModelUse] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return any(c.ids != [BY_SA["id"]] for c in self.configs.values())

    @property
    def yaml(self) -> dict:
        """The card's licence fields: one licence when every config has it, else `other` and LICENSE.md."""
        if not self.mixed:
            return {"license": BY_SA["id"]}
        return {"license": "other", "license_name": MIXED_NAME, "license_link": LICENSE_FILE}

    @property
    def tiny_models(self) -> list[str]:
        return [m.recorded for m in self.models if m.tiny]

    @property
    def audio(self) -> ModelUse | None:
        return next((m for m in self.models if m.role == "audio"), None)


def _recorded_run(manifest: dict) -> str | None:
    arguments = manifest.get("arguments") or {}
    if isinstance(arguments.get("captioner"), dict):  # captioner_train keeps its arguments by section
        arguments = arguments["captioner"]
    return arguments.get("run") or arguments.get("out")


def _is_musicgen(model: str) -> bool:
    """A MusicGen checkpoint: facebook/musicgen-* on the Hub, or a local folder whose config says model_type musicgen."""
    if model.lower().startswith("facebook/musicgen"):
        return True
    config = Path(model) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("model_type") in MUSICGEN_TYPES
        except (OSError, ValueError):
            pass
    # A local folder that is gone: its name is all that is left; assume MusicGen's terms if it says so.
    return "musicgen" in Path(model).name.lower()


def model_uses(run: str | Path, manifests: dict[str, dict]) -> list[ModelUse]:
    """The captioner and audio models recorded in the run's manifests (RUN/manifests/*.json by stem)."""
    from conceptcaps_pipeline.models import is_tiny_model

    uses = []
    captions, trained = manifests.get("captions_generate"), manifests.get("captioner_train")
    base = ((captions or {}).get("plan") or {}).get("base_model")
    source = captions
    if not base and trained:
        arguments = trained.get("arguments") or {}
        base = (arguments.get("model") or {}).get("model_name_or_path") or (arguments.get("captioner") or {}).get("model")
        source = trained
    if base:
        kind = ("tiny" if is_tiny_model(base, run, _recorded_run(source or {})) else
                "llama" if base.lower().startswith(LLAMA_PREFIXES) else "other")
        uses.append(ModelUse("captioner", str(base), kind))
    audio = manifests.get("audio")
    model = ((audio or {}).get("arguments") or {}).get("model")
    if model:
        kind = "tiny" if is_tiny_model(model, run, _recorded_run(audio)) else "musicgen" if _is_musicgen(model) else "other"
        uses.append(ModelUse("audio", str(model), kind))
    return uses


def config_licence(config: str, with_audio: bool, audio: ModelUse | None, public_name: str | None = None) -> ConfigLicence:
    """What applies to one config: CC BY-SA 4.0 for the text, plus the audio model's terms for the audio column."""
    text_reason = "the captions, tags and labels derive from MusicCaps (CC BY-SA 4.0, ShareAlike)"
    if not with_audio:
        return ConfigLicence(config, [BY_SA["id"]], f"{BY_SA['name']}", text_reason)
    name = public_name or (audio.recorded if audio else "an unrecorded model")
    if audio is None or audio.kind == "other":
        return ConfigLicence(
            config, [BY_SA["id"], "other"],
            f"`audio` column: the licence of the audio model `{name}`; other columns: {BY_SA['name']}",
            f"the clips were made by `{name}`, whose licence is not known here: check its model card; {text_reason}")
    if audio.tiny:
        return ConfigLicence(
            config, [BY_SA["id"]], BY_SA["name"],
            f"the clips were made by a tiny random-weight model built from a config (`{name}`, the smoke preset), "
            f"which has no licence of its own; {text_reason}")
    return ConfigLicence(
        config, [BY_NC["id"], BY_SA["id"]],
        f"`audio` column: {BY_NC['name']} (non-commercial); other columns: {BY_SA['name']}",
        f"the clips were made by MusicGen (`{name}`), whose weights are {BY_NC['name']}; {text_reason}")


def release_licence(run: str | Path, configs: list[str], manifests: dict[str, dict] | None = None,
                    public=lambda name: name) -> ReleaseLicence:
    """The licence of each config of a release of `run`; `public` turns a recorded model into the name the card shows."""
    if manifests is None:
        from conceptcaps_pipeline.dataset_card.manifests import read_manifests

        manifests = read_manifests(Path(run))
    models = model_uses(run, manifests)
    audio = next((m for m in models if m.role == "audio"), None)
    name = public(audio.recorded) if audio else None
    return ReleaseLicence({c: config_licence(c, c.endswith("audio"), audio, name) for c in configs}, models)


def write_license_file(path: str | Path, licence: ReleaseLicence, context: dict) -> Path:
    """Render dataset_card/license_template.md into `path` (RELEASE/LICENSE.md)."""
    import jinja2
    from conceptcaps_pipeline.run_dir import atomic_path

    template = jinja2.Template(TEMPLATE.read_text(encoding="utf-8"), keep_trailing_newline=True)
    text = re.sub(r"\n{3,}", "\n\n", template.render(licence=licence, by_sa=BY_SA, by_nc=BY_NC, **context))
    with atomic_path(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return Path(path)
