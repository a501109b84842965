"""Every non-Python source the package compiles at run time (C++ kernels and the op) is shipped by a regular,
non-editable install: pyproject's package-data globs cover each of them."""

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent


def package_folder(package: str, package_dirs: dict) -> Path:
    """Where setuptools finds ``package``: the longest ``package-dir`` prefix, then the rest as folders."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dirs:
            return ROOT / package_dirs[prefix] / "/".join(parts[cut:])
    return ROOT / "/".join(parts)


def test_package_data_ships_every_cpp_source():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    missing, seen = [], 0
    for package, patterns in config["package-data"].items():
        folder = package_folder(package, config["package-dir"])
        assert folder.is_dir(), f"package-data names {package}, but {folder} is not a folder"
        for source in folder.rglob("*"):
            if source.suffix not in (".cpp", ".h"):
                continue
            seen += 1
            relative = source.relative_to(folder).as_posix()
            if not any(fnmatch.fnmatch(relative, pattern) and relative.count("/") == pattern.count("/")
                       for pattern in patterns):  # fmt: skip
                missing.append(f"{package}: {relative}")
    assert seen, "no C++ source found: the check looked in the wrong folders"
    assert not missing, f"sources a regular install would not ship: {missing}"


def test_every_python_package_is_listed():
    """A folder with an ``__init__.py`` that ``packages`` does not list is left out of a regular install."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found >= {"qcompile", "qcompile.runtime"}, found
    assert not found - listed, f"packages a regular install would leave out: {sorted(found - listed)}"


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (no packages under tests/): two files of one name collide."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) > 10
    assert not sorted({n for n in names if names.count(n) > 1})
