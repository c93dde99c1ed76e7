"""Model cards (README.md with Hub metadata) for converted and distilled checkpoints, built with huggingface_hub.

A converted checkpoint's card says what it was converted from and that it is untrained. A distilled checkpoint
(`distill`'s `final/`) gets its own card: the plan, the recipe's stages, the training data and tokens, the final
losses and, once known, eval results; its provenance.json extends the conversion's with the training run.
"""

from __future__ import annotations

import json
from pathlib import Path

from lt2convert.io.outputs import atomic_write_text

TAGS = ["lt2", "looped-transformer", "linear-attention", "hybrid", "lt2convert"]
LOAD_SNIPPET = [
    "```python",
    "from transformers import AutoModelForCausalLM",
    "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
    "```",
]


def base_model(record: dict) -> str | None:
    """The source's hub id when it has one (a preset or `org/name`); a local folder has none."""
    return record["source"].get("hub_id")


def source_license(record: dict) -> str | None:
    """The source's license: the preset's, else the `license:` of the source folder's own model card."""
    from huggingface_hub import ModelCard

    source = record["source"]
    if source.get("kind") == "preset":
        from lt2convert.presets import get_preset

        return get_preset(source["spec"]).license
    readme = Path(source.get("path") or "") / "README.md"
    if readme.is_file():
        try:
            return ModelCard.load(readme).data.license
        except (ValueError, OSError):
            return None
    return None


def hub_datasets(data: list[str]) -> list[str]:
    """Training data that names a Hub dataset (`hf:NAME[:CONFIG][@SPLIT]` -> NAME)."""
    names = [spec.removeprefix("hf:").split("@", 1)[0].split(":", 1)[0] for spec in data if spec.startswith("hf:")]
    return list(dict.fromkeys(names))


def revision(source: dict) -> str:
    return source.get("revision") or ("local" if source.get("kind") == "path" else "unpinned")


def source_note(source: dict) -> list[str]:
    """A preset's note on where its weights really come from (e.g. an offline, dequantised copy)."""
    if source.get("kind") != "preset":
        return []
    from lt2convert.presets import get_preset

    notes = get_preset(source["spec"]).notes
    return [f"Source weights: {notes}.", ""] if notes else []


def mixer_counts(config: dict) -> str:
    kinds = dict.fromkeys(config["layer_types"])
    return ", ".join(f"{kind} ×{config['layer_types'].count(kind)}" for kind in kinds)


def render(data, body: list[str]) -> str:
    from huggingface_hub import ModelCard

    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                       body="\n".join(body)))


def card_data(record: dict, *, tags: list[str], datasets: list[str] | None = None):
    from huggingface_hub import ModelCardData

    return ModelCardData(
        base_model=base_model(record),
        license=source_license(record),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets or None,
    )


def conversion_card(config: dict, record: dict) -> str:
    """The card of `convert`'s output: what it was converted from, how, and that it has not been trained."""
    source = record["source"]
    body = [
        f"# LT2 hybrid of {source['spec']}",
        "",
        f"Converted by lt2convert {record['versions']['lt2convert']} from `{source['spec']}`"
        f" (revision {revision(source)}). **Not trained after conversion**: the new mixers start from",
        "the attention's weights and need distillation (`lt2convert distill`) before use.",
        "",
        *source_note(source),
        f"- layers: {config['num_hidden_layers']} × {config['total_ut_steps']} loop steps",
        f"- mixers: {mixer_counts(config)}",
        f"- initialisation: `{json.dumps(record['init'])}`",
        "",
        "Load without lt2convert:",
        "",
        *LOAD_SNIPPET,
        "",
        "provenance.json holds the exact inputs (sha256), plan and initialisation.",
    ]
    return render(card_data(record, tags=TAGS), body)


def final_losses(metrics: Path) -> dict[str, float]:
    """Each stage's loss at its last optimizer step, from the run's metrics.jsonl."""
    losses: dict[str, float] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                losses[entry["stage"]] = entry["loss"]
    return losses


