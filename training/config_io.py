"""Nested-dataclass configs read from TOML, with command-line overrides, written back as TOML.

Used by the trainer (:class:`fluxsr_training.trainer.TrainConfig`) and the pair generator
(:class:`fluxsr_training.generate.GenerateConfig`). A config is a dataclass whose fields are
scalars (str, int, float, bool, optional ones), lists of scalars, or nested config dataclasses
(TOML tables). Overrides are ``"section.key=value"`` strings; ``value`` is read as a TOML value
(``lr=1e-4``, ``flag=true``, ``targets=["a", "b"]``) and, when it is not valid TOML, as a bare
string (``data.pairs=/data/pairs``). Unknown keys and wrongly typed values raise
:class:`ConfigError` naming the key, the expected type and the closest valid key.

Writing: :func:`dump_toml` emits the subset of TOML these configs need; ``None`` values are
left out (TOML has no null), so reading the file back gives the same config.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

from fluxsr_core.files import atomic_write_text

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


def refuse_gguf(path: Union[str, os.PathLike], key: str, role: str) -> None:
    """ConfigError when ``path`` is a GGUF file: training and pairs keep to the weights the student
    is checked against (a LoRA trained on, or targets sampled from, dequantised weights is
    untested ground); GGUF runs in ``fluxsr upscale``."""
    from fluxsr_core.weights import is_gguf_file

    if is_gguf_file(path):
        raise ConfigError(f"{key}={path} is a GGUF file; {role} must be the FLUX transformer as safetensors "
                          "(bf16, or memory_mode fp8_storage / fp8_storage_all for less memory). GGUF files run "
                          "in fluxsr upscale")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        args = typing.get_args(inner)
        name = f"list of {_type_name(args[0]) if args else 'values'}"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner)
    return f"{name} or nothing" if optional else name


def _coerce(value: Any, tp, key: str) -> Any:
    """Check/convert ``value`` to the field type ``tp`` (ints become floats where floats are wanted)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be empty; expected {_type_name(tp)}")
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]  # a single string where a list is wanted: a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list (e.g. [\"a\", \"b\"]), got {value!r}")
        args = typing.get_args(inner)
        elem = args[0] if args else Any
        return [(_coerce(v, elem, f"{key}[{i}]") if elem is not Any else v) for i, v in enumerate(value)]
    if inner is Any:
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}")
        return int(f)
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, bool):  # tensorboard = false: the "false" of its auto/true/false
            return "true" if value else "false"
        if not isinstance(value, str):  # a number where a path or a name goes is a slip, not "3"
            hint = f' (in quotes: "{value}")' if isinstance(value, (int, float)) else ""
            raise ConfigError(f"config key '{key}' must be a string{hint}, got {value!r}")
        return value
    return value


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "", base: Optional[T] = None) -> T:
    """Build config ``cls`` from a (nested) mapping; missing keys keep ``base``'s or the defaults."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '(top)'}' must be a table, got {values!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        k = unknown[0]
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown config key '{prefix}{k}'{_suggest(k, names)}; valid keys in "
                          f"{where}: {', '.join(names)}")
    current = base if base is not None else cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        existing = getattr(current, f.name)
        if f.name not in values:
            kwargs[f.name] = existing
            continue
        v = values[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, v, prefix=f"{prefix}{f.name}.", base=existing)
        else:
            kwargs[f.name] = _coerce(v, tp, prefix + f.name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain nested dict (lists for tuples)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def parse_override_value(text: str) -> Any:
    """A TOML value (``1e-4``, ``true``, ``[1, 2]``, ``"x"``), or the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return ``cfg`` with ``"a.b=value"`` overrides applied (checked like a config file)."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value "
                              "(e.g. optim.lr=1e-4)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} names no key")
        parts = key.split(".")
        # Walk the dataclass path first so a section given as a key gets a clear message.
        cls = type(cfg)
        for i, p in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if p not in names:
                where = ".".join(parts[:i]) or "the top level"
                raise ConfigError(f"override {item!r}: unknown key '{'.'.join(parts[:i + 1])}'"
                                  f"{_suggest(p, names)}; valid keys in {where}: {', '.join(names)}")
            tp = _hints(cls)[p]
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is a value, "
                                      "not a section")
                cls = tp
            elif dataclasses.is_dataclass(tp):
                raise ConfigError(f"override {item!r}: '{key}' is a section; set one of its keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(tp))})")
        value = parse_override_value(raw.strip())
        if _unwrap_optional(tp)[0] is str and not isinstance(value, (str, bool)):
            # a string key on the command line keeps the text as typed: train.output_dir=1e3 is
            # "1e3", not "1000.0", and 2024-05-01 no TOML date
            value = raw.strip()
        nested: dict[str, Any] = {}
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        cfg = from_dict(type(cfg), nested, base=cfg)
    return cfg


