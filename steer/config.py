"""Command configs: one frozen dataclass per command makes its flags, reads its YAML, validates itself.

Every command (``python -m steer.train <command>``, ``python -m steer.eval``, ``python -m steer.serve``)
declares its options as the fields of a frozen dataclass. Each field carries its documentation as
``metadata=option("help text", ...)``; :func:`build_parser` turns the fields into ``--field-name``
flags (``bool`` -> ``--x/--no-x``, ``tuple[str, ...]`` -> one or more values, ``X | None`` -> ``X``;
``choices`` metadata becomes argparse choices, ``metavar`` the value's name in ``--help``, ``unset``
what a default of ``None`` or ``""`` means). Values are merged as *dataclass defaults <
``--config file.yaml`` < flags given on the command line*, then ``__post_init__`` validates the
result and raises :class:`steer.errors.InvalidInput` naming the field. A YAML file uses the field
names (``lora_r: 16``; ``lora-r`` is accepted too); an unknown key is an error that names the key and
the file, so a typo never silently falls back to a default. :func:`write_config` writes the resolved
config back as YAML (``--config`` on it reproduces the run).

A family of commands may accept another vocabulary's names for some options (:class:`Aliases`;
``steer.training.config`` passes TRL's, so a TRL ``DPOConfig`` YAML file runs as it is).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

from steer.errors import InvalidInput
from steer.files import atomic_write_text

CONFIG_FLAG = "--config"

# Flag values spelt another way that mean one of the choices (log levels in any case).
_FLAG_SPELLINGS: dict[str, Callable[[str], str]] = {"log_level": str.upper}


def option(help_text: str, **extra) -> dict:
    """A field's metadata: its ``help`` and any of ``choices``, ``metavar``, ``unset``."""
    return {"help": help_text, **extra}


def _as_given(name: str, value):
    return value


@dataclasses.dataclass(frozen=True)
class Aliases:
    """Another vocabulary's names for some options, accepted as flags and as YAML keys.

    ``names``: ``{their_name: our_field}`` (applied to the fields a config has); ``label`` names the
    vocabulary in ``--help`` (``[TRL: learning_rate]``) and in unknown-key errors; ``value(field,
    value)`` turns a YAML value given under their name into ours; ``flag_values`` maps a field with
    choices to a function that turns their spelling of a flag value into one of the choices."""

    label: str
    names: Mapping[str, str]
    value: Callable[[str, object], object] = _as_given
    flag_values: Mapping[str, Callable[[str], str]] = dataclasses.field(default_factory=dict)

    def for_class(self, cls) -> dict[str, str]:
        """``{their_name: field}`` for the fields ``cls`` has."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {theirs: ours for theirs, ours in self.names.items() if ours in names}


# -- validation helpers for __post_init__ ----------------------------------------------------

def require_int(name: str, value, minimum: int | None = None) -> None:
    """``value`` is an int (not a bool) and >= ``minimum``; else InvalidInput naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidInput(name, f"must be >= {minimum}, got {value}")


def require_float(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                  exclusive_min: bool = False, exclusive_max: bool = False) -> None:
    """``value`` is a finite number within the bounds; else InvalidInput naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(name, f"must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        raise InvalidInput(name, f"must be {'>' if exclusive_min else '>='} {minimum}, got {value}")
    if maximum is not None and (value >= maximum if exclusive_max else value > maximum):
        raise InvalidInput(name, f"must be {'<' if exclusive_max else '<='} {maximum}, got {value}")


def require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InvalidInput(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


# -- field types ------------------------------------------------------------------------------

def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[object, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_tuple(tp) -> bool:
    return typing.get_origin(tp) is tuple


def _tuple_item(tp):
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    return args[0] if args else str


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    if value is None or value == "":
        return f.metadata.get("unset", "unset")
    return str(value)


# -- parser -----------------------------------------------------------------------------------

def _help_order(cls) -> list[dataclasses.Field]:
    """The command's own fields first (``--data``, ``--prompts``), then those it shares with others."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]


