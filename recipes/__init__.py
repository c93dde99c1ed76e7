"""Named recipes (YAML), installed as package data of `lt2convert.recipes`: `lt2convert plan --recipe NAME`.

A recipe's `plan:` section is read by `lt2convert.plan.load_recipe`, its `distill:` section by
`lt2convert.distill.recipe.load_stages`; this module only finds and parses the file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lt2convert.errors import PlanError


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("lt2convert.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe_data(name: str) -> tuple[dict, str]:
    """(the parsed YAML mapping, a name for messages) of a shipped recipe by name, or a recipe file by path."""
    import yaml

    if Path(name).is_file():
        text, origin = Path(name).read_text(), name
    elif name in recipe_names():
        text, origin = (resources.files("lt2convert.recipes") / f"{name}.yaml").read_text(), f"recipe {name}"
    else:
        raise PlanError(f"recipe {name}", [f"no such recipe or file (shipped recipes: {', '.join(recipe_names())})"])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PlanError(origin, ["not valid YAML"]) from err
    if not isinstance(data, dict):
        raise PlanError(origin, ["expected a mapping with a plan: section"])
    return data, origin
