"""Remove remarks on recording quality from captions, keeping the musical content and the grammar.

    >>> from conceptcaps_pipeline.taxonomy.cleaning import clean_caption
    >>> clean_caption("This is a low quality recording of a jazz song. The recording quality is poor.")
    'This is a recording of a jazz song.'
    >>> clean_caption("The recording is noisy and in mono, but it sounds passionate and upbeat.")
    'It sounds passionate and upbeat.'
    >>> clean_caption("It sounds fun and emotional, but also noisy and kind of chaotic.")
    'It sounds fun and emotional, but also kind of chaotic.'

MusicCaps annotators describe the recording as well as the music ("The low quality recording
features ...", "It is noisy and in mono"). ConceptCaps captions describe music only (the
taxonomy excludes these tags; the captioner's system prompt forbids the remarks), so the
distill stage cleans the captions the captioner learns from. What counts as a remark is the
pattern list of the attribute_coverage metric (`conceptcaps_eval.attribute_coverage.
recording_quality`), the same list that measures how often generated captions still make one.

Cleaning works sentence by sentence, from the smallest edit up:
  1. adjectives of a recording noun go ("a low quality, noisy recording of" -> "a recording of");
     "with (a) poor audio quality" phrases go; "noisy" before another noun goes;
  2. the sentence is cut into clauses at conjunctions that start one (", but", "while",
     "and it ...", "as the recording ..."); in a clause with a remark, the remark is taken out of
     its list of predicates ("It sounds fun, noisy and warm" -> "It sounds fun and warm"); a
     clause with nothing left to say, or whose remark is not a list item, goes whole;
  3. a sentence that still makes a remark, or has nothing left but "This is a recording.", goes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from conceptcaps_eval.attribute_coverage.recording_quality import (
    BAD,
    DEGREE,
    mentions_recording_quality,
    recording_quality_kinds,
)

_DEG = DEGREE
# Adjectives that say a recording is bad, as they qualify a noun or stand in a list of predicates.
_QUALITY = rf"(?:{BAD}[- ](?:audio[- ]|sound[- ]|recording[- ])?quality|(?:low|poor)[- ]fidelity)"
_ADJECTIVE = rf"(?:{_DEG}(?:{_QUALITY}|amateur(?:ish)?|noisy|mono|home))"
_RECORDING_NOUN = r"(?:recordings?|audio|video|clip|footage|song|track|music)"
# 1. "a low quality, noisy recording" -> "a recording" (the article is fixed for the next word)
_ADJECTIVES_OF_NOUN = re.compile(
    rf"\b(?P<article>an?|the|this|its)?(?P<space>\s*)(?:{_ADJECTIVE}(?:,?\s+(?:and\s+)?|\s+))+(?P<noun>{_RECORDING_NOUN})\b",
    re.IGNORECASE,
)
_WITH_QUALITY = re.compile(
    rf",?\s+(?:(?:and|but|which|that)\s+(?:it\s+)?(?:has|had)|(?:and\s+|but\s+)?(?:with|having))\s+(?:an?\s+)?{_DEG}"
    rf"{_QUALITY}(?:\s+(?:audio|sound|recording))?(?:\s+(?:issues?|problems?))?(?:\s+(?:in general|overall|throughout))?"
    r"(?=\s*(?:[,.;!?]|$|(?:and|but|while|as|which|that|with|due|so|since)\b))",
    re.IGNORECASE,
)
# "The low quality hip hop song", "an amateur flute cover": the adjective goes wherever it qualifies a noun.
_ATTRIBUTIVE = re.compile(
    rf"\b(?P<article>an?|the|this|its)\s+{_DEG}(?:{_QUALITY}|amateur|home|noisy|mono),?\s+"
    r"(?!(?:and|but|or|is|was|of|in|as|while|with|since|so|to|that|which|it|issues?|problems?|production|microphones?|mics?|\w+ing)\b)"
    r"(?P<next>[a-z])",
    re.IGNORECASE,
)
# "an amateur playing tambourine": a person, not a recording.
_AMATEUR_PERSON = re.compile(r"\ban amateur (?=\w+ing\b)", re.IGNORECASE)
_NOISY_BEFORE_NOUN = re.compile(
    r"(?:,\s+|\s+and\s+)?\b(?:noisy|mono)\s+(?:sounding\s+)?(?!(?:and|but|or|in|as|while|with|since|so|though|even|to|it|the|,)\b)"
    r"(?=[a-z])",
    re.IGNORECASE,
)
# 2. Where a new clause starts: punctuation with a conjunction, or a conjunction before a subject and verb.
_SUBJECT_VERB = (
    r"(?:(?:it|this|there|they|he|she|you|we)\s+|(?:the|its|this|that|his|her|their|a|an)\s+(?:[\w'-]+\s+){0,6}?)"
    r"(?:(?:still|also|really|probably|just|only|then|clearly|certainly|definitely)\s+)?"
    r"(?:is|was|are|were|sounds?|has|have|had|can|could|seems?|features?|contains?|consists?|plays?|gives?)\b"
)
_CLAUSE_START = re.compile(
    r"(?:\s*;\s*|\s+-\s+|,\s+(?:and|but|while|whereas|as|since|so|although|though|even though|which|yet|"
    rf"despite|regardless|probably because|because)\s+|,\s+(?={_SUBJECT_VERB})|\s+(?:but|while|whereas|although|even though|since|"
    rf"because|due to|despite)\s+|\s+(?:and|as|so)\s+(?={_SUBJECT_VERB}))",
    re.IGNORECASE,
)
_COPULA = re.compile(
    r"^(?P<head>.*?\b(?:is|was|are|were|sounds?|seems?|feels?|becomes?)(?:\s+(?:also|overall|still))*)\s+(?P<rest>.+)$",
    re.IGNORECASE,
)
_LIST_SPLIT = re.compile(r"(\s*,\s*(?:and\s+|but\s+)?|\s+(?:and|but)\s+)", re.IGNORECASE)  # keeps the separators
_LINKING = r"(?:(?:and|but|also|therefore|thus|so|hence|then|overall|yet)\s+)*"
_ITEM = re.compile(
    rf"^{_LINKING}{_DEG}(?:{_QUALITY}|amateur(?:ish)?|noisy|(?:in\s+)?mono|of\s+{_DEG}{_QUALITY}|"
    rf"(?:poorly|badly)\s+recorded|muffled|muddy|crushed|(?:an?\s+)?{_ADJECTIVE}(?:\s+and\s+{_ADJECTIVE})*\s+"
    rf"(?:{_RECORDING_NOUN}|production))"
    r"(?:\s+(?:itself|too|as well|overall))?$",
    re.IGNORECASE,
)
_DANGLING = re.compile(r"(?:[\s,;-]+|\b(?:and|but|or|therefore|thus|so|also|overall|as|while|yet|especially|mostly|"
                       r"probably|likely|maybe|perhaps|because|since)\b)+$", re.IGNORECASE)
_LEADING = re.compile(
    r"^(?:[\s,;-]+|(?:and|but|while|whereas|as|since|so|although|though|even though|which|yet|also|despite|"
    r"regardless|probably because|because|due to)\b\s*)+",
    re.IGNORECASE,
)
# A clause (or sentence) that says nothing once the remark is gone.
_EMPTY = re.compile(
    r"^(?:overall,?\s+)?(?:it|this|that|(?:the|this|that|its)\s+(?:whole\s+|overall\s+)?(?:recording|audio|sound|song|"
    r"music|clip|track|video)(?:\s+itself)?)(?:\s+(?:is|was|sounds?|seems?)|'s)(?:\s+(?:also|overall|still|to be|of))*"
    r"(?:\s+(?:an?|the)\s+(?:live\s+)?(?:recording|audio|video|clip|track)(?:\s+of\s+(?:an?\s+)?(?:song|music|piece|"
    r"performance|tune))?)?$",
    re.IGNORECASE,
)
_VERBS = (r"(?:is|are|was|were|be|been|has|have|had|sounds?|seems?|features?|contains?|consists?|plays?|"
          r"gives?|makes?|creates?|includes?|can|could|would|will|should|may|might|must)")
_VERB_START = re.compile(rf"^{_VERBS}\b", re.IGNORECASE)
_COPULA_END = re.compile(r"\s+(?:is|was|are|were|sounds?|seems?|feels?|becomes?)(?:\s+(?:also|overall|still))*$",
                         re.IGNORECASE)
_HAS_VERB = re.compile(rf"\b(?:{_VERBS}|\w+(?:ed|s))\b|'s\b", re.IGNORECASE)
_PREPOSITION_START = re.compile(r"^(?:with|in|of|at|on|by|from|for)\b", re.IGNORECASE)
_SUBORDINATOR = re.compile(r"^(?:though|although|even though|while|whereas|since|because|if)\s+", re.IGNORECASE)
_STARTS_WITH_SUBJECT = re.compile(_SUBJECT_VERB, re.IGNORECASE)
_DEPENDENT = re.compile(r"^[\s,;-]*(?:which|due to|because of|despite|regardless)\b", re.IGNORECASE)
_COORDINATING = re.compile(r"^[\s,;-]*(?:and|but|yet)?\s*$|^[\s,;-]*(?:and|but|yet)\s", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[a-z)\"])\s*\.(?=[A-Z])")


@dataclass
class CleaningCounts:
    """What cleaning did to a set of captions (for the distill manifest)."""

    captions: int = 0
    changed: int = 0
    sentences_dropped: int = 0
    sentences_edited: int = 0
    remaining: int = 0  # captions in which the detector still finds a remark (should be 0)
    kinds: dict[str, int] = field(default_factory=dict)  # captions with each kind of remark, before cleaning

    def add(self, original: str, cleaned: str, dropped: int, edited: int) -> None:
        self.captions += 1
        self.changed += cleaned != original
        self.sentences_dropped += dropped
        self.sentences_edited += edited
        self.remaining += mentions_recording_quality(cleaned)
        for kind in recording_quality_kinds(original):
            self.kinds[kind] = self.kinds.get(kind, 0) + 1


def _article(article: str | None, word: str) -> str:
    if not article or article.lower() not in ("a", "an"):
        return article or ""
    vowel = word[:1].lower() in "aeiou"
    fixed = "an" if vowel else "a"
    return fixed.capitalize() if article[0].isupper() else fixed


def _local_edits(sentence: str) -> str:
    """Step 1: adjectives of recording nouns, "with poor audio quality", "noisy" before a noun."""
    def noun(m: re.Match) -> str:
        article = _article(m.group("article"), m.group("noun"))
        return f"{article}{m.group('space')}{m.group('noun')}"

    sentence = _WITH_QUALITY.sub("", sentence)
    sentence = _ADJECTIVES_OF_NOUN.sub(noun, sentence)
    sentence = _ATTRIBUTIVE.sub(lambda m: f"{_article(m.group('article'), m.group('next'))} {m.group('next')}", sentence)
    sentence = _AMATEUR_PERSON.sub("someone ", sentence)
    return _NOISY_BEFORE_NOUN.sub(lambda m: " " if m.group(0).startswith((",", " ")) else "", sentence)


def _clauses(sentence: str) -> list[tuple[str, str]]:
    """[(connector, clause), ...]; the first connector is empty. A lone opener ("Overall, ...") is no clause."""
    parts, last, connector = [], 0, ""
    for m in _CLAUSE_START.finditer(sentence):
        if m.start() == 0 or len(sentence[last : m.start()].split()) < 2:
            continue
        parts.append((connector, sentence[last : m.start()]))
        connector, last = m.group(0), m.end()
    parts.append((connector, sentence[last:]))
    return parts


def _without_items(head: str, rest: str) -> str | None:
    """`head rest` without the list items of `rest` that are remarks; None if none or all of them are."""
    pieces = _LIST_SPLIT.split(rest)  # item, separator, item, ...
    items, separators = pieces[0::2], [""] + pieces[1::2]
    removed = [bool(_ITEM.match(item.strip())) for item in items]
    if not any(removed) or all(removed):
        return None
    kept = [(separators[i], items[i]) for i in range(len(items)) if not removed[i]]
    first = kept[0][1]
    if removed[0] and _PREPOSITION_START.match(first):
        return None  # "The recording is noisy, with crackles" would read "The recording is with crackles"
    if removed[0]:
        # "noisy, but also warm" -> "also warm"; "amateur and has a dark vibe" -> the verb follows the subject
        also = re.match(r"^(?:but\s+)?also\b", items[0].strip(), re.IGNORECASE)
        first = re.sub(rf"^{_LINKING}", "", first, flags=re.IGNORECASE)
        if _VERB_START.match(first):
            head = _COPULA_END.sub("", head)
        elif also:
            first = "also " + first
    if removed[-1] and len(kept) > 1 and kept[-1][0].strip() == ",":
        kept[-1] = (" and ", kept[-1][1])  # "fun, warm and noisy" -> "fun and warm"
    listed = first + "".join((", " if sep.strip() == "," else sep) + item for sep, item in kept[1:])
    return f"{head} {listed}".strip() if head else listed


def _clean_clause(clause: str) -> str | None:
    """The clause without its remark, or None when nothing worth keeping is left."""
    if not mentions_recording_quality(clause):
        return clause
    m = _COPULA.match(clause)
    head, rest = (m.group("head"), m.group("rest")) if m else ("", clause)
    if mentions_recording_quality(head):
        return None
    candidate = _without_items(head, rest)
    if candidate is None:
        return None
    candidate = _DANGLING.sub("", candidate.strip())
    if mentions_recording_quality(candidate) or _EMPTY.match(candidate) or not candidate:
        return None
    return candidate


def clean_sentence(sentence: str) -> tuple[str, str]:
    """(cleaned sentence or "", what happened: "kept", "edited" or "dropped")."""
    if not mentions_recording_quality(sentence):
        return sentence, "kept"
    end = sentence[-1] if sentence[-1:] in ".!?" else "."
    body = _local_edits(sentence.rstrip(".!? "))
    clauses = _clauses(body)
    kept: list[tuple[str, str]] = []
    lost_head = None  # the subject and verb of a dropped clause, for a predicate that follows it
    first_kept = False
    for index, (connector, clause) in enumerate(clauses):
        cleaned = _clean_clause(clause)
        if cleaned is None or not cleaned.strip():
            m = _COPULA.match(clause)
            lost_head = m.group("head") if m and not mentions_recording_quality(m.group("head")) else ""
            if kept and connector.strip() == "and" and ", " in kept[-1][1]:
                # "It sounds warm, soft and the recording is noisy" -> "It sounds warm and soft"
                previous = kept[-1][1].rsplit(", ", 1)
                kept[-1] = (kept[-1][0], " and ".join(previous))
            continue
        if lost_head is not None:
            # What hung on a dropped clause: "..., which ..." or "due to ..." go with it; a bare predicate
            # (", but also warm") takes the dropped clause's subject when that is clean, else goes.
            if _DEPENDENT.match(connector):
                continue
            if _COORDINATING.match(connector) and not _STARTS_WITH_SUBJECT.match(cleaned):
                if not lost_head:
                    continue
                cleaned = f"{lost_head} {re.sub(rf'^{_LINKING}', '', cleaned, flags=re.IGNORECASE)}"
            if not kept:
                connector = ""
                cleaned = _LEADING.sub("", cleaned)
        lost_head = None
        first_kept = first_kept or index == 0
        kept.append((connector, cleaned))
    if not kept:
        return "", "dropped"
    if len(kept) == 1 < len(clauses) and first_kept:
        # "Though the melody is fine, the audio quality is poor": the main clause went, the rest stands alone.
        kept[0] = ("", _SUBORDINATOR.sub("", kept[0][1]))
    text = kept[0][1].strip() + "".join(c + t for c, t in kept[1:])
    text = _DANGLING.sub("", text.strip()).strip()
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text))
    words = len(text.split())
    if mentions_recording_quality(text) or _EMPTY.match(text) or words < 3 or (words < 6 and not _HAS_VERB.search(text)):
        return "", "dropped"
    return text[0].upper() + text[1:] + end, "edited"


def split_sentences(text: str) -> list[str]:
    """Sentences of a caption, with their end punctuation (a missing space after '.' is tolerated)."""
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s and s.strip()]


def clean_caption_with_counts(text: str) -> tuple[str, int, int]:
    """(cleaned caption, sentences dropped, sentences edited); an untouched caption comes back unchanged."""
    if not mentions_recording_quality(text):
        return text, 0, 0
    out, dropped, edited = [], 0, 0
    for sentence in split_sentences(text):
        cleaned, what = clean_sentence(sentence)
        dropped += what == "dropped"
        edited += what == "edited"
        if cleaned:
            out.append(cleaned)
    return " ".join(out), dropped, edited


def clean_caption(text: str) -> str:
    """The caption without remarks on recording quality (see the module docstring)."""
    return clean_caption_with_counts(text)[0]
