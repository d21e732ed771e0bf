"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, for the page test and its screenshot.

`scripts/install-browser.sh` installs both (make test runs it). The flags keep Chromium from reaching out to
the network at start (these machines are offline) and let it run as root in a container.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from selenium import webdriver

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,900",
)


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) executables on PATH, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(profile: Path) -> webdriver.Chrome:
    """A headless Chromium with a fresh profile folder; raise RuntimeError naming the fix when it is missing."""
    found = find_chromium()
    if found is None:
        raise RuntimeError("Chromium and ChromeDriver are not installed: run scripts/install-browser.sh")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
