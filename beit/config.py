"""Configs are flat dataclasses: loaded from YAML, overridden on the command line, saved with the run.

Usage in an entry point::

    cfg = parse_config(PretrainConfig, description=__doc__)   # --config f.yaml --lr 1e-3 ...
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")

Precedence: dataclass defaults < YAML file(s) given with ``--config`` < ``--field value`` flags.
Every field becomes a flag (``--field_name`` and ``--field-name``); the field's ``help`` metadata
is shown by ``--help``. Values are parsed as YAML scalars/lists and then checked against the
field's type, so a typo or a wrong type fails at start-up with a message naming the field (and the
closest valid option). Booleans take ``--flag``, ``--no-flag`` or ``--flag true|false``.
``--config`` takes a path or a recipe name (``beit_base_in1k`` finds launch/pretrain_beit_base_in1k.yaml
for pretraining). A config class may declare ``RENAMED = {old: new}`` (the old name is refused with
the new one) and ``DEPRECATED = {old: new}`` (the old name still works, with a warning).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a ``--help`` text."""
    kw: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


class ConfigError(ValueError):
    """A config value that is unknown, missing or of the wrong type."""


class Options:
    """Base of the option dataclasses: a string given from Python for a list-of-strings option (one shard
    spec, say) becomes a one-item list, as it would from the command line or YAML."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            if isinstance(value, str) and _is_sequence(tp) and typing.get_args(tp)[:1] == (str,):
                setattr(self, f.name, [value] if value else [])

    def check_choices(self) -> None:
        """Every ``Literal`` option holds one of its values (the parser checks flags; this checks Python callers)."""
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                try:
                    _coerce(f"--{f.name}", getattr(self, f.name), hints[f.name])
                except ConfigError as e:
                    raise ValueError(str(e)) from None


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_commas(text: str) -> list[str]:
    """Split at commas outside ``{...}`` (a brace list like ``train-{000000,000001}.tar`` stays whole)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}" +
                              (f" (did you mean {close[0]!r}?)" if close else ""))
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in _split_commas(value) if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        if args and not (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            if origin is tuple and len(args) != len(value):
                raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)}: {value!r}")
            item_types = args if origin is tuple else [args[0]] * len(value)
        else:
            item_types = [args[0] if args else Any] * len(value)
        out = [_coerce(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


FLOAT32_MAX = 3.4028234663852886e38


def check_finite_numbers(cfg: Any) -> None:
    """Raise ValueError naming every numeric option that is NaN, infinite or beyond float32's range
    (the model computes in float32 or lower, so such a value poisons the weights at the first step)."""
    bad = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, float) and not (math.isfinite(x) and abs(x) <= FLOAT32_MAX):
                bad.append(f"--{f.name} {x!r}")
    if bad:
        raise ValueError(f"{', '.join(bad)}: numeric options must be finite numbers within float32's range "
                         f"(|x| <= {FLOAT32_MAX:.3g}); NaN or Inf would poison the weights at the first step")


def check_lr(lr: float, name: str = "lr", ceiling: float = 1.0) -> None:
    """A peak learning rate must be in (0, ceiling]: an AdamW lr above 1 moves every weight by more
    than its scale at each step and overflows within a few steps."""
    if not 0 < lr <= ceiling:
        raise ValueError(f"--{name} {lr:g} is outside (0, {ceiling:g}]: AdamW with such an lr diverges "
                         f"(BEiT's recipes use 1.5e-3 for pretraining and 4e-3 for fine-tuning)")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def from_dict(cls: type[T], values: dict[str, Any], base: T | None = None, source: str = "config") -> T:
    """Build ``cls`` from ``values`` (on top of ``base`` or the defaults); unknown keys are an error."""
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = apply_aliases(cls, values, source)
    unknown = sorted(set(values) - set(names))
    if unknown:
        hints_ = "; ".join(f"{u}: did you mean {close[0]}?" for u in unknown
                           if (close := difflib.get_close_matches(u, names, n=1)))
        raise ConfigError(
            f"{source}: unknown option(s) {unknown} for {cls.__name__}. " + (f"{hints_} " if hints_ else "") +
            f"Valid options: {', '.join(names)}"
        )
    current = dataclasses.asdict(base) if base is not None else {}
    for k, v in values.items():
        current[k] = _coerce(k, v, hints[k])
    try:
        return cls(**current)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def aliases(cls: type, kind: str) -> dict[str, str]:
    """``RENAMED`` or ``DEPRECATED`` maps of ``cls`` and every base (an option section declares its own)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get(kind, {}))
    return out


def apply_aliases(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Refuse ``RENAMED`` names (naming the new one); map ``DEPRECATED`` names, with a warning."""
    renamed, deprecated = aliases(cls, "RENAMED"), aliases(cls, "DEPRECATED")
    out = dict(values)
    for old, new in renamed.items():
        if old in out:
            raise ConfigError(f"{source}: option {old} was renamed {new} ({_help_of(cls, new)}); use {new}")
    for old, new in deprecated.items():
        if old in out:
            if new in out and out[new] != out[old]:
                raise ConfigError(f"{source}: {old} (deprecated) and {new} disagree: {out[old]!r} vs {out[new]!r}")
            print(f"warning: {source}: option {old} is deprecated, use {new}", file=sys.stderr)
            out[new] = out.pop(old)
    return out


def _help_of(cls: type, name: str) -> str:
    """The field's help; a field re-declared with another default and no help takes its base's."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""


RECIPE_DIRS: list[Path] = [Path(__file__).resolve().parent.parent / "launch"]  # a clone / editable install


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up by name: the clone's launch/, then the installed package's copy
    (``beit/recipes``, the same files as package data of a wheel)."""
    packaged = Path(__file__).resolve().parent / "recipes"
    return [d for d in (*RECIPE_DIRS, packaged) if d.is_dir()]


def resolve_recipe(name: str, prefix: str = "") -> Path:
    """A ``--config`` value: an existing path, else a recipe name (``beit_base_in1k`` ->
    ``<prefix>beit_base_in1k.yaml`` or ``beit_base_in1k.yaml`` in the recipe folders)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = name[:-5] if name.endswith(".yaml") else name
    if "/" not in stem:
        for d in recipe_dirs():
            for cand in (d / f"{prefix}{stem}.yaml", d / f"{stem}.yaml"):
                if cand.is_file():
                    return cand
    known = sorted({p.stem[len(prefix):] for d in recipe_dirs() for p in d.glob(f"{prefix}*.yaml")})
    close = difflib.get_close_matches(stem, known, n=1)
    raise ConfigError(f"config {name!r} is neither a file nor a recipe name" +
                      (f" (did you mean {close[0]!r}?)" if close else "") +
                      (f"; recipes: {', '.join(known)}" if known else ""))


def load_yaml(cls: type[T], path: str | Path, base: T | None = None) -> T:
    """Load ``cls`` from a YAML mapping file, on top of ``base`` (or the defaults)."""
    path = resolve_recipe(str(path), getattr(cls, "RECIPE_PREFIX", ""))
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of option: value")
    return from_dict(cls, data, base=base, source=str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (atomically) so the run can be diffed and repeated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


class _Parser(argparse.ArgumentParser):
    """argparse with 'did you mean' for unknown options and without prefix abbreviations."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            flags: dict[str, str] = {}  # normalised -> the flag as --help shows it first (underscores)
            for a in self._actions:
                for o in a.option_strings:
                    if a.help != argparse.SUPPRESS and o.startswith("--"):
                        flags.setdefault(o.replace("-", "_"), o)
            msgs, i = [], 0
            while i < len(extra):
                tok = extra[i]
                word = tok.split("=", 1)[0]
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.replace("-", "_"), list(flags), n=1)
                    msgs.append(f"unknown option {word}" + (f" (did you mean {flags[close[0]]}?)" if close else ""))
                    if "=" not in tok and i + 1 < len(extra) and not extra[i + 1].startswith("-"):
                        i += 1  # its value
                else:
                    msgs.append(f"unexpected value {tok!r} (options take the form --name value)")
                i += 1
            self.error("; ".join(msgs))
        return ns


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def build_parser(cls: type, description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one flag per field of ``cls`` (``--no-x`` for booleans)."""
    parser = _Parser(description=description, epilog=epilog, allow_abbrev=False,
                     formatter_class=_HelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="YAML file(s) of option: value, or a recipe name from launch/ "
                             f"({getattr(cls, 'RECIPE_PREFIX', '')}<name>.yaml); later files and flags override "
                             "earlier ones")
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        default = _default_of(f)
        tp = hints[f.name]
        flags = [f"--{f.name}"]
        if "_" in f.name:
            flags.append(f"--{f.name.replace('_', '-')}")
        help_text = f"{_help_of(cls, f.name)} (default: {default!r})"
        if tp is bool or tp == typing.Optional[bool]:  # Optional: None = not given (a deprecated switch)
            parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, nargs="?", const="true",
                                metavar="BOOL", help=help_text)
            no = [f"--no-{f.name.replace('_', '-')}"] + ([f"--no_{f.name}"] if "_" in f.name else [])
            parser.add_argument(*no, dest=f.name, action="store_const", const="false", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
            continue
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=_metavar(tp), help=help_text,
                            nargs="+" if _is_sequence(tp) else None)
    deprecated = aliases(cls, "DEPRECATED")
    for old in (*aliases(cls, "RENAMED"), *deprecated):
        takes_list = old in deprecated and _is_sequence(hints.get(deprecated[old]))
        parser.add_argument(f"--{old}", dest=f"alias:{old}", default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            nargs="+" if takes_list else None)
    return parser


def _is_sequence(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple, Sequence) or tp in (list, tuple)


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if _is_sequence(tp):
        return "VALUE"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "").upper()


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's examples as written; the defaults are in each option's help."""


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """For the plain-argparse commands: the description as written, every option's default shown."""


def _flag_value(raw: Any, tp: Any) -> Any:
    """A flag's text as a value of type ``tp``: strings verbatim ("1e-3" stays a string), a list flag's one
    value as YAML or a comma list (a brace pattern stays whole), several values as the list's items."""
    if isinstance(raw, list) and len(raw) != 1:
        item = typing.get_args(tp)[0] if tp is not None and typing.get_args(tp) else Any
        return [_flag_value(v, str if item is str else Any) for v in raw]
    if isinstance(raw, list):
        raw = raw[0]
    if not isinstance(raw, str):
        return raw
    if tp is str or (typing.get_origin(tp) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return raw  # "no" stays the string, not YAML's false
    if typing.get_args(tp) == (str, type(None)):
        return None if raw.lower() in ("null", "none", "~", "") else raw
    if tp is not None and _is_sequence(tp) and typing.get_args(tp)[:1] == (str,) and not raw.startswith("["):
        return raw  # split at top-level commas by _coerce, a brace pattern kept whole
    return _parse_scalar(raw)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Defaults < ``--config`` YAML files < command-line flags. Errors exit with a clear message."""
    parser = build_parser(cls, description)
    ns = parser.parse_args(argv)
    given: set[str] = set()  # the options set by a --config file or a flag
    try:
        cfg = cls()
        for path in ns.config:
            cfg = load_yaml(cls, path, base=cfg)
            renamed = aliases(cls, "DEPRECATED")
            given |= {renamed.get(k, k) for k in yaml.safe_load(resolve_recipe(
                str(path), getattr(cls, "RECIPE_PREFIX", "")).read_text()) or {}}
        raw_values = {k.split(":", 1)[1] if k.startswith("alias:") else k: v for k, v in vars(ns).items()
                      if k != "config"}
        raw_values = apply_aliases(cls, raw_values, "command line")
        hints = _type_hints(cls)
        overrides = {k: _flag_value(v, hints.get(k)) for k, v in raw_values.items()}
        cfg = from_dict(cls, overrides, base=cfg, source="command line")
        given |= set(overrides)
    except ConfigError as e:
        parser.error(str(e))
    fit = getattr(cfg, "fit_to_data", None)  # options not given, fitted to a --data folder (beit.options.data_recipe)
    if callable(fit):
        try:
            cfg = fit(given)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            parser.error(str(e))
    return cfg
