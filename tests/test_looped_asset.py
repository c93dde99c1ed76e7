"""The looped-model builder (asset `smollm2-looped`) on a tiny random Llama: Ouro's exact format, and the two
training stages (per-step KD, exit gate) lowering their losses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lt2convert.distill.data import PackedTokenStream
from lt2convert.errors import ConfigError
from lt2convert.io.assets import KNOWN_ASSETS
from lt2convert.loading import load_model
from lt2convert.looped_asset import (
    LoopedRecipe,
    build_looped,
    continue_targets,
    exit_gate_loss,
    gate_training_data,
    initial_student,
    ouro_config,
    train_exit_gate,
    train_loops,
)
from lt2convert.modeling import OuroForCausalLM
from lt2convert.testing import checkpoint_shapes, llama_config, write_checkpoint

TINY = LoopedRecipe(
    block_layers=2,
    steps=4,
    seq_len=32,
    batch_size=2,
    kd_steps=2,
    gate_batches=1,
    gate_iterations=3,
    eval_windows=2,
    threads=1,
)


@pytest.fixture
def teacher_folder(tmp_path):
    return write_checkpoint(tmp_path / "teacher", llama_config(num_hidden_layers=3), seed=1)


def random_ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def test_build_writes_a_checkpoint_in_ouros_exact_format(tmp_path, teacher_folder):
    out = tmp_path / "looped"
    out.mkdir()
    heldout = {"a": random_ids(80, 2), "b": random_ids(70, 3)}
    record = build_looped(teacher_folder, out, random_ids(2048, 1), heldout, TINY, lambda _: None)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["architectures"] == ["OuroForCausalLM"]
    assert config["total_ut_steps"] == 4 and config["num_hidden_layers"] == 2 and not config["tie_word_embeddings"]
    with safe_open(str(out / "model.safetensors"), "pt") as stored:
        names = list(stored.keys())  # a safetensors handle is not iterable
        shapes = {name: tuple(stored.get_slice(name).get_shape()) for name in names}
        assert {stored.get_tensor(name).dtype for name in names} == {torch.bfloat16}
    assert shapes == checkpoint_shapes(config)  # the published layout, written independently of our model
    assert isinstance(load_model(out), OuroForCausalLM)
    # `import lt2convert` (done by the imports above) registers the runtime with the Auto classes.
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), OuroForCausalLM)
    assert set(record["heldout"]) == {"a", "b"}
    assert len(record["heldout"]["a"]["ppl_per_step"]) == 4
    assert record["heldout"]["a"]["tokens"] == 2 * 31


def one_window_stream() -> PackedTokenStream:
    """Every batch is the same window, so a few updates must lower the loss on it."""
    return PackedTokenStream(random_ids(TINY.seq_len, 4), TINY.seq_len, seed=0)


def tiny_student(teacher_folder):
    teacher = load_model(teacher_folder, dtype="float32")
    config = ouro_config(json.loads((teacher_folder / "config.json").read_text()), TINY)
    student, _ = initial_student(teacher, config, TINY, one_window_stream().next_batch(2)[0])
    return teacher, student


@torch.no_grad()
def test_linear_sandwich_norms_make_step_one_the_teachers_full_stack(teacher_folder):
    """Block = every teacher layer, contributions unscaled: Ouro's sandwich norms act as identities, so step 1 is the
    teacher; the state gain makes step 2 a small correction of step 1 rather than a second pass of the stack."""
    teacher = load_model(teacher_folder, dtype="float32")
    ids = one_window_stream().next_batch(2)[0]
    expected = teacher(ids, use_cache=False).logits
    drift = {}
    for gain in (1.0, 100.0):
        recipe = LoopedRecipe(**{**TINY.__dict__, "block_layers": 3, "contribution_scale": 1.0, "state_gain": gain})
        config = ouro_config(json.loads((teacher_folder / "config.json").read_text()), recipe)
        student, calibrated = initial_student(teacher, config, recipe, ids)
        # Every norm shares one epsilon, raised so the sandwich norms are linear; every matrix is the teacher's own.
        assert calibrated["rms_norm_eps"] == student.config.rms_norm_eps > config["rms_norm_eps"]
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight"):
            name = f"model.layers.1.{name}"
            assert torch.equal(student.get_parameter(name), teacher.get_parameter(name))
        first, second = (student.lm_head(h) for h in student.model(input_ids=ids, use_cache=False).steps[:2])
        torch.testing.assert_close(first, expected, atol=1e-3 * expected.abs().max().item(), rtol=0)
        drift[gain] = (second - first).abs().max()
    assert drift[100.0] < 0.2 * drift[1.0]


def test_per_step_kd_lowers_every_steps_loss(teacher_folder):
    teacher, student = tiny_student(teacher_folder)
    recipe = LoopedRecipe(**{**TINY.__dict__, "kd_steps": 8, "lr": 3e-3, "warmup": 1})
    history = torch.tensor(train_loops(student, teacher, one_window_stream(), recipe, lambda _: None))
    assert history.shape == (8, 4)
    assert (history[-1] < history[0]).all()


def test_exit_gate_training_lowers_its_loss_and_only_touches_the_gate(teacher_folder):
    _, student = tiny_student(teacher_folder)
    before = {n: p.clone() for n, p in student.named_parameters()}
    history = train_exit_gate(student, one_window_stream(), TINY, lambda _: None)
    assert history[-1] < history[0]
    # The fit runs on rescaled states; the gate in the model, on the real ones, has the fitted loss.
    states, losses = gate_training_data(student, one_window_stream(), TINY)
    go_on = continue_targets(losses, TINY.gate_k, TINY.gate_gamma)
    with torch.no_grad():
        in_model = exit_gate_loss(student.model.early_exit_gate(states).squeeze(-1), go_on).item()
    assert in_model == pytest.approx(history[-1], rel=1e-3)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}


def test_continue_target_follows_the_next_steps_improvement():
    losses = torch.tensor([[3.0, 1.0], [1.0, 1.0], [1.5, 1.0]])  # token 0 improves, then gets worse; token 1 flat
    go_on = continue_targets(losses, k=50.0, gamma=0.005)
    assert go_on.shape == (2, 2)
    assert go_on[0, 0] > 0.99  # a 2-nat improvement: keep looping
    assert go_on[0, 1] < 0.5 and go_on[1, 0] < 0.5 and go_on[1, 1] < 0.5  # no gain (or a loss): stop


def test_recipe_rejects_bad_fields():
    with pytest.raises(ConfigError, match="init"):
        LoopedRecipe(init="middle")
    with pytest.raises(ConfigError, match="steps"):
        LoopedRecipe(steps=1)


def test_the_asset_is_registered_without_io_importing_the_builder():
    assert "smollm2-looped" in KNOWN_ASSETS
    probe = "import sys, lt2convert.io.assets; assert 'lt2convert.looped_asset' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True)
