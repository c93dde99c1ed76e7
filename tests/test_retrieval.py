"""Retrieval-head scores (lt2convert.retrieval) and `plan --strategy sensitivity --keep-retrieval N`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.distill.data import byte_encode
from lt2convert.loading import load_model
from lt2convert.plan import PlanError, resolve_spec
from lt2convert.retrieval import copy_sources, layer_copy_scores, recall_prompts
from lt2convert.sensitivity import ranked, sensitivity_plan
from lt2convert.testing import SMALL_OURO_SHAPE, ouro_config, write_checkpoint


def test_copy_sources_are_where_the_same_bigram_occurs():
    context = [5, 1, 2, 9, 1, 3, 7, 1]  # ends with 1: the first answer token follows a 1
    assert copy_sources(context, [2, 9, 4]) == [[2], [3], []]
    assert copy_sources(context, [3]) == [[5]]


def test_recall_prompts_are_not_the_evaluation_documents():
    from lt2convert.evals.tasks.loaders import passkey_rows

    prompts = recall_prompts(4)
    assert len(prompts) == 4 and all(answer.strip() for _, answer in prompts)
    evaluated = {row["context"] for row in passkey_rows(256, num_docs=50, seed=1234)}
    assert not evaluated & {context for context, _ in prompts}


def test_a_uniform_attention_layer_scores_the_share_of_prefix_its_sources_hold(tmp_path):
    folder = write_checkpoint(tmp_path / "m", ouro_config(num_hidden_layers=2, **SMALL_OURO_SHAPE))
    model = load_model(str(folder), dtype="float32")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.zero_()  # zero queries: every head attends uniformly
    prompts = [(byte_encode(context), byte_encode(answer)) for context, answer in recall_prompts(2)]
    scores = layer_copy_scores(model, prompts)
    shares = [
        len(where) / (len(context) + j)  # query position len(context)+j-1 sees len(context)+j keys
        for context, answer in prompts
        for j, where in enumerate(copy_sources(context, answer))
        if where
    ]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] == pytest.approx(sum(shares) / len(shares), rel=1e-5)


def test_scoring_needs_an_answer_token_found_in_context(tmp_path):
    folder = write_checkpoint(tmp_path / "m", ouro_config(num_hidden_layers=1, **SMALL_OURO_SHAPE))
    with pytest.raises(ValueError, match="cannot score layers"):
        layer_copy_scores(load_model(str(folder)), [([1, 2, 3], [4])])


def test_keep_retrieval_reserves_the_top_copy_layers_then_ranks_by_kl(tmp_path):
    teacher = write_checkpoint(tmp_path / "teacher", ouro_config(num_hidden_layers=4, **SMALL_OURO_SHAPE), seed=4)
    text = tmp_path / "train.txt"
    text.write_text("the pass key is 31415. remember it. 31415 is the pass key. " * 60)
    spec = dataclasses.replace(resolve_spec("smollm2-135m-full-gdn"), mix={"full_attention": 1, "gdn": 1})
    plan = sensitivity_plan(
        str(teacher), spec, data=[str(text)], tokens=4 * 2 * 32, seq_len=32, batch_size=2, eval_tokens=64,
        eval_text=str(text), tokenizer="bytes", keep_retrieval=1, progress=False, work_dir=tmp_path,
    )
    params, kl = plan.strategy.params, list(plan.strategy.scores)
    copy = params["retrieval_scores"]
    assert len(copy) == 4 and params["retrieval_layers"] == [ranked(copy)[0]]
    reserved = ranked(copy)[0]
    by_kl = [i for i in ranked(kl) if i != reserved][0]
    assert {i for i, kind in enumerate(plan.layer_types) if kind == "full_attention"} == {reserved, by_kl}
    with pytest.raises(PlanError, match="not within 0..2"):
        sensitivity_plan(str(teacher), spec, data=[str(text)], tokenizer="bytes", keep_retrieval=3)


def test_keep_retrieval_needs_the_sensitivity_strategy(tmp_path):
    teacher = write_checkpoint(tmp_path / "teacher", ouro_config(num_hidden_layers=2, **SMALL_OURO_SHAPE))
    result = CliRunner().invoke(main, ["plan", str(teacher), "--keep-retrieval", "1"])
    assert result.exit_code != 0 and "--keep-retrieval needs --strategy sensitivity" in result.output
