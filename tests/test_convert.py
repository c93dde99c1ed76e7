"""convert: identity plans reproduce the source, new mixers start from attention, exports load anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lt2convert import load_model
from lt2convert.convert import InitOptions, convert_checkpoint
from lt2convert.io.checkpoint import LazyCheckpoint
from lt2convert.loading import derive_config, load_config
from lt2convert.testing import llama_config, ouro_config, write_checkpoint

FP32_TOL = 1e-5
# Tiny test checkpoints have no tokenizer for calibration text; calibration has its own test below.
UNCALIBRATED = InitOptions(gdn_conv="identity", gdn_norm="unit")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module", params=["ouro", "llama"])
def source_dir(request, tmp_path_factory):
    config = ouro_config(num_key_value_heads=2) if request.param == "ouro" else llama_config()
    return write_checkpoint(tmp_path_factory.mktemp(request.param), config, seed=3)


def target(source_dir, layer_types, **settings):
    config, _ = load_config(source_dir)
    return derive_config(config, {"layer_types": layer_types, **settings})


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_all_full_attention_plan_reproduces_the_source_exactly(source_dir, tmp_path):
    out = convert_checkpoint(
        source_dir, target(source_dir, ["full_attention"] * 3), tmp_path / "out", init=UNCALIBRATED
    )
    assert torch.equal(logits(load_model(out), IDS), logits(load_model(source_dir), IDS))
    before = LazyCheckpoint(source_dir)
    after = LazyCheckpoint(out)
    assert set(after.names()) == set(before.names())
    assert all(torch.equal(after.get(n), before.get(n)) for n in before.names())


def test_dsa_with_topk_covering_the_sequence_equals_the_source(source_dir, tmp_path):
    hybrid = target(
        source_dir, ["dsa", "full_attention", "dsa"], dsa_topk=64, dsa_index_n_heads=2, dsa_index_head_dim=32
    )
    out = convert_checkpoint(source_dir, hybrid, tmp_path / "out", init=UNCALIBRATED)
    assert relative_error(logits(load_model(out), IDS), logits(load_model(source_dir), IDS)) <= FP32_TOL


def test_gdn_layers_start_from_attention_and_other_tensors_are_untouched(source_dir, tmp_path):
    out = convert_checkpoint(
        source_dir, target(source_dir, ["gdn", "full_attention", "gdn"]), tmp_path / "out", init=UNCALIBRATED
    )
    source, converted = LazyCheckpoint(source_dir), LazyCheckpoint(out)
    kept = [n for n in source.names() if not (n.startswith(("model.layers.0.self_attn", "model.layers.2.self_attn")))]
    assert all(torch.equal(converted.get(n), source.get(n)) for n in kept)
    assert torch.equal(
        converted.get("model.layers.0.self_attn.q_proj.weight"), source.get("model.layers.0.self_attn.q_proj.weight")
    )
    config = json.loads((out / "config.json").read_text())
    groups = config["num_attention_heads"] // config["num_key_value_heads"]
    k_src = source.get("model.layers.2.self_attn.k_proj.weight").view(config["num_key_value_heads"], 16, -1)
    k_gdn = converted.get("model.layers.2.self_attn.k_proj.weight").view(config["num_attention_heads"], 16, -1)
    for head in range(config["num_attention_heads"]):  # whole kv heads repeated, query head h -> kv head h // g
        assert torch.equal(k_gdn[head], k_src[head // groups])
    conv = converted.get("model.layers.0.self_attn.q_conv1d.weight")
    assert torch.equal(conv[:, 0, -1], torch.ones(conv.shape[0])) and not conv[:, 0, :-1].any()
    model = load_model(out)
    assert torch.isfinite(logits(model, IDS)).all()


def test_swa_gdn_starts_as_its_swa_conversion_and_holds_a_gdn_conversion(source_dir, tmp_path):
    """Gate closed: the Full+swa_gdn hybrid computes exactly what the Full+SWA hybrid does; its GDN branch
    holds the tensors a gdn conversion writes, except o_proj, which it shares with the attention."""
    def convert_to(mixer):
        layer_types = [mixer, "full_attention", mixer]
        return convert_checkpoint(source_dir, target(source_dir, layer_types, swa_window=5), tmp_path / mixer,
                                  init=UNCALIBRATED)

    mixed, windowed, gdn = convert_to("swa_gdn"), convert_to("swa"), convert_to("gdn")
    ids = torch.cat([IDS, IDS[:, :9]], dim=1)  # odd, and several windows long
    assert torch.equal(logits(load_model(mixed), ids), logits(load_model(windowed), ids))
    mixed_tensors, swa_tensors, gdn_tensors = LazyCheckpoint(mixed), LazyCheckpoint(windowed), LazyCheckpoint(gdn)
    prefix = "model.layers.0.self_attn."
    branch = {n.removeprefix(prefix + "gdn.") for n in mixed_tensors.names() if n.startswith(prefix + "gdn.")}
    assert branch == {n.removeprefix(prefix) for n in gdn_tensors.names() if n.startswith(prefix)} - {"o_proj.weight"}
    assert all(torch.equal(mixed_tensors.get(prefix + "gdn." + n), gdn_tensors.get(prefix + n)) for n in branch)
    assert set(mixed_tensors.names()) - set(swa_tensors.names()) == {
        f"model.layers.{i}.self_attn.{n}" for i in (0, 2) for n in ("gdn_gate", *(f"gdn.{b}" for b in branch))
    }


def test_output_describes_itself(source_dir, tmp_path):
    plan = {"strategy": "test"}
    out = convert_checkpoint(
        source_dir,
        target(source_dir, ["gdn", "dsa", "full_attention"], dsa_index_n_heads=2, dsa_index_head_dim=32),
        tmp_path / "out",
        plan=plan,
        init=UNCALIBRATED,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lt2" and config["layer_types"] == ["gdn", "dsa", "full_attention"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lt2.LT2ForCausalLM"
    record = json.loads((out / "provenance.json").read_text())
    assert record["plan"] == plan and record["init"]["gdn_conv"] == "identity"
    assert set(record["input_sha256"]) == {"config.json", "model.safetensors"}
    assert all(len(h) == 64 for h in record["input_sha256"].values())
    for name in ("modeling_lt2.py", "configuration_lt2.py", "lt2_kernels.py", "README.md"):
        assert (out / name).is_file(), name
    assert config["dtype"] == "float32" and not {"torch_dtype", "id2label", "label2id"} & set(config)


def test_model_card_metadata_of_a_preset_conversion(tmp_path):
    from huggingface_hub import ModelCard

    from lt2convert.cards import conversion_card
    from lt2convert.presets import get_preset

    preset = get_preset("ouro-1.4b")
    record = {
        "source": {"spec": "ouro-1.4b", "kind": "preset", "hub_id": preset.hub_id, "revision": preset.revision},
        "init": {"gdn_conv": "identity"},
        "versions": {"lt2convert": "0.1.0"},
    }
    config = {"num_hidden_layers": 3, "total_ut_steps": 4, "layer_types": ["gdn", "full_attention", "gdn"]}
    (tmp_path / "README.md").write_text(conversion_card(config, record))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "ByteDance/Ouro-1.4B" and card.data.license == preset.license
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "lt2" in card.data.tags and "gdn ×2, full_attention ×1" in card.text and "Not trained" in card.text


def test_sharded_output_with_index(source_dir, tmp_path):
    out = convert_checkpoint(
        source_dir, target(source_dir, ["gdn"] * 3), tmp_path / "out", max_shard_bytes=60_000, init=UNCALIBRATED
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors |= load_file(str(out / file))
    assert set(tensors) == set(index["weight_map"])
    assert torch.isfinite(logits(load_model(out), IDS)).all()


def test_existing_output_is_not_overwritten(source_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_checkpoint(source_dir, target(source_dir, ["gdn"] * 3), tmp_path / "out", init=UNCALIBRATED)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failed_conversion_leaves_nothing_behind(source_dir, tmp_path, monkeypatch):
    import lt2convert.export

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lt2convert.export, "write_export_files", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(source_dir, target(source_dir, ["gdn"] * 3), tmp_path / "out", init=UNCALIBRATED)
    assert list(tmp_path.iterdir()) == []


def test_target_with_other_shapes_is_rejected(source_dir, tmp_path):
    config, _ = load_config(source_dir)
    wrong = derive_config(config, {"layer_types": ["gdn"] * 3, "intermediate_size": 8})
    with pytest.raises(ValueError, match="intermediate_size"):
        convert_checkpoint(source_dir, wrong, tmp_path / "out", init=UNCALIBRATED)


def test_unknown_init_option_is_rejected():
    with pytest.raises(ValueError, match="gdn_conv"):
        InitOptions(gdn_conv="zeros")


EXPORT_CHECK = textwrap.dedent(
    """
    import importlib.abc, sys
    class HideLT2(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lt2convert" or name.startswith("lt2convert."):
                raise ImportError("lt2convert is hidden")
    sys.meta_path.insert(0, HideLT2())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "lt2convert" not in sys.modules
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    with torch.no_grad():
        full = model(out, use_cache=False).logits
        step = model(out[:, :8], use_cache=True)  # the classic loop: prefill, then past_key_values per token
        pieces, past = [step.logits], step.past_key_values
        for t in range(8, out.shape[1]):
            step = model(out[:, t : t + 1], past_key_values=past, use_cache=True)
            pieces.append(step.logits)
            past = step.past_key_values
    try:
        model(ids, foo=1)
        refused = False
    except TypeError:
        refused = True
    torch.save({"generated": out, "logits": full, "classic": torch.cat(pieces, 1), "refused": refused}, sys.argv[2])
    """
)


@pytest.mark.parametrize(
    "layer_types",
    [["gdn", "full_attention", "gdn"], ["dsa", "gdn", "dsa"], ["swa_gdn", "full_attention", "swa_gdn"]],
    ids=["full-gdn", "gdn-dsa", "full-swa_gdn"],
)
def test_export_loads_and_generates_without_lt2convert(source_dir, tmp_path, layer_types):
    out = convert_checkpoint(
        source_dir,
        target(source_dir, layer_types, dsa_topk=4, dsa_index_n_heads=2, dsa_index_head_dim=32, swa_window=5),
        tmp_path / "out",
        init=UNCALIBRATED,
    )
    script = tmp_path / "check.py"
    script.write_text(EXPORT_CHECK)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "result.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    ours = load_model(out)
    expected = ours.generate(
        result["generated"][:, :8],
        attention_mask=torch.ones(1, 8, dtype=torch.long),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(result["generated"], expected)
    assert relative_error(result["logits"], logits(ours, result["generated"])) <= FP32_TOL
    # 1e-4: GDN sums in another order token by token than chunked (as in test_mixers); an ignored cache is ~1e-1.
    assert relative_error(result["classic"], result["logits"]) <= 1e-4
    assert result["refused"]  # model(ids, foo=1) raises TypeError in the remote code too


def test_calibrated_output_scale_brings_gdn_closer_to_attention(source_dir, tmp_path):
    from lt2convert.calibrate import calibration_stats, mixer_output_errors

    teacher = load_model(source_dir)
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    stats = calibration_stats(teacher, calib)
    assert set(stats) == {0, 1, 2} and all(s.mean_distance.shape == (4,) for s in stats.values())
    hybrid = target(source_dir, ["gdn", "full_attention", "gdn"])
    errors = {}
    for norm in ("unit", "calibrate"):
        out = convert_checkpoint(source_dir, hybrid, tmp_path / norm, init=InitOptions(gdn_norm=norm), stats=stats)
        errors[norm] = mixer_output_errors(teacher, load_model(out), IDS)
    assert set(errors["calibrate"]) == {0, 2}
    # The least-squares scale can only lower the error on its calibration inputs; on other text it still should.
    assert all(errors["calibrate"][i] < errors["unit"][i] for i in (0, 2))


def test_calibrate_init_without_statistics_is_an_error(source_dir, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        convert_checkpoint(source_dir, target(source_dir, ["gdn"] * 3), tmp_path / "out",
                           init=InitOptions(gdn_norm="calibrate"))
    assert not (tmp_path / "out").exists()


def test_cli_plan_then_convert_and_mismatched_plan(tmp_path):
    from click.testing import CliRunner

    from lt2convert.cli import main

    source = write_checkpoint(tmp_path / "src", ouro_config(num_key_value_heads=2))
    other = write_checkpoint(tmp_path / "other", ouro_config(num_hidden_layers=4))
    runner = CliRunner()
    planned = runner.invoke(main, ["plan", str(source), "--recipe", "tiny", "-o", str(tmp_path / "plan.yaml")])
    assert planned.exit_code == 0, planned.output
    args = ["--plan", str(tmp_path / "plan.yaml"), "--init-gdn-norm", "unit", "--dtype", "fp32"]
    result = runner.invoke(main, ["convert", str(source), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == ["dsa", "gdn", "full_attention"]
    mismatch = runner.invoke(main, ["convert", str(other), "-o", str(tmp_path / "out2"), *args])
    assert mismatch.exit_code == 1
    assert "num_hidden_layers: the plan was made for 3, the checkpoint has 4" in mismatch.output
    assert len(mismatch.output.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()
    again = runner.invoke(main, ["convert", str(source), "-o", str(tmp_path / "out"), *args])
    assert again.exit_code == 1 and "already exists" in again.output


# ----------------------------------------------------------------------------------------------- reliability


def gdn_target(source_dir):
    return target(source_dir, ["gdn", "full_attention", "gdn"])


def test_overwrite_replaces_only_an_earlier_conversion(source_dir, tmp_path, monkeypatch):
    from lt2convert.io.outputs import OutputError

    out = convert_checkpoint(source_dir, gdn_target(source_dir), tmp_path / "out", init=UNCALIBRATED)
    convert_checkpoint(source_dir, gdn_target(source_dir), out, init=UNCALIBRATED, overwrite=True)  # ours: replaced
    assert (out / "provenance.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"mine: exists and is not a model folder written by lt2convert"):
        convert_checkpoint(source_dir, gdn_target(source_dir), mine, init=UNCALIBRATED, overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(out)  # even an earlier conversion is never replaced while it is the current directory
    with pytest.raises(OutputError, match="current directory"):
        convert_checkpoint(source_dir, gdn_target(source_dir), ".", init=UNCALIBRATED, overwrite=True)
    with pytest.raises(OutputError, match="current directory"):
        convert_checkpoint(source_dir, gdn_target(source_dir), "..", init=UNCALIBRATED, overwrite=True)
    assert (out / "provenance.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_output_folder_permissions_follow_the_umask(source_dir, tmp_path):
    previous = os.umask(0o027)
    try:
        out = convert_checkpoint(source_dir, gdn_target(source_dir), tmp_path / "out", init=UNCALIBRATED)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_disk_full_names_the_output_and_leaves_nothing(source_dir, tmp_path, monkeypatch):
    import errno

    from lt2convert.io.writer import ShardedWriter

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardedWriter, "add", full)
    with pytest.raises(OSError, match=r"out: no space left on the device while writing it") as caught:
        convert_checkpoint(source_dir, gdn_target(source_dir), tmp_path / "out", init=UNCALIBRATED)
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "buffered-fallback"])
def test_passed_through_tensors_are_copied_byte_for_byte(source_dir, tmp_path, monkeypatch, kernel_copy):
    """Tensors the conversion does not rewrite are copied file to file, never loaded; where the file system has no
    in-kernel copy, through a buffer. Either way the bytes are the source's."""
    import errno

    if not kernel_copy:
        def unsupported(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    out = convert_checkpoint(source_dir, gdn_target(source_dir), tmp_path / "out", init=UNCALIBRATED,
                             max_shard_bytes=64 * 1024)  # several shards: copies land after earlier tensors
    source, converted = LazyCheckpoint(source_dir), LazyCheckpoint(out)
    rewritten = [n for n in converted.names() if n not in source.tensors or ".self_attn." in n]
    passed = [n for n in converted.names() if n not in rewritten]
    assert len(converted.files) > 1 and passed and rewritten
    for name in passed:
        assert torch.equal(converted.get(name), source.get(name)), name


def test_int32_weight_is_rejected_naming_tensor_and_file(source_dir, tmp_path):
    from safetensors.torch import save_file

    from lt2convert.io.checkpoint import CheckpointError

    bad = tmp_path / "bad"
    bad.mkdir()
    for item in source_dir.iterdir():
        (bad / item.name).write_bytes(item.read_bytes())
    weights = load_file(bad / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int32)
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight is stored as I32"):
        convert_checkpoint(bad, target(bad, ["gdn"] * 3), tmp_path / "out", init=UNCALIBRATED)
    assert not (tmp_path / "out").exists()


def test_calibration_text_is_checked_like_training_text(source_dir, tmp_path):
    from lt2convert.convert import calibration_ids
    from lt2convert.distill.data import DataError

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"weights\.bin: not UTF-8 text"):
        calibration_ids(source_dir, binary, 8)
    text = tmp_path / "text.txt"
    text.write_text("plain words " * 200)
    # The tiny source has no tokenizer: named, instead of transformers' cut-off list of classes.
    with pytest.raises(DataError, match=rf"{source_dir.name}: the source has no tokenizer"):
        calibration_ids(source_dir, text, 8)


SIGNALLED_CONVERT = """
import sys, time
from lt2convert.convert import InitOptions, convert_checkpoint
from lt2convert.io.writer import ShardedWriter
from lt2convert.loading import derive_config, load_config
original = ShardedWriter.add
def slow(self, name, tensor):
    time.sleep(0.05)
    return original(self, name, tensor)
ShardedWriter.add = slow
source, out = sys.argv[1], sys.argv[2]
config, _ = load_config(source)
target = derive_config(config, {"layer_types": ["gdn", "full_attention", "gdn"]})
convert_checkpoint(source, target, out, init=InitOptions(gdn_conv="identity", gdn_norm="unit"))
"""


def start_and_signal(source_dir, out, signal_number) -> int:
    """Start a slowed conversion into `out`, send it `signal_number` once its staging folder exists."""
    import time

    process = subprocess.Popen([sys.executable, "-c", SIGNALLED_CONVERT, str(source_dir), str(out)])
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.partial-*")) and time.monotonic() < deadline:
        assert process.poll() is None, "the conversion ended before it could be signalled"
        time.sleep(0.02)
    time.sleep(0.2)  # mid-write
    process.send_signal(signal_number)
    return process.wait(timeout=60)


def test_sigterm_during_convert_leaves_the_output_path_clean(source_dir, tmp_path):
    import signal

    code = start_and_signal(source_dir, tmp_path / "out", signal.SIGTERM)
    assert code != 0
    assert list(tmp_path.iterdir()) == []  # no output, no hidden .out.partial-* folder


def test_partial_folder_of_a_killed_convert_is_removed_by_the_next_run(source_dir, tmp_path, capfd):
    import signal

    out = tmp_path / "out"
    assert start_and_signal(source_dir, out, signal.SIGKILL) != 0
    left = list(tmp_path.glob(".out.partial-*"))
    assert len(left) == 1  # SIGKILL cannot be handled: the staging folder stays
    convert_checkpoint(source_dir, gdn_target(source_dir), out, init=UNCALIBRATED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"removed {left[0]}" in capfd.readouterr().err
