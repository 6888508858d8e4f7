"""
The one place that turns command-line arguments into typed settings, for train.py, sample.py, tools/bench.py and
the data/*/prepare.py scripts.

    python train.py config/default.py --n_layer=6 --lr=3e-4 --compile=False
    python train.py --help

A config file is plain Python that assigns names (see config/); several may be given, each building on the
ones before it (an experiment's arm file after the experiment's shared file); `--key=value` overrides come
after them, and a bare `--flag` means `--flag=True`. Every name must be a field of one of the given dataclasses,
and every value must fit the field's type; anything else is a ConfigError whose message says what was wrong and
what fits.
`--help` lists every setting with its type, default and meaning: the meaning is the comment beside the field
in its dataclass, so the documentation cannot drift from the code.
"""

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing


class ConfigError(ValueError):
    pass


def need(ok, message):
    """The one way a setting is checked: ConfigError(message) unless ok. The message says what was wrong and
    what fits."""
    if not ok:
        raise ConfigError(message)


# The oldest torch this code has passed its tests on (docs/results.md, "Which torch"). Older releases lack APIs it
# uses, or have them in other forms: FlexAttention's BlockMask, torch.distributed.tensor, fully_shard,
# torch.nn.utils.get_total_norm, SDPA's enable_gqa, torch._grouped_mm.
MIN_TORCH = (2, 11)


def require_torch(version=None):
    """SystemExit naming the installed torch when it is older than MIN_TORCH (or missing). Every script imports
    this module before the model, so an old torch is named in one line rather than met in a traceback."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        version = version or installed("torch")
    except PackageNotFoundError:
        raise SystemExit("torch is not installed: pip install -r requirements.txt") from None
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TORCH:
        oldest = ".".join(map(str, MIN_TORCH))
        raise SystemExit(f"torch {version} is older than {oldest}, the oldest this code is tested on: "
                         f"pip install -r requirements.txt (torch 2.13.0), or any torch >= {oldest}")


require_torch()


def _check(key, value, kind):
    """value checked (and ints widened to float) against a field's annotated type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin = typing.get_origin(kind)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # (inf and nan pass every bound below them, and break the run later)
            raise ConfigError(f"{key} must be a finite number; got {value}")
        return float(value)
    expected = origin or kind
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        hint = (" (on the command line write a Python literal: [{'name': 'a', ...}] rather than dict(...))"
                if isinstance(value, str) and expected in (list, dict) else "")
        raise ConfigError(f"{key} must be {_type_name(kind)}; got {value!r} ({type(value).__name__}){hint}")
    return value


def _type_name(kind):
    return re.sub(r"typing\.|<class '(\w+)'>", r"\1", str(kind)) if not isinstance(kind, type) else kind.__name__


def _parse_value(raw):
    """Python literal if it is one ("3", "1e-3", "True", "None", "[1, 2]"), else the string itself."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _comments(schema):
    """{field name: the comment on its line} from the dataclass's source."""
    try:
        source = inspect.getsource(schema)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, flags=re.M))


def help_text(schemas, nested=None, allow_file=True, groups=None):
    """Every setting of the schemas, then of each group (named prefix.key), then, listed apart, of the nested
    ones (e.g. a training stage's)."""
    if not schemas:
        return "This script takes no settings."
    how = "--key=value, or key = value in a config/<run>.py given first" if allow_file else "--key=value"
    sections = [(s, "", f"{s.__name__} settings ({how})") for s in schemas]
    sections += [(s, p + ".", f"{s.__name__} settings (--{p}.key=value, or {p} = dict(key=value) in a config file)")
                 for p, s in (groups or {}).items()]
    sections += [(s, "", f"{s.__name__} settings (keys of each entry of {name})") for name, s in (nested or {}).items()]
    lines = []
    for schema, prefix, title in sections:
        lines.append(f"\n{title}:")
        notes = _comments(schema)
        for f in dataclasses.fields(schema):
            if dataclasses.is_dataclass(f.type):
                continue  # a group of its own
            default = f.default if f.default is not dataclasses.MISSING else (
                "(required)" if f.default_factory is dataclasses.MISSING else f.default_factory())
            lines.append(f"  --{prefix}{f.name}  ({_type_name(f.type)}, default {default!r})  {notes.get(f.name, '')}")
    return "\n".join(lines)


