"""The offline asset cache: `fetch_asset(name)` returns the folder of a named asset (a real small Llama
checkpoint, text corpora), building it on first use from pinned artifacts.

The builders live in `lt2convert.io.smollm2` (the checkpoint) and `lt2convert.io.texts` (the corpora), and fetch
what they need through `lt2convert.io.downloads`; `KNOWN_ASSETS` maps each asset name to its builder. A finished
asset is returned without importing anything heavy.

Every asset is built in a temporary directory next to its target and renamed into place only when
complete, so a failed or interrupted fetch never leaves a finished-looking directory behind; a finished
asset is recognised by its `asset.json`, which is written last.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lt2convert.errors import AssetError, ConfigError
from lt2convert.io.outputs import swap_folder
from lt2convert.io.smollm2 import build_smollm2
from lt2convert.io.texts import DEVIL, JARGON, build_austen, build_dictionary, build_shakespeare

__all__ = ["AssetError", "KNOWN_ASSETS", "cache_dir", "fetch_asset"]

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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _built_above_io(module: str, function: str) -> Callable[[Path, Path, bool], dict[str, Any]]:
    """A builder that lives in a module above io (one that trains a model, say), named here and imported only
    when the asset is built, so that io never imports the layers above it."""

    def build(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
        return getattr(importlib.import_module(module), function)(work, downloads, force)

    return build


KNOWN_ASSETS: dict[str, Callable[[Path, Path, bool], dict[str, Any]]] = {
    "smollm2-135m": build_smollm2,
    "shakespeare": build_shakespeare,
    "austen": build_austen,
    "jargon": build_dictionary(JARGON),
    "devils-dictionary": build_dictionary(DEVIL),
    "smollm2-looped": _built_above_io("lt2convert.looped_asset", "build_smollm2_looped"),
}
