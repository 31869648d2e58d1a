"""The classifier side of TCAV: any model, probes on its layers, the time axis, streamed clips, cached activations.

    from conceptcaps_pipeline.tcav.model import load_model, Probes, DatasetClips
    classifier = load_model("sanchit-gandhi/distilhubert-finetuned-gtzan", device)   # or model.pt2, pkg.mod:factory
    probes = Probes(classifier.module, ["model.hubert.encoder.layers.1"])
    probes.detect_pool_dims(classifier, seconds=2.0)        # the time axis, from the layer's output shape

A `Classifier` is a torch module that maps a preprocessed batch to one score per class, the
preprocessing callable (a list of mono float32 clips at `sampling_rate` -> the module's input)
and the class names. It comes from a Hugging Face checkpoint (`AutoModelForAudioClassification`
plus its feature extractor, `--trust_remote_code` for custom code), a `torch.export` file, or
a `module:function` factory; the Python API (`conceptcaps_pipeline.tcav.run`) takes any
`torch.nn.Module` and callable directly.

A probe is a forward hook on a layer that pools the layer's output over its time axis. The
gradient of a class score with respect to the pooled activation is read through a zero-valued
leaf added back into the layer's output (the model computes exactly what it did); it equals
the gradient of the layer output summed over the pooled axes.

Clips are streamed in batches: each clip's stored bytes are read once, digested as they pass
(the activation cache's key) and decoded; nothing holds a split's audio in memory.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError

logger = logging.getLogger(__name__)


# -- the model ---------------------------------------------------------------------------------
@dataclass
class Classifier:
    """A model TCAV can probe: module(preprocess(clips)) -> (batch, classes) scores."""

    module: object  # torch.nn.Module
    preprocess: Callable
    sampling_rate: int
    id2label: dict = field(default_factory=dict)  # class index -> name (empty: targets are class indices)
    name: str = "model"
    identity: str = ""  # what the cache key hashes besides the weights (config, feature extractor)
    layer_prefix: str = ""  # "model." where `module` wraps a transformers checkpoint whose layer names users give


def default_preprocess(clips):
    """A batch of equal-length mono clips as a (batch, samples) float32 tensor: the raw waveform in."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) for c in clips]))


def scores_of(output):
    """The (batch, classes) tensor of a model's output: a tensor, `.logits`, or the first element."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConceptCapsError(f"the model returned {type(output).__name__}: TCAV needs a (batch, classes) tensor, an "
                           f"output with .logits, or a tuple whose first element is that tensor.")


def load_model(spec: str, device, *, trust_remote_code: bool = False, sampling_rate: int = 16_000,
               option: str = "model") -> Classifier:
    """A `Classifier` from a Hub id or folder (transformers), a .pt2 / .pt file, or a `module:function` factory.

    A factory is called without arguments and returns a module, or (module, preprocess), or a
    `Classifier`; a module may carry `id2label` (or `config.id2label`) and `sampling_rate`.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        classifier = _load_file(path, sampling_rate, option)
    elif ":" in spec and not path.exists() and all(part.isidentifier() for part in spec.split(":", 1)[0].split(".")):
        classifier = _load_factory(spec, sampling_rate, option)
    else:
        classifier = _load_transformers(spec, trust_remote_code, option)
    classifier.module = classifier.module.to(device).eval()
    return classifier


def _labels_of(module) -> dict:
    labels = getattr(module, "id2label", None) or getattr(getattr(module, "config", None), "id2label", None) or {}
    return {int(i): str(name) for i, name in dict(labels).items()}


def _load_factory(spec: str, sampling_rate: int, option: str) -> Classifier:
    module_name, function_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ConceptCapsError(f"--{option} {spec!r}: cannot import {function_name!r} from {module_name!r} ({err}); "
                               f"give MODULE:FUNCTION importable from here (PYTHONPATH).") from err
    made = factory()
    if isinstance(made, Classifier):
        return made
    module, preprocess = made if isinstance(made, tuple) else (made, None)
    rate = int(getattr(preprocess, "sampling_rate", None) or getattr(module, "sampling_rate", None) or sampling_rate)
    return Classifier(module, preprocess or default_preprocess, rate, _labels_of(module), spec, spec)


