"""Reading Hugging Face checkpoint folders: config, safetensors files (single or sharded), lazily, with checks.

Nothing here unpickles or executes code from the checkpoint: weights are read only from safetensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lt2convert.errors import LT2Error

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(LT2Error, ValueError):
    """A checkpoint folder or file is missing, malformed, or does not match its config."""


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what} found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(folder: Path) -> dict:
    """The parsed config.json of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    config = read_json(folder / "config.json", "config.json (not a Hugging Face checkpoint folder?)")
    if "model_type" not in config:
        raise CheckpointError(f"{folder / 'config.json'}: field 'model_type' is missing")
    return config


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # where the tensor's bytes start in `file`
    nbytes: int = 0


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check the file holds every byte the header promises."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header length {header_len})"
                )
            header = json.loads(fh.read(header_len))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from err
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: header promises {8 + header_len + data_end} bytes, file has {size}"
        )
    data_start = 8 + header_len
    return {
        name: TensorInfo(
            name, path, entry["dtype"], tuple(entry["shape"]),
            offset=data_start + entry["data_offsets"][0],
            nbytes=entry["data_offsets"][1] - entry["data_offsets"][0],
        )
        for name, entry in header.items()
    }


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single model file."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: field 'weight_map' is missing or empty")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard file(s) missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder}: only pickle weights (.bin/.pt) found; lt2convert reads safetensors only"
        )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


class LazyCheckpoint:
    """Name -> tensor access over all safetensors files of a folder, reading one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_safetensors_header(path).items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} also stored in {self.tensors[name].file.name}"
                    )
                self.tensors[name] = info

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str):
        """Load one tensor (torch) from its file. The file is mapped only for this call: a mapping kept open
        would count every page read so far in the process's RSS."""
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt") as fh:
            return fh.get_tensor(name)

    def iter_tensors(self) -> Iterator[tuple[str, object]]:
        """(name, tensor) for every tensor, one file open at a time, in file order."""
        from safetensors import safe_open

        for path in self.files:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, fh.get_tensor(name)

    def dtypes(self) -> dict[str, int]:
        """Count of tensors per stored dtype."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return counts

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)
