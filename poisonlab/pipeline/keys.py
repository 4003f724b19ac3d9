"""What a stage's key is made of, computed rather than listed by hand.

* `code_identity(*modules)`: the source of every poisonlab module a stage's code can run — the
  transitive closure of the imports of its stage module (top-level and function-level imports
  alike, with the packages whose `__init__` an import executes), plus the modules a stage loads
  by name at run time (the attack's class, a defence, a detector), which it declares. A change
  to any file in that closure gives the stage a new key.
* `file_digest(path)`: SHA-256 of an external file's (or a directory's) content, so an input
  edited in place is a new input.
* `digest(obj)`: a short stable hash of a JSON-able spec.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from pathlib import Path

from poisonlab.utils import sha256_file

PACKAGE = Path(__file__).resolve().parents[1]  # the `poisonlab` package directory
ROOT = "poisonlab"


def digest(obj) -> str:
    """A short stable hash of a JSON-able object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def module_file(name: str) -> Path | None:
    """The source file of poisonlab module `name` (a package's `__init__.py`); None when
    `name` is not a module of the package (an attribute: `poisonlab.PoisonlabError`)."""
    if name != ROOT and not name.startswith(ROOT + "."):
        return None
    parts = name.split(".")[1:]
    where = PACKAGE.joinpath(*parts)
    for p in (where / "__init__.py", where.parent / f"{where.name}.py" if parts else None):
        if p is not None and p.is_file():
            return p
    return None


def _imported_names(path: Path, name: str) -> set[str]:
    """Every poisonlab name an `import` anywhere in `path` (module `name`) may load."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # `from poisonlab import models` loads the submodule `poisonlab.models`
            found.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return {n for n in found if n == ROOT or n.startswith(ROOT + ".")}


def _parents(name: str) -> list[str]:
    """`poisonlab.a.b` -> [`poisonlab`, `poisonlab.a`]: the packages an import executes."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.lru_cache(maxsize=None)
def import_closure(*modules: str) -> tuple[Path, ...]:
    """The source files of `modules` and of every poisonlab module they import, directly or
    not (sorted)."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [m for m in modules]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        files.add(path)
        todo.extend(_parents(name))
        todo.extend(_imported_names(path, name))
    return tuple(sorted(files))


@functools.lru_cache(maxsize=None)
def code_identity(*modules: str) -> str:
    """SHA-256 of the source of the import closure of `modules` (module names). Read once per
    process: a long sweep keys its stages by the code it runs, even if the files on disk change
    under it."""
    h = hashlib.sha256()
    for p in import_closure(*sorted(set(modules))):
        h.update(str(p.relative_to(PACKAGE)).encode() + b"\0" + source(p) + b"\0")
    return h.hexdigest()


def source(path: Path) -> bytes:
    return path.read_bytes()


@functools.lru_cache(maxsize=None)
def code_digest(*patterns: str) -> str:
    """SHA-256 of poisonlab's source files matching `patterns` (globs relative to the package);
    `code_digest("**/*.py")` is the whole package (the run's identity)."""
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in PACKAGE.glob(pat) if p.is_file()})
    for p in files:
        h.update(str(p.relative_to(PACKAGE)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def target_module(target: str | None) -> str | None:
    """The module of a Hydra `_target_` inside poisonlab (`poisonlab.attacks.badnets.X` ->
    `poisonlab.attacks.badnets`), else None."""
    if not target:
        return None
    mod = target.rpartition(".")[0]
    return mod if module_file(mod) is not None else None


_FILE_MEMO: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, or of a directory's (every file's relative name and
    content, sorted). Remembered per process by (path, size, mtime) of each file."""
    p = Path(path).expanduser()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        memo_key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if memo_key not in _FILE_MEMO:
            _FILE_MEMO[memo_key] = sha256_file(f)
        rel = "" if f == p else str(f.relative_to(p))
        h.update(rel.encode() + b"\0" + _FILE_MEMO[memo_key].encode() + b"\0")
    return h.hexdigest()


def local_inputs(data_cfg) -> dict[str, str]:
    """The content digest of every local file or directory the data config reads (`path`,
    `eval_path`, and `name` where it is a local dataset): {key: sha256}."""
    out = {}
    for key in ("path", "eval_path", "name"):
        value = data_cfg.get(key) if hasattr(data_cfg, "get") else None
        if isinstance(value, str) and value and os.path.exists(os.path.expanduser(value)):
            out[key] = file_digest(value)
    return out
