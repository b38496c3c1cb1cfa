"""A Hugging Face Hub stand-in on 127.0.0.1 for tests: the endpoints huggingface_hub uses to
download files (``resolve``) and to create repositories and commit files, kept in memory.

It speaks the Hub's protocol as huggingface_hub reads it: ``X-Repo-Commit``/``ETag`` headers on
downloads, ``X-Error-Code`` on 404s (RepoNotFound, RevisionNotFound, EntryNotFound), preupload
answering "regular" (files travel base64-encoded in the commit), NDJSON commits. It records what
a test checks a client asked for: every request, each repository's visibility and each commit's
message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first
    messages: list[str] = field(default_factory=list)  # each commit's summary line, as the client sent it
    private: bool = False

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if not self.commits:
            return None
        if revision == "main":
            return self.commits[-1]
        return next(((sha, files) for sha, files in self.commits if sha.startswith(revision) and len(revision) >= 7), None)


class FakeHub:
    """``FakeHub().url`` serves until ``close()``; ``requests`` logs ``(method, path)``.

    ``post_failure`` makes every create or commit fail: an HTTP status to answer with (401: no or
    a wrong token), or ``"drop"`` to close the connection without an answer (a network failure).
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.post_failure: int | str | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._resolve(self, send_body=False)

            def do_GET(self) -> None:
                hub._resolve(self, send_body=True)

            def do_POST(self) -> None:
                hub._post(self)

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # never refuse a connection because others wait

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- publishing without the client ---------------------------------------------------

    def add_commit(self, repo_id: str, files: dict[str, bytes], message: str = "") -> str:
        """A new commit holding ``files`` (on top of the previous commit's); returns its sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        previous = dict(repo.commits[-1][1]) if repo.commits else {}
        previous.update(files)
        sha = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(previous))).encode()).hexdigest()
        repo.commits.append((sha, previous))
        repo.messages.append(message)
        return sha

    def add_folder(self, repo_id: str, folder: Path) -> str:
        return self.add_commit(repo_id, {p.relative_to(folder).as_posix(): p.read_bytes()
                                         for p in sorted(folder.rglob("*")) if p.is_file()})

    def downloads(self, filename: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith("/" + filename))

    # --- protocol ------------------------------------------------------------------------

    def _error(self, handler: BaseHTTPRequestHandler, code: str, status: int = 404) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _resolve(self, handler: BaseHTTPRequestHandler, send_body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", handler.path.split("?")[0])
        if not match:
            return self._error(handler, "NotFound")
        repo_id, revision, filename = match.groups()
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(handler, "RepoNotFound", 401)
        found = repo.files_at(revision)
        if found is None:
            return self._error(handler, "RevisionNotFound")
        sha, files = found
        if filename not in files:
            return self._error(handler, "EntryNotFound")
        body = files[filename]
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", sha)
        handler.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests.append(("POST", handler.path))
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        if self.post_failure == "drop":
            handler.close_connection = True
            return
        if self.post_failure is not None:
            return self._error(handler, "Refused", int(self.post_failure))
        path = handler.path.split("?")[0]
        if path == "/api/repos/create":
            spec = json.loads(body)
            repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
            if repo_id in self.repos:
                return self._json(handler, {"error": "already exists", "url": f"{self.url}/{repo_id}"}, 409)
            # huggingface_hub >= 1 sends "visibility", older clients "private"
            self.repos[repo_id] = Repo(private=spec.get("visibility") == "private" or bool(spec.get("private")))
            return self._json(handler, {"url": f"{self.url}/{repo_id}"})
        if path == "/api/validate-yaml":  # the model card's metadata block must be valid YAML
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            except yaml.YAMLError as e:
                return self._json(handler, {"errors": [{"message": str(e)}]}, 400)
            return self._json(handler, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if not match or match.group(1) not in self.repos:
            return self._error(handler, "RepoNotFound")
        repo_id, action, _ = match.groups()
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json(handler, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
        uploaded, message = {}, ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                message = item["value"]["summary"]
            elif item["key"] == "file":
                uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        sha = self.add_commit(repo_id, uploaded, message)
        return self._json(handler, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha})

    def _json(self, handler: BaseHTTPRequestHandler, payload: dict, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def hub(monkeypatch):
    """A ``FakeHub`` that huggingface_hub talks to (``HF_ENDPOINT``) for one test; import it into a test module.

    huggingface_hub gives up on a request after 10 s and then reports the Hub unreachable: on a busy
    machine a local answer can take that long, so the client waits as long as a test may."""
    from huggingface_hub import constants

    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 300)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 300)
    yield server
    server.close()
