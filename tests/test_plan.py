"""`lt2convert plan`: strategies, the plan file, the runtime config it derives, and the cost model."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import pytest
import torch
import yaml
from click.testing import CliRunner
from lt2convert.recipes import recipe_names

from lt2convert.cli import main
from lt2convert.costs import cache_bytes, causal_pairs, hardware, kv_cache_bytes_per_token
from lt2convert.loading import load_config
from lt2convert.modeling import LT2ForCausalLM
from lt2convert.plan import (
    PlanError,
    build_plan,
    check_plan_matches,
    ends,
    interleave,
    load_recipe,
    plan_to_config,
    read_plan,
    resolve_spec,
    write_plan,
)
from lt2convert.testing import llama_config, ouro_config, write_checkpoint


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def plan_json(*args: str) -> dict:
    result = run("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def one_line_error(*args: str) -> str:
    result = run("plan", *args)
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def full_layers(layer_types: list[str]) -> list[int]:
    return [i for i, mixer in enumerate(layer_types) if mixer == "full_attention"]


def tiny_plan(folder, layers: str, **recipe_mixers):
    """A plan for a tiny checkpoint written to `folder`, with explicit layers and the tiny recipe's settings."""
    config, _ = load_config(folder)
    spec = resolve_spec("tiny", layers=layers)
    return build_plan(str(folder), config, replace(spec, mixers={**spec.mixers, **recipe_mixers})), config


# ---------------------------------------------------------------------------------------------------------------
# The command on the real Ouro-1.4B preset (embedded config, no download)


def test_plan_ouro_preset_json_offline():
    start = time.perf_counter()
    report = plan_json("ouro-1.4b")
    assert time.perf_counter() - start < 10
    assert [layer["index"] for layer in report["layers"]] == list(range(24))
    mixers = [layer["mixer"] for layer in report["layers"]]
    assert full_layers(mixers) == [4, 9, 14, 19]  # LT2's Full+GDN pattern: every fifth layer stays full
    assert sum(m != "full_attention" for m in mixers) >= 18  # at least three quarters converted
    assert report["strategy"]["recipe"] == "ouro-1.4b-full-gdn"
    assert report["mixers"]["gdn"]["num_heads"] == 16 and report["mixers"]["gdn"]["head_k_dim"] == 128
    cost = report["cost"]
    assert cost["source"]["cache_bytes_per_token"] == 786432
    assert cost["plan"]["cache_bytes_per_token"] == 786432 // 6  # 4 of 24 layers keep a growing cache
    assert cost["source"]["params_total"] == 1434652673


def test_source_costs_agree_with_inspect():
    inspected = json.loads(run("inspect", "ouro-1.4b", "--json").output)
    source = plan_json("ouro-1.4b")["cost"]["source"]
    assert source["cache_bytes_per_token"] == inspected["kv_cache_bytes_per_token"]
    assert source["cache_bytes_at_context"] == inspected["cache_bytes_at_context"]
    assert source["params_by_component"] == inspected["params_by_component"]


def test_gdn_parameters_follow_fla_shapes():
    """GDN per layer (fla's GatedDeltaNet): q,k,v,g,o [2048×2048], a,b [16×2048], A_log, dt_bias [16], three
    depthwise convs [2048×1×4], o_norm [128]."""
    per_layer = 5 * 2048 * 2048 + 2 * 16 * 2048 + 2 * 16 + 3 * 2048 * 4 + 128
    cost = plan_json("ouro-1.4b")["cost"]
    assert cost["params_delta"] == {"mixer:full_attention": -20 * 4 * 2048 * 2048, "mixer:gdn": 20 * per_layer}


