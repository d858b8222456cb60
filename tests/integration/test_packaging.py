"""
The distribution as a non-editable install lays it out: the twistd plugin
found by Twisted's plugin scan, the web app's templates and static files
shipped.

The editable install the tests run from is covered by
C{tests/unit/test_tap.py::test_plugin_is_discoverable}. Here the project is
built with setuptools' C{build} command (what C{pip install .} runs, minus
the wheel) into a directory of its own, and a Python that does not read
C{.pth} files (C{-S}: no editable install on its path) runs C{twistd} from
there.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]

#: What the web app serves from its package.
WEB_FILES = [
    "templates/layout.xml",
    "static/favicon.ico",
    "static/css/rq.css",
    "static/js/rq.js",
    "static/js/queue.js",
    "static/js/home.js",
    "static/js/tailview.js",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """
    The project built from a copy of its sources: the build's library
    directory and the build's standard error.
    """
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(
        PROJECT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    result = subprocess.run(
        [sys.executable, "setup.py", "build", "--build-base", str(base / "build")],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return base / "build" / "lib", result.stderr


def _python(lib: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """
    Run C{code} with the built library first on the path, then the
    dependencies' site-packages, and no C{.pth} file read.
    """
    path = [str(lib), *site.getsitepackages()]
    prelude = f"import sys; sys.path[:0] = {path!r}\n"
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_twistd_lists_the_plugin_of_the_installed_package(built: tuple[Path, str], tmp_path: Path) -> None:
    """
    C{twistd --help} lists C{rq}, and C{rq} comes from the built copy, not
    from the source tree.
    """
    lib, _ = built
    result = _python(
        lib,
        "import rqtwisted; print('from', rqtwisted.__file__)\n"
        "sys.argv = ['twistd', '--help']\n"
        "from twisted.scripts.twistd import run\n"
        "run()\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"from {lib}" in result.stdout
    assert any(line.split()[:1] == ["rq"] for line in result.stdout.splitlines()), result.stdout


def test_twistd_rq_takes_its_options(built: tuple[Path, str], tmp_path: Path) -> None:
    """
    C{twistd rq --help} shows the plugin's own options.
    """
    lib, _ = built
    result = _python(
        lib,
        "sys.argv = ['twistd', 'rq', '--help']\nfrom twisted.scripts.twistd import run\nrun()\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--root", "--host", "--port", "--addr", "--env"):
        assert option in result.stdout


@pytest.mark.parametrize("name", WEB_FILES)
def test_the_web_files_are_shipped(built: tuple[Path, str], name: str) -> None:
    """
    Every template and static file of the web app is in the built package,
    the same as in the source tree.
    """
    lib, _ = built
    shipped = lib / "rqtwisted" / "web" / name
    assert shipped.read_bytes() == (PROJECT / "web" / name).read_bytes()


def test_every_web_file_is_listed_here(built: tuple[Path, str]) -> None:
    """
    The list above covers the web app's data files, so a new one is
    checked too.
    """
    web = PROJECT / "web"
    data = sorted(
        str(p.relative_to(web))
        for p in web.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    )
    assert data == sorted(WEB_FILES)


def test_the_build_has_no_deprecated_package_data(built: tuple[Path, str]) -> None:
    """
    Setuptools does not warn that a data directory would be dropped by a
    later version (each is listed as a package of its own).
    """
    _, stderr = built
    assert "would be ignored" not in stderr
    assert "as data is deprecated" not in stderr
