"""distill under FSDP2: which stages shard the student, the sharded checkpoint round trip, and whole runs on two
CPU processes over gloo.

accelerate turns FSDP on only for GPU processes (a multi-CPU launch stays data parallel whatever its FSDP
options); its FSDP2 code runs on CPU all the same, so the whole-run test switches accelerate to FSDP2 in the
launched processes (fsdp_cpu_launch.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.utils import DistributedType
from click.testing import CliRunner

from lt2convert import load_model
from lt2convert.cli import main
from lt2convert.convert import convert_checkpoint
from lt2convert.distill.checkpoints import restore_trainable, trainable_weights, whole
from lt2convert.distill.recipe import Stage
from lt2convert.distill.train import shards_student
from lt2convert.errors import ConfigError
from lt2convert.loading import derive_config, load_config
from lt2convert.modeling import LT2ForCausalLM
from lt2convert.testing import SMALL_OURO_SHAPE, lt2_config, ouro_config, write_checkpoint

KD = Stage(name="kd", kind="kd", tokens=64, seq_len=16, batch_size=2, lr=1e-3)
ALIGN = Stage(name="align", kind="align", tokens=64, seq_len=16, batch_size=2, lr=1e-3)
LORA = Stage(name="lora", kind="finetune", tokens=64, seq_len=16, batch_size=2, lr=1e-3, trainable="lora")


@dataclass
class Plugin:
    fsdp_version: int


def test_fsdp2_shards_kd_and_finetune_stages_only():
    assert shards_student(DistributedType.FSDP, Plugin(2), KD)
    assert not shards_student(DistributedType.FSDP, Plugin(2), ALIGN)
    assert not shards_student(DistributedType.FSDP, Plugin(2), LORA)
    for plain in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        assert not shards_student(plain, None, KD)


@pytest.mark.parametrize(
    ("mode", "plugin", "named"),
    [(DistributedType.FSDP, Plugin(1), "fsdp_version 1"), (DistributedType.DEEPSPEED, None, "DeepSpeed")],
)
def test_unsupported_launch_modes_name_the_supported_ones(mode, plugin, named):
    with pytest.raises(ConfigError, match=named) as failure:
        shards_student(mode, plugin, KD)
    assert "--multi_gpu" in str(failure.value) and "--fsdp_version 2" in str(failure.value)


def sharded_student(seed: int) -> tuple[LT2ForCausalLM, dict[str, torch.nn.Parameter]]:
    """A tiny looped student (a GDN layer among attention) whose mixers train, sharded layer by layer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    student = LT2ForCausalLM(lt2_config(["full_attention", "gdn"]))
    student.requires_grad_(False)
    student.model.layers[1].self_attn.requires_grad_(True)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student, {name: p for name, p in student.named_parameters() if p.requires_grad}


def run_rank(rank: int, world: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        student, named = sharded_student(seed=0)
        optimizer = torch.optim.AdamW(named.values(), lr=1e-2)
        ids = torch.randint(0, 128, (2 * world, 16), generator=torch.Generator().manual_seed(1))[rank::world]
        for _ in range(3):
            loss = student(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            assert math.isfinite(loss.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        path = Path(folder) / "trainable.safetensors"
        weights = trainable_weights(named, rank == 0)
        assert bool(weights) == (rank == 0)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(weights, str(path))
        dist.barrier()

        fresh, fresh_named = sharded_student(seed=1)  # other weights, same sharding
        restore_trainable(path, fresh_named)
        for name, param in fresh_named.items():
            restored, trained = whole(param), whole(named[name])
            assert torch.equal(restored, trained), name
            gathered = [torch.empty_like(restored) for _ in range(world)]
            dist.all_gather(gathered, restored.contiguous())
            assert all(torch.equal(g, restored) for g in gathered), f"{name} differs across ranks"
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sharded_trainable_weights_round_trip_on_two_processes(tmp_path):
    """A few optimizer steps of a sharded student on two gloo processes, its trainable weights gathered into
    the checkpoint file, then restored into a differently initialised sharded student: equal, on both ranks."""
    mp.spawn(run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


# ------------------------------------------------------------------------------------- the trainer under FSDP2

SEQ = 16
RECIPE = (
    "stages:\n"
    f"  - {{kind: align, tokens: {4 * 4 * SEQ}, seq_len: {SEQ}, batch_size: 4, lr: 1.0e-2}}\n"
    f"  - {{kind: kd, tokens: {4 * 4 * SEQ}, seq_len: {SEQ}, batch_size: 4, lr: 3.0e-3, every_step: true}}\n"
)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_model(run / "final", dtype="float32").state_dict()


def test_fsdp2_distill_follows_the_single_process_run_and_resumes(tmp_path):
    """Two CPU processes with accelerate switched to FSDP2: the kd stage shards the student, the align stage stays
    data parallel; both follow the single-process run, and a resume from the kd stage's last checkpoint (sharded
    model and optimizer state, trainable weights) rewrites the same final student."""
    teacher = write_checkpoint(tmp_path / "teacher", ouro_config(num_hidden_layers=2, **SMALL_OURO_SHAPE), seed=1)
    source, _ = load_config(teacher)
    layers = {"layer_types": ["full_attention", "gdn"]}
    student = convert_checkpoint(teacher, derive_config(source, layers), tmp_path / "student")
    words = ["loop", "state", "mixer", "delta", "token", "the", "gate", "decay", "key", "value"]
    picks = torch.randint(0, len(words), (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "train.txt").write_text(" ".join(words[i] for i in picks))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    common = [
        "distill", student, "--teacher", teacher, "--recipe", tmp_path / "recipe.yaml", "--tokenizer", "bytes",
        "--data", tmp_path / "train.txt", "--no-progress", "--precision", "fp32", "--checkpoint-tokens", 2 * 4 * SEQ,
    ]  # fmt: skip
    one = CliRunner().invoke(main, [*map(str, common), "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output

    def launch(*extra: str) -> None:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(Path(__file__).parent / "fsdp_cpu_launch.py"), *extra,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-6000:]

    two = tmp_path / "two"
    launch(*map(str, common), "-o", str(two))
    single, sharded = metrics(tmp_path / "one"), metrics(two)
    assert [(m["stage"], m["windows"]) for m in single] == [(m["stage"], m["windows"]) for m in sharded]
    for a, b in zip(single, sharded, strict=True):
        assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["stage"], a["step"])
    trained = final_weights(two)
    for name, value in final_weights(tmp_path / "one").items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)

    kd_checkpoints = sorted((two / "checkpoints" / "1-kd").glob("step-*"))
    assert len(kd_checkpoints) == 2 and (kd_checkpoints[-1] / "pytorch_model_fsdp_0").exists()
    shutil.rmtree(two / "stages" / "1-kd")  # as if killed after the last checkpoint, before the stage's end
    shutil.rmtree(two / "final")
    launch("distill", "--resume", "-o", str(two))
    for name, value in final_weights(two).items():
        assert torch.equal(value, trained[name]), name
