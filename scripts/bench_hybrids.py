"""CPU evidence run: measured decoding speed of a looped model and two of its hybrids at long contexts.

A tiny-but-not-trivial looped model (8 layers × 4 loops, hidden 512, 8 heads of 64, vocab 4096, Ouro-style
sandwich norms and exit gate, random init) against the hybrids the shipped recipes make of it: Full+GDN 1:4
(`ouro-1.4b-full-gdn`) and GDN+DSA interleaved (`ouro-1.4b-gdn-dsa`, DSA top-k 2048). Batch 1, fp32, synthetic
context (see lt2convert.bench): decode tokens/s at each context with ratios to the source, and the measured
cache bytes next to the cost model's.

    python scripts/bench_hybrids.py [--contexts 2k,8k,32k] [--decode-tokens 4] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lt2convert.bench import bench
from lt2convert.console import print_bench
from lt2convert.loading import derive_config
from lt2convert.modeling import OuroConfig
from lt2convert.plan import choose_layers, load_recipe

SOURCE = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "total_ut_steps": 4,
    "max_position_embeddings": 65536,
}
RECIPES = {"full+gdn 1:4": "ouro-1.4b-full-gdn", "gdn+dsa": "ouro-1.4b-gdn-dsa"}


def hybrid(source: OuroConfig, recipe: str):
    """The source's config with a recipe's layer list and mixer settings."""
    spec = load_recipe(recipe)
    overrides = {f"{mixer}_{key}": value for mixer, settings in spec.mixers.items() for key, value in settings.items()}
    return derive_config(source, {"layer_types": choose_layers(spec, source.num_hidden_layers), **overrides})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="2k,8k,32k")
    parser.add_argument("--decode-tokens", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU).")
    parser.add_argument("--json", help="Also write the report here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = OuroConfig(**SOURCE)
    configs = [source, *(hybrid(source, recipe) for recipe in RECIPES.values())]
    names = ["source (full attention)", *RECIPES]
    start = time.perf_counter()
    report = bench(
        configs, args.contexts, 1, decode_tokens=args.decode_tokens, prefill=256, device="cpu", dtype="fp32",
        context_mode="synthetic", names=names, warmup=args.warmup, repeats=2,
    )
    print_bench(report)
    print("layer lists: " + "; ".join(f"{row['name']}: {' '.join(t[0].upper() for t in row['layer_types'])}"
                                        for row in report["models"]))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
