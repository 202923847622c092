"""The one atomic writer: files and directories appear complete or not at all.

A file is written to a temporary sibling and renamed into place; an output directory is built
as ``.<name>.safegene-tmp-<pid>`` and renamed at the end. A killed run's temporaries are removed
by the next run for the same output (their process is gone).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import OutputError, SafeGeneError

TMP_TAG = ".safegene-tmp-"


def write_text_atomic(path: "str | os.PathLike[str]", text: str) -> Path:
    """Write ``text`` (UTF-8) next to ``path`` and rename it into place, so a reader never sees
    half a file; creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: "str | os.PathLike[str]", obj: Any) -> Path:
    """:func:`write_text_atomic` of ``obj`` as JSON (compact for very large manifests)."""
    # The C encoder (no indent) for big manifests: the pure-Python indenting encoder takes
    # seconds and hundreds of MiB on 10^5 tensors.
    big = len(obj.get("layers", ())) > 5000 if isinstance(obj, dict) else False
    text = json.dumps(obj, separators=(",", ":")) if big else json.dumps(obj, indent=1)
    return write_text_atomic(path, text + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> None:
    """Remove temporaries left by killed runs for this output (their process is gone)."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    prefix = f".{out.name}{TMP_TAG}"
    for q in parent.iterdir():
        if q.name.startswith(prefix):
            try:
                pid = int(q.name[len(prefix):].removeprefix("old-"))  # "old-": a replaced output
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(q, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success rename it to ``out``, on failure remove it.

    A killed run leaves only ``.<name>.safegene-tmp-<pid>``, which the next run removes, so a
    directory named ``out`` is always complete.
    """
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output {out} already exists; choose a new path or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output {out}: parent directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output {out}: parent directory {parent} is not writable")
    remove_stale_temps(out)
    tmp = parent / f".{out.name}{TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"output {out}: cannot create a temporary directory in {parent} ({exc.strerror})") from None
    try:
        yield tmp
        if out.exists():
            trash = parent / f".{out.name}{TMP_TAG}old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, SafeGeneError):
            raise OutputError(f"writing {out} failed: {exc.strerror or exc} (free disk space or fix permissions, then run again)") from None
        raise
