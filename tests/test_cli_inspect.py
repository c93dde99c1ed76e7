"""`lt2convert inspect` and the one-line errors users get for bad checkpoints."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.testing import llama_config, ouro_config, write_checkpoint


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_inspect_ouro_preset_offline_matches_published_figures():
    result = run("inspect", "ouro-1.4b", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["params_total"] == 1434652673
    assert report["kv_cache_bytes_per_token"] == 786432  # bf16, 96 (step, layer) slots
    assert report["num_layers"] == 24 and report["loop_steps"] == 4
    assert report["layer_types"] == ["full_attention"] * 24
    assert report["cache_bytes_at_context"]["32768"] == 24 * 1024**3


def test_inspect_ouro_2_6b_preset_parameter_count():
    report = json.loads(run("inspect", "ouro-2.6b", "--json").output)
    assert report["params_total"] == 2667974657


def test_inspect_local_checkpoint_lists_files_and_dtypes(tmp_path):
    write_checkpoint(tmp_path, llama_config(), shards=2)
    report = json.loads(run("inspect", str(tmp_path), "--json").output)
    assert report["loop_steps"] == 1 and report["exit_gate"] is False
    assert [f["name"] for f in report["checkpoint"]["files"]] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert report["checkpoint"]["tensor_dtypes"] == {"F32": report["checkpoint"]["tensors"]}
    assert "lm_head" not in report["params_by_component"]  # tied to the embeddings


def test_inspect_table_output(tmp_path):
    result = run("inspect", str(write_checkpoint(tmp_path, ouro_config())))
    assert result.exit_code == 0
    assert "decoding cache" in result.output and "12 slots" in result.output


def load_error(path) -> str:
    result = run("inspect", str(path))
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_folder_without_config(tmp_path):
    assert "config.json" in load_error(tmp_path)


def test_unsupported_model_type(tmp_path):
    write_checkpoint(tmp_path, {**llama_config(), "model_type": "gpt2"})
    message = load_error(tmp_path)
    assert "model_type 'gpt2' is not supported" in message


def test_unknown_preset_or_bad_source():
    message = load_error("ouro-9b")
    assert "ouro-9b" in message and "ouro-1.4b" in message


def test_missing_shard(tmp_path):
    write_checkpoint(tmp_path, ouro_config(), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert "shard file(s) missing: model-00002-of-00002.safetensors" in load_error(tmp_path)


def test_truncated_shard(tmp_path):
    write_checkpoint(tmp_path, ouro_config())
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = load_error(tmp_path)
    assert "model.safetensors" in message and "truncated" in message


def test_wrong_tensor_shape_is_named(tmp_path):
    from lt2convert import load_model
    from lt2convert.io.checkpoint import CheckpointError

    write_checkpoint(tmp_path, ouro_config())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    expected = r"mlp\.gate_proj\.weight has shape \[112, 64\], config expects \[96, 64\]"
    assert "gate_proj.weight has shape [112, 64]" in load_error(tmp_path)
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from lt2convert import load_model
    from lt2convert.io.checkpoint import CheckpointError

    write_checkpoint(tmp_path, ouro_config())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.early_exit_gate.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="early_exit_gate.bias"):
        load_model(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ouro_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    from lt2convert import load_model
    from lt2convert.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(tmp_path)


def test_string_field_in_config_is_named(tmp_path):
    write_checkpoint(tmp_path, ouro_config())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    message = load_error(tmp_path)
    assert "config.json" in message and 'field "hidden_size" is \'64\'; expected an integer' in message


def test_integer_weight_is_named(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path, ouro_config())
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].to(torch.int32)
    save_file(weights, tmp_path / "model.safetensors")
    message = load_error(tmp_path)
    assert "model.safetensors: tensor model.embed_tokens.weight is stored as I32" in message


COMMANDS = ["inspect", "plan", "convert", "bench", "eval", "report", "distill", "pipeline", "fetch-asset"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_dash_h(command):
    result = run(command, "-h")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {command}") or result.output.startswith("Usage:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report"], "Missing argument 'INPUTS...'"),
        (["eval", "m", "--suite", "nope"], "'nope' is not one of"),
        (["eval", "m"], "give exactly one of --suite and --tasks"),
        (["distill", "-o", "run"], "give STUDENT, --teacher and --recipe"),
        (["plan", "ouro-1.4b", "--device", "h100"], "--device is now --hardware"),
        (["plan", "ouro-1.4b", "--batch", "1"], "--batch is now --batch-size"),
        (["bench", "ouro-1.4b", "--batch", "1"], "--batch is now --batch-size"),
    ],
)
def test_usage_errors_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize("spec", ["./no-such-checkpoint", "no/such/checkpoint", "tests/no-such-checkpoint"])
def test_missing_local_folder_is_named_not_a_hub_error(spec):
    result = run("inspect", spec)  # tests/ exists, so tests/NAME is a local path, not a hub id
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: no such folder: {spec}"


def test_preset_without_its_asset_names_the_fetch_command(tmp_path, monkeypatch):
    from lt2convert import loading
    from lt2convert.io.hub import SourceError
    from lt2convert.loading import resolve_checkpoint

    def offline(hub_id, revision):
        raise SourceError(f"{hub_id}: not in the local cache and the hub cannot be reached")

    monkeypatch.setenv("LT2CONVERT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(loading, "download", offline)

    with pytest.raises(SourceError, match="run `lt2convert fetch-asset smollm2-135m`"):
        resolve_checkpoint("smollm2-135m")