def load_toml(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read a TOML file with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
EXTENDS_KEY = "extends"


def shipped_config(name: str) -> Path:
    """A config shipped in ``fluxsr_training/configs`` by name (``train_tiny`` or ``train_tiny.toml``)."""
    for cand in (SHIPPED_CONFIGS / name, SHIPPED_CONFIGS / f"{name}.toml"):
        if cand.is_file():
            return cand
    shipped = sorted(p.name for p in SHIPPED_CONFIGS.glob("*.toml"))
    raise FileNotFoundError(f"config {name!r} is neither a file nor a shipped config ({', '.join(shipped)})")


def _merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_layered_toml(path: Union[str, os.PathLike], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML config's values over those of the config its top-level ``extends`` names (a path,
    relative to the file's folder, or a shipped config's name such as ``train_default``), and so
    on down: a user's config can hold only what it changes."""
    p = Path(path).resolve()
    if p in _seen:
        raise ConfigError(f"{p}: '{EXTENDS_KEY}' goes round in a circle ({' -> '.join(str(s) for s in _seen + (p,))})")
    values = load_toml(p)
    parent = values.pop(EXTENDS_KEY, None)
    if parent is None:
        return values
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{p}: '{EXTENDS_KEY}' must name a config file or a shipped config (got {parent!r})")
    candidate = p.parent / parent
    try:
        base = candidate if candidate.is_file() else shipped_config(parent)
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: {EXTENDS_KEY} = {parent!r}: {exc}") from None
    return _merged(load_layered_toml(base, _seen + (p,)), values)


def load_config(cls: type[T], path: Union[str, os.PathLike, None] = None,
                overrides: Sequence[str] = ()) -> T:
    """``cls`` from defaults, then the TOML file ``path`` (if given, over the config it
    ``extends``: :func:`load_layered_toml`), then ``overrides``."""
    cfg = cls()
    if path is not None:
        values = load_layered_toml(path)  # its errors name the file already
        try:
            cfg = from_dict(cls, values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return apply_overrides(cfg, overrides)


# --- writing ------------------------------------------------------------------------------

def _toml_value(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, key) for x in v if x is not None) + "]"
    raise ConfigError(f"config key '{key}' holds a {type(v).__name__}, which TOML cannot store")


def dump_toml(data: Mapping[str, Any], header: str = "") -> str:
    """Nested dict -> TOML text (scalars first, then one ``[table]`` per nested dict)."""
    lines: list[str] = [f"# {line}" for line in header.splitlines()] if header else []

    def emit(table: Mapping[str, Any], path: list[str]) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping) and v is not None]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if path:
            lines.append("")
            lines.append("[" + ".".join(path) + "]")
        for k, v in scalars:
            lines.append(f"{k} = {_toml_value(v, '.'.join(path + [k]))}")
        for k, v in tables:
            emit(v, path + [k])

    emit(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def save_config(cfg: Any, path: Union[str, os.PathLike], header: str = "") -> str:
    """Write ``cfg`` as TOML atomically (temporary file, then rename). Returns the path."""
    path = os.fspath(path)
    atomic_write_text(path, dump_toml(to_dict(cfg), header=header))
    return path


__all__ = ["ConfigError", "from_dict", "to_dict", "apply_overrides", "parse_override_value", "load_toml",
           "load_layered_toml", "shipped_config", "load_config", "dump_toml", "save_config"]
