"""Typed configs: dataclasses whose fields are a verb's options, checked the same way from every door.

    @dataclass
    class EvalConfig(Config):
        seq_len: int = option(512, "tokens per scored block")

        def validate(self):
            check(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")

A Config checks every field against its annotation when it is built (a YAML value of the wrong type
names the key and the type it expected), turns nested mappings into nested configs, then runs the
class's own `validate`. The CLI (upcycle.cli) generates its options from the same fields, YAML recipes
are dumps of them, and the Python call builds them directly: all three reject exactly the same values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from upcycle.devices import DTYPE_CHOICES, check_device_name, parse_size
from upcycle.errors import ConfigError
from upcycle.yamlfile import read_mapping


def option(
    default=dataclasses.MISSING, help: str = "", *, choices: tuple | None = None, factory=None, cli: bool = True
):
    """A config field with its help text (and allowed values) for the generated command line; `cli=False`:
    not an option of its own (the command fills it from another section)."""
    metadata = {"help": help, "choices": choices, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Config:
    """Base of every verb's config (a dataclass): type checks, nested configs, YAML in and out."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, conform(getattr(self, f.name), hints[f.name], f.name))
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name}={getattr(self, f.name)!r} is not allowed: one of {', '.join(map(str, choices))}"
                )
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks of the subclass; raise ConfigError (see errors.check)."""

    @classmethod
    def from_dict(cls, values: dict, where: str = "config"):
        return build(cls, values, where)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None):
        return cls.from_dict({**read_mapping(path, "config"), **(overrides or {})})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False)


@dataclass
class RunOptions(Config):
    """How a command runs, the same for every verb: a section of each command's options, declared once."""

    progress: bool = option(True, "progress bars (on stderr)")
    overwrite: bool = option(False, "replace a non-empty OUT")
    trust_remote_code: bool = option(False, "run the model folder's own code (only for a source you trust)")
    device: str = option("auto", "where to compute: auto (a GPU if there is one), cpu, cuda or cuda:N")
    dtype: str = option("auto", "dtype of the weights while working and written: auto (the checkpoint's own)",
                        choices=DTYPE_CHOICES)  # fmt: skip
    shard_size: str = option("2GB", "largest weight file written (HF shards with an index past one)")

    def validate(self) -> None:
        check_device_name(self.device)
        parse_size(self.shard_size)


class OperatorStep(Config):
    """A step of a plan whose options depend on its operator: one dataclass per operator under a base
    (GrowStep, SlimStep), chosen by `op`. `Base(op="depth", add=2)` builds the depth operator's class,
    and an option that operator does not take is a one-line error naming the ones it does."""

    OPERATORS: typing.ClassVar[dict[str, type]]  # op -> class, on each base
    OP: typing.ClassVar[str | None] = None  # on each operator class
    KIND: typing.ClassVar[str] = "step"  # how an error names the base ("growth step", "cut")

    def __new__(cls, *args, op: str | None = None, **options):
        if cls.OP is None:  # the base: build the operator's own class
            cls = cls.operator_class(op, options, cls.KIND)
        return object.__new__(cls)

    def __post_init__(self):
        if self.op is None:
            self.op = self.OP
        if self.op != self.OP:
            raise ConfigError(f"op={self.op!r} given to the {self.OP} operator's {type(self).__name__}")
        super().__post_init__()

    @classmethod
    def operator(cls, op: str, about: str):
        """Class decorator: register an operator class under this base."""

        def register(sub):
            sub.OP, sub.ABOUT = op, about
            cls.OPERATORS[op] = sub
            return sub

        return register

    @classmethod
    def operator_class(cls, op, options, where: str):
        if op is None:
            raise ConfigError(f"{where}: op is required, one of {', '.join(cls.OPERATORS)}")
        if op not in cls.OPERATORS:
            raise ConfigError(f"{where}: op={op!r} is not allowed: one of {', '.join(cls.OPERATORS)}")
        sub = cls.OPERATORS[op]
        known = [f.name for f in dataclasses.fields(sub) if f.name != "op"]
        foreign = [str(k).replace("-", "_") for k in options if str(k).replace("-", "_") not in known + ["op"]]
        if foreign:
            raise ConfigError(
                f"{where}: {foreign[0]} does not apply to the {op} operator; its options: {', '.join(known)}"
            )
        return sub

    @classmethod
    def from_dict(cls, values, where: str = "config"):
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{op: ..., ...}}, got {values!r}")
        sub = cls if cls.OP is not None else cls.operator_class(values.get("op"), values, where)
        return build(sub, values, where)

    def to_dict(self) -> dict:
        return {"op": self.op, **{k: v for k, v in dataclasses.asdict(self).items() if k != "op"}}

    @classmethod
    def command_line(cls, name: str):
        """A flat Config of every operator's options (each None unless given) for the command line; its
        `step()` is the base built from the options given, so a foreign one is refused as above."""
        fields, seen = (
            [
                (
                    "op",
                    str | None,
                    option(
                        None,
                        "the operator: " + "; ".join(f"{op} ({sub.ABOUT})" for op, sub in cls.OPERATORS.items()),
                        choices=tuple(cls.OPERATORS),
                    ),
                )
            ],
            {"op"},
        )
        for op, sub in cls.OPERATORS.items():
            hints = typing.get_type_hints(sub)
            for f in dataclasses.fields(sub):
                if f.name in seen:
                    continue
                seen.add(f.name)
                users = [o for o, s in cls.OPERATORS.items() if f.name in {g.name for g in dataclasses.fields(s)}]
                defaults = {o: _default(cls.OPERATORS[o], f.name) for o in users}
                if len(set(map(repr, defaults.values()))) == 1:  # one default for all its operators: once
                    value = next(iter(defaults.values()))
                    shown = "" if value is None else str(value)
                else:
                    shown = ", ".join(f"{o}: {d}" for o, d in defaults.items() if d is not None)
                label = "every operator" if len(users) == len(cls.OPERATORS) else ", ".join(users)
                fields.append(
                    (
                        f.name,
                        hints[f.name] | None,
                        option(
                            None, f"{label}: {f.metadata.get('help', '')}" + (f" (default {shown})" if shown else "")
                        ),
                    )
                )
        base = cls

        def step(self):
            given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
            if self.op is None:
                if given:
                    raise ConfigError(
                        f"{name}: --{next(iter(given)).replace('_', '-')} needs --op ({', '.join(base.OPERATORS)})"
                    )
                return None
            base.operator_class(self.op, {k: v for k, v in given.items() if k != "op"}, name)
            return base.from_dict(given, name)

        def validate(self):
            self.step()  # refused when the options are read, before any model is loaded

        return dataclasses.make_dataclass(
            f"{cls.__name__}Options", fields, bases=(Config,), namespace={"step": step, "validate": validate}
        )


