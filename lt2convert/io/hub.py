"""Resolving a checkpoint source (local folder, preset name, hub id[@revision]) to a local folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lt2convert.errors import LT2Error

# What a download fetches: configs, tokenizer files and safetensors weights. Never code (*.py) or pickles.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


class SourceError(LT2Error, ValueError):
    """A checkpoint source that cannot be resolved."""


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from: `kind` is 'path', 'preset' or 'hub'."""

    kind: str
    spec: str
    hub_id: str | None = None
    revision: str | None = None
    preset: str | None = None


def parse_source(spec: str) -> Source:
    """A local path if one exists, else a preset name, else `org/name[@revision]` on the hub."""
    from lt2convert.presets import PRESETS

    if Path(spec).exists():
        return Source("path", spec)
    if looks_like_local_path(spec):
        raise SourceError(f"no such folder: {spec}")
    if spec.lower() in PRESETS:
        preset = PRESETS[spec.lower()]
        return Source("preset", spec, preset.hub_id, preset.revision, preset.name)
    hub_id, _, revision = spec.partition("@")
    if hub_id.count("/") == 1 and all(hub_id.split("/")):
        return Source("hub", spec, hub_id, revision or None)
    raise SourceError(
        f"{spec!r} is neither an existing path, a preset ({', '.join(PRESETS)}) nor a hub id 'org/name[@rev]'"
    )


def looks_like_local_path(spec: str) -> bool:
    """A spec that cannot be a hub id `org/name[@rev]`: it starts with . / ~, has more than one slash, ends with
    one, or its first part is an existing local folder (`runs/typo` when ./runs exists)."""
    name = spec.partition("@")[0]
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def download(hub_id: str, revision: str | None) -> Path:
    """Fetch configs, tokenizer and safetensors of a hub repo (no code, no pickles) into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        fetch = f"hf download {hub_id}" + (f" --revision {revision}" if revision else "")
        raise SourceError(
            f"{hub_id}: not in the local cache and the hub cannot be reached ({one_line(err)}); "
            f"run `{fetch}` where the hub is reachable, then retry"
        ) from err
    except HfHubHTTPError as err:
        raise SourceError(f"{hub_id}@{revision or 'main'}: download failed ({err})") from err


def one_line(err: BaseException) -> str:
    """An exception's message on one line (the command line prints only an error's first line)."""
    return " ".join(str(err).split()) or type(err).__name__
