"""`report`: the leaderboard compares only matching task/shots/metric/filter, the headline compares each student
with its teacher, the HTML is self-contained with its plots (score bars even without a bench), and it renders in a
headless browser (skipped when /usr/bin/chromium is absent; scripts/test.sh installs it)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.report import crossover, write_report

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


def fake_exit_sweep() -> dict:
    """An adaptive-exit sweep file (lt2convert.exit_sweep.sweep_model results by model name), 4 loop steps."""

    def sweep(speeds: list[float], perplexity: list[float]) -> dict:
        rows = [{"threshold": t, "steps_per_token": 1 + 3 * t, "decode_steps": 1 + 3 * t,
                 "decode_tokens_per_s": 50 * s, "speed_vs_every_step": s, "perplexity": 20 * p,
                 "perplexity_vs_every_step": p} for t, s, p in zip((0.3, 0.6, 1.0), speeds, perplexity, strict=True)]
        return {"model": "x", "loop_steps": 4, "texts": ["jargon"], "device": "cpu", "dtype": "fp32", "rounds": 3,
                "prompt_tokens": 64, "decode_tokens": 32, "rows": rows}

    return {"./ouro-1.4b": sweep([2.1, 1.4, 1.0], [1.35, 1.06, 1.0]),
            "./ouro-hybrid": sweep([1.9, 1.3, 1.0], [1.5, 1.1, 1.0])}


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
    teacher = tmp_path / "evals" / "ouro-1.4b"
    teacher.mkdir()
    (teacher / "results_2026-11-29T09-00-00.json").write_text(json.dumps(lm_eval_results("./ouro-1.4b", {
        "hellaswag": (0, {"acc,none": 0.55, "acc_norm,none": 0.66}, 0.004),
        "gsm8k_cot": (3, {"exact_match,strict-match": 0.60, "exact_match,flexible-extract": 0.62}, 0.013),
        "piqa": (0, {"acc,none": 0.75}, 0.01),
    })))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(lm_eval_results("HuggingFaceTB/SmolLM2-1.7B", {
        "arc_challenge": (25, {"acc,none": 0.50, "acc_norm,none": 0.53}, 0.014),
        "piqa": (0, {"acc,none": 0.77}, 0.01),
    })))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(fake_bench()))
    (tmp_path / "exit-sweep.json").write_text(json.dumps(fake_exit_sweep()))
    return tmp_path / "evals", other, bench


def md_rows(md: str, first: str) -> list[list[str]]:
    """The rows of the Markdown table whose header starts with `first`, header first."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def cell(md: str, benchmark: str, model: str) -> str:
    """The leaderboard's number for a benchmark row (its header, e.g. 'ARC-C ‡') and a model column."""
    header, *rows = md_rows(md, "group")
    row = next(r for r in rows if r[1] == benchmark)
    return row[header.index(model)]


def benchmarks(md: str) -> list[str]:
    return [r[1] for r in md_rows(md, "group")[1:]]


