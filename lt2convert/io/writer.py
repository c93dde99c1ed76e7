"""Writing checkpoints: tensor-by-tensor sharded safetensors, into a temporary folder renamed into place."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

from lt2convert.io.checkpoint import INDEX_FILE, SINGLE_FILE, TensorInfo


def copy_file_range(source, target, offset: int, size: int) -> None:
    """Append `size` bytes of `source` from `offset` at `target`'s position (both open binary files)."""
    done = 0
    try:
        while done < size:
            copied = os.copy_file_range(source.fileno(), target.fileno(), size - done, offset + done)
            if copied == 0:
                raise OSError(f"{source.name}: ends before byte {offset + size}")
            done += copied
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        source.seek(offset + done)  # file systems without in-kernel copy: through a buffer
        while done < size:
            chunk = source.read(min(COPY_CHUNK, size - done))
            if not chunk:
                raise OSError(f"{source.name}: ends before byte {offset + size}") from err
            target.write(chunk)
            done += len(chunk)


COPY_CHUNK = 16 * 1024**2


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class ShardedWriter:
    """Stream tensors straight into safetensors shards: each tensor's bytes are written as soon as it arrives,
    into space after a reserved header that is filled in (padded with spaces, as the format allows) when the
    shard closes. Peak memory is one tensor group, whatever the model or shard size."""

    HEADER_RESERVE = 256 * 1024  # room for ~2,000 tensor entries per shard

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.handle = None
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.header_estimate = 0

    def add(self, name: str, tensor) -> None:
        import torch

        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        self.make_room(name, size, tensor.dim())
        self.handle.write(tensor.view(-1).view(torch.uint8).numpy().data if size else b"")
        self.record(name, SAFETENSORS_DTYPES[dtype], tensor.shape, size)

    def add_stored(self, info: TensorInfo) -> None:
        """Copy a tensor's bytes as stored in a source safetensors file, without loading it: the kernel copies
        file to file, so a tensor that passes through costs neither memory nor a trip through Python."""
        self.make_room(info.name, info.nbytes, len(info.shape))
        self.handle.flush()
        with info.file.open("rb") as source:
            copy_file_range(source, self.handle, info.offset, info.nbytes)
        self.handle.seek(0, os.SEEK_END)  # the copy moved the file position behind the buffered writer's back
        self.record(info.name, info.dtype, info.shape, info.nbytes)

    def make_room(self, name: str, size: int, ndim: int) -> None:
        """Open a shard, or start the next one when this tensor would overflow its data or header budget."""
        entry_size = len(name) + 80 + 12 * ndim
        if self.handle is not None and (
            self.offset + size > self.max_shard_bytes or self.header_estimate + entry_size > self.HEADER_RESERVE
        ):
            self.close_shard()
        if self.handle is None:
            self.open_shard()
        self.header_estimate += entry_size

    def record(self, name: str, dtype_code: str, shape, size: int) -> None:
        self.entries[name] = {"dtype": dtype_code, "shape": list(shape),
                              "data_offsets": [self.offset, self.offset + size]}
        self.offset += size
        self.total_bytes += size

    def open_shard(self) -> None:
        file = f"shard-{len(self.shards):05d}.safetensors"
        self.handle = (self.folder / file).open("wb")
        self.handle.write(b"\0" * (8 + self.HEADER_RESERVE))
        self.shards.append((file, []))
        self.entries, self.offset, self.header_estimate = {}, 0, 0

    def close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.HEADER_RESERVE:
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the reserved space")
        self.handle.seek(0)
        self.handle.write(struct.pack("<Q", self.HEADER_RESERVE) + header.ljust(self.HEADER_RESERVE, b" "))
        self.handle.close()
        self.shards[-1] = (self.shards[-1][0], list(self.entries))
        self.handle = None

    def finish(self) -> list[str]:
        """Close the last shard, name the shards as transformers does, and write the index (or a single
        model.safetensors)."""
        if self.handle is not None:
            self.close_shard()
        if len(self.shards) == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for k, (file, tensors) in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / file).rename(self.folder / final)
            weight_map |= dict.fromkeys(tensors, final)
            names.append(final)
        write_json(self.folder / INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return names
