"""A deterministic, resumable stream of fixed-length token windows packed from local text files.

Every document (a .txt file, or each "text" field of a .jsonl file) is tokenised, followed by `eos_id` when one
is given, and all of them are concatenated and cut into windows of `seq_len` tokens (the incomplete tail is
dropped). Each epoch visits every window once in an order fixed by (seed, epoch). The stream's position is one
integer, the number of windows already handed out, so `state_dict()` is tiny and resuming continues with
exactly the next window.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".txt", ".jsonl")


class DataError(ValueError):
    """A training text file that cannot be used; the message names the file."""


def byte_encode(text: str) -> list[int]:
    """Byte-level tokenisation (ids 0-255, the UTF-8 bytes): for tests and for models without a tokenizer."""
    return list(text.encode("utf-8"))


def hf_encode(tokenizer) -> Callable[[str], list[int]]:
    """Tokenisation with a Hugging Face tokenizer, without the special tokens it would add around each text."""
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids


def read_documents(path: str | Path) -> list[str]:
    """The documents of one .txt (the whole file) or .jsonl (one {"text": ...} object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training text file not found")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .txt or .jsonl)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from err
    if "\0" in text:
        raise DataError(f"{path}: contains NUL bytes; not a text file")
    if path.suffix == ".txt":
        documents = [text] if text.strip() else []
    else:
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path} line {number}: expected a JSON object with a string 'text' field")
            if record["text"].strip():
                documents.append(record["text"])
    if not documents:
        raise DataError(f"{path}: no text")
    return documents


class PackedTokenStream:
    """Fixed-length [seq_len] windows over the packed token stream of `files`, in a seeded shuffled order."""

    def __init__(
        self,
        files: Sequence[str | Path],
        encode: Callable[[str], list[int]],
        seq_len: int,
        seed: int,
        eos_id: int | None = None,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if not files:
            raise DataError("no training text files given")
        ids: list[int] = []
        for file in files:
            for document in read_documents(file):
                ids.extend(encode(document))
                if eos_id is not None:
                    ids.append(eos_id)
        self.num_windows = len(ids) // seq_len
        if self.num_windows == 0:
            names = ", ".join(str(f) for f in files)
            raise DataError(f"{names}: {len(ids)} tokens in all, fewer than one window of {seq_len}")
        self.tokens = torch.tensor(ids[: self.num_windows * seq_len], dtype=torch.long).view(self.num_windows, seq_len)
        self.seq_len = seq_len
        self.seed = seed
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def window_index(self, position: int) -> int:
        """Which window the stream hands out at `position` (windows already handed out)."""
        epoch, offset = divmod(position, self.num_windows)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return int(self._order[1][offset])

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """([batch_size, seq_len] token ids, the stream positions they were taken from), advancing the stream."""
        positions = list(range(self.position, self.position + batch_size))
        rows = [self.window_index(p) for p in positions]
        self.position += batch_size
        return self.tokens[rows], positions

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "num_windows"):
            if state[key] != mine[key]:
                raise DataError(f"saved data position has {key}={state[key]}, this stream has {mine[key]}")
        self.position = int(state["position"])
