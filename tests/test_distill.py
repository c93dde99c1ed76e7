"""distill: losses by hand, recipe stages, and the trainer on tiny models (each stage kind learns what it should,
only the right parameters change, exact resume after SIGKILL, NaN stops cleanly, LoRA merges exactly, two
processes follow one, bad input fails before anything is written)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lt2convert import load_model
from lt2convert.calibrate import mixer_output_errors
from lt2convert.cli import main
from lt2convert.convert import convert_checkpoint
from lt2convert.distill import steps as steps_module
from lt2convert.distill import train as train_module
from lt2convert.distill.checkpoints import checkpoints
from lt2convert.distill.losses import align_loss, exit_kl_loss, indexer_kl_loss, kd_loss
from lt2convert.distill.recipe import Stage, load_stages, parse_stages, scale_budgets
from lt2convert.distill.train import DistillConfig, TrainingDiverged, lr_factor, run_distillation
from lt2convert.io.checkpoint import LazyCheckpoint
from lt2convert.loading import derive_config, load_config
from lt2convert.plan import PlanError
from lt2convert.testing import SMALL_OURO_SHAPE, ouro_config, write_checkpoint

SHAPE = SMALL_OURO_SHAPE
TINY = ouro_config(num_hidden_layers=2, **SHAPE)
BATCH, SEQ = 2, 16
ALIGN = Stage(name="align", kind="align", tokens=20 * BATCH * SEQ, seq_len=SEQ, batch_size=BATCH, lr=1e-2, warmup=0.1)
KD = Stage(
    name="kd", kind="kd", tokens=10 * BATCH * SEQ, seq_len=SEQ, batch_size=BATCH, lr=3e-3, every_step=True,
    exit_weight=0.1,
)
MIXER = "model.layers.1.self_attn."  # the one converted layer


# --------------------------------------------------------------------------------------------------- losses


def test_align_loss_matches_hand_computation():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert align_loss(s, torch.ones(4)).item() == pytest.approx((0 + 1 + 4 + 9) / 4)
    t = torch.full((4,), 2.0)
    assert align_loss(s, t).item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    assert align_loss(s, t, normalize=True).item() == pytest.approx(1.5 / 4)
    s.requires_grad_(True)
    align_loss(s, t.requires_grad_(True)).backward()
    assert torch.allclose(s.grad, 2 * (s.detach() - 2) / 4) and t.grad is None
    with pytest.raises(ValueError, match="shape"):
        align_loss(torch.zeros(3), torch.zeros(4))


def test_kd_loss_matches_hand_computation():
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    # position 0: p = (1/4, 3/4), q = (1/2, 1/2); position 1: p = q, KL 0
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_loss(student, teacher).item() == pytest.approx(kl0 / 2, rel=1e-6)
    # T = 2: teacher logits halved -> p = (1, √3) / (1 + √3); student stays uniform; × T²
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    kl0_t2 = (1 - p1) * math.log((1 - p1) / 0.5) + p1 * math.log(p1 / 0.5)
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(4 * kl0_t2 / 2, rel=1e-6)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teacher, temperature=0)


def test_exit_and_indexer_kl_match_hand_computation():
    teacher = torch.tensor([[0.25], [0.75]])  # [steps, tokens]
    student = torch.tensor([[0.5], [0.5]])
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert exit_kl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert exit_kl_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # query 0 sees only key 0 (KL 0); query 1: p = (1/4, 3/4), indexer logits (0, 0) -> q = (1/2, 1/2)
    attention = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    logits = torch.tensor([[[5.0, 123.0], [0.0, 0.0]]])  # the future key's logit must be ignored
    assert indexer_kl_loss(logits, attention).item() == pytest.approx(expected / 2, rel=1e-6)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[1:-1], factors[2:], strict=True))


# --------------------------------------------------------------------------------------------------- recipes


def test_shipped_recipes_have_valid_stages_and_tokens_rescale_them():
    for name in ("tiny", "smollm2-135m-full-gdn", "ouro-1.4b-full-gdn", "ouro-1.4b-gdn-dsa"):
        assert load_stages(name)
    ouro = load_stages("ouro-1.4b-full-gdn")
    assert [s.kind for s in ouro] == ["align", "kd", "finetune"] and sum(s.tokens for s in ouro) == 10**9
    assert ouro[1].every_step and ouro[2].trainable == "all"
    half = scale_budgets(ouro, 500_000_000)
    assert [s.tokens for s in half] == [s.tokens // 2 for s in ouro]
    assert [s.lr for s in half] == [s.lr for s in ouro]
    every_stage_named = r"stages\[0\] \(align\)\.tokens: .* stages\[2\] \(finetune\)\.tokens: a budget"
    with pytest.raises(ValueError, match=every_stage_named):
        scale_budgets(ouro, 100_000)
    with pytest.raises(PlanError, match="no stages: section"):
        load_stages("lt2-linear")


def test_stage_errors_are_all_reported_at_once():
    bad = [
        {"kind": "align", "tokens": "1M", "trainable": "all"},
        {"kind": "distil", "tokens": 100},
        {"kind": "kd", "tokens": "lots"},
        {"kind": "kd", "tokens": 10, "seq_len": 8, "batch_size": 2},
        {"kind": "kd", "tokens": 1000, "lr": -1, "colour": "red"},
    ]
    with pytest.raises(PlanError) as err:
        parse_stages(bad, "recipe x")
    text = str(err.value)
    for part in (
        "stages[0].trainable: the align stage trains the new mixers only",
        "stages[1].kind: expected one of 'align', 'kd' or 'finetune', got 'distil'",
        "stages[2].tokens: expected a token count",
        "stages[3].tokens: a budget of 10 tokens is less than one step of 2 x 8 tokens",
        "stages[4].colour: unknown key",
    ):
        assert part in text, text
    lora = parse_stages([{"kind": "finetune", "tokens": "5k", "trainable": "lora"}], "r")[0]
    assert lora.lora is not None and lora.lora.r == 16 and lora.tokens == 5000 and lora.name == "finetune"


# ---------------------------------------------------------------------------------------------------- trainer


def words_text(count: int, seed: int = 0) -> str:
    words = ["loop", "state", "mixer", "delta", "token", "the", "a", "of", "gate", "decay", "key", "value"]
    generator = torch.Generator().manual_seed(seed)
    return " ".join(words[i] for i in torch.randint(0, len(words), (count,), generator=generator).tolist())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = write_checkpoint(root / "teacher", TINY, seed=1)
    source, _ = load_config(teacher)
    student = convert_checkpoint(
        teacher,
        derive_config(source, {"layer_types": ["full_attention", "gdn"]}),
        root / "student",
    )
    (root / "train.txt").write_text(words_text(1200))
    config = DistillConfig(
        teacher=str(teacher), student=str(student), data=[str(root / "train.txt")], out=str(root / "run-a"),
        stages=[ALIGN, KD], tokenizer="bytes", checkpoint_tokens=3 * BATCH * SEQ, progress=False,
    )
    result = run_distillation(config)
    return {"root": root, "teacher": teacher, "student": student, "config": config, "result": result}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_align_reduces_mixer_output_error_and_kd_reduces_kl(tiny):
    result = tiny["result"]
    assert result.tokens == (20 + 10) * BATCH * SEQ and [p.name for p in result.stages] == ["0-align", "1-kd"]
    held_out = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(123))
    teacher = load_model(tiny["teacher"])
    before = mixer_output_errors(teacher, load_model(tiny["student"]), held_out)
    after = mixer_output_errors(teacher, load_model(result.stages[0]), held_out)
    assert set(before) == {1} and after[1] < 0.8 * before[1], (before, after)
    lines = metrics(tiny["root"] / "run-a")
    align = [m["loss"] for m in lines if m["stage"] == "align"]
    kd = [m for m in lines if m["stage"] == "kd"]
    assert len(align) == 20 and len(kd) == 10 and sum(align[-5:]) < sum(align[:5])
    assert all({"logit_kl", "exit_kl"} <= set(m) for m in kd)
    assert sum(m["loss"] for m in kd[-3:]) < sum(m["loss"] for m in kd[:3])


def test_stage_and_final_folders_follow_the_umask(tiny):
    """Not mkdtemp's 0700: a serving account or a colleague must be able to read the distilled model."""
    umask = os.umask(0)
    os.umask(umask)
    folders = [tiny["result"].final, *tiny["result"].stages]
    assert folders and all((p.stat().st_mode & 0o777) == 0o777 & ~umask for p in folders)


