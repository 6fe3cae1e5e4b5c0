"""The wheel's package list in pyproject.toml matches the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("server", "client", "replication", "protos/modelreg/v1")
SKIPPED_DIRS = {"__pycache__", "build"}


def _setuptools_config() -> tuple[dict[str, str], list[str]]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        config = tomllib.load(f)["tool"]["setuptools"]
    return dict(config["package-dir"]), list(config["packages"])


def _package_for(directory: Path, package_dir: dict[str, str]) -> str | None:
    """Return the import name of ``directory`` under the longest matching package-dir entry."""
    relative = directory.relative_to(ROOT)
    best: tuple[int, str] | None = None
    for package, folder in package_dir.items():
        folder_parts = Path(folder).parts
        if relative.parts[: len(folder_parts)] == folder_parts and (
            best is None or len(folder_parts) > best[0]
        ):
            rest = relative.parts[len(folder_parts) :]
            best = (len(folder_parts), ".".join((package, *rest)))
    return None if best is None else best[1]


def _directory_for(package: str, package_dir: dict[str, str]) -> Path | None:
    """Return the source directory of ``package`` via the longest matching package-dir entry."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        folder = package_dir.get(".".join(parts[:cut]))
        if folder is not None:
            return ROOT.joinpath(folder, *parts[cut:])
    return None


def _source_packages() -> dict[str, Path]:
    """Every directory with an ``__init__.py`` under the source roots, by import name."""
    package_dir, _ = _setuptools_config()
    found: dict[str, Path] = {}
    for source_root in SOURCE_ROOTS:
        for init in sorted((ROOT / source_root).rglob("__init__.py")):
            if SKIPPED_DIRS.intersection(init.relative_to(ROOT).parts):
                continue
            name = _package_for(init.parent, package_dir)
            assert name is not None, f"{init.parent} is not under any [tool.setuptools] package-dir"
            found[name] = init.parent
    return found


class TestPackaging:
    def test_every_source_package_is_in_the_wheel(self) -> None:
        """Each directory with an __init__.py is listed in packages, or the wheel would lack it."""
        _, packages = _setuptools_config()
        missing = sorted(set(_source_packages()) - set(packages))
        assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"

    @pytest.mark.parametrize("package", _setuptools_config()[1])
    def test_listed_package_exists_in_the_tree(self, package: str) -> None:
        """Each package listed in pyproject.toml maps to a source directory with an __init__.py."""
        package_dir, _ = _setuptools_config()
        directory = _directory_for(package, package_dir)
        assert directory is not None, f"{package} has no [tool.setuptools] package-dir entry"
        assert (directory / "__init__.py").is_file(), (
            f"{package} is listed in pyproject.toml but {directory.relative_to(ROOT)}/__init__.py "
            "does not exist"
        )

    def test_packages_are_listed_once(self) -> None:
        """No package is listed twice in pyproject.toml."""
        _, packages = _setuptools_config()
        assert len(packages) == len(set(packages))
