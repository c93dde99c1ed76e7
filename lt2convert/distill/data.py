"""Training data for distillation: documents from local files or Hugging Face datasets, tokenised once (and cached
on disk as int32), then cut into a deterministic, resumable stream of fixed-length token windows.

A source is a .txt file (one document), a .jsonl file (one {"text": ...} object per line), a .parquet file (a
"text" column), a directory of those, or `hf:NAME[:CONFIG][@SPLIT]` (a Hugging Face dataset, streamed). Every
document is tokenised, followed by `eos_id` when one is given, and all of them are concatenated. The stream cuts
that into windows of `seq_len` tokens (the incomplete tail is dropped) and visits every window once per epoch in an
order fixed by (seed, epoch). Its position is one integer, the number of windows already handed out, so
`state_dict()` is tiny and resuming continues with exactly the next window.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch

from lt2convert.errors import LT2Error
from lt2convert.io.outputs import atomic_write

SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_PREFIX = "hf:"
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow record batch: bounded memory for any file size
CHUNK_TOKENS = 1 << 20  # token ids gathered in a Python list before they become one int32 array
BATCH_CHARACTERS = 1 << 22  # characters of text per batched tokenizer call (an encoder with a `batch` method)
BATCH_DOCUMENTS = 4096  # at most this many documents per batched call
CACHE_VERSION = 1  # bump when the cached file's layout or meaning changes, so old caches are not reused
TOKEN_DTYPE = np.dtype("<i4")  # 4 bytes a token on disk and in memory: ~4 GB for 1B tokens


class DataError(LT2Error, ValueError):
    """Training data that cannot be used; the message names the file or source."""


# The default distillation text: general English prose (Jane Austen's novels, asset `austen`) mixed with the
# Shakespeare plays. Windows are drawn uniformly from the concatenation, so a source's share is its share of the
# tokens; Austen's training split is listed twice (upsampled) so the two are about even (7.1M vs 8.7M characters).
DEFAULT_TRAINING_MIX = (("austen", "train.txt", 2), ("shakespeare", "train.txt", 1))


def default_training_data() -> list[str]:
    """The default training sources (fetching the assets first if they are not cached): see DEFAULT_TRAINING_MIX."""
    from lt2convert.io.assets import fetch_asset

    sources: list[str] = []
    for asset, file, weight in DEFAULT_TRAINING_MIX:
        sources += [str(fetch_asset(asset) / file)] * weight
    return sources


def byte_encode(text: str) -> list[int]:
    """Byte-level tokenisation (ids 0-255, the UTF-8 bytes): for tests and for models without a tokenizer."""
    return list(text.encode("utf-8"))


class HFEncode:
    """Tokenisation with a Hugging Face tokenizer, without the special tokens it would add around each text (and
    without its warning about texts longer than the model: documents are cut into windows later).

    Called with one text it returns its ids. A fast tokenizer also has `batch`: many texts in one call to the Rust
    tokenizer, which splits them over a thread per core (the same ids as one call per text, several times faster;
    see scripts/bench_tokenize.py)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            # A private copy without truncation or padding: those are call-time settings of the shared tokenizer.
            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
        else:
            self.backend = None

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    def batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return [self(text) for text in texts]
        if hasattr(self.backend, "encode_batch_fast"):  # ids without character offsets (tokenizers >= 0.21)
            return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]


def hf_encode(tokenizer) -> HFEncode:
    """See HFEncode."""
    return HFEncode(tokenizer)


# --------------------------------------------------------------------------------------------------- documents


def iter_documents(source: str | Path, text_field: str = "text") -> Iterator[str]:
    """The non-blank documents of one source, lazily. Where the source is (missing file, unsupported suffix,
    empty directory, unloadable dataset) is checked now; what is in it is checked while iterating."""
    source = str(source)
    if source.startswith(HF_PREFIX):
        return _hf_documents(source, _load_hf_dataset(source), text_field)
    files = local_files(source)
    return itertools.chain.from_iterable(_file_documents(path, text_field) for path in files)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """All documents of one local file or directory (kept for callers that want a list)."""
    return list(iter_documents(str(path), text_field))


def local_files(source: str | Path) -> list[Path]:
    """The data files a local source stands for: the file itself, or a directory's data files, recursively,
    sorted by relative path so the order (and hence the token stream) does not depend on the filesystem."""
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES]
        if not files:
            raise DataError(f"{path}: directory has no .txt, .jsonl or .parquet files")
        return sorted(files, key=lambda p: p.relative_to(path).as_posix())
    if not path.is_file():
        raise DataError(f"{path}: training text file not found")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .txt, .jsonl or .parquet)")
    return [path]


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    """One file's non-blank documents; a file without any is an error (it is probably not what was meant)."""
    readers = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    found = False
    for document in readers[path.suffix](path, text_field):
        if document.strip():
            found = True
            yield document
    if not found:
        raise DataError(f"{path}: no text")


