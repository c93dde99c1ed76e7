"""distill: losses by hand, the packed token stream, and the align stage (error drops, only new mixers train,
exact resume after SIGKILL, NaN stops cleanly)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from lt2convert import load_model
from lt2convert.calibrate import mixer_output_errors
from lt2convert.convert import InitOptions, convert_checkpoint
from lt2convert.distill import data as data_module
from lt2convert.distill import train as train_module
from lt2convert.distill.data import DataError, PackedTokenStream, byte_encode, read_documents
from lt2convert.distill.losses import align_loss, kd_loss
from lt2convert.distill.train import AlignConfig, TrainingDiverged, checkpoints, lr_factor, train_align
from lt2convert.io.checkpoint import LazyCheckpoint
from lt2convert.loading import derive_config, load_config
from lt2convert.testing import ouro_config, write_checkpoint

TINY = ouro_config(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    total_ut_steps=2,
)
STEPS, BATCH, SEQ = 20, 2, 16
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


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[1:-1], factors[2:], strict=True))


# ----------------------------------------------------------------------------------------------------- data


def test_stream_is_deterministic_covers_every_window_and_resumes(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh" * 10)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "0123456789" * 4}) + "\n\n" + json.dumps({"text": "xy"}))
    files = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    stream = PackedTokenStream(files, byte_encode, 8, seed=5, eos_id=255)
    assert stream.num_windows == (80 + 41 + 3) // 8
    epoch = torch.cat([stream.next_batch(1)[0] for _ in range(stream.num_windows)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, stream.tokens.tolist()))  # each window once
    again = PackedTokenStream(files, byte_encode, 8, seed=5, eos_id=255)
    first, positions = again.next_batch(3)
    assert positions == [0, 1, 2] and torch.equal(first, epoch[:3])
    resumed = PackedTokenStream(files, byte_encode, 8, seed=5, eos_id=255)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert torch.equal(resumed.next_batch(4)[0], again.next_batch(4)[0])
    other = PackedTokenStream(files, byte_encode, 8, seed=6, eos_id=255)
    assert not torch.equal(other.next_batch(stream.num_windows)[0], epoch)
    with pytest.raises(DataError, match="seed=6"):
        resumed.load_state_dict(other.state_dict())


def test_data_errors_name_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "data.csv").write_text("a,b")
    (tmp_path / "short.txt").write_text("abc")
    cases = {
        "missing.txt": "missing.txt: training text file not found",
        "empty.txt": "empty.txt: no text",
        "binary.txt": "binary.txt: not UTF-8 text",
        "bad.jsonl": "bad.jsonl line 2: expected a JSON object with a string 'text' field",
        "data.csv": "data.csv: unsupported file type",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_documents(tmp_path / name)
    with pytest.raises(DataError, match="fewer than one window of 16"):
        PackedTokenStream([tmp_path / "short.txt"], byte_encode, 16, seed=0)
    assert data_module.read_documents(tmp_path / "short.txt") == ["abc"]


# ---------------------------------------------------------------------------------------------------- align


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = write_checkpoint(root / "teacher", TINY, seed=1)
    source, _ = load_config(teacher)
    student = convert_checkpoint(
        teacher,
        derive_config(source, {"layer_types": ["full_attention", "gdn"]}),
        root / "student",
        init=InitOptions(gdn_norm="unit"),
    )
    words = ["loop", "state", "mixer", "delta", "token", "the", "a", "of", "gate", "decay", "key", "value"]
    generator = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (1200,), generator=generator).tolist())
    (root / "train.txt").write_text(text)
    config = AlignConfig(
        teacher=str(teacher),
        student=str(student),
        data=[str(root / "train.txt")],
        out=str(root / "run-a"),
        tokens=STEPS * BATCH * SEQ,
        seq_len=SEQ,
        batch_size=BATCH,
        lr=1e-2,
        warmup_steps=2,
        checkpoint_every=3,
        tokenizer="bytes",
    )
    result = train_align(config)
    return {"root": root, "teacher": teacher, "student": student, "config": config, "result": result}


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_align_reduces_mixer_output_error(setup):
    assert setup["result"].steps == STEPS and setup["result"].tokens == STEPS * BATCH * SEQ
    held_out = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(123))
    teacher = load_model(setup["teacher"])
    before = mixer_output_errors(teacher, load_model(setup["student"]), held_out)
    after = mixer_output_errors(teacher, load_model(setup["result"].final), held_out)
    assert set(before) == {1} and after[1] < 0.8 * before[1], (before, after)
    losses = [m["loss"] for m in metrics(setup["root"] / "run-a")]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_only_the_new_mixers_change(setup):
    teacher, final = LazyCheckpoint(setup["teacher"]), LazyCheckpoint(setup["result"].final)
    student = LazyCheckpoint(setup["student"])
    assert set(final.names()) == set(student.names())
    for name in final.names():
        if name.startswith(MIXER):
            continue
        assert torch.equal(final.get(name), teacher.get(name)), name
    assert any(not torch.equal(final.get(n), student.get(n)) for n in final.names() if n.startswith(MIXER))
    with pytest.raises(ValueError, match="no converted layers"):
        train_module.converted_layers(load_config(setup["teacher"])[0], load_config(setup["teacher"])[0])


KILLED_RUN = """
import json, sys, time
import lt2convert.distill.train as t
original = t.align_loss
def slow(*args, **kwargs):
    time.sleep(0.05)
    return original(*args, **kwargs)
