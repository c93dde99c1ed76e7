"""The CLI's terminal output: rich tables of each command's result (kept apart so library code never prints)."""

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


MIXER_LETTERS = {"full_attention": "F", "gdn": "G", "dsa": "D", "swa": "S", "swa_gdn": "M"}


def human_flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def ratio(source: float, plan: float) -> str:
    return f"×{plan / source:.2f}" if source else ""


def print_plan(report: dict) -> None:
    console = Console()
    source, strategy, cost = report["source"], report["strategy"], report["cost"]
    pinned = f" @ {source['revision'][:8]}" if source["revision"] else ""
    where = f" ({source['hub_id']}{pinned})" if source["hub_id"] else ""
    mix = ",".join(f"{m}:{w}" for m, w in strategy["params"].get("mix", {}).items())
    recipe = f", recipe {strategy['recipe']}" if strategy["recipe"] else ""
    console.print(f"[bold]plan for {source['id']}{where}[/bold]: {strategy['name']}, mix {mix}{recipe}")
    letters = " ".join(MIXER_LETTERS[layer["mixer"]] for layer in report["layers"])
    legend = "F full_attention, G gdn, D dsa, S swa, M swa_gdn"
    console.print(f"layers 0..{len(report['layers']) - 1}: {letters}   ({legend})")
    if strategy.get("scores"):
        console.print("sensitivity (KL when this layer alone is swapped): "
                      + " ".join(f"{i}:{score:.3g}" for i, score in enumerate(strategy["scores"])))
    if strategy["params"].get("retrieval_layers"):
        console.print(f"kept for recall first: layers {strategy['params']['retrieval_layers']} (copy attention: "
                      + " ".join(f"{i}:{x:.2f}" for i, x in enumerate(strategy["params"]["retrieval_scores"])) + ")")
    counts = cost["plan"]["mixer_layers"]
    converted = len(report["layers"]) - counts.get("full_attention", 0)
    console.print(f"{converted} of {len(report['layers'])} layers converted: "
                  + ", ".join(f"{m} ×{n}" for m, n in counts.items()))
    for mixer, settings in report["mixers"].items():
        console.print(f"{mixer}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))

    src, dst, assumptions = cost["source"], cost["plan"], cost["assumptions"]
    table = Table(title=f"cost: source vs plan ({assumptions['dtype']})")
    for column in ("", "source", "plan", "change"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("parameters", f"{src['params_total']:,}", f"{dst['params_total']:,}",
                  f"{dst['params_total'] - src['params_total']:+,}")
    for component, delta in cost["params_delta"].items():
        table.add_row(f"  {component}", f"{src['params_by_component'].get(component, 0):,}",
                      f"{dst['params_by_component'].get(component, 0):,}", f"{delta:+,}")
    per_token = src["cache_bytes_per_token"], dst["cache_bytes_per_token"]
    table.add_row("cache / token", *map(human_bytes, per_token), ratio(*per_token))
    table.add_row("fixed state / sequence", *(human_bytes(side["cache_fixed_bytes"]) for side in (src, dst)))
    for tokens, before in src["cache_bytes_at_context"].items():
        after = dst["cache_bytes_at_context"][tokens]
        table.add_row(f"cache / sequence @ {int(tokens):,}", human_bytes(before), human_bytes(after),
                      ratio(before, after))
    for tokens, before in src["prefill_flops"].items():
        after = dst["prefill_flops"][tokens]
        table.add_row(f"prefill @ {int(tokens):,}", human_flops(before), human_flops(after), ratio(before, after))
    console.print(table)

    device = assumptions["device"]
    memory = f", {device['memory_gb']:.0f} GB" if device["memory_gb"] else ""
    decode = Table(title=f"decoding, batch {assumptions['batch']}, {device['name']} "
                         f"({device['tflops']:g} TFLOP/s, {device['gbps']:g} GB/s{memory})")
    decode.add_column("context", justify="right")
    decode.add_column("model")
    for column in ("tokens/s", "speedup", "bytes/token", "FLOPs/token", "bound", "weights+cache", "fits"):
        decode.add_column(column, justify="right")
    fits = {True: "yes", False: "no", None: "?"}
    for tokens, speedup in cost["decode_speedup"].items():
        for side, figures in (("source", src["decode"][tokens]), ("plan", dst["decode"][tokens])):
            decode.add_row(
                f"{int(tokens):,}" if side == "source" else "", side, f"{figures['tokens_per_s']:,.0f}",
                f"{speedup:.2f}×" if side == "plan" else "", human_bytes(figures["bytes_per_token"]),
                human_flops(figures["flops_per_token"]), figures["bound"], human_bytes(figures["memory_bytes"]),
                fits[figures["fits"]], end_section=side == "plan",
            )
    console.print(decode)
    console.print("assumptions (docs/cost-model.md):")
    for note in [*assumptions["notes"], f"device figures: {device['note']}"]:
        console.print(f"  - {note}")
    if report.get("plan_file"):
        console.print(f"wrote {report['plan_file']}")


def print_bench(report: dict) -> None:
    console = Console()
    console.print(
        f"[bold]bench on {report['device_name']}[/bold] ({report['device']}, {report['dtype']}, batch "
        f"{report['batch']}, {report['torch_threads']} threads), context mode {report['context_mode']}"
    )
    for i, row in enumerate(report["models"]):
        console.print(f"  [{i}] {row['name']}: {row['mixers']} × {row['loop_steps']} loops, {row['params']:,} params")

    def times(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}×"

    prefill = Table(title=f"prefill, {report['prefill_tokens']:,} tokens (median of {report['repeats']})")
    for column in ("model", "tokens/s", "vs [0]"):
        prefill.add_column(column, justify="left" if column == "model" else "right")
    for i, row in enumerate(report["models"]):
        prefill.add_row(f"[{i}]", f"{row['prefill']['tokens_per_s']:,.1f}", times(row["prefill"]["ratio"]))
    console.print(prefill)

    decode = Table(title=f"decoding (median of {report['decode_tokens']} steps after {report['warmup']} warm-up)")
    decode.add_column("context", justify="right")
    decode.add_column("model")
    for column in ("tokens/s", "vs [0]", "cache", "cost model", "cache vs [0]", "peak memory", "peak vs [0]"):
        decode.add_column(column, justify="right")
    models = report["models"]
    for context in report["contexts"]:
        for i, row in enumerate(models):
            f = row["decode"][str(context)]
            peak = f["peak_memory_bytes"]
            decode.add_row(
                f"{context:,}" if i == 0 else "", f"[{i}]", f"{f['tokens_per_s']:,.2f}", times(f["ratio"]),
                human_bytes(f["cache_bytes"]), human_bytes(f["cost_model_cache_bytes"]), times(f["cache_bytes_ratio"]),
                "?" if peak is None else human_bytes(peak), times(f["peak_memory_ratio"]),
                end_section=i == len(models) - 1,
            )
    console.print(decode)
    console.print(f"peak memory: {report['memory_method']}")
    for note in report["notes"]:
        console.print(f"  - {note}")


def print_eval(report: dict) -> None:
    """The table of `lt2convert eval`: one row per task and metric, the suite's chosen metric in bold."""
    mode = report["exit_mode"]
    mode_text = mode if isinstance(mode, str) else ", ".join(f"{k}={v}" for k, v in mode.items())
    title = f"{report['model']}: {report['suite'] or 'tasks'} (exit: {mode_text}"
    title += f", limit {report['limit']})" if report.get("limit") is not None else ")"
    table = Table(title=title)
    for column, justify in (("task", "left"), ("shots", "right"), ("n", "right"), ("metric", "left"),
                            ("value", "right"), ("± stderr", "right")):
        table.add_column(column, justify=justify)
    for row in report["rows"]:
        value = f"{row['value']:.4f}" if abs(row["value"]) < 1e4 else f"{row['value']:.4g}"
        style = "bold" if row["primary"] else None
        table.add_row(
            row["task"],
            "" if row["n_shot"] is None else str(row["n_shot"]),
            "" if row["samples"] is None else str(row["samples"]),
            row["metric"],
            value,
            "" if row["stderr"] is None else f"{row['stderr']:.4f}",
            style=style,
        )
    Console().print(table)
    if report.get("output_file"):
        Console().print(f"results: {report['output_file']}")
