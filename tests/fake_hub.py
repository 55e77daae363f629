"""A Hugging Face Hub on 127.0.0.1 that serves model folders built at test time.

It speaks the part of the Hub's HTTP protocol that huggingface_hub's `snapshot_download`,
`hf_hub_download` and `model_info` use (checked against huggingface_hub 2.4):

- GET  /api/models/{repo}[/revision/{rev}]     → {"id", "sha", "siblings": [{"rfilename"}]}
- GET  /api/models/{repo}/tree/{rev}?recursive → [{"type": "file", "path", "size", "oid"}]
- HEAD /{repo}/resolve/{rev}/{path}            → 200 with X-Repo-Commit, ETag, Content-Length
- GET  /{repo}/resolve/{rev}/{path}            → the file's bytes
- unknown repo → 404 X-Error-Code: RepoNotFound; unknown file → 404 EntryNotFound.

No `X-Xet-Hash` header and no `xetHash` in the tree, so the client downloads over plain HTTP
(the Hub only offers Xet for files it stores that way). Point the client here with
HF_ENDPOINT=http://127.0.0.1:PORT (read when huggingface_hub is imported: set it in the
environment of a subprocess).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    """A model repository: its files (path in repo → bytes) at one commit."""

    files: dict[str, bytes]
    sha: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name])
        self.sha = digest.hexdigest()  # 40 hex digits, as a git commit id

    @classmethod
    def from_folder(cls, folder: str | Path) -> Repo:
        root = Path(folder)
        return cls(
            {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        )


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def file_requests(self, method: str) -> list[str]:
        return [path for m, path in self.requests if m == method and "/resolve/" in path]


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def _send(
            self, status: int, body: bytes, headers: dict[str, str], head: bool = False
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, data: object) -> None:
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _not_found(self, code: str, head: bool, sha: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": code}
            if sha:
                headers["X-Repo-Commit"] = sha
            self._send(404, b"{}", headers, head)

        def _repo(self, rest: str) -> tuple[str, Repo, str] | None:
            """The repository a path starts with (ids hold a '/'), and the rest of the path."""
            for repo_id, repo in hub.repos.items():
                if rest == repo_id or rest.startswith(repo_id + "/"):
                    return repo_id, repo, rest[len(repo_id) :].lstrip("/")
            return None

        def _api(self, rest: str) -> None:
            found = self._repo(rest)
            if found is None:
                self._not_found("RepoNotFound", False)
                return
            repo_id, repo, tail = found
            if tail.startswith("tree/"):
                self._json(
                    [
                        {"type": "file", "path": name, "size": len(data), "oid": _etag(data)[:40]}
                        for name, data in sorted(repo.files.items())
                    ]
                )
                return
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "disabled": False,
                    "gated": False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                }
            )

        def _resolve(self, rest: str, head: bool) -> None:
            found = self._repo(rest)
            if found is None:
                self._not_found("RepoNotFound", head)
                return
            _repo_id, repo, tail = found
            _resolve, _rev, path = tail.split("/", 2)  # resolve/{rev}/{path}
            data = repo.files.get(unquote(path))
            if data is None:
                self._not_found("EntryNotFound", head, repo.sha)
                return
            headers = {
                "X-Repo-Commit": repo.sha,
                "ETag": f'"{_etag(data)}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(200, data, headers, head)

        def _route(self, head: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path))
            if path.startswith("/api/models/"):
                self._api(unquote(path[len("/api/models/") :]))
            elif "/resolve/" in path:
                self._resolve(path.lstrip("/"), head)
            else:
                self._send(404, b"not found", {}, head)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    return Handler


@contextmanager
def serve(repos: dict[str, Repo]) -> Iterator[FakeHub]:
    """Run the fake hub on a free port of 127.0.0.1 while the block runs."""
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
