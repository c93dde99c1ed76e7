"""The report's figures (matplotlib, PNG bytes): per-task score bars, training curves, decode speed and cache
against context, quality against speed, and adaptive exit's speed against perplexity. Each function takes plain
data prepared by `lt2convert.report` and returns the PNG, or None when there is nothing to draw."""

from __future__ import annotations

import io

TEACHER_COLOR = "#3b3b3b"
STUDENT_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")
BASELINE_COLOR = "#c7c7c7"
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def context_label(tokens: float) -> str:
    """1024 -> '1K', 32768 -> '32K', 1536 -> '1.5K', 100 -> '100'."""
    if tokens >= 1024:
        k = tokens / 1024
        return f"{k:.0f}K" if abs(k - round(k)) < 0.05 else f"{k:.1f}K"
    return f"{tokens:.0f}"


def model_colors(teacher: str | None, runs: list[str]) -> dict[str, str]:
    """The teacher dark grey, every other run its own colour (stable across figures)."""
    colors = {}
    others = [name for name in runs if name != teacher]
    for i, name in enumerate(others):
        colors[name] = STUDENT_COLORS[i % len(STUDENT_COLORS)]
    if teacher is not None:
        colors[teacher] = TEACHER_COLOR
    return colors


def score_bars(panels: list[dict], colors: dict[str, str]) -> bytes | None:
    """One small panel per task: a horizontal bar per model (runs in their colours, paper baselines grey).
    panels: [{"title", "subtitle", "higher_is_better", "bars": [(model, value, stderr|None, is_run)]}]."""
    panels = [p for p in panels if p["bars"]]
    if not panels:
        return None
    plt = _pyplot()
    ncols = min(4 if len(panels) > 9 else 3, len(panels))
    panels = sorted(panels, key=lambda p: -len(p["bars"]))  # rows of alike panels: no row is mostly padding
    rows = [panels[i: i + ncols] for i in range(0, len(panels), ncols)]
    slots = [max(len(p["bars"]) for p in row) for row in rows]
    heights = [0.75 + 0.24 * n for n in slots]
    fig, axes = plt.subplots(len(rows), ncols, figsize=(13, sum(heights) + 0.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for r, row in enumerate(rows):
        for c in range(ncols):
            if c >= len(row):
                axes[r][c].axis("off")
                continue
            _bar_panel(axes[r][c], row[c], slots[r], colors)
    fig.tight_layout(h_pad=1.2, w_pad=1.5)
    return _png(fig)


def _bar_panel(ax, panel: dict, slots: int, colors: dict[str, str]) -> None:
    """Bars of one panel at a fixed thickness: `slots` positions from the top, the unused ones left empty."""
    bars = panel["bars"]
    names = [b[0] for b in bars]
    values = [b[1] for b in bars]
    errors = [b[2] or 0.0 for b in bars]
    fill = [colors.get(b[0], STUDENT_COLORS[0]) if b[3] else BASELINE_COLOR for b in bars]
    y = [slots - 1 - i for i in range(len(bars))]
    ax.barh(y, values, xerr=errors if any(errors) else None, color=fill, height=0.7,
            error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#555"})
    ax.set_yticks(y, [n if len(n) <= 22 else n[:21] + "…" for n in names], fontsize=8)
    for label, bar in zip(ax.get_yticklabels(), bars, strict=True):
        if bar[3]:
            label.set_fontweight("bold")
    top = max(v + e for v, e in zip(values, errors, strict=True)) if values else 1
    ax.set_xlim(0, top * 1.22 if top > 0 else 1)
    for yi, value, error in zip(y, values, errors, strict=True):
        ax.text(value + error, yi, f" {value:.1f}" if abs(value) < 1e4 else f" {value:.3g}", va="center",
                fontsize=7.5)
    arrow = "higher is better" if panel["higher_is_better"] else "lower is better"
    ax.set_title(f"{panel['title']}\n{panel['subtitle']} ({arrow})", loc="left", fontsize=9)
    ax.tick_params(axis="x", labelsize=7.5)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_ylim(-0.6, slots - 0.4)


def training_curves(series: dict[str, list[dict]]) -> bytes | None:
    """One panel per stage kind; a line per (run, stage) of loss against the stage's tokens, log loss axis.
    series: kind -> [{"label", "tokens": [...], "loss": [...]}]."""
    series = {kind: lines for kind, lines in series.items() if any(line["tokens"] for line in lines)}
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(min(13, 4.4 * len(series)), 3.4), squeeze=False)
    for ax, (kind, lines) in zip(axes.flat, series.items(), strict=True):
        for i, line in enumerate(lines):
            color = STUDENT_COLORS[i % len(STUDENT_COLORS)]
            tokens, loss = line["tokens"], line["loss"]
            window = max(1, len(loss) // 20)  # a running mean over ~5% of the steps shows the trend
            smooth = [sum(loss[max(0, j - window + 1): j + 1]) / len(loss[max(0, j - window + 1): j + 1])
                      for j in range(len(loss))]
            ax.plot(tokens, loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(tokens, smooth, color=color, linewidth=1.6, label=line["label"])
        if all(v > 0 for line in lines for v in line["loss"]):
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
        ax.set_title(f"{kind} stages", loc="left")
        ax.set_xlabel("tokens trained in the stage")
        ax.set_ylabel("loss")
        ax.xaxis.set_major_formatter(_token_formatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.tight_layout(w_pad=2)
    return _png(fig)


def _plain_log_axis(axis) -> None:
    """Log-scale ticks at 1, 2 and 5 per decade, written as plain numbers (a range inside one decade would
    otherwise get no labels at all, and 10^k labels read badly)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _token_formatter():
    from matplotlib.ticker import FuncFormatter

    def text(value: float, _pos) -> str:
        if value >= 1e6:
            return f"{value / 1e6:g}M"
        if value >= 1e3:
            return f"{value / 1e3:g}k"
        return f"{value:g}"

    return FuncFormatter(text)


def _log_context_axis(ax, contexts: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [context_label(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlim(contexts[0] / 1.3, contexts[-1] * 1.3)
    ax.set_xlabel("context (tokens, log scale)")


def speed_and_cache(lines: list[dict], crossovers: list[tuple[str, float]], title: str) -> dict[str, bytes]:
    """Decode tokens/s and cache bytes against context, both on log axes, the crossover marked.
    lines: [{"label", "color", "contexts", "tokens_per_s", "cache_bytes"}]; crossovers: (label, context)."""
    lines = [line for line in lines if line["contexts"]]
    if not lines:
        return {}
    plt = _pyplot()
    contexts = sorted({c for line in lines for c in line["contexts"]})
    out = {}
    for name, field, ylabel in (
        ("decode_speed_vs_context", "tokens_per_s", "decode tokens/s (log scale)"),
        ("cache_memory_vs_context", "cache_bytes", "cache (MiB, log scale)"),
    ):
        fig, ax = plt.subplots(figsize=(6.3, 3.8))
        for line in lines:
            values = [v / 2**20 if field == "cache_bytes" else v for v in line[field]]
            ax.plot(line["contexts"], values, marker="o", color=line["color"], label=line["label"], linewidth=1.8)
            ax.annotate(_short(values[-1], field), (line["contexts"][-1], values[-1]), fontsize=7.5,
                        xytext=(4, 0), textcoords="offset points", va="center", color=line["color"])
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        _log_context_axis(ax, contexts)
        if field == "tokens_per_s":
            for label, at in crossovers:
                ax.axvline(at, color="#888", linestyle=":", linewidth=1.2)
                ax.annotate(f"{label}\nfaster from ≈{context_label(at)}", (at, 0.04),
                            xycoords=("data", "axes fraction"), fontsize=7.5, xytext=(4, 0),
                            textcoords="offset points", color="#444")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{'decode speed' if field == 'tokens_per_s' else 'cache memory'} vs context ({title})",
                     loc="left")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out[name] = _png(fig)
    return out


def _short(value: float, field: str) -> str:
    if field == "cache_bytes":
        return f"{value:,.0f} MiB" if value >= 10 else f"{value:.2g} MiB"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def quality_vs_speed(points: list[dict], context: int) -> bytes | None:
    """One point per model: decode tokens/s at `context` (log axis) against its quality score (teacher = 100).
    points: [{"name", "color", "speed", "quality"}]."""
    points = [p for p in points if p["speed"] and p["quality"] is not None]
    if len(points) < 1:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.3, 3.8))
    for p in points:
        ax.scatter([p["speed"]], [p["quality"]], s=70, color=p["color"], zorder=3)
        ax.annotate(f"{p['name']} ({p['quality']:.0f})", (p["speed"], p["quality"]), fontsize=8,
                    xytext=(6, 4), textcoords="offset points")
    ax.axhline(100, color="#888", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    speeds = [p["speed"] for p in points]
    ax.set_xlim(min(speeds) / 1.6, max(speeds) * 1.9)
    qualities = [p["quality"] for p in points]
    ax.set_ylim(min(0, min(qualities) - 5), max(110, max(qualities) + 10))
    ax.set_xlabel(f"decode tokens/s at {context_label(context)} context (log scale)")
    ax.set_ylabel("quality score (teacher = 100)")
    ax.set_title("quality vs decode speed", loc="left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def exit_speed_quality(series: list[dict]) -> bytes | None:
    """Adaptive exit: one point per threshold, decode speed against held-out perplexity, each as a ratio to every
    loop step; one labelled line per model. series: [{"name", "color", "thresholds", "speed", "perplexity"}]."""
    series = [s for s in series if s["thresholds"]]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.3, 3.8))
    for s in series:
        ax.plot(s["speed"], s["perplexity"], color=s["color"], linewidth=1, alpha=0.45)  # thresholds in order
        ax.scatter(s["speed"], s["perplexity"], s=26, color=s["color"], label=s["name"], zorder=3)
        for threshold, x, y in zip(s["thresholds"], s["speed"], s["perplexity"], strict=True):
            ax.annotate(f"{threshold:g}", (x, y), fontsize=7, color=s["color"], xytext=(4, 3),
                        textcoords="offset points")
    ax.axhline(1.0, color="#888", linestyle=":", linewidth=1)
    ax.axvline(1.0, color="#888", linestyle=":", linewidth=1)
    ax.set_xlabel("decode speed ÷ every loop step (×)")
    ax.set_ylabel("held-out perplexity ÷ every loop step (×)")
    ax.set_title("adaptive exit: speed vs quality (labels: exit threshold)", loc="left")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)