def training_record(settings: dict, tokens: int, losses: dict[str, float]) -> dict:
    """The training run as provenance: teacher, student, data, recipe stages, tokens and final losses."""
    return {
        "teacher": settings["teacher"],
        "student": settings["student"],
        "data": settings["data"],
        "seed": settings.get("seed"),
        "stages": settings["stages"],
        "tokens": tokens,
        "final_losses": losses,
    }


def distilled_card(config: dict, record: dict) -> str:
    """The card of a distilled checkpoint; `record` is its provenance.json (conversion + training [+ evaluation])."""
    training = record["training"]
    strategy = (record.get("plan") or {}).get("strategy") or {}
    plan_note = f" (plan: {strategy.get('recipe') or strategy.get('name')})" if strategy else ""
    stage_lines = [
        f"| {s['name']} | {s.get('kind', s['name'])} | {s['tokens']:,} | {s.get('seq_len', '')} | {s.get('lr', '')} "
        f"| {fmt_loss(training['final_losses'].get(s['name']))} |"
        for s in training["stages"]
    ]
    body = [
        f"# LT2 hybrid of {record['source']['spec']}, distilled",
        "",
        f"Converted from `{record['source']['spec']}` (revision {revision(record['source'])}) and "
        f"distilled from the teacher `{training['teacher']}` on {training['tokens']:,} tokens by lt2convert "
        f"{record['versions']['lt2convert']}.",
        "",
        *source_note(record["source"]),
        f"- layers: {config['num_hidden_layers']} × {config['total_ut_steps']} loop steps",
        f"- mixers: {mixer_counts(config)}{plan_note}",
        f"- training data: {', '.join(f'`{d}`' for d in training['data'])}",
        "",
        "| stage | kind | tokens | seq_len | lr | final loss |",
        "|---|---|---|---|---|---|",
        *stage_lines,
        "",
        *evaluation_lines(record.get("evaluation")),
        "Load without lt2convert:",
        "",
        *LOAD_SNIPPET,
        "",
        "provenance.json holds the conversion's inputs (sha256), plan and initialisation, and the training run.",
    ]
    tags = [*TAGS, "distillation"]
    return render(card_data(record, tags=tags, datasets=hub_datasets(training["data"])), body)


def fmt_loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def evaluation_lines(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    lines = ["Evaluation (lm-evaluation-harness, primary metric per task):", "", "| task | metric | value |",
             "|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['value']:.4g} |" for r in rows]
    return [*lines, ""]


def write_record_and_card(folder: Path, record: dict) -> None:
    atomic_write_text(folder / "provenance.json", json.dumps(record, indent=2) + "\n")
    config = json.loads((folder / "config.json").read_text())
    atomic_write_text(folder / "README.md", distilled_card(config, record))


def write_distilled_card(folder: Path, training: dict) -> None:
    """Extend `folder`'s provenance.json (the conversion's, copied) with the training run, and write its card."""
    known = folder / "provenance.json"
    record = json.loads(known.read_text()) if known.is_file() else unknown_conversion(training["student"])
    record["training"] = training
    write_record_and_card(folder, record)


def unknown_conversion(student: str) -> dict:
    """Provenance for a student folder that carries none (not written by `convert`)."""
    import lt2convert

    return {
        "source": {"spec": student, "kind": "path", "hub_id": None, "revision": None, "path": None},
        "versions": {"lt2convert": lt2convert.__version__},
    }


def add_evaluation(folder: Path, rows: list[dict]) -> None:
    """Record eval results (primary metrics) in a distilled checkpoint's provenance and card."""
    record = json.loads((folder / "provenance.json").read_text())
    if "training" not in record:
        return
    known = {(r["task"], r["metric"]): r for r in record.get("evaluation") or []}
    known |= {(r["task"], r["metric"]): {k: r[k] for k in ("task", "metric", "value")} for r in rows}
    record["evaluation"] = list(known.values())
    write_record_and_card(folder, record)
