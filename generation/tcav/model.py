"""The classifier side of `conceptcaps tcav`: loading, probes on layers, and cached activations.

    model, extractor = load_classifier("sanchit-gandhi/distilhubert-finetuned-gtzan", device)
    wrapper = logits_module(model, input_name(extractor))
    probes = attach_probes(wrapper, ["model.hubert.encoder.layers.1"], "mean", [])
    cache = ActivationCache(Path("runs/demo/tcav/activations"), model_key(model, extractor, 30.0, "mean", []))
    fill_cache(cache, wrapper, probes, extractor, dataset, clip_digests(dataset), range(len(dataset)), ...)

A probe is an identity module hung under a layer: captum reads the layer's pooled activation
there and the gradient of a logit with respect to it. Activations (and logits) are cached per
(model, layer, clip): the model key covers the checkpoint, the feature extractor, the clip
length and the pooling; the clip key is a digest of the clip's stored bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from conceptcaps_pipeline.errors import ConceptCapsError


def load_classifier(name: str, device):
    """(model in eval mode on `device`, feature extractor) of an AutoModelForAudioClassification checkpoint."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from conceptcaps_pipeline.models import load_pretrained, resolve_model

    name = resolve_model(name, "model")
    extractor = load_pretrained(AutoFeatureExtractor, name, "model", "audio classifier's feature extractor")
    model = load_pretrained(AutoModelForAudioClassification, name, "model", "audio classifier")
    return model.to(device).eval(), extractor


def check_model(model, name: str, targets: list[str], layers: list[str]) -> dict[str, int]:
    """{target: class index}; unknown targets and layers are one clear error each."""
    import difflib

    label2id = {str(label): int(i) for i, label in model.config.id2label.items()}
    label2id = dict(sorted(label2id.items(), key=lambda kv: kv[1]))
    unknown = [t for t in targets if t not in label2id]
    if unknown:
        raise ConceptCapsError(f"--targets {unknown} are not classes of {name}; its classes are {list(label2id)}.")
    modules = dict(model.named_modules())
    for layer in layers:
        if layer not in modules or not layer:
            close = difflib.get_close_matches(layer, list(modules), n=5, cutoff=0.4)
            raise ConceptCapsError(f"--layers {layer!r} is not a module of {name}; closest: {close}. "
                                   f"`model.named_modules()` lists them all.")
    return {t: label2id[t] for t in targets}


def logits_module(model, input_name: str, output: str = "logit"):
    """The classifier as captum wants it: one tensor in (the feature extractor's output), one score per class out.

    `output` "logit" gives the logits (the TCAV paper's h_k); "log_softmax" the log-probabilities,
    whose derivative along a direction ignores a shift shared by every logit.
    """
    import torch

    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            logits = self.model(**{input_name: x}).logits
            return logits if output == "logit" else torch.log_softmax(logits, dim=-1)

    return Scores()


def attach_probes(model, layers: list[str], pooling: str, pool_dims: list[int]) -> dict[str, str]:
    """Give each layer a child `tcav_probe` whose output is the layer's pooled activation.

    A forward hook on the layer passes its pooled output through the probe and adds
    (probe output - pooled value) back, which is zero: the model computes exactly what it did,
    while captum reads activations at the probe and the gradient there is the gradient of the
    layer output, summed over the pooled axes (the logit's change when the concept direction is
    added at every time step). Returns {layer: probe module name}.
    """
    import torch

    def pool(hidden):
        if pooling == "flatten" or hidden.dim() == 2:
            return hidden.reshape(hidden.shape[0], -1), hidden.shape
        dims = tuple(pool_dims) or ((1,) if hidden.dim() == 3 else tuple(range(2, hidden.dim())))
        kept = hidden.mean(dim=dims, keepdim=True)
        return kept.reshape(hidden.shape[0], -1), kept.shape

    names = {}
    for layer in layers:
        module = model.get_submodule(layer)
        probe = torch.nn.Identity()
        module.add_module("tcav_probe", probe)

        def hook(_module, _inputs, output, probe=probe, layer=layer):
            hidden = output[0] if isinstance(output, (tuple, list)) or hasattr(output, "keys") else output
            if not isinstance(hidden, torch.Tensor):
                raise ConceptCapsError(f"--layers {layer!r} outputs {type(output).__name__}, not a tensor: pick a "
                                       f"layer whose output (or first output) is a tensor.")
            flat, shape = pool(hidden)
            changed = hidden + (probe(flat) - flat.detach()).reshape(shape)
            if isinstance(output, torch.Tensor):
                return changed
            if hasattr(output, "keys"):
                output[next(iter(output.keys()))] = changed
                return output
            return type(output)([changed, *output[1:]])

        module.register_forward_hook(hook)
        names[layer] = f"{layer}.tcav_probe"
    return names


