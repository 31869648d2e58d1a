"""Build a tiny, randomly initialised MusicGen (plus its processor) for tests and the smoke preset.

    python -m conceptcaps_pipeline.testing.tiny_musicgen --captions ../shared/data/musiccaps/musiccaps-public.csv --out runs/tiny-musicgen

    from conceptcaps_pipeline.testing.tiny_musicgen import build_tiny_musicgen
    build_tiny_musicgen("runs/tiny-musicgen", captions)          # captions: an iterable of str
    MusicgenForConditionalGeneration.from_pretrained("runs/tiny-musicgen")
    AutoProcessor.from_pretrained("runs/tiny-musicgen")

The folder has the layout of a real checkpoint such as facebook/musicgen-large: a
`MusicgenForConditionalGeneration` (T5 text encoder, MusicGen decoder, EnCodec audio codec), a
generation config with MusicGen's sampling defaults, and a `MusicgenProcessor` (T5 tokenizer +
EnCodec feature extractor). Nothing is downloaded: the T5-style Unigram tokenizer is trained
here on the given captions, and every weight is random. The audio it makes is noise, but the
real loading, generation and decoding code runs on it.

`musicgen_large_config()` writes out facebook/musicgen-large's architecture for benchmarks
that need the real model's cost with random weights.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

# T5's special tokens, in the ids T5Tokenizer expects: <pad>=0, </s>=1, <unk>=2.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def train_t5_tokenizer(captions: Iterable[str], vocab_size: int = 512):
    """A T5Tokenizer whose Unigram vocabulary is learned from `captions` (no download)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5Tokenizer

    raw = Tokenizer(Unigram())
    # Same pre-tokenisation as T5Tokenizer, so the learned pieces are the ones it will look up.
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                             show_progress=False)
    raw.train_from_iterator((c for c in captions if c and c.strip()), trainer=trainer)
    vocab = _unigram_vocab(raw)
    if [v[0] for v in vocab[:3]] != SPECIAL_TOKENS:
        raise RuntimeError(f"trained vocabulary does not start with {SPECIAL_TOKENS}: {vocab[:3]}")
    # extra_ids=0: T5's 100 sentinel tokens are for span corruption, which MusicGen never uses.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _unigram_vocab(tokenizer) -> list[tuple[str, float]]:
    import json

    return [(piece, float(score)) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]]


def tiny_musicgen_config(text_vocab_size: int, *, stereo: bool = False, sampling_rate: int = 8000,
                         codebook_size: int = 64, hidden_size: int = 32, layers: int = 2,
                         text_hidden_size: int | None = None):
    """A MusicgenConfig with MusicGen's structure at toy size.

    `text_hidden_size` (default: `hidden_size`) other than `hidden_size` gives the text encoder
    another width, as in facebook/musicgen-medium and -large (T5 768 wide, decoder 1536/2048):
    the model then projects the text states with `enc_to_dec_proj`, a branch equal widths skip.

    The codec runs at 50 frames a second like EnCodec 32 kHz (hop 160 at 8 kHz instead of 640
    at 32 kHz), with 4 codebooks per channel; the decoder's pad/bos id is its vocab size
    (= codebook size), exactly as in the released MusicGen configs.
    """
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    num_codebooks = 4
    upsampling_ratios = [5, 4, 4, 2]  # hop 160 -> 8000 / 160 = 50 frames/s
    frame_rate = sampling_rate // 160
    bits = (codebook_size - 1).bit_length()
    # EnCodec derives its number of quantizers from the bandwidth: 1000 * bw // (frame_rate * bits).
    bandwidth = num_codebooks * frame_rate * bits / 1000
    text_encoder = T5Config(
        vocab_size=text_vocab_size, d_model=text_hidden_size or hidden_size, d_kv=8,
        d_ff=2 * (text_hidden_size or hidden_size), num_layers=1,
        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="relu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    audio_encoder = EncodecConfig(
        sampling_rate=sampling_rate, audio_channels=1, hidden_size=16, num_filters=4, num_lstm_layers=1,
        upsampling_ratios=upsampling_ratios, codebook_size=codebook_size, target_bandwidths=[bandwidth],
        use_causal_conv=False, use_conv_shortcut=False, normalize=False,
    )
    assert audio_encoder.num_quantizers == num_codebooks, audio_encoder.num_quantizers
    decoder = MusicgenDecoderConfig(
        vocab_size=codebook_size, hidden_size=hidden_size, ffn_dim=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=2, num_codebooks=num_codebooks * (2 if stereo else 1), audio_channels=2 if stereo else 1,
        max_position_embeddings=2048, dropout=0.0,
        pad_token_id=codebook_size, bos_token_id=codebook_size,  # as in facebook/musicgen-*: id = codebook size
    )
    return MusicgenConfig(text_encoder=text_encoder, audio_encoder=audio_encoder, decoder=decoder)