def test_final_has_its_own_card_and_training_provenance(tiny):
    from huggingface_hub import ModelCard

    final, run = tiny["result"].final, tiny["root"] / "run-a"
    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "distillation" in card.data.tags and card.data.base_model is None  # a local teacher has no hub id
    last = {m["stage"]: m["loss"] for m in metrics(run)}
    assert "distilled from the teacher" in card.text and "Not trained" not in card.text
    assert f"| align | align | {ALIGN.tokens:,} |" in card.text and f"{last['kd']:.4g}" in card.text
    record = json.loads((final / "provenance.json").read_text())
    converted = json.loads((tiny["student"] / "provenance.json").read_text())
    assert {k: record[k] for k in converted} == converted  # the conversion's record, extended
    training = record["training"]
    assert training["final_losses"] == last and training["tokens"] == tiny["result"].tokens
    assert training["data"] == tiny["config"].data and [s["name"] for s in training["stages"]] == ["align", "kd"]


def test_only_the_new_mixers_change(tiny):
    teacher, final = LazyCheckpoint(tiny["teacher"]), LazyCheckpoint(tiny["result"].final)
    student = LazyCheckpoint(tiny["student"])
    assert set(final.names()) == set(student.names())
    for name in final.names():
        if name.startswith(MIXER):
            continue
        assert torch.equal(final.get(name), teacher.get(name)), name
    assert any(not torch.equal(final.get(n), student.get(n)) for n in final.names() if n.startswith(MIXER))
    with pytest.raises(ValueError, match="no converted layers"):
        steps_module.converted_layers(load_config(tiny["teacher"])[0], load_config(tiny["teacher"])[0])


