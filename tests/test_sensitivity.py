"""plan --strategy sensitivity: the layers whose aligned replacement hurts the teacher most stay full attention."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.convert import convert_model
from lt2convert.plan import read_plan, resolve_spec
from lt2convert.sensitivity import keep_most_sensitive, layer_scores, sensitivity_plan
from lt2convert.testing import SMALL_OURO_SHAPE, ouro_config, write_checkpoint

SHAPE = SMALL_OURO_SHAPE


def test_swapping_in_an_identical_layer_costs_nothing(tmp_path):
    teacher = write_checkpoint(tmp_path / "teacher", ouro_config(num_hidden_layers=2, **SHAPE), seed=1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert layer_scores(str(teacher), str(teacher), ids) == [0.0, 0.0]


def test_keep_most_sensitive_ranks_by_score_then_index():
    assert keep_most_sensitive([0.1, 0.5, 0.5, 0.2], 2, "gdn") == {0: "gdn", 1: "full_attention",
                                                                     2: "full_attention", 3: "gdn"}
    assert keep_most_sensitive([0.3, 0.1, 0.2], 1, "dsa") == {0: "full_attention", 1: "dsa", 2: "dsa"}


def test_sensitivity_plan_keeps_the_highest_scoring_layers_full(tmp_path):
    teacher = write_checkpoint(tmp_path / "teacher", ouro_config(num_hidden_layers=4, **SHAPE), seed=4)
    text = tmp_path / "train.txt"
    text.write_text("the loop refines the state of every token, step after step. " * 60)
    spec = resolve_spec("smollm2-135m-full-gdn")  # full_attention:1, gdn:3
    plan = sensitivity_plan(
        str(teacher), spec, data=[str(text)], tokens=6 * 2 * 32, seq_len=32, batch_size=2, eval_tokens=64,
        eval_text=str(text), tokenizer="bytes", progress=False,
        work_dir=tmp_path,
    )
    scores = plan.strategy.scores
    assert len(scores) == 4 and all(s > 0 for s in scores)
    assert plan.layer_types.count("full_attention") == 1 and plan.layer_types.count("gdn") == 3
    assert plan.layer_types[max(range(4), key=lambda i: scores[i])] == "full_attention"
    assert plan.strategy.name == "sensitivity" and plan.strategy.params["align_tokens"] == 6 * 2 * 32
    assert not list(tmp_path.glob("lt2-sensitivity-*"))  # the work folder is cleaned up
    # The command line writes the same kind of plan file; it round-trips and converts like any other plan.
    args = ["plan", str(teacher), "--recipe", "smollm2-135m-full-gdn", "--strategy", "sensitivity", "--data",
            str(text), "--tokenizer", "bytes", "-o", str(tmp_path / "cli-plan.yaml")]
    too_small = CliRunner().invoke(main, [*args, "--align-tokens", "100"])
    assert too_small.exit_code == 1 and "--align-tokens 100: less than one align step" in too_small.output
    assert not (tmp_path / "cli-plan.yaml").exists()
    from lt2convert.plan import write_plan

    write_plan(plan, tmp_path / "plan.yaml")  # the library's plan, as `plan -o` writes it
    again = read_plan(tmp_path / "plan.yaml")
    assert again.strategy.scores == scores and again.layer_types == plan.layer_types
    out = convert_model(teacher, tmp_path / "plan.yaml", tmp_path / "hybrid")
    assert (out / "config.json").is_file()


def test_sensitivity_rejects_mixes_it_cannot_rank(tmp_path):
    teacher = write_checkpoint(tmp_path / "teacher", ouro_config(num_hidden_layers=2, **SHAPE), seed=1)
    result = CliRunner().invoke(main, ["plan", str(teacher), "--mix", "all-gdn", "--strategy", "sensitivity"])
    assert result.exit_code == 1 and "needs a mix of full_attention and one other mixer" in result.output
    result = CliRunner().invoke(main, ["plan", str(teacher), "--strategy", "sensitivity", "--layers", "1"])
    assert result.exit_code == 1 and "drop --placement and --layers" in result.output
