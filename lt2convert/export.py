"""The files that make a converted checkpoint self-describing and loadable without lt2convert installed:
config, remote-code runtime (flat modules named by `auto_map`), tokenizer, provenance and a model card."""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lt2convert.cards import conversion_card
from lt2convert.io.writer import write_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Development-only modules of the kernels package that an exported runtime does not need.
KERNEL_EXCLUDES = ("bench.py", "gpu_check.py")
RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)\.(\w+)(\s+import)", flags=re.MULTILINE)


def sha256_of(path: Path, chunk: int = 16 * 1024**2) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remote_code_files() -> dict[str, str]:
    """File name -> source text of the runtime as flat modules: transformers copies a remote-code module's
    relative imports only from the same folder, so the kernels package becomes `lt2_kernels*.py`."""
    import lt2convert.kernels
    import lt2convert.modeling

    modeling_dir = Path(lt2convert.modeling.__file__).parent
    files = {name: (modeling_dir / name).read_text() for name in ("configuration_lt2.py", "modeling_lt2.py")}
    kernels_dir = Path(lt2convert.kernels.__file__).parent
    for path in sorted(kernels_dir.glob("*.py")):
        if path.name in KERNEL_EXCLUDES:
            continue
        flat = "lt2_kernels.py" if path.name == "__init__.py" else f"lt2_kernels_{path.name}"
        files[flat] = RELATIVE_IMPORT.sub(r"\1.lt2_kernels_\2\3", path.read_text())
    return files


def copy_tokenizer(source: Path, target: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def input_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def hash_inputs_in_background(folder: Path) -> Future:
    """sha256 of every input file, computed in a thread while conversion runs: hashlib releases the GIL on
    large buffers, so hashing overlaps with reading and writing tensors instead of adding a second pass."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    future = pool.submit(lambda: {p.name: sha256_of(p) for p in input_files(folder)})
    pool.shutdown(wait=False)
    return future


def provenance(resolved, init: dict, plan: dict | None, input_sha256: dict[str, str]) -> dict:
    import torch
    import transformers

    import lt2convert

    folder = Path(resolved.folder)
    return {
        "source": {
            "spec": resolved.source.spec,
            "kind": resolved.source.kind,
            "hub_id": resolved.source.hub_id,
            "revision": resolved.source.revision,
            "path": str(folder),
        },
        "input_sha256": input_sha256,
        "plan": plan,
        "init": init,
        "versions": {
            "lt2convert": lt2convert.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def write_export_files(
    staging: Path,
    resolved,
    *,
    config: dict,
    weight_files: list[str],
    init: dict,
    plan: dict | None,
    input_sha256: dict[str, str],
) -> None:
    write_json(staging / "config.json", config)
    for name, text in remote_code_files().items():
        (staging / name).write_text(text)
    copy_tokenizer(Path(resolved.folder), staging)
    record = provenance(resolved, init, plan, input_sha256)
    record["weight_files"] = weight_files
    write_json(staging / "provenance.json", record)
    (staging / "README.md").write_text(conversion_card(config, record))
