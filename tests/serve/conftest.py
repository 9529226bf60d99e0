"""Helpers for the tests that run `ligero serve` for real: a subprocess on a loopback port, polled on GET /health
until it answers, and killed at the end of the test module (also when a test or the start itself fails)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 120  # loading a model (and quantizing int4) takes seconds; a cold cache converts the GGUF first
STOP_TIMEOUT_S = 15


@pytest.fixture(scope="session")
def postgres_schema():
    """A context manager: postgres_schema(url, prefix) -> the url in a new schema, dropped on exit."""
    return in_new_schema


@contextmanager
def in_new_schema(url: str, prefix: str) -> Iterator[str]:
    """`url` with its search_path set to a new schema (dropped on exit): a test touches nothing else in the
    database, nor the schema of a test run beside it."""
    from sqlalchemy import create_engine, make_url, text

    from ligero.serve import store as st

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(st._parse_url(url))
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield (make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
               .render_as_string(hide_password=False))
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """One `ligero serve` subprocess; its output (stdout and stderr) goes to `log`."""

    args: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    port: int = 0
    log_offset: int = 0
    proc: subprocess.Popen | None = None
    health: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self) -> None:
        self.port = free_port()
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        cmd = [sys.executable, "-m", "ligero.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *self.args]
        with self.log.open("ab") as out:
            shown = re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", " ".join(cmd))  # no store password in logs
            out.write(f"$ {shown}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll GET /health until 200; fail (with the server's log) when the process exits or time runs out."""
        deadline, restarts = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                this_run = self.log.read_bytes()[self.log_offset:].decode(errors="replace").lower()
                if "address already in use" in this_run and restarts < 3:
                    restarts += 1  # another process took the free port between our check and the bind
                    self.start()
                    continue
                raise RuntimeError(f"ligero serve exited with code {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    self.health = r.json()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"ligero serve did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down, engines and store close), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment, minus anything that would change the server's behaviour unasked."""
    env = {k: v for k, v in os.environ.items() if k != "LIGERO_API_KEYS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """start(*serve_args, env=None, wait=True) -> ServerProcess; every server it started is stopped when the module
    ends. With wait=False call .wait_ready() yourself (to start several servers at once)."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        folder = tmp_path_factory.mktemp("serve-proc")
        server = ServerProcess(list(args), server_env(env), folder, folder / "server.log")
        started.append(server)
        server.start()
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (converted from its GGUF once, cached), to check token counts."""
    from ligero.io.checkpoint import gguf_tokenizer
    from ligero.models.registry import DEFAULT_MODEL, REGISTRY

    return gguf_tokenizer(REGISTRY[DEFAULT_MODEL].locate())
