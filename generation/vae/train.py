"""Train the beta-VAE on the distilled attribute sets and score it.

    conceptcaps vae train --run runs/demo
    conceptcaps vae train --run runs/demo --epochs 300 --lr 1e-4 --beta 0.25
    conceptcaps vae train --run runs/demo --lsr tempo instrument_count vocal arousal valence   # docs/latent.md

Resumable: after each epoch the weights, optimiser and random states go to RUN/.vae_train.checkpoint
(atomically); the same command after a crash, even `kill -9`, continues from the last finished epoch
and ends with the same model as an uninterrupted run.

Reads RUN/distilled.parquet and RUN/taxonomy.json. Writes RUN/vae/ (model.safetensors +
config.json via PyTorchModelHubMixin, loss curve and metrics.json) and
RUN/manifests/vae_train.json. Metrics come from the `eval/vae_metrics` module: Jaccard and
Hamming loss of reconstructions on the validation and train splits under two labelled
definitions (`threshold_0.5`: the paper's plain threshold, with the pooled `jaccard_micro` of
its Table 1; `decoding_rule`: this pipeline's rule, with the mean `jaccard`), diversity of
1,000 prior samples, the cosine between their tag co-occurrence and the training set's, and
the distance of their set sizes from the data's, beside the same figures for a random-tag
control. RUN/vae/set_sizes.json holds the training sets' per-category sizes, which
`vae sample` draws from (generation/vae/sizes.py).
With `--lsr`, chosen attributes of the tag sets get one latent dimension each
(generation/vae/lsr.py): RUN/vae/lsr.json holds their maps, and metrics.json the
interpretability of this model and of a plain one trained alike (`--lsr_compare`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import atomic_dir, finished, require, stage, write_manifest

logger = logging.getLogger(__name__)

PAPER_VAE_METRICS = {"jaccard": 0.716, "hamming_loss": 0.005, "diversity": 96.03, "cooccurrence_cosine": 0.808}


@dataclass
class VaeTrainArguments:
    run: str = field(metadata={"help": "Run directory holding distilled.parquet and taxonomy.json."})
    hidden_dim: int = field(default=1024, metadata={"help": "Hidden layer width (paper: 1024)."})
    latent_dim: int = field(default=256, metadata={"help": "Latent size (paper: 256)."})
    beta: float = field(default=0.25, metadata={"help": "KL weight; higher collapsed onto popular sets in the paper."})
    lr: float = field(default=6e-5, metadata={"help": "Adam learning rate (paper: 6e-5)."})
    epochs: int = field(default=150, metadata={"help": "Passes over the training split (paper: 150)."})
    batch_size: int = field(default=32, metadata={"help": "Mini-batch size."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, shuffling and sampling."})
    threshold: float = field(default=0.5, metadata={"help": "Decoding threshold on tag probabilities."})
    min_categories: int = field(default=3, metadata={"help": "Decoded sets cover at least this many categories."})
    diversity_samples: int = field(default=1000, metadata={"help": "Prior samples for diversity/co-occurrence."})
    num_threads: int = field(
        default=1,
        metadata={"help": "Torch CPU threads (0: as the command chose from the free cores). One suits this small "
                          "model: more threads on shared cores slow it down many times over."},
    )
    lsr: list[str] = field(
        default_factory=list,
        metadata={"help": "Latent attributes to regularise, one latent dimension each (AR-VAE, generation/vae/lsr.py): "
                          "tempo, instrument_count, vocal, arousal, valence. Off by default."},
    )
    lsr_gamma: float = field(default=10.0, metadata={"help": "Weight of the attribute loss (AR-VAE's gamma, 10)."})
    lsr_delta: float = field(default=1.0, metadata={"help": "Spread of the attribute loss: tanh(delta * latent "
                                                            "difference) (AR-VAE's delta, 1)."})
    lsr_compare: bool = field(
        default=True,
        metadata={"help": "With --lsr, also train a plain VAE with the same settings and seed and record its Jaccard "
                          "and interpretability in metrics.json (doubles the training time)."},
    )
    force: bool = field(default=False, metadata={"help": "Retrain even if RUN/vae is up to date."})


def load_metric(name: str):
    """A ConceptCaps `evaluate` module (eval/<name>, installed as conceptcaps_eval), loaded by path."""
    from conceptcaps_eval import load_metric as load_conceptcaps_metric

    return load_conceptcaps_metric(name)


# The two Jaccard definitions, side by side in metrics.json so that the paper's Table 1 is
# compared like for like: the paper thresholds the decoder's probabilities at 0.5 and pools
# intersections and unions over all sets; the pipeline's own figure uses its decoding rule
# (generation/vae/model.py) and averages the per-set Jaccard.
JACCARD_DEFINITIONS = {
    "threshold_0.5": "paper's definition: tags with probability >= 0.5, no other rule; jaccard_micro is the pooled "
                     "(micro) Jaccard sum|P&R| / sum|P|R| that the paper's 0.716 reports",
    "decoding_rule": "this pipeline's decoding rule (threshold 0.5, category caps from the data, no contradictory pair, "
                     ">= min_categories categories); jaccard is the mean Jaccard per set",
}


def score_vae(model, taxonomy, splits: dict[str, list[list[str]]], train_sets, args) -> dict:
    """Reconstruction metrics per split (both Jaccard definitions), then diversity, co-occurrence
    and size distances of prior samples (sizes drawn from the data) and of a random control."""
    import torch
    from conceptcaps_pipeline.vae.model import multi_hot, reconstruct, sample_sets
    from conceptcaps_pipeline.vae.sizes import SetSizes, random_sets

    sizes = SetSizes.from_sets(train_sets, taxonomy)
    rule = {"threshold": args.threshold, "min_categories": args.min_categories,
            "max_per_category": sizes.summary()["max_per_category"]}
    metric = load_metric("vae_metrics")
    scores = {"jaccard_definitions": JACCARD_DEFINITIONS}
    for split, sets in splits.items():
        with torch.no_grad():
            model.eval()
            probabilities = torch.sigmoid(model.decode(model.encode(multi_hot(sets, model.tags))[0]))
        plain = [[t for t, p in zip(model.tags, row) if p >= 0.5] for row in probabilities.tolist()]
        by_rule = metric.compute(predictions=reconstruct(model, sets, taxonomy, **rule), references=sets,
                                 labels=model.tags)
        by_threshold = metric.compute(predictions=plain, references=sets, labels=model.tags)
        # Split-level keys stay the decoding rule's (what earlier runs reported); both definitions are labelled.
        scores[split] = {**by_rule, "decoding_rule": by_rule, "threshold_0.5": by_threshold}
    samples = sample_sets(model, taxonomy, args.diversity_samples, seed=args.seed + 1, sizes=sizes, **rule)
    control = random_sets(taxonomy, args.diversity_samples, seed=args.seed + 1, sizes=sizes,
                          min_categories=args.min_categories)
    categories = [taxonomy.category_of[t] for t in model.tags]
    for name, drawn in (("samples", samples), ("random_control", control)):
        scores[name] = {
            key: value
            for key, value in metric.compute(
                predictions=drawn[:1], references=drawn[:1], labels=model.tags, samples=drawn,
                reference_sets=train_sets, categories=categories,
            ).items()
            if key not in ("jaccard", "jaccard_micro", "hamming_loss")
        }
        scores[name]["n"] = len(drawn)
    scores["samples"]["decoding"] = "per-category sizes drawn from the training sets (generation/vae/sizes.py)"
    scores["random_control"]["decoding"] = "uniform tags under the same rules and sizes (no model)"
    scores["set_sizes"] = sizes.summary()
    scores["paper"] = PAPER_VAE_METRICS
    return scores


def check_arguments(args: VaeTrainArguments) -> None:
    checks = [
        (args.hidden_dim >= 1 and args.latent_dim >= 1, (f"--hidden_dim {args.hidden_dim} and --latent_dim "
                                                         f"{args.latent_dim}: give at least 1.")),
        (args.beta >= 0, f"--beta {args.beta}: give 0 or more."),
        (args.lr > 0, f"--lr {args.lr}: give a positive learning rate, e.g. 6e-5."),
        (args.epochs >= 1, f"--epochs {args.epochs}: give at least 1."),
        (args.batch_size >= 1, f"--batch_size {args.batch_size}: give at least 1."),
        (0 < args.threshold < 1, f"--threshold {args.threshold}: give a probability in (0, 1)."),
        (1 <= args.min_categories <= 4, f"--min_categories {args.min_categories}: give 1 to 4."),
        (args.diversity_samples >= 1, f"--diversity_samples {args.diversity_samples}: give at least 1."),
        (args.num_threads >= 0, f"--num_threads {args.num_threads}: give 0 (torch's default) or more."),
        (args.lsr_gamma >= 0 and args.lsr_delta > 0, (f"--lsr_gamma {args.lsr_gamma} and --lsr_delta "
                                                      f"{args.lsr_delta}: give gamma >= 0 and delta > 0.")),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)
    if args.lsr:
        from conceptcaps_pipeline.vae.lsr import check_lsr_names

        check_lsr_names(args.lsr)


@stage("vae_train", check=check_arguments)
def train_vae(args: VaeTrainArguments) -> dict:
    """Train, save to RUN/vae, score; returns the stage manifest."""
    import torch
    from conceptcaps_pipeline.taxonomy import Taxonomy
    from conceptcaps_pipeline.vae.model import BetaVAE, multi_hot
    from conceptcaps_pipeline.vae.sizes import SetSizes
    from tqdm.auto import tqdm

    started = time.time()
    run = Path(args.run)
    distilled_path = require(run, "distilled.parquet")
    taxonomy_path = require(run, "taxonomy.json")
    inputs = {"distilled": distilled_path, "taxonomy": taxonomy_path}
    out = run / "vae"
    outputs = [out / "model.safetensors", out / "metrics.json", *([out / "lsr.json"] if args.lsr else [])]
    done = finished(run, "vae_train", args, inputs, outputs)
    if done and not args.force:
        logger.info("vae train: %s is up to date; --force retrains", out)
        return done

    from conceptcaps_pipeline.run_dir import read_table

    taxonomy = Taxonomy.load(taxonomy_path)
    table = read_table(distilled_path, ["aspect_list", "split"], fix=f"re-run `conceptcaps distill --run {run} --force`")
    rows = table.to_pylist()
    sets = {split: [list(r["aspect_list"]) for r in rows if r["split"] == split] for split in ("train", "validation")}
    if not sets["train"]:
        raise ConceptCapsError(f"{distilled_path} has no train rows: re-run distill with a smaller --validation_fraction.")

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    tags = taxonomy.tags
    # Weights, gradients and Adam's two moments (4 x float32) of the encoder and decoder, and the prior samples
    # the scores draw: checked before anything is allocated.
    from conceptcaps_pipeline.run_dir import check_memory

    weights = 2 * len(tags) * args.hidden_dim + 3 * args.hidden_dim * args.latent_dim
    check_memory(16 * weights + 8 * args.batch_size * (args.hidden_dim + len(tags)) + 64 * args.diversity_samples *
                 len(tags), f"vae train with --hidden_dim {args.hidden_dim} --latent_dim {args.latent_dim} "
                 f"--batch_size {args.batch_size} --diversity_samples {args.diversity_samples}",
                 "give smaller sizes (the paper: 1024, 256, 32, 1000)")
    model = BetaVAE(tags, [taxonomy.category_of[t] for t in tags], args.hidden_dim, args.latent_dim, args.beta)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_train = multi_hot(sets["train"], tags)
    x_val = multi_hot(sets["validation"], tags) if sets["validation"] else x_train[:0]
    lsr = None
    if args.lsr:  # attribute-regularised latent dimensions (generation/vae/lsr.py)
        from conceptcaps_pipeline.vae.lsr import LatentRegulariser, attribute_matrix, attribute_spec

        lsr = LatentRegulariser(model, args.lsr, attribute_matrix(sets["train"], args.lsr, attribute_spec(taxonomy)),
                                args.lsr_gamma, args.lsr_delta)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    # Resume after a kill: the checkpoint of the last finished epoch (same arguments and inputs) restores the
    # weights, Adam's moments and both random generators, so the result equals an uninterrupted run's.
    checkpoint = run / CHECKPOINT
    key = checkpoint_key(args, inputs)
    state = load_checkpoint(checkpoint, key)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        logger.info("vae train: resuming after epoch %d of %d (%s)", len(history), args.epochs, checkpoint)
    bar = tqdm(range(len(history), args.epochs), initial=len(history), total=args.epochs, desc="vae train", unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size]
            losses = model.loss(x_train[batch], generator)
            if lsr is not None:
                losses = lsr.add(losses, batch)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            total, batches = total + losses["loss"].item(), batches + 1
        model.eval()
        with torch.no_grad():
            val = model.loss(x_val, torch.Generator().manual_seed(args.seed))["loss"].item() if len(x_val) else None
        history.append({"epoch": epoch + 1, "train_loss": total / batches, "validation_loss": val,
                        **({"lsr_loss": lsr.epoch_mean()} if lsr is not None else {})})
        bar.set_postfix(train=f"{total / batches:.3f}", val=f"{val:.3f}" if val is not None else "-")
        save_checkpoint(checkpoint, {"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                                     "history": history})

    scores = score_vae(model, taxonomy, {k: v for k, v in sets.items() if v}, sets["train"], args)
    from conceptcaps_pipeline.vae.lsr import latent_scores

    latent, lsr_file = latent_scores(model, taxonomy, sets, args, lsr, scores, retrain=train_vae)
    scores.update(latent)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        SetSizes.from_sets(sets["train"], taxonomy).save(tmp)  # what `vae sample` draws set sizes from
        if lsr_file is not None:
            (tmp / "lsr.json").write_text(json.dumps(lsr_file, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
        (tmp / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    logger.info("vae train: validation %s; samples %s", scores.get("validation"), scores["samples"])
    counts = {
        "train_sets": len(sets["train"]), "validation_sets": len(sets["validation"]), "tags": len(tags),
        "first_train_loss": history[0]["train_loss"] if history else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
    }
    manifest = write_manifest(run, "vae_train", args, inputs=inputs, counts=counts, started=started,
                              extra={"metrics": scores})
    checkpoint.unlink(missing_ok=True)  # the work is published: nothing to resume
    return manifest


# -- resumable training ------------------------------------------------------------------------------
CHECKPOINT = ".vae_train.checkpoint"  # in RUN, hidden: not an artifact, only what a killed training resumes from


def checkpoint_key(args: VaeTrainArguments, inputs: dict) -> str:
    """What a checkpoint belongs to: the training's arguments (but run, force) and its inputs' hashes."""
    import dataclasses
    import hashlib

    from conceptcaps_pipeline.run_dir import file_sha256

    arguments = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("run", "force", "num_threads")}
    record = {"arguments": arguments, "inputs": {k: file_sha256(p) for k, p in sorted(inputs.items())}}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary name, then rename: a kill leaves the previous epoch's checkpoint whole."""
    import io

    import torch
    from conceptcaps_pipeline.run_dir import atomic_path

    # Serialised in memory, then written by Python: torch.save's own writer reports a full disk as a RuntimeError
    # ("unexpected pos"), which hides ENOSPC; Python's write raises the OSError the CLI turns into one line.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at `path` if it belongs to this training (`key`), else None (it is then overwritten)."""
    import torch
    from conceptcaps_pipeline.run_dir import remove_leftovers

    remove_leftovers(path.parent, [path.name])  # a checkpoint whose write was interrupted
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint costs the epochs it held, nothing else
        logger.warning("vae train: ignoring the unreadable checkpoint %s (%s); starting from epoch 0", path,
                       type(err).__name__)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        logger.info("vae train: %s belongs to other settings or inputs; starting from epoch 0", path)
        return None
    return state