def read_plan(path, key: str, item, what: str) -> list:
    """A plan file's one key, a non-empty list, each entry built by `item.from_dict` (grow's steps,
    slim's stages): one-line errors naming the file, the key and the entry."""
    mapping = read_mapping(path, "plan")
    unknown = set(mapping) - {key}
    if unknown or not isinstance(mapping.get(key), list) or not mapping[key]:
        raise ConfigError(
            f"plan {str(path)!r} must hold `{key}:`, a non-empty list of {what}"
            + (f" (unknown key {sorted(unknown)[0]!r})" if unknown else "")
        )
    return [item.from_dict(entry, f"{key}[{n}]") for n, entry in enumerate(mapping[key])]


def _default(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else None


def build(cls, values, where: str):
    """cls(**values) for a mapping of field names (dashes allowed), with one-line errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (required)")
    return cls(**values)


def plain(value):
    """Tuples as lists, recursively: what yaml.safe_dump writes as a plain YAML sequence."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# ---- types ---------------------------------------------------------------------------------------


def conform(value, tp, key: str):
    """`value` as the annotation `tp` wants it (an int where a float is asked, a list as a tuple, a
    mapping as a nested config), or ConfigError naming the key and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and not is_scalar(members[0]):  # its own error says more than "wrong type"
            return conform(value, members[0], key)
        for arg in members:
            try:
                return conform(value, arg, key)
            except ConfigError:
                continue
        raise _wrong_type(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong_type(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong_type(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(key, value, tp)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, value, tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _wrong_type(key, value, tp)
            return tuple(conform(v, a, f"{key}[{n}]") for n, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        items = [conform(v, item, f"{key}[{n}]") for n, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _wrong_type(key, value, tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, key) if issubclass(tp, Config) else build(tp, value, key)
        raise _wrong_type(key, value, tp)
    return value


def type_name(tp) -> str:
    """How an annotation reads in an error message: 'an integer', 'a list of integers', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
        type(None): "null",
    }
    if tp in names:
        return names[tp]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        item = args[0] if args else None
        return "a list" + (f" of {_plural(type_name(item))}" if item is not None and item is not Ellipsis else "")
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _plural(name: str) -> str:
    name = name.removeprefix("an ").removeprefix("a ")
    return {"integer": "integers", "number": "numbers", "string": "strings"}.get(name, name)


def _wrong_type(key: str, value, tp) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: expected {type_name(tp)}, got {type(value).__name__}")


def is_scalar(tp) -> bool:
    return tp in (int, float, str, bool)


def scalar_parts(tp) -> list:
    """The non-None members of an annotation that is a scalar or a union of scalars, else []."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    members = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [tp]
    return members if all(is_scalar(m) for m in members) else []


def list_item(tp):
    """The item type of list[X] / tuple[X, ...] (optionally | None) when X is a scalar, else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return list_item(members[0]) if len(members) == 1 else None
    if origin in (list, tuple) and args and is_scalar(args[0]) and (origin is list or args[-1] is Ellipsis):
        return args[0]
    return None


def from_text(text: str, tp, option_name: str):
    """A command-line string as the annotation wants it: numbers parsed, comma lists split,
    anything structured (mappings, lists of configs) read as YAML; the config then checks the type."""
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    item = list_item(tp)
    if item is not None and not text.lstrip().startswith("["):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return [_scalar(p, [item]) for p in parts]
        except ValueError:
            raise ConfigError(f"{option_name} {text!r}: expected {type_name(tp)}, comma-separated") from None
    members = scalar_parts(tp)
    if members:
        try:
            return _scalar(text, members)
        except ValueError:
            raise ConfigError(f"{option_name} {text!r}: expected {type_name(tp)}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{option_name} {text!r}: not valid YAML ({str(e).splitlines()[0]})") from None


def _scalar(text: str, members: list):
    """Try int, then float, then str among the allowed members (so 'auto' and '3' both fit str | int)."""
    for tp in (int, float, str):
        if tp in members:
            try:
                return tp(text)
            except ValueError:
                continue
    raise ValueError(text)
