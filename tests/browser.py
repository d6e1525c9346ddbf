"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

No websocket, no driver download, no Python dependency: Chromium reads protocol commands from fd 3
and writes replies and events to fd 4, NUL-separated JSON. Used by the browser tests and by
``bench/viewer.py``. Chromium comes from the distribution's package (``apt-get install chromium``;
``.ci/run`` installs it); ``SYNTHBRAIN_CHROMIUM`` names another binary.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["BrowserError", "Chromium", "find_chromium"]


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The Chromium binary: ``$SYNTHBRAIN_CHROMIUM``, Debian's ``/usr/lib/chromium/chromium`` (the
    real binary behind the ``/usr/bin/chromium`` wrapper script), else ``chromium`` / ``chromium-browser``
    / ``google-chrome`` on PATH."""
    env = os.environ.get("SYNTHBRAIN_CHROMIUM")
    if env:
        return env
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _high_fd(fd: int) -> int:
    """``fd`` moved to a number ≥ 10 (close-on-exec), so the child's dup2 onto 3 and 4 cannot clobber it."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Chromium:
    """One headless browser with one page. Use as a context manager; ``close()`` ends the browser's
    process group (started in its own session).

    Records, for the page: every request URL (``requests``), console errors, uncaught exceptions and
    error log entries (``errors``).
    """

    def __init__(self, width: int = 1280, height: int = 1000, binary: str | None = None, timeout: float = 60):
        binary = binary or find_chromium()
        if not binary:
            raise BrowserError("no Chromium found (apt-get install chromium, or set SYNTHBRAIN_CHROMIUM)")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="synthbrain-chromium-")
        cmd_r, cmd_w = (_high_fd(f) for f in os.pipe())
        resp_r, resp_w = (_high_fd(f) for f in os.pipe())

        def child() -> None:  # runs in the child before exec: fd 3 = commands in, fd 4 = replies out
            os.dup2(cmd_r, 3)
            os.dup2(resp_w, 4)

        args = [
            binary,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root
            "--use-angle=swiftshader",  # WebGL2 in software: no GPU on CI machines
            "--enable-unsafe-swiftshader",
            "--ignore-gpu-blocklist",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing resolves: a page that needs the network fails
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            preexec_fn=child,
            close_fds=False,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(resp_w)
        self._w = os.fdopen(cmd_w, "wb", buffering=0)
        self._r = os.fdopen(resp_r, "rb", buffering=0)
        self._next = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self.events: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.errors: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""
        try:
            self.session = self._attach()
        except BaseException:
            self.close()  # no browser left behind when it starts but does not answer
            raise

    # -- protocol -----------------------------------------------------------------------------------
    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._r.read(1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self._event(msg)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _event(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        m, p = msg.get("method"), msg.get("params", {})
        if m == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append(
                "console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
            )
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            self.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one command and wait for its reply; returns ``result`` or raises :class:`BrowserError`."""
        with self._cond:
            self._next += 1
            mid = self._next
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self._w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise BrowserError(f"{method}: no reply (browser exit code {self.proc.poll()})")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _attach(self) -> str:
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        tid = (
            page["targetId"]
            if page
            else self.send("Target.createTarget", {"url": "about:blank"}, False)["targetId"]
        )
        sid = self.send("Target.attachToTarget", {"targetId": tid, "flatten": True}, session=False)[
            "sessionId"
        ]
        self.session = sid
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")
        return sid

    # -- page -------------------------------------------------------------------------------------------
    def open(self, url: str | Path) -> None:
        """Navigate to ``url`` (a path becomes a ``file://`` URL) and wait for the load event."""
        if isinstance(url, Path) or not str(url).startswith(("file:", "http:", "https:", "about:", "data:")):
            url = Path(url).resolve().as_uri()
        n = len(self.events)
        self.send("Page.navigate", {"url": str(url)})
        self.wait_event("Page.loadEventFired", start=n)

    def wait_event(self, method: str, start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                for ev in self.events[start:]:
                    if ev.get("method") == method:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"timed out waiting for {method}")
                self._cond.wait(min(left, 0.5))

    def eval(self, expression: str, await_promise: bool = True) -> Any:
        """Evaluate JavaScript in the page (promises awaited); returns its JSON value."""
        r = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": await_promise, "returnByValue": True},
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(
                f"{expression[:80]!r}: {d.get('exception', {}).get('description', d.get('text'))}"
            )
        return r["result"].get("value")

    def screenshot(self, selector: str | None = None) -> bytes:
        """PNG of the viewport, or of the element ``selector`` (its bounding box)."""
        params: dict[str, Any] = {"format": "png"}
        if selector:
            box = self.eval(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                " return [r.x + window.scrollX, r.y + window.scrollY, r.width, r.height]; })()"
            )
            params["clip"] = {"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1}
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", session=False)
                self.proc.wait(timeout=10)
            except (BrowserError, OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        else:  # helper processes (zygote, GPU) left in the group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for f in (self._w, self._r):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
