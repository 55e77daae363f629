"""Headless Chromium for the report's tests: Debian's `chromium` through its `chromedriver`,
driven by Selenium (installed by `make test` as root, like the SLURM packages)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

BROWSER = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
MISSING = [
    name
    for name, found in (
        ("chromium", BROWSER),
        ("chromedriver (Debian's chromium-driver)", DRIVER),
        ("selenium", importlib.util.find_spec("selenium")),
    )
    if not found
]
needs_chromium = pytest.mark.skipif(
    bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (`make test` installs them as root)"
)
# screenshots of the report's pages, kept after the tests for a person to look at
ARTIFACTS = Path(os.environ.get("NEUROSCRIBE_TEST_ARTIFACTS", REPO / "test-artifacts"))


def chrome() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1400"):
        options.add_argument(flag)
    options.binary_location = BROWSER
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def open_page(driver: Any, path: Path) -> None:
    """Load a report page from file:// and every image on it, lazy ones included."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.resolve().as_uri())
    driver.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return [...document.images].every(i => i.complete)")
    )


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def broken_images(driver: Any) -> list[str]:
    return driver.execute_script(
        "return [...document.images].filter(i => !i.naturalWidth).map(i => i.src)"
    )


def screenshot(driver: Any, name: str) -> Path:
    """The whole page as a PNG under test-artifacts/report/."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1300, min(max(height, 800), 6000))
    path = ARTIFACTS / "report" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
