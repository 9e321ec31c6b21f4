"""A real headless Chromium, driven over the W3C WebDriver protocol (chromedriver).

WebDriver is JSON over HTTP, so httpx is the whole client: no browser
download, no driver library. Chromium and chromedriver come from Debian
(packages chromium, chromium-driver).
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support.real_parts import require_tools

PACKAGES = "chromium chromium-driver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver element key

# Flags for a headless browser on a machine whose only network is loopback.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=1000,800",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class HeadlessChromium:
    """One browser session: open pages, fill fields, click, read, screenshot."""

    def __init__(self, driver_url: str, profile_dir: str) -> None:
        self.http = httpx.Client(base_url=driver_url, timeout=60.0)
        capabilities = {
            "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": shutil.which("chromium") or "/usr/bin/chromium",
                    "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile_dir}"],
                },
            }
        }
        session = self._call("POST", "/session", {"capabilities": capabilities})
        self.session = f"/session/{session['sessionId']}"
        self._call("POST", f"{self.session}/timeouts", {"implicit": 15000, "pageLoad": 30000})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.http.request(method, path, json=body if method == "POST" else None)
        value = response.json().get("value")
        if response.status_code >= 400:
            raise AssertionError(f"WebDriver {method} {path}: {value}")
        return value

    def open(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def find(self, css: str) -> str:
        found = self._call(
            "POST", f"{self.session}/element", {"using": "css selector", "value": css}
        )
        return str(found[ELEMENT])

    def type(self, css: str, text: str) -> None:
        self._call("POST", f"{self.session}/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self._call("POST", f"{self.session}/element/{self.find(css)}/click", {})

    @property
    def url(self) -> str:
        return str(self._call("GET", f"{self.session}/url"))

    @property
    def text(self) -> str:
        body = self.find("body")
        return str(self._call("GET", f"{self.session}/element/{body}/text"))

    def wait_for_text(self, fragment: str, timeout: float = 30.0) -> str:
        """The page text once it contains ``fragment`` (the page changes as the login goes)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.text
            except AssertionError as exc:
                # The page navigated between finding <body> and reading it: read again.
                if "does not belong to the document" not in str(exc) and "stale" not in str(exc):
                    raise
                text = ""
            if fragment in text or time.monotonic() > deadline:
                return text

    def screenshot(self, path: str) -> None:
        png = self._call("GET", f"{self.session}/screenshot")
        with open(path, "wb") as file:
            file.write(base64.b64decode(png))

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        finally:
            self.http.close()


@pytest.fixture
def chromium() -> Iterator[HeadlessChromium]:
    require_tools(("chromium", "chromedriver"), PACKAGES, "for the browser login")
    port = _free_port()
    driver = subprocess.Popen(
        ["chromedriver", f"--port={port}", "--allowed-ips=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    profile = tempfile.mkdtemp(prefix="cz-chromium-")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # chromedriver's readiness: its /status answers
            try:
                if httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or driver.poll() is not None:
                pytest.fail("chromedriver did not start")
        browser = HeadlessChromium(url, profile)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        driver.terminate()
        driver.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