def _decode(path: Path, data: bytes, offset: int = 0, where: str = "") -> str:
    """UTF-8 text without NUL bytes (a NUL almost always means a binary file was passed by mistake)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}{where}: not UTF-8 text (byte {offset + err.start})") from err
    if "\0" in text:
        raise DataError(f"{path}{where}: contains NUL bytes; not a text file")
    return text


def _txt_documents(path: Path, text_field: str) -> Iterator[str]:
    yield _decode(path, path.read_bytes())


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """A whole UTF-8 text file, checked as training text is (exists, not binary, not blank); errors name it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    text = _decode(path, path.read_bytes())
    if not text.strip():
        raise DataError(f"{path}: no text")
    return text


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path, role: str, hint: str = "copy the source model's tokenizer files into it"):
    """The Hugging Face tokenizer of a checkpoint folder, or a DataError naming the folder when it has none
    (transformers' own message lists candidate classes and names no folder)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not has_tokenizer(folder):
        raise DataError(
            f"{folder}: {role} has no tokenizer (no {' or '.join(TOKENIZER_FILES[:2])}); {hint}"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"{folder}: could not load {role}'s tokenizer ({str(err).splitlines()[0]})") from err


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """Line by line, so a multi-gigabyte file is never held in memory at once."""
    offset = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            line = _decode(path, raw, offset, f" line {number}")
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path} line {number}: expected a JSON object with a string {text_field!r} field")
            yield record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """The `text_field` column, one record batch at a time (only that column is read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {text_field!r} has type {kind}, expected strings")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise DataError(f"{path} row {row}: {text_field!r} is null, expected a string")
                yield text
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: could not read row {row + 1} ({err})") from err


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> (NAME, CONFIG or None, SPLIT, default "train"). An "@" followed by a "/"
    belongs to a local path, not a split."""
    spec = source.removeprefix(HF_PREFIX)
    split = "train"
    head, at, tail = spec.rpartition("@")
    if at and tail and "/" not in tail:
        spec, split = head, tail
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"{source}: expected hf:NAME, hf:NAME:CONFIG, optionally followed by @SPLIT")
    return name, config or None, split


def _load_hf_dataset(source: str):
    """The dataset, streaming, so nothing is downloaded or read before it is iterated."""
    import datasets

    name, config, split = parse_hf_source(source)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many unrelated types (ConnectionError, ValueError, FileNotFound...)
        wanted = f"dataset {name!r}" + (f", config {config!r}" if config else "") + f", split {split!r}"
        raise DataError(f"{source}: could not load the Hugging Face {wanted}: {type(err).__name__}: {err}") from err


def _hf_documents(source: str, dataset: Iterable, text_field: str) -> Iterator[str]:
    """The non-blank `text_field` strings of a streamed dataset; missing or non-string fields are errors."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataError(f"{source}: expected a string {text_field!r} column; the dataset has {columns}")
    found = False
    rows = iter(dataset)
    for row in itertools.count(1):
        try:
            record = next(rows)
        except StopIteration:
            break
        except Exception as err:  # a download or decoding failure halfway through the stream
            raise DataError(f"{source} row {row}: could not read ({type(err).__name__}: {err})") from err
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{source} row {row}: expected a string {text_field!r} field")
        if text.strip():
            found = True
            yield text
    if not found:
        raise DataError(f"{source}: no text")


# --------------------------------------------------------------------------------------------------- token ids


def load_token_ids(
    sources: Sequence[str | Path],
    encode: Callable[[str], list[int]],
    eos_id: int | None,
    cache_dir: Path | None = None,
    max_tokens: int | None = None,
    text_field: str = "text",
    fingerprint: str = "",
) -> torch.Tensor:
    """The 1-D int32 tensor of every document's ids (each followed by `eos_id` when not None), at most
    `max_tokens` of them. With `cache_dir` the ids are kept in `cache_dir/<key>.npy` and a later call with the
    same key memory-maps that file instead of tokenising again; `fingerprint` should identify the tokenizer."""
    sources = [str(s) for s in sources]
    if not sources:
        raise DataError("no training data sources given")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    # A generator, so a source is opened only once the ones before it are used up (and never past max_tokens).
    documents = itertools.chain.from_iterable(iter_documents(s, text_field) for s in sources)
    chunks = _id_chunks(documents, encode, eos_id, max_tokens)
    if cache_dir is None:
        ids = np.concatenate([np.empty(0, TOKEN_DTYPE), *chunks])
        if len(ids) == 0:
            raise _no_tokens(sources)
        return torch.from_numpy(ids)
    path = Path(cache_dir) / f"{_cache_key(sources, fingerprint, eos_id, max_tokens, text_field)}.npy"
    if not path.is_file():
        _write_npy(path, chunks, sources)
    return torch.from_numpy(_open_npy(path))


def _no_tokens(sources: Sequence[str]) -> DataError:
    return DataError(f"{', '.join(sources)}: no tokens at all after tokenisation")


def _id_chunks(
    documents: Iterable[str], encode: Callable[[str], list[int]], eos_id: int | None, max_tokens: int | None
) -> Iterator[np.ndarray]:
    """int32 arrays of about CHUNK_TOKENS ids each; stops pulling documents as soon as max_tokens is reached."""
    buffer: list[int] = []
    done = 0  # ids already yielded
    for ids in _encoded_documents(documents, encode):
        buffer.extend(ids)
        if eos_id is not None:
            buffer.append(eos_id)
        if max_tokens is not None and done + len(buffer) >= max_tokens:
            yield _as_ids(buffer[: max_tokens - done])
            return
        if len(buffer) >= CHUNK_TOKENS:
            done += len(buffer)
            yield _as_ids(buffer)
            buffer = []
    if buffer:
        yield _as_ids(buffer)


def _encoded_documents(documents: Iterable[str], encode: Callable[[str], list[int]]) -> Iterator[list[int]]:
    """Each document's ids, in order; an encoder with a `batch` method gets the documents in batches (at most one
    batch is read ahead of the ids handed out)."""
    batch_encode = getattr(encode, "batch", None)
    if batch_encode is None:
        yield from (encode(document) for document in documents)
        return
    batch: list[str] = []
    characters = 0
    for document in documents:
        batch.append(document)
        characters += len(document)
        if characters >= BATCH_CHARACTERS or len(batch) >= BATCH_DOCUMENTS:
            yield from batch_encode(batch)
            batch, characters = [], 0
    if batch:
        yield from batch_encode(batch)


def _as_ids(ids: list[int]) -> np.ndarray:
    try:
        array = np.array(ids, dtype=TOKEN_DTYPE)
    except OverflowError as err:
        raise DataError(f"a token id does not fit in int32 ({err})") from err
    if len(array) and array.min() < 0:
        raise DataError(f"negative token id {int(array.min())}")
    return array


def _cache_key(
    sources: Sequence[str], fingerprint: str, eos_id: int | None, max_tokens: int | None, text_field: str
) -> str:
    """sha256 over everything the ids depend on. Local files count by path, size and mtime (cheap, and any edit
    changes them); a Hugging Face source only by its name, so a dataset changed upstream is not noticed."""
    payload = {
        "version": CACHE_VERSION,
        "sources": [_describe_source(s) for s in sources],
        "fingerprint": fingerprint,
        "eos_id": eos_id,
        "max_tokens": max_tokens,
        "text_field": text_field,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _describe_source(source: str) -> str | list[tuple[str, int, int]]:
    if source.startswith(HF_PREFIX):
        return source
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in local_files(source)]


def _npy_header(length: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": TOKEN_DTYPE.str, "fortran_order": False, "shape": (length,)})
    return out.getvalue()


def _write_npy(path: Path, chunks: Iterable[np.ndarray], sources: Sequence[str]) -> None:
    """Stream the chunks into a .npy file without holding them all: write a placeholder header, the data, then
    the real header (npy pads headers to 64 bytes, so any realistic length fits the same room). Published by
    `atomic_write`, so a killed run or a concurrent one never leaves a partial cache file, and sources without a
    single token leave no file at all."""

    def write(file: IO) -> None:
        placeholder = _npy_header(0)
        file.write(placeholder)
        count = 0
        for chunk in chunks:
            file.write(chunk.tobytes())
            count += len(chunk)
        if count == 0:
            raise _no_tokens(sources)
        header = _npy_header(count)
        if len(header) != len(placeholder):
            raise DataError(f"{path}: {count} tokens do not fit the reserved .npy header")
        file.seek(0)
        file.write(header)

    atomic_write(path, write, binary=True)


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map the cached ids. Copy-on-write, so torch gets a writable array (no warning) and an accidental
    write changes only this process's copy, never the cache file."""
    try:
        ids = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable token cache ({err}); delete it to tokenise again") from err
    if ids.ndim != 1 or ids.dtype != TOKEN_DTYPE or len(ids) == 0:
        raise DataError(f"{path}: token cache holds {ids.dtype} {ids.shape}; delete it to tokenise again")
    return ids


# --------------------------------------------------------------------------------------------------- tokenizers


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable sha256 identifying how `tokenizer` turns text into ids, for the token cache key."""
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": _special_ids(tokenizer),
        "pipeline": _backend_pipeline(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _special_ids(tokenizer) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}


def _backend_pipeline(tokenizer) -> dict | None:
    """A fast tokenizer's normaliser, pre-tokeniser, merges etc.: the same vocabulary can still split text
    differently. Truncation and padding are runtime settings that calls may change, so they are left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pipeline = json.loads(backend.to_str())
    pipeline.pop("truncation", None)
    pipeline.pop("padding", None)
    return pipeline


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Distillation compares logits token id by token id, so both models must turn text into the same ids; raise a
    DataError naming the first difference (vocabulary size, a token id, a special token, or the tokenizer itself:
    its model with the merges, normaliser, pre-tokeniser or added tokens)."""
    teacher, student = f"the teacher ({teacher_name})", f"the student ({student_name})"
    why = "distillation needs both models to use the same token ids"
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if len(teacher_vocab) != len(student_vocab):
        raise DataError(
            f"tokenizer mismatch: {teacher} has a vocabulary of {len(teacher_vocab)} tokens, "
            f"{student} {len(student_vocab)}; {why}"
        )
    teacher_tokens = {i: t for t, i in teacher_vocab.items()}
    student_tokens = {i: t for t, i in student_vocab.items()}
    for token_id in sorted(teacher_tokens.keys() | student_tokens.keys()):
        mine, theirs = teacher_tokens.get(token_id), student_tokens.get(token_id)
        if mine != theirs:
            raise DataError(
                f"tokenizer mismatch: token id {token_id} is {mine!r} in {teacher} and {theirs!r} in {student}; {why}"
            )
    teacher_special, student_special = _special_ids(teacher_tokenizer), _special_ids(student_tokenizer)
    for name, mine in teacher_special.items():
        if mine != student_special[name]:
            raise DataError(
                f"tokenizer mismatch: {teacher} has {name} token id {mine}, {student} {student_special[name]}; {why}"
            )
    part = _first_pipeline_difference(teacher_tokenizer, student_tokenizer)
    if part is not None:
        raise DataError(
            f"tokenizer mismatch: {teacher} and {student} have the same vocabulary but a different {part}, so the "
            f"same text becomes different ids; {why}"
        )


# The parts of tokenizer.json that decide how text becomes ids (special tokens are not added by hf_encode, so the
# post-processor and the decoder do not matter).
PIPELINE_PARTS = {"normalizer": "normalizer", "pre_tokenizer": "pre-tokenizer", "model": "tokenizer model "
                  "(type, merges or options)", "added_tokens": "set of added/special tokens"}


def _first_pipeline_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    mine, theirs = _backend_pipeline(teacher_tokenizer), _backend_pipeline(student_tokenizer)
    if mine is None or theirs is None:
        return None if mine is theirs else "tokenizer implementation (fast vs slow)"
    for key, name in PIPELINE_PARTS.items():
        if mine.get(key) != theirs.get(key):
            return name
    return None


# --------------------------------------------------------------------------------------------------- windows


class PackedTokenStream:
    """Fixed-length [seq_len] windows over a 1-D tensor of token ids, in a seeded shuffled order. Windows are
    sliced from `ids` when handed out (no [num_windows, seq_len] copy), so a memory-mapped cache stays on disk."""

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int, name: str = "the training data"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        self.num_windows = ids.numel() // seq_len
        if self.num_windows == 0:
            raise DataError(f"{name}: {ids.numel()} tokens in all, fewer than one window of {seq_len}")
        self.ids = ids
        self.seq_len = seq_len
        self.seed = seed
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def window(self, index: int) -> torch.Tensor:
        """Window `index` (in storage order) as int64 ids."""
        start = index * self.seq_len
        return self.ids[start : start + self.seq_len].long()

    def window_index(self, position: int) -> int:
        """Which window the stream hands out at `position` (windows already handed out)."""
        epoch, offset = divmod(position, self.num_windows)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return int(self._order[1][offset])

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """([batch_size, seq_len] int64 token ids, the stream positions they were taken from), advancing."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        positions = list(range(self.position, self.position + batch_size))
        starts = [self.window_index(p) * self.seq_len for p in positions]
        batch = torch.stack([self.ids[s : s + self.seq_len] for s in starts]).long()
        self.position += batch_size
        return batch, positions

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "num_windows"):
            if state[key] != mine[key]:
                raise DataError(f"saved data position has {key}={state[key]}, this stream has {mine[key]}")
        self.position = int(state["position"])
