"""Headless Chromium for the browser tests: Debian's browser and driver through selenium, never a download.

Both browser tests (tests/test_web_browser.py, tests/test_notebooks_browser.py)
start the browser here: the system chromedriver through selenium's Service (the
selenium manager stays offline), headless, no background networking, a fresh
user-data-dir. Where Chromium is missing the calling test is skipped with the
command that installs it.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver fonts-noto-cjk"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_chromium() -> None:
    """Skip the calling test, saying how to install them, where Chromium or its driver is missing."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"the browser test needs Debian's Chromium and its driver: {INSTALL}")


def chromium(width: int = 1400, height: int = 1000, network_log: bool = False, console_log: bool = False):
    """A headless Chromium (a selenium driver) with a window of width x height; skips the test where it is missing."""
    require_chromium()
    os.environ["SE_OFFLINE"] = "true"  # selenium manager stays offline (it is not even needed: the paths are given)
    from selenium import webdriver  # optional: only the browser tests need selenium
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={width},{height}",
                 "--lang=en-US", f"--user-data-dir={tempfile.mkdtemp(prefix='wb-chromium-')}"):
        opts.add_argument(flag)
    prefs = {**({"performance": "ALL"} if network_log else {}),  # to list the page's requests
             **({"browser": "ALL"} if console_log else {})}  # to read the page's console (driver.get_log("browser"))
    if prefs:
        opts.set_capability("goog:loggingPrefs", prefs)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
