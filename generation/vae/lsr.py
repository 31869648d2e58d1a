"""An explainable latent space for the tag VAE: attribute-regularised dimensions (AR-VAE).

    conceptcaps vae train --run runs/demo --lsr tempo instrument_count vocal arousal valence
    conceptcaps vae sample --run runs/demo --n 200 --set tempo=0.9 --set arousal=0.2   # fast and calm

Latent space regularisation (Pati & Lerch, "Attribute-based regularization of latent spaces
for variational auto-encoders", AR-VAE; applied to music in MeasureVAE + LSR, arXiv
2308.05496): each chosen attribute of a tag set gets one latent dimension (attribute k ->
dimension k), and training adds, per attribute and mini-batch,

    L_k = mean over pairs (i, j) of | tanh(delta * (z_k[i] - z_k[j])) - sign(a_k[i] - a_k[j]) |

times `gamma` to the beta-VAE loss, so that z_k orders the sets as the attribute does. Rows
whose attribute is undefined (no tempo tag, no mood tag, ...) are left out of that
attribute's term. The attributes and their units are in `ATTRIBUTES`; their data (tempo
order, vocal tags, the mood -> arousal/valence table) is the `attributes` section of the
taxonomy file (generation/data/taxonomy.yaml).

Training writes RUN/vae/lsr.json: the attribute -> dimension table and, per attribute, the
monotone map from attribute units to latent values (isotonic regression of the posterior
means on the attribute over the training split), which `vae sample --set ATTR=VALUE` uses to
fix the dimension. metrics.json gains the interpretability score of Adel et al. as computed
by AR-VAE (per attribute: the latent dimension of highest mutual information with the
attribute, then the R^2 of a linear regression of the attribute on that one dimension;
posterior means of the validation split), for the regularised model and for a plain model
trained with the same settings and seed.

For other tools (the explorer's 2-D pad): `regularised_dims(run)`, `attribute_to_latent`
and `decode_grid(run, dim_x, dim_y, values_x, values_y)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError

logger = logging.getLogger(__name__)

LSR_FILE = "lsr.json"
LSR_FORMAT = 1

# attribute -> (units, what it measures); the data behind each is in the taxonomy's `attributes`
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "tempo": ("ordinal on [0, 1]: slow 0, medium 1/3, medium fast 2/3, fast 1",
              "position of the set's tempo tag in `tempo_order`; undefined without a tempo tag"),
    "instrument_count": ("count of instrument tags",
                         "instrument tags other than voices and `instrumental`; undefined without an instrument tag"),
    "vocal": ("0 (instrumental) or 1 (vocals)",
              "1 with a voice tag, 0 with `instrumental`, undefined with neither"),
    "arousal": ("[0, 1]: calm 0 .. excited 1", "mean arousal of the set's mood tags; undefined without a mood tag"),
    "valence": ("[0, 1]: negative 0 .. positive 1", "mean valence of the set's mood tags; undefined without a mood tag"),
}


@dataclass
class AttributeSpec:
    """The taxonomy's `attributes` section, checked against its tags."""

    tempo_order: list[str]
    vocal_tags: set[str]
    no_vocal_tags: set[str]
    mood_affect: dict[str, tuple[float, float]]
    instrument_tags: set[str]


