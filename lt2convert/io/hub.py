"""Resolving a checkpoint source (local folder, preset name, hub id[@revision]) to a local folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What a download fetches: configs, tokenizer files and safetensors weights. Never code (*.py) or pickles.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


class SourceError(ValueError):
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
    if spec.lower() in PRESETS:
        preset = PRESETS[spec.lower()]
        return Source("preset", spec, preset.hub_id, preset.revision, preset.name)
    hub_id, _, revision = spec.partition("@")
    if hub_id.count("/") == 1 and all(hub_id.split("/")):
        return Source("hub", spec, hub_id, revision or None)
    raise SourceError(
        f"{spec!r} is neither an existing path, a preset ({', '.join(PRESETS)}) nor a hub id 'org/name[@rev]'"
    )


def download(hub_id: str, revision: str | None) -> Path:
    """Fetch configs, tokenizer and safetensors of a hub repo (no code, no pickles) into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        raise SourceError(f"{hub_id}: not in the local cache and the hub cannot be reached ({err})") from err
    except HfHubHTTPError as err:
        raise SourceError(f"{hub_id}@{revision or 'main'}: download failed ({err})") from err
