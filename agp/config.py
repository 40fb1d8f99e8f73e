"""Config dataclasses: dict round-trips that warn on unknown keys, and `agp run` flags made from them.

The mlx-lm way (`mlx_lm.lora -c config.yaml`): a stage's @dataclass holds its defaults; a YAML file
(`agp run --config FILE`, one section per stage) is merged over them; flags given on the command line
win over both. Every field is reachable as `--<stage>-<field>` (nested dataclasses as
`--<stage>-<field>-<subfield>`), with the help text taken from the field's `metadata["help"]` or,
failing that, the comment on the field's line, so a dataclass documents its flags once.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
import warnings
from pathlib import Path

from agp.errors import AGPError

SEP = "__"  # argparse dest separator: "controller__heads__steps" <- --controller-heads-steps


class ConfigMixin:
    """Mix into a @dataclass to get dict round-trips that warn on unknown keys."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", UserWarning, stacklevel=2)
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in d.items():
            if name not in fields:
                continue
            sub = hints.get(name)
            if dataclasses.is_dataclass(sub) and isinstance(value, dict) and hasattr(sub, "from_dict"):
                value = sub.from_dict({**dataclasses.asdict(sub()), **value})
            values[name] = value
        return cls(**values)


def load_file(path: str | None) -> dict:
    """The YAML (or JSON) config file as a dict of sections; {} without a file."""
    if not path:
        return {}
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise AGPError(f"cannot read config file {file}: {e.strerror}; pass an existing YAML file to --config") from e
    except yaml.YAMLError as e:
        raise AGPError(f"config file {file} is not valid YAML ({str(e).splitlines()[0]}); fix it or drop --config") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AGPError(f"config file {file} must map stage names to sections (got {type(data).__name__})")
    return data


def add_arguments(group, cls, stage: str, aliases: dict[str, list[str]] | None = None, path: str = "") -> None:
    """One `--<stage>-<field>` flag per field of `cls` (recursing into nested dataclasses).

    Flags default to 'not given', so `resolve` can tell them from the file and the defaults.
    `aliases` maps a dotted field path ("heads.steps") to extra flag names kept for compatibility."""
    aliases = aliases or {}
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name, str)
        field_path = f"{path}{f.name}"
        if dataclasses.is_dataclass(kind):
            add_arguments(group, kind, stage, aliases, f"{field_path}.")
            continue
        flag = f"{stage}-{field_path.replace('.', '-').replace('_', '-')}"
        dest = f"{stage}{SEP}{field_path.replace('.', SEP)}".replace("-", "_")
        default = getattr(defaults, f.name)
        text = f.metadata.get("help") or comments.get(f.name) or f.name.replace("_", " ")
        names = [f"--{flag}", *(f"--{alias}" for alias in aliases.get(field_path, ()))]
        base = _base_type(kind)
        if base is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"{text} (default {default})")
            continue
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        group.add_argument(*names, dest=dest, type=_parser(base, flag, cls, f.name), default=argparse.SUPPRESS,
                           metavar=_metavar(base), help=f"{text} (default {_show(default)})", **extra)


def resolve(cls, prefix: str, args, file_data: dict | None = None):
    """Defaults of `cls` < the file's `prefix` section < flags given; then `validate()` if defined."""
    merged = _deep_merge(dataclasses.asdict(cls()), (file_data or {}).get(prefix) or {})
    given = vars(args) if args is not None else {}
    root = prefix.replace("-", "_") + SEP
    for dest, value in given.items():
        if dest.startswith(root):
            target = merged
            *parents, leaf = dest[len(root):].split(SEP)
            for key in parents:
                target = target.setdefault(key, {})
            target[leaf] = value
    cfg = cls.from_dict(merged)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def for_stage(cls, name: str, args):
    """The stage's config: resolved once by `agp run` (args.configs) or here for a direct call."""
    configs = getattr(args, "configs", None) or {}
    if name in configs:
        return configs[name]
    return resolve(cls, name, args, getattr(args, "config_file_data", None))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _base_type(kind):
    """int for `int | None`, list for `list[int]`, ... (the type a flag's text becomes)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin in (list, tuple) or kind in (list, tuple):
        return list
    if args and origin is not None and len(args) == 1:
        return _base_type(args[0])
    return kind if kind in (int, float, str, bool) else str


def _parser(base, flag: str, cls, name: str):
    """Text -> value, refused at parse time when the config's own `validate()` rejects it."""
    def parse(text: str):
        if text.lower() == "none":
            return None
        try:
            value = [_scalar(item) for item in text.split(",") if item.strip()] if base is list else base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {_metavar(base)}, got {text!r}") from None
        if hasattr(cls, "validate"):
            probe = cls()
            setattr(probe, name, value)
            try:
                probe.validate()
            except AGPError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


def _scalar(text: str):
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _metavar(base) -> str:
    return {int: "N", float: "X", list: "A,B,..."}.get(base, "TEXT")


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _field_comments(cls) -> dict[str, str]:
    """field name -> the comment on its line in the class source (the dataclass's own documentation)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = (_FIELD_LINE.match(line) for line in source.splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


_FIELD_LINE = re.compile(r"^    (\w+)\s*:[^#]*#\s*(.+)$")
