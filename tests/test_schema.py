"""Config as validated data: one schema per file (plan.yaml, recipe files) that rejects wrong types and unknown
keys, reports every problem at once with the file and the field, builds frozen records, and ships as JSON Schema."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.distill.recipe import load_stages, parse_stages
from lt2convert.plan import PlanError, read_plan

ROOT = Path(__file__).parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["plan.schema.json", "recipe.schema.json"])
def test_the_shipped_json_schema_is_the_generated_one(name):
    shipped = (ROOT / "docs" / name).read_text(encoding="utf-8")
    assert shipped == load_script("write_schemas").schema_text(name), "run scripts/write_schemas.py"


def test_wrong_types_in_stages_are_rejected_naming_the_field():
    stages = [
        {"kind": "finetune", "tokens": "5k", "trainable": "lora", "lora": {"r": "sixteen", "dropout": 1.5}},
        {"kind": "kd", "tokens": 1000, "every_step": "no", "seq_len": 16.0, "batch_size": True},
    ]
    with pytest.raises(PlanError) as err:
        parse_stages(stages, "my-recipe.yaml")
    message = str(err.value)
    assert message.startswith("my-recipe.yaml: ")
    for part in (
        "stages[0].lora.r: expected an integer, got 'sixteen'",
        "stages[0].lora.dropout: must be < 1, got 1.5",
        "stages[1].every_step: expected true or false, got 'no'",
        "stages[1].seq_len: expected an integer, got 16.0",
        "stages[1].batch_size: expected an integer, got True",
    ):
        assert part in message, message


def test_stages_are_frozen():
    stage = load_stages("tiny")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.lr = 1.0  # type: ignore[misc]


def write_plan_from_tiny_recipe(tmp_path: Path) -> tuple[Path, dict]:
    target = tmp_path / "plan.yaml"
    result = CliRunner().invoke(main, ["plan", "ouro-1.4b", "--recipe", "ouro-1.4b-gdn-dsa", "-o", str(target)])
    assert result.exit_code == 0, result.output
    return target, yaml.safe_load(target.read_text())


def test_wrong_types_in_a_plan_file_are_all_reported_with_file_and_field(tmp_path):
    target, data = write_plan_from_tiny_recipe(tmp_path)
    assert read_plan(target).mixers["dsa"].topk > 0
    data["mixers"]["gdn"]["use_gate"] = "yes"
    data["mixers"]["dsa"]["topk"] = "2048"
    data["source"]["hidden_size"] = 2048.0
    data["strategy"]["scores"] = ["high"] * 24
    data["layers"][0]["colour"] = "red"
    target.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError) as err:
        read_plan(target)
    message = str(err.value)
    assert message.startswith(f"{target}: ")
    for part in (
        "mixers.gdn.use_gate: expected true or false, got 'yes'",
        "mixers.dsa.topk: expected an integer, got '2048'",
        "source.hidden_size: expected an integer, got 2048.0",
        "strategy.scores[0]: expected a number, got 'high'",
        "layers[0].colour: unknown key",
    ):
        assert part in message, message


def test_a_plan_is_made_of_frozen_records(tmp_path):
    plan = read_plan(write_plan_from_tiny_recipe(tmp_path)[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.mixers["dsa"].topk = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.source.hidden_size = 1  # type: ignore[misc]


def test_a_recipe_plan_section_is_checked_by_the_same_schema(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("plan:\n  mix: {gdn: 1}\n  placement: diagonal\n  mixers: {gdn: {use_gate: 1, heads: 4}}\n")
    result = CliRunner().invoke(main, ["plan", "ouro-1.4b", "--recipe", str(recipe)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    for part in (
        f"{recipe}: ",
        "plan.placement: expected one of 'interleave', 'ends' or 'explicit', got 'diagonal'",
        "plan.mixers.gdn.use_gate: expected true or false, got 1",
        "plan.mixers.gdn.heads: unknown key",
    ):
        assert part in result.output, result.output


def test_every_shipped_recipe_uses_only_fields_the_schema_knows():
    schema = json.loads((ROOT / "docs" / "recipe.schema.json").read_text())
    stage_fields = set(schema["$defs"]["Stage"]["properties"])
    plan_fields = set(schema["$defs"]["RecipePlan"]["properties"])
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert set(data) <= set(schema["properties"]), path.name
        assert set(data["plan"]) <= plan_fields, path.name
        for stage in data.get("stages", []):
            assert set(stage) <= stage_fields, path.name