def musicgen_large_config():
    """facebook/musicgen-large's architecture (3.3B decoder, T5-base text encoder, EnCodec 32 kHz).

    Written out from the published config.json so the real model's cost can be measured with
    random weights where the checkpoint cannot be downloaded.
    """
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    text_encoder = T5Config(  # t5-base
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    audio_encoder = EncodecConfig(  # facebook/encodec_32khz
        sampling_rate=32000, audio_channels=1, hidden_size=128, num_filters=64, num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 4], codebook_size=2048, target_bandwidths=[2.2], normalize=False,
        use_causal_conv=False, use_conv_shortcut=False, num_lstm_layers=2, compress=2, norm_type="weight_norm",
        kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2, pad_mode="reflect",
        trim_right_ratio=1.0,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, hidden_size=2048, ffn_dim=8192, num_hidden_layers=48, num_attention_heads=32,
        num_codebooks=4, audio_channels=1, max_position_embeddings=2048, activation_function="gelu",
        dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False,
        pad_token_id=2048, bos_token_id=2048, tie_word_embeddings=False,
    )
    return MusicgenConfig(text_encoder=text_encoder, audio_encoder=audio_encoder, decoder=decoder)


def musicgen_generation_config(codebook_size: int, max_length: int = 1500):
    """The generation defaults shipped with facebook/musicgen-*: sampling, top-k 250, CFG 3."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, top_k=250, guidance_scale=3.0, max_length=max_length,
        bos_token_id=codebook_size, pad_token_id=codebook_size, decoder_start_token_id=codebook_size,
    )


def make_audible(model, target_rms: float = 0.1, seed: int = 0) -> None:
    """Give a randomly initialised codec distinct codebook vectors and a sensible output level.

    Why: transformers initialises EnCodec's codebooks to zeros, so every code decodes to the
    same constant signal, and the random output level is arbitrary (often near-silent). Both
    would make the tiny model's clips fail `audio verify` for reasons that say nothing about
    the pipeline. Random codebooks plus a rescaled last convolution keep the real decoding path.
    """
    import torch

    codec = model.audio_encoder
    config = model.config.audio_encoder
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            embed = torch.randn(layer.codebook.embed.shape, generator=generator)
            layer.codebook.embed.copy_(embed)
            layer.codebook.embed_avg.copy_(embed)
        # The last convolution is linear: remove its mean output (a DC offset is loud by RMS but
        # silent to the ear), then scale weights and bias to the target level.
        last = [m for m in codec.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
        codes = torch.randint(0, config.codebook_size, (1, 4, config.num_quantizers, 50), generator=generator)
        codes = codes.to(next(codec.parameters()).device)  # a model built on a GPU (benchmarks) decodes there
        audio = codec.decode(codes, [None]).audio_values
        last.bias.sub_(audio.mean(dim=(0, 2)))
        scale = target_rms / max(float(audio.std()), 1e-8)
        if hasattr(last, "parametrizations"):  # weight norm: the magnitude lives in original0
            last.parametrizations.weight.original0.mul_(scale)
        else:
            last.weight.mul_(scale)
        last.bias.mul_(scale)


def random_musicgen(config, device="cpu", dtype=None):
    """A MusicGen of `config` with random weights (seed 0) built on `device`: an audible codec (`make_audible`),
    MusicGen's generation config, the transformer in `dtype` and EnCodec in float32 (the benchmarks' models)."""
    import torch
    from transformers import MusicgenForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = MusicgenForConditionalGeneration(config)
    make_audible(model)
    model.generation_config = musicgen_generation_config(config.decoder.vocab_size)
    model.to(dtype or torch.float32)
    model.audio_encoder.to(torch.float32)
    return model


def build_tiny_musicgen(out: str | Path, captions: Iterable[str], *, stereo: bool = False, seed: int = 0,
                        vocab_size: int = 512, text_hidden_size: int | None = None) -> Path:
    """Write a tiny MusicGen checkpoint and processor to `out`; returns the folder.

    text_hidden_size: a text encoder width other than the decoder's (32) takes the enc_to_dec_proj path.
    """
    import torch
    from transformers import EncodecFeatureExtractor, MusicgenForConditionalGeneration, MusicgenProcessor

    out = Path(out)
    tokenizer = train_t5_tokenizer(captions, vocab_size=vocab_size)
    config = tiny_musicgen_config(len(tokenizer), stereo=stereo, text_hidden_size=text_hidden_size)
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    make_audible(model)
    model.generation_config = musicgen_generation_config(config.decoder.vocab_size)
    feature_extractor = EncodecFeatureExtractor(
        feature_size=1, sampling_rate=config.audio_encoder.sampling_rate, padding_value=0.0)
    processor = MusicgenProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("tiny MusicGen (%s, %d parameters) written to %s", "stereo" if stereo else "mono",
                sum(p.numel() for p in model.parameters()), out)
    return out


def _read_captions(path: str) -> list[str]:
    import pandas as pd

    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    return frame["caption"].dropna().astype(str).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True, help="CSV or Parquet file with a `caption` column.")
    parser.add_argument("--out", required=True, help="Folder to write the model and processor to.")
    parser.add_argument("--stereo", action="store_true", help="Build a stereo (8-codebook) decoder.")
    parser.add_argument("--text_hidden_size", type=int, default=None,
                        help="Text encoder width; other than 32 (the decoder's) adds enc_to_dec_proj, as in musicgen-large.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build_tiny_musicgen(args.out, _read_captions(args.captions), stereo=args.stereo,
                        text_hidden_size=args.text_hidden_size)


if __name__ == "__main__":
    main()
