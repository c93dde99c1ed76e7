"""distill.data: document sources (.txt, .jsonl, .parquet, directories, hf: datasets streamed from a local folder),
token ids with an on-disk cache and max_tokens, the packed window stream, and tokenizer fingerprints."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lt2convert.distill import data as data_module
from lt2convert.distill.data import (
    DataError,
    PackedTokenStream,
    byte_encode,
    check_same_tokenizer,
    hf_encode,
    iter_documents,
    load_token_ids,
    parse_hf_source,
    tokenizer_fingerprint,
)


def write_parquet(path, texts, column="text", **kwargs) -> None:
    pq.write_table(pa.table({column: texts}), path, **kwargs)


class CountingEncode:
    """byte_encode that counts its calls, to tell tokenising from reading the cache."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text: str) -> list[int]:
        self.calls += 1
        return byte_encode(text)


# --------------------------------------------------------------------------------------------------- stream


def test_stream_is_deterministic_covers_every_window_and_resumes(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh" * 10)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "0123456789" * 4}) + "\n\n" + json.dumps({"text": "xy"}))
    ids = load_token_ids([tmp_path / "a.txt", tmp_path / "b.jsonl"], byte_encode, eos_id=255)
    expected = [*b"abcdefgh" * 10, 255, *b"0123456789" * 4, 255, *b"xy", 255]
    assert ids.dim() == 1 and ids.tolist() == expected

    def stream(seed: int = 5) -> PackedTokenStream:
        return PackedTokenStream(ids, 8, seed=seed)

    first = stream()
    assert first.num_windows == (80 + 41 + 3) // 8
    epoch = torch.cat([first.next_batch(1)[0] for _ in range(first.num_windows)])
    assert epoch.dtype == torch.int64
    windows = [first.window(i).tolist() for i in range(first.num_windows)]
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, windows))  # each window once
    assert windows[0] == expected[:8] and windows[-1] == expected[(first.num_windows - 1) * 8 : first.num_windows * 8]
    again = stream()
    batch, positions = again.next_batch(3)
    assert positions == [0, 1, 2] and torch.equal(batch, epoch[:3])
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert torch.equal(resumed.next_batch(4)[0], again.next_batch(4)[0])
    other = stream(seed=6)
    assert not torch.equal(other.next_batch(other.num_windows)[0], epoch)
    with pytest.raises(DataError, match="seed=6"):
        resumed.load_state_dict(other.state_dict())
    second_epoch = torch.cat([first.next_batch(1)[0] for _ in range(first.num_windows)])
    assert not torch.equal(second_epoch, epoch)  # a new order each epoch, same windows
    assert sorted(map(tuple, second_epoch.tolist())) == sorted(map(tuple, windows))


def test_ids_are_the_same_whatever_the_chunking(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "two", "three"]))
    whole = load_token_ids([str(tmp_path / "a.jsonl")], byte_encode, eos_id=9)
    monkeypatch.setattr(data_module, "CHUNK_TOKENS", 3)  # every document its own chunk
    assert torch.equal(load_token_ids([str(tmp_path / "a.jsonl")], byte_encode, eos_id=9), whole)
    cached = load_token_ids([str(tmp_path / "a.jsonl")], byte_encode, eos_id=9, cache_dir=tmp_path / "c")
    assert cached.tolist() == whole.tolist() == [*b"one", 9, *b"two", 9, *b"three", 9]


def test_stream_reads_windows_lazily_from_int32_ids():
    ids = torch.arange(40, dtype=torch.int32)
    stream = PackedTokenStream(ids, 10, seed=0)
    assert not hasattr(stream, "tokens") and stream.ids is ids  # no [num_windows, seq_len] copy
    batch, _ = stream.next_batch(4)
    assert batch.dtype == torch.int64 and sorted(batch[:, 0].tolist()) == [0, 10, 20, 30]
    with pytest.raises(DataError, match=r"my corpus: 9 tokens in all, fewer than one window of 10"):
        PackedTokenStream(ids[:9], 10, seed=0, name="my corpus")
    with pytest.raises(DataError, match="num_windows=4"):
        PackedTokenStream(ids[:30], 10, seed=0).load_state_dict(stream.state_dict())


