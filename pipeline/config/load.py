"""From TOML (and ``--set section.key=value`` overrides) to a validated ``RunConfig``, and back to TOML.

Every mistake (unknown key, wrong type, bad value) becomes a ``ConfigError`` whose message is one line naming
the source (the file, or ``--set`` when the key came from there), the dotted key, what was expected and what was
found. Each section checks its own values (``sections.py``); this module walks them and words the message.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import stat
import tomllib
import types
import typing
from pathlib import Path

from ..core.checks import Invalid, finite
from ..core.errors import UserError
from .sections import RunConfig, Sections


class ConfigError(UserError, ValueError):
    pass


# Keys of earlier versions, and where they live now (each sparsifier's settings became its own table).
MOVED = {"prune.beta": "prune.rgsm.beta (RVSM: prune.rvsm.beta)", "prune.lambda1": "prune.rgsm.lambda1",
         "prune.lambda2": "prune.rgsm.lambda2", "prune.rgsm_prox": "prune.rgsm.prox",
         "prune.penalty": "prune.rvsm.penalty", "prune.rvsm_lambda": "prune.rvsm.lam",
         "prune.tl1_a": "prune.rvsm.tl1_a", "prune.sparsity": "prune.admm.sparsity",
         "prune.percentile": "prune.admm.percentile", "prune.rho": "prune.admm.rho",
         "eval.noise_off_too": "eval.noise_modes (a list of stochastic, noise_off, per_sample)",
         "eval.per_sample_too": "eval.noise_modes (a list of stochastic, noise_off, per_sample)"}


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _blame(key: str, overridden: dict, source: str, *, below: bool = False) -> str:
    """Where ``key`` came from: the option that set it (or a table or list holding it; with ``below``, also a
    key inside it), else the file."""
    for o, label in overridden.items():
        if o == key or key.startswith((o + ".", o + "[")) or below and o.startswith((key + ".", key + "[")):
            return label
    return source


def _coerce(value, hint, where: str, source: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if float in options and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        for option in options:
            if isinstance(value, option) and not (option in (int, float) and isinstance(value, bool)):
                return value
        raise ConfigError(f"{source}: {where}: expected {' or '.join(_type_name(o) for o in options)}, "
                          f"got {type(value).__name__} ({value!r})")
    if origin is dict:   # a table of key -> value, e.g. model.widths
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a table, got {type(value).__name__} ({value!r})")
        return {k: _coerce(v, value_hint, f"{where}.{k}", source) for k, v in value.items()}
    if origin is tuple:
        (elem, _) = typing.get_args(hint)
        if dataclasses.is_dataclass(elem):   # an array of tables, e.g. [[bench.devices]]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: {where}: expected an array of tables, got {type(value).__name__} ({value!r})")
            return tuple(v if isinstance(v, elem) else _build(elem, v, f"{where}[{i}].", source)
                         for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where}: expected a list of {_type_name(elem)}, got {type(value).__name__} ({value!r})")
        return tuple(_coerce(v, elem, f"{where}[{i}]", source) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{source}: {where}: expected {_type_name(hint)}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, data: dict, prefix: str, source: str, overridden: dict | None = None):
    overridden = overridden or {}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{_blame(where, overridden, source)}: {where}: expected a table, got "
                          f"{type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    inline = {f.name: f.metadata["inline_table"] for f in fields if "inline_table" in f.metadata}
    names = {f.name for f in fields if f.name not in inline} | {n for t in inline.values() for n in t.names()}
    for key in data:
        if key not in names:
            dotted = prefix + key
            src = _blame(dotted, overridden, source, below=True)
            moved = f" (moved to {MOVED[dotted]})" if dotted in MOVED else f" (known: {', '.join(sorted(names))})"
            raise ConfigError(f"{src}: unknown key '{dotted}'{moved}")
    kwargs = {}
    for f in fields:
        where = prefix + f.name
        if f.name in inline:
            kwargs[f.name] = Sections({e.name: _build(e.settings, data.get(e.name, {}), f"{prefix}{e.name}.", source,
                                                      overridden)
                                       for e in inline[f.name].entries() if e.settings})
            continue
        if f.name not in data:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], where + ".", source, overridden)
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, where, _blame(where, overridden, source))
    return cls(**kwargs)


def _sections(obj, prefix: str = ""):
    """(dotted prefix, section) of every dataclass below ``obj``, then ``obj`` itself (rules between sections
    are checked after each section's own values)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, prefix + f.name + ".")
        elif isinstance(value, Sections):
            for name, settings in value.items():
                yield from _sections(settings, prefix + name + ".")
    yield prefix, obj


def _validate(cfg: RunConfig, source: str, overridden: dict | None = None) -> None:
    overridden = overridden or {}
    flat = flatten(cfg)

    def error(key: str, expected: str, involved=(), plain: bool = False) -> ConfigError:
        src = next((b for b in (_blame(k, overridden, source) for k in (key, *involved)) if b != source), source)
        if plain:
            return ConfigError(f"{src}: {key}: {expected}")
        value = list(flat[key]) if isinstance(flat.get(key), tuple) else flat.get(key)
        return ConfigError(f"{src}: {key}: expected {expected}, got {value!r}")

    for key, value in flat.items():
        if not finite(value):
            raise error(key, "a finite number")
    for prefix, section in _sections(cfg):
        check = getattr(section, "check", None)
        if check is None:
            continue
        try:
            check()
        except Invalid as e:
            raise error(prefix + e.key, e.expected, tuple(prefix + k for k in e.involved), e.plain) from None


def flatten(obj, prefix: str = "") -> dict:
    """``{"section.key": value}`` for every key (``[prune.<method>]`` tables included)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, prefix + f.name + "."))
        elif isinstance(v, Sections):
            for name, settings in v.items():
                out.update(flatten(settings, prefix + name + "."))
        else:
            out[prefix + f.name] = v
    return out


def to_dict(obj):
    """The config as plain data, as a TOML file would hold it (what manifests record and keys hash)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, Sections):
                out.update({name: to_dict(settings) for name, settings in v.items()})
            else:
                out[f.name] = to_dict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_dict(v) for v in obj)
    return obj


