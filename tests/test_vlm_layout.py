"""The vlm package's layout: no import cycle, every module imports on its own, nothing looks for the
repository, the embedded default ships inside the package, no module grows past ~450 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """vlm modules ``name`` imports anywhere in its code (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found |= subs
            if len(subs) < len(node.names) and target in modules:  # names from the module itself
                found.add(target)
    return found - {name}


def test_no_import_cycle_among_vlm_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name) :] + [name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_every_vlm_module_imports_on_its_own():
    """Each module first, in a fresh state of vlm (third-party modules stay loaded, for speed)."""
    script = f"""
import importlib, sys
for name in {sorted(_modules())!r}:
    for loaded in [m for m in sys.modules if m == "vlm" or m.startswith("vlm.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_installed_code_never_looks_for_the_repository():
    found = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        found += [f"{name}: {needle}" for needle in ("parents[", "__file__") if needle in text]
    assert not found, found


def test_the_embedded_default_ships_inside_the_package_and_matches_configs():
    from vlm.pipeline.config import default_config_file

    with default_config_file() as path:
        assert path.is_file() and PACKAGE in path.resolve().parents
        assert path.read_bytes() == (ROOT / "configs" / "default.yaml").read_bytes()
    assert 'vlm = ["configs/*.yaml"]' in (ROOT / "pyproject.toml").read_text()  # packaged as data


def test_no_vlm_module_is_over_450_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 450}
    assert not long, long
