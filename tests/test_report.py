"""`report`: the leaderboard compares only matching task/shots/metric/filter, the HTML is self-contained, and it
renders in a headless browser (skipped when /usr/bin/chromium is absent; scripts/test.sh installs it)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.report import report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def lm_eval_results(model: str, tasks: dict) -> dict:
    """An lm-eval 0.4.13 results file: tasks = {task: (shots, {"metric,filter": value}, stderr)}."""
    results, configs, nshot, better, versions, samples = {}, {}, {}, {}, {}, {}
    for task, (shots, metrics, stderr) in tasks.items():
        results[task] = {"alias": task}
        for key, value in metrics.items():
            metric, filt = key.split(",")
            results[task][key] = value
            results[task][f"{metric}_stderr,{filt}"] = stderr
            better.setdefault(task, {})[metric] = True
        configs[task] = {"task": task, "num_fewshot": shots, "metric_list": [{"metric": m.split(",")[0]}
                                                                             for m in metrics]}
        nshot[task] = shots
        versions[task] = 1.0
        samples[task] = {"original": 100, "effective": 100}
    return {
        "results": results,
        "group_subtasks": {task: [] for task in tasks},
        "configs": configs,
        "versions": versions,
        "n-shot": nshot,
        "higher_is_better": better,
        "n-samples": samples,
        "config": {"model": "hf", "model_args": f"pretrained={model},dtype=bfloat16", "batch_size": "8"},
        "git_hash": "abc1234",
        "date": 1764400000.0,
        "model_name": model,
        "model_name_sanitized": model.replace("/", "__"),
        "lm_eval_version": "0.4.13",
    }


def fake_bench() -> dict:
    def decode(tps: dict, cache: dict) -> dict:
        return {str(c): {"context": c, "seconds_per_step": 1 / tps[c], "tokens_per_s": tps[c], "steps": 2,
                         "warmup": 1, "cache_bytes": cache[c], "cost_model_cache_bytes": cache[c],
                         "peak_memory_bytes": cache[c] * 2} for c in tps}

    return {
        "device": "cuda", "device_name": "NVIDIA H100", "dtype": "bf16", "batch": 8, "contexts": [1024, 8192],
        "context_mode": "prefill", "models": [
            {"name": "./ouro-1.4b", "mixers": "F×24", "decode": decode({1024: 40.0, 8192: 22.0},
                                                                         {1024: 2**28, 8192: 2**31})},
            {"name": "./ouro-hybrid", "mixers": "F×5 G×19", "decode": decode({1024: 130.0, 8192: 125.0},
                                                                             {1024: 2**26, 8192: 2**28})},
        ],
    }


@pytest.fixture
def inputs(tmp_path):
    # lm_eval --output_path evals/out writes evals/out/<model>/results_<date>.json
    ours = tmp_path / "evals" / "ouro-hybrid"
    ours.mkdir(parents=True)
    (ours / "results_2026-11-29T10-00-00.json").write_text(json.dumps(lm_eval_results("./ouro-hybrid", {
        "arc_challenge": (25, {"acc,none": 0.5812, "acc_norm,none": 0.6123}, 0.014),  # matches (25-shot acc_norm)
        "hellaswag": (0, {"acc,none": 0.52, "acc_norm,none": 0.701}, 0.004),  # 0-shot: baseline is 10-shot
        "gsm8k": (3, {"exact_match,strict-match": 0.41, "exact_match,flexible-extract": 0.45}, 0.013),
        "gsm8k_cot": (3, {"exact_match,strict-match": 0.55, "exact_match,flexible-extract": 0.57}, 0.013),
        "piqa": (0, {"acc,none": 0.74}, 0.01),
    })))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(lm_eval_results("HuggingFaceTB/SmolLM2-1.7B", {
        "arc_challenge": (25, {"acc,none": 0.50, "acc_norm,none": 0.53}, 0.014),
        "piqa": (0, {"acc,none": 0.77}, 0.01),
    })))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(fake_bench()))
    return tmp_path / "evals", other, bench


def row(md: str, name: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_leaderboard_compares_only_matching_cells(inputs, tmp_path):
    folder, other, bench = inputs
    out = report([folder, other], baselines="ouro-paper", bench=[bench], output=tmp_path / "report")
    md = (out / "leaderboard.md").read_text()
    header = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| model |")).strip("|").split("|")]
    ours = row(md, "./ouro-hybrid")
    arc = header.index("ARC-C ‡")  # baseline column; ‡: the paper does not say acc or acc_norm
    assert ours[arc] == "61.23 ± 1.40"  # 25-shot acc_norm goes into the baseline column
    assert row(md, "Ouro 1.4B (T=4)")[arc] == "60.92"
    assert row(md, "Ouro 2.6B (T=4)")[arc] == "**66.40**"  # best of the comparable column
    assert "- ./ouro-hybrid — ARC-C [arc_challenge, 25-shot, acc_norm]" in md
    # 10 baselines + ours + SmolLM2's 25-shot acc_norm; "beats" counts baselines only (SmolLM2 is another run).
    assert "61.23, rank 3 of 12, beats 8 baseline(s); next above: Qwen3 4B 63.65" in md
    # 25-shot acc is another metric: its own, flagged column.
    assert "metric acc, the baseline's is acc_norm" in md
    # 0-shot HellaSwag is not placed in the 10-shot baseline column and is flagged.
    hs = header.index("HellaSwag ‡")
    assert ours[hs] == "—"
    assert "HellaSwag (hellaswag) †" in header
    assert "0-shot, not comparable to the 10-shot baseline" in md
    # gsm8k_cot strict-match is the paper's GSM8K; flexible-extract and the plain gsm8k task are not.
    gsm = header.index("GSM8K")
    assert ours[gsm] == "55.00 ± 1.30"
    assert "filter flexible-extract, the baseline's is strict-match" in md
    assert "task gsm8k is not the prompt of the GSM8K baseline (gsm8k_cot)" in md
    plain = [i for i, h in enumerate(header) if h.startswith("GSM8K (gsm8k) †")]
    assert plain and all(ours[i] != "—" for i in plain) and all(row(md, "Qwen3 4B")[i] == "—" for i in plain)
    # A task the paper lacks gets its own column; both lm-eval models share it.
    piqa = header.index("piqa")
    assert ours[piqa] == "74.00 ± 1.00" and row(md, "HuggingFaceTB/SmolLM2-1.7B")[piqa] == "77.00 ± 1.00"
    assert "arXiv 2510.25741" in md and "Table 7" in md


def test_html_self_contained_with_plots(inputs, tmp_path):
    folder, other, bench = inputs
    out = report([folder, other], bench=[bench], output=tmp_path / "report")
    page = (out / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert all(r.startswith("data:image/png;base64,") or r == "https://arxiv.org/abs/2510.25741" for r in refs), refs
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert sorted(images) == ["cache_memory_vs_context", "decode_speed_vs_context", "quality_vs_decode_speed"]
    assert '<table id="leaderboard">' in page and "<style>" in page
    # Atomic replace: a second run over the same folder leaves one complete report and no temporary folders.
    report([other], output=out)
    assert "./ouro-hybrid" not in (out / "leaderboard.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "evals", "other.json", "report"]


def test_report_cli(inputs, tmp_path):
    folder, other, bench = inputs
    result = CliRunner().invoke(main, ["report", str(folder), str(other), "--bench", str(bench), "-o",
                                       str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "index.html").is_file()
    bad = CliRunner().invoke(main, ["report", str(other), "--baselines", "nope", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown baselines 'nope'" in bad.output and not (tmp_path / "x").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (scripts/test.sh installs it with apt-get when it can)")
def test_html_renders_in_headless_chromium(inputs, tmp_path):
    folder, other, bench = inputs
    out = report([folder, other], bench=[bench], output=tmp_path / "report")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", url], capture_output=True,
                   timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 20_000, "chromium wrote no (or an empty) screenshot"
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False).stdout
    assert '<table id="leaderboard">' in dom and "Ouro 1.4B (T=4)" in dom
    assert dom.count('src="data:image/png;base64,') == 3


def test_real_bench_json(inputs, tmp_path):
    """The plots read what `lt2convert.bench.bench` really returns (a tiny random model on the CPU)."""
    from lt2convert.bench import bench
    from lt2convert.loading import config_from_dict
    from lt2convert.testing import ouro_config

    measured = bench([config_from_dict(ouro_config())], [16, 32], decode_tokens=2, device="cpu", warmup=1,
                     repeats=1, names=["./ouro-hybrid"])
    path = tmp_path / "real-bench.json"
    path.write_text(json.dumps(measured))
    folder, _, _ = inputs
    page = (report([folder], bench=[path], output=tmp_path / "r") / "index.html").read_text()
    assert sorted(re.findall(r'<img alt="([^"]+)"', page)) == [
        "cache_memory_vs_context", "decode_speed_vs_context", "quality_vs_decode_speed"]
