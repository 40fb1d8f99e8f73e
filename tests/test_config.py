"""`agp run --config FILE.yaml` merged over the stage dataclasses, flags generated from their fields."""
from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from agp import config, stages
from agp.cli import build_parser
from agp.errors import AGPError


def _run_parser():
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]


def _leaf_paths(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_field_has_a_flag_with_help():
    flags = {opt: action for action in _run_parser()._actions for opt in action.option_strings}
    for name, mod in stages.implemented().items():
        for path in _leaf_paths(mod.CONFIG):
            flag = f"--{name}-{path.replace('.', '-').replace('_', '-')}"
            assert flag in flags, flag
            assert "(default" in flags[flag].help, flag


def test_defaults_then_file_then_flags(tmp_path):
    from agp.train.controller import ControllerArgs
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("controller:\n  prompts: 40\n  positions: 8\n  heads: {steps: 90, lr: 0.01}\n")
    args = _run_parser().parse_args(["--config", str(cfg_file), "--controller-positions", "5",
                                     "--controller-steps", "7", "--controller-layers", "9,6,9"])
    cfg = config.resolve(ControllerArgs, "controller", args, config.load_file(args.config))
    assert (cfg.prompts, cfg.positions, cfg.heads.steps, cfg.heads.lr) == (40, 5, 7, 0.01)
    assert cfg.probe_layers == [6, 9], "layers are de-duplicated and sorted by validate()"
    assert cfg.max_tokens == ControllerArgs.max_tokens and cfg.heads.hidden == 64


def test_unknown_keys_warn_and_bad_files_are_one_line_errors(tmp_path):
    from agp.train.baseline import BaselineArgs
    with pytest.warns(UserWarning, match="unknown keys"):
        config.resolve(BaselineArgs, "baseline", None, {"baseline": {"per_source": 2, "typo": 1}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("controller: [unclosed\n")
    with pytest.raises(AGPError, match="not valid YAML"):
        config.load_file(str(bad))
    with pytest.raises(AGPError, match="cannot read config file"):
        config.load_file(str(tmp_path / "missing.yaml"))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(AGPError, match="must map stage names"):
        config.load_file(str(listing))


def test_bad_flag_values_are_rejected_at_parse_time():
    with pytest.raises(AGPError, match="--controller-prompts: expects N, got 'many'"):
        _run_parser().parse_args(["--controller-prompts", "many"])
    with pytest.raises(AGPError, match="--controller-positions must be at least 1"):
        _run_parser().parse_args(["--controller-positions", "0"])
