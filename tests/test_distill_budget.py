"""distill --dry-run: the cost projection follows from FLOPs, bytes and the stated MFU (no weights loaded)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.costs import hardware
from lt2convert.distill.budget import planned_student, recipe_costs
from lt2convert.distill.recipe import Stage
from lt2convert.loading import load_config
from lt2convert.summary import parameter_breakdown

KD = Stage(name="kd", kind="kd", tokens=600_000_000, seq_len=4096, batch_size=16, every_step=True)


@pytest.fixture(scope="module")
def ouro():
    teacher, _ = load_config("ouro-1.4b")
    return teacher, planned_student("ouro-1.4b", "ouro-1.4b-full-gdn")


def test_time_scales_with_gpus_and_mfu_and_memory_with_the_micro_batch(ouro):
    teacher, student = ouro
    h100 = hardware("h100")
    base = recipe_costs([KD], teacher, student, h100, gpus=8, mfu=0.4)["stages"][0]
    more = recipe_costs([KD], teacher, student, h100, gpus=16, mfu=0.2)["stages"][0]
    assert more["tokens_per_s"] == pytest.approx(base["tokens_per_s"])  # twice the GPUs at half the MFU
    assert base["hours"] == pytest.approx(KD.tokens / base["tokens_per_s"] / 3600)
    assert base["tokens_per_s"] == pytest.approx(8 * 989e12 * 0.4 / base["flops_per_token"])
    params = sum(parameter_breakdown(student).values())
    assert base["student_gb"] == pytest.approx(4 * params / 1e9)  # fp32 weights
    assert base["optimizer_gb"] == pytest.approx(2 * base["gradients_gb"]) and 0 < base["gradients_gb"] < base[
        "student_gb"]  # only the converted mixers train in kd
    halved = recipe_costs([replace(KD, micro_batch_size=8)], teacher, student, h100, gpus=8)["stages"][0]
    assert halved["activations_gb"] == pytest.approx(base["activations_gb"] / 2)
    fitting = 8 * base["max_rows_per_gpu"]
    assert not base["fits"] and base["note"].startswith(f"does not fit: micro_batch_size {fitting}")
    checkpointed = recipe_costs([KD], teacher, student, h100, gpus=8, checkpointing=True)["stages"][0]
    assert checkpointed["activations_gb"] < base["activations_gb"] / 2
    assert checkpointed["flops_per_token"] > base["flops_per_token"]  # the recomputed forward


def test_dry_run_prints_the_projection_and_trains_nothing(tmp_path):
    args = ["distill", "--dry-run", "--teacher", "ouro-1.4b", "--recipe", "ouro-1.4b-full-gdn", "--tokens", "1B",
            "--gpus", "8", "--gpu", "h100"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "8 x H100 SXM at 35% MFU" in result.output and "| finetune | 300M | 16384 |" in result.output
    assert "batch_size 4 does not split over 8 GPUs" in result.output
    missing = CliRunner().invoke(main, ["distill", "--dry-run", "--recipe", "ouro-1.4b-full-gdn"])
    assert missing.exit_code != 0 and "--teacher" in missing.output
    no_output = CliRunner().invoke(main, ["distill", "x", "--teacher", "ouro-1.4b", "--recipe", "tiny"])
    assert no_output.exit_code != 0 and "--output" in no_output.output
