"""Dependencies point one way, toward the numerics: no import cycles among qparity's modules."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "qparity"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set:
    """The qparity modules `path` imports, at any depth of its code (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("qparity"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qparity"))
    return found


def graph() -> dict:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_numerics_depend_on_nothing_above_them():
    for name, deps in graph().items():
        if name.startswith("qparity.numerics"):
            outside = {d for d in deps if not d.startswith(("qparity.numerics", "qparity.errors", "qparity.qparams"))}
            assert not outside, f"{name} imports {outside}"


def test_no_import_cycles():
    deps = graph()
    # A package's __init__ re-exporting its submodules is not a cycle of the code's layers.
    deps = {name: {d for d in ds if not name.startswith(d + ".")} for name, ds in deps.items()}
    state = {}

    def visit(name, stack):
        state[name] = "open"
        for dep in sorted(deps.get(name, ())):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in sorted(deps):
        if name not in state:
            visit(name, [name])


def test_a_missing_runtime_fails_the_run_instead_of_skipping():
    import pytest

    from helpers import require_runtime

    with pytest.raises(pytest.fail.Exception, match="test oracle"):
        require_runtime("no_such_runtime_module")
