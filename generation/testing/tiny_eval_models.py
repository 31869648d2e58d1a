"""Build tiny evaluation models (a CLAP and a BERT encoder) for tests and the `smoke` preset.

    python -m conceptcaps_pipeline.testing.tiny_eval_models --out runs/tiny-eval --source ../shared/data/musiccaps/musiccaps-public.csv
    # -> runs/tiny-eval/clap   (ClapModel + ClapProcessor: eval/clap_score, eval/fad)
    # -> runs/tiny-eval/bert   (BertModel + tokenizer: BERTScore and MAUVE features in eval/caption_quality)
    # -> runs/tiny-eval/classifier (HubertForSequenceClassification over the GTZAN genres: `conceptcaps tcav`)

Both are built from small configs with random weights; their tokenizers are trained on the
given texts (the MusicCaps captions in tests). They are saved with `save_pretrained`, so the
metric modules load them by path exactly as they load `laion/larger_clap_music` or
`roberta-large`: the real loading, feature extraction and scoring code runs, but the
scores are noise.

`build_tiny_clap(out_dir, texts)` and `build_tiny_bert(out_dir, texts)` need nothing from
ConceptCaps: any list of strings will do. `build_tiny_audio_classifier(out_dir)` needs no text: it
is the architecture of a GTZAN genre classifier such as a fine-tuned DistilHuBERT (16 kHz
waveform in, one logit per genre out) at toy size.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# The tiny CLAP listens at 16 kHz in 2-second windows (the real music CLAP: 48 kHz, 10 s):
# long enough that tests exercise resampling and multi-window clips, short enough to be fast.
TINY_CLAP_SAMPLING_RATE = 16_000
TINY_CLAP_WINDOW_S = 2
TINY_MAX_TOKENS = 64


def train_tokenizer(texts: list[str], kind: str = "roberta", vocab_size: int = 1000, model_max_length: int = TINY_MAX_TOKENS):
    """A tokenizer of the RoBERTa (byte-level BPE, as CLAP uses) or BERT (WordPiece) family, trained on `texts`."""
    from transformers import BertTokenizer, RobertaTokenizer

    if kind not in ("roberta", "bert"):
        raise ValueError(f"tokenizer kind {kind!r} is not one of 'roberta', 'bert'.")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text.")
    # Start from the empty tokenizer of the family so that the special tokens, normalizer
    # and post-processor are the family's own; only the vocabulary is learned here.
    base = RobertaTokenizer() if kind == "roberta" else BertTokenizer()
    # show_progress=False: the Rust trainer's bar is drawn with terminal escapes that leave blank lines in a log.
    tokenizer = base.train_new_from_iterator(texts, vocab_size=vocab_size, show_progress=False)
    tokenizer.model_max_length = model_max_length
    return tokenizer


def build_tiny_clap(out_dir: str | Path, texts: list[str], seed: int = 0, projection_dim: int = 16) -> Path:
    """Save a tiny `ClapModel` and its `ClapProcessor` (feature extractor + tokenizer) to `out_dir`."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, "roberta")
    feature_extractor = ClapFeatureExtractor(
        feature_size=16,  # mel bins; must equal the audio config's num_mel_bins
        sampling_rate=TINY_CLAP_SAMPLING_RATE,
        hop_length=160,
        max_length_s=TINY_CLAP_WINDOW_S,
        fft_window_size=512,
        frequency_max=TINY_CLAP_SAMPLING_RATE // 2,
        # The unfused layout (one mel per clip), as in laion/larger_clap_music.
        truncation="rand_trunc",
    )
    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64,
            # RoBERTa-style positions start after the pad id, so leave room beyond the token limit.
            "max_position_embeddings": TINY_MAX_TOKENS + 8,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        audio_config={
            # spec_size 64 = 4 x 16 mel bins: the HTSAT encoder folds the time axis into a square image.
            "num_mel_bins": 16, "spec_size": 64, "window_size": 4, "patch_size": 4, "patch_stride": [4, 4],
            "patch_embeds_hidden_size": 32, "hidden_size": 64, "depths": [1, 1], "num_attention_heads": [2, 4],
            "num_classes": 8, "enable_fusion": False,
        },
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ClapModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    logger.info("tiny CLAP (%d parameters) saved to %s", sum(p.numel() for p in model.parameters()), out)
    return out


def build_tiny_bert(out_dir: str | Path, texts: list[str], seed: int = 0, num_hidden_layers: int = 2) -> Path:
    """Save a tiny `BertModel` and its WordPiece tokenizer to `out_dir` (a BERTScore / MAUVE encoder)."""
    import torch
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, "bert", model_max_length=128)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("tiny BERT (%d parameters) saved to %s", sum(p.numel() for p in model.parameters()), out)
    return out


GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
TINY_CLASSIFIER_SAMPLING_RATE = 16_000


def tiny_audio_classifier_config(labels=GTZAN_GENRES, hidden_size: int = 32, layers: int = 2):
    """A HubertConfig for sequence classification with DistilHuBERT's structure at toy size.

    The convolutional front end keeps HuBERT's total stride of 320 samples (50 frames a second
    at 16 kHz) with three layers instead of seven.
    """
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden_size,
        conv_dim=(16, 16, 16), conv_stride=(5, 8, 8), conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, classifier_proj_size=16, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
        do_stable_layer_norm=False, feat_extract_norm="group",
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )


def build_tiny_audio_classifier(out_dir: str | Path, labels=GTZAN_GENRES, seed: int = 0, **config) -> Path:
    """Save a tiny random `HubertForSequenceClassification` and its feature extractor to `out_dir`."""
    import torch
    from transformers import HubertForSequenceClassification, Wav2Vec2FeatureExtractor

    out = Path(out_dir)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HubertForSequenceClassification(tiny_audio_classifier_config(labels, **config)).eval()
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=TINY_CLASSIFIER_SAMPLING_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=False,  # as DistilHuBERT: group-norm front ends take unmasked input
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    feature_extractor.save_pretrained(out)
    logger.info("tiny audio classifier (%d parameters, %d labels) saved to %s",
                sum(p.numel() for p in model.parameters()), len(labels), out)
    return out


def main(argv: list[str] | None = None) -> None:
    from conceptcaps_pipeline.taxonomy.source import read_source

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder to write clap/ and bert/ into.")
    parser.add_argument("--source", required=True, help="MusicCaps-style CSV (or Hub id) whose captions train the tokenizers.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows, _ = read_source(args.source)
    texts = [row.caption for row in rows]
    build_tiny_clap(Path(args.out) / "clap", texts)
    build_tiny_bert(Path(args.out) / "bert", texts)
    build_tiny_audio_classifier(Path(args.out) / "classifier")


if __name__ == "__main__":
    main()
