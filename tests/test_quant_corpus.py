"""The shipped calibration / held-out corpus (data/corpus) and the Gutenberg stripping of scripts/make_corpus.py."""

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"


@pytest.fixture(scope="module")
def make_corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "scripts" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def play_titles(text: str) -> set[str]:
    """Each play opens with its title, a blank line, then 'by William Shakespeare'."""
    return set(re.findall(r"^(.+)\n\nby William Shakespeare$", text, flags=re.MULTILINE))


def test_splits_hold_different_plays_of_a_few_hundred_kb():
    calibration = (CORPUS / "calibration.txt").read_text(encoding="utf-8")
    heldout = (CORPUS / "heldout.txt").read_text(encoding="utf-8")
    assert 100_000 < len(calibration) < 500_000 and 50_000 < len(heldout) < 300_000
    calibration_titles, heldout_titles = play_titles(calibration), play_titles(heldout)
    assert len(calibration_titles) == 3 and len(heldout_titles) == 2
    assert not calibration_titles & heldout_titles


@pytest.mark.parametrize("name", ["calibration.txt", "heldout.txt"])
def test_corpus_is_clean_text_without_gutenberg_licence(name):
    raw = (CORPUS / name).read_bytes()
    text = raw.decode("utf-8")
    assert "\r" not in text and "gutenberg" not in text.lower()
    assert all(line == line.rstrip() for line in text.split("\n"))


def test_gutenberg_header_and_footer_are_stripped(make_corpus):
    body = "HAMLET\n\nby William Shakespeare\n\nACT I.   \n\n\n\n\n\nSCENE I.\n"
    wrapped = (
        "The Project Gutenberg Etext of Hamlet\nlicence terms ...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*\n"
        + body
        + "End of Project Gutenberg Etext of Hamlet\nmore licence\n"
    )
    stripped = make_corpus.strip_gutenberg_boilerplate(wrapped)
    assert "gutenberg" not in stripped.lower() and "licence" not in stripped
    assert stripped == "HAMLET\n\nby William Shakespeare\n\nACT I.\n\n\nSCENE I.\n"
    assert make_corpus.strip_gutenberg_boilerplate("*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nText.\n*** END OF X ***\n") == "Text.\n"


def test_split_definitions_do_not_overlap(make_corpus):
    assert not set(make_corpus.CALIBRATION_PLAYS) & set(make_corpus.HELDOUT_PLAYS)