def toml_value(v) -> str:
    """``v`` as TOML, as a config file or ``--set key=VALUE`` takes it back (``[[bench.devices]]`` entries as
    inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)   # JSON's escapes are TOML's
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if dataclasses.is_dataclass(v):
        return "{" + ", ".join(f"{f.name} = {toml_value(getattr(v, f.name))}" for f in dataclasses.fields(v)) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def show_lines(cfg) -> list[str]:
    """``pipeline show-config``: one ``key = value`` line per resolved key; a key with no value (TOML has no
    null) as a comment."""
    return [f"# {k} = (not set)" if v is None else f"{k} = {toml_value(v)}" for k, v in flatten(cfg).items()]


def parse_override(text: str, source: str) -> tuple[list[str], object]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML, a bare word as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: expected section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except RecursionError:
        raise ConfigError(f"{source} {text[:60]}: value nested too deeply") from None
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as `--set prune.init=scratch` is meant as a string
    return key.strip().split("."), value


def _recorded_upgraded(data: dict) -> dict:
    """A run's recorded config in today's keys: runs recorded before quantize.calibration existed named onnxruntime's
    calibration in quantize.method (a file with it still gets the MOVED line: the user edits it once)."""
    q = data.get("quantize")
    if isinstance(q, dict) and q.get("method") in ("minmax", "entropy", "percentile") and "calibration" not in q:
        q["calibration"] = q.pop("method")
    return data


def load_config(path: str | Path | None, overrides: list = (), *, data: dict | None = None,
                source: str | None = None) -> RunConfig:
    """From a TOML file, or (``data``) from a run's recorded config, then the overrides: ``"section.key=value"``
    (from ``--set``) or ``(option, "section.key=value")`` for another option (``--grid``, ``--bench-device``), which
    error messages then blame."""
    source = source or (str(path) if path else "<defaults>")
    data = _recorded_upgraded(copy.deepcopy(data)) if data is not None else {}   # overrides merge into nested tables
    overridden: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        try:
            kind = p.stat().st_mode
            if not stat.S_ISREG(kind) and not stat.S_ISDIR(kind):   # a FIFO would block forever
                raise ConfigError(f"{source}: not a regular file ({_file_kind(kind)}), expected a TOML file")
            raw = p.read_bytes()
            # utf-8-sig: a BOM (as some Windows editors write) is accepted and dropped
            data = tomllib.loads(raw.decode("utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a directory, expected a TOML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                              "save the file as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: invalid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{source}: invalid TOML: tables or arrays nested too deeply") from None
        if not data:
            raise ConfigError(f"{source}: empty config; expected at least name and the [model], [train] and "
                              "[prune] settings (defaults alone are the 200 + 200-epoch paper recipe)")
    for item in overrides:
        label, text = item if isinstance(item, tuple) else ("--set", item)
        keys, value = parse_override(text, label)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{label} {text}: '{k}' is not a section")
        _merge(node, keys[-1], value, ".".join(keys), label, overridden)
    cfg = _build(RunConfig, data, "", source, overridden)
    _validate(cfg, source, overridden)
    return cfg


def _merge(node: dict, key: str, value, dotted: str, label: str, overridden: dict) -> None:
    """``node[key] = value``, except that a table given for a table merges into it key by key (``--set
    'train={epochs=1}'`` changes train.epochs and nothing else of [train]); every key set is remembered with the
    option that set it, for the blame in error messages."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _merge(node[key], k, v, f"{dotted}.{k}", label, overridden)
        return
    node[key] = value
    overridden[dotted] = label
