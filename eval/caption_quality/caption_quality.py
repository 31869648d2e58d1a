"""Caption quality: BLEU, ROUGE-L, BERTScore and MAUVE of generated captions against references.

    import evaluate
    caption_quality = evaluate.load("eval/caption_quality")   # path from the repository root
    caption_quality.compute(predictions=generated, references=reference_captions)
    caption_quality.compute(predictions=generated, references=reference_captions, metrics=["bleu", "rougeL"])

BERTScore and MAUVE load a text encoder (any Hub id or local path); BLEU and ROUGE-L need none.
"""

import logging

import datasets
import evaluate
import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("bleu", "rougeL", "bertscore", "mauve")
DEFAULT_BERTSCORE_MODEL = "roberta-large"  # bert-score's default for English
DEFAULT_MAUVE_MODEL = "gpt2-large"  # the featurizer of the MAUVE paper and of mauve-text

_CITATION = """\
@inproceedings{post2018sacrebleu,
  title={A Call for Clarity in Reporting {BLEU} Scores},
  author={Post, Matt},
  booktitle={Proceedings of the Third Conference on Machine Translation},
  year={2018}
}
@inproceedings{lin2004rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  year={2004}
}
@inproceedings{zhang2020bertscore,
  title={{BERTScore}: Evaluating Text Generation with {BERT}},
  author={Zhang, Tianyi and Kishore, Varsha and Wu, Felix and Weinberger, Kilian Q. and Artzi, Yoav},
  booktitle={ICLR},
  year={2020}
}
@inproceedings{pillutla2021mauve,
  title={{MAUVE}: Measuring the Gap Between Neural Text and Human Text using Divergence Frontiers},
  author={Pillutla, Krishna and Swayamdipta, Swabha and Zellers, Rowan and Thickstun, John and Welleck, Sean and Choi, Yejin and Harchaoui, Zaid},
  booktitle={NeurIPS},
  year={2021}
}
"""

_DESCRIPTION = """\
Four views of how close generated captions are to reference captions:

- `bleu`: corpus BLEU from sacrebleu (its defaults: 13a tokenisation, "exp" smoothing), on
  sacrebleu's 0-100 scale.
  Divide by 100 to compare with 0-1 figures (evaluate's `bleu`, the ConceptCaps paper's 0.2465).
- `rougeL`: mean ROUGE-L F-measure (rouge-score, Porter stemming), 0-1; with several
  references, the best one per prediction.
- `bertscore_precision`, `bertscore_recall`, `bertscore_f1`: mean BERTScore (bert-score,
  no baseline rescaling) with a configurable encoder (default `roberta-large`, bert-score's
  English default, at its tuned layer 17; for another model the layer is `num_layers`, else
  that model's last layer).
- `mauve`: MAUVE (mauve-text) between the references (human text, P) and the predictions
  (Q), on features computed here from a configurable encoder (default `gpt2-large`, as in
  the MAUVE paper): the final hidden state of each text's last token, as mauve-text does;
  `mauve_pooling="mean"` averages over tokens instead (better for bidirectional encoders).
  MAUVE quantises features with k-means: it needs many texts (hundreds or more) to be
  meaningful, and `mauve_num_buckets` clusters at most.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated captions.
    references (`list` of `str`, or `list` of `list` of `str`): reference caption(s) per prediction.
    metrics (`list` of `str`): which of "bleu", "rougeL", "bertscore", "mauve" to compute. Defaults to all.
    bertscore_model (`str`): BERTScore encoder, Hub id or local path. Defaults to "roberta-large".
    num_layers (`int`, optional): BERTScore layer; default: bert-score's tuned layer for known models,
        else the model's last layer.
    mauve_featurize_model (`str`): encoder for MAUVE features, Hub id or local path. Defaults to "gpt2-large".
    mauve_pooling (`str`): "last" (last token's final hidden state, as mauve-text) or "mean". Defaults to "last".
    mauve_num_buckets (`int` or "auto"): k-means clusters; "auto" is a tenth of the smaller set (at least 2).
    max_length (`int`): tokens kept per text for MAUVE features. Defaults to 512.
    batch_size (`int`): texts per forward pass (BERTScore and MAUVE). Defaults to 32.
    device (`str`, optional): torch device; defaults to "cuda" when available, else "cpu".
    seed (`int`): seed of MAUVE's PCA and k-means. Defaults to 25 (mauve-text's default).
Returns:
    A flat dict with the keys of the requested metrics: bleu (0-100), rougeL (0-1),
    bertscore_precision, bertscore_recall, bertscore_f1, mauve (0-1).
Examples:
    >>> import evaluate
    >>> caption_quality = evaluate.load("eval/caption_quality")
    >>> predictions = ["a calm piano melody with soft strings", "fast rock song with loud drums"]
    >>> references = ["a calm piano melody with soft strings", "a slow jazz tune with a walking bass"]
    >>> results = caption_quality.compute(predictions=predictions[:1], references=references[:1],
    ...                                   metrics=["bleu", "rougeL"])
    >>> print(round(results["bleu"], 2), round(results["rougeL"], 2))
    100.0 1.0
    >>> results = caption_quality.compute(predictions=predictions, references=references, metrics=["bleu", "rougeL"])
    >>> sorted(results), round(results["rougeL"], 4)
    (['bleu', 'rougeL'], 0.5714)
"""


def _reference_lists(references) -> list[list[str]]:
    return [[ref] if isinstance(ref, str) else list(ref) for ref in references]


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    import sacrebleu

    # sacrebleu wants one stream per reference position; None pads predictions with fewer references.
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]))


