"""A Hugging Face hub on loopback, for tests: the endpoints and headers huggingface_hub 2.4 uses.

- ``GET /api/models/{repo}/revision/{rev}``: repo info JSON (``sha``, ``siblings``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=&cursor=``: the tree listing, paginated
  with a ``Link: <…>; rel="next"`` header like the hub (``page_size`` entries a page).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` and ``X-Linked-Etag`` (the
  sha256 for LFS files, the git blob sha1 otherwise), ``X-Linked-Size``, ``Content-Length``,
  ``Accept-Ranges``; ``Range: bytes=N-`` answers 206 with ``Content-Range``.
- Errors as the hub sends them: 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound /
  EntryNotFound, and 401 GatedRepo for a gated repository's files without a valid token.

Faults to inject: ``corrupt[(repo, path)] = n`` serves the next n GETs of a file with one byte
flipped (same size, so only a hash catches it); ``stall_at[(repo, path)] = offset`` stops every GET
body of a file at ``offset`` (ranged ones too, so a client's own retries stall as well), and waits for
``release``; ``ignore_range = True`` answers ranged GETs with the whole file (200), as some proxies
do. Every request is logged in ``log``.
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubEmulator", "FakeRepo", "Request"]

_CHUNK = 1 << 20


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    gated: bool = False
    lfs: bool = True
    extra_branches: tuple[str, ...] = ()
    commit: str = field(init=False)
    branches: dict[str, str] = field(init=False)
    meta: dict[str, dict] = field(init=False)

    def __post_init__(self):
        self.meta = {}
        h = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            data = self.files[path]
            sha256 = hashlib.sha256(data).hexdigest()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self.meta[path] = {"size": len(data), "sha256": sha256, "blob": blob}
            h.update(path.encode() + sha256.encode())
        self.commit = h.hexdigest()
        self.branches = {name: self.commit for name in ("main", *self.extra_branches)}

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev == self.commit else None)

    def etag(self, path: str) -> str:
        return self.meta[path]["sha256"] if self.lfs else self.meta[path]["blob"]

    def tree_entry(self, path: str) -> dict:
        m = self.meta[path]
        entry = {"type": "file", "oid": m["blob"], "size": m["size"], "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": m["sha256"], "size": m["size"], "pointerSize": 134}
        return entry

    def listing(self, folder: str, recursive: bool) -> list[dict] | None:
        prefix = f"{folder}/" if folder else ""
        under = [p for p in sorted(self.files) if p.startswith(prefix)]
        if folder and not under:
            return None
        out, dirs = [], set()
        for p in under:
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
            else:
                out.append(self.tree_entry(p))
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)]
        return sorted(out, key=lambda e: e["path"])


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    auth: str | None


class HubEmulator:
    def __init__(self, page_size: int = 1000):
        self.repos: dict[str, FakeRepo] = {}
        self.tokens: set[str] = set()
        self.page_size = page_size
        self.corrupt: dict[tuple[str, str], int] = {}
        self.stall_at: dict[tuple[str, str], int] = {}
        self.ignore_range = False
        self.release = threading.Event()
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], **kw) -> FakeRepo:
        repo = FakeRepo(repo_id, dict(files), **kw)
        self.repos[repo_id] = repo
        return repo

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubEmulator":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reset(self) -> None:
        """Forget faults and the request log (between tests)."""
        with self._lock:
            self.corrupt.clear()
            self.stall_at.clear()
            self.log.clear()
            self.ignore_range = False
        self.release.clear()

    def file_gets(self, repo_id: str, path: str | None = None) -> list[Request]:
        """The GETs of file content (resolve URLs) for a repo, or for one of its files."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            return [r for r in self.log if r.method == "GET" and r.path.startswith(prefix)
                    and (path is None or r.path.split("/", 5)[-1] == path)]

    def _record(self, req: Request) -> None:
        with self._lock:
            self.log.append(req)

    def _take_corruption(self, key) -> bool:
        with self._lock:
            n = self.corrupt.get(key, 0)
            if n:
                self.corrupt[key] = n - 1
            return n > 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away is not news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)

    # -- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, obj, headers: dict | None = None, head: bool = False) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    # -- routes
    def _route(self, head: bool) -> None:
        hub: HubEmulator = self.server.hub
        url = urlsplit(self.path)
        segs = url.path.split("/")[1:]
        hub._record(Request(self.command, unquote(url.path), self.headers.get("Range"),
                            self.headers.get("Authorization")))
        if len(segs) >= 5 and segs[:2] == ["api", "models"]:
            repo = hub.repos.get(f"{unquote(segs[2])}/{unquote(segs[3])}")
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            action, rest = segs[4], [unquote(s) for s in segs[5:]]
            if action == "revision" and len(rest) == 1:
                return self._repo_info(repo, rest[0], head)
            if action == "tree" and rest:
                return self._tree(repo, rest[0], "/".join(rest[1:]), parse_qs(url.query), url.path, head)
        elif len(segs) >= 5 and segs[2] == "resolve":
            repo = hub.repos.get(f"{unquote(segs[0])}/{unquote(segs[1])}")
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            return self._resolve(hub, repo, unquote(segs[3]), unquote("/".join(segs[4:])), head)
        self._error(404, None, "Not found", head)

    def _repo_info(self, repo: FakeRepo, rev: str, head: bool) -> None:
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        self._json({"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                    "modelId": repo.repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                    "lastModified": "2024-03-17T00:00:00.000Z", "createdAt": "2024-03-17T00:00:00.000Z"},
                   head=head)

    def _tree(self, repo: FakeRepo, rev: str, folder: str, query: dict, path: str, head: bool) -> None:
        hub: HubEmulator = self.server.hub
        if repo.resolve(rev) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = repo.listing(folder, recursive)
        if entries is None:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {rev}", head)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + hub.page_size]
        headers = {}
        if start + hub.page_size < len(entries):
            nxt = (f"{hub.endpoint}{path}?recursive={str(recursive).lower()}&expand=false"
                   f"&cursor={start + hub.page_size}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(page, headers, head)

    def _resolve(self, hub: HubEmulator, repo: FakeRepo, rev: str, path: str, head: bool) -> None:
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if repo.gated and (self.headers.get("Authorization") or "").removeprefix("Bearer ") not in hub.tokens:
            return self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                                                 "access to it and be authenticated to access it. Please log in.",
                               head)
        if path not in repo.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", head)
        data = repo.files[path]
        size = len(data)
        etag = repo.etag(path)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if repo.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": size})
        start = 0
        status = 200
        rng = None if hub.ignore_range else self.headers.get("Range")
        if rng and not head:
            try:
                first, last = rng.removeprefix("bytes=").split("-", 1)
                start, end = int(first), int(last) if last else size - 1
            except ValueError:
                return self._error(416, None, f"bad range {rng}")
            if start >= size:
                return self._send(416, headers={"Content-Range": f"bytes */{size}"})
            data = data[:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{min(end, size - 1)}/{size}"
        if head:
            return self._send(200, headers=headers, head=True, length=size)
        key = (repo.repo_id, path)
        if hub._take_corruption(key):
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        stall = hub.stall_at.get(key)
        pos = start
        try:
            while pos < len(data):
                if stall is not None and pos >= stall:
                    hub.release.wait(30)
                    self.close_connection = True
                    return
                n = min(_CHUNK, len(data) - pos)
                self.wfile.write(data[pos:pos + n])
                pos += n
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
