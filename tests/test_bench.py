"""`bench`: the synthetic long-context cache is exactly a real prefill's, and the command's report is complete.

Timings are not asserted (numbers belong in benchmarks: scripts/bench_hybrids.py)."""

import json

import pytest
import torch
from click.testing import CliRunner

from lt2convert.bench import parse_contexts, prefill_cache, random_model, synthetic_cache
from lt2convert.cli import main
from lt2convert.costs import cache_bytes
from lt2convert.loading import config_from_dict, derive_config
from lt2convert.testing import ouro_config, write_checkpoint


def tiny_hybrid():
    source = config_from_dict(ouro_config(num_key_value_heads=2))
    return derive_config(
        source, {"layer_types": ["full_attention", "gdn", "dsa", "swa", "swa_gdn"], "num_hidden_layers": 5,
                 "swa_window": 8, "dsa_topk": 4}
    )


def layout(cache) -> list[dict]:
    return [
        {k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v for k, v in sorted(slot.items())}
        for slot in cache.slots
    ]


@pytest.mark.parametrize("context", [5, 20])  # below and above the SWA window
def test_synthetic_cache_matches_real_prefill(context):
    config = tiny_hybrid()
    model = random_model(config)
    real = prefill_cache(model, torch.randint(0, config.vocab_size, (2, context)))
    synthetic = synthetic_cache(model, 2, context)
    assert layout(synthetic) == layout(real)
    assert synthetic.nbytes() == real.nbytes() == cache_bytes(config, context, "fp32", batch=2)
    assert synthetic.seen_tokens == real.seen_tokens == context
    # The synthetic cache decodes through the normal forward.
    with torch.no_grad():
        out = model(torch.zeros(2, 1, dtype=torch.long), cache=synthetic, use_cache=True)
    assert torch.isfinite(out.logits).all() and synthetic.seen_tokens == context + 1


def test_bench_cli_json(tmp_path):
    gqa = tmp_path / "gqa"
    write_checkpoint(tmp_path / "ouro", ouro_config())
    write_checkpoint(gqa, ouro_config(num_key_value_heads=2))
    result = CliRunner().invoke(
        main,
        ["bench", str(tmp_path / "ouro"), "--vs", str(gqa), "--vs", str(gqa), "--random", "--contexts", "16,32",
         "--decode-tokens", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu", "--json",
         "-o", str(tmp_path / "bench.json")],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert json.loads((tmp_path / "bench.json").read_text()) == report  # -o writes what --json prints
    assert report["contexts"] == [16, 32] and report["context_mode"] == "synthetic"
    assert [m["name"] for m in report["models"]] == [f"{p} (random init)" for p in (tmp_path / "ouro", gqa, gqa)]
    first = report["models"][0]
    assert first["prefill"]["tokens"] == 16 and first["prefill"]["ratio"] == 1.0
    for row in report["models"]:
        assert set(row["decode"]) == {"16", "32"}
        for figures in row["decode"].values():
            assert figures["cache_bytes"] == figures["cost_model_cache_bytes"]
            assert figures["tokens_per_s"] > 0
    for figures in report["models"][1]["decode"].values():
        assert figures["cache_bytes_ratio"] == 0.5  # 2 of 4 kv heads
    for figures in first["decode"].values():
        assert figures["ratio"] == 1.0 and figures["cache_bytes_ratio"] == 1.0


def test_bench_output_replaces_only_an_earlier_bench_file(tmp_path):
    source = write_checkpoint(tmp_path / "ouro", ouro_config())
    config = source / "config.json"
    before = config.read_bytes()
    args = ["bench", str(source), "--random", "--contexts", "8", "--decode-tokens", "1", "--warmup", "0",
            "--repeats", "1", "--device", "cpu"]
    refused = CliRunner().invoke(main, [*args, "-o", str(config)])
    assert refused.exit_code == 1 and "config.json: exists and is not a bench result" in refused.output
    assert config.read_bytes() == before  # a checkpoint's file is never replaced
    first = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "bench.json")])
    again = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "bench.json")])
    assert first.exit_code == 0 and again.exit_code == 0, again.output  # an earlier bench result is replaced


def test_bench_loads_weights_and_prints_tables(tmp_path):
    source = write_checkpoint(tmp_path / "ouro", ouro_config())
    result = CliRunner().invoke(
        main, ["bench", str(source), "--contexts", "8", "--decode-tokens", "1", "--warmup", "0", "--repeats", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "decoding" in result.output and "prefill" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--contexts", "8q"], "unknown context spec '8q'"), (["--batch-size", "0"], "--batch-size must be > 0")],
)
def test_bench_bad_input_is_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["bench", "ouro-1.4b", "--random", *args])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_parse_contexts():
    assert parse_contexts("1k,8K,32768,1k") == [1024, 8192, 32768]
