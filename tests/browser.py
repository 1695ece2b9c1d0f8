"""Headless Chromium for the tests that look at a page as a person would (the serve chat page, the MLflow UI).

Playwright drives Debian's own `chromium` (`apt-get install chromium`; .ci/run installs it): Playwright's
browser downloads are never used, so `playwright install` is never needed. Without a local chromium the
browser tests skip, except under CI (env CI set, as the CI runner does), where a skip would hide that the
install step broke, so there they fail. The conftest fixtures `chromium_browser` and `chromium_page` are the
way in; this module is what they share.

Pages that load scripts from a CDN (the HTML of `dvc plots diff` loads vega, vega-lite and vega-embed from
jsdelivr) get them from the npm registry through npm instead (`serve_cdn_scripts`): these machines reach the
npm registry, and no CDN.

Not a test module (like tiny_models.py): conftest imports it through `pythonpath = ["tests"]`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CANDIDATES = ("chromium", "chromium-browser")
"""Debian's and Ubuntu's names of the Chromium binary, looked up on PATH."""


def chromium_executable() -> str:
    """The local Chromium binary: $LMPIPE_CHROMIUM, else the first of CANDIDATES on PATH. Skips the test when
    there is none, or fails it under CI (where the browser tests must run)."""
    found = os.environ.get("LMPIPE_CHROMIUM") or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if found:
        return found
    missing("no chromium binary on PATH (apt-get install chromium, or set LMPIPE_CHROMIUM)")


def missing(message: str, tests: str = "the browser tests") -> None:
    """A browser test (or another of `tests` that needs a system program) cannot run here: skip it, or fail it
    under CI, where a skip would hide a broken install."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run {tests} (.ci/run installs what they need)", pytrace=False)
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


JSDELIVR_NPM = "https://cdn.jsdelivr.net/npm/"
"""Where a page's `<script src>` names an npm package, `<name>@<version>`, to get the file jsdelivr serves."""


def npm_script(spec: str, into: Path) -> Path:
    """The script jsdelivr serves for the npm package `spec` (`name@version`: its package.json's `jsdelivr`,
    else `unpkg`, else `main` file), taken from the npm registry by `npm pack` into `into` (npm's own cache makes
    later runs offline). Skips without npm (fails under CI)."""
    npm = shutil.which("npm")
    if npm is None:
        missing(f"no npm on PATH to fetch {spec} (apt-get install npm)")
    proc = subprocess.run(
        [npm, "pack", "--silent", "--pack-destination", str(into), spec],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"npm pack {spec} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    with tarfile.open(into / proc.stdout.split()[-1]) as tar:
        meta = json.load(tar.extractfile("package/package.json"))
        entry = meta.get("jsdelivr") or meta.get("unpkg") or meta["main"]
        script = into / (re.sub(r"[^\w.@-]", "_", spec) + ".js")
        script.write_bytes(tar.extractfile(f"package/{entry.removeprefix('./')}").read())
    return script


def serve_cdn_scripts(page: Page, html: str, into: Path) -> list[str]:
    """Answer `page`'s requests for the jsdelivr npm scripts that `html` loads with the same files from the npm
    registry (`npm_script`, kept in `into`); any other jsdelivr request is refused. Returns the packages."""
    specs = re.findall(rf'<script[^>]*src="{re.escape(JSDELIVR_NPM)}([^"]+)"', html)
    scripts = {JSDELIVR_NPM + spec: npm_script(spec, into) for spec in specs}

    def answer(route):
        script = scripts.get(route.request.url)
        if script is None:
            route.abort()
        else:
            route.fulfill(path=script, content_type="application/javascript")

    page.route(f"{JSDELIVR_NPM}**", answer)
    return specs