def test_decode_speedups_printed_with_assumptions():
    """The figures docs/cost-model.md quotes (Ouro-1.4B, H100, batch 8, bf16)."""
    full_gdn = plan_json("ouro-1.4b", "--hardware", "h100")["cost"]["decode_speedup"]
    gdn_dsa = plan_json("ouro-1.4b", "--recipe", "ouro-1.4b-gdn-dsa")["cost"]["decode_speedup"]
    assert full_gdn == {"8192": pytest.approx(2.97, abs=0.01), "32768": pytest.approx(4.65, abs=0.01)}
    assert gdn_dsa == {"8192": pytest.approx(2.87, abs=0.01), "32768": pytest.approx(6.94, abs=0.01)}
    result = run("plan", "ouro-1.4b", "--recipe", "ouro-1.4b-gdn-dsa")
    assert result.exit_code == 0, result.output
    assert "2.87×" in result.output and "6.94×" in result.output
    assert "assumptions" in result.output and "roofline" in result.output


def test_small_indexer_speedup(tmp_path):
    recipe = tmp_path / "gdn-dsa-64.yaml"
    recipe.write_text("plan:\n  mix: {gdn: 1, dsa: 1}\n  mixers: {dsa: {index_head_dim: 64}}\n")
    speedup = plan_json("ouro-1.4b", "--recipe", str(recipe))["cost"]["decode_speedup"]
    assert speedup == {"8192": pytest.approx(3.38, abs=0.01), "32768": pytest.approx(11.13, abs=0.01)}


def test_decode_projection_options():
    report = plan_json("ouro-1.4b", "--hardware", "cpu", "--batch-size", "1", "--contexts", "4K,64k")
    cost = report["cost"]
    assert cost["assumptions"]["contexts"] == [4096, 65536] and cost["assumptions"]["batch"] == 1
    assert set(cost["source"]["decode"]) == {"4096", "65536"}
    assert cost["source"]["decode"]["4096"]["fits"] is None  # no memory figure for a CPU
    custom = plan_json("ouro-1.4b", "--tflops", "100", "--gbps", "1000")["cost"]["assumptions"]["device"]
    assert (custom["tflops"], custom["gbps"], custom["memory_gb"]) == (100, 1000, 80)


def test_roofline_is_memory_bound_at_small_batch():
    """At batch 8 an H100 needs ~300 FLOPs per byte to be compute-bound; decoding does ~2."""
    decode = plan_json("ouro-1.4b")["cost"]["source"]["decode"]["8192"]
    assert decode["bound"] == "memory"
    weight_bytes = 2 * (1434652673 - 2 * 100663296) * 4 + 2 * 100663296  # T reads of the stack, one of lm_head
    assert abs(decode["weight_bytes_per_step"] - weight_bytes) <= 2 * 4 * 4100  # exit gate and final norm
    seconds = (decode["weight_bytes_per_step"] + 8 * decode["cache_bytes_per_token"]) / 3350e9
    assert decode["tokens_per_s"] == pytest.approx(8 / seconds)


def test_plan_file_written_atomically_and_round_trips(tmp_path):
    target = tmp_path / "plan.yaml"
    target.write_text("# lt2convert plan (an earlier one, replaced)\n")
    report = plan_json("ouro-1.4b", "--recipe", "ouro-1.4b-gdn-dsa", "-o", str(target))
    assert report["plan_file"] == str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]  # no temporary file left behind
    data = yaml.safe_load(target.read_text())
    assert data["format"] == "lt2convert/plan" and data["version"] == 1
    # The index key spans the 4 kv heads the index heads come from (LT2Config's derivation): 4 × 128 dims.
    assert data["mixers"]["dsa"] == {"index_n_heads": 4, "index_head_dim": 512, "topk": 2048}
    plan = read_plan(target)
    assert plan.layer_types == ["dsa", "gdn"] * 12
    write_plan(plan, tmp_path / "again.yaml")
    assert read_plan(tmp_path / "again.yaml") == plan
    again = plan_json("ouro-1.4b", "--plan", str(target))
    assert again["layers"] == report["layers"] and again["cost"] == report["cost"]


# ---------------------------------------------------------------------------------------------------------------
# Strategies and recipes