def attribute_spec(taxonomy) -> AttributeSpec:
    """The checked `attributes` section of a taxonomy; one clear error for each defect."""
    where = f"taxonomy {taxonomy.path}"
    section = taxonomy.attributes or {}
    fix = "add it as in generation/data/taxonomy.yaml (then re-run `conceptcaps distill --force`)"
    for key in ("tempo_order", "vocal_tags", "no_vocal_tags", "mood_affect"):
        if key not in section:
            raise ConceptCapsError(f"{where} has no `attributes.{key}` (needed for latent attributes): {fix}.")
    categories = taxonomy.categories
    tempo_order = [str(t) for t in section["tempo_order"]]
    if sorted(tempo_order) != sorted(categories["tempo"]):
        raise ConceptCapsError(f"{where}: `attributes.tempo_order` {tempo_order} must list every tempo tag "
                               f"{sorted(categories['tempo'])} once, slowest first.")
    for key in ("vocal_tags", "no_vocal_tags"):
        unknown = sorted(set(section[key]) - set(categories["instrument"]))
        if unknown:
            raise ConceptCapsError(f"{where}: `attributes.{key}` holds {unknown}, which are not instrument tags.")
    affect = {}
    for tag, pair in (section["mood_affect"] or {}).items():
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in pair)
        if tag not in categories["mood"] or not ok:
            reason = "is not a mood tag" if tag not in categories["mood"] else "needs [arousal, valence] in [0, 1]"
            raise ConceptCapsError(f"{where}: `attributes.mood_affect` entry {tag!r}: {pair!r} {reason}.")
        affect[str(tag)] = (float(pair[0]), float(pair[1]))
    missing = sorted(set(categories["mood"]) - set(affect))
    if missing:
        raise ConceptCapsError(f"{where}: `attributes.mood_affect` has no [arousal, valence] for mood tag(s) {missing}: "
                               f"add one line per tag.")
    return AttributeSpec(tempo_order, set(section["vocal_tags"]), set(section["no_vocal_tags"]), affect,
                         set(categories["instrument"]))


def attribute_value(name: str, tags: list[str], spec: AttributeSpec) -> float | None:
    """The attribute `name` of one tag set in its units, or None where the set does not define it."""
    tags = set(tags)
    if name == "tempo":
        levels = [spec.tempo_order.index(t) for t in tags if t in spec.tempo_order]
        return levels[0] / (len(spec.tempo_order) - 1) if levels else None
    if name == "instrument_count":
        present = tags & spec.instrument_tags
        return float(len(present - spec.vocal_tags - spec.no_vocal_tags)) if present else None
    if name == "vocal":
        return 1.0 if tags & spec.vocal_tags else 0.0 if tags & spec.no_vocal_tags else None
    if name in ("arousal", "valence"):
        values = [spec.mood_affect[t][0 if name == "arousal" else 1] for t in tags if t in spec.mood_affect]
        return float(np.mean(values)) if values else None
    raise ConceptCapsError(f"unknown latent attribute {name!r}: choose from {list(ATTRIBUTES)}.")


def attribute_matrix(sets: list[list[str]], names: list[str], spec: AttributeSpec) -> np.ndarray:
    """[len(sets), len(names)] attribute values; NaN where a set leaves the attribute undefined."""
    values = [[attribute_value(name, tags, spec) for name in names] for tags in sets]
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64).reshape(
        len(sets), len(names))