def test_leaderboard_compares_only_matching_cells(inputs, tmp_path):
    folder, other, bench = inputs
    out = write_report([folder, other], baselines="ouro-paper", bench=[bench], output=tmp_path / "report")
    md = (out / "leaderboard.md").read_text()
    # baseline row; ‡: the paper does not say acc or acc_norm; 25-shot acc_norm goes into the baseline row
    assert cell(md, "ARC-C ‡", "./ouro-hybrid") == "61.23 ± 1.40"
    assert cell(md, "ARC-C ‡", "Ouro 1.4B (T=4)") == "60.92"
    assert cell(md, "ARC-C ‡", "Ouro 2.6B (T=4)") == "**66.40**"  # best of the comparable row
    assert "- ./ouro-hybrid — ARC-C [arc_challenge, 25-shot, acc_norm]" in md
    # 10 baselines + ours + SmolLM2's 25-shot acc_norm; "beats" counts baselines only (SmolLM2 is another run).
    assert "61.23, rank 3 of 12, beats 8 baseline(s); next above: Qwen3 4B 63.65" in md
    # 25-shot acc is another metric: its own, flagged column.
    assert "metric acc, the baseline's is acc_norm" in md
    # 0-shot HellaSwag is not placed in the 10-shot baseline column and is flagged.
    assert cell(md, "HellaSwag ‡", "./ouro-hybrid") == "—"
    assert "HellaSwag (hellaswag) †" in benchmarks(md)
    assert "0-shot, not comparable to the 10-shot baseline" in md
    # gsm8k_cot strict-match is the paper's GSM8K; flexible-extract and the plain gsm8k task are not.
    assert cell(md, "GSM8K", "./ouro-hybrid") == "55.00 ± 1.30"
    assert "filter flexible-extract, the baseline's is strict-match" in md
    assert "task gsm8k is not the prompt of the GSM8K baseline (gsm8k_cot)" in md
    header, *rows = md_rows(md, "group")
    plain = [r for r in rows if r[1].startswith("GSM8K (gsm8k) †")]
    assert plain and all(r[header.index("./ouro-hybrid")] != "—" and r[header.index("Qwen3 4B")] == "—" for r in plain)
    # A task the paper lacks gets its own row; both lm-eval models share it.
    assert cell(md, "piqa", "./ouro-hybrid") == "74.00 ± 1.00"
    assert cell(md, "piqa", "HuggingFaceTB/SmolLM2-1.7B") == "77.00 ± 1.00"
    assert "arXiv 2510.25741" in md and "Table 7" in md


@pytest.fixture
def distill_run(tmp_path):
    """A distill run folder as the trainer lays it out: run.json (the stages and their kinds), metrics.jsonl."""
    run = tmp_path / "distill"
    run.mkdir()
    stages = [{"name": "align", "kind": "align"}, {"name": "kd", "kind": "kd"}, {"name": "kd-long", "kind": "kd"}]
    (run / "run.json").write_text(json.dumps({"stages": stages}))
    lines = [json.dumps({"stage": stage["name"], "step": step, "tokens": 512 * step, "loss": 4.0 / step})
             for stage in stages for step in range(1, 31)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def images_in(page: str) -> list[str]:
    return sorted(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page))


def test_html_self_contained_with_plots(inputs, distill_run, tmp_path):
    folder, other, bench = inputs
    out = write_report([folder, other], bench=[bench], output=tmp_path / "report", runs=[distill_run],
                 teacher="./ouro-1.4b")
    page = (out / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert all(r.startswith("data:image/png;base64,") or r == "https://arxiv.org/abs/2510.25741" for r in refs), refs
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page
    assert images_in(page) == ["cache_memory_vs_context", "decode_speed_vs_context", "quality_vs_decode_speed",
                               "scores_by_task", "training_curves"]
    assert '<table id="leaderboard">' in page and "<style>" in page
    assert page.index('class="card"') < page.index('alt="scores_by_task"') < page.index('id="leaderboard"')
    # Atomic replace: a second run over the same folder leaves one complete report and no temporary folders.
    write_report([other], output=out)
    assert "./ouro-hybrid" not in (out / "leaderboard.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "distill", "evals", "exit-sweep.json",
                                                          "other.json", "report"]


def test_exit_sweep_section_only_with_a_sweep_file(inputs, tmp_path):
    folder, other, bench = inputs
    sweep = tmp_path / "exit-sweep.json"
    out = write_report(
        [folder, other], bench=[bench], output=tmp_path / "with", teacher="./ouro-1.4b", exit_sweep=sweep
    )
    page, md = (out / "index.html").read_text(), (out / "leaderboard.md").read_text()
    assert "exit_speed_quality" in images_in(page) and 'id="adaptive-exit"' in page
    header, *rows = md_rows(md, "threshold")
    assert header == ["threshold", "./ouro-1.4b steps/token", "./ouro-1.4b decode speed", "./ouro-1.4b perplexity",
                      "./ouro-hybrid steps/token", "./ouro-hybrid decode speed", "./ouro-hybrid perplexity"]
    assert rows[0] == ["0.3", "1.90", "2.10×", "1.350×", "1.90", "1.90×", "1.500×"]
    assert rows[-1] == ["1", "4.00", "1.00×", "1.000×", "4.00", "1.00×", "1.000×"]
    assert "Every step: ./ouro-1.4b 50.0 tokens/s, perplexity 20.00" in md
    without = write_report([folder, other], bench=[bench], output=tmp_path / "without", teacher="./ouro-1.4b")
    page, md = (without / "index.html").read_text(), (without / "leaderboard.md").read_text()
    assert "exit_speed_quality" not in images_in(page) and "adaptive-exit" not in page
    assert "Adaptive exit" not in md
    broken = fake_exit_sweep()
    del broken["./ouro-hybrid"]["rows"][1]["perplexity_vs_every_step"]
    sweep.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"\./ouro-hybrid\.rows\[1\]\.perplexity_vs_every_step: expected a number"):
        write_report([folder, other], output=tmp_path / "broken", teacher="./ouro-1.4b", exit_sweep=sweep)
    assert not (tmp_path / "broken").exists()


