"""The package layers import only downwards: kernels <- core <- integrations <- evals / training.

Read from the source (imports, including those inside functions), so a lazy upward import is caught too. Two
entry points are exempt: the command line (``dynts/cli.py``), which names the upper layers' command modules, and the
package's front door (``dynts/__init__.py``), which loads ``DynTSCache`` on first use so that
``from dynts import DynTSCache`` works."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the dynts subpackages its modules must not import
FORBIDDEN = {
    "kernels": ("dynts.integrations", "dynts.evals", "dynts.training", "dynts.scorers", "dynts.policy", "dynts.slots",
                "dynts.storage", "dynts.compressor", "dynts.tracking", "dynts.config", "dynts.predictor"),
    "dynts": ("dynts.integrations", "dynts.evals", "dynts.training"),
    "integrations": ("dynts.evals", "dynts.training"),
}
PACKAGE_OF = {"kernels": "dynts.kernels", "dynts": "dynts", "integrations": "dynts.integrations"}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    module_package = package + "." + ".".join(path.parent.relative_to(ROOT / path.relative_to(ROOT).parts[0]).parts)
    module_package = module_package.rstrip(".")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_upward_imports(folder: str) -> None:
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path in (ROOT / "dynts" / "cli.py", ROOT / "dynts" / "__init__.py"):
            continue
        for name in _imports(path, PACKAGE_OF[folder]):
            if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[folder]):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_relative_and_lazy_imports(tmp_path) -> None:
    probe = ROOT / "dynts" / "scorers" / "_layering_probe.py"
    probe.write_text("def f():\n    from ..integrations import hf\n    import dynts.evals.harness\n")
    try:
        assert {"dynts.integrations", "dynts.evals.harness"} <= _imports(probe, "dynts")
    finally:
        probe.unlink()