def check_lsr_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(ATTRIBUTES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConceptCapsError(f"--lsr {unknown[0]!r} is not a latent attribute{hint}: choose from {list(ATTRIBUTES)}.")
    if len(set(names)) != len(names):
        raise ConceptCapsError(f"--lsr {names}: name each attribute once.")


# -- the regulariser ------------------------------------------------------------------------
def pairwise_order_loss(z, a, delta: float):
    """AR-VAE's attribute loss for one dimension: MAE(tanh(delta * D_z), sign(D_a)) over all pairs of the batch.

    Pairs with equal attributes pull their latents together (sign 0), pairs with different
    ones push them apart in the attribute's order; `delta` sets how far apart is enough.
    """
    import torch

    dz = z[:, None] - z[None, :]
    da = a[:, None] - a[None, :]
    return (torch.tanh(delta * dz) - torch.sign(da)).abs().mean()


class LatentRegulariser:
    """Adds gamma * sum_k L_k to a training batch's loss; k-th attribute on latent dimension k.

    The latent draw z is read at the decoder's input (a forward pre-hook), so the beta-VAE's
    own loss stays as it is and the regulariser sees exactly the z that was decoded.
    """

    def __init__(self, model, names: list[str], train_values: np.ndarray, gamma: float, delta: float):
        import torch

        if len(names) > model.latent_dim:
            raise ConceptCapsError(f"--lsr names {len(names)} attributes but --latent_dim is {model.latent_dim}: "
                                   f"give a latent at least as large.")
        self.names, self.gamma, self.delta = list(names), gamma, delta
        self.values = torch.tensor(train_values, dtype=torch.float32)
        self._z = None
        self._hook = model.decoder.register_forward_pre_hook(self._capture)
        self.terms: list[float] = []

    def _capture(self, module, inputs) -> None:
        self._z = inputs[0]

    def add(self, losses: dict, batch) -> dict:
        """The batch's losses with the regulariser added to "loss" and reported as "lsr"."""
        import torch

        values = self.values[batch]
        total = torch.zeros(())
        for k in range(len(self.names)):
            defined = ~torch.isnan(values[:, k])
            if int(defined.sum()) >= 2:  # one defined row has no pair to order
                total = total + pairwise_order_loss(self._z[defined, k], values[defined, k], self.delta)
        self.terms.append(float(total.detach()))
        return {**losses, "loss": losses["loss"] + self.gamma * total, "lsr": total}

    def epoch_mean(self) -> float | None:
        mean = float(np.mean(self.terms)) if self.terms else None
        self.terms = []
        return mean

    def close(self) -> None:
        self._hook.remove()


# -- scores and maps ----------------------------------------------------------------------------
def posterior_means(model, sets: list[list[str]]) -> np.ndarray:
    import torch
    from conceptcaps_pipeline.vae.model import multi_hot

    model.eval()
    with torch.no_grad():
        return model.encode(multi_hot(sets, model.tags))[0].numpy().astype(np.float64)


def interpretability(latents: np.ndarray, values: np.ndarray, names: list[str], seed: int = 0,
                     regularised: dict[str, int] | None = None) -> dict:
    """Interpretability per attribute (Adel et al., as AR-VAE computes it), and their mean.

    For each attribute, over the rows that define it: the latent dimension with the highest
    mutual information with the attribute (sklearn's `mutual_info_regression`), then the R^2 of
    a linear regression of the attribute on that dimension alone. With `regularised`, also the
    R^2 on the attribute's regularised dimension and whether the two dimensions agree.
    """
    from sklearn.feature_selection import mutual_info_regression

    scores: dict = {}
    for k, name in enumerate(names):
        rows = ~np.isnan(values[:, k])
        a, z = values[rows, k], latents[rows]
        if rows.sum() < 10 or np.ptp(a) == 0:
            scores[name] = {"score": None, "n": int(rows.sum()), "reason": "fewer than 10 rows or a constant attribute"}
            continue
        mi = mutual_info_regression(z, a, random_state=seed)
        dim = int(np.argmax(mi))
        entry = {"score": _r2(z[:, dim], a), "dim": dim, "mutual_information": float(mi[dim]), "n": int(rows.sum())}
        if regularised and name in regularised:
            entry["regularised_dim"] = regularised[name]
            entry["score_on_regularised_dim"] = _r2(z[:, regularised[name]], a)
        scores[name] = entry
    defined = [s["score"] for s in scores.values() if s["score"] is not None]
    scores["mean"] = float(np.mean(defined)) if defined else None
    return scores


def _r2(z: np.ndarray, a: np.ndarray) -> float:
    """R^2 of a linear regression of a on the single latent dimension z."""
    from sklearn.linear_model import LinearRegression

    column = z.reshape(-1, 1)
    return float(LinearRegression().fit(column, a).score(column, a))


def fit_attribute_map(z: np.ndarray, a: np.ndarray) -> dict:
    """The monotone map attribute -> latent value (isotonic regression of z on a), as knots for np.interp."""
    from scipy.stats import spearmanr
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(a, z)
    rho = spearmanr(a, z).statistic if np.ptp(a) > 0 else float("nan")
    return {"attribute": [float(x) for x in iso.X_thresholds_], "latent": [float(y) for y in iso.y_thresholds_],
            "range": [float(a.min()), float(a.max())], "spearman": float(rho), "n": len(a)}


def lsr_record(model, names: list[str], train_sets: list[list[str]], spec: AttributeSpec, gamma: float,
               delta: float, taxonomy_version: str) -> dict:
    """The content of RUN/vae/lsr.json: attribute -> dimension, units, and the fitted attribute -> latent maps."""
    latents = posterior_means(model, train_sets)
    values = attribute_matrix(train_sets, names, spec)
    attributes = {}
    for k, name in enumerate(names):
        rows = ~np.isnan(values[:, k])
        units, meaning = ATTRIBUTES[name]
        attributes[name] = {"dim": k, "units": units, "meaning": meaning,
                            "map": fit_attribute_map(latents[rows, k], values[rows, k])}
    return {"format": LSR_FORMAT, "gamma": gamma, "delta": delta, "taxonomy_version": taxonomy_version,
            "attributes": attributes}


INTERPRETABILITY_TARGET = 0.8  # every regularised attribute, on the validation split
JACCARD_COST_TARGET = 0.02  # validation Jaccard of the plain model minus the regularised one's


def latent_scores(model, taxonomy, sets: dict[str, list[list[str]]], args, lsr: LatentRegulariser | None,
                  scores: dict, retrain) -> tuple[dict, dict | None]:
    """metrics.json additions of `vae train`, and the content of lsr.json (None without --lsr).

    Always: "interpretability" of every attribute on the validation split (the train split when
    there is none). With --lsr: "lsr" with the attribute -> dimension table and, under
    --lsr_compare, the plain model's figures (trained by `retrain`, vae_train's own training,
    in a scratch run with the same settings and seed) and the comparison with the targets.
    """
    if lsr is not None:
        lsr.close()
    if not taxonomy.attributes:
        logger.info("vae train: taxonomy %s has no `attributes` section; interpretability not scored", taxonomy.path)
        return {}, None
    spec = attribute_spec(taxonomy)
    names = list(ATTRIBUTES)
    split = "validation" if sets.get("validation") else "train"
    regularised = {name: k for k, name in enumerate(args.lsr)}
    added = {"interpretability": {
        "split": split,
        **interpretability(posterior_means(model, sets[split]), attribute_matrix(sets[split], names, spec), names,
                           seed=args.seed, regularised=regularised or None),
    }}
    if lsr is None:
        return added, None
    record = lsr_record(model, args.lsr, sets["train"], spec, args.lsr_gamma, args.lsr_delta, taxonomy.version)
    summary: dict = {"attributes": regularised, "gamma": args.lsr_gamma, "delta": args.lsr_delta}
    if args.lsr_compare:
        plain = train_plain(args, retrain)
        jaccard = scores[split]["jaccard"], plain[split]["jaccard"]
        interp = {name: {"regularised": added["interpretability"][name]["score"],
                         "plain": plain["interpretability"][name]["score"]} for name in args.lsr}
        summary["plain"] = plain
        pooled = {}
        if "jaccard_micro" in scores[split] and "jaccard_micro" in plain[split]:  # the paper's pooled definition
            micro = scores[split]["jaccard_micro"], plain[split]["jaccard_micro"]
            pooled = {"jaccard_micro": {"regularised": micro[0], "plain": micro[1], "cost": micro[1] - micro[0]}}
        summary["comparison"] = {
            "split": split,
            "jaccard": {"regularised": jaccard[0], "plain": jaccard[1], "cost": jaccard[1] - jaccard[0]},
            **pooled,
            "interpretability": interp,
            "target": {"interpretability_min": INTERPRETABILITY_TARGET, "jaccard_cost_max": JACCARD_COST_TARGET,
                       "met": all((v["regularised"] or 0) >= INTERPRETABILITY_TARGET for v in interp.values())
                       and jaccard[1] - jaccard[0] <= JACCARD_COST_TARGET},
        }
        logger.info("vae train: latent attributes %s; %s Jaccard %.3f (plain %.3f)", interp, split, *jaccard)
    added["lsr"] = summary
    return added, record


def train_plain(args, retrain) -> dict:
    """Train the same VAE without --lsr in a scratch copy of the run; its train/validation/interpretability scores."""
    import dataclasses
    import json
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="conceptcaps-vae-plain-") as scratch:
        for name in ("distilled.parquet", "taxonomy.json"):
            shutil.copy2(Path(args.run) / name, Path(scratch) / name)
        logger.info("vae train: training a plain VAE with the same settings and seed, for comparison")
        retrain(dataclasses.replace(args, run=scratch, lsr=[], force=True))
        metrics = json.loads((Path(scratch) / "vae" / "metrics.json").read_text())
    return {key: metrics[key] for key in ("train", "validation", "samples", "interpretability") if key in metrics}


