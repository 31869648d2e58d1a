"""Taxonomy invariants and the tag/caption matcher, on the repository's taxonomy file."""

import pytest
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy, normalize

QUALITY_WORDS = ("quality", "noisy", "mono", "amateur", "recording", "muffled", "fidelity", "static", "live")


@pytest.fixture(scope="module")
def taxonomy():
    return Taxonomy.load()


def test_four_categories_of_at_most_50_tags(taxonomy):
    assert tuple(taxonomy.categories) == CATEGORIES
    for category in CATEGORIES:
        assert 1 <= len(taxonomy.categories[category]) <= 50


def test_no_tag_or_alias_in_two_categories(taxonomy):
    owner = {}
    for category, tags in taxonomy.categories.items():
        for tag, aliases in tags.items():
            for phrase in [tag, *aliases]:
                key = normalize(phrase)
                assert owner.setdefault(key, category) == category, f"{phrase!r} in {owner[key]} and {category}"


def test_no_quality_or_context_tags(taxonomy):
    for tag in taxonomy.tags:
        assert not any(word in tag for word in QUALITY_WORDS), tag
    for excluded in taxonomy.excluded:
        assert taxonomy.match_tag(excluded) == [], excluded


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("male vocals", ["male vocal"]),
        ("Male Vocal", ["male vocal"]),
        ("passionate male vocal", ["passionate", "male vocal"]),
        ("E-Bass", ["bass guitar"]),
        ("bass drum", ["acoustic drums"]),
        ("hip-hop", ["hip hop"]),
        ("uptempo", ["fast tempo"]),
        ("no drums", []),
        ("low quality", []),
        ("amateur recording", []),
        ("punchy kick", []),
    ],
)
def test_match_tag(taxonomy, raw, expected):
    assert taxonomy.match_tag(raw) == expected


def test_find_mentions_in_caption(taxonomy):
    caption = "A mellow jazz tune with male vocals, upright bass and a slow tempo; no low quality."
    assert taxonomy.find_mentions(caption) == ["mellow", "jazz", "male vocal", "double bass", "slow tempo"]


def test_unknown_tag_error_suggests_closest(taxonomy):
    with pytest.raises(ConceptCapsError, match="unknown tag 'pianno'.*'piano'"):
        taxonomy.check_known(["pianno"])
    with pytest.raises(ConceptCapsError, match="alias of 'male vocal'"):
        taxonomy.check_known(["male vocals"])


def test_contradictions(taxonomy):
    assert taxonomy.contradiction_in({"instrumental", "female vocal", "rock"}) == ("instrumental", "female vocal")
    assert taxonomy.contradiction_in({"slow tempo", "fast tempo"}) is not None
    assert taxonomy.contradiction_in({"rock", "happy", "piano", "fast tempo"}) is None


def test_invalid_taxonomy_is_refused(tmp_path):
    bad = tmp_path / "taxonomy.yaml"
    bad.write_text(
        "version: '0'\ncategories:\n  genre: {rock: [rock music]}\n  mood: {happy: [rock music]}\n"
        "  instrument: {piano: []}\n  tempo: {slow tempo: []}\n"
    )
    with pytest.raises(ConceptCapsError, match="'rock music' is listed under both 'rock' and 'happy'"):
        Taxonomy.load(bad)


def test_propose_lists_counts_and_unmapped_tags(musiccaps_csv, capsys):
    from conceptcaps_pipeline.cli import main

    assert main(["taxonomy", "propose", "--source", str(musiccaps_csv), "--top", "20", "--min-count", "30"]) == 0
    out = capsys.readouterr().out
    for category in CATEGORIES:
        assert f"## {category} (" in out
    unmapped = out.split("map to nothing")[1]
    rows = [line.split(maxsplit=1) for line in unmapped.strip().splitlines()[1:]]
    assert rows and all(int(count) >= 30 for count, _ in rows)
    assert "punchy kick" in unmapped  # a frequent tag the taxonomy leaves out on purpose
    assert "low quality" not in unmapped  # excluded tags are not proposed
    assert " 5521 rows" in out or "(5521 rows)" in out
