"""Rich tables for the CLI (kept apart so library code never prints)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_inspect(report: dict) -> None:
    console = Console()
    head = Table(
        title=f"{report['source']} ({report['model_type']}, {report['architecture']})", show_header=False
    )
    for key in (
        "params_total",
        "num_layers",
        "loop_steps",
        "cache_slots",
        "hidden_size",
        "heads",
        "kv_heads",
        "head_dim",
        "vocab_size",
        "tied_embeddings",
        "exit_gate",
        "config_dtype",
    ):
        value = report[key]
        head.add_row(
            key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        )
    head.add_row("mixers", ", ".join(f"{k} ×{v}" for k, v in report["mixer_counts"].items()))
    console.print(head)

    params = Table(title="parameters by component")
    params.add_column("component")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    for name, count in sorted(report["params_by_component"].items(), key=lambda kv: -kv[1]):
        params.add_row(name, f"{count:,}", f"{100 * count / report['params_total']:.1f}%")
    console.print(params)

    cache = Table(title=f"decoding cache ({report['cache_slots']} slots = layers × loop steps)")
    cache.add_column("dtype")
    cache.add_column("bytes / token", justify="right")
    for dtype, per_token in report["kv_cache_bytes_per_token_by_dtype"].items():
        cache.add_row(dtype, f"{per_token:,} ({human_bytes(per_token)})")
    console.print(cache)
    ctx = Table(title="bf16 cache at context")
    ctx.add_column("tokens", justify="right")
    ctx.add_column("bytes", justify="right")
    for tokens, total in report["cache_bytes_at_context"].items():
        ctx.add_row(f"{int(tokens):,}", human_bytes(total))
    console.print(ctx)

    files = report["checkpoint"]
    if files.get("files") is None:
        console.print(f"checkpoint: {files['hub_id']} @ {files['revision'] or 'unpinned'} ({files['note']})")
    else:
        for f in files["files"]:
            console.print(f"file {f['name']}: {human_bytes(f['bytes'])}")
        console.print(f"{files['tensors']} tensors, stored dtypes {files['tensor_dtypes']}")
