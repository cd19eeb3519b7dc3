# Rerun triggers for code: each rule's `code` param hashes exactly the package files its
# command reads.  Snakemake's own `code` trigger sees only a rule's shell text, so the files
# come from workflow/code-files.yaml (subcommand -> package files), which a test generates by
# running every rule's command on a tiny model and recording what it read
# (tests/test_rerun_triggers.py); the test fails when the table is stale.  Python files are
# hashed without docstrings and comments, so those edits never rerun a job.

import ast
import hashlib

import yaml

CODE_FILES = yaml.safe_load((REPO / "workflow" / "code-files.yaml").read_text())
_DIGESTS = {}


def _strip_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _file_digest(rel):
    """sha256 of a package file: its syntax tree without docstrings for Python, else its bytes."""
    if rel not in _DIGESTS:
        path = REPO / "blockpruner" / rel
        if not path.is_file():
            raise WorkflowError(f"workflow/code-files.yaml names blockpruner/{rel}, which does not exist; regenerate "
                                "the table: BLOCKPRUNER_UPDATE_CODE_FILES=1 python -m pytest tests/test_rerun_triggers.py")
        if path.suffix == ".py":
            try:
                text = ast.dump(_strip_docstrings(ast.parse(path.read_text(encoding="utf-8"))))
            except SyntaxError:  # being edited: its text is hashed instead
                text = path.read_text(encoding="utf-8")
            _DIGESTS[rel] = hashlib.sha256(text.encode()).hexdigest()
        else:
            _DIGESTS[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[rel]


def code_hash(*commands):
    """Hash of the package files the given `blockpruner` subcommands read."""
    h = hashlib.sha256()
    for command in commands:
        if command not in CODE_FILES:
            raise WorkflowError(f"workflow/code-files.yaml has no entry for `blockpruner {command}`; regenerate it: "
                                "BLOCKPRUNER_UPDATE_CODE_FILES=1 python -m pytest tests/test_rerun_triggers.py")
        for rel in CODE_FILES[command]:
            h.update(f"{rel}:{_file_digest(rel)}".encode())
    return h.hexdigest()[:16]
