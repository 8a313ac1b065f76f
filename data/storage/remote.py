"""Opening shards wherever they are: local files, ``http(s)://`` URLs (retried, resumed with HTTP
Range) and ``pipe:`` commands.

``open_shard(url)`` returns a binary file object with ``read(n)``. For http(s) it is an
``HttpShardReader``: when the server drops the connection mid-shard (a reset, a timeout, or a
connection closed before ``Content-Length`` bytes), it reconnects and asks for the rest with
``Range: bytes=<offset>-`` (with ``If-Range``, so a file that changed on the server is not spliced);
a server without Range support sends the whole file again and the bytes already read are skipped.
Up to ``retries`` reconnects in a row that bring no new byte are made (``backoff_s`` x 2^k apart),
then ``RemoteReadError`` (an ``OSError``) is raised: the stream counts the samples that shard
still owed as ``connection_lost``, like a truncated tar, and goes on. Each reconnect is reported to
``on_retry`` (the stream counts them as ``data/remote_retries``).

Other schemes (``gs://``, ``s3://`` ...) are not read directly; ``pipe:`` runs the provider's CLI
(``pipe:gsutil cat gs://b/x.tar``, ``pipe:aws s3 cp s3://b/x.tar -``), and public or presigned
objects are plain https URLs.
"""
from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import BinaryIO

RETRIES = 5          # reconnects in a row without a new byte before a shard counts as lost
BACKOFF_S = 0.25     # first wait between reconnects; doubles each time, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 8.0
TIMEOUT_S = 60.0     # socket timeout of one request / read
HTTP_SCHEMES = ("http://", "https://")
RetryHook = Callable[[str, int, str], None]   # (url, byte offset, error text)


class RemoteReadError(OSError):
    """A remote shard could not be read to its end, after the allowed reconnects."""


def is_http(url: str) -> bool:
    return url[:8].lower().startswith(HTTP_SCHEMES)


def url_parent(url: str) -> str:
    """``http://h/a/b/train-000001.tar?x=1`` -> ``http://h/a/b/``."""
    return url.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[0] + "/"


def url_name(url: str) -> str:
    """The shard's file name in a URL or ``pipe:`` command (its last word naming a .tar; query dropped)."""
    words = url.split("?", 1)[0].split("#", 1)[0].split() or [url]
    word = next((w for w in reversed(words) if ".tar" in w), words[-1])
    return word.rstrip("/").rsplit("/", 1)[-1]


def _transient(err: BaseException) -> bool:
    """Worth a reconnect: connection trouble, timeouts, 5xx and 429; not 4xx or a bad URL."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in (408, 429)
    if isinstance(err, urllib.error.URLError):
        return isinstance(err.reason, OSError)
    return isinstance(err, (OSError, http.client.HTTPException))


class HttpShardReader:
    """A read-only file object over an http(s) URL that survives dropped connections (module docstring)."""

    def __init__(self, url: str, *, retries: int = RETRIES, timeout: float = TIMEOUT_S,
                 backoff_s: float = BACKOFF_S, on_retry: RetryHook | None = None):
        self.url, self.retries, self.timeout, self.backoff_s = url, int(retries), timeout, backoff_s
        self.on_retry = on_retry
        self.pos, self.size, self.reconnects = 0, None, 0
        self._validator: str | None = None  # ETag (or Last-Modified) of the first response
        self._resp = None
        self._with_retries(lambda: None)  # the first request, with the same reconnect rules

    # ---- connection ----
    def _connect(self) -> None:
        headers = {"User-Agent": "beit-shard-reader", "Accept-Encoding": "identity"}
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
            if self._validator:
                headers["If-Range"] = self._validator
        resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if self.pos == 0:
            self._validator = validator
        if resp.status == 206:
            start, _, total = (resp.headers.get("Content-Range", "").removeprefix("bytes ").partition("/"))
            if start.split("-")[0] != str(self.pos):
                resp.close()
                raise RemoteReadError(f"{self.url}: the server answered a request for byte {self.pos} on with "
                                      f"Content-Range {resp.headers.get('Content-Range')!r}")
            if total.isdigit():
                self.size = int(total)
        else:
            if self.pos and self._validator and validator and validator != self._validator:
                resp.close()
                raise RemoteReadError(f"{self.url} changed on the server while it was read (validator "
                                      f"{self._validator} -> {validator}); the shard's remaining samples are lost")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit():
                self.size = int(length)
            left = self.pos   # no Range support: read the start again and drop it
            while left:
                chunk = resp.read(min(left, 1 << 20))
                if not chunk:
                    resp.close()
                    raise ConnectionError(f"connection closed while skipping to byte {self.pos}")
                left -= len(chunk)
        self._resp = resp

    def _close_response(self) -> None:
        if self._resp is not None:
            try:
                self._resp.close()
            except Exception:  # noqa: BLE001 - a broken socket may fail to close; it is dropped either way
                pass
            self._resp = None

    def _with_retries(self, attempt: Callable[[], bytes | None]):
        """Run ``attempt`` (a read or the first connect), reconnecting after transient errors; up to
        ``retries`` failures in a row."""
        failures = 0
        while True:
            try:
                if self._resp is None:
                    self._connect()
                return attempt()
            except Exception as e:  # noqa: BLE001 - filtered just below
                if isinstance(e, RemoteReadError) or not _transient(e):
                    self._close_response()
                    raise
                failures += 1
                self._close_response()
                detail = f"{type(e).__name__}: {e}"
                if failures > self.retries:
                    where = f"byte {self.pos} of {self.size if self.size is not None else '?'}"
                    raise RemoteReadError(f"{self.url}: connection lost at {where} and {self.retries} reconnect(s) "
                                          f"brought no new byte (last error {detail})") from e
                self.reconnects += 1
                if self.on_retry is not None:
                    self.on_retry(self.url, self.pos, detail)
                time.sleep(min(self.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))

    def _read_some(self, n: int) -> bytes:
        def attempt() -> bytes:
            chunk = self._resp.read(n)
            if not chunk and n and self.size is not None and self.pos < self.size:
                raise ConnectionError(f"connection closed at byte {self.pos}, before the {self.size} announced")
            return chunk
        chunk = self._with_retries(attempt)
        self.pos += len(chunk)
        return chunk

    # ---- file object ----
    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest for n < 0); fewer only at the end of the file."""
        out = bytearray()
        while n < 0 or len(out) < n:
            chunk = self._read_some(1 << 20 if n < 0 else n - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._close_response()

    def __enter__(self) -> "HttpShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str, *, retries: int = RETRIES, on_retry: RetryHook | None = None) -> BinaryIO:
    """A binary file object for a shard path, ``file:`` path, http(s) URL or ``pipe:`` command.
    Raises OSError when it cannot be opened (a missing file, HTTP 404, a refused connection after
    the reconnects)."""
    if is_http(url):
        return HttpShardReader(url, retries=retries, on_retry=on_retry)
    if url.startswith("pipe:"):
        from webdataset import gopen
        return gopen(url)
    return open(url[5:] if url.startswith("file:") else url, "rb")


def read_bytes(url: str, *, retries: int = RETRIES) -> bytes:
    """The whole content of a local path or http(s) URL (a manifest, a label map)."""
    with open_shard(url, retries=retries) as f:
        return f.read()
