"""Headless Chromium for the tests that look at a page as a person would (the serve chat page, the MLflow UI).

Playwright drives Debian's own `chromium` (`apt-get install chromium`; .ci/run installs it): Playwright's
browser downloads are never used, so `playwright install` is never needed. Without a local chromium the
browser tests skip, except under CI (env CI set, as the CI runner does), where a skip would hide that the
install step broke, so there they fail. The conftest fixtures `chromium_browser` and `chromium_page` are the
way in; this module is what they share.

Not a test module (like tiny_models.py): conftest imports it through `pythonpath = ["tests"]`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CANDIDATES = ("chromium", "chromium-browser")
"""Debian's and Ubuntu's names of the Chromium binary, looked up on PATH."""


def chromium_executable() -> str:
    """The local Chromium binary: $LMPIPE_CHROMIUM, else the first of CANDIDATES on PATH. Skips the test when
    there is none, or fails it under CI (where the browser tests must run)."""
    found = os.environ.get("LMPIPE_CHROMIUM") or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if found:
        return found
    message = "no chromium binary on PATH (apt-get install chromium, or set LMPIPE_CHROMIUM)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run the browser tests (.ci/run installs chromium)", pytrace=False)
    pytest.skip(message)


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium driven by Playwright. As root (CI, these machines), Chromium refuses to start
    without --no-sandbox."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()
