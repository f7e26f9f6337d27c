"""A small Hub-compatible HTTP server for tests (no torch, no transformers).

It answers what huggingface_hub's ``hf_hub_download`` and ``snapshot_download`` really send (read from
huggingface_hub 0.36 and 2.x): ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``, with ``X-Repo-Commit``, ``ETag``,
``Content-Length``; large ("LFS") files redirect (302) to a second "CDN" origin with ``X-Linked-Etag``
and ``X-Linked-Size``, as the real Hub does; ``Range`` requests; errors carry ``X-Error-Code`` /
``X-Error-Message`` the way the Hub sets them (RepoNotFound, GatedRepo, EntryNotFound,
RevisionNotFound, bad credentials). Renamed repos answer with a relative redirect. ``GET
/api/models/{repo_id}/revision/{revision}`` and ``.../tree/{revision}`` list the files.

Fault injection per repo: ``fail_first`` (the first N requests answer 500) and ``truncate`` (bodies
of those files stop halfway, until ``GET /_test/heal/{repo_id}``). Every request is logged.

Example:
    >>> hub = FakeHub({"user/adapter": Repo({"main": {"adapter_config.json": b"{}"}})}).start()
    >>> os.environ["HF_ENDPOINT"] = hub.url     # before huggingface_hub is imported
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclasses.dataclass
class Repo:
    """A Hub model repo: ``branches`` maps a branch name to ``{path in repo: bytes}``."""

    branches: dict[str, dict[str, bytes]]
    token: str | None = None  # requests must carry this token (private or gated repo)
    gated: bool = False  # missing/wrong token -> GatedRepo instead of RepoNotFound
    fail_first: int = 0  # the first N requests to this repo answer 500
    truncate: set[str] = dataclasses.field(default_factory=set)  # paths whose bodies stop halfway
    moved_to: str | None = None  # renamed repo: relative redirect to the new id

    def commit(self, branch: str, repo_id: str) -> str:
        return hashlib.sha1(f"{repo_id}@{branch}".encode()).hexdigest()


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Logged:
    method: str
    path: str
    status: int
    range: str | None = None


class FakeHub:
    """Two threaded HTTP servers on 127.0.0.1: the Hub (``url``) and its LFS "CDN" (``cdn_url``)."""

    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.log: list[Logged] = []
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "FakeHub":
        for _ in range(2):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.url = "http://127.0.0.1:%d" % self._servers[0].server_address[1]
        self.cdn_url = "http://127.0.0.1:%d" % self._servers[1].server_address[1]
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    # ---- queries for tests --------------------------------------------------------------
    def requests_for(self, repo_id: str, method: str | None = None) -> list[Logged]:
        """Logged requests whose path belongs to ``repo_id`` (and its LFS blobs)."""
        blobs = {_sha256(data) for branch in self.repos[repo_id].branches.values() for data in branch.values()}
        with self.lock:
            return [r for r in self.log if (r.path.startswith(f"/{repo_id}/") or r.path.split("/")[-1] in blobs)
                    and (method is None or r.method == method)]

    def downloaded(self, repo_id: str) -> list[str]:
        """Repo paths whose content was sent (GET answered 200/206), CDN blobs mapped back to their path."""
        names = {}
        for branch in self.repos[repo_id].branches.values():
            for path, data in branch.items():
                names[_sha256(data)] = path
        out = []
        for r in self.requests_for(repo_id, "GET"):
            if r.status not in (200, 206):
                continue
            m = re.match(rf"/{re.escape(repo_id)}/resolve/[^/]+/(.+)$", r.path)
            out.append(m.group(1) if m else names[r.path.split("/")[-1]])
        return out

    def commit(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].commit(branch, repo_id)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler_class(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        # ---- responses ---------------------------------------------------------------------
        def _send(self, status: int, headers: dict, data: bytes = b"", body: bool = True, cut: int | None = None):
            with hub.lock:
                hub.log.append(Logged(self.command, urlsplit(self.path).path, status, self.headers.get("Range")))
            self.send_response(status)
            headers = {"Content-Length": str(len(data)), **headers}
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body and data:
                self.wfile.write(data if cut is None else data[:cut])
            if cut is not None:
                self.close_connection = True
            self.wfile.flush()

        def _error(self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None):
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, json.dumps({"error": message}).encode(), body)

        def _content(self, data: bytes, headers: dict, body: bool, truncated: bool):
            total, begin, end = len(data), 0, len(data)
            status = 200
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if m:
                begin, end = int(m.group(1)), int(m.group(2)) + 1 if m.group(2) else total
                status = 206
                headers = {**headers, "Content-Range": f"bytes {begin}-{end - 1}/{total}"}
            part = data[begin:end]
            # a truncated body stops at half the file, wherever the requested range starts
            cut = max(0, total // 2 - begin) if truncated and body else None
            self._send(status, {"Accept-Ranges": "bytes", **headers}, part, body, cut)

        # ---- routing -----------------------------------------------------------------------
        def _serve(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            if path.startswith("/_test/heal/"):
                hub.repos[path[len("/_test/heal/"):]].truncate.clear()
                return self._send(200, {}, b"healed", body)
            if path.startswith("/cdn/"):
                return self._serve_blob(path[len("/cdn/"):], body)
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if api:
                repo_id, endpoint, revision, _ = api.groups()
            elif m:
                repo_id, revision, filename = m.groups()
            else:
                return self._error(404, None, "Not Found", body)
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", body)
            with hub.lock:
                failing, repo.fail_first = repo.fail_first > 0, max(0, repo.fail_first - 1)
            if failing:
                return self._error(500, None, "Internal Error - We're working hard to fix this as soon as possible!",
                                   body)
            if repo.moved_to:
                new = urlsplit(self.path).path.replace(f"/{repo_id}/", f"/{repo.moved_to}/", 1)
                return self._send(307, {"Location": new}, b"", body)
            auth = self.headers.get("Authorization")
            if repo.token is not None and auth != f"Bearer {repo.token}":
                if auth and not repo.gated:
                    return self._error(401, None, "Invalid credentials in Authorization header", body)
                if repo.gated:
                    return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                       "access to it and be authenticated to access it. Please log in.", body)
                return self._error(401, "RepoNotFound", "Repository not found", body)
            branch = next((b for b in repo.branches if revision in (b, repo.commit(b, repo_id))), None)
            if branch is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            commit = repo.commit(branch, repo_id)
            if api:
                return self._api(endpoint, repo_id, repo, branch, commit, body)
            data = repo.branches[branch].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"", body,
                                   {"X-Repo-Commit": commit})
            if filename.endswith(LFS_SUFFIXES):  # LFS file: redirect to the CDN origin
                sha = _sha256(data)
                return self._send(302, {"Location": f"{hub.cdn_url}/cdn/{sha}", "X-Repo-Commit": commit,
                                        "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                        "ETag": f'"{git_blob_sha(data)}"'}, b"", body)
            self._content(data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha(data)}"',
                                 "Content-Type": "application/octet-stream"}, body, filename in repo.truncate)

        def _api(self, endpoint: str, repo_id: str, repo: Repo, branch: str, commit: str, body: bool):
            """``repo_info`` and the recursive tree listing, as far as ``snapshot_download`` reads them."""
            files = repo.branches[branch]
            if endpoint == "revision":
                info = {"id": repo_id, "sha": commit, "private": repo.token is not None, "gated": repo.gated,
                        "siblings": [{"rfilename": p} for p in sorted(files)]}
            else:
                info = [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d),
                         **({"lfs": {"oid": _sha256(d), "size": len(d), "pointerSize": 134}}
                            if p.endswith(LFS_SUFFIXES) else {})} for p, d in sorted(files.items())]
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

        def _serve_blob(self, sha: str, body: bool):
            for repo in hub.repos.values():
                for files in repo.branches.values():
                    for name, data in files.items():
                        if _sha256(data) == sha:
                            return self._content(data, {"ETag": f'"{sha}"', "Content-Type": "binary/octet-stream"},
                                                 body, name in repo.truncate)
            return self._error(404, None, "NoSuchKey", body)

    return Handler