# --------------------------------------------------------------------------------------------------- documents


def test_data_errors_name_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 3}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "blank.jsonl").write_text('{"text": " "}\n')
    (tmp_path / "data.csv").write_text("a,b")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.md").write_text("not data")
    write_parquet(tmp_path / "body.parquet", ["x"], column="body")
    write_parquet(tmp_path / "ints.parquet", [1, 2])
    write_parquet(tmp_path / "null.parquet", ["x", None])
    (tmp_path / "fake.parquet").write_text("not parquet")
    cases = {
        "missing.txt": "missing.txt: training text file not found",
        "empty.txt": "empty.txt: no text",
        "binary.txt": r"binary.txt: not UTF-8 text \(byte 0\)",
        "nul.txt": "nul.txt: contains NUL bytes",
        "bad.jsonl": "bad.jsonl line 2: expected a JSON object with a string 'text' field",
        "number.jsonl": "number.jsonl line 1: expected a JSON object with a string 'text' field",
        "broken.jsonl": r"broken.jsonl line 3: not valid JSON",
        "latin.jsonl": r"latin.jsonl line 2: not UTF-8 text \(byte 28\)",
        "blank.jsonl": "blank.jsonl: no text",
        "data.csv": "data.csv: unsupported file type '.csv'",
        "nothing": "nothing: directory has no .txt, .jsonl or .parquet files",
        "body.parquet": "body.parquet: no 'text' column \\(columns: body\\)",
        "ints.parquet": "ints.parquet: column 'text' has type int64, expected strings",
        "null.parquet": "null.parquet row 2: 'text' is null",
        "fake.parquet": "fake.parquet: not a readable parquet file",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            list(iter_documents(str(tmp_path / name)))
    (tmp_path / "body.jsonl").write_text('{"body": "in body", "text": 1}\n')
    assert data_module.read_documents(tmp_path / "body.jsonl", text_field="body") == ["in body"]
    (tmp_path / "short.txt").write_text("abc")
    ids = load_token_ids([str(tmp_path / "short.txt")], byte_encode, eos_id=None)
    with pytest.raises(DataError, match="the training data: 3 tokens in all, fewer than one window of 16"):
        PackedTokenStream(ids, 16, seed=0)
    with pytest.raises(DataError, match="no training data sources"):
        load_token_ids([], byte_encode, eos_id=None)
    with pytest.raises(DataError, match="short.txt: no tokens at all"):
        load_token_ids([str(tmp_path / "short.txt")], lambda text: [], eos_id=None)


def test_parquet_is_read_in_record_batches(tmp_path, monkeypatch):
    texts = [f"doc{i}" for i in range(10)]
    texts[3] = "   "  # blank documents are skipped, as in .jsonl
    write_parquet(tmp_path / "a.parquet", texts, row_group_size=4)
    assert list(iter_documents(str(tmp_path / "a.parquet"))) == [t for t in texts if t.strip()]
    monkeypatch.setattr(data_module, "PARQUET_BATCH_ROWS", 2)
    batches = []
    original = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    ids = load_token_ids([str(tmp_path / "a.parquet")], byte_encode, eos_id=None, max_tokens=8)
    assert bytes(ids.tolist()) == b"doc0doc1"
    assert batches == [2]  # one batch of two rows was enough; the rest of the file was never read


def test_directory_is_read_recursively_in_relative_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("Z")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "A1"}) + "\n" + json.dumps({"text": "A2"}) + "\n")
    write_parquet(tmp_path / "c.parquet", ["C"])
    (tmp_path / "README.md").write_text("not a data file")
    (tmp_path / "b" / "y.txt").write_text("Y")
    assert list(iter_documents(str(tmp_path))) == ["A1", "A2", "Y", "Z", "C"]
    (tmp_path / "b" / "x.txt").write_text(" ")
    with pytest.raises(DataError, match="x.txt: no text"):
        list(iter_documents(str(tmp_path)))


# --------------------------------------------------------------------------------------------------- hf:


