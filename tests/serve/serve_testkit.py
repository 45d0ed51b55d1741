"""Helpers of the service tests: a real `everseg serve` process on a free port.

Kept out of conftest.py so test modules can import them by a name no other test folder uses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, registry: Path, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.registry = registry
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "everseg", "serve", "--registry", str(registry),
                                      "--port", str(self.port), *args],
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group: kill -9 takes the worker too
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"everseg serve exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"everseg serve did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """``kill -9`` the server and its update worker at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    @property
    def token(self) -> str:
        return (self.registry / "token").read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # whatever of its group is left (a worker mid-update)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log_file.close()
