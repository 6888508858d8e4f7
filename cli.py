"""
The one place that turns command-line arguments into typed settings, for train.py, sample.py and bench.py.

    python train.py config/default.py --n_layer=6 --lr=3e-4 --compile=False

A config file is plain Python that assigns names (see config/); `--key=value` overrides come after it, and a
bare `--flag` means `--flag=True`. Every name must be a field of one of the given dataclasses, and every value
must fit the field's type; anything else is a ConfigError whose message says what was wrong and what fits.
"""

import ast
import dataclasses
import difflib
import types
import typing


class ConfigError(ValueError):
    pass


def _check(key, value, kind):
    """value checked (and ints widened to float) against a field's annotated type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin = typing.get_origin(kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or kind
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key} must be {getattr(kind, '__name__', kind)}; got {value!r} "
                          f"({type(value).__name__})")
    return value


def _parse_value(raw):
    """Python literal if it is one ("3", "1e-3", "True", "None", "[1, 2]"), else the string itself."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def parse(argv, *schemas, allow_file=True):
    """Settings from [config.py] [--key=value ...] as a dict {field name: checked value}, for the fields of
    the given dataclasses (only the names that were set)."""
    known = {f.name: f.type for schema in schemas for f in dataclasses.fields(schema)}

    def check(key, value, where):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown setting {key!r} in {where}{hint}")
        return _check(key, value, known[key])

    settings = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            settings[key] = check(key, _parse_value(raw) if eq else True, f"--{key}")
        elif allow_file and arg.endswith(".py"):
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), namespace)
            except OSError as e:
                raise ConfigError(f"cannot read config file {arg}: {e.strerror}") from None
            for key, value in namespace.items():
                if not key.startswith("_") and not isinstance(value, (types.ModuleType, type, types.FunctionType)):
                    settings[key] = check(key, value, arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: settings are --key=value"
                              + (" after an optional config/<run>.py" if allow_file else ""))
    return settings


def build(schema, settings):
    """An instance of `schema` from the settings that belong to it (the rest are ignored)."""
    names = {f.name for f in dataclasses.fields(schema)}
    try:
        return schema(**{k: v for k, v in settings.items() if k in names})
    except ValueError as e:
        raise ConfigError(str(e)) from None
