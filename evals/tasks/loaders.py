"""Datasets of the offline eval tasks, for lm-eval's `custom_dataset: !function loaders.NAME`.

lm-eval imports this file by path (not as a package module) and calls the function with the task's
`dataset_kwargs` and `metadata` as keyword arguments, so every loader accepts and ignores extra keywords.
Paths are joined to this file's folder, never to the working directory. Synthetic tasks are generated here,
deterministically from a seed: nothing large is committed and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"

# Passkey filler (the usual one from the landmark-attention / LongLoRA passkey tests). One repetition is 24
# tokens in the SmolLM2 / Ouro tokenizer (49,152 tokens); lengths are counted in that tokenizer.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLER_TOKENS = 24
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def read_jsonl(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_local(file: str, **_ignored):
    """A jsonl file under evals/data as the `test` split."""
    return _dataset(read_jsonl(file))


def _cache_dir() -> Path:
    try:
        from lt2convert.io.assets import cache_dir

        return cache_dir()
    except ImportError:  # evals/ used without lt2convert installed: the same default location
        return Path(os.environ.get("LT2CONVERT_CACHE") or Path.home() / ".cache" / "lt2convert")


def shakespeare_rows(num_docs: int = 8, doc_chars: int = 2000, skip_chars: int = 20000) -> list[dict]:
    """`num_docs` consecutive slices (cut at line ends) of the Shakespeare held-out text from the asset cache."""
    path = _cache_dir() / "shakespeare" / "heldout.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"asset 'shakespeare' is not in the cache ({path} missing); run `lt2convert fetch-asset shakespeare`"
        )
    text = path.read_text(encoding="utf-8")[skip_chars:]
    rows, start = [], 0
    while len(rows) < num_docs and start < len(text):
        end = text.find("\n", start + doc_chars)
        end = len(text) if end < 0 else end
        chunk = text[start:end].strip()
        if chunk:
            rows.append({"text": chunk})
        start = end + 1
    return rows


def shakespeare_heldout(num_docs: int = 8, doc_chars: int = 2000, **_ignored):
    return _dataset(shakespeare_rows(num_docs, doc_chars))


def _key(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=2)) + rng.choice(string.digits)


def mqar_rows(num_pairs: int, num_docs: int = 50, seed: int = 1234) -> list[dict]:
    """Associative recall: `num_pairs` distinct key -> value pairs, one a line ("kx7: 41"), then one key again;
    the target is its value. The queried pair's position is uniform over the context."""
    rng = random.Random(f"mqar-{seed}-{num_pairs}")
    rows = []
    for i in range(num_docs):
        keys: list[str] = []
        while len(keys) < num_pairs:
            key = _key(rng)
            if key not in keys:
                keys.append(key)
        values = [str(rng.randint(10, 99)) for _ in keys]
        position = rng.randrange(num_pairs)
        context = "\n".join(f"{k}: {v}" for k, v in zip(keys, values, strict=True))
        rows.append(
            {
                "id": i,
                "context": f"{context}\n\n{keys[position]}:",
                "target": f" {values[position]}",
                "num_pairs": num_pairs,
                "position": position,
            }
        )
    return rows


def mqar(num_pairs: int, num_docs: int = 50, seed: int = 1234, **_ignored):
    return _dataset(mqar_rows(num_pairs, num_docs, seed))


def passkey_rows(length: int, num_docs: int = 50, seed: int = 1234) -> list[dict]:
    """Needle in a haystack: about `length` tokens of filler with "The pass key is NNNNN. Remember it." inserted
    at a seeded depth (between 5% and 95% of the filler), then the question; the target is the 5-digit key."""
    rng = random.Random(f"passkey-{seed}-{length}")
    repeats = max(2, (length - 40) // FILLER_TOKENS)  # intro + needle + question: about 40 tokens
    rows = []
    for i in range(num_docs):
        key = str(rng.randint(10000, 99999))
        depth = rng.uniform(0.05, 0.95)
        cut = round(depth * repeats)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        text = PASSKEY_INTRO + FILLER * cut + needle + FILLER * (repeats - cut) + PASSKEY_QUESTION
        rows.append({"id": i, "context": text, "target": f" {key}", "length": length, "depth": cut / repeats})
    return rows


def passkey(length: int, num_docs: int = 50, seed: int = 1234, **_ignored):
    return _dataset(passkey_rows(length, num_docs, seed))


# Held-out perplexity on text from domains that no training data covers (assets `jargon`, `devils-dictionary`).
# The same text is scored at every window: a span of `span_tokens` tokens is cut into pieces of at most `window`
# tokens, one document each, so a model whose max_length is >= window scores each piece as one window (lm-eval's
# rolling log-likelihood cuts documents at the model's max_length, not at a task setting). Tokens are counted in
# the SmolLM2 / Ouro tokenizer, read from the `smollm2-135m` asset.


def _asset_text(asset: str, file: str = "heldout.txt") -> str:
    path = _cache_dir() / asset / file
    if not path.is_file():
        raise FileNotFoundError(
            f"asset {asset!r} is not in the cache ({path} missing); run `lt2convert fetch-asset {asset}`"
        )
    return path.read_text(encoding="utf-8")


def _count_tokenizer():
    path = _cache_dir() / "smollm2-135m" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"asset 'smollm2-135m' is not in the cache ({path} missing; its tokenizer counts the window tokens); "
            "run `lt2convert fetch-asset smollm2-135m`"
        )
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def window_rows(
    asset: str, window: int, span_tokens: int = 8192, num_spans: int = 1, skip_chars: int = 0
) -> list[dict]:
    """`num_spans` consecutive spans of `span_tokens` tokens from `asset`'s heldout.txt (after `skip_chars`),
    each cut into consecutive pieces of about `window` tokens, so every window scores the same text. A cut moves
    back to the nearest token that starts a word (a piece then tokenises on its own as it did in place), so a
    piece can be a few tokens longer or shorter than `window`; a span's last piece never ends past the span."""
    if window < 1 or span_tokens % window:
        raise ValueError(f"window {window} must divide span_tokens {span_tokens}")
    text = _asset_text(asset)[skip_chars:]
    need = num_spans * span_tokens
    encoding = _count_tokenizer().encode(text[: need * 8], add_special_tokens=False)  # ~4 chars a token
    if len(encoding.ids) < need + 1:
        raise ValueError(f"asset {asset!r}: {len(encoding.ids)} tokens after skip_chars={skip_chars}, need {need}")
    offsets, tokens = encoding.offsets, encoding.tokens
    rows, cut = [], 0
    for index in range(need // window):
        end = _cut_before(tokens, (index + 1) * window, lower=cut + 1)
        piece = text[offsets[cut][0] : offsets[end][0]]
        rows.append({"text": piece, "span": index * window // span_tokens, "window": window})
        cut = end
    return rows


def _cut_before(tokens: list[str], limit: int, lower: int, reach: int = 8) -> int:
    """The last token index in (max(lower, limit - reach), limit] whose token starts a word (byte-level BPE marks
    a leading space with 'Ġ' and a newline with 'Ċ'); `limit` itself when there is none that close."""
    for index in range(limit, max(lower, limit - reach), -1):
        if tokens[index][:1] in ("Ġ", "Ċ"):
            return index
    return limit


def heldout_windows(
    asset: str, window: int, span_tokens: int = 8192, num_spans: int = 1, skip_chars: int = 0, **_ignored
):
    return _dataset(window_rows(asset, window, span_tokens, num_spans, skip_chars))