t.align_loss = slow
t.train_align(t.AlignConfig(**json.loads(sys.argv[1])))
"""


def test_resume_after_sigkill_is_exact(setup):
    config = replace(setup["config"], out=str(setup["root"] / "run-b"))
    run = setup["root"] / "run-b"
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(config.settings())])
    deadline = time.monotonic() + 60
    while not checkpoints(run) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.13)  # somewhere mid-step, after a checkpoint
    assert process.poll() is None, "the run finished before it could be killed"
    process.kill()
    process.wait()
    assert checkpoints(run) and not (run / "final").exists()
    killed_at = int(checkpoints(run)[-1].name.removeprefix("step-"))
    assert 0 < killed_at < STEPS
    with pytest.raises(FileExistsError, match="resume=True"):
        train_align(config)
    result = train_align(config, resume=True)
    a, b = load_file(setup["result"].final / "model.safetensors"), load_file(result.final / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    ma, mb = metrics(setup["root"] / "run-a"), metrics(run)
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))
    windows = [w for m in mb for w in m["windows"]]
    assert windows == list(range(STEPS * BATCH))  # no window trained twice or skipped
    assert [(m["windows"], m["loss"], m["lr"], m["tokens"]) for m in ma] == [
        (m["windows"], m["loss"], m["lr"], m["tokens"]) for m in mb
    ]
    with pytest.raises(ValueError, match="different settings \\(lr\\)"):
        train_align(replace(config, lr=1.0), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    config = replace(setup["config"], out=str(setup["root"] / "run-nan"))
    calls = {"n": 0}
    original = train_module.align_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 * 2 else loss  # from step 7 (1 layer x 2 loop steps a step)

    monkeypatch.setattr(train_module, "align_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"align step 7: loss nan.*last good checkpoint: .*step-00000006"):
        train_align(config)
    run = setup["root"] / "run-nan"
    assert [c.name for c in checkpoints(run)] == ["step-00000003", "step-00000006"]
    assert len(metrics(run)) == 6 and not (run / "final").exists()
    monkeypatch.setattr(train_module, "align_loss", original)
    result = train_align(config, resume=True)  # the kept checkpoint is intact: resuming reproduces run A
    a, b = load_file(setup["result"].final / "model.safetensors"), load_file(result.final / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
