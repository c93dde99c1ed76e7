"""One of each: the context-length parser, the atomic write and folder swap, the SmolLM2 config, fla's GDN decay."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from lt2convert.cli import main
from lt2convert.errors import ConfigError, OutputExistsError
from lt2convert.io.assets import AssetError
from lt2convert.io.outputs import atomic_write, swap_folder
from lt2convert.io.smollm2 import _check_saved_config
from lt2convert.modeling.modeling_lt2 import fla_gdn_decay, init_gdn_decay
from lt2convert.presets import preset_config
from lt2convert.units import parse_context, parse_contexts


def test_context_lengths_parse_one_way_everywhere():
    assert parse_context(" 8K ") == 8192 and parse_context(4096) == 4096
    assert parse_contexts("32k,1k,8K,1k") == [1024, 8192, 32768]
    for bad in ("0", "8M", "k", "-1"):
        with pytest.raises(ConfigError, match="expected a token count such as 8192 or 8k"):
            parse_context(bad)
    with pytest.raises(ConfigError, match="no context given"):
        parse_contexts(" , ")


def test_a_bad_context_list_is_a_usage_error_naming_it():
    result = CliRunner().invoke(main, ["plan", "ouro-1.4b", "--contexts", "8k,lots"])
    assert result.exit_code == 2 and "'lots'" in result.output and "Traceback" not in result.output


def test_atomic_write_follows_the_umask_and_can_refuse_to_replace(tmp_path):
    previous = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "a" / "data.bin", lambda handle: handle.write(b"\x00\x01"), binary=True)
    finally:
        os.umask(previous)
    assert path.read_bytes() == b"\x00\x01" and path.stat().st_mode & 0o777 == 0o640
    with pytest.raises(OutputExistsError, match="data.bin: exists; not replacing an earlier result"):
        atomic_write(path, lambda handle: handle.write(b"new"), binary=True, replace=False)
    assert path.read_bytes() == b"\x00\x01" and sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]


def test_swap_folder_replaces_a_folder_and_leaves_nothing_else(tmp_path):
    target, finished = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    finished.mkdir()
    (finished / "new.txt").write_text("new")
    swap_folder(finished, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["new.txt"]


def saved_smollm2_config(folder, **changes):
    """config.json as transformers 5 writes the converted SmolLM2: rope_theta nested, torch_dtype renamed."""
    config = dict(preset_config("smollm2-135m"))
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    config["dtype"] = config.pop("torch_dtype")
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_the_smollm2_asset_is_checked_against_the_preset(tmp_path):
    _check_saved_config(saved_smollm2_config(tmp_path))
    with pytest.raises(AssetError, match="'num_key_value_heads': 9"):
        _check_saved_config(saved_smollm2_config(tmp_path, num_key_value_heads=9))
    with pytest.raises(AssetError, match="'rope_theta': 10000.0"):
        _check_saved_config(saved_smollm2_config(tmp_path, rope_parameters={"rope_theta": 10000.0}))


def test_fla_decay_is_one_formula_for_init_weights_and_conversion():
    torch.manual_seed(7)
    a_log, dt_bias = torch.empty(64), torch.empty(64)
    init_gdn_decay(a_log, dt_bias)  # the runtime's _init_weights path, on the global generator
    same_a_log, same_dt_bias = fla_gdn_decay(64, torch.Generator().manual_seed(7))  # the converter's path
    assert torch.equal(a_log, same_a_log) and torch.equal(dt_bias, same_dt_bias)
    dt = F.softplus(dt_bias)
    assert bool((a_log.exp() > 0).all() and (a_log.exp() < 16).all())
    assert bool((dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all())