def test_interleave_and_ends_placements():
    assert full_layers(interleave({"full_attention": 1, "gdn": 3}, 30)) == list(range(3, 30, 4))
    assert interleave({"full_attention": 2, "gdn": 8}, 10) == interleave({"full_attention": 1, "gdn": 4}, 10)
    assert interleave({"gdn": 1, "dsa": 1}, 4) == ["dsa", "gdn", "dsa", "gdn"]
    assert set(interleave({"gdn": 1}, 5)) == {"gdn"}
    assert interleave({"full_attention": 1, "gdn": 1, "dsa": 1}, 3) == ["dsa", "gdn", "full_attention"]
    placed = ends({"full_attention": 1, "gdn": 4}, 24)
    assert full_layers(placed) == [0, 6, 12, 17, 23] and placed.count("gdn") == 19


def test_explicit_layers_and_named_mixes():
    layers = [m["mixer"] for m in plan_json("ouro-1.4b", "--layers", "0,11,23", "--mix", "dsa:1")["layers"]]
    assert full_layers(layers) == [0, 11, 23] and layers.count("dsa") == 21
    report = plan_json("ouro-1.4b", "--layers", "3:swa,5:full_attention")
    assert report["layers"][3]["mixer"] == "swa" and report["layers"][5]["mixer"] == "full_attention"
    assert report["layers"][0]["mixer"] == "gdn"  # the default recipe's non-full mixer fills the rest
    assert report["strategy"] == {"name": "explicit", "recipe": None, "scores": None,
                                  "params": {"mix": {"full_attention": 1, "gdn": 4},
                                             "layers": {"3": "swa", "5": "full_attention"}}}
    swa = plan_json("ouro-1.4b", "--mix", "all-swa")
    assert {m["mixer"] for m in swa["layers"]} == {"swa"} and swa["mixers"] == {"swa": {"window": 2048, "sinks": 4}}


def test_swa_gdn_plan_records_the_window_and_gdn_settings(tmp_path):
    recipe, target = tmp_path / "recipe.yaml", tmp_path / "plan.yaml"
    recipe.write_text("plan:\n  mix: full_attention:1,swa_gdn:3\n  mixers:\n    swa: {window: 128}\n")
    report = plan_json("smollm2-135m", "--recipe", str(recipe), "-o", str(target))
    layers = [m["mixer"] for m in report["layers"]]
    assert full_layers(layers) == list(range(3, 30, 4)) and layers.count("swa_gdn") == 23
    assert report["mixers"]["swa"] == {"window": 128, "sinks": 4} and report["mixers"]["gdn"]["num_heads"] == 9
    config = plan_to_config(read_plan(target), load_config("smollm2-135m")[0])
    assert config.swa_window == 128 and config.swa_sinks == 4 and config.gdn_head_k_dim == config.head_dim
    cost = report["cost"]["plan"]
    assert cost["mixer_layers"]["swa_gdn"] == 23 and cost["params_by_component"]["mixer:swa_gdn"] > 0
    # Its cache is SWA's window plus the GDN state, whatever the context.
    windowed = plan_json("smollm2-135m", "--recipe", str(recipe), "--mix", "full_attention:1,swa:3")["cost"]["plan"]
    assert cost["cache_fixed_bytes"] > 0 and cost["cache_bytes_per_token"] == windowed["cache_bytes_per_token"]
    for context, size in cost["cache_bytes_at_context"].items():
        assert size == windowed["cache_bytes_at_context"][context] + cost["cache_fixed_bytes"]
    data = yaml.safe_load(target.read_text())
    del data["mixers"]["swa"]["sinks"]  # a plan from before sinks: none
    target.write_text(yaml.safe_dump(data))
    assert plan_to_config(read_plan(target), load_config("smollm2-135m")[0]).swa_sinks == 0
    data["mixers"]["swa"]["sinks"] = -1
    target.write_text(yaml.safe_dump(data))
    assert "mixers.swa.sinks: must be >= 0, got -1" in one_line_error("smollm2-135m", "--plan", str(target))
    del data["mixers"]["gdn"]
    target.write_text(yaml.safe_dump(data))
    assert "mixers.gdn: missing (layers use swa_gdn)" in one_line_error("smollm2-135m", "--plan", str(target))