# -- reading a trained run ---------------------------------------------------------------------
def load_lsr(run: str | Path) -> dict | None:
    """RUN/vae/lsr.json, or None for a VAE trained without --lsr."""
    from conceptcaps_pipeline.run_dir import read_json

    path = Path(run) / "vae" / LSR_FILE
    if not path.exists():
        return None
    record = read_json(path, fix=f"re-run `conceptcaps vae train --run {run} --lsr ... --force`")
    if not isinstance(record, dict) or record.get("format") != LSR_FORMAT or "attributes" not in record:
        raise ConceptCapsError(f"{path} is not a latent attribute file of format {LSR_FORMAT}: retrain with "
                               f"`conceptcaps vae train --run {run} --lsr ... --force`.")
    return record


def regularised_dims(run: str | Path) -> dict[str, int]:
    """{attribute: latent dimension} of the run's VAE; {} when it was trained without --lsr."""
    record = load_lsr(run)
    return {name: int(entry["dim"]) for name, entry in (record or {"attributes": {}})["attributes"].items()}


def attribute_to_latent(record: dict, name: str, value: float) -> float:
    """The latent value of attribute `name` at `value` (its own units), by the map fitted at training."""
    entry = record["attributes"][name]
    low, high = entry["map"]["range"]
    if not low <= value <= high:
        raise ConceptCapsError(f"--set {name}={value:g}: outside the values seen in training, [{low:g}, {high:g}] "
                               f"({entry['units']}); give a value in that range.")
    return float(np.interp(value, entry["map"]["attribute"], entry["map"]["latent"]))