def _load_file(path: Path, sampling_rate: int, option: str) -> Classifier:
    import torch

    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        # Why unflatten: an exported program is one flat graph; unflattening restores the submodules
        # (by their original names) so that --layers can name them and hooks can see their outputs.
        module = torch.export.unflatten(program)
        return Classifier(module, default_preprocess, sampling_rate, {}, str(path), path.name)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise ConceptCapsError(f"--{option} {path}: neither a torch.export file (.pt2) nor TorchScript "
                               f"({str(err).splitlines()[0]}). Save the model with torch.export.save(..., "
                               f"'model.pt2') or pass a MODULE:FUNCTION factory.") from err
    return Classifier(module, default_preprocess, sampling_rate, {}, str(path), path.name)


def _load_transformers(name: str, trust_remote_code: bool, option: str) -> Classifier:
    from conceptcaps_pipeline.models import load_pretrained, resolve_model
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    name = resolve_model(name, option)
    folder = Path(name)
    if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
        raise ConceptCapsError(
            f"--{option} {folder} has no preprocessor_config.json: save the feature extractor beside the model, e.g. "
            f"`AutoFeatureExtractor.from_pretrained(BASE_MODEL).save_pretrained('{folder}')` (the one it was "
            f"trained with), or use the Python API with your own preprocessing callable.")
    custom = folder.is_dir() and "auto_map" in json.loads((folder / "config.json").read_text() or "{}")
    if custom and not trust_remote_code:
        raise ConceptCapsError(f"--{option} {folder} holds custom code (auto_map in its config.json): read it, then "
                               f"pass --trust_remote_code to run it.")
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        extractor = load_pretrained(AutoFeatureExtractor, name, option, "audio classifier's feature extractor",
                                    **kwargs)
        model = load_pretrained(AutoModelForAudioClassification, name, option, "audio classifier", **kwargs)
    except ConceptCapsError as err:
        if "trust_remote_code" in f"{err} {err.__cause__}" and not trust_remote_code:
            raise ConceptCapsError(f"--{option} {name} holds custom code: read it, then pass --trust_remote_code "
                                   f"to run it.") from err
        raise
    input_name = (getattr(extractor, "model_input_names", None) or ["input_values"])[0]
    rate = int(extractor.sampling_rate)

    def preprocess(clips):
        return extractor(list(clips), sampling_rate=rate, return_tensors="pt")[input_name]

    import torch

    class Scores(torch.nn.Module):
        """The checkpoint with one tensor in (the feature extractor's output) and its logits out."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(**{input_name: x}).logits

    identity = model.config.to_json_string() + json.dumps(extractor.to_dict(), sort_keys=True, default=str)
    return Classifier(Scores(), preprocess, rate, _labels_of(model), name,
                      identity + str(getattr(model.config, "_commit_hash", "") or ""), "model.")


def output_module(classifier: Classifier, output: str):
    """The module whose scores TCAV differentiates: logits, or log-softmax (log-probabilities)."""
    import torch

    class Output(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = classifier.module

        def forward(self, x):
            scores = scores_of(self.inner(x))
            return scores if output == "logit" else torch.log_softmax(scores, dim=-1)

    return Output()


def check_targets(classifier: Classifier, targets: list) -> dict:
    """{target name: class index}; a target is a class name (id2label) or an index. One clear error each."""
    label2id = {name: i for i, name in sorted(classifier.id2label.items())}
    chosen = {}
    for target in targets:
        if str(target) in label2id:
            chosen[str(target)] = label2id[str(target)]
        elif str(target).lstrip("-").isdigit():
            chosen[str(target)] = int(target)
        else:
            known = list(label2id) or "none (the model has no id2label: give class indices, e.g. --targets 0 3)"
            raise ConceptCapsError(f"--targets {[target]} are not classes of {classifier.name}; its classes are {known}.")
    return chosen


def check_layers(module, layers: list[str], name: str) -> None:
    """Unknown layer names are one clear error that lists the closest names."""
    import difflib

    import torch

    if isinstance(module, torch.jit.ScriptModule):
        raise ConceptCapsError(f"--model {name} is TorchScript, which takes no hooks on its layers: save it with "
                               f"torch.export.save(torch.export.export(model, (example,)), 'model.pt2') (a dynamic "
                               f"batch dimension helps), or pass a MODULE:FUNCTION factory that builds the module.")
    modules = dict(module.named_modules())
    for layer in layers:
        if layer not in modules or not layer:
            close = difflib.get_close_matches(layer, list(modules), n=5, cutoff=0.4)
            raise ConceptCapsError(f"--layers {layer!r} is not a module of {name}; closest: {close}. "
                                   f"`model.named_modules()` lists them all.")


# -- probes and the time axis ------------------------------------------------------------------
def _first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "keys"):
        return output[next(iter(output.keys()))]
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return None


def _replace_first(output, tensor):
    import torch

    if isinstance(output, torch.Tensor):
        return tensor
    if hasattr(output, "keys"):
        output[next(iter(output.keys()))] = tensor
        return output
    return type(output)([tensor, *output[1:]])


class Probes:
    """Forward hooks on `layers` of `module` that pool each layer's output over its time axis.

    `pool_dims[layer]` are the axes averaged (() keeps every unit: flatten). With `grad` on, the
    pooled activation is a leaf whose gradient `gradients()` reads.
    """

    def __init__(self, module, layers: list[str]):
        self.module, self.layers = module, list(layers)
        self.pool_dims: dict[str, tuple] = {}
        self.values: dict = {}
        self.shapes: dict = {}
        self.grad = False
        self.handles = [module.get_submodule(layer).register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer):
        import torch

        def hook(_module, _inputs, output):
            hidden = _first_tensor(output)
            if not isinstance(hidden, torch.Tensor):
                raise ConceptCapsError(f"--layers {layer!r} outputs {type(output).__name__}, not a tensor: pick a "
                                       f"layer whose output (or first output) is a tensor.")
            self.shapes[layer] = tuple(hidden.shape)
            if layer not in self.pool_dims:
                return None  # shape detection only
            dims = self.pool_dims[layer]
            pooled = hidden.mean(dim=dims, keepdim=True) if dims else hidden
            if not self.grad:
                self.values[layer] = pooled.detach().reshape(hidden.shape[0], -1)
                return None
            leaf = torch.zeros_like(pooled, requires_grad=True)
            self.values[layer] = leaf
            return _replace_first(output, hidden + leaf)  # + 0: the same output, with a door for the gradient

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def detect_pool_dims(self, scorer, preprocess, rate: int, seconds: float, pooling: str = "mean",
                         pool_dims: list[int] | None = None, transformers_layout: bool = False) -> dict:
        """Which axes of each layer's output are time: those whose size follows the clip's length.

        Two clips of noise (`seconds` and half of it) go through the model; an axis whose size
        changes between them is a time axis and is averaged (--pooling mean). A layer whose output
        does not change shape (a feature extractor that pads to a fixed length) is ambiguous: a
        transformers checkpoint's hidden states are (batch, time, features) by convention; for any
        other model --pool_dims must say which axes are time.
        """
        import torch

        if pooling == "flatten":
            self.pool_dims = {layer: () for layer in self.layers}
            return self.pool_dims
        shapes = []
        rng = np.random.default_rng(0)
        for length in (max(2, round(seconds * rate)), max(1, round(seconds * rate / 2))):
            self.pool_dims = {}
            try:
                with torch.no_grad():
                    scorer(preprocess([(0.1 * rng.standard_normal(length)).astype(np.float32)]))
            except Exception:
                if not shapes:
                    raise
                shapes.append(shapes[0])
                continue
            shapes.append(dict(self.shapes))
        dims = {}
        for layer in self.layers:
            full, half = shapes[0][layer], shapes[1][layer]
            if pool_dims:
                bad = [d for d in pool_dims if not 1 <= d < len(full)]
                if bad:
                    raise ConceptCapsError(f"--pool_dims {pool_dims}: layer {layer!r} outputs shape {list(full)} "
                                           f"(axis 0 is the batch); give axes between 1 and {len(full) - 1}.")
                dims[layer] = tuple(pool_dims)
            elif len(full) <= 2:
                dims[layer] = ()
            else:
                changed = tuple(d for d in range(1, len(full)) if full[d] != half[d])
                if changed:
                    dims[layer] = changed
                elif transformers_layout and len(full) == 3:
                    dims[layer] = (1,)
                    logger.info("tcav: %s outputs %s whatever the clip length (the feature extractor pads); "
                                "averaging axis 1, time in the transformers (batch, time, features) layout",
                                layer, list(full))
                else:
                    raise ConceptCapsError(
                        f"--layers {layer!r} outputs shape {list(full)} whatever the clip length, so its time axis "
                        f"cannot be told from it: give --pool_dims (e.g. --pool_dims 1 for (batch, time, features), "
                        f"--pool_dims 2 for (batch, channels, time)) or --pooling flatten.")
            logger.info("tcav: layer %s outputs %s per batch; averaging axes %s (time)", layer, list(full),
                        list(dims[layer]))
        self.pool_dims = dims
        return dims


# -- clips -------------------------------------------------------------------------------------
def fit_length(array: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.float32)
    out[: min(length, len(array))] = array[:length]
    return out


def resample(array: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return array
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(array, target // g, rate // g).astype(np.float32)


class ArrayClips:
    """Clips already in memory (the Python API): a sequence of mono arrays at the model's rate."""

    def __init__(self, clips):
        self.clips = clips

    def __len__(self):
        return len(self.clips)

    def batches(self, indices, batch_size: int, rate: int):
        """(indices, digests, mono float32 clips at `rate`) per batch of `indices`."""
        indices = list(indices)
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            arrays = [np.asarray(self.clips[i], dtype=np.float32).reshape(-1) for i in batch]
            yield batch, [hashlib.sha256(a.tobytes()).hexdigest()[:24] for a in arrays], arrays