def parse(argv, *schemas, allow_file=True, nested=None, groups=None):
    """Settings from [config.py] [--key=value ...] as a dict {field name: checked value}, for the fields of
    the given dataclasses (only the names that were set). `groups` ({prefix: dataclass}) are settings named
    prefix.key (--router.top_p=0.5), or set together in a config file (router = dict(top_p=0.5)), so that a name
    means one thing on every command line. `nested` ({setting: dataclass}) names a setting that is a list of dicts,
    each holding that dataclass's settings (stages: each a Stage's), checked here too, a group's dict inside them
    included (a stage's router dict): every name and type of a run is checked in this one place, and the
    dataclasses check only the ranges. --help (or -h) prints every setting and exits."""
    groups, nested = groups or {}, nested or {}
    if "--help" in argv or "-h" in argv:
        print(help_text(schemas, nested, allow_file, groups))
        raise SystemExit(0)
    known = {f.name: f.type for schema in schemas for f in dataclasses.fields(schema)
             if not dataclasses.is_dataclass(f.type)}
    known.update({f"{p}.{f.name}": f.type for p, schema in groups.items() for f in dataclasses.fields(schema)})
    inner = {f.name: schema for schema in nested.values() for f in dataclasses.fields(schema)}

    def check(key, value, where):
        if key in known:
            value = _check(key, value, known[key])
            return [_check_entry(key, i, entry, nested[key], groups) for i, entry in enumerate(value)] \
                if key in nested else value
        grouped = [f"{p}.{key}" for p in groups if f"{p}.{key}" in known]
        if grouped:
            raise ConfigError(f"unknown setting {key!r} in {where}; did you mean {grouped[0]}? ({key} alone is not "
                              f"a setting here: --{grouped[0]}=..., or {grouped[0].split('.')[0]} = dict({key}=...) "
                              f"in a config file)")
        if key in inner:
            raise ConfigError(f"{key!r} in {where} is a setting of each {inner[key].__name__.lower()}, not of "
                              f"the run: put it inside each entry, e.g. stages = [dict(name=..., {key}=...)]")
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; --help lists them"
        raise ConfigError(f"unknown setting {key!r} in {where}{hint}")

    settings, namespace = {}, {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            settings[key] = check(key, _parse_value(raw) if eq else True, f"--{key}")
        elif allow_file and arg.endswith(".py"):
            for key, value in _read_file(arg, namespace).items():
                if key in groups:  # router = dict(top_p=0.5): each key is router.<key>
                    if not isinstance(value, dict):
                        raise ConfigError(f"{key} in {arg} must be a dict of {key} settings; got {value!r}")
                    settings.update({f"{key}.{k}": check(f"{key}.{k}", v, arg) for k, v in value.items()})
                else:
                    settings[key] = check(key, value, arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: settings are --key=value"
                              + (" after an optional config/<run>.py" if allow_file else ""))
    return settings


def _check_entry(key, i, entry, schema, groups):
    """Entry i of a nested setting (stages[i], a dict of a Stage's settings) with its names and types checked, a
    group's dict inside it too (its router dict)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{key}[{i}] must be a dict of {schema.__name__} settings; got {entry!r}")
    where = f"{schema.__name__.lower()} {entry['name']!r}" if isinstance(entry.get("name"), str) else f"{key}[{i}]"
    types = {f.name: f.type for f in dataclasses.fields(schema)}
    unknown = sorted(set(entry) - set(types))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(types)}")
    out = {k: _check(f"{where}: {k}", v, types[k]) for k, v in entry.items()}
    for prefix, group in groups.items():
        if isinstance(out.get(prefix), dict):
            fields = {f.name: f.type for f in dataclasses.fields(group)}
            bad = sorted(set(out[prefix]) - set(fields))
            if bad:
                raise ConfigError(f"{where}: unknown {prefix} setting(s) {bad}; known: {', '.join(fields)}")
            out[prefix] = {k: _check(f"{where}: {prefix} setting {k}", v, fields[k]) for k, v in out[prefix].items()}
    return out


def _read_file(path, namespace):
    """The names a config file assigns (not modules, classes, functions or _private names). Config files run
    in order in one namespace, so a later file may build on an earlier one's names, _private ones included."""
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except SyntaxError as e:
        raise ConfigError(f"syntax error in config file {path}, line {e.lineno}: {e.msg}") from None
    except SystemExit as e:
        raise ConfigError(f"config file {path} called sys.exit({e.code!r}) while it ran: a config file only assigns "
                          f"settings") from None
    except KeyboardInterrupt:  # (raised by the file itself: a Ctrl-C at start-up is the signal handler's)
        raise ConfigError(f"config file {path} raised KeyboardInterrupt while it ran: a config file only assigns "
                          f"settings") from None
    except Exception as e:  # the file is Python: it can fail in any way while it runs
        raise ConfigError(f"config file {path} failed while running: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, type, types.FunctionType))}


def valid_device(name):
    """Whether name is a device this project runs on: auto, cpu, cuda or cuda:N (torch knows more, such as mps or
    xpu, but the code has paths for these alone)."""
    return isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


def exit_on_signal(message):
    """From now on, SIGINT (Ctrl-C) and SIGTERM end the process at once: message on stderr, exit code 128 + the
    signal's number (the shell's convention). For the moments no other handler owns, such as train.py's start-up
    (a KeyboardInterrupt raised inside an import comes out as a traceback, or as another module's ImportError)
    and its end, after the run is saved."""
    import signal
    import sys

    def end(signum, frame):
        print(message, file=sys.stderr, flush=True)
        os._exit(128 + signum)
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, end)


def run(main):
    """sys.exit(main(sys.argv[1:])), with a Ctrl-C ending in one line and exit code 130 rather than a traceback:
    how every script but train.py (which has its own handler) runs its main."""
    import sys
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout left (`--help | head`): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so the exit's flush cannot fail again)
        sys.exit(1)


def one_path(argv, usage):
    """The one path a single-argument tool takes (python -m infra.plot out/run): None after printing usage for
    -h or --help, SystemExit(usage) for anything else."""
    if argv in (["-h"], ["--help"]):
        print(usage)
        return None
    if len(argv) != 1 or argv[0].startswith("-"):
        raise SystemExit(usage)
    return argv[0]


def valid_seed(value):
    """Whether value seeds numpy and torch alike, with room for the per-rank offset train.py adds: a whole number
    in [0, 2**32)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 32


def free_memory(device):
    """Bytes a new allocation can take on device: the GPU's free memory, or the CPU's available memory (what the
    kernel can hand out without swapping; all of it where /proc/meminfo is absent)."""
    import torch
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(name):
    """The device a script runs on: "auto" is cuda where torch sees a GPU, else cpu. Naming a CUDA device
    torch cannot see stops the script with one line."""
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {name!r}, but torch sees no CUDA GPU here: use --device=cpu (or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"device {name!r}, but torch sees {torch.cuda.device_count()} GPU(s) here, cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


def build(schema, settings):
    """An instance of `schema` from the settings that belong to it (the rest are ignored)."""
    names = {f.name for f in dataclasses.fields(schema)}
    try:
        return schema(**{k: v for k, v in settings.items() if k in names})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load(argv, *schemas, allow_file=False):
    """[an instance of each schema] from argv, every setting checked: what every script but train.py starts with
    (train.py's load_config builds on parse and build). A bad setting stops the script with one line."""
    try:
        settings = parse(argv, *schemas, allow_file=allow_file)
        return [build(schema, settings) for schema in schemas]
    except ConfigError as e:
        raise SystemExit(f"argument error: {e}") from None
