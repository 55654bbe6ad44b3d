"""A hub on 127.0.0.1 for the tests of the fetching path: the real protocol, real git commits.

olah (installed by ``setup.sh --test`` into ``build/olah``, a virtual environment of its own
because it pins other versions of pydantic than the project) serves git repositories that the
tests build under ``<root>/mirrors/{models,datasets}/<owner>/<name>``; revisions resolve to their
git commits. huggingface_hub, datasets and transformers talk to it through ``HF_ENDPOINT``.

olah knows nothing of gated repositories, so a small gate stands in front of it: for the
repositories named gated it answers as the hub does (HTTP 401 with ``X-Error-Code: GatedRepo``)
unless the request carries the expected token, and it can slow the download of chosen files so
that a test can kill a fetch midway. Everything else it passes through unchanged.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OLAH = REPO / "build" / "olah" / "bin" / "olah-cli"


class HubUnavailable(RuntimeError):
    """olah is not installed (run `bash setup.sh --test`) or did not start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def git(directory: Path, *args: str) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="canopy tests",
        GIT_AUTHOR_EMAIL="tests@canopy.invalid",
        GIT_COMMITTER_NAME="canopy tests",
        GIT_COMMITTER_EMAIL="tests@canopy.invalid",
    )
    result = subprocess.run(
        ["git", *args], cwd=directory, capture_output=True, text=True, env=env, check=True
    )
    return result.stdout.strip()


class HubServer:
    """olah behind a gate, serving the repositories under ``root / 'mirrors'``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.olah_port = free_port()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.gated: set[str] = set()
        self.token = "hf_canopy_test_token"
        self.throttle: dict[str, float] = {}  # file name -> seconds per 64 KiB chunk
        self.requests: list[str] = []
        self._olah: subprocess.Popen | None = None
        self._gate: ThreadingHTTPServer | None = None

    # -- repositories --------------------------------------------------------------------------

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.mirrors / f"{repo_type}s" / repo_id

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path],
        *,
        repo_type: str = "model",
        message: str = "update",
    ) -> str:
        """Write ``files`` (path in repo -> content or a file/folder to copy) into the repository
        on branch main, commit, and return the commit SHA."""
        directory = self.repo_dir(repo_id, repo_type)
        if not (directory / ".git").is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            git(directory, "init", "-q", "-b", "main")
        for name, content in files.items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                if content.is_dir():
                    shutil.copytree(content, target, dirs_exist_ok=True)
                else:
                    shutil.copyfile(content, target)
            else:
                target.write_bytes(content.encode() if isinstance(content, str) else content)
        git(directory, "add", "-A")
        git(directory, "commit", "-q", "--allow-empty", "-m", message)
        return git(directory, "rev-parse", "HEAD")

    # -- processes -----------------------------------------------------------------------------

    def start(self) -> None:
        if not OLAH.is_file():
            raise HubUnavailable(f"olah is not installed at {OLAH}: run `bash setup.sh --test`")
        self.mirrors.mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.olah_port}\n"
            f'repos-path = "{self.root / "olah-repos"}"\n'
            'mirror-scheme = "http"\n'
            # Links olah writes into its answers point at the gate, as the clients see it.
            f'mirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            "[accessibility]\n"
            "offline = true\n"
        )
        log = open(self.root / "olah.log", "wb")  # noqa: SIM115 - closed with the process
        self._olah = subprocess.Popen(
            [str(OLAH), "-c", str(config)],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._gate = ThreadingHTTPServer(("127.0.0.1", self.port), _gate_handler(self))
        threading.Thread(target=self._gate.serve_forever, daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._olah.poll() is not None:
                raise HubUnavailable(
                    f"olah exited ({self._olah.returncode}): {(self.root / 'olah.log').read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.olah_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise HubUnavailable("olah did not start listening within 60 s")

    def stop(self) -> None:
        if self._gate is not None:
            self._gate.shutdown()
            self._gate.server_close()
            self._gate = None
        if self._olah is not None:
            self._olah.terminate()
            try:
                self._olah.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._olah.kill()
            self._olah = None

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a client of this hub: online, a private cache, the endpoint."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")
        }
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(self.root / "hf-home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
        )
        env.update(extra)
        return env

    def is_up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}/api/models/none/none/revision/main", timeout=2)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True


def _gate_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Gate(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet: the test reads hub.requests
            pass

        def _gated_repo(self) -> str | None:
            for repo_id in hub.gated:
                if f"/{repo_id}/" in self.path or self.path.endswith(f"/{repo_id}"):
                    return repo_id
            return None

        def _forward(self) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            repo_id = self._gated_repo()
            if repo_id and self.headers.get("Authorization") != f"Bearer {hub.token}":
                body = f"Access to model {repo_id} is restricted.".encode()
                self.send_response(401)
                self.send_header("X-Error-Code", "GatedRepo")
                self.send_header("X-Error-Message", body.decode())
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            upstream = http.client.HTTPConnection("127.0.0.1", hub.olah_port, timeout=120)
            upstream.request(self.command, self.path, body=payload, headers=headers)
            response = upstream.getresponse()
            self.send_response(response.status, response.reason)
            chunked = False
            for name, value in response.getheaders():
                if name.lower() == "transfer-encoding":
                    chunked = value.lower() == "chunked"
                    continue
                if name.lower() == "connection":
                    continue
                self.send_header(name, value)
            delay = next((d for f, d in hub.throttle.items() if self.path.endswith(f)), 0.0)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                for chunk in _chunks(response):
                    if delay:
                        time.sleep(delay)
                    if chunked:
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    else:
                        self.wfile.write(chunk)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            upstream.close()

        def _serve(self) -> None:
            try:
                self._forward()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (a test kills fetches midway on purpose)

        do_GET = do_HEAD = do_POST = _serve

    return Gate


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while chunk := response.read(65536):
        yield chunk
