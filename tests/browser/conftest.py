"""
Browser fixtures: headless Chromium (the distribution's C{/usr/bin/chromium})
driven by Playwright's Python client, and the real daemon of the integration
tests.

  - C{browser}: one Chromium for the session, with a fresh profile.
  - C{page}: a new tab per test (closed afterwards); console errors of the
    page scripts fail the test.
  - C{daemon}: a started integration L{Daemon} (see
    C{tests/integration/conftest.py}).
  - C{shots}: saves screenshots under the test's temporary directory.

The tests are skipped, with the reason, when Chromium or Playwright is not
installed. Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# The integration tests' daemon fixture, for the pages to talk to.
from tests.integration.conftest import Daemon, daemon  # noqa: F401

CHROMIUM = Path(os.environ.get("RQ_TEST_CHROMIUM", "/usr/bin/chromium"))

#: Flags for a quiet, offline, throw-away headless Chromium.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

STATIC = Path(__file__).resolve().parents[2] / "web" / "static"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives headless Chromium (Debian's chromium package)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """
    Mark every test here C{browser}; skip them all when the browser or its
    driver is missing.
    """
    here = Path(__file__).parent
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (install the Debian package chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright Python package is not installed (pip install -e '.[test]')"
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """
    Attach the daemon log, and where the screenshots are, to the report of
    a failing test.
    """
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    running = funcargs.get("daemon")
    if isinstance(running, Daemon):
        report.sections.append(("rq daemon log", running.log_text()))
    tmp = funcargs.get("tmp_path")
    if isinstance(tmp, Path) and (tmp / "shots").is_dir():
        report.sections.append(("screenshots", str(tmp / "shots")))


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """
    A headless Chromium with a fresh user-data dir (a persistent context).
    """
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
            env={**os.environ, "HOME": str(profile)},
        )
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """
    A new tab; uncaught errors of its scripts fail the test.
    """
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.set_default_timeout(15_000)
    try:
        yield tab
    finally:
        tab.close()
    assert errors == [], f"script errors in the page: {errors}"


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[Any, str], Path]:
    """
    C{shots(page, name)}: a full-page screenshot C{<tmp_path>/shots/<name>.png}.
    """
    folder = tmp_path / "shots"
    folder.mkdir(exist_ok=True)

    def take(tab: Any, name: str) -> Path:
        path = folder / f"{name}.png"
        tab.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 0
        return path

    return take


def static_text(relative: str) -> str:
    """
    The text of a file under C{web/static/}.
    """
    return (STATIC / relative).read_text()
