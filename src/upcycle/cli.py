"""The `upcycle` command: verb name -> `upcycle.commands.<verb>.run`; the options come from each verb's
config (upcycle.commandline). A user error prints one line and exits with code 2, leaving no new folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from upcycle import hubcache

# the registry: adding a verb is a module upcycle/commands/<verb>.py with `run` and one name here
VERBS = (
    "inspect",
    "eval",
    "convert",
    "densify",
    "export",
    "sparsify",
    "repair",
    "grow",
    "slim",
    "prune",
    "finetune",
    "bench",
    "generate",
    "train",
    "demo",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    unreachable = _unreachable_source(argv)
    if unreachable:  # said before torch and transformers are imported: seconds sooner, nothing retried
        print(f"upcycle: error: {unreachable}", file=sys.stderr)
        return 2
    import yaml

    from upcycle.commandline import parse
    from upcycle.config import Config, plain
    from upcycle.errors import UpcycleError

    new_outs: list[Path] = []
    try:
        run, kwargs, print_only = parse(argv, VERBS)
        if print_only:
            sections = {k: v for k, v in kwargs.items() if isinstance(v, Config)}
            flat = {k: v for k, v in kwargs.items() if k not in sections}
            for section in sections.values():
                flat |= section.to_dict()
            print(yaml.safe_dump(plain(flat), sort_keys=False), end="")
            return 0
        outs = [kwargs.get("out"), getattr(kwargs.get("config"), "out", None)]
        new_outs = [_first_missing(Path(o)) for o in outs if isinstance(o, (str, Path)) and not Path(o).exists()]
        run(**kwargs)  # it returns its result to a Python caller; the CLI has printed what matters
        return 0
    except UpcycleError as e:
        if not getattr(e, "keeps_output", False):  # a failed command leaves no new folder behind
            for path in new_outs:
                shutil.rmtree(path, ignore_errors=True)
        print(f"upcycle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upcycle: interrupted", file=sys.stderr)
        return 130


def _unreachable_source(argv: list[str]) -> str | None:
    """The one-line error for a verb whose MODEL (its first positional argument) is a hub id that is neither
    cached here nor reachable; None otherwise (the verb's own loading decides the rest)."""
    if len(argv) < 2 or argv[0] not in VERBS or argv[1].startswith("-"):
        return None
    source = argv[1]
    if not hubcache.looks_like_hub_id(source) or hubcache.cached_snapshot(source) is not None:
        return None
    return None if hubcache.hub_reachable() else hubcache.unreachable_message(source)


def _first_missing(path: Path) -> Path:
    """The outermost folder of `path` that does not exist yet: what a failed command must remove."""
    path = path.expanduser().absolute()
    while not path.parent.exists():
        path = path.parent
    return path


if __name__ == "__main__":
    sys.exit(main())
