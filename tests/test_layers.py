"""The layers of DESIGN.md, as the code's imports show them (every import, including those
inside functions):

    tools/                       CLIs and benchmarks
    services/<name>/, drivers/   system services and drivers (a service shares only wire
                                 types and pure rules in protocols/, the SDK, and the
                                 numba ops of drivers.ops for its fallback path)
    services/ (the SDK)
    kernel/                      shares only low helpers (protocols.runtime) with the SDK
    protocols/                   imports nothing of the project
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernel", "protocols", "services", "drivers", "tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path) -> str:
    """The package a module belongs to (a package's __init__ belongs to itself)."""
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every project import in the file; ``from a import b``
    counts as importing ``a.b`` when ``a.b`` is a module of the project."""
    tree = ast.parse(path.read_text(), str(path))
    package = _package_of(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if _exists(sub):
                    found.append((node.lineno, sub))
    return [(line, m) for line, m in found if m.split(".")[0] in PACKAGES]


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _private_owner(module: str) -> str | None:
    """The package whose private module ``module`` is (None for a public one)."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _violations() -> list[str]:
    bad = []
    for path in _sources():
        rel = path.relative_to(ROOT)
        top = rel.parts[0]
        package = _package_of(path)
        # A system service (services/<name>/) shares only wire types (protocols/) and the SDK
        # with the other services and drivers; drivers may use drivers' public libraries (ops).
        system_service = top == "services" and len(rel.parts) > 2
        for line, module in _imports(path):
            where = f"{rel}:{line} imports {module}"
            target = module.split(".")[0]
            if top == "protocols" and target != "protocols":
                bad.append(f"{where}: protocols/ imports nothing of the project")
            if top == "kernel" and target not in ("kernel", "protocols"):
                bad.append(f"{where}: the kernel imports only itself and protocols/")
            if top in ("services", "drivers") and target == "tools":
                bad.append(f"{where}: services and drivers do not import tools/")
            owner = _private_owner(module)
            if owner is not None and owner != package:
                bad.append(f"{where}: a private module of {owner!r}, not of {package!r}")
            if system_service:
                own = ".".join(rel.parts[:2])
                peer = module.split(".")[:2]
                if target in ("services", "drivers") and len(peer) == 2 and _is_package(peer) \
                        and ".".join(peer) not in (own, "drivers.ops"):
                    bad.append(f"{where}: {own} and {'.'.join(peer)} are peers; share a wire type in protocols/")
    return bad


def _is_package(parts: list[str]) -> bool:
    return (ROOT.joinpath(*parts) / "__init__.py").is_file()


def test_imports_point_down_only() -> None:
    bad = _violations()
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_the_layer_check_sees_what_it_must_refuse(tmp_path: Path) -> None:
    """The checker itself: each rule catches its case (so the test above can fail)."""
    cases = {
        "protocols": ("from services import connect", "protocols/ imports nothing"),
        "kernel": ("from services import get_logger", "the kernel imports only"),
        "services/scheduler": ("from services.modelstore._service import x", "a private module"),
        "tools": ("from services.telemetry._outbox import Outbox", "a private module"),
        "services/telemetry": ("import services.modelstore", "are peers"),
    }
    for where, (code, expected) in cases.items():
        probe = ROOT / where / "_layer_probe.py"
        probe.write_text(code + "\n")
        try:
            bad = [b for b in _violations() if "_layer_probe" in b]
        finally:
            probe.unlink()
        assert any(expected in b for b in bad), (where, code, bad)
