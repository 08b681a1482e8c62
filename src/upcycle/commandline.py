"""The command line generated from each verb's `run` signature and config dataclass (see upcycle.cli).

`run`'s plain parameters are positionals (MODEL, OUT), its keyword-only ones are options, and every
field of its config sections (`config`, the verb's own dataclass, and shared ones such as
`options: RunOptions`) is an option (`--seq-len`, `--no-decode`, ...), with the field's help,
default and choices. Every verb takes `--config FILE.yaml` (keys = the same names; the command line
wins) and `--print-config` (the full config as a YAML recipe). Values are checked by the config
itself, so the command line, a YAML recipe and a Python call reject exactly the same input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import typing
from pathlib import Path

import torch

from upcycle.config import from_text, plain, scalar_parts
from upcycle.errors import ConfigError, check
from upcycle.yamlfile import read_mapping


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 — like every other user error
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _signature(verb: str):
    """(run, {parameter: its config class} for the config sections, {parameter: (annotation, required,
    positional)} for the plain ones). A section is a parameter annotated with a dataclass: `config`
    (the verb's own) and shared ones such as `options: RunOptions`; each field of each is an option."""
    run = importlib.import_module(f"upcycle.commands.{verb}").run
    hints = typing.get_type_hints(run)
    sections, params = {}, {}
    for p in inspect.signature(run).parameters.values():
        tp = hints.get(p.name, str)
        if dataclasses.is_dataclass(tp):
            sections[p.name] = tp
        else:
            params[p.name] = (tp, p.default is p.empty, p.kind != p.KEYWORD_ONLY)
    return run, sections, params


def _fields(sections: dict) -> dict:
    """{option name: (section, field, annotation)} over every section; a name declared twice is a bug."""
    out = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            assert f.name not in out, f"option {f.name!r} is declared in two sections"
            out[f.name] = (section, f, hints[f.name])
    return out


def _add(parser, name: str, tp, default, help: str, positional: bool = False, choices=None) -> None:
    help = help.replace("%", "%%")  # argparse formats help with %-style fields
    if positional:
        parser.add_argument(name, nargs="?", default=argparse.SUPPRESS, metavar=name.upper(), help=help)
    elif tp is bool or scalar_parts(tp) == [bool]:  # a flag (an operator's, None until given: no default shown)
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help + shown,
        )
    else:
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        shown = "" if default is dataclasses.MISSING or default is None else f" (default: {plain(default)})"
        allowed = f" {{{', '.join(map(str, choices))}}}" if choices else ""
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=help + allowed + shown,
        )


def build_parser(verbs: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = _Parser(prog="upcycle", description="Turn the checkpoint you have into the model you need.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for verb in verbs:
        run, sections, params = _signature(verb)
        about = (inspect.getmodule(run).__doc__ or verb).strip().splitlines()[0]
        p = sub.add_parser(verb, help=about, description=about)
        for name, (tp, required, positional) in params.items():
            _add(p, name, tp, dataclasses.MISSING, "required" if required else "", positional)
        for name, (_, f, tp) in _fields(sections).items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            _add(p, name, tp, default, f.metadata.get("help", ""), choices=f.metadata.get("choices"))
        p.add_argument("--config", type=Path, help="YAML file of options (keys = option names; the command line wins)")
        p.add_argument("--print-config", action="store_true", help="print the full config as a YAML recipe and stop")
    return parser


def parse(argv: list[str], verbs: tuple[str, ...]):
    """(run, keyword arguments for it, print_only) from the command line and an optional --config file."""
    args = vars(build_parser(verbs).parse_args(argv))
    verb, threads, config_file, print_only = (args.pop(k) for k in ("command", "threads", "config", "print_config"))
    check(threads is None or threads >= 1, "threads", threads, "a positive number of threads")
    if threads:
        torch.set_num_threads(threads)
    run, sections, params = _signature(verb)
    fields = _fields(sections)
    types = {**{n: tp for n, (tp, _, _) in params.items()}, **{n: tp for n, (_, _, tp) in fields.items()}}
    given = {
        k: from_text(v, types[k], "--" + k.replace("_", "-")) if isinstance(v, str) and types[k] is not str else v
        for k, v in args.items()
    }
    values = read_mapping(config_file, "--config") if config_file is not None else {}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"--config {config_file}: unknown option {unknown[0]!r} for `{verb}`; known: {', '.join(sorted(types))}"
        )
    values.update(given)
    required = [n for n, (_, needed, _) in params.items() if needed] + [
        n
        for n, (_, f, _) in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if values.get(n) is None]
    if missing and not print_only:
        raise ConfigError(f"{verb}: missing {', '.join(missing).upper()} (on the command line or in --config)")
    built = {
        section: cls.from_dict({k: v for k, v in values.items() if k in fields and fields[k][0] == section}, verb)
        for section, cls in sections.items()
    }
    sources = {k: values.get(k) for k in params if k in values or print_only}
    return run, {**sources, **built}, print_only