KILLED_RUN = """
import json, sys, time
import lt2convert.distill.train as t
from lt2convert.distill.recipe import stage_from_settings
original = t.STEPS["kd"]
def slow(*args, **kwargs):
    time.sleep(0.05)
    return original(*args, **kwargs)
t.STEPS["kd"] = slow
settings = json.loads(sys.argv[1])
settings["stages"] = [stage_from_settings(s) for s in settings["stages"]]
t.run_distillation(t.DistillConfig(**settings))
"""


def test_resume_after_sigkill_is_exact(tiny):
    config = replace(tiny["config"], out=str(tiny["root"] / "run-b"))
    run = tiny["root"] / "run-b"
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(config.settings())])
    deadline = time.monotonic() + 120
    kd_checkpoints = run / "checkpoints" / "1-kd"
    while not checkpoints(kd_checkpoints) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.13)  # somewhere mid-step of the kd stage, after a checkpoint
    assert process.poll() is None, "the run finished before it could be killed"
    process.kill()
    process.wait()
    assert checkpoints(kd_checkpoints) and not (run / "final").exists()
    killed_at = int(checkpoints(kd_checkpoints)[-1].name.removeprefix("step-"))
    assert 0 < killed_at < 10
    with pytest.raises(FileExistsError, match="--resume"):
        run_distillation(config)
    result = run_distillation(config, resume=True)
    a, b = load_file(tiny["result"].final / "model.safetensors"), load_file(result.final / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    ma, mb = metrics(tiny["root"] / "run-a"), metrics(run)
    for stage, steps in (("align", 20), ("kd", 10)):
        lines = [m for m in mb if m["stage"] == stage]
        assert [m["step"] for m in lines] == list(range(1, steps + 1))
        assert [w for m in lines for w in m["windows"]] == list(range(steps * BATCH))  # none twice, none skipped
    keys = ("stage", "windows", "loss", "lr", "tokens")
    assert [[m[k] for k in keys] for m in ma] == [[m[k] for k in keys] for m in mb]
    changed = replace(config, stages=[ALIGN, replace(KD, lr=1.0)])
    with pytest.raises(ValueError, match=r"different settings \(stages\)"):
        run_distillation(changed, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    config = replace(tiny["config"], out=str(tiny["root"] / "run-nan"), stages=[ALIGN])
    calls = {"n": 0}
    original = steps_module.align_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 * 2 else loss  # from step 7 (1 layer x 2 loop steps a step)

    monkeypatch.setattr(steps_module, "align_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"align step 7: loss nan.*last good checkpoint: .*step-00000006"):
        run_distillation(config)
    run = tiny["root"] / "run-nan"
    assert [c.name for c in checkpoints(run / "checkpoints" / "0-align")] == ["step-00000003", "step-00000006"]
    assert len(metrics(run)) == 6 and not (run / "stages").exists()
    monkeypatch.setattr(steps_module, "align_loss", original)
    result = run_distillation(config, resume=True)  # the kept checkpoint is intact: resuming reproduces run A's align
    a, b = load_file(tiny["result"].stages[0] / "model.safetensors"), load_file(result.stages[0] / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_lora_finetune_trains_only_adapters_and_merges_exactly(tiny):
    lora = parse_stages(
        [{"kind": "finetune", "tokens": 4 * BATCH * SEQ, "seq_len": SEQ, "batch_size": BATCH, "lr": 1e-2,
          "trainable": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}],
        "test",
    )[0]
    config = replace(tiny["config"], out=str(tiny["root"] / "run-lora"), student=str(tiny["result"].final),
                     stages=[lora], checkpoint_tokens=10**6)
    result = run_distillation(config)
    saved = load_file(checkpoints(Path(config.out) / "checkpoints" / "0-finetune")[-1] / "trainable.safetensors")
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved)
    before, after = LazyCheckpoint(tiny["result"].final), LazyCheckpoint(result.final)
    targets = (".q_proj.", ".v_proj.")
    for name in before.names():
        same = torch.equal(before.get(name), after.get(name))
        assert same != any(t in name for t in targets), name  # GDN layers have q_proj/v_proj too
    # The adapted model, rebuilt from the base weights and the saved adapters, gives the merged export's logits.
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny["result"].final, dtype="float32")
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    state = dict(adapted.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            state[name].copy_(tensor)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = adapted(input_ids=ids, use_cache=False).logits
        merged = load_model(result.final, dtype="float32")(ids, use_cache=False).logits
    assert torch.allclose(expected, merged, rtol=1e-5, atol=1e-5)
    untouched = load_model(tiny["result"].final, dtype="float32")(ids, use_cache=False).logits
    assert not torch.allclose(expected, untouched, atol=1e-3)  # the adapters did something


def test_dsa_indexer_warm_up_lowers_its_kl(tmp_path):
    teacher = write_checkpoint(tmp_path / "teacher", ouro_config(num_hidden_layers=3, **SHAPE), seed=2)
    source, _ = load_config(teacher)
    student = convert_checkpoint(
        teacher,
        derive_config(source, {"layer_types": ["full_attention", "gdn", "dsa"], "dsa_topk": 4, "dsa_index_n_heads": 2}),
        tmp_path / "student",
    )
    (tmp_path / "train.txt").write_text(words_text(800, seed=1))
    stage = replace(ALIGN, tokens=16 * BATCH * SEQ, lr=3e-3)
    config = DistillConfig(
        teacher=str(teacher), student=str(student), data=[str(tmp_path / "train.txt")], out=str(tmp_path / "run"),
        stages=[stage], tokenizer="bytes", progress=False,
    )
    run_distillation(config)
    kl = [m["indexer_kl"]["2"] for m in metrics(tmp_path / "run")]
    assert set(metrics(tmp_path / "run")[0]["layer_loss"]) == {"1", "2"}
    assert sum(kl[-4:]) < 0.9 * sum(kl[:4]), kl


def test_align_opens_the_swa_gdn_gate_and_trains_its_memory(tmp_path):
    """A new swa_gdn layer starts as its window's attention (gate closed); align opens the gate, trains the GDN
    branch through it, and brings the layer closer to the teacher's attention."""
    teacher = write_checkpoint(tmp_path / "teacher", TINY, seed=2)
    source, _ = load_config(teacher)
    student = convert_checkpoint(
        teacher, derive_config(source, {"layer_types": ["full_attention", "swa_gdn"], "swa_window": 4}),
        tmp_path / "student",
    )
    (tmp_path / "train.txt").write_text(words_text(800, seed=1))
    config = DistillConfig(
        teacher=str(teacher), student=str(student), data=[str(tmp_path / "train.txt")], out=str(tmp_path / "run"),
        stages=[replace(ALIGN, tokens=12 * BATCH * SEQ, lr=3e-3)], tokenizer="bytes", progress=False,
    )
    result = run_distillation(config)
    before, after = LazyCheckpoint(student), LazyCheckpoint(result.final)
    assert torch.equal(before.get(MIXER + "gdn_gate"), torch.zeros(SHAPE["num_attention_heads"]))
    assert after.get(MIXER + "gdn_gate").abs().min() > 0
    assert not torch.equal(after.get(MIXER + "gdn.q_proj.weight"), before.get(MIXER + "gdn.q_proj.weight"))
    held_out = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(123))
    errors = [mixer_output_errors(load_model(teacher), load_model(m), held_out)[1] for m in (student, result.final)]
    assert errors[1] < errors[0], errors


# ---------------------------------------------------------------------------------------- gradient accumulation

# align's normalising scale is each micro-batch's own mean square, so the exact comparison uses the plain MSE.
EXACT_ALIGN = replace(ALIGN, normalize=False)
MICRO_KD = replace(KD, micro_batch_size=1)


@pytest.fixture(scope="module")
def accumulated(tiny):
    """One run at the full batch, one with each batch in micro-batches of one row (fp32, so only the summation
    order differs)."""
    runs = {}
    for name, stages in (("full", [EXACT_ALIGN, KD]), ("micro", [replace(EXACT_ALIGN, micro_batch_size=1), MICRO_KD])):
        config = replace(tiny["config"], out=str(tiny["root"] / f"run-{name}"), stages=stages, precision="fp32")
        runs[name] = (config, run_distillation(config))
    return runs


def test_micro_batches_give_the_full_batch_result(accumulated):
    full, micro = (load_file(result.final / "model.safetensors") for _, result in accumulated.values())
    changed = [n for n in full if n.startswith(MIXER)]
    assert changed and set(full) == set(micro)
    for name in full:
        scale = full[name].abs().max().clamp(min=1e-12)
        assert (full[name] - micro[name]).abs().max() / scale <= 1e-4, name
    a, b = (metrics(Path(config.out)) for config, _ in accumulated.values())
    assert [m["windows"] for m in a] == [m["windows"] for m in b]
    for x, y in zip(a, b, strict=True):  # grad_norm: the accumulated gradient is the mean, not the sum
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    with pytest.raises(PlanError, match=r"micro_batch_size: 3 does not divide batch_size 2"):
        parse_stages([{"kind": "kd", "tokens": 1000, "batch_size": 2, "micro_batch_size": 3}], "recipe.yaml")


KILLED_MID_ACCUMULATION = """
import json, os, signal, sys
import lt2convert.distill.train as t
from lt2convert.distill.recipe import stage_from_settings
original, calls = t.STEPS["kd"], []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):  # after the first of a step's micro-batches: killed mid-accumulation
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
t.STEPS["kd"] = dying
settings = json.loads(sys.argv[1])
settings["stages"] = [stage_from_settings(s) for s in settings["stages"]]
t.run_distillation(t.DistillConfig(**settings))
"""


def test_resume_mid_accumulation_is_exact(accumulated, tmp_path):
    config, reference = accumulated["micro"]
    config = replace(config, out=str(tmp_path / "run"))
    kill_at = 5 * 2 + 2  # kd step 6, second micro-batch; the last checkpoint is at step 3
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_ACCUMULATION, json.dumps(config.settings()),
                             str(kill_at)], timeout=300)
    assert killed.returncode == -9
    done = [c.name for c in checkpoints(tmp_path / "run" / "checkpoints" / "1-kd")]
    assert done == ["step-00000003"] and len([m for m in metrics(tmp_path / "run") if m["stage"] == "kd"]) == 5
    result = run_distillation(config, resume=True)
    a, b = load_file(reference.final / "model.safetensors"), load_file(result.final / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    keys = ("stage", "windows", "loss", "lr", "grad_norm")
    assert [[m[k] for k in keys] for m in metrics(Path(accumulated["micro"][0].out))] == [
        [m[k] for k in keys] for m in metrics(tmp_path / "run")
    ]


class RecordingTracker:
    """Stands in for accelerate's TensorBoard tracker (tensorboard itself is optional)."""

    instances: list[RecordingTracker] = []

    def __init__(self, run_name, logging_dir):
        self.run_name, self.logging_dir, self.logged, self.events = run_name, logging_dir, [], []
        RecordingTracker.instances.append(self)

    def start(self):
        self.events.append("start")

    def store_init_configuration(self, values):
        self.hparams = values

    def log(self, values, step=None):
        self.logged.append((step, values))

    def finish(self):
        self.events.append("finish")


def test_log_with_feeds_accelerate_trackers_and_skips_missing_ones(tiny, monkeypatch):
    import accelerate.tracking
    import accelerate.utils

    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", RecordingTracker)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    run = tiny["root"] / "run-tracked"
    config = replace(tiny["config"], out=str(run), stages=[replace(ALIGN, tokens=3 * BATCH * SEQ)],
                     log_with=["tensorboard", "wandb"])
    with pytest.warns(UserWarning, match="wandb is not installed"):
        run_distillation(config)
    (tracker,) = RecordingTracker.instances
    assert tracker.events == ["start", "finish"] and tracker.logging_dir == str(run / "trackers")
    assert tracker.hparams["stages.0.lr"] == ALIGN.lr and tracker.hparams["precision"] == config.precision
    lines = metrics(run)
    assert [step for step, _ in tracker.logged] == [m["tokens"] for m in lines]
    assert [values["align/loss"] for _, values in tracker.logged] == [m["loss"] for m in lines]
    assert "log_with" not in json.loads((run / "run.json").read_text())  # a resume may log elsewhere
    with pytest.raises(ValueError, match="log_with: unknown tracker 'mlflow'"):
        replace(config, log_with=["mlflow"])


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = load_model(tiny["student"], dtype="float32")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(
        torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0]
    )


