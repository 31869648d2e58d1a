"""The captioner's prompt: a system message and a user message that carries the attributes.

Fine-tuning (`conceptcaps captioner train`) and generation (`conceptcaps captions generate`)
both build their conversations here, so the model sees the same prompt in both. A row is
any mapping with the per-category tag lists `genre`, `mood`, `instrument`, `tempo`
(RUN/distilled.parquet and RUN/attributes.parquet both have them).

    >>> from conceptcaps_pipeline.captions.prompts import user_message
    >>> print(user_message({"genre": ["jazz"], "mood": [], "instrument": ["piano", "double bass"], "tempo": ["slow tempo"]}))
    Describe a music clip with exactly these attributes.
    Genre: jazz
    Instruments: piano, double bass
    Tempo: slow tempo
"""

from __future__ import annotations

from collections.abc import Mapping

# The paper's instruction: a professional description of exactly the given attributes.
# Naming what to leave out targets the failure modes the fine-tune is meant to remove
# (invented instruments, recording-quality remarks, filler).
SYSTEM_PROMPT = (
    "You are a music expert who writes concise, professional descriptions of music clips. "
    "Describe the clip using exactly the attributes you are given: mention every one of them, "
    "and do not add other genres, moods, instruments or tempos, remarks on recording quality, "
    "or filler. Answer with the description only, in two to four sentences."
)

LABELS = (("genre", "Genre"), ("mood", "Mood"), ("instrument", "Instruments"), ("tempo", "Tempo"))


def _tags(row: Mapping, key: str) -> list[str]:
    value = row.get(key)
    return [] if value is None else [str(tag) for tag in value]


def user_message(row: Mapping) -> str:
    """The attribute list as the user turn; categories without tags are left out."""
    lines = ["Describe a music clip with exactly these attributes."]
    for key, label in LABELS:
        tags = _tags(row, key)
        if tags:
            lines.append(f"{label}: {', '.join(tags)}")
    return "\n".join(lines)


def prompt_messages(row: Mapping) -> list[dict[str, str]]:
    """System and user turns for one attribute set (the generation prompt)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(row)},
    ]


def training_example(row: Mapping) -> dict[str, list[dict[str, str]]]:
    """A conversational prompt-completion example; TRL puts the loss on the completion only."""
    return {
        "prompt": prompt_messages(row),
        "completion": [{"role": "assistant", "content": str(row["caption"]).strip()}],
    }
