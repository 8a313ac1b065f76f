"""A real HTTP file server on 127.0.0.1 for the remote-shard tests, with faults injected for real.

``ShardServer(root)`` serves the files under ``root`` (HTTP/1.1, ``Content-Length``, ``ETag``, byte
``Range`` requests answered with 206 unless ``ranges=False``) from a thread. ``cut[name] = (n_bytes,
times, how)`` makes the next ``times`` responses for ``name`` stop after ``n_bytes`` of body and drop
the connection: ``how`` "close" ends it cleanly (the body is short of its Content-Length), "reset"
aborts it with a TCP RST. ``requests`` logs (path, Range header or None) of every GET.
"""
from __future__ import annotations

import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    def __init__(self, root: Path, *, ranges: bool = True):
        self.root, self.ranges = Path(root), ranges
        self.cut: dict[str, tuple[int, int, str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                name = self.path.split("?", 1)[0].lstrip("/")
                rng = self.headers.get("Range")
                with server._lock:
                    server.requests.append((name, rng))
                    plan = server.cut.get(name)
                    if plan is not None:
                        n, times, how = plan
                        server.cut[name] = (n, times - 1, how)
                        if times - 1 <= 0:
                            del server.cut[name]
                path = server.root / name
                if not path.is_file():
                    self.send_error(404, "no such file")
                    return
                data = path.read_bytes()
                etag = f'"{len(data)}-{path.stat().st_mtime_ns}"'
                start = 0
                if rng and server.ranges and self.headers.get("If-Range") in (None, etag):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                self.end_headers()
                if plan is None:
                    self.wfile.write(body)
                    return
                n, _, how = plan
                self.wfile.write(body[:n])
                self.wfile.flush()
                if how == "reset":  # abortive close: the client sees ECONNRESET
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranged(self, name: str) -> list[str]:
        """The Range headers of the requests for ``name`` (None for a whole-file GET)."""
        return [r for n, r in self.requests if n == name]