def model_key(model, extractor, max_duration: float, pooling: str, pool_dims: list[int]) -> str:
    """What a cached activation depends on: the checkpoint (config, weights), the input and the pooling."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string().encode())
    digest.update(json.dumps(extractor.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps([max_duration, pooling, list(pool_dims)]).encode())
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        digest.update(commit.encode())
    else:  # a local folder: the weights themselves (a few values of every tensor, cheap and sensitive enough)
        import torch

        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                values = tensor.detach().float().flatten()
                digest.update(name.encode())
                digest.update(values[:: max(1, values.numel() // 64)].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def clip_digests(dataset) -> list[str]:
    """A digest of each clip's stored bytes: the cache key of its activations, whatever its id."""
    import datasets

    raw = dataset.cast_column("audio", datasets.Audio(decode=False))
    return [hashlib.sha256(a["bytes"] or a["path"].encode()).hexdigest()[:24] for a in raw["audio"]]


def load_clips(dataset, indices, rate: int, length: int) -> np.ndarray:
    """(len(indices), length) mono float32 clips at `rate`: resampled by the Audio feature, cut or padded."""
    import datasets

    decoded = dataset.cast_column("audio", datasets.Audio(sampling_rate=rate)).select(list(indices))
    out = np.zeros((len(decoded), length), dtype=np.float32)
    for row, audio in enumerate(decoded["audio"]):
        array = np.asarray(audio["array"], dtype=np.float32)
        if array.ndim > 1:  # (channels, samples): the classifier hears the mix
            array = array.mean(axis=0)
        out[row, : min(length, len(array))] = array[:length]
    return out


class ActivationCache:
    """Pooled activations (and logits) per (model, layer, clip) in RUN/tcav/activations/<model key>/."""

    def __init__(self, root: Path, key: str):
        self.root = root / key

    def path(self, layer: str, digest: str) -> Path:
        return self.root / layer.replace("/", "_") / f"{digest}.npy"

    def has(self, layer: str, digest: str) -> bool:
        return self.path(layer, digest).is_file()

    def get(self, layer: str, digests: list[str]) -> np.ndarray:
        return np.stack([np.load(self.path(layer, d)) for d in digests])

    def put(self, layer: str, digest: str, vector: np.ndarray) -> None:
        from conceptcaps_pipeline.run_dir import atomic_path

        with atomic_path(self.path(layer, digest)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, vector.astype(np.float32))


def fill_cache(cache, wrapper, probes, extractor, dataset, digests, indices, *, max_duration: float,
               batch_size: int, device) -> int:
    """Forward the clips of `indices` that lack a cached activation or logits; returns how many."""
    import torch
    from captum.attr import LayerActivation
    from tqdm.auto import tqdm

    layers = [*probes, "logits"]
    todo = [i for i in dict.fromkeys(indices) if not all(cache.has(layer, digests[i]) for layer in layers)]
    if not todo:
        return 0
    rate = extractor.sampling_rate
    length = round(max_duration * rate)
    modules = [wrapper.get_submodule(probes[layer]) for layer in probes]
    activation = LayerActivation(wrapper, modules)
    for start in tqdm(range(0, len(todo), batch_size), desc="tcav activations", unit="batch"):
        batch = todo[start:start + batch_size]
        inputs = model_inputs(extractor, load_clips(dataset, batch, rate, length), device)
        with torch.no_grad():
            values = activation.attribute(inputs)
            logits = wrapper(inputs)
        values = values if isinstance(values, list) else [values]
        for layer, value in zip(probes, values):
            for row, i in enumerate(batch):
                cache.put(layer, digests[i], value[row].reshape(-1).float().cpu().numpy())
        for row, i in enumerate(batch):
            cache.put("logits", digests[i], logits[row].float().cpu().numpy())
    return len(todo)


def model_inputs(extractor, clips: np.ndarray, device):
    """The feature extractor's tensor (input_values or input_features) for a batch of clips."""
    features = extractor(list(clips), sampling_rate=extractor.sampling_rate, return_tensors="pt")
    name = input_name(extractor)
    return features[name].to(device)


def input_name(extractor) -> str:
    names = getattr(extractor, "model_input_names", None) or ["input_values"]
    return names[0]