def test_report_command_takes_the_exit_sweep_file(inputs, tmp_path):
    folder, other, bench = inputs
    result = CliRunner().invoke(main, ["report", str(folder), str(other), "--bench", str(bench), "--teacher",
                                       "./ouro-1.4b", "--exit-sweep", str(tmp_path / "exit-sweep.json"),
                                       "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert 'id="adaptive-exit"' in (tmp_path / "cli" / "index.html").read_text()


def test_report_from_results_alone_has_score_plots(inputs, tmp_path):
    folder, other, _ = inputs
    out = write_report([folder, other], baselines="none", output=tmp_path / "report", teacher="./ouro-1.4b")
    page = (out / "index.html").read_text()
    assert images_in(page) == ["scores_by_task"]
    md = (out / "leaderboard.md").read_text()
    assert "## Speed" not in md and "## ./ouro-hybrid vs ./ouro-1.4b" in md


def test_headline_quality_score_and_speed_table(inputs, tmp_path):
    folder, other, bench = inputs
    md = (write_report([folder, other], bench=[bench], output=tmp_path / "r", teacher="./ouro-1.4b")
          / "leaderboard.md").read_text()
    # Quality kept per task on the primary metric (piqa acc, hellaswag acc_norm 0-shot, gsm8k_cot strict-match);
    # arc_challenge and plain gsm8k have no teacher number and are left out.
    kept = [74 / 75, 70.1 / 66, 55 / 60]
    assert f"keeps {100 * sum(kept) / 3:.0f}% of the teacher's quality (quality score over 3 task(s))" in md
    student = md_rows(md, "task")
    assert student[0] == ["task", "metric", "./ouro-1.4b", "./ouro-hybrid", "change"]
    assert ["piqa", "acc ↑", "75.00", "74.00", f"-1.00, {100 * 74 / 75:.0f}% kept"] in student
    # Speed from the bench: the ratio and cache at the longest context, and where the student gets faster.
    speedup = 125.0 / 22.0
    assert f"decodes {speedup:.2f}× the teacher's speed at 8,192 tokens" in md
    assert "8.0× less cache at 8,192 tokens" in md
    assert "faster at every benched context (from 1,024 tokens)" in md
    header, *rows = md_rows(md, "measure")
    assert header == ["measure", "./ouro-1.4b", "./ouro-hybrid", "./ouro-hybrid ÷ ./ouro-1.4b"]
    assert ["decode tokens/s at 8,192", "22.00", "125.00", f"{speedup:.2f}×"] in rows
    assert ["cache at 8,192", "2.00 GiB", "256.00 MiB", f"{2**28 / 2**31:.2f}×"] in rows


def test_crossover_is_interpolated_on_log_axes():
    at, text = crossover([(1024, 0.5), (4096, 2.0), (16384, 4.0)])
    assert at == pytest.approx(2048) and "between 1,024 and 4,096" in text
    assert crossover([(1024, 0.5), (32768, 0.9)]) == (None, "not faster up to 32,768 tokens (0.90× the teacher's "
                                                            "speed there)")
    assert crossover([(1024, 1.5)])[0] == 1024


def test_training_curves_need_metrics(distill_run, tmp_path):
    with open(distill_run / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:91: not a distill metrics record"):
        write_report([], baselines="ouro-paper", runs=[distill_run], output=tmp_path / "r")
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        write_report([], baselines="ouro-paper", runs=[tmp_path], output=tmp_path / "r")


def test_report_cli(inputs, distill_run, tmp_path):
    folder, other, bench = inputs
    result = CliRunner().invoke(main, ["report", str(folder), str(other), "--bench", str(bench), "--runs",
                                       str(distill_run), "--teacher", "./ouro-1.4b", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "training_curves" in images_in((tmp_path / "r" / "index.html").read_text())
    wrong = CliRunner().invoke(main, ["report", str(other), "--teacher", "nobody", "-o", str(tmp_path / "y")])
    assert wrong.exit_code == 1 and "--teacher 'nobody': no results for that model" in wrong.output
    bad = CliRunner().invoke(main, ["report", str(other), "--baselines", "nope", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown baselines 'nope'" in bad.output and not (tmp_path / "x").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (scripts/test.sh installs it with apt-get when it can)")
def test_html_renders_in_headless_chromium(inputs, distill_run, tmp_path):
    folder, other, bench = inputs
    out = write_report([folder, other], bench=[bench], output=tmp_path / "report", runs=[distill_run],
                 teacher="./ouro-1.4b", exit_sweep=tmp_path / "exit-sweep.json")
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from screenshot_report import MEASURE, chromium_flags

    flags = [CHROMIUM, *chromium_flags(tmp_path / "profile"), "--window-size=1400,2400"]
    url = (out / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 20_000, "chromium wrote no (or an empty) screenshot"
    measured = tmp_path / "measure.html"
    measured.write_text((out / "index.html").read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run([*flags, "--dump-dom", measured.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    assert '<table id="leaderboard">' in dom and "Ouro 1.4B (T=4)" in dom
    assert dom.count('src="data:image/png;base64,') == 6 and 'id="adaptive-exit"' in dom
    widths = dict(part.split("=") for part in dom.split("<title>", 1)[1].split("</title>", 1)[0].split())
    assert int(widths["scroll-width"]) <= int(widths["client-width"]), widths  # no sideways scrolling at 1,400 px


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
    out = write_report([folder], bench=[path], output=tmp_path / "r", teacher="./ouro-1.4b")
    page = (out / "index.html").read_text()
    # the teacher was not benched: speed and cache plots, no speed headline and no quality-vs-speed point
    assert images_in(page) == ["cache_memory_vs_context", "decode_speed_vs_context", "scores_by_task"]


def test_report_output_policy_and_non_utf8_input(inputs, tmp_path, monkeypatch):
    folder, other, _ = inputs
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("my homepage")  # an index.html alone does not make a report folder
    refused = CliRunner().invoke(main, ["report", str(other), "--baselines", "none", "-o", str(mine)])
    assert refused.exit_code == 1 and "site: exists and is not an earlier report folder" in refused.output
    assert (mine / "index.html").read_text() == "my homepage"
    out = tmp_path / "r"
    for _ in range(2):  # the second run replaces the first (its marker)
        done = CliRunner().invoke(main, ["report", str(other), "--baselines", "none", "-o", str(out)])
        assert done.exit_code == 0, done.output
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"results": {"caf\xe9": {}}}'.encode("latin-1"))
    bad = CliRunner().invoke(main, ["report", str(latin1), "--baselines", "none", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    assert "latin1.json: not UTF-8 text" in bad.output and not (tmp_path / "x").exists()
    monkeypatch.chdir(out)
    here = CliRunner().invoke(main, ["report", str(other), "--baselines", "none", "-o", "."])
    assert here.exit_code == 1 and "current directory" in here.output and (out / "leaderboard.md").is_file()
    assert not list(tmp_path.glob(".*"))  # no staging folder left anywhere


def test_a_student_at_zero_counts_in_the_quality_score():
    """Recall lost completely must pull the score down, not drop out of it; only a teacher at 0 has no ratio."""
    from lt2convert.report import Column, MetricKept, quality_score

    acc, ppl = Column("acc", None), Column("ppl", None, higher_is_better=False)
    items = [MetricKept(acc, 100.0, 0.0), MetricKept(acc, 80.0, 80.0), MetricKept(ppl, 10.0, 20.0),
             MetricKept(acc, 0.0, 50.0)]
    assert [item.kept for item in items] == [0.0, 100.0, 50.0, None]
    assert quality_score(items) == (50.0, 3)