def test_every_shipped_recipe_plans_its_source(tmp_path):
    assert set(recipe_names()) >= {"ouro-1.4b-full-gdn", "ouro-1.4b-gdn-dsa", "smollm2-135m-full-gdn",
                                   "lt2-linear", "lt2-sparse", "tiny"}
    sources = {"tiny": str(write_checkpoint(tmp_path, ouro_config()))}
    for name in recipe_names():
        # smollm2-looped's block is SmolLM2-135M's 30-layer stack, so the preset has its shape.
        source = "smollm2-135m" if name.startswith("smollm2") else sources.get(name, "ouro-1.4b")
        config, _ = load_config(source)
        plan = build_plan(source, config, load_recipe(name))
        target = plan_to_config(plan, config)
        assert target.layer_types == plan.layer_types
    smol = plan_json("smollm2-135m", "--recipe", "smollm2-135m-full-gdn")
    assert full_layers([m["mixer"] for m in smol["layers"]]) == list(range(3, 30, 4))
    assert smol["mixers"]["gdn"]["num_heads"] == 9  # attention heads, not kv heads: GQA k/v are repeated


def test_recipe_file_ignores_other_sections_and_rejects_unknown_plan_keys(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("stages: [{name: align}]\nplan:\n  mix: {full_attention: 1, dsa: 2}\n"
                      "  mixers: {dsa: {topk: 512}}\n")
    report = plan_json("ouro-1.4b", "--recipe", str(recipe))
    assert report["mixers"]["dsa"]["topk"] == 512 and report["strategy"]["recipe"] == str(recipe)
    recipe.write_text("plan:\n  mix: {gdn: 1}\n  ratio: 3\n  mixers: {dsa: {topk: 0}}\n")
    message = one_line_error("ouro-1.4b", "--recipe", str(recipe))
    assert "plan.ratio: unknown key" in message and "plan.mixers.dsa.topk: must be > 0" in message


# ---------------------------------------------------------------------------------------------------------------
# The runtime config a plan derives, and the bytes the runtime actually allocates


def test_plan_to_config_sets_mixers_and_keeps_the_architecture():
    config, _ = load_config("ouro-1.4b")
    plan = build_plan("ouro-1.4b", config, load_recipe("ouro-1.4b-gdn-dsa"))
    target = plan_to_config(plan, config)
    assert target.model_type == "lt2" and target.architectures == ["LT2ForCausalLM"]
    assert target.layer_types == ["dsa", "gdn"] * 12
    assert (target.gdn_num_heads, target.gdn_head_k_dim, target.dsa_topk) == (16, 128, 2048)
    for field in ("hidden_size", "num_hidden_layers", "total_ut_steps", "rope_theta", "sandwich_norm",
                  "use_exit_gate", "tie_word_embeddings", "intermediate_size"):
        assert getattr(target, field) == getattr(config, field)


def test_all_full_plan_keeps_the_source_config():
    config, _ = load_config("ouro-1.4b")
    plan = build_plan("ouro-1.4b", config, resolve_spec(mix="full_attention:1"))
    target = plan_to_config(plan, config)
    assert plan.mixers == {} and target.layer_types == config.layer_types
    assert plan_json("ouro-1.4b", "--mix", "full_attention:1")["cost"]["decode_speedup"]["8192"] == 1.0


def test_cost_model_bytes_equal_runtime_allocation(tmp_path):
    """A hybrid with all four mixers, prefilled past the SWA window and the DSA top-k, then one decoded token."""
    plan, source = tiny_plan(write_checkpoint(tmp_path, ouro_config(num_hidden_layers=4)),
                             "0:gdn,1:dsa,2:full_attention,3:swa")
    config = plan_to_config(plan, source)
    assert config.layer_types == ["gdn", "dsa", "full_attention", "swa"] and config.swa_window == 4
    torch.manual_seed(0)
    model = LT2ForCausalLM(config).eval()
    tokens = 11
    with torch.no_grad():
        cache = model(torch.randint(0, 256, (2, tokens)), use_cache=True).cache
        assert cache.nbytes() == cache_bytes(config, tokens, "fp32", batch=2)
        cache = model(torch.randint(0, 256, (2, 1)), cache=cache, use_cache=True).cache
    assert cache.nbytes() == cache_bytes(config, tokens + 1, "fp32", batch=2)
    # Per token and loop step: k and v of 4 kv heads × 16 dims in full, swa (until its window fills) and dsa,
    # plus dsa's index key (2 index heads over 2 kv heads' keys: 32 dims). GDN adds nothing per token.
    kv = 2 * 4 * 16 * 4
    assert kv_cache_bytes_per_token(config, "fp32") == 4 * (kv + kv + kv + 32 * 4)


def test_causal_pairs_counts_windowed_attention():
    for tokens in (1, 5, 17):
        for window in (None, 1, 4, 20):
            assert causal_pairs(tokens, window) == sum(min(t, window or t) for t in range(1, tokens + 1))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the field, exit status 1


def test_layer_index_out_of_range():
    assert "layer index 30 is out of range 0..23" in one_line_error("ouro-1.4b", "--layers", "4,30:gdn")


def test_unknown_mixer():
    assert "unknown mixer 'mamba'" in one_line_error("ouro-1.4b", "--mix", "full_attention:1,mamba:4")
    assert "unknown mixer 'mamba'" in one_line_error("ouro-1.4b", "--layers", "3:mamba")


def test_ratio_that_cannot_be_placed():
    message = one_line_error("ouro-1.4b", "--mix", "full_attention:1,gdn:30")
    assert "repeats every 31 layers and cannot be placed on 24" in message
    assert "needs at least 2" in one_line_error("ouro-1.4b", "--mix", "full_attention:1,gdn:30", "--placement", "ends")
    assert "positive integer" in one_line_error("ouro-1.4b", "--mix", "gdn:0")
    message = one_line_error("ouro-1.4b", "--layers", "4", "--mix", "gdn-dsa")
    assert "no single non-full mixer to fill them" in message


def test_bad_plan_file_reports_every_problem_at_once(tmp_path):
    target = tmp_path / "plan.yaml"
    plan_json("ouro-1.4b", "--recipe", "ouro-1.4b-gdn-dsa", "-o", str(target))
    data = yaml.safe_load(target.read_text())
    data["mixers"]["dsa"]["topk"] = 0
    data["layers"][3]["mixer"] = "mamba"
    data["layers"][5]["index"] = 24
    data["colour"] = "blue"
    target.write_text(yaml.safe_dump(data))
    message = one_line_error("ouro-1.4b", "--plan", str(target))
    for expected in ("mixers.dsa.topk: must be > 0, got 0", "layers[3].mixer: expected one of 'full_attention'",
                     "got 'mamba'", "layers[5].index: layer 24 is out of range 0..23", "colour: unknown key",
                     "no entry for layer(s) [5]"):
        assert expected in message


def test_dsa_topk_must_be_positive(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("plan:\n  mix: {dsa: 1}\n  mixers: {dsa: {topk: -5}}\n")
    assert "plan.mixers.dsa.topk: must be > 0, got -5" in one_line_error("ouro-1.4b", "--recipe", str(recipe))


def test_plan_for_another_checkpoint_is_rejected(tmp_path):
    target = tmp_path / "plan.yaml"
    plan_json("ouro-1.4b", "-o", str(target))
    message = one_line_error("ouro-2.6b", "--plan", str(target))
    assert "source.num_hidden_layers: the plan was made for 24, the checkpoint has 48" in message
    # Same architecture, different weights: the hub repository differs.
    message = one_line_error("ouro-1.4b-thinking", "--plan", str(target))
    assert "source.hub_id: the plan was made for ByteDance/Ouro-1.4B" in message
    config, _ = load_config("ouro-1.4b")
    with pytest.raises(PlanError, match="source.revision: the plan was made for 574fa66c.*, the checkpoint is 0123abc"):
        check_plan_matches(read_plan(target), config, "ByteDance/Ouro-1.4B@0123abc")
    check_plan_matches(read_plan(target), config, "ByteDance/Ouro-1.4B")  # no revision given: the repository matches


def test_check_plan_matches_for_local_checkpoints(tmp_path):
    plan, source = tiny_plan(write_checkpoint(tmp_path / "a", ouro_config()), "0:gdn,1:dsa,2:full_attention")
    copy = shutil.copytree(tmp_path / "a", tmp_path / "copy")
    check_plan_matches(plan, source, str(copy))  # a folder is identified by its shape: copies are fine
    wider, _ = load_config(write_checkpoint(tmp_path / "b", ouro_config(hidden_size=96)))
    with pytest.raises(PlanError, match="source.hidden_size: the plan was made for 64, the checkpoint has 96"):
        check_plan_matches(plan, wider)
    llama, _ = load_config(write_checkpoint(tmp_path / "c", llama_config()))
    with pytest.raises(PlanError, match="source.model_type: the plan was made for ouro, the checkpoint has lt2"):
        check_plan_matches(plan, llama)


def test_conflicting_options():
    assert "cannot be combined" in one_line_error("ouro-1.4b", "--plan", __file__, "--mix", "gdn:1")
    assert "needs --layers" in one_line_error("ouro-1.4b", "--placement", "explicit")
    assert "no such recipe" in one_line_error("ouro-1.4b", "--recipe", "nope")
    assert "--batch-size must be > 0" in one_line_error("ouro-1.4b", "--batch-size", "0")
    with pytest.raises(ValueError, match="--gbps must be > 0"):
        hardware("h100", gbps=-1)


def test_plan_output_replaces_only_an_earlier_plan(tmp_path):
    source = write_checkpoint(tmp_path / "src", ouro_config())
    config_text = (source / "config.json").read_text()
    error = one_line_error(str(source), "--recipe", "tiny", "-o", str(source / "config.json"))
    assert "config.json: exists and is not a plan file written by lt2convert" in error
    assert (source / "config.json").read_text() == config_text  # the checkpoint still loads
    plan_file = tmp_path / "plan.yaml"
    plan_json(str(source), "--recipe", "tiny", "-o", str(plan_file))
    plan_json(str(source), "--recipe", "tiny", "--mix", "all-gdn", "-o", str(plan_file))  # ours: replaced
    assert set(read_plan(plan_file).layer_types) == {"gdn"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "src"]


@pytest.mark.parametrize("source", ["ouro", "llama"])
@pytest.mark.parametrize("layer_types", [
    ("full_attention", "gdn", "dsa"),
    ("swa", "swa_gdn", "gdn"),
])
@pytest.mark.parametrize("variant", [
    {},
    {"attention_bias": True, "o_proj_bias": True, "mlp_bias": True},
    {"gdn_use_short_conv": False, "gdn_use_gate": False},
    {"gdn_expand_v": 2.0, "gdn_head_k_dim": 8},
])
def test_parameter_counts_from_the_config_equal_the_model(source, layer_types, variant):
    """`plan` counts parameters from the config (no model code imported); the model is the ground truth."""
    from lt2convert.costs import parameter_counts
    from lt2convert.loading import config_from_dict
    from lt2convert.summary import parameter_breakdown

    raw = ouro_config() if source == "ouro" else llama_config()
    config = config_from_dict({**raw, "model_type": "lt2", "layer_types": list(layer_types), **variant})
    assert parameter_counts(config) == parameter_breakdown(config)
