"""The general-English training corpus (`austen`), the held-out domains (`jargon`, `devils-dictionary`) built from
Debian packages, their perplexity windows in the `local` suite, and the default training mix."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import re
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from lt2convert.distill import data as data_module
from lt2convert.evaluate import loaders, suite_specs
from lt2convert.io import assets, downloads, texts
from lt2convert.io.assets import AssetError, fetch_asset

# --- fakes of the Debian packages ------------------------------------------------------------------------


def _ar_member(name: str, body: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode("ascii")
    return header + body + (b"\n" if len(body) % 2 else b"")


def _fake_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb shaped like the archive's: ar(debian-binary, control.tar.xz, data.tar.xz)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as archive:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    path.write_bytes(
        b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("control.tar.xz", b"x")
        + _ar_member("data.tar.xz", tar_bytes.getvalue())
    )
    return path


def _r_strings(values: list[str]) -> bytes:
    """An XDR-serialised (version 3) R character vector, as `save()` writes it."""
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(values))
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack(">ii", 0x00040009, len(raw)) + raw
    return out


def _lazyload_db(vectors: list[list[str]]) -> bytes:
    blob = b""
    for vector in vectors:
        body = _r_strings(vector)
        blob += struct.pack(">I", len(body)) + zlib.compress(body)
    return blob


_NOVELS = {
    title: [title.upper() if title != "Persuasion" else title, "", f"The first line of {title}, a novel.", ""]
    for title in ("Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice",
                  "Sense and Sensibility")
}


def _b64(number: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = ""
    while True:
        number, rest = divmod(number, 64)
        text = digits[rest] + text
        if number == 0:
            return text


def _dictd(entries: dict[str, str]) -> tuple[bytes, bytes]:
    """(dict.dz, index) of a dictd database: a dictfmt header entry, then `entries` in order."""
    text, index = b"", []
    for head, body in {"00-database-info": "A header that is not an entry.\n", **entries}.items():
        raw = (body if head.startswith("00") else f"{head}\n{body}\n\n").encode("utf-8")
        index.append(f"{head.replace('-', '')}\t{_b64(len(text))}\t{_b64(len(raw))}")
        text += raw
    return gzip.compress(text), ("\n".join(sorted(index)) + "\n").encode("utf-8")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LT2CONVERT_CACHE", str(root))
    return root


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, deb: Path, cache: Path) -> downloads.DebianSource:
    """Make the pinned source `name` point at `deb`, pre-placed in the downloads folder (no apt-get)."""
    source = dataclasses.replace(getattr(texts, name), sha256=hashlib.sha256(deb.read_bytes()).hexdigest())
    monkeypatch.setattr(texts, name, source)
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    deb.rename(cache / "downloads" / source.filename)
    monkeypatch.setattr(downloads, "apt_download", lambda *a: pytest.fail("the cached .deb should be used"))
    return source


def test_austen_asset_splits_novels(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deb = _fake_deb(tmp_path / "janeausten.deb", {texts._AUSTEN.members[0]: _lazyload_db(list(_NOVELS.values()))})
    _pin(monkeypatch, "_AUSTEN", deb, cache)
    target = fetch_asset("austen")
    train = (target / "train.txt").read_text()
    heldout = (target / "heldout.txt").read_text()
    assert heldout.startswith("Persuasion\n\nThe first line of Persuasion") and "Persuasion" not in train
    assert all(f"The first line of {t}" in train for t in _NOVELS if t != "Persuasion")
    record = json.loads((target / "asset.json").read_text())
    assert record["source"]["debian_package"] == "r-cran-janeaustenr" and "public domain" in record["source"]["licence"]
    assert [w["split"] for w in record["works"]].count("heldout") == 1


def test_austen_rejects_unexpected_data(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deb = _fake_deb(tmp_path / "janeausten.deb", {texts._AUSTEN.members[0]: _lazyload_db([["EMMA", "text"]])})
    _pin(monkeypatch, "_AUSTEN", deb, cache)
    with pytest.raises(AssetError, match="expected the six novels"):
        fetch_asset("austen")
    assert not (cache / "austen").exists()


def test_dictionary_asset_keeps_entries_in_order(cache: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    dict_dz, index = _dictd({"ZEBRA": "    A striped horse.", "ABACUS": "    A counting frame;\n    old."})
    deb = _fake_deb(tmp_path / "devil.deb", dict(zip(texts.DEVIL.members, (dict_dz, index), strict=True)))
    source = _pin(monkeypatch, "DEVIL", deb, cache)
    monkeypatch.setitem(assets.KNOWN_ASSETS, "devils-dictionary", texts.build_dictionary(source))
    text = (fetch_asset("devils-dictionary") / "heldout.txt").read_text()
    # file order (not the index's alphabetical order), the dictfmt header dropped, layout kept
    assert text == "ZEBRA\n    A striped horse.\n\nABACUS\n    A counting frame;\n    old."


def test_deb_member_missing_is_a_clear_error(tmp_path: Path) -> None:
    deb = _fake_deb(tmp_path / "x.deb", {"./usr/share/other": b"x"})
    with pytest.raises(AssetError, match="cannot read ./usr/share/dictd/devil.dict.dz"):
        downloads.read_deb_members(deb, ("./usr/share/dictd/devil.dict.dz",))
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(AssetError, match="is not a Debian package"):
        downloads.read_deb_members(tmp_path / "bad.deb", ("x",))


def test_apt_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(cmd, **kwargs):
        assert cmd[:2] == ["apt-get", "download"] and cmd[-1] == "dict-devil=1.0-13.1"
        return subprocess.CompletedProcess(cmd, 100, "", "W: noise\nE: Can't find a source to download version\n")

    monkeypatch.setattr(downloads.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(downloads.subprocess, "run", fail)
    with pytest.raises(AssetError, match=r"could not download dict-devil=1.0-13.1 .*Can't find a source") as info:
        downloads.apt_download(texts.DEVIL, tmp_path)
    assert "\n" not in str(info.value) and not list(tmp_path.glob(".apt-*"))


def test_default_training_data_mixes_austen_and_shakespeare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets, "fetch_asset", lambda name: tmp_path / name)
    sources = data_module.default_training_data()
    assert sources.count(str(tmp_path / "austen" / "train.txt")) == 2
    assert sources.count(str(tmp_path / "shakespeare" / "train.txt")) == 1 and len(sources) == 3


# --- the local suite's held-out windows --------------------------------------------------------------------


def test_local_suite_has_two_heldout_domains_at_three_windows() -> None:
    tasks = {spec.task for spec in suite_specs("local")}
    for domain in ("jargon", "devil"):
        assert {f"local_{domain}_ppl_{w}" for w in (512, 2048, 8192)} <= tasks
    assert "recall_passkey_4096" in {spec.task for spec in suite_specs("recall")}


@pytest.mark.asset
@pytest.mark.parametrize("asset", ["jargon", "devils-dictionary"])
def test_windows_cover_the_same_text(fetched_asset, asset: str) -> None:
    fetched_asset(asset)
    fetched_asset("smollm2-135m")
    tokenizer = loaders()._count_tokenizer()
    pieces = {w: loaders().window_rows(asset, w, skip_chars=50_000) for w in (512, 2048, 8192)}
    assert [len(pieces[w]) for w in (512, 2048, 8192)] == [16, 4, 1]
    texts = {w: "".join(row["text"] for row in rows) for w, rows in pieces.items()}
    assert texts[512] == texts[2048] == texts[8192]
    for window, rows in pieces.items():
        lengths = [len(tokenizer.encode(row["text"], add_special_tokens=False).ids) for row in rows]
        assert all(window - 16 <= n <= window + 16 for n in lengths), (window, lengths)
    assert len(tokenizer.encode(texts[8192], add_special_tokens=False).ids) <= 8192


def _shingles(text: str, n: int = 10) -> set[int]:
    words = re.findall(r"[a-z']+", text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


@pytest.mark.asset
def test_no_eval_document_overlaps_the_training_data(fetched_asset) -> None:
    """Every held-out perplexity document of the local suite, against the default training mix: no run of ten
    words in common (quotations of a line or two would show up as such runs)."""
    for asset in ("austen", "shakespeare", "jargon", "devils-dictionary", "smollm2-135m"):
        fetched_asset(asset)
    training = set()
    for path in dict.fromkeys(data_module.default_training_data()):
        training |= _shingles(Path(path).read_text(encoding="utf-8"))
    module = loaders()
    heldout_specs = [s.task for s in suite_specs("local") if re.fullmatch(r"local_\w+_ppl_\d+", s.task)]
    assert len(heldout_specs) >= 6
    import yaml

    from lt2convert.evaluate import tasks_dir

    for task in heldout_specs:
        spec = yaml.safe_load(re.sub(r"!function \S+", "null", (tasks_dir() / f"{task}.yaml").read_text()))
        rows = module.window_rows(**spec["dataset_kwargs"])
        shared = [row["text"][:80] for row in rows if _shingles(row["text"]) & training]
        assert not shared, (task, shared)
