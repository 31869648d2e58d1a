"""Remarks on recording quality in a caption ("low quality", "amateur recording", "noisy", "in mono"), standalone.

    from conceptcaps_eval.attribute_coverage.recording_quality import recording_quality_mentions
    recording_quality_mentions("A low quality recording of a jazz song, noisy and in mono.")
    # ['low quality', 'noisy', 'mono']

ConceptCaps describes music, not the recording that carried it: the taxonomy excludes
recording-quality tags and the captioner's system prompt forbids such remarks. MusicCaps
captions are full of them (about 30% of the distilled captions), so the distill stage
removes them from the captions the captioner learns from (generation/taxonomy/cleaning.py
imports the patterns below), and the `attribute_coverage` metric reports how many
generated captions still make one (`recording_quality_rate`). One list serves both.

The patterns are lexical and case-insensitive. They name the recording, not the music:
"distorted electric guitar", "muffled kick" or "white noise" (sounds in the music) are not
remarks on recording quality, while "the audio is muffled" is. Standard library only, so
the metric runs wherever `evaluate` does.
"""

from __future__ import annotations

import re

# Words that soften or stress an adjective ("a bit noisy", "very poor").
DEGREE = r"(?:(?:very|quite|a bit|a little|slightly|rather|really|extremely|kind of|pretty|fairly|so|too|also|overall|somewhat|super|generally|relatively|incredibly)\s+)*"
# Adjectives that judge a recording as bad (or grade it) when they qualify audio, sound or recording.
BAD = r"(?:low|lower|poor|poorer|bad|inferior|average|mediocre|terrible|awful|lousy|subpar|sub-par|horrible|not (?:very )?good|not great|decent)"
MEDIUM = r"(?:audio|sound|recording|sonic|music|video)"
# "the recording", "this audio", "overall the sound": the clip as a whole, not "the guitar sound".
SUBJECT = r"\b(?:the|this|its|overall,? the|whole|entire) (?:overall |whole |entire )?"

# (name, pattern): each one a kind of remark on the recording rather than on the music.
PATTERNS: tuple[tuple[str, str], ...] = (
    # "low quality", "poor audio quality", "the audio quality is ...", "quality of the recording"
    ("quality", rf"\b{BAD}[- ](?:{MEDIUM}[- ])?quality\b"),
    ("quality", r"\b(?:audio|sound|recording|sonic|production)[- ]quality\b"),
    ("quality", rf"\bquality of (?:the )?(?:{MEDIUM}|song|clip|track)\b"),
    ("quality", r"\bof (?:very |rather |quite |a )*(?:low|poor|bad|inferior)(?:er)? quality\b"),
    ("low fidelity", r"\b(?:low|poor)[- ]fidelity\b"),
    # "amateur recording", "sounds amateurish", "recorded amateurly"
    ("amateur", r"\bamateur(?:ish(?:ly)?|ly)?\b"),
    ("noisy", r"\bnoisy\b"),
    ("mono", r"\bmono\b"),
    # "poor audio", "bad sound", "the audio is very poor", "the recording is muffled"
    ("poor audio", rf"\b(?:poor|bad|inferior|terrible|awful|lousy|horrible) {MEDIUM}\b"),
    ("poor audio", (rf"{SUBJECT}(?:audio|recording|sound)(?: itself)? (?:is|was|sounds|seems) {DEGREE}"
                   rf"(?:{BAD}|muffled|muddy|crushed|blown out|clipping|crackly|not (?:very )?clear)\b")),
    ("poor audio", rf"{SUBJECT}(?:audio|recording)(?: itself)? (?:is|was|sounds|seems) {DEGREE}distorted\b"),
    # "a home recording", "recorded with a phone": how the clip was captured
    ("home recording", r"\bhome[- ](?:recording|recorded|video)\b"),
    ("phone recording", (r"\b(?:recorded|filmed|captured) (?:\w+ )?(?:with|on|using|through|by|from) (?:a |an |the |some )?"
                        r"(?:\w+ )?(?:phone|smartphone|cellphone|mobile)\b")),
    ("phone recording", r"\b(?:phone|smartphone|mobile) recording\b"),
)
PATTERN = re.compile("|".join(f"(?:{p})" for _, p in PATTERNS), re.IGNORECASE)
_NAMED = [(name, re.compile(p, re.IGNORECASE)) for name, p in PATTERNS]


def recording_quality_mentions(text: str) -> list[str]:
    """The remarks on recording quality in `text` (the matched phrases, lower case, in order)."""
    return [m.group(0).lower() for m in PATTERN.finditer(text or "")]


def mentions_recording_quality(text: str) -> bool:
    """Whether `text` remarks on recording quality."""
    return PATTERN.search(text or "") is not None


def recording_quality_kinds(text: str) -> list[str]:
    """Which kinds of remark `text` makes ("quality", "noisy", "mono", ...), each once, in PATTERNS order."""
    return list(dict.fromkeys(name for name, pattern in _NAMED if pattern.search(text or "")))