def bertscore(predictions, references, model, num_layers, batch_size, device) -> dict:
    import bert_score
    from bert_score.utils import model2layers

    if num_layers is None and model not in model2layers:
        # bert-score tuned a layer per known model only; for any other model use its last layer.
        from transformers import AutoConfig

        num_layers = _load(AutoConfig.from_pretrained, model, "BERTScore").num_hidden_layers
        logger.info("BERTScore: %s is not in bert-score's table; using its last layer (%d)", model, num_layers)
    # bert-score takes plain strings, or lists of references (scored against the best one).
    targets = [refs[0] for refs in references] if all(len(refs) == 1 for refs in references) else references
    try:
        precision, recall, f1 = bert_score.score(
            predictions, targets, model_type=model, num_layers=num_layers, batch_size=batch_size, device=device
        )
    except OSError as err:
        raise _load_error(model, "BERTScore", err) from err
    return {
        "bertscore_precision": float(precision.mean()),
        "bertscore_recall": float(recall.mean()),
        "bertscore_f1": float(f1.mean()),
    }


def featurize(texts: list[str], model: str, pooling: str, max_length: int, batch_size: int, device: str) -> np.ndarray:
    """(n, hidden) features: the final hidden state of each text's last token, or the mean over its tokens."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, model, "MAUVE")
    encoder = _load(AutoModel.from_pretrained, model, "MAUVE").eval().to(device)
    if tokenizer.pad_token is None:  # GPT-2 has none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    max_length = min(max_length, tokenizer.model_max_length)  # never beyond the encoder's positions
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="MAUVE features", unit="batch", disable=None):
        inputs = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = encoder(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        if pooling == "mean":
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        else:
            last = inputs["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        out.append(pooled.cpu().numpy())
    return np.concatenate(out)


def mauve_score(predictions, references, model, pooling, num_buckets, max_length, batch_size, device, seed) -> float:
    import mauve

    human = [text for refs in references for text in refs if text.strip()]
    generated = [text for text in predictions if text.strip()]
    if len(human) < sum(len(refs) for refs in references) or len(generated) < len(predictions):
        logger.warning("MAUVE: empty texts are left out (as mauve-text does)")
    smaller = min(len(human), len(generated))
    buckets = max(2, round(smaller / 10)) if num_buckets == "auto" else int(num_buckets)
    if smaller < max(buckets, 2):
        raise ValueError(
            f"MAUVE needs at least {max(buckets, 2)} non-empty texts per side for {buckets} k-means clusters, got "
            f"{len(generated)} predictions and {len(human)} references. Pass more captions (hundreds for a stable "
            f"value), lower `mauve_num_buckets`, or leave 'mauve' out of `metrics`."
        )
    p_features = featurize(human, model, pooling, max_length, batch_size, device)
    q_features = featurize(generated, model, pooling, max_length, batch_size, device)
    result = mauve.compute_mauve(p_features=p_features, q_features=q_features, num_buckets=buckets, seed=seed,
                                 verbose=False)
    return float(np.clip(result.mauve, 0.0, 1.0))  # the area estimate can overshoot 1 by round-off


def _load(loader, model: str, purpose: str):
    try:
        return loader(model)
    except OSError as err:
        raise _load_error(model, purpose, err) from err


def _load_error(model: str, purpose: str, err: Exception) -> ValueError:
    return ValueError(
        f"cannot load the {purpose} encoder {model!r} ({err}). Pass a Hub id or a local folder holding the model and "
        f"its tokenizer; Hub ids need the Hub or a local copy. Or leave this metric out of `metrics`."
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
            ],
            codebase_urls=[
                "https://github.com/mjpost/sacrebleu",
                "https://github.com/google-research/google-research/tree/master/rouge",
                "https://github.com/Tiiiger/bert_score",
                "https://github.com/krishnap25/mauve",
            ],
            reference_urls=["https://arxiv.org/abs/1804.08771", "https://arxiv.org/abs/1904.09675",
                            "https://arxiv.org/abs/2102.01454"],
        )

    def _compute(
        self,
        predictions,
        references,
        metrics=METRICS,
        bertscore_model=DEFAULT_BERTSCORE_MODEL,
        num_layers=None,
        mauve_featurize_model=DEFAULT_MAUVE_MODEL,
        mauve_pooling="last",
        mauve_num_buckets="auto",
        max_length=512,
        batch_size=32,
        device=None,
        seed=25,
    ):
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = [name for name in metrics if name not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"unknown metric(s) {unknown} in `metrics`; choose from {list(METRICS)}.")
        if mauve_pooling not in ("last", "mean"):
            raise ValueError(f"mauve_pooling {mauve_pooling!r} is not one of 'last', 'mean'.")
        if not predictions:
            raise ValueError("caption_quality needs at least one (prediction, reference) pair.")
        references = _reference_lists(references)
        if any(not refs for refs in references):
            raise ValueError("every prediction needs at least one reference caption.")
        if device is None and ("bertscore" in metrics or "mauve" in metrics):
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"

        results = {}
        if "bleu" in metrics:
            results["bleu"] = bleu(predictions, references)
        if "rougeL" in metrics:
            results["rougeL"] = rouge_l(predictions, references)
        if "bertscore" in metrics:
            results.update(bertscore(predictions, references, bertscore_model, num_layers, batch_size, device))
        if "mauve" in metrics:
            results["mauve"] = mauve_score(predictions, references, mauve_featurize_model, mauve_pooling,
                                           mauve_num_buckets, max_length, batch_size, device, seed)
        return results
