"""Load a page in headless Chromium and inspect it over the DevTools protocol (no extra packages).

Chromium is started with ``--remote-debugging-pipe``: commands go in on its fd 3 and
replies come out on fd 4, as NUL-terminated JSON. :func:`inspect_page` loads a URL, waits
for the load event, and returns what :data:`PROBE` reads from the page: the title, any mark
a payload script would leave (``window.__pwned``), the script elements and inline event
handlers in the DOM, each image's load state, and the visible text.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PROBE = """JSON.stringify({
  title: document.title,
  pwned: (window.__pwned === undefined) ? null : window.__pwned,
  scripts: document.scripts.length,
  handlers: Array.from(document.querySelectorAll('*')).filter(
      e => Array.from(e.attributes).some(a => a.name.toLowerCase().startsWith('on'))).length,
  images: Array.from(document.images).map(
      i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})),
  text: document.body ? document.body.innerText : ''
})"""


def chromium_path() -> str | None:
    return shutil.which("chromium")


def _high(fd: int) -> int:
    """Move a pipe end to a descriptor >= 10 so that it cannot collide with 3 and 4."""
    h = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return h


class _Browser:
    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="jaxinf-chromium-")
        to_r, self.to_w = map(_high, os.pipe())
        self.from_r, from_w = map(_high, os.pipe())
        cmd = " ".join([exe, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"])
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {cmd} 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-"],
            pass_fds=(to_r, from_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_r)
        os.close(from_w)
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        end = time.time() + timeout
        while True:
            m = self._recv(end)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        end = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method and e.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._recv(end))

    def _recv(self, end: float) -> dict:
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.from_r], [], [], max(0.0, end - time.time()))
            if not ready:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self.from_r, 1 << 16)
            if not chunk:
                raise RuntimeError(
                    "chromium closed the pipe: " + self.proc.stderr.read().decode(errors="replace")[-2000:]
                )
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        os.close(self.to_w)
        os.close(self.from_r)
        shutil.rmtree(self.profile, ignore_errors=True)


def inspect_page(
    url: str, exe: str | None = None, settle_s: float = 1.0, timeout: float = 60, steps: tuple[str, ...] = ()
) -> dict:
    """Load url in a fresh headless Chromium and return the PROBE result (a dict). ``steps``: JavaScript
    expressions evaluated in order after the load, in the page (as a user's actions would run), their JSON
    values returned under ``"steps"``."""
    b = _Browser(exe or chromium_path() or "chromium")
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        b.send("Page.enable", session=s)
        b.send("Runtime.enable", session=s)
        b.send("Page.navigate", {"url": url}, session=s)
        b.wait_event("Page.loadEventFired", s, timeout)
        time.sleep(settle_s)  # let any late handler (e.g. an img onerror) run before probing
        res = b.send("Runtime.evaluate", {"expression": PROBE, "returnByValue": True}, session=s)
        out = json.loads(res["result"]["value"])
        out["steps"] = []
        for step in steps:
            res = b.send("Runtime.evaluate", {"expression": step, "returnByValue": True}, session=s)
            if "exceptionDetails" in res:
                raise RuntimeError(f"{step[:80]}: {res['exceptionDetails']}")
            out["steps"].append(res["result"].get("value"))
        return out
    finally:
        b.close()
