"""Caption decoding speed against the memory-bandwidth floor: the LoRA adapter unmerged vs merged.

    python benchmarks/caption_throughput.py                        # the tiny Llama on a CPU
    python benchmarks/caption_throughput.py --model llama-8b       # Llama-3.1-8B's architecture, random weights (GPU)

The captions stage generates with the base model plus the fine-tuned LoRA adapter. Unmerged,
every adapted linear layer runs three matmuls (W x, then A x and B (A x)); merged
(`merge_and_unload`, the stage's default) it runs one. For each path and batch size, in one
run: ms per decode step, generated tokens per device-second, host ops and syncs per step (aten
ops dispatched, counted), the ratio to the bandwidth floor (reading the weights and the filled
KV cache once per step), and the projected device-hours for the paper preset's 23,815 captions
of about 80 tokens. `--model llama-8b` builds Llama-3.1-8B's architecture (32 layers, width
4,096, grouped-query attention with 8 KV heads, vocabulary 128,256) in bf16 with random weights
and a random rank-32 adapter on every linear layer: its cost, nothing downloaded. Prints a
table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
DEFAULT_CSV = HERE.parent.parent / "shared" / "data" / "musiccaps" / "musiccaps-public.csv"
PAPER_CAPTIONS, CAPTION_TOKENS, PROMPT_TOKENS = 23_815, 80, 120


def llama_8b_config(vocab_size: int):
    """meta-llama/Llama-3.1-8B-Instruct's architecture, written out (no download)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(name: str, captions: list[str], device, dtype, work: Path):
    """(base model, tokenizer) with a random rank-32 LoRA adapter on every linear layer."""
    import torch
    from conceptcaps_pipeline.testing.tiny_llm import TinyLlmConfig, build_tiny_llm
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = build_tiny_llm(work / "tiny", captions, TinyLlmConfig(vocab_size=1024))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    if name == "llama-8b":
        with torch.device(device):
            model = LlamaForCausalLM(llama_8b_config(128_256)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter's B is not zero
        for name_, parameter in model.named_parameters():
            if "lora_B" in name_:
                parameter.normal_(0, 0.01)
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tiny or llama-8b (default: llama-8b on GPU, tiny on CPU)")
    parser.add_argument("--captions", default=str(DEFAULT_CSV), help="MusicCaps CSV (prompts, tokenizer)")
    parser.add_argument("--batch_sizes", default=None, help="comma list (default 16,64,128 GPU; 1,8,32 CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per caption (default 80 GPU, 32 CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    import tempfile

    import pandas as pd
    import torch
    from bandwidth_floor import describe_device, device_bandwidth, per_step, synchronize

    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    name = args.model or ("llama-8b" if gpu else "tiny")
    sizes = [int(b) for b in (args.batch_sizes or ("16,64,128" if gpu else "1,8,32")).split(",")]
    tokens = args.tokens or (CAPTION_TOKENS if gpu else 32)
    captions = pd.read_csv(args.captions)["caption"].dropna().astype(str).tolist()
    bandwidth, source = device_bandwidth(device)
    dtype_bytes = torch.finfo(dtype).bits // 8

    with tempfile.TemporaryDirectory() as tmp:
        lora, tokenizer = build(name, captions, device, dtype, Path(tmp))
        config = lora.base_model.model.config
        print(f"# model {name}: {sum(p.numel() for p in lora.parameters()) / 1e6:.1f}M parameters with the adapter, "
              f"{str(dtype).replace('torch.', '')}, {tokens} new tokens; {describe_device(device)}; bandwidth "
              f"{bandwidth / 1e9:.0f} GB/s ({source})", flush=True)
        print(f"{'path':<9}{'batch':>6}{'ms/step':>10}{'tokens/dev-s':>14}{'ops/step':>10}{'syncs/step':>11}"
              f"{'x floor':>9}{'paper h':>9}")
        import copy

        merged = copy.deepcopy(lora).merge_and_unload()
        weight_bytes = sum(p.numel() for p in merged.parameters()) * dtype_bytes
        head_width = config.hidden_size // config.num_attention_heads
        kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_width * dtype_bytes
        for batch in sizes:
            prompts = [f"Describe this music: {c[:200]}" for c in captions[:batch]]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            times = {}
            for path, model in (("lora", lora), ("merged", merged)):
                def decode(n, model=model, inputs=inputs):
                    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)

                with torch.inference_mode():
                    decode(4)
                    ops, syncs = per_step(decode, 4, 12)
                    synchronize(device)
                    started = time.perf_counter()
                    decode(tokens)
                    synchronize(device)
                    seconds = time.perf_counter() - started
                times[path] = seconds
                step = seconds / tokens
                context = inputs["input_ids"].shape[1] + tokens / 2
                floor = (weight_bytes + batch * context * kv_per_token) / bandwidth
                paper_context = PROMPT_TOKENS + CAPTION_TOKENS / 2
                paper_floor = (weight_bytes + batch * paper_context * kv_per_token) / bandwidth
                paper_hours = PAPER_CAPTIONS / batch * CAPTION_TOKENS * step / floor * paper_floor / 3600
                hours = f"{paper_hours:>9.2f}" if name == "llama-8b" else f"{'-':>9}"
                print(f"{path:<9}{batch:>6}{step * 1e3:>10.2f}{batch * tokens / seconds:>14.1f}{ops:>10.0f}"
                      f"{syncs:>11.1f}{step / floor:>9.1f}{hours}", flush=True)
            print(f"# batch {batch}: merged is {times['lora'] / times['merged']:.2f}x as fast as the unmerged adapter")
    print("# paper h (--model llama-8b only): device-hours for 23,815 captions of 80 tokens after a 120-token prompt at that batch, each step's "
          "time scaled with the floor; the prompt's prefill is left out.")


if __name__ == "__main__":
    main()
