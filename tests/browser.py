"""A minimal headless-Chromium driver over the DevTools protocol (aiohttp websocket; no extra packages).

Used by tests that check rendered pages. Chromium comes from Debian's `chromium` package
(scripts/test.sh installs it when apt-get is available).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """``load(url)`` then ``evaluate(js)`` / ``screenshot()``; ``errors`` collects console and load errors."""

    def __init__(self, width: int = 1100, height: int = 900):
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium not found (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.time() + 30
        while time.time() < deadline and port is None:
            line = self.proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
        if port is None:
            self.close()
            raise RuntimeError("chromium did not start its DevTools endpoint in 30 s")
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        self.ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ws = self._session = None
        self._id = 0
        self._events: list[str] = []
        self._loop.run_until_complete(self._connect())

    async def _connect(self):
        import aiohttp

        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.ws_url, max_msg_size=64 * 2**20)
        for m in ("Page.enable", "Runtime.enable", "Log.enable"):
            await self._call(m)

    async def _call(self, method: str, params: dict | None = None, wait_event: str | None = None, timeout=60):
        self._id += 1
        my = self._id
        await self._ws.send_str(json.dumps({"id": my, "method": method, "params": params or {}}))
        result, seen_event = None, wait_event is None
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads((await self._ws.receive(timeout=timeout)).data)
            ev = msg.get("method")
            if ev == "Runtime.exceptionThrown":
                self.errors.append(msg["params"]["exceptionDetails"].get("text", "exception"))
            elif ev == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
                self.errors.append(msg["params"]["entry"]["text"])
            elif ev == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
                self.errors.append(str(msg["params"]["args"]))
            elif ev == wait_event:
                seen_event = True
            elif ev:
                self._events.append(ev)
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result = msg["result"]
            if result is not None and seen_event:
                return result
        raise TimeoutError(f"{method} did not finish in {timeout} s")

    async def _navigate(self, url: str, timeout: float):
        self._events.clear()
        r = await self._call("Page.navigate", {"url": url}, timeout=timeout)
        if r.get("errorText"):
            self.errors.append(f"navigation: {r['errorText']}")
        elif r.get("loaderId") and "Page.loadEventFired" not in self._events:
            # a new document: wait for its load event (a change of #fragment loads nothing)
            await self._call("Runtime.evaluate", {"expression": "1"}, "Page.loadEventFired", timeout)

    def set_headers(self, headers: dict[str, str]) -> None:
        """Send these HTTP headers with every request of the page (e.g. Authorization for basic auth)."""
        self._loop.run_until_complete(self._call("Network.enable"))
        self._loop.run_until_complete(self._call("Network.setExtraHTTPHeaders", {"headers": headers}))

    def load(self, url: str, timeout: float = 60) -> None:
        self._loop.run_until_complete(self._navigate(url, timeout))

    def wait_for(self, js: str, timeout: float = 60) -> object:
        """Poll a JavaScript expression until it is truthy (for pages that render after load)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.evaluate(js)
            if v:
                return v
            time.sleep(0.5)
        raise TimeoutError(f"{js!r} stayed false for {timeout} s")

    def evaluate(self, js: str) -> object:
        r = self._loop.run_until_complete(self._call("Runtime.evaluate", {"expression": js, "returnByValue": True}))
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def screenshot(self, path) -> bytes:
        r = self._loop.run_until_complete(self._call("Page.captureScreenshot", {"format": "png"}))
        data = base64.b64decode(r["data"])
        if path:
            with open(path, "wb") as f:
                f.write(data)
        return data

    def close(self) -> None:
        try:
            if self._ws is not None:
                self._loop.run_until_complete(self._ws.close())
                self._loop.run_until_complete(self._session.close())
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self._profile, ignore_errors=True)
            self._loop.close()
