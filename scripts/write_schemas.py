"""Write the JSON Schemas of plan.yaml and of recipe files into docs/ (tests/test_schema.py checks they are
current): `python scripts/write_schemas.py`."""

from __future__ import annotations

import json
from pathlib import Path

from lt2convert.distill.recipe import recipe_json_schema
from lt2convert.plan import plan_json_schema

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCHEMAS = {"plan.schema.json": plan_json_schema, "recipe.schema.json": recipe_json_schema}


def schema_text(name: str) -> str:
    return json.dumps(SCHEMAS[name](), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    for name in SCHEMAS:
        (DOCS / name).write_text(schema_text(name), encoding="utf-8")
        print(f"wrote docs/{name}")


if __name__ == "__main__":
    main()
