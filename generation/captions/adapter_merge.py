"""Which weights a QLoRA adapter is applied to at caption time: measured, then chosen.

    from conceptcaps_pipeline.captions.adapter_merge import adapter_forms_difference, merged_model
    adapter_forms_difference(base, adapter, device="cpu", prompt=ids)   # the three forms' logits, compared
    model = merged_model(base, adapter, dtype=torch.bfloat16, device="cuda", quantized=True)

A QLoRA adapter is trained against the base's 4-bit NF4 weights W_q, not against the original
weights W. At generation time it can be applied three ways:

- `adapter`: the adapter over the quantised base, unmerged (what training saw; a 4-bit matmul
  plus two LoRA matmuls per layer: the slowest);
- `merged_dequantized`: merged into W_q de-quantised to the compute dtype (what training saw,
  up to the compute dtype's rounding of W_q + BA; one matmul per layer);
- `merged_original`: merged into W (what `merge_and_unload` on a full-precision base gives; one
  matmul per layer, but the adapter meets weights it was not trained with).

`adapter_forms_difference` measures each form's logits against `adapter`. On a CPU the
quantisation is simulated (`fake_nf4_`: bitsandbytes' NF4 code book, blocks of 64, absolute-max
scale per block; its double quantisation of the scales is not simulated); on a GPU with
bitsandbytes it is the real one, and `dequantize()` gives bitsandbytes' own W_q. Measured on the
tiny captioner (docs/captions.md): `merged_dequantized` equals `adapter` to float rounding while
`merged_original` is off by the whole quantisation error, so the captions stage merges into the
de-quantised base when the adapter was trained on a 4-bit base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# bitsandbytes' NF4 code book (normal-float 4-bit: quantiles of N(0, 1) scaled to [-1, 1]).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64  # bitsandbytes' default block size for 4-bit weights


def fake_nf4(weight):
    """`weight` quantised to NF4 and de-quantised back, in its own dtype (blocks of 64, absmax scale each)."""
    import torch

    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, NF4_BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    index = ((blocks / scale)[..., None] - levels).abs().argmin(dim=-1)
    restored = (levels[index] * scale).reshape(-1)[: flat.numel()]
    return restored.reshape(weight.shape).to(weight.dtype)


def fake_nf4_(model) -> int:
    """Round every linear layer but the output head to NF4 and back, in place, as bitsandbytes' 4-bit loading
    would quantise them (transformers leaves the output embeddings in full precision); returns the count."""
    import torch

    head = model.get_output_embeddings()
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                module.weight.copy_(fake_nf4(module.weight))
                count += 1
    return count


def trained_on_4bit(adapter: str | Path) -> bool | None:
    """Whether the captioner stage trained `adapter` on a 4-bit base (RUN/manifests/captioner_train.json beside
    RUN/captioner), None where no manifest says."""
    manifest = Path(adapter).parent / "manifests" / "captioner_train.json"
    if not manifest.is_file():
        return None

    def find(node):
        if isinstance(node, dict):
            if "load_in_4bit" in node:
                return bool(node["load_in_4bit"])
            for value in node.values():
                found = find(value)
                if found is not None:
                    return found
        return None

    return find(json.loads(manifest.read_text()).get("arguments", {}))


def can_load_4bit(device) -> bool:
    """Whether bitsandbytes can quantise on `device` (a CUDA GPU with bitsandbytes installed)."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def load_base(base: str, dtype, device, *, quantized: bool, real_4bit: bool | None = None):
    """The base with W (quantized False), or W_q de-quantised to `dtype`: bitsandbytes' own where it can run
    (`real_4bit` None: wherever it can), else the simulated NF4 rounding (fake_nf4_)."""
    if real_4bit is None:
        real_4bit = can_load_4bit(device)
    return _load(base, dtype, device, quantized=quantized, real_4bit=real_4bit)


def _load(base: str, dtype, device, *, quantized: bool, real_4bit: bool):
    import torch
    from conceptcaps_pipeline.captions.train import from_pretrained
    from transformers import AutoModelForCausalLM

    if quantized and real_4bit:
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        device = torch.device(device)
        model = from_pretrained(AutoModelForCausalLM, base, "model", quantization_config=config, dtype=torch.bfloat16,
                                device_map={"": device.index or 0})
        return (model.dequantize(dtype=dtype) or model).to(dtype)  # bitsandbytes' own W_q, in the compute dtype
    model = from_pretrained(AutoModelForCausalLM, base, "model", dtype=dtype).to(device)
    if quantized:
        fake_nf4_(model)
    return model


def merged_model(base: str, adapter: str, *, dtype, device, quantized: bool, real_4bit: bool = False):
    """The adapter merged into the base's weights: W_q de-quantised where `quantized`, else W (peft merge_and_unload)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base, dtype, device, quantized=quantized, real_4bit=real_4bit), adapter)
    return model.merge_and_unload().eval()


def adapter_forms_difference(base: str, adapter: str, *, device, prompt, real_4bit: bool = False) -> dict:
    """Logits of the three forms (module docstring) on `prompt` (token ids), against the unmerged adapter over the
    quantised base: max and mean |difference| over the reference's std, and the greedy next-token agreement."""
    import torch
    from peft import PeftModel

    compute = torch.bfloat16 if real_4bit else torch.float32
    prompt = prompt.to(device)
    with torch.inference_mode():
        if real_4bit:  # the real thing: 4-bit weights, bf16 compute, LoRA unmerged
            from conceptcaps_pipeline.captions.train import from_pretrained
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
            quantized = from_pretrained(AutoModelForCausalLM, base, "model", quantization_config=config,
                                        dtype=torch.bfloat16, device_map={"": torch.device(device).index or 0})
        else:
            quantized = _load(base, torch.float32, device, quantized=True, real_4bit=False)
        reference = PeftModel.from_pretrained(quantized, adapter).eval()(prompt).logits.float()
        del quantized
        forms = {"merged_dequantized": merged_model(base, adapter, dtype=compute, device=device, quantized=True,
                                                    real_4bit=real_4bit),
                 "merged_original": merged_model(base, adapter, dtype=compute, device=device, quantized=False)}
        if not real_4bit:  # on a CPU: also the bf16 rounding of the merged weights (the GPU's compute dtype)
            forms["merged_dequantized_bf16"] = merged_model(base, adapter, dtype=torch.bfloat16, device=device,
                                                            quantized=True)
        result = {"reference": "adapter over the quantised base (unmerged)",
                  "quantization": "bitsandbytes nf4" if real_4bit else "fake nf4 (cpu)"}
        spread = float(reference.std())
        for name, model in forms.items():
            logits = model(prompt).logits.float()
            difference = (logits - reference).abs()
            result[name] = {"max_over_std": float(difference.max()) / spread,
                            "mean_over_std": float(difference.mean()) / spread,
                            "greedy_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())}
    return result
