"""The beta-VAE over multi-hot taxonomy vectors, and the rule that decodes it to tag sets.

Architecture (paper): D -> hidden -> (mu, logvar) in R^latent; decoder latent -> hidden
-> D logits. Saved and loaded with huggingface_hub's `PyTorchModelHubMixin`
(`model.safetensors` + `config.json`), so `BetaVAE.from_pretrained("RUN/vae")` and
`push_to_hub` work; the config carries the tag vocabulary and category of each tag.

Decoding rule (`decode_sets`), applied to the decoder's probabilities p:
  1. required tags are chosen first; excluded tags get p = 0;
  2. the other tags are visited by decreasing p; a tag with p >= `threshold` is added
     unless its category is full (`max_per_category`: genre 2, mood 3, instrument 4,
     tempo 1) or it contradicts a chosen tag (taxonomy `contradictions`);
  3. while fewer than `min_categories` categories are covered, the most probable
     admissible tag of an uncovered category is added.
So every set has at most one tempo tag, no contradictory pair, and >= min_categories
categories (when the constraints allow it; otherwise sampling raises).

Sampling (`sample_sets(..., sizes=SetSizes)`, the default of `conceptcaps vae sample`) fixes
how many tags of each category a set gets instead: per-category sizes drawn from the
training sets (generation/vae/sizes.py, which says why), then step 2 with those sizes as
the category limits and no threshold, i.e. the k most probable admissible tags per category.
Reconstruction keeps the threshold (the true size is unknown to the decoder).
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

DEFAULT_MAX_PER_CATEGORY = {"genre": 2, "mood": 3, "instrument": 4, "tempo": 1}


class BetaVAE(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="conceptcaps",
    tags=["conceptcaps", "beta-vae", "music-tags"],
    repo_url="https://arxiv.org/abs/2601.14157",
):
    """Fully connected beta-VAE; `tags`/`categories` name the D input positions."""

    def __init__(
        self,
        tags: list[str],
        categories: list[str],
        hidden_dim: int = 1024,
        latent_dim: int = 256,
        beta: float = 0.25,
    ):
        super().__init__()
        self.tags, self.categories = list(tags), list(categories)
        self.beta = beta
        self.latent_dim = latent_dim
        dim = len(tags)
        self.encoder = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = False, **kwargs):
        """A local folder is read here: huggingface_hub's loader prints "Loading weights from local
        directory" (a bare print, not a log record) on every local load; Hub ids load as usual."""
        import inspect
        import os

        if not os.path.isdir(model_id):
            return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)
        hub_options = set(inspect.signature(PyTorchModelHubMixin._from_pretrained).parameters)
        model = cls(**{k: v for k, v in kwargs.items() if k not in hub_options})
        return cls._load_as_safetensor(model, os.path.join(model_id, "model.safetensors"), map_location, strict)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)  # clamp keeps exp(logvar) finite early in training

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # logits

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        logits = self.decode(mu + eps * (0.5 * logvar).exp())
        return logits, mu, logvar

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-example mean of BCE (summed over tags) + beta * KL(q(z|x) || N(0, I))."""
        logits, mu, logvar = self(x, generator)
        reconstruction = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
        return {"loss": reconstruction + self.beta * kl, "reconstruction": reconstruction, "kl": kl}


def decode_sets(
    probabilities: torch.Tensor,
    tags: list[str],
    categories: list[str],
    taxonomy,
    *,
    threshold: float = 0.5,
    min_categories: int = 3,
    max_per_category: dict[str, int] | None = None,
    require: list[str] = (),
    exclude: list[str] = (),
    sizes: list[dict[str, int]] | None = None,
) -> list[list[str]]:
    """Apply the decoding rule of the module docstring to a batch of probability rows. With
    `sizes` (one {category: count} per row), row i gets the sizes[i][c] most probable
    admissible tags of each category c, whatever their probability."""
    limits = {**DEFAULT_MAX_PER_CATEGORY, **(max_per_category or {})}
    rows = probabilities.tolist()
    if sizes is not None and len(sizes) != len(rows):
        raise ValueError(f"{len(sizes)} size patterns for {len(rows)} probability rows: give one per row.")
    return [
        _decode_row(row, tags, categories, taxonomy, threshold if sizes is None else 0.0, min_categories,
                    limits if sizes is None else sizes[i], list(require), set(exclude))
        for i, row in enumerate(rows)
    ]


def _decode_row(row, tags, categories, taxonomy, threshold, min_categories, limits, require, excluded) -> list[str]:
    """The decoding rule for one row of probabilities (see the module docstring)."""
    chosen: list[str] = list(require)
    per_category = {c: sum(1 for t in chosen if taxonomy.category_of[t] == c) for c in limits}
    order = sorted(range(len(tags)), key=lambda i: -row[i])

    def admissible(i: int) -> bool:
        tag = tags[i]
        return (
            tag not in excluded
            and tag not in chosen
            and per_category[categories[i]] < limits[categories[i]]
            and taxonomy.contradiction_in(set(chosen) | {tag}) is None
        )

    def add(i: int) -> None:
        chosen.append(tags[i])
        per_category[categories[i]] += 1

    for i in order:
        if row[i] < threshold or all(per_category[c] >= limits[c] for c in limits):
            break  # below the threshold, or every category full: nothing more can be added
        if admissible(i):
            add(i)
    for i in order:
        if sum(1 for n in per_category.values() if n) >= min_categories:
            break
        if per_category[categories[i]] == 0 and admissible(i):
            add(i)
    return [t for t in tags if t in chosen]  # taxonomy order, stable


def multi_hot(sets: list[list[str]], tags: list[str]) -> torch.Tensor:
    index = {t: i for i, t in enumerate(tags)}
    x = torch.zeros(len(sets), len(tags))
    for row, tag_set in enumerate(sets):
        for tag in tag_set:
            x[row, index[tag]] = 1.0
    return x


@torch.no_grad()
def kl_per_dimension(model: BetaVAE, sets: list[list[str]]):
    """Mean KL(q(z_d | x) || N(0, 1)) of each latent dimension over `sets`: a float64 numpy array, in nats.

    The dimensions with the most KL are the ones the VAE uses most (`vae explain`, `explore`).
    """
    mu, logvar = model.encode(multi_hot(sets, model.tags))
    return (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).mean(0).double().numpy()


@torch.no_grad()
def reconstruct(model: BetaVAE, sets: list[list[str]], taxonomy, **rule) -> list[list[str]]:
    """Encode to the posterior mean, decode, apply the decoding rule (deterministic)."""
    model.eval()
    mu, _ = model.encode(multi_hot(sets, model.tags))
    return decode_sets(torch.sigmoid(model.decode(mu)), model.tags, model.categories, taxonomy, **rule)


@torch.no_grad()
def sample_sets(
    model: BetaVAE,
    taxonomy,
    n: int,
    seed: int,
    *,
    require: list[str] = (),
    exclude: list[str] = (),
    temperature: float = 1.0,
    fixed: dict[int, float] | None = None,
    sizes=None,
    chunk_size: int = 1024,
    **rule,
) -> list[list[str]]:
    """Draw n tag sets. With `require`, z comes from q(z | x_seed), x_seed = the required
    tags (the paper's conditional sampling); otherwise from the prior N(0, I). `fixed`
    ({dimension: value}) pins latent dimensions, e.g. regularised ones (generation/vae/lsr.py).
    With `sizes` (a conceptcaps_pipeline.vae.sizes.SetSizes), each set gets per-category sizes drawn
    from the data (after z, from the same seeded generator); otherwise the threshold rule. Sets are
    decoded `chunk_size` at a time: memory is bounded by the chunk, not by n."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, model.latent_dim), generator=generator) * temperature
    if require:
        mu, logvar = model.encode(multi_hot([list(require)], model.tags))
        z = mu + eps * (0.5 * logvar).exp()
    else:
        z = eps
    for dim, value in (fixed or {}).items():
        z[:, dim] = value
    drawn = None if sizes is None else sizes.draw(n, generator, require=list(require), taxonomy=taxonomy)
    # Why chunks: the decoded probabilities are n x tags floats (~9 KB a set: 2.4 GB at 243k sets); z and
    # the sizes are drawn for all n first, so the sets are the same whatever the chunk.
    sets = []
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        sets += decode_sets(
            torch.sigmoid(model.decode(z[start:stop])), model.tags, model.categories, taxonomy,
            require=list(require), exclude=list(exclude), sizes=None if drawn is None else drawn[start:stop], **rule
        )
    return sets