class DatasetClips:
    """The `audio` column of a datasets split, read a batch at a time from its Arrow files.

    The column is cast to undecoded bytes once (not per batch: a cast costs time in proportion to
    the split), each clip's bytes are digested as they pass and decoded with soundfile, then
    resampled to the model's rate. Memory holds one batch of clips.
    """

    def __init__(self, dataset):
        import datasets

        self.raw = dataset.select_columns(["audio"]).cast_column("audio", datasets.Audio(decode=False))

    def __len__(self):
        return len(self.raw)

    def stored(self, batch: list[int]) -> list[dict]:
        return self.raw[batch]["audio"]

    def batches(self, indices, batch_size: int, rate: int):
        indices = list(indices)
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            digests, arrays = [], []
            for audio in self.stored(batch):
                digest, array = decode_stored(audio, rate)
                digests.append(digest)
                arrays.append(array)
            yield batch, digests, arrays


class ReleaseClips(DatasetClips):
    """A local release split's clips read from its Parquet files a row group at a time (`SplitAudio`).

    Used with a split loaded without its audio column (`load_release_lean`): the split's clips are
    never copied into an Arrow cache, so memory holds one row group and reading is one pass.
    """

    def __init__(self, audio):
        self.audio = audio

    def __len__(self):
        return len(self.audio)

    def stored(self, batch: list[int]) -> list[dict]:
        return self.audio.rows(batch)


