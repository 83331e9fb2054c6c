"""``python -m device run`` as a real child process, shared by the device and reliability suites."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def device_env(notify: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET", "LEUKOSCREEN_CONFIG")}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    env["PYTHONUNBUFFERED"] = "1"
    return env


SHOWN = re.compile(r"device\.service: field (\d+) ")
PAGE = re.compile(r"status page on (http://\S+?)/?$")


class DeviceProc:
    """``python -m device run`` as a real process, its log lines collected as they come."""

    def __init__(self, config: Path, notify: Path | None = None):
        self.p = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(config)], cwd=ROOT,
                                  env=device_env(notify), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line.rstrip("\n"))

    def shown_ids(self) -> list[int]:
        """Results the process published (its log line follows the durable commit and the LED update)."""
        return [int(m.group(1)) for line in list(self.lines) if (m := SHOWN.search(line))]

    def url(self) -> str | None:
        for line in list(self.lines):
            m = PAGE.search(line)
            if m:
                return m.group(1)
        return None

    def kill(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        return self.finish()

    def finish(self, timeout: float = 30) -> int:
        code = self.p.wait(timeout)
        self._t.join(5)
        return code

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.lines[-n:])