def latent_to_attribute(record: dict, name: str, latent: float) -> float:
    """The attribute value (its own units) that the fitted map puts at latent value `latent` (clipped to its range)."""
    entry = record["attributes"][name]["map"]
    return float(np.interp(latent, entry["latent"], entry["attribute"]))


def steering(run: str | Path, settings: list[str]) -> dict[int, float]:
    """{latent dimension: value} for `--set ATTR=VALUE ...`, with one clear error per bad setting."""
    record = load_lsr(run)
    if record is None:
        raise ConceptCapsError(f"--set needs a VAE trained with latent attributes; {Path(run) / 'vae'} has none: "
                               f"retrain with `conceptcaps vae train --run {run} --lsr tempo arousal ... --force`.")
    fixed: dict[int, float] = {}
    seen: set[str] = set()
    for setting in settings:
        name, sep, text = setting.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConceptCapsError(f"--set {setting!r}: write ATTRIBUTE=VALUE, e.g. --set tempo=0.9.")
        if name not in record["attributes"]:
            known = list(record["attributes"])
            if name not in ATTRIBUTES:
                raise ConceptCapsError(f"--set {setting!r}: {name!r} is not a latent attribute; this VAE's are {known}.")
            raise ConceptCapsError(f"--set {setting!r}: this VAE was not regularised on {name!r} (its attributes are "
                                   f"{known}); retrain with `conceptcaps vae train --run {run} --lsr {' '.join(known)} "
                                   f"{name} --force` to steer it.")
        if name in seen:
            raise ConceptCapsError(f"--set {name} is given twice: keep one value.")
        seen.add(name)
        try:
            value = float(text)
        except ValueError:
            raise ConceptCapsError(f"--set {setting!r}: {text!r} is not a number "
                                   f"({record['attributes'][name]['units']}).") from None
        if not np.isfinite(value):
            raise ConceptCapsError(f"--set {setting!r}: give a finite number.")
        fixed[int(record["attributes"][name]["dim"])] = attribute_to_latent(record, name, value)
    return fixed


