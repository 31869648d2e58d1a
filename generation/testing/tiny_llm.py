"""Build a tiny Llama-architecture chat model for tests and the `smoke` preset.

    python -m conceptcaps_pipeline.testing.tiny_llm --out runs/tiny-llm --source ../shared/data/musiccaps/musiccaps-public.csv
    conceptcaps captioner train --run runs/demo --model runs/tiny-llm

The model is a `LlamaForCausalLM` built from a small config with random weights, and its
tokenizer is a byte-level BPE trained on the source captions, with a Llama-3-style chat
template (`<|start_header_id|>role<|end_header_id|>` ... `<|eot_id|>`). Both are saved with
`save_pretrained`, so every stage loads the folder by path exactly as it loads a real
model: the real loading, fine-tuning and generation code runs, but the captions are noise.

`train_steps > 0` warms the random model up on the captions (a few seconds on a CPU), so
that it writes caption-like word salad that ends its turn, instead of random tokens that
never stop; that keeps the retry and degeneracy logic of `captions generate` testable.

`build_tiny_llm(out_dir, texts, config)` needs nothing from ConceptCaps: any list of
strings will do.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

BOS, EOS_TEXT, HEADER_START, HEADER_END, EOT, PAD = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>",
)
SPECIAL_TOKENS = [BOS, EOS_TEXT, HEADER_START, HEADER_END, EOT, PAD]

# Llama-3 layout. The assistant turn, end-of-turn token included, sits inside
# {% generation %} markers so that TRL's `assistant_only_loss` also works with it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass
class TinyLlmConfig:
    """Sizes of the tiny model and its warm-up; defaults train in seconds on a CPU."""

    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size, special tokens included."})
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    intermediate_size: int = field(default=128, metadata={"help": "MLP width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention, as in Llama 3)."})
    max_position_embeddings: int = field(default=512, metadata={"help": "Longest sequence, prompt included."})
    train_steps: int = field(default=0, metadata={"help": "Warm-up steps on the texts (0: random weights)."})
    train_batch_size: int = field(default=32, metadata={"help": "Warm-up batch size."})
    train_max_tokens: int = field(default=128, metadata={"help": "Warm-up sequences are cut to this many tokens."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Warm-up AdamW learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and the warm-up batches."})


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with the chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # Byte-level: any text round-trips, even characters the captions never use.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOT, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _warm_up(model, tokenizer, texts: list[str], config: TinyLlmConfig) -> float:
    """Full-weight language modelling on the texts, each as one assistant turn; returns the last loss."""
    import torch
    from tqdm.auto import tqdm

    sequences = [
        tokenizer.apply_chat_template([{"role": "assistant", "content": t}], tokenize=True, return_dict=True)["input_ids"]
        for t in texts
    ]
    sequences = [s[: config.train_max_tokens] for s in sequences if len(s) > 1]
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(config.train_steps), desc="tiny LLM warm-up", leave=False):
        picks = torch.randint(len(sequences), (config.train_batch_size,), generator=generator).tolist()
        batch = [sequences[i] for i in picks]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build_tiny_llm(out_dir: str | Path, texts: list[str], config: TinyLlmConfig | None = None) -> Path:
    """Train a tokenizer on `texts`, build a tiny Llama, optionally warm it up, save both to `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = config or TinyLlmConfig()
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("build_tiny_llm needs at least one non-empty text to train the tokenizer on.")
    tokenizer = train_tokenizer(texts, config.vocab_size)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # why: halves the parameters of a model that is mostly embedding
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    final_loss = _warm_up(model, tokenizer, texts, config) if config.train_steps > 0 else None
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # <|eot_id|>: generation stops at the end of the turn
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info(
        "tiny LLM: %d parameters, vocabulary %d, warm-up loss %s -> %s",
        model.num_parameters(), len(tokenizer), final_loss, out_dir,
    )
    return out_dir


def captions_from_source(source: str | Path) -> list[str]:
    """Caption texts of a MusicCaps-style CSV / Hub id, or of a parquet file with a `caption` column."""
    if str(source).endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(source, columns=["caption"]).column("caption").to_pylist()
    from conceptcaps_pipeline.taxonomy.source import read_source

    rows, _ = read_source(str(source))
    return [row.caption for row in rows]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder to write the model and tokenizer to.")
    parser.add_argument("--source", required=True, help="MusicCaps CSV, Hub id, or a parquet file with a caption column.")
    for name, spec in TinyLlmConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{name}", type=type(spec.default), default=spec.default, help=spec.metadata["help"])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(make_parser().parse_args(argv))
    out, source = args.pop("out"), args.pop("source")
    logging.basicConfig(level=logging.INFO)
    build_tiny_llm(out, captions_from_source(source), TinyLlmConfig(**args))


if __name__ == "__main__":
    main()