def test_parse_hf_source():
    assert parse_hf_source("hf:org/name") == ("org/name", None, "train")
    assert parse_hf_source("hf:org/name:sample-10BT@validation") == ("org/name", "sample-10BT", "validation")
    assert parse_hf_source("hf:/data/v@2/corpus") == ("/data/v@2/corpus", None, "train")  # "@" inside a path
    with pytest.raises(DataError, match="expected hf:NAME"):
        parse_hf_source("hf:@train")


def test_hf_dataset_streams_from_a_local_folder(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", ["first doc", " ", "second doc"])
    write_parquet(folder / "part-1.parquet", ["third doc"])
    documents = iter_documents(f"hf:{folder}")
    assert sorted(documents) == ["first doc", "second doc", "third doc"]
    ids = load_token_ids([f"hf:{folder}"], byte_encode, eos_id=0, max_tokens=12)
    assert len(ids) == 12 and ids.tolist().count(0) == 1  # "xxxx doc" + eos, then 3 tokens of the next one
    with pytest.raises(DataError, match=rf"hf:{folder}: expected a string 'body' column; the dataset has \['text'\]"):
        list(iter_documents(f"hf:{folder}", text_field="body"))
    with pytest.raises(DataError, match=rf"hf:{folder}@validation: could not load .*split 'validation'"):
        iter_documents(f"hf:{folder}@validation")
    with pytest.raises(DataError, match="hf:no-such-org/no-such-dataset: could not load .*'no-such-org/no-such"):
        iter_documents("hf:no-such-org/no-such-dataset")  # offline in tests: never reaches the Hub


# --------------------------------------------------------------------------------------------------- ids


def test_token_cache_is_reused_and_keyed_by_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "more"}) + "\n")
    sources = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    cache = tmp_path / "cache"
    encode = CountingEncode()
    first = load_token_ids(sources, encode, eos_id=1, cache_dir=cache, fingerprint="tok-a")
    assert encode.calls == 2 and first.tolist() == [*b"hello world", 1, *b"more", 1]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".npy") and not files[0].startswith(".")  # no temp file left
    assert (cache / files[0]).stat().st_size == 128 + 4 * len(first)  # int32 on disk

    again = load_token_ids(sources, encode, eos_id=1, cache_dir=cache, fingerprint="tok-a")
    assert encode.calls == 2 and torch.equal(again, first)  # read back, not tokenised
    assert again.dtype == torch.int32

    for changed in ({"fingerprint": "tok-b"}, {"eos_id": 2}, {"max_tokens": 5}):
        before = encode.calls
        options = {"eos_id": 1, "fingerprint": "tok-a", **changed}
        load_token_ids(sources, encode, cache_dir=cache, **options)
        assert encode.calls > before, changed
    stat = (tmp_path / "a.txt").stat()
    os.utime(tmp_path / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    before = encode.calls
    load_token_ids(sources, encode, eos_id=1, cache_dir=cache, fingerprint="tok-a")
    assert encode.calls > before  # an edited (touched) file is tokenised again
    assert len(list(cache.iterdir())) == 5


def test_max_tokens_stops_reading_early(tmp_path, monkeypatch):
    opened = []

    def documents(source: str, text_field: str = "text"):
        opened.append(source)
        if source.endswith("second"):
            raise AssertionError("the second source was opened")
        return endless()

    def endless():
        yield "abcd"
        yield "efgh"
        raise AssertionError("read past the documents needed")

    monkeypatch.setattr(data_module, "iter_documents", documents)
    ids = load_token_ids(["first", "second"], byte_encode, eos_id=0, max_tokens=7)
    assert bytes(ids.tolist()) == b"abcd\0ef" and opened == ["first"]
    cached = load_token_ids(["hf:first", "hf:second"], byte_encode, eos_id=0, cache_dir=tmp_path, max_tokens=10)
    assert bytes(cached.tolist()) == b"abcd\0efgh\0"
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        load_token_ids(["first"], byte_encode, eos_id=0, max_tokens=0)


# --------------------------------------------------------------------------------------------------- tokenizers


def make_tokenizer(words: list[str], eos: str = "</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[UNK]", "</s>", "<eot>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos)


def test_tokenizer_fingerprint_and_mismatch_errors():
    teacher = make_tokenizer(["a", "b", "c"])
    assert hf_encode(teacher)("a c zz") == [3, 5, 0]  # no special tokens added
    same = make_tokenizer(["a", "b", "c"])
    fingerprint = tokenizer_fingerprint(teacher)
    assert len(fingerprint) == 64 and fingerprint == tokenizer_fingerprint(same)
    check_same_tokenizer(teacher, same, "t", "s")  # no error

    bigger = make_tokenizer(["a", "b", "c", "d"])
    swapped = make_tokenizer(["a", "c", "b"])
    other_eos = make_tokenizer(["a", "b", "c"], eos="<eot>")
    cases = {
        bigger: r"tokenizer mismatch: the teacher \(T\) has a vocabulary of 6 tokens, the student \(S\) 7;",
        swapped: r"tokenizer mismatch: token id 4 is 'b' in the teacher \(T\) and 'c' in the student \(S\);",
        other_eos: r"tokenizer mismatch: the teacher \(T\) has eos token id 1, the student \(S\) 2;",
    }
    for student, message in cases.items():
        assert tokenizer_fingerprint(student) != fingerprint
        with pytest.raises(DataError, match=message):
            check_same_tokenizer(teacher, student, "T", "S")


def bpe_tokenizer(merges: list[tuple[str, str]], lowercase: bool = False):
    """A byte-pair tokenizer over a fixed vocabulary: only the merges (or the normaliser) differ between calls."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[UNK]", "</s>", "a", "b", "c", "ab", "bc"])}
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def test_same_vocabulary_with_other_merges_or_normaliser_is_a_mismatch():
    teacher = bpe_tokenizer([("a", "b")])
    other_merges = bpe_tokenizer([("b", "c")])
    assert teacher.get_vocab() == other_merges.get_vocab()
    assert hf_encode(teacher)("abc") != hf_encode(other_merges)("abc")  # the same text, other ids
    check_same_tokenizer(teacher, bpe_tokenizer([("a", "b")]), "T", "S")  # no error
    with pytest.raises(DataError, match=r"same vocabulary but a different tokenizer model \(type, merges"):
        check_same_tokenizer(teacher, other_merges, "T", "S")
    with pytest.raises(DataError, match=r"same vocabulary but a different normalizer"):
        check_same_tokenizer(teacher, bpe_tokenizer([("a", "b")], lowercase=True), "T", "S")


def test_text_file_check_names_the_file(tmp_path):
    from lt2convert.distill.data import read_text_file

    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "blank.txt").write_text("  \n")
    for name, message in {"blob.txt": "not UTF-8 text", "blank.txt": "no text", "nope.txt": "text not found"}.items():
        with pytest.raises(DataError, match=rf"{name}: {message}"):
            read_text_file(tmp_path / name, "text")


def test_batched_tokenisation_gives_the_same_ids(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"the {i}th loop step mixes state {i * 7} times; décalage ünïcode {'x' * (i % 5)}" for i in range(40)]
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    tokenizer.backend_tokenizer.enable_truncation(8)  # a call-time setting: the batched path must ignore it
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    encode = hf_encode(tokenizer)
    batches = []
    original = encode.batch
    monkeypatch.setattr(encode, "batch", lambda docs: batches.append(len(docs)) or original(docs))
    monkeypatch.setattr(data_module, "BATCH_DOCUMENTS", 16)

    def one_by_one(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    eos = tokenizer.eos_token_id
    expected = load_token_ids([str(source)], one_by_one, eos)
    assert len(expected) > 40 * 8  # documents longer than the truncation length
    assert torch.equal(load_token_ids([str(source)], encode, eos), expected) and batches == [16, 16, 8]
    capped = load_token_ids([str(source)], encode, eos, max_tokens=50)
    assert torch.equal(capped, expected[:50])
    assert [encode(t) for t in texts[:3]] == encode.batch(texts[:3]) == [one_by_one(t) for t in texts[:3]]