# ------------------------------------------------------------------------------------------- several processes


def test_two_processes_follow_the_single_process_run(tiny, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "stages:\n"
        f"  - {{kind: align, tokens: {8 * 4 * SEQ}, seq_len: {SEQ}, batch_size: 4, lr: 1.0e-2}}\n"
        f"  - {{kind: kd, tokens: {6 * 4 * SEQ}, seq_len: {SEQ}, batch_size: 4, lr: 3.0e-3, every_step: true}}\n"
    )
    common = [
        "distill", tiny["student"], "--teacher", tiny["teacher"], "--recipe", recipe, "--tokenizer", "bytes",
        "--data", tiny["root"] / "train.txt", "--no-progress", "--precision", "fp32",  # bf16 rounds per split
    ]
    one = CliRunner().invoke(main, [*map(str, common), "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        "-m", "lt2convert", *map(str, common), "-o", str(tmp_path / "two"),
    ]
    two = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[:6000]
    single, double = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [(m["stage"], m["windows"]) for m in single] == [(m["stage"], m["windows"]) for m in double]
    # Same windows, gradients averaged over the halves: only float summation order differs.
    for a, b in zip(single, double, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["stage"], a["step"])
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input_fails_clearly_and_writes_nothing(tiny, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("abc")
    base = [
        "distill", tiny["student"], "--teacher", tiny["teacher"], "--recipe", "tiny", "--tokenizer", "bytes",
        "--no-progress",
    ]
    cases = {
        "missing.txt": "missing.txt",
        "empty.txt": "empty.txt",
        "short.txt": "fewer than one window",
    }
    for name, message in cases.items():
        out = tmp_path / f"run-{name}"
        result = CliRunner().invoke(main, [*map(str, base), "--data", str(tmp_path / name), "-o", str(out)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    tiny_budget = CliRunner().invoke(main, [*map(str, base), "--tokens", "100", "-o", str(tmp_path / "run-b")])
    assert tiny_budget.exit_code == 1 and "less than one step" in tiny_budget.output
    assert not (tmp_path / "run-b").exists()
    other = write_checkpoint(tmp_path / "other", ouro_config(num_hidden_layers=2, vocab_size=300, **SHAPE), seed=3)
    mismatch = CliRunner().invoke(main, [*map(str, base[:2]), "--teacher", str(other), *map(str, base[4:]),
                                         "--data", str(tiny["root"] / "train.txt"), "-o", str(tmp_path / "run-mm")])
    assert mismatch.exit_code == 1 and "tokenizer mismatch" in mismatch.output, mismatch.output
    assert len(mismatch.output.strip().splitlines()) == 1 and not (tmp_path / "run-mm").exists()
    # Resuming a run folder with another recipe: refused, and the run folder is untouched.
    run = Path(tiny["config"].out)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    other_recipe = CliRunner().invoke(main, [*map(str, base), "--data", str(tiny["root"] / "train.txt"), "--resume",
                                             "-o", str(run)])
    assert other_recipe.exit_code == 1 and "cannot resume a run with different settings" in other_recipe.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    no_resume = CliRunner().invoke(main, [*map(str, base), "--data", str(tiny["root"] / "train.txt"), "-o", str(run)])
    assert no_resume.exit_code == 1 and "pass --resume" in no_resume.output


def test_failed_input_checks_leave_no_run_folder(tiny, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("abc")
    (tmp_path / "binary.txt").write_bytes(b"text\0\x01\x02" * 64)
    base = ["distill", str(tiny["student"]), "--teacher", str(tiny["teacher"]), "--recipe", "tiny", "--no-progress"]
    cases = {
        "missing.txt": ("bytes", r"missing\.txt: training text file not found"),
        "empty.txt": ("bytes", r"empty\.txt: no text"),
        "binary.txt": ("bytes", r"binary\.txt: contains NUL bytes"),
        "short.txt": ("bytes", r"short\.txt: 3 tokens in all, fewer than one window"),
        # the tiny student has no tokenizer files: named, instead of transformers' cut-off list of classes
        "train.txt": ("student", rf"{tiny['student'].name}: the student has no tokenizer"),
    }
    for name, (tokenizer, message) in cases.items():
        data = tiny["root"] / name if name == "train.txt" else tmp_path / name
        out = tmp_path / f"run-{name}"
        result = CliRunner().invoke(main, [*base, "--tokenizer", tokenizer, "--data", str(data), "-o", str(out)])
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1 and re.search(message, result.output), result.output
        assert not out.exists(), name  # no run.json to trip a corrected rerun
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "empty.txt", "short.txt"]


def test_run_json_stores_absolute_paths_for_resume_from_elsewhere(tiny, tmp_path, monkeypatch):
    from lt2convert.distill.train import config_from_run
    from lt2convert.io.writer import write_json

    monkeypatch.chdir(tiny["root"])
    config = DistillConfig(teacher="teacher", student="student", data=["train.txt", "hf:some/set"],
                           out="run-rel", stages=[ALIGN], tokenizer="bytes")
    run = tmp_path / "moved-run"
    run.mkdir()
    write_json(run / "run.json", config.settings())
    monkeypatch.chdir(tmp_path)  # another working directory, and the run folder moved
    again = config_from_run(run)
    assert again.teacher == str(tiny["teacher"]) and again.student == str(tiny["student"])
    assert again.data == [str(tiny["root"] / "train.txt"), "hf:some/set"] and again.out == str(run)
    assert train_module.check_run_folder(run, again, resume=True) is False  # same settings: resumable


def test_resume_falls_back_from_a_damaged_checkpoint(tiny, recwarn):
    from lt2convert.io.checkpoint import CheckpointError

    run = tiny["root"] / "run-damaged"
    config = replace(tiny["config"], out=str(run), stages=[ALIGN])
    run_distillation(config)
    kept = checkpoints(run / "checkpoints" / "0-align")
    assert [c.name for c in kept] == ["step-00000018", "step-00000020"]

    def damage(checkpoint: Path) -> None:  # what a disk-full or a kill during the write leaves
        path = checkpoint / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:100])

    def forget_the_finished_stage() -> None:
        import shutil

        shutil.rmtree(run / "stages")
        shutil.rmtree(run / "final")

    forget_the_finished_stage()
    damage(kept[-1])
    result = run_distillation(config, resume=True)
    warned = [str(w.message) for w in recwarn if "damaged checkpoint" in str(w.message)]
    assert len(warned) == 1 and str(kept[-1]) in warned[0] and f"resuming from {kept[0]}" in warned[0]
    a, b = load_file(tiny["result"].stages[0] / "model.safetensors"), load_file(result.stages[0] / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)  # steps 19-20 replayed from step 18 exactly

    forget_the_finished_stage()
    for checkpoint in checkpoints(run / "checkpoints" / "0-align"):
        damage(checkpoint)
    with pytest.raises(CheckpointError, match=r"step-00000020: damaged .*truncated.* no earlier checkpoint"):
        run_distillation(config, resume=True)
    cli = CliRunner().invoke(main, ["distill", "--resume", "--no-progress", "-o", str(run)])
    assert cli.exit_code == 1 and len(cli.output.strip().splitlines()) == 1 and "step-00000020" in cli.output


def test_run_config_is_frozen_and_revalidated_on_replace(tmp_path):
    import dataclasses

    from lt2convert.errors import ConfigError

    (tmp_path / "train.txt").write_text("words")
    data = str(tmp_path / "train.txt")
    config = DistillConfig(teacher="t", student="s", data=[data], out=str(tmp_path / "run"), stages=[ALIGN])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    assert Path(config.out).is_absolute() and Path(config.data[0]).is_absolute()
    with pytest.raises(ConfigError, match="log_with: unknown tracker 'mlflow'"):
        dataclasses.replace(config, log_with=["mlflow"])