def decode_grid(run: str | Path, dim_x: int, dim_y: int, values_x: list[float], values_y: list[float], *,
                base: list[float] | None = None, threshold: float = 0.5, min_categories: int = 3
                ) -> list[list[list[str]]]:
    """Tag sets over a 2-D grid of two latent dimensions, the others held at `base` (default 0, the prior mean).

    Returns grid with grid[i][j] = the decoded tag set at z[dim_x] = values_x[i], z[dim_y] =
    values_y[j], under the threshold decoding rule of generation/vae/model.py (deterministic: a
    tag is in when its probability reaches `threshold`). Values are latent values; turn
    attribute units into them with `attribute_to_latent(load_lsr(run), name, value)`.
    """
    import torch

    model, taxonomy = load_model(run)
    for dim in (dim_x, dim_y):
        if not 0 <= dim < model.latent_dim:
            raise ConceptCapsError(f"latent dimension {dim} does not exist: the VAE has {model.latent_dim} (0 to "
                                   f"{model.latent_dim - 1}).")
    point = torch.zeros(model.latent_dim) if base is None else torch.tensor(base, dtype=torch.float32)
    if point.shape != (model.latent_dim,):
        raise ConceptCapsError(f"base has {point.numel()} values; the latent has {model.latent_dim}.")
    z = point.repeat(len(values_x) * len(values_y), 1)
    z[:, dim_x] = torch.tensor(values_x, dtype=torch.float32).repeat_interleave(len(values_y))
    z[:, dim_y] = torch.tensor(values_y, dtype=torch.float32).repeat(len(values_x))
    sets = decode_latents(model, taxonomy, z, threshold=threshold, min_categories=min_categories)
    return [sets[i * len(values_y):(i + 1) * len(values_y)] for i in range(len(values_x))]


def decode_latents(model, taxonomy, z, **rule) -> list[list[str]]:
    """Tag sets of latent points, under the decoding rule of generation/vae/model.py."""
    import torch
    from conceptcaps_pipeline.vae.model import decode_sets

    model.eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(model.decode(z))
    return decode_sets(probabilities, model.tags, model.categories, taxonomy, **rule)


def load_model(run: str | Path):
    """(BetaVAE, Taxonomy) of a run, with one clear error when either is missing or does not match."""
    from conceptcaps_pipeline.run_dir import require
    from conceptcaps_pipeline.taxonomy import Taxonomy
    from conceptcaps_pipeline.vae.model import BetaVAE

    run = Path(run)
    vae_dir = require(run, "vae")
    taxonomy_path = require(run, "taxonomy.json")
    taxonomy = Taxonomy.load(taxonomy_path)
    try:
        model = BetaVAE.from_pretrained(str(vae_dir))
    except Exception as err:
        raise ConceptCapsError(f"cannot load the VAE from {vae_dir} ({err}); re-run `conceptcaps vae train --run {run} "
                               f"--force`.") from err
    if list(model.tags) != taxonomy.tags:
        raise ConceptCapsError(f"{vae_dir} was trained on another taxonomy than {taxonomy_path}: retrain with --force.")
    model.eval()
    return model, taxonomy
