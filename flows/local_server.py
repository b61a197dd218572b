"""The machine's own Prefect server, run in the background so that history and the UI persist between commands.

Its state (pid, port) lives in a project-owned home, ``$AVATAR_BATCH_STATE`` or ``~/.avatar-batch``, beside its
SQLite database; telemetry is off. Every `avatar-batch` command uses it while it answers and no PREFECT_API_URL
is set; without it, commands still work (Prefect then starts a temporary server per command).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 4200


@dataclass(frozen=True)
class LocalServer:
    pid: int
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def home() -> Path:
    return Path(os.environ.get("AVATAR_BATCH_STATE") or Path.home() / ".avatar-batch")


def _state_file() -> Path:
    return home() / "server.json"


def answers(api_url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def running() -> LocalServer | None:
    """The background server when it is up and answers, else None (a stale state file is removed)."""
    try:
        server = LocalServer(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if answers(server.api_url):
        return server
    try:
        os.kill(server.pid, 0)
    except ProcessLookupError:
        _state_file().unlink(missing_ok=True)
    return None


def start(port: int = DEFAULT_PORT, timeout_s: float = 120.0) -> LocalServer:
    """Start the server in the background (or return the one already up) and wait until it answers."""
    current = running()
    if current is not None:
        return current
    root = home()
    (root / "prefect").mkdir(parents=True, exist_ok=True)
    # the database is named, not inherited: the launching command may carry the URL of its own temporary
    # database, which it deletes when it exits (the server would then lose every new connection and, on a
    # restart, its history)
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect' / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    with open(root / "server.log", "ab") as log:
        process = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                    "127.0.0.1", "--port", str(port)], env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LocalServer(process.pid, port)
    deadline = time.monotonic() + timeout_s
    while not answers(server.api_url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process.pid)
            raise RuntimeError(f"the Prefect server did not start on port {port}; see {root / 'server.log'}")
        time.sleep(0.5)
    _state_file().write_text(json.dumps({"pid": server.pid, "port": server.port}))
    return server


def stop_process(pid: int) -> None:
    """SIGTERM the process group of ``pid`` (started with ``start_new_session``), SIGKILL it after 15 s: a
    `prefect worker` answers SIGTERM with a SIGINT to itself, which does nothing where SIGINT is ignored (a
    background job of a non-interactive shell)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(60):
        try:
            os.waitpid(pid, os.WNOHANG)  # a child of this process lingers as a zombie until it is reaped
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)
    os.killpg(pid, signal.SIGKILL)


def stop() -> LocalServer | None:
    """Stop the background server; return what was stopped (None when none was running)."""
    try:
        server = LocalServer(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    stop_process(server.pid)
    _state_file().unlink(missing_ok=True)
    return server
