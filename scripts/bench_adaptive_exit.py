"""Adaptive exit on a looped checkpoint: loop steps run, decoding speed and held-out perplexity per threshold
(lt2convert.exit_sweep, which says how each figure is measured).

    python scripts/bench_adaptive_exit.py --model DIR [--text jargon] [--thresholds 0.3,0.4,...,1.0]
        [--device cuda --dtype bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lt2convert.bench import BENCH_DTYPES
from lt2convert.exit_sweep import DEFAULT_THRESHOLDS, SweepSettings, format_table, parse_thresholds, sweep_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A looped checkpoint folder.")
    parser.add_argument("--text", default="jargon", help="Held-out text(s), comma-separated: asset names or files.")
    parser.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)),
                        help="Comma-separated, within (0, 1].")
    parser.add_argument("--windows", type=int, default=4, help="Perplexity windows per text.")
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="Prefilled before the timed decoding.")
    parser.add_argument("--decode-tokens", type=int, default=64, help="Timed decoding steps per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="Default: cuda when available.")
    parser.add_argument("--dtype", choices=sorted(BENCH_DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads.")
    parser.add_argument("--json", help="Also write the result here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SweepSettings(
        texts=tuple(t.strip() for t in args.text.split(",") if t.strip()), thresholds=parse_thresholds(args.thresholds),
        windows=args.windows, window_tokens=args.window_tokens, prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens, rounds=args.rounds, device=args.device, dtype=args.dtype,
    )
    result = sweep_model(args.model, settings)
    print("\n".join(format_table(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
