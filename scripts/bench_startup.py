"""Start-up time of the command line: wall seconds (median of N runs) of commands that should feel instant.

    python scripts/bench_startup.py [--repeats 5]

Each command runs in a fresh process, as a user's shell would start it; the figures include Python's own start.
Targets: --help, --version and shell completion <= 1 s; `plan ouro-1.4b` <= 2 s (on an idle machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS_S = {"help": 1.0, "version": 1.0, "completion": 1.0, "import lt2convert": 1.0, "plan ouro-1.4b": 2.0}


def cli() -> list[str]:
    script = Path(sys.executable).with_name("lt2convert")
    return [str(script)] if script.exists() else [shutil.which("lt2convert") or "lt2convert"]


def commands() -> dict[str, tuple[list[str], dict[str, str]]]:
    base = cli()
    completion = {"_LT2CONVERT_COMPLETE": "bash_complete", "COMP_WORDS": "lt2convert pl", "COMP_CWORD": "1"}
    return {
        "help": (base + ["--help"], {}),
        "version": (base + ["--version"], {}),
        "completion": (base, completion),
        "import lt2convert": ([sys.executable, "-c", "import lt2convert"], {}),
        "plan ouro-1.4b": (base + ["plan", "ouro-1.4b"], {}),
    }


def time_once(argv: list[str], extra_env: dict[str, str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env}
    begun = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - begun
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'command':<20} {'median s':>9} {'min s':>7} {'target s':>9}")
    for name, (argv, env) in commands().items():
        times = [time_once(argv, env) for _ in range(args.repeats)]
        verdict = "ok" if statistics.median(times) <= TARGETS_S[name] else "SLOW"
        print(f"{name:<20} {statistics.median(times):>9.2f} {min(times):>7.2f} {TARGETS_S[name]:>9.1f}  {verdict}")


if __name__ == "__main__":
    main()
