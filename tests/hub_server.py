"""A small Hugging Face Hub server for tests, on loopback. NOT a real Hub.

It exists because nothing installable here accepts uploads (``olah`` is a
read-only mirror; self-hosted hubs need Docker and cloud storage). It speaks
the classic, non-Xet protocol that the real ``huggingface_hub`` client uses
when ``HF_HUB_DISABLE_XET=1``, and only as much of it as kp-plugin's tests
need:

- ``POST /api/repos/create``, ``DELETE /api/repos/delete``;
- ``GET /api/models/<repo>[/revision/<rev>]`` (repo info: sha, private,
  siblings);
- ``POST /api/models/<repo>/preupload/<rev>`` (weights go to LFS, the rest
  inline);
- ``POST /<repo>.git/info/lfs/objects/batch`` (basic transfer) and the
  ``PUT`` its ``href`` points to (checked against the sha256 announced);
- ``POST /api/models/<repo>/commit/<rev>`` (the NDJSON commit);
- ``POST /api/models/<repo>/branch/<branch>``;
- ``POST /api/validate-yaml``; ``GET /api/whoami-v2``;
- ``GET``/``HEAD /<repo>/resolve/<rev>/<path>``.

Writes need ``Authorization: Bearer <token>`` with the token given on the
command line; private repos are invisible (404 ``RepoNotFound``) without
it. There is one user and no real permission model, no Xet, no pull
requests, no multipart uploads, no pagination.

It records exactly what it received: every request line, the header names,
whether it was authorized, and the raw body (``<root>/received/NNNNNN.body``),
listed in ``<root>/received.jsonl``. Stored files live in
``<root>/blobs/<sha256>`` and repository state in ``<root>/repos.json``, so a
test can scan everything the server holds.

Faults, for tests of what a client does when a download goes wrong: a
``<root>/fault.json`` of ``{"repo": ..., "path": ..., "mode": ...}`` changes
how that file is served: ``"damage"`` (same length, some bytes changed),
``"cut"`` (half the body, the headers still announcing the whole size),
``"error500"``, or ``"move_main"`` (served as usual, then the repository's
``main`` moves to the commit in ``"to"``; the fault is then removed).
The path ``"api"`` stands for the repository's info route (``"error500"``).

Run: ``python tests/hub_server.py --root DIR --token TOKEN [--port 0]``;
it prints ``listening on http://127.0.0.1:PORT`` once ready and serves until
killed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Store:
    """Repositories (commits as path -> sha256 maps) and content-addressed blobs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "received").mkdir(exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict = {}
        self.tickets: dict = {}  # LFS upload ticket -> (oid, size)
        self.counter = itertools.count(1)

    # -- persistence (so a test can read the state) --------------------------
    def save(self) -> None:
        tmp = self.root / ".repos.json.tmp"
        tmp.write_text(json.dumps(self.repos, indent=1, sort_keys=True))
        tmp.replace(self.root / "repos.json")

    def put_blob(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        path = self.blobs / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.blobs / oid).read_bytes()

    # -- repositories ----------------------------------------------------------
    def repo(self, repo_id: str, *, authorized: bool) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and not authorized):
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def create(self, repo_id: str, private: bool) -> dict:
        if repo_id in self.repos:
            raise HubError(409, None, "You already created this model repo")
        oid = self.put_blob(GITATTRIBUTES)
        repo = {"private": private, "branches": {}, "commits": {}, "created": time.time()}
        self.repos[repo_id] = repo
        repo["branches"]["main"] = self._commit(repo, None, {".gitattributes": oid}, "initial commit")
        self.save()
        return repo

    def _commit(self, repo: dict, parent: str | None, files: dict, message: str) -> str:
        body = json.dumps({"parent": parent, "files": files, "message": message, "n": next(self.counter)},
                          sort_keys=True)
        sha = hashlib.sha1(body.encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "files": files, "message": message}
        return sha

    def resolve(self, repo: dict, revision: str) -> str:
        revision = unquote(revision)
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def commit(self, repo_id: str, revision: str, lines: list) -> str:
        repo = self.repo(repo_id, authorized=True)
        revision = unquote(revision)
        if revision not in repo["branches"]:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        parent = repo["branches"][revision]
        files = dict(repo["commits"][parent]["files"])
        header = {}
        for line in lines:
            kind, value = line.get("key"), line.get("value", {})
            if kind == "header":
                header = value
            elif kind == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, None, "only base64 file content is supported")
                files[value["path"]] = self.put_blob(base64.b64decode(value["content"]))
            elif kind == "lfsFile":
                oid = value["oid"]
                if not (self.blobs / oid).exists():
                    raise HubError(422, None, f"LFS object {oid} was never uploaded")
                files[value["path"]] = oid
            elif kind == "deletedFile":
                files.pop(value["path"], None)
            elif kind == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: o for p, o in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, None, f"unknown commit line {kind!r}")
        if header.get("parentCommit") and header["parentCommit"] != parent:
            raise HubError(412, None, "parent commit is not the head of the branch")
        sha = self._commit(repo, parent, files, header.get("summary", ""))
        repo["branches"][revision] = sha
        self.save()
        return sha


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kp-test-hub/1"
    store: Store
    token: str

    # -- plumbing ------------------------------------------------------------
    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib name
        pass

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self, body: bytes) -> None:
        store = self.store
        with store.lock:
            n = len(list((store.root / "received").iterdir())) + 1
            name = f"{n:06d}.body"
            (store.root / "received" / name).write_bytes(body)
            entry = {
                "method": self.command,
                "path": self.path,
                "authorized": self._authorized(),
                "headers": sorted(self.headers.keys()),
                "body": name,
                "body_size": len(body),
            }
            with open(store.root / "received.jsonl", "a") as fh:
                fh.write(json.dumps(entry) + "\n")

    def _send(self, status: int, payload=None, *, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        if raw is None and payload is not None:
            self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        self._record(body)
        url = urlsplit(self.path)
        try:
            with self.store.lock:
                self._route(unquote(url.path), parse_qs(url.query), body)
        except HubError as exc:
            headers = {"X-Error-Code": exc.code} if exc.code else {}
            headers["X-Error-Message"] = exc.message
            self._send(exc.status, {"error": exc.message}, headers=headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # -- routes --------------------------------------------------------------
    def _route(self, path: str, query: dict, body: bytes) -> None:
        store, method = self.store, self.command
        if method == "GET" and path == "/api/whoami-v2":
            self._require_auth()
            return self._send(200, {"type": "user", "name": "kp-test", "orgs": [], "auth": {"type": "access_token"}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if method == "POST" and path == "/api/repos/create":
            self._require_auth()
            data = json.loads(body or b"{}")
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else f"kp-test/{data['name']}"
            private = data.get("visibility", "private" if data.get("private") else "public") == "private"
            store.create(repo_id, private)
            return self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})
        if method == "DELETE" and path == "/api/repos/delete":
            self._require_auth()
            data = json.loads(body or b"{}")
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else f"kp-test/{data['name']}"
            store.repo(repo_id, authorized=True)
            del store.repos[repo_id]
            store.save()
            return self._send(200, {})
        if method == "PUT" and path.startswith("/_lfs/"):
            return self._lfs_put(path[len("/_lfs/"):], body)

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m and method == "GET":
            if self._fault(m.group(1), "api").get("mode") == "error500":
                raise HubError(500, None, "Internal Error (injected)")
            return self._repo_info(m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if m and method == "POST":
            self._require_auth()
            repo = store.repo(m.group(1), authorized=True)
            store.resolve(repo, m.group(2))
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "shouldIgnore": False,
                 "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE else "regular"}
                for f in files
            ]
            return self._send(200, {"files": modes})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if m and method == "POST":
            self._require_auth()
            if query.get("create_pr"):
                raise HubError(400, None, "this test server does not do pull requests")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            sha = store.commit(m.group(1), m.group(2), lines)
            return self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.base}/{m.group(1)}/commit/{sha}",
                                    "pullRequestUrl": None})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
        if m and method == "POST":
            self._require_auth()
            repo = store.repo(m.group(1), authorized=True)
            if m.group(2) in repo["branches"]:
                raise HubError(409, None, f"Branch {m.group(2)} already exists")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            repo["branches"][m.group(2)] = store.resolve(repo, start)
            store.save()
            return self._send(200, {})
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            self._require_auth()
            store.repo(m.group(1), authorized=True)
            return self._lfs_batch(json.loads(body))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(m.group(1), m.group(2), m.group(3))
        raise HubError(404, None, f"no route for {method} {path} on this test server")

    def _repo_info(self, repo_id: str, revision: str) -> None:
        repo = self.store.repo(repo_id, authorized=self._authorized())
        sha = self.store.resolve(repo, revision)
        files = repo["commits"][sha]["files"]
        self._send(200, {
            "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["created"])),
            "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [],
        })

    def _lfs_batch(self, request: dict) -> None:
        if request.get("operation") != "upload":
            raise HubError(400, None, "this test server only takes LFS uploads")
        objects = []
        for obj in request.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not (self.store.blobs / oid).exists():
                ticket = secrets.token_urlsafe(16)
                self.store.tickets[ticket] = (oid, size)
                entry["actions"] = {"upload": {"href": f"{self.base}/_lfs/{ticket}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, ticket: str, body: bytes) -> None:
        expected = self.store.tickets.pop(ticket, None)
        if expected is None:
            raise HubError(403, None, "unknown or used upload ticket")
        oid, size = expected
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, None, "uploaded content does not match the announced sha256/size")
        self.store.put_blob(body)
        self._send(200, None)

    def _fault(self, repo_id: str, path: str) -> dict:
        fault_file = self.store.root / "fault.json"
        fault = json.loads(fault_file.read_text()) if fault_file.is_file() else {}
        return fault if (fault.get("repo"), fault.get("path")) == (repo_id, path) else {}

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self.store.repo(repo_id, authorized=self._authorized())
        sha = self.store.resolve(repo, revision)
        oid = repo["commits"][sha]["files"].get(path)
        if oid is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {revision}")
        fault = self._fault(repo_id, path).get("mode")
        if fault == "error500":
            raise HubError(500, None, "Internal Error (injected)")
        data = self.store.blob(oid)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Content-Type": "application/octet-stream"}
        if path.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data))})
        if fault == "damage" and self.command == "GET":
            data = data[:-64] + bytes(b ^ 0x55 for b in data[-64:])
        if fault == "cut" and self.command == "GET":
            data = data[: len(data) // 2]
        self._send(200, raw=data, headers=headers)
        if self._fault(repo_id, path).get("mode") == "move_main" and self.command == "GET":
            to = json.loads((self.store.root / "fault.json").read_text())["to"]
            repo["branches"]["main"] = self.store.resolve(repo, to)
            self.store.save()
            (self.store.root / "fault.json").unlink()


def serve(root: Path, token: str, port: int = 0) -> ThreadingHTTPServer:
    """A server bound to 127.0.0.1 (not started)."""
    handler = type("BoundHandler", (Handler,), {"store": Store(root), "token": token})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Test-only Hugging Face Hub server on 127.0.0.1 (not a real Hub).")
    parser.add_argument("--root", required=True, type=Path, help="where blobs, state and received requests go")
    parser.add_argument("--token", required=True, help="the one bearer token that may write")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    server = serve(args.root, args.token, args.port)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
