"""Reading what a report shows: lm-eval result files, the published baselines, `bench --json` output and
distill run folders (training curves)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lt2convert.errors import ConfigError

PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "em", "f1", "mc1", "mc2", "contains", "mcc"}
SKIP_KEYS = {"alias", "name", "sample_len", "samples"}


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Key:
    """What must match for two numbers to be compared."""

    task: str
    shots: int | str | None
    metric: str | None
    filter: str | None

    def describe(self) -> str:
        shots = "?-shot" if self.shots is None else f"{self.shots}-shot"
        filt = "" if self.filter in (None, "none") else f", {self.filter}"
        return f"{self.task}, {shots}, {self.metric}{filt}"


@dataclass
class Cell:
    key: Key
    value: float  # percent for fraction metrics, raw otherwise
    stderr: float | None = None
    higher_is_better: bool = True
    version: str | None = None


@dataclass
class Model:
    name: str
    kind: str  # "run" (an lm-eval result) or "baseline"
    source: str
    cells: dict[Key, Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def find_result_files(inputs: list) -> list[Path]:
    """Each input: an lm-eval results JSON file, or a folder searched recursively for results_*.json."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.rglob("results*.json"))
            if not found:
                raise ConfigError(f"{path}: no lm-eval results_*.json file in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    return files


def model_name_of(data: dict, path: Path) -> str:
    name = data.get("model_name")
    if not name:
        args = (data.get("config") or {}).get("model_args")
        if isinstance(args, dict):
            name = args.get("pretrained")
        elif isinstance(args, str):
            parts = dict(p.split("=", 1) for p in args.split(",") if "=" in p)
            name = parts.get("pretrained")
    return str(name or path.parent.name or path.stem)


def task_shots(data: dict, task: str) -> int | str | None:
    nshot = data.get("n-shot") or {}
    if task in nshot and nshot[task] is not None:
        return nshot[task]
    config = (data.get("configs") or {}).get(task) or {}
    if config.get("num_fewshot") is not None:
        return config["num_fewshot"]
    subtasks = (data.get("group_subtasks") or {}).get(task) or []
    shots = {task_shots(data, sub) for sub in subtasks} - {None}
    if len(shots) == 1:
        return shots.pop()
    return "mixed" if shots else None


def to_display(metric: str, value: float) -> float:
    return 100 * value if metric in PERCENT_METRICS else value


def read_lm_eval(path: Path) -> tuple[str, list[Cell]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); expected lm-eval results JSON") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ConfigError(f"{path}: not an lm-eval results file (no 'results' object)")
    cells = []
    for task, metrics in data["results"].items():
        shots = task_shots(data, task)
        better = (data.get("higher_is_better") or {}).get(task) or {}
        version = (data.get("versions") or {}).get(task)
        for name, value in metrics.items():
            if name in SKIP_KEYS or "," not in name or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filt = name.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = to_display(metric, stderr) if isinstance(stderr, int | float) else None
            cells.append(
                Cell(
                    Key(task, shots, metric, filt),
                    to_display(metric, float(value)),
                    stderr,
                    bool(better.get(metric, True)),
                    None if version is None else str(version),
                )
            )
    return model_name_of(data, path), cells


def load_runs(inputs: list) -> list[Model]:
    """One Model per model name, in the order the inputs first name them; a later results file (by name:
    results_[<suite>_]<ISO date>.json) replaces an earlier one's number for the same task, shots, metric and
    filter."""
    models: dict[str, Model] = {}
    first_input: dict[str, int] = {}
    files = [(i, path) for i, item in enumerate(inputs) for path in find_result_files([item])]
    for index, path in sorted(files, key=lambda f: (f[1].name, str(f[1]))):
        name, cells = read_lm_eval(path)
        first_input[name] = min(first_input.get(name, index), index)
        model = models.setdefault(name, Model(name, "run", str(path)))
        if model.source != str(path) and str(path) not in model.source:
            model.source += f", {path}"
        for cell in cells:
            if cell.key in model.cells:
                model.notes.append(f"{cell.key.describe()}: {path.name} replaces an earlier result")
            model.cells[cell.key] = cell
    return sorted(models.values(), key=lambda m: first_input[m.name])


def baselines_dir() -> Path:
    from lt2convert.evaluate import evals_dir

    return evals_dir() / "baselines"


def load_baselines(spec: str | Path | None) -> dict | None:
    """A name in evals/baselines/ (e.g. 'ouro-paper') or a path to such a JSON file; None or 'none': none."""
    if spec is None or str(spec) == "none":
        return None
    path = Path(spec)
    if not path.is_file():
        path = baselines_dir() / f"{spec}.json"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(baselines_dir().glob("*.json"))) or "none found"
        raise ConfigError(f"unknown baselines {spec!r} (known: {known})")
    return json.loads(path.read_text())


def load_bench(paths: list) -> list[dict]:
    benches = []
    for item in paths or []:
        path = Path(item)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
            raise ConfigError(f"{path}: cannot read bench JSON ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise ConfigError(f"{path}: not `lt2convert bench --json` output (no 'models' list)")
        data["_source"] = str(path)
        benches.append(data)
    return benches


# Each row of an adaptive-exit sweep (lt2convert.exit_sweep) the report reads.
SWEEP_FIELDS = ("threshold", "steps_per_token", "decode_tokens_per_s", "speed_vs_every_step", "perplexity",
                "perplexity_vs_every_step")


def load_exit_sweep(path: str | Path | None) -> dict[str, dict] | None:
    """Model name -> its sweep, from a JSON file mapping names to `lt2convert.exit_sweep.sweep_model` results."""
    if path is None:
        return None
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the adaptive-exit sweep JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected an object mapping model names to adaptive-exit sweeps")
    for name, sweep in data.items():
        rows = sweep.get("rows") if isinstance(sweep, dict) else None
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"{path}: {name}.rows: expected a list of thresholds")
        for i, row in enumerate(rows):
            for key in SWEEP_FIELDS:
                value = row.get(key) if isinstance(row, dict) else None
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{path}: {name}.rows[{i}].{key}: expected a number, got {value!r}")
    return data



# ---------------------------------------------------------------------------------------------------------------
# Training curves (distill run folders)


def load_training(paths: list) -> dict[str, list[dict]]:
    """Stage kind -> one series per (run, stage) from each run folder's metrics.jsonl (a folder, or the file);
    the kinds come from the folder's run.json (a stage without one is its own kind)."""
    series: dict[str, list[dict]] = {}
    many = len(paths or []) > 1
    for item in paths or []:
        path = Path(item)
        metrics = path / "metrics.jsonl" if path.is_dir() else path
        if not metrics.is_file():
            raise ConfigError(f"{path}: no metrics.jsonl (not a distill run folder)")
        kinds = {}
        settings = metrics.parent / "run.json"
        if settings.is_file():
            try:
                kinds = {s["name"]: s["kind"] for s in json.loads(settings.read_text()).get("stages", [])}
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConfigError(f"{settings}: cannot read the stages ({err})") from err
        by_stage: dict[str, dict] = {}
        for number, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                stage, tokens, loss = record["stage"], float(record["tokens"]), float(record["loss"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"{metrics}:{number}: not a distill metrics record ({err})") from err
            label = f"{metrics.parent.name}: {stage}" if many else stage
            entry = by_stage.setdefault(stage, {"label": label, "tokens": [], "loss": []})
            entry["tokens"].append(tokens)
            entry["loss"].append(loss)
        for stage, entry in by_stage.items():
            series.setdefault(kinds.get(stage, stage), []).append(entry)
    return series
