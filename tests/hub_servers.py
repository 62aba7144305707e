"""Loopback servers for the Hub tests: the test Hub (uploads, ``hub_server.py``)
and ``olah`` (reads from plain git repositories). Both bind 127.0.0.1, start
as child processes of the test, and are stopped by PID.

Nothing here reaches the real Hub: every call passes ``endpoint=`` explicitly,
and :func:`isolate_hub_client` points the client's default endpoint at a
closed loopback port, disables Xet and keeps the cache in a temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TOKEN = "kp-test-write-token"
CLOSED_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens there


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a server we started, by its PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


class LoopbackHub:
    """A running ``tests/hub_server.py``: its URL, token and what it holds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "hub_server.py"), "--root", str(root), "--token", TOKEN],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            stop(self.proc)
            raise RuntimeError(f"test Hub server did not start: {line!r}")
        self.url = line.split("listening on", 1)[1].strip()
        self.token = TOKEN

    def received(self) -> list:
        """Every request the server got so far (method, path, authorized, body file)."""
        path = self.root / "received.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def repo_state(self, repo_id: str) -> dict | None:
        path = self.root / "repos.json"
        return json.loads(path.read_text()).get(repo_id) if path.exists() else None

    def head_files(self, repo_id: str, branch: str = "main") -> dict:
        repo = self.repo_state(repo_id)
        return repo["commits"][repo["branches"][branch]]["files"]


class Olah:
    """A running olah mirror serving git repositories under ``mirrors/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.mirrors.mkdir(parents=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = root / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'repos-path = "{root / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'mirror-netloc = "127.0.0.1:{port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
            "[accessibility]\n"
            "offline = true\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(root / "logs")],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def add_repo(self, repo_id: str, files: dict) -> Path:
        """A plain git repository at ``mirrors/models/<org>/<name>`` holding
        ``files`` (name -> bytes or a local path), committed on ``main``."""
        path = self.mirrors / "models" / repo_id
        path.mkdir(parents=True)
        for name, content in files.items():
            data = Path(content).read_bytes() if isinstance(content, (str, Path)) else content
            (path / name).write_bytes(data)
        git = ["git", "-c", "user.name=kp-test", "-c", "user.email=kp@test", "-c", "init.defaultBranch=main"]
        subprocess.run(git + ["init", "-q", "-b", "main"], cwd=path, check=True)
        subprocess.run(git + ["add", "-A"], cwd=path, check=True)
        subprocess.run(git + ["commit", "-q", "-m", "add files"], cwd=path, check=True)
        return path

    def wait_until_serving(self, repo_id: str, timeout: float = 30.0) -> None:
        """Wait until ``/api/models/<repo_id>/revision/main`` answers."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        url = f"{self.url}/api/models/{repo_id}/revision/main"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("olah exited during start-up")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"olah did not serve {url} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def test_hub(tmp_path_factory):
    hub = LoopbackHub(tmp_path_factory.mktemp("test-hub"))
    yield hub
    stop(hub.proc)


@pytest.fixture(scope="session")
def olah_mirror(tmp_path_factory):
    olah = Olah(tmp_path_factory.mktemp("olah"))
    try:
        olah.add_repo("kp-test/ready", {"README.md": b"olah start-up probe\n"})
        olah.wait_until_serving("kp-test/ready")
        yield olah
    finally:
        stop(olah.proc)


@pytest.fixture
def isolate_hub_client(monkeypatch, tmp_path):
    """The client's defaults point nowhere real: no Xet, a closed loopback
    endpoint, a temporary cache; returns the cache folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # hf_hub_url swaps endpoint= in only where the template starts with ENDPOINT.
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_ENDPOINT)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_ENDPOINT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
