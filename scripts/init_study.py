"""Which initialisation of new mixers starts closest to the attention it replaces? (issue: convert)

Converts a real model (default: the SmolLM2-135M asset) with every combination of GDN init options, feeds
each converted layer the teacher's own inputs on held-out Shakespeare, and prints the per-layer relative MSE
of the mixer output (mean over layers and loop steps). With --align-tokens N, also trains each conversion with
a short align stage and prints its last align loss and the held-out perplexity after it: the error before
training is not what matters, how well an init trains is. Also prints the DSA indexer's recall of the
teacher's attention mass for evenly spread vs calibrated index heads. Calibration uses training text only.

    python scripts/init_study.py [--source smollm2-135m] [--tokens 512] [--topk 64] [--align-tokens 24k]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from lt2convert import load_model
from lt2convert.calibrate import calibration_stats, mixer_output_errors, topk_attention_recall
from lt2convert.convert import InitOptions, convert_checkpoint
from lt2convert.distill import DistillConfig, Stage, distill
from lt2convert.distill.recipe import parse_tokens
from lt2convert.io.assets import fetch_asset
from lt2convert.loading import derive_config


def token_windows(tokenizer, text: str, tokens: int, count: int) -> torch.Tensor:
    ids = tokenizer(text[: tokens * count * 8], return_tensors="pt").input_ids[0]
    return ids[: tokens * count].view(count, tokens)


def trained_figures(teacher: Path, student: Path, data: Path, heldout: torch.Tensor, args) -> str:
    """' | last align loss, held-out perplexity' after a short align of `student`."""
    from distill_smollm2 import perplexity  # the script's own folder is on sys.path

    align = Stage(name="align", kind="align", tokens=args.align_tokens, seq_len=256, batch_size=8, lr=args.align_lr)
    run = distill(DistillConfig(teacher=str(teacher), student=str(student), data=[str(data)],
                                out=str(student.parent / f"{student.name}-run"), stages=[align], progress=False))
    return f" | {run.losses['align']:10.4f} {perplexity(run.final, heldout):9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--align-tokens", type=parse_tokens, default=0, help="train each init this long (0: no)")
    parser.add_argument("--align-lr", type=float, default=3e-3)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    teacher = load_model(args.source, dtype="fp32")
    folder = Path(teacher.config.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = fetch_asset("shakespeare")
    calib = token_windows(tokenizer, (corpus / "train.txt").read_text(), args.tokens, 2)
    heldout = token_windows(tokenizer, (corpus / "heldout.txt").read_text(), args.tokens, 2)
    stats = calibration_stats(teacher, calib)
    layers = teacher.config.num_hidden_layers

    print(f"source {args.source}: {layers} layers, {args.tokens}-token windows; relative MSE of mixer outputs")
    trained = f" | {'align loss':>10} {'perplexity':>9}" if args.align_tokens else ""
    print(f"{'gdn_conv':>9} {'gdn_decay':>10} {'gdn_norm':>9} | {'mean MSE':>9} {'median':>8} {'worst':>8}{trained}")
    all_gdn = derive_config(teacher.config, {"layer_types": ["gdn"] * layers})
    with tempfile.TemporaryDirectory() as tmp:
        for conv, decay, norm in itertools.product(("identity", "fla"), ("multiscale", "fla", "calibrate"),
                                                   ("unit", "calibrate")):
            init = InitOptions(gdn_conv=conv, gdn_decay=decay, gdn_norm=norm)
            out = Path(tmp) / f"{conv}-{decay}-{norm}"
            start = time.perf_counter()
            convert_checkpoint(folder, all_gdn, out, dtype="fp32", init=init, stats=stats)
            errors = sorted(mixer_output_errors(teacher, load_model(out), heldout).values())
            trained = trained_figures(folder, out, corpus / "train.txt", heldout, args) if args.align_tokens else ""
            print(f"{conv:>9} {decay:>10} {norm:>9} | {sum(errors) / len(errors):9.4f} "
                  f"{errors[len(errors) // 2]:8.4f} {errors[-1]:8.4f}{trained}   ({time.perf_counter() - start:.0f} s)")

        groups = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
        index_heads = min(4, teacher.config.num_attention_heads)
        blocks = -(-index_heads // groups)
        sparse = derive_config(teacher.config, {
            "layer_types": ["dsa"] * layers, "dsa_topk": args.topk, "dsa_index_n_heads": index_heads,
            "dsa_index_head_dim": blocks * teacher.config.head_dim})
        print(f"\nDSA indexer recall of attention mass at top-{args.topk} of {args.tokens} keys")
        for heads in ("spread", "calibrate"):
            out = Path(tmp) / f"dsa-{heads}"
            convert_checkpoint(folder, sparse, out, dtype="fp32", init=InitOptions(dsa_heads=heads), stats=stats)
            recall = [r for r in topk_attention_recall(teacher, load_model(out), heldout).values() if r is not None]
            print(f"  {heads:>9}: mean {sum(recall) / len(recall):.3f}, worst layer {min(recall):.3f}")


if __name__ == "__main__":
    main()
