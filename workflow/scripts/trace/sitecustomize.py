"""Which files of the blockpruner package a command reads, for the workflow's rerun triggers.

With this folder on PYTHONPATH and BLOCKPRUNER_TRACE_FILES=DIR in the environment, Python
imports this module at start-up (the `sitecustomize` hook of `site`); it records every file
the process imports or opens, and a process that ran `blockpruner.cli` writes, as it exits,
the package's files among them to DIR/<command>.<pid>.txt. tests/test_rerun_triggers.py runs
a whole study this way and builds workflow/code-files.yaml, the files each rule's `code`
param hashes, from those lists. Without the variable nothing here runs.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path


def trace_package_files(out_dir: str) -> None:
    opened: set[Path] = set()

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            opened.add(Path(os.fsdecode(args[0])))

    sys.addaudithook(audit)

    def write() -> None:
        package = sys.modules.get("blockpruner")
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        if package is None or main is None:
            return
        package = Path(package.__file__).resolve().parent
        if Path(main).resolve() != package / "cli" / "__main__.py":  # not `python -m blockpruner.cli COMMAND ...`
            return
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        files = {Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)} | opened
        rel = set()
        for f in files:
            try:
                r = f.resolve().relative_to(package)
            except (ValueError, OSError):
                continue
            if "__pycache__" in r.parts:
                r = r.parent.parent / (r.name.split(".")[0] + ".py")
            if (package / r).is_file():
                rel.add(r.as_posix())
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, f"{command}.{os.getpid()}.txt").write_text("".join(f"{r}\n" for r in sorted(rel)))

    atexit.register(write)


if os.environ.get("BLOCKPRUNER_TRACE_FILES"):
    trace_package_files(os.environ["BLOCKPRUNER_TRACE_FILES"])