def build_parser(cls, *, prog: str, description: str = "", epilog: str = "",
                 aliases: Aliases | None = None) -> argparse.ArgumentParser:
    """argparse flags for every field of ``cls``; every default is SUPPRESS so only given flags show up."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(CONFIG_FLAG, metavar="FILE.yaml", help="read options from a YAML file (keys are the option "
                        "names with underscores); flags given on the command line override it")
    hints = _field_types(cls)
    other: dict[str, list[str]] = {}
    for theirs, ours in (aliases.for_class(cls) if aliases else {}).items():
        other.setdefault(ours, []).append(theirs)
    spellings = {**_FLAG_SPELLINGS, **(aliases.flag_values if aliases else {})}
    for f in _help_order(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        # argparse formats help
        help_text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})".replace("%", "%%")
        flags = [_flag(f.name)] + [form for theirs in other.get(f.name, ()) for form in (_flag(theirs), "--" + theirs)]
        if other.get(f.name):
            help_text += f" [{aliases.label}: {', '.join(other[f.name])}]"
        kwargs: dict = {"dest": f.name, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif _is_tuple(tp):
            parser.add_argument(*flags, nargs="+", type=_tuple_item(tp), metavar=f.metadata.get("metavar", "X"),
                                **kwargs)
        else:
            if "choices" not in kwargs:  # with choices, argparse shows them instead of a metavar
                kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
            elif f.name in spellings:
                kwargs["type"] = spellings[f.name]
            parser.add_argument(*flags, type=kwargs.pop("type", tp if tp in (int, float, str) else str), **kwargs)
    return parser


def _coerce(cls, name: str, value, where: str):
    """A YAML value converted to field ``name``'s type; errors name ``where`` (file: key)."""
    tp, optional = _unwrap_optional(_field_types(cls)[name])
    if value is None:
        if optional:
            return None
        raise InvalidInput(where, "must not be empty (null)")
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidInput(where, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(where, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(where, f"must be a number, got {value!r}")
        return float(value)
    if _is_tuple(tp):
        items = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(items, list):
            raise InvalidInput(where, f"must be a list, got {value!r}")
        item = _tuple_item(tp)
        out = []
        for i, v in enumerate(items):
            if isinstance(v, (dict, list, bool)) or v is None:
                raise InvalidInput(f"{where}[{i}]", f"must be a plain {item.__name__}, got {v!r}")
            try:
                out.append(item(v))
            except ValueError:
                raise InvalidInput(f"{where}[{i}]", f"must be a {item.__name__}, got {v!r}") from None
        return tuple(out)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise InvalidInput(where, f"must be a string, got {value!r}")
    return str(value)


def read_config_file(cls, path: str | Path, *, aliases: Aliases | None = None) -> dict:
    """The field values in a YAML file, type-checked; unknown keys name the key and the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidInput("config", f"cannot read {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InvalidInput("config", f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput("config", f"{path}: must be a mapping of option: value, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    other = aliases.for_class(cls) if aliases else {}
    known = "the command's flags with underscores" + (f", or {aliases.label}'s names for them" if aliases else "")
    out, given_as = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in other:
            value = aliases.value(other[name], value)
            name = other[name]
        if name not in names:
            close = [n for n in sorted(names | set(other)) if n.startswith(name[:3])]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InvalidInput(f"{path}: {key}", f"unknown key (options are {known}){hint}")
        if name in given_as:
            raise InvalidInput(f"{path}: {key}",
                               f"sets {name} again (already set by {given_as[name]!r}); keep one of them")
        given_as[name] = str(key)
        out[name] = _coerce(cls, name, value, f"{path}: {key}")
    return out


def merge_config(cls, argv: list[str], *, prog: str, description: str = "", epilog: str = "",
                 aliases: Aliases | None = None):
    """``cls`` built from defaults < ``--config`` YAML < flags. Raises InvalidInput; argparse exits on bad flags."""
    parser = build_parser(cls, prog=prog, description=description, epilog=epilog, aliases=aliases)
    args = vars(parser.parse_args(argv))
    values = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        values.update(read_config_file(cls, config_path, aliases=aliases))
    values.update(args)
    return cls(**values)


def parse_config(cls, argv: list[str], *, prog: str, description: str = "", epilog: str = "",
                 aliases: Aliases | None = None):
    """Like :func:`merge_config`, but a bad value exits with status 2 and ``prog: error: <field>: <reason>``."""
    try:
        return merge_config(cls, argv, prog=prog, description=description, epilog=epilog, aliases=aliases)
    except InvalidInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_dict(config) -> dict:
    """Plain YAML/JSON-ready values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def write_config(config, path: str | Path) -> None:
    """The resolved config as YAML: ``--config`` on it reproduces the run."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def split_doc(doc: str, description_paragraphs: int = 1) -> tuple[str, str]:
    """A command module's docstring as ``--help``'s (description, epilog): the first paragraphs and the rest."""
    parts = doc.split("\n\n")
    return "\n\n".join(parts[:description_paragraphs]), "\n\n".join(parts[description_paragraphs:])


def run_command(cls, argv: list[str] | None, *, prog: str, doc: str, run, report=None,
                description_paragraphs: int = 2, aliases: Aliases | None = None) -> int:
    """What every dataclass-config command's ``main`` does: ``cls`` from defaults < ``--config`` <
    flags (a bad value exits 2 naming the field), ``--log-level``, ``run(config)`` (``run`` is a
    function or ``"module:function"``), an
    :class:`InvalidInput` from the run as ``prog: error: field: reason`` and status 2, and
    ``report(config, result)`` (prints the outcome) on success. ``doc``'s first
    ``description_paragraphs`` paragraphs describe the command in ``--help``, the rest is its epilog."""
    from steer.logs import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    description, epilog = split_doc(doc, description_paragraphs)
    config = parse_config(cls, argv, prog=prog, description=description, epilog=epilog, aliases=aliases)
    configure_logging(config.log_level)
    if isinstance(run, str):  # "module:function", imported once the flags parsed: --help stays quick
        module, _, name = run.partition(":")
        run = getattr(importlib.import_module(module), name)
    try:
        result = run(config)
    except InvalidInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if report is not None:
        report(config, result)
    return 0
