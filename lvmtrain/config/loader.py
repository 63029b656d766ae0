"""YAML file + dotted command-line overrides -> a validated `Config`.

Strict by design: an unknown key or a value of the wrong type is an error that names the key, the
file it came from and the nearest valid name, raised before any work (or run directory) starts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lvmtrain.config.schema import Config, ConfigError


def load_config(path: str | None, overrides: list[str] = (), *, base: tuple[str, dict] | None = None) -> Config:
    """Build the run's config: dataclass defaults < (`base`: (where from, a saved config's dict))
    < YAML file at `path` < `key=value` overrides."""
    cfg = Config()
    if base is not None:
        _merge(cfg, base[1], source=base[0], prefix="")
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(file.read_text(), Loader=_StrictLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
        _merge(cfg, data, source=path, prefix="")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': write it as section.key=value (e.g. optim.lr=3e-4)")
        try:
            value = _Override(yaml.safe_load(raw) if raw.strip() else "", raw)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"command line: '{key.strip()}': the value {raw!r} is not valid YAML ({problem}); "
                              f"quote it, or write lists as [a, b]") from None
        *sections, name = key.strip().split(".")
        nested: dict[str, Any] = {name: value}
        for section in reversed(sections):
            nested = {section: nested}
        _merge(cfg, nested, source="command line", prefix="")
    cfg.validate()
    if not cfg.run.name:
        cfg.run.name = f"{Path(path).stem if path else 'run'}-{identity_hash(cfg)[:8]}"
    return cfg


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def identity_hash(cfg: Config) -> str:
    """sha256 of the keys a resume must keep (see schema.RESUMABLE): what the run learns, not where."""
    from lvmtrain.config.schema import may_change_on_resume

    # NOTE: keys at their default are left out: a key a later lvmtrain adds does not rename runs
    defaults = flatten(config_to_dict(Config()))
    kept = {k: v for k, v in flatten(config_to_dict(cfg)).items() if not may_change_on_resume(k) and v != defaults.get(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config: a manifest records which config a checkpoint trained under."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _merge(obj: Any, data: dict, *, source: str, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{dotted}'{hint}")
        current = getattr(obj, key)
        if isinstance(value, _Override):
            # NOTE: a string field takes the text as typed: YAML would read run.name=off as false.
            value = value.raw if hints[key] is str else value.parsed
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' is a section; give it a mapping, not {value!r}")
            _merge(current, value, source=source, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, source))


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last, so a second `optim:` section would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key '{key}' (lines {seen[key] + 1} and "
                                     f"{key_node.start_mark.line + 1}); merge the two")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


@dataclasses.dataclass
class _Override:
    """A command-line value: as YAML reads it, and as typed."""

    parsed: Any
    raw: str


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` as type `tp`, or raise naming the key. Only lossless conversions."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # an entry of a list of sections (eval.sets)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' is a section; give it a mapping, not {value!r}")
        entry = tp()
        _merge(entry, value, source=source, prefix=f"{key}.")
        return entry
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # NOTE: YAML 1.1 reads "3e-4" (no dot) as a string; accept what is plainly a number.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no field of the schema means anything by inf or nan
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def config_reference_markdown() -> str:
    """The config reference in README.md, generated from the schema's field docstrings."""
    hints_top = typing.get_type_hints(Config)
    lines = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = hints_top[section.name]
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        lines += [f"### `{section.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        entries = []
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section.name), f.name)
            lines.append(_reference_row(f"{section.name}.{f.name}", hints[f.name], default, docs.get(f.name, "")))
            if typing.get_origin(hints[f.name]) is list and dataclasses.is_dataclass(typing.get_args(hints[f.name])[0]):
                entries.append((f"{section.name}.{f.name}[]", typing.get_args(hints[f.name])[0]))
        lines.append("")
        for prefix, entry in entries:  # a list of sections: the keys of one entry
            entry_hints, entry_docs = typing.get_type_hints(entry), field_docs(entry)
            lines += [f"#### `{prefix}`", "", inspect.cleandoc(entry.__doc__ or ""), "",
                      "| key | type | default | meaning |", "|---|---|---|---|"]
            lines += [_reference_row(f"{prefix}.{f.name}", entry_hints[f.name], getattr(entry(), f.name),
                                     entry_docs.get(f.name, "")) for f in dataclasses.fields(entry)]
            lines.append("")
    return "\n".join(lines)


def _reference_row(key: str, tp: Any, default: Any, doc: str) -> str:
    doc = " ".join(doc.split()).replace("|", "\\|")
    return f"| `{key}` | {_pretty_type(tp)} | `{default!r}` | {doc} |"


def _pretty_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _pretty_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_pretty_type(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))
