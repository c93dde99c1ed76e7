"""`evaluate`: lm-evaluation-harness on our looped runtime, with Ouro's exit modes and named suites.

Suites live in `evals/` (shipped as `lt2convert.evals`): `suites.yaml` names them, `evals/tasks` holds offline
task YAMLs (hand-written fixtures, Shakespeare held-out perplexity, synthetic recall). Hub suites (`ouro-paper`,
`zero-shot`) use lm-eval's built-in tasks and need the Hugging Face dataset hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType

import yaml

from lt2convert.errors import LT2Error, OutputExistsError
from lt2convert.io.outputs import atomic_write


class EvalError(LT2Error, ValueError):
    """A suite, task or dataset problem, reported as one line by the CLI."""


@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int | None = None
    metric: str | None = None  # the metric shown first, "name" or "name,filter"


def evals_dir() -> Path:
    """The installed `lt2convert.evals` package data, else `evals/` of a source checkout."""
    try:
        from importlib import resources

        folder = Path(str(resources.files("lt2convert.evals")))
        if (folder / "suites.yaml").is_file():
            return folder
    except ModuleNotFoundError:
        pass
    folder = Path(__file__).resolve().parent.parent / "evals"
    if not (folder / "suites.yaml").is_file():
        raise EvalError(f"evals folder not found (looked for lt2convert.evals and {folder})")
    return folder


def tasks_dir() -> Path:
    return evals_dir() / "tasks"


def local_task_names() -> list[str]:
    """Tasks in evals/tasks (each YAML is named after its task)."""
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def load_suites() -> dict[str, dict]:
    return yaml.safe_load((evals_dir() / "suites.yaml").read_text())


def suite_names() -> list[str]:
    return list(load_suites())


def suite_specs(name: str) -> list[TaskSpec]:
    suites = load_suites()
    if name not in suites:
        raise EvalError(f"no suite {name!r} (suites: {', '.join(suites)})")
    return [TaskSpec(**entry) for entry in suites[name]["tasks"]]


def loaders() -> ModuleType:
    """evals/tasks/loaders.py (the offline tasks' data generators), imported by path as lm-eval does."""
    path = tasks_dir() / "loaders.py"
    spec = importlib.util.spec_from_file_location("lt2convert_eval_loaders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _suite_metrics() -> dict[str, str]:
    """The metric each suite shows first for its tasks, reused when a task is named with --tasks."""
    return {e["task"]: e["metric"] for suite in load_suites().values() for e in suite["tasks"] if e.get("metric")}


def parse_tasks(text: str) -> list[TaskSpec]:
    """`a,b:5` -> tasks a (default shots) and b (5-shot)."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, shots = item.partition(":")
        if shots and not shots.isdigit():
            raise EvalError(f"task {item!r}: expected NAME or NAME:SHOTS")
        specs.append(TaskSpec(name, int(shots) if shots else None, _suite_metrics().get(name)))
    if not specs:
        raise EvalError("no tasks given")
    return specs


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def exit_kwargs(exit_at_step: int | None, exit_threshold: float | None, weighted_exit: bool) -> dict:
    chosen = [exit_at_step is not None, exit_threshold is not None, weighted_exit]
    if sum(chosen) > 1:
        raise EvalError("choose at most one of exit_at_step, exit_threshold and weighted_exit")
    if exit_at_step is not None:
        return {"exit_at_step": exit_at_step}
    if exit_threshold is not None:
        if not 0.0 < exit_threshold <= 1.0:
            raise EvalError(f"exit_threshold={exit_threshold} is outside (0, 1]")
        return {"exit_threshold": exit_threshold}
    return {"use_weighted_exit": True} if weighted_exit else {}


def _check_exit_mode(model, kwargs: dict) -> None:
    config = model.config
    if "exit_at_step" in kwargs and not 0 <= kwargs["exit_at_step"] < getattr(config, "total_ut_steps", 1):
        raise EvalError(f"exit_at_step={kwargs['exit_at_step']} is outside 0..{config.total_ut_steps - 1}")
    if ({"exit_threshold", "use_weighted_exit"} & set(kwargs)) and not getattr(config, "use_exit_gate", False):
        raise EvalError("this model has no exit gate; --exit-threshold / --weighted-exit do not apply")


def _lm_class():
    """HFLM that passes the exit mode to every forward and generate call of our model."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class LoopedLM(HFLM):
        def __init__(self, *args, exit_mode: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.exit_mode = dict(exit_mode or {})
            windowed = ("dsa", "swa", "swa_gdn")  # mixers that take no padded batches
            self.no_left_padding = any(t in windowed for t in getattr(self.model.config, "layer_types", []))

        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:  # seq2seq only; not our models
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                # lm-eval pads log-likelihood batches on the right without a mask: causal, so harmless.
                return self.model(inps, use_cache=False, **self.exit_mode).logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            generation_kwargs = {**generation_kwargs, **self.exit_mode}
            mask = generation_kwargs.get("attention_mask")
            if not self.no_left_padding or mask is None or bool(mask.all()):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            # DSA / SWA layers refuse left-padded batches: generate row by row, then re-pad like a batch.
            rows = []
            for row, row_mask in zip(context, mask, strict=True):
                pad = int((~row_mask.bool()).sum())
                kwargs = {**generation_kwargs, "attention_mask": row_mask[pad:][None]}
                out = super()._model_generate(row[pad:][None], max_length - pad, stop, **kwargs)[0]
                rows.append(torch.cat([row[:pad], out]))
            width = max(len(r) for r in rows)
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            return torch.stack([torch.cat([r, r.new_full((width - len(r),), pad_id)]) for r in rows])

    return LoopedLM


def _missing_dataset(err: Exception, spec: TaskSpec) -> str:
    """A one-line reason for a task that could not load its data (typically: offline and not cached)."""
    text = f"{type(err).__name__}: {err}"
    found = re.search(r"['\"]([\w.-]+/[\w.-]+)['\"]", text) or re.search(r"datasets/([\w.-]+/[\w.-]+)", text)
    dataset = found.group(1) if found else None
    where = f"dataset {dataset!r}" if dataset else "a task's dataset"
    hint = (
        "the Hugging Face hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not cached"
        if _offline() or "offline" in text.lower()
        else text.splitlines()[0][:200]
    )
    return f"task {spec.task}: cannot load {where}: {hint}"


def _load_task(manager, spec: TaskSpec):
    """Build one task or group (loading its data) with the spec's shot count; a data problem is one line."""
    try:
        loaded = manager.load(spec.task)
    except FileNotFoundError as err:  # a local task's asset (e.g. the shakespeare text) is missing
        raise EvalError(f"task {spec.task}: {str(err).splitlines()[0]}") from err
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:
        raise EvalError(_missing_dataset(err, spec)) from err
    if spec.num_fewshot is not None:
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
    if spec.task in loaded["groups"]:
        return loaded["groups"][spec.task]
    if spec.task in loaded["tasks"]:
        return loaded["tasks"][spec.task]
    return list(loaded["tasks"].values())  # a tag: its tasks


# On a CPU, lm-eval's automatic batch size cannot work: it probes for the largest batch that does not run out of
# memory at the model's full length, and a CPU never reports running out; it would only spend minutes on the probe.
CPU_AUTO_BATCH_SIZE = 4


def parse_batch_size(value: int | str) -> int | str:
    """4, "4", "auto" or "auto:N" (lm-eval's re-detect N times) -> an int or the "auto" text."""
    text = str(value).strip().lower()
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise EvalError(f"batch size {value!r}: expected a positive number, 'auto' or 'auto:N'")


def default_device(device: str | None) -> str | None:
    """cuda when the machine has it and no device was chosen."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else None


def run_stamp() -> str:
    """lm-eval's file-name date: the local ISO time with ':' replaced, down to the microsecond."""
    return datetime.now().isoformat().replace(":", "-")


def _write_new(path: Path, write) -> None:
    """Write atomically and publish under `path` only if nothing is there: an earlier result is never replaced."""
    try:
        atomic_write(path, write, replace=False)
    except OutputExistsError as err:
        raise EvalError(str(err)) from None


def _write_results(path: Path, data: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    _write_new(path, lambda f: json.dump(data, f, indent=2, default=handle_non_serializable))


def _write_samples(path: Path, samples: list[dict]) -> None:
    """lm-eval's per-sample records (`--log_samples`): one JSON line per document, its arguments and responses
    flattened to strings as lm-eval does so the datasets library can read the file."""
    from lm_eval.utils import handle_non_serializable, sanitize_list

    def write(handle) -> None:
        for sample in samples:
            record = dict(sample)
            record["arguments"] = {
                f"gen_args_{i}": {f"arg_{j}": part for j, part in enumerate(arg)}
                for i, arg in enumerate(sample["arguments"])
            }
            record["resps"] = sanitize_list(sample["resps"])
            record["filtered_resps"] = sanitize_list(sample["filtered_resps"])
            record["target"] = str(sample["target"])
            handle.write(json.dumps(record, default=handle_non_serializable, ensure_ascii=False) + "\n")

    _write_new(path, write)


def results_files(folder: str | Path, name: str) -> list[Path]:
    """The results files `evaluate(..., output=folder)` wrote for a suite (or "tasks"), oldest first."""
    return sorted(Path(folder).glob(f"results_{name}_*.json"))


def evaluate(
    model_or_source,
    suite: str | None = None,
    tasks: str | list[str] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    output: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer=None,
    exit_at_step: int | None = None,
    exit_threshold: float | None = None,
    weighted_exit: bool = False,
    seed: int = 0,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
) -> dict:
    """Run lm-eval's `simple_evaluate` on one of our models (a loaded LT2ForCausalLM, or any source `load_model`
    takes) for a suite or a task list (`"a,b:5"` or a list of names). Returns lm-eval's results dict with an
    added `lt2convert` entry (suite, exit mode, table rows, output files).

    device: default cuda when available (a loaded model stays where it is). batch_size: a number, or "auto"
    (lm-eval's detection on cuda; CPU_AUTO_BATCH_SIZE on a CPU). With `output`, the dict is written atomically to
    a new `output/results_<suite or "tasks">_<date>.json` (lm-eval's naming: a rerun never replaces an earlier
    result); with `log_samples` too, lm-eval's per-document records go to `output/samples_<task>_<date>.jsonl`."""
    if (suite is None) == (tasks is None):
        raise EvalError("give exactly one of a suite or a task list")
    specs = suite_specs(suite) if suite else parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    mode = exit_kwargs(exit_at_step, exit_threshold, weighted_exit)
    batch_size = parse_batch_size(batch_size)
    local = set(local_task_names())
    hub = [s for s in specs if s.task not in local]

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=bool(hub))
    unknown = [s.task for s in hub if not manager.match_tasks([s.task])]
    if unknown:
        raise EvalError(f"unknown task(s): {', '.join(unknown)}")
    loaded = [_load_task(manager, spec) for spec in specs]  # data first: a missing dataset fails before the model

    if isinstance(model_or_source, str | Path):
        from lt2convert.loading import load_model

        model = load_model(model_or_source, dtype=dtype, device=default_device(device))
    else:
        model = model_or_source
        if device is not None:
            model = model.to(device)
    model.eval()
    _check_exit_mode(model, mode)
    if tokenizer is None:
        from transformers import AutoTokenizer

        folder = getattr(model.config, "name_or_path", None)
        if (
            not folder
            or not Path(folder, "tokenizer_config.json").is_file()
            and not Path(folder, "tokenizer.json").is_file()
        ):
            raise EvalError(f"no tokenizer next to the model ({folder}); pass one with tokenizer=")
        tokenizer = AutoTokenizer.from_pretrained(folder)

    on_cpu = next(model.parameters()).device.type == "cpu"
    chosen = CPU_AUTO_BATCH_SIZE if isinstance(batch_size, str) and on_cpu else batch_size
    lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=chosen, exit_mode=mode)
    # lm-eval prints progress notes ("bootstrapping for stddev") to stdout: keep stdout for our own output (--json)
    with contextlib.redirect_stdout(sys.stderr):
        results = simple_evaluate(
            model=lm,
            tasks=loaded,
            task_manager=manager,
            limit=limit,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,  # stderr of perplexity-type metrics; lm-eval's 100000 is slow on a CPU
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )

    results["lt2convert"] = {
        "model": str(getattr(model.config, "name_or_path", "") or type(model).__name__),
        "suite": suite,
        "tasks": [s.__dict__ for s in specs],
        "exit_mode": mode or "default",
        "limit": limit,
        "batch_size": batch_size if isinstance(batch_size, int) else f"{batch_size} ({lm.batch_size})",  # what ran
        "seed": seed,
        "rows": table_rows(results, specs),
    }
    if output is not None:
        write_outputs(results, Path(output), suite or "tasks")
    return results


def write_outputs(results: dict, folder: Path, name: str) -> None:
    """results_<name>_<date>.json (without the samples, as lm-eval writes it) and samples_<task>_<date>.jsonl."""
    stamp = run_stamp()
    path = folder / f"results_{name}_{stamp}.json"
    samples = results.get("samples") or {}
    info = results["lt2convert"]
    info["output_file"] = str(path)
    info["samples_files"] = [str(folder / f"samples_{task}_{stamp}.jsonl") for task in samples]
    for task, records in samples.items():
        _write_samples(folder / f"samples_{task}_{stamp}.jsonl", records)
    _write_results(path, {k: v for k, v in results.items() if k != "samples"})


def table_rows(results: dict, specs: list[TaskSpec]) -> list[dict]:
    """One row per task (and group) and metric: the suite's chosen metric first, then the others."""
    rows = []
    wanted = {s.task: s for s in specs}
    scores = {**results.get("groups", {}), **results.get("results", {})}
    names = [s.task for s in specs] + [t for t in scores if t not in wanted]
    for name in names:
        if name not in scores:
            continue
        entry = scores[name]
        metrics = [k for k in entry if "," in k and "_stderr" not in k and isinstance(entry[k], int | float)]
        spec = wanted.get(name)
        if spec and spec.metric:
            key = spec.metric if "," in spec.metric else f"{spec.metric},none"
            metrics.sort(key=lambda k, key=key: k != key)
        for i, key in enumerate(metrics):
            metric, _, filt = key.partition(",")
            stderr = entry.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": name,
                    "n_shot": results.get("n-shot", {}).get(name),
                    "metric": metric if filt == "none" else f"{metric} ({filt})",
                    "value": entry[key],
                    "stderr": stderr if isinstance(stderr, int | float) else None,
                    "primary": i == 0 and name in wanted,
                    "samples": results.get("n-samples", {}).get(name, {}).get("effective"),
                }
            )
    return rows
