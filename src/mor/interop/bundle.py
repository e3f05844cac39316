"""Copy library modules, with everything they import from ``mor``, into one flat directory of
files that import each other relatively - the remote code of an exported model.

The set of modules is computed, not listed: starting from the root modules, every import that
runs when a module is imported (module and class bodies, not function bodies nor
``if TYPE_CHECKING:`` blocks) of a ``mor`` module is followed. In the copied files

* imports of bundled modules become relative imports of their flat file names
  (``mor.model`` -> ``mor_model.py``: ``from .config import ModelConfig`` becomes
  ``from .mor_config import ModelConfig``, ``from . import routing as R`` becomes
  ``from . import mor_routing as R``);
* a deferred import (inside a function) of a ``mor`` module that is not bundled becomes
  ``raise ImportError(...)``: that function needs the library itself.

transformers copies the files a remote-code module names in ``from .name import ...`` lines
(recursively), so :func:`bundle` returns a block of such lines that the entry module must
end with, naming every bundled file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "mor"


class BundleError(RuntimeError):
    """A library module cannot be bundled (an import form the rewriter does not handle)."""


def package_dir() -> Path:
    return Path(__file__).resolve().parents[1]  # src/mor


def module_file(name: str, pkg: Path | None = None) -> Path | None:
    """The source file of module ``name`` (``mor...``) in the package directory ``pkg``
    (default: this library), or None if there is no such module."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = (pkg or package_dir()).joinpath(*parts[1:])
    if base.with_suffix(".py").is_file() and len(parts) > 1:
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_package(name: str, pkg: Path) -> bool:
    f = module_file(name, pkg)
    return f is not None and f.name == "__init__.py"


def flat_name(name: str, keep: dict[str, str]) -> str:
    """File stem of module ``name`` in the bundle: the root modules keep their own name."""
    if name in keep:
        return keep[name]
    parts = name.split(".")
    return "mor_" + ("_".join(parts[1:]) if len(parts) > 1 else "package")


@dataclass
class _Imp:
    node: ast.stmt
    eager: bool  # runs when the module is imported
    # (kind, target module, imported name, bound alias); kind "attr": ``from M import name``,
    # "module": the name is bound to module ``target``
    items: list[tuple[str, str, str | None, str]]


def _resolve(cur: str, level: int, module: str | None, pkg_dir: Path) -> str:
    if level == 0:
        return module or ""
    pkg = cur if _is_package(cur, pkg_dir) else cur.rpartition(".")[0]
    for _ in range(level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{module}" if module else pkg


def _intra(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _imports(cur: str, tree: ast.Module, pkg: Path) -> list[_Imp]:
    out: list[_Imp] = []
    where = module_file(cur, pkg)

    def visit(nodes, eager: bool):
        for n in nodes:
            if isinstance(n, ast.ImportFrom):
                base = _resolve(cur, n.level, n.module, pkg)
                if not _intra(base):
                    continue
                items = []
                for a in n.names:
                    sub = f"{base}.{a.name}"
                    if a.name != "*" and module_file(sub, pkg) is not None:
                        items.append(("module", sub, None, a.asname or a.name))
                    else:
                        items.append(("attr", base, a.name, a.asname or a.name))
                out.append(_Imp(n, eager, items))
            elif isinstance(n, ast.Import):
                items = []
                for a in n.names:
                    if _intra(a.name):
                        if a.asname is None:
                            raise BundleError(f"{where}:{n.lineno}: 'import {a.name}' binds the package "
                                              f"name; write 'from ... import' or 'import {a.name} as NAME'")
                        items.append(("module", a.name, None, a.asname))
                if items:
                    if len(items) != len(n.names):
                        raise BundleError(f"{where}:{n.lineno}: mixes mor and other modules in one import")
                    out.append(_Imp(n, eager, items))
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(n.body, False)
            elif isinstance(n, ast.If) and _is_type_checking(n.test):
                visit(n.body, False)
                visit(n.orelse, eager)
            else:
                visit(list(ast.iter_child_nodes(n)), eager)

    visit(tree.body, True)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def closure(roots: list[str], pkg: Path | None = None) -> dict[str, tuple[str, list[_Imp]]]:
    """Module name -> (source, imports) of the roots and every mor module they import eagerly."""
    pkg = pkg or package_dir()
    seen: dict[str, tuple[str, list[_Imp]]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = module_file(name, pkg)
        if f is None:
            raise BundleError(f"module {name} not found under {pkg}")
        src = f.read_text()
        imps = _imports(name, ast.parse(src, filename=str(f)), pkg)
        seen[name] = (src, imps)
        for imp in imps:
            if imp.eager:
                todo += [target for _, target, _, _ in imp.items]
    return seen


def _rewrite(where: Path, src: str, imps: list[_Imp], names: dict[str, str]) -> str:
    lines = src.splitlines(keepends=True)
    # replace from the bottom so line numbers stay valid
    for imp in sorted(imps, key=lambda i: i.node.lineno, reverse=True):
        n = imp.node
        first = lines[n.lineno - 1]
        indent = first[: len(first) - len(first.lstrip())]
        rest = lines[n.end_lineno - 1][n.end_col_offset:].strip()
        if n.col_offset != len(indent) or (rest and not rest.startswith("#")):
            raise BundleError(f"{where}:{n.lineno}: put each mor import on its own line to bundle it")
        missing = sorted({t for _, t, _, _ in imp.items if t not in names})
        if missing:
            msg = f"{missing[0]} is part of the mor library, not of this exported model; install mor to use it"
            stmts = [f"raise ImportError({msg!r})"]
        else:
            stmts, attrs = [], {}
            for kind, target, attr, alias in imp.items:
                if kind == "module":
                    stmts.append(f"from . import {names[target]}" + ("" if alias == names[target] else f" as {alias}"))
                else:
                    attrs.setdefault(target, []).append(attr if attr == alias else f"{attr} as {alias}")
            stmts = [f"from .{names[t]} import {', '.join(a)}" for t, a in attrs.items()] + stmts
        new = "".join(indent + s + "\n" for s in stmts)
        lines[n.lineno - 1: n.end_lineno] = [new]
    return "".join(lines)


def bundle(roots: dict[str, str], pkg: Path | None = None) -> tuple[dict[str, str], str]:
    """Sources of the bundle: ``roots`` maps root module names to their file stems in the bundle
    (e.g. ``{"mor.interop.hf_remote.modeling_mor": "modeling_mor"}``); every other module gets
    :func:`flat_name`. ``pkg``: the package directory (default: this library). Returns
    (file name -> source, the import block that names every bundled file, for the entry
    module)."""
    pkg = pkg or package_dir()
    mods = closure(list(roots), pkg)
    names = {m: flat_name(m, roots) for m in mods}
    if len(set(names.values())) != len(names):
        raise BundleError(f"two modules flatten to one file name: {sorted(names.values())}")
    files = {}
    for m, (src, imps) in sorted(mods.items()):
        f = module_file(m, pkg)
        header = f"# Generated by `mor export` from {f.relative_to(pkg.parent).as_posix()} (mor library); do not edit.\n"
        files[names[m] + ".py"] = header + _rewrite(f, src, imps, names)
    block = ("\n\n# transformers copies the files named by this module's relative imports: every bundled module\n"
             + "".join(f"from .{stem} import __name__ as _bundled_{stem}  # noqa: E402,F401\n"
                       for m, stem in sorted(names.items(), key=lambda kv: kv[1]) if m not in roots))
    return files, block