def decode_stored(audio: dict, rate: int) -> tuple[str, np.ndarray]:
    """(digest of the stored bytes, mono float32 clip at `rate`) of one stored clip ({"bytes", "path"})."""
    import soundfile as sf

    data = audio["bytes"] if audio.get("bytes") else Path(audio["path"]).read_bytes()
    samples, clip_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    # the classifier hears the mix
    return hashlib.sha256(data).hexdigest()[:24], resample(samples.mean(axis=1), clip_rate, rate)


# -- the activation cache ----------------------------------------------------------------------
def model_key(classifier: Classifier, seconds: float, pool_dims: dict) -> str:
    """What a cached activation depends on: the weights, the model's identity, the clip length and the pooling."""
    import torch

    digest = hashlib.sha256(classifier.identity.encode())
    digest.update(json.dumps([seconds, {k: list(v) for k, v in sorted(pool_dims.items())},
                              classifier.sampling_rate]).encode())
    with torch.no_grad():  # a few values of every tensor: cheap and sensitive enough to tell checkpoints apart
        for name, tensor in classifier.module.state_dict().items():
            values = tensor.detach().float().flatten()
            digest.update(name.encode())
            digest.update(values[:: max(1, values.numel() // 64)].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class ActivationCache:
    """Pooled activations (and logits) per (model, layer, clip) in ROOT/<model key>/<layer>/<clip digest>.npy."""

    def __init__(self, root: Path | None, key: str):
        self.root = Path(root) / key if root else None

    def path(self, layer: str, digest: str) -> Path:
        return self.root / layer.replace("/", "_") / f"{digest}.npy"

    def get(self, layer: str, digest: str) -> np.ndarray | None:
        if self.root is None or not self.path(layer, digest).is_file():
            return None
        return np.load(self.path(layer, digest))

    def put(self, layer: str, digest: str, vector: np.ndarray) -> None:
        if self.root is None:
            return
        from conceptcaps_pipeline.run_dir import atomic_path

        with atomic_path(self.path(layer, digest)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, vector.astype(np.float32))


def activations(scorer, probes: Probes, preprocess, clips, indices, *, rate: int, length: int, batch_size: int,
                cache: ActivationCache, device, what: str = "tcav activations") -> tuple[dict, np.ndarray, int, float]:
    """({layer: (len(indices), units)}, logits (len(indices), classes), clips forwarded, share mostly padding).

    Streams the clips a batch at a time; a clip whose activations and logits are all cached is
    not forwarded. Activations are float32 features (a few hundred numbers per clip), not audio.
    """
    import torch
    from tqdm.auto import tqdm

    indices = list(indices)
    layers = [*probes.layers, "logits"]
    out: dict = {}
    forwarded = padded = 0
    row = 0
    total = (len(indices) + batch_size - 1) // batch_size
    for batch, digests, arrays in tqdm(clips.batches(indices, batch_size, rate), total=total, desc=what,
                                       unit="batch"):
        padded += sum(len(a) < length / 2 for a in arrays)
        cached = [[cache.get(layer, d) for layer in layers] for d in digests]
        todo = [k for k, values in enumerate(cached) if any(v is None for v in values)]
        if todo:
            x = preprocess([fit_length(arrays[k], length) for k in todo])
            with torch.no_grad():
                logits = scorer(x.to(device) if hasattr(x, "to") else x)
            fresh = [*[probes.values[layer] for layer in probes.layers], logits]
            for slot, k in enumerate(todo):
                cached[k] = [value[slot].float().cpu().numpy().reshape(-1) for value in fresh]
                for layer, vector in zip(layers, cached[k]):
                    cache.put(layer, digests[k], vector)
            forwarded += len(todo)
        for k in range(len(batch)):
            for layer, vector in zip(layers, cached[k]):
                if layer not in out:
                    out[layer] = np.zeros((len(indices), vector.size), dtype=np.float32)
                out[layer][row + k] = vector
        row += len(batch)
    logits = out.pop("logits", np.zeros((0, 0), dtype=np.float32))
    return out, logits, forwarded, padded / max(len(indices), 1)


def gradients(scorer, probes: Probes, preprocess, clips, indices, class_index: int, *, rate: int, length: int,
              batch_size: int, device) -> dict:
    """{layer: (len(indices), units)}: the gradient of the class score at each layer's pooled activation."""
    import torch

    out = {layer: [] for layer in probes.layers}
    probes.grad = True
    try:
        for _batch, _digests, arrays in clips.batches(indices, batch_size, rate):
            x = preprocess([fit_length(a, length) for a in arrays])
            x = x.to(device) if hasattr(x, "to") else x
            with torch.enable_grad():
                scores = scorer(x)[:, class_index].sum()
                leaves = [probes.values[layer] for layer in probes.layers]
                grads = torch.autograd.grad(scores, leaves, allow_unused=True)
            for layer, leaf, grad in zip(probes.layers, leaves, grads):
                grad = torch.zeros_like(leaf) if grad is None else grad
                out[layer].append(grad.reshape(grad.shape[0], -1).float().cpu().numpy())
    finally:
        probes.grad = False
    return {layer: np.concatenate(parts) for layer, parts in out.items()}
