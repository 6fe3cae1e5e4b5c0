"""Fetch model artifacts and verify them before anything loads them.

An artifact is streamed from its URI into a temporary file next to its final place while its
sha256 and size are computed on the fly; only when both match the registered
:class:`~modelreg.v1.resources_pb2.ModelVersion` is it renamed to ``{cache_dir}/{sha256}``. A
mismatch deletes the temporary file and raises :class:`DigestMismatchError`, so an unverified
file is never handed to a loader. Cached files are verified again before reuse.

``file://`` and ``http(s)://`` are built in. Other schemes plug in as a ``{scheme: fetcher}``
mapping; a :class:`Fetcher` is a plain blocking callable that writes the artifact's bytes into
the file object it is given (run in a worker thread), which is what most storage SDKs expect::

    import boto3
    from modelreg.client.artifacts import ArtifactWriter, fetch_artifact

    s3 = boto3.client("s3")

    def fetch_s3(uri: str, out: ArtifactWriter) -> None:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        s3.download_fileobj(bucket, key, out)

    path = fetch_artifact(mv.artifact_uri, cache_dir, sha256=mv.sha256,
                          size_bytes=mv.size_bytes, fetchers={"s3": fetch_s3})

Errors::

    ArtifactError                root of everything raised here
    ├── UnsupportedSchemeError   no fetcher for the URI's scheme
    ├── ArtifactFetchError       the fetcher failed (I/O error, HTTP status, ...)
    ├── FetchCancelledError      the caller cancelled the transfer
    └── DigestMismatchError      sha256 or size differs from the registered one
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

CHUNK_SIZE = 1 << 20
"""Bytes read and written at a time by the built-in fetchers."""

HTTP_TIMEOUT = 60.0
"""Seconds the built-in http(s) fetcher waits for a connection or for the next bytes."""


class ArtifactError(Exception):
    """Root of the errors raised while fetching or verifying an artifact.

    Attributes:
        uri: The artifact URI.

    """

    def __init__(self, message: str, *, uri: str) -> None:
        super().__init__(message)
        self.uri = uri


class UnsupportedSchemeError(ArtifactError):
    """No fetcher is registered for the URI's scheme."""


class ArtifactFetchError(ArtifactError):
    """The fetcher failed: unreadable file, HTTP error status, connection reset, ..."""


class DigestMismatchError(ArtifactError):
    """The bytes fetched are not the registered artifact; the file has been deleted.

    Attributes:
        expected_sha256: The registered digest.
        actual_sha256: The digest of the bytes fetched (``""`` when the size check stopped the
            transfer first).
        expected_size: The registered size in bytes.
        actual_size: The bytes fetched (at least this many when the transfer was stopped).

    """

    def __init__(
        self,
        message: str,
        *,
        uri: str,
        expected_sha256: str,
        actual_sha256: str,
        expected_size: int,
        actual_size: int,
    ) -> None:
        super().__init__(message, uri=uri)
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        self.expected_size = expected_size
        self.actual_size = actual_size


class ArtifactWriter(Protocol):
    """Where a fetcher writes an artifact's bytes: a write-only, non-seekable binary file."""

    def write(self, data: ReadableBuffer, /) -> int:
        """Append ``data``; return how many bytes were written."""
        ...


class Fetcher(Protocol):
    """Copies the artifact at ``uri`` into ``out``; blocking, run in a worker thread.

    Raise any exception on failure; it is reported as :class:`ArtifactFetchError`. Writing more
    bytes than the registered size stops the transfer early with :class:`DigestMismatchError`.
    """

    def __call__(self, uri: str, out: ArtifactWriter, /) -> None:
        """Write every byte of the artifact at ``uri`` into ``out``."""
        ...


class FetchCancelledError(ArtifactError):
    """The caller cancelled the transfer (a newer version superseded it, or shutdown)."""


class _HashingWriter(io.RawIOBase):
    """Writes to a file while hashing and counting; refuses bytes beyond the expected size."""

    def __init__(
        self, file: io.BufferedWriter, uri: str, sha256: str, size: int, cancel: threading.Event
    ) -> None:
        super().__init__()
        self._file = file
        self._uri = uri
        self._sha256 = sha256
        self._size = size
        self._cancel = cancel
        self.hash = hashlib.sha256()
        self.written = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b: ReadableBuffer, /) -> int:
        if self._cancel.is_set():
            raise FetchCancelledError("artifact transfer cancelled", uri=self._uri)
        view = memoryview(b).cast("B")
        n = len(view)
        if self.written + n > self._size:
            raise DigestMismatchError(
                f"{self._uri}: more than the registered {self._size} bytes",
                uri=self._uri,
                expected_sha256=self._sha256,
                actual_sha256="",
                expected_size=self._size,
                actual_size=self.written + n,
            )
        self.hash.update(view)
        self._file.write(view)
        self.written += n
        return n


def fetch_file(uri: str, out: ArtifactWriter) -> None:
    """Copy a local ``file://`` artifact (``file:///abs/path`` or ``file://localhost/...``)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file URI names a remote host {parsed.netloc!r}")
    path = urllib.request.url2pathname(parsed.path)
    with open(path, "rb") as src:
        shutil.copyfileobj(src, out, CHUNK_SIZE)


def fetch_http(uri: str, out: ArtifactWriter, *, timeout: float = HTTP_TIMEOUT) -> None:
    """Download an ``http://`` or ``https://`` artifact with urllib (redirects are followed)."""
    with urllib.request.urlopen(uri, timeout=timeout) as response:
        shutil.copyfileobj(response, out, CHUNK_SIZE)


BUILTIN_FETCHERS: Mapping[str, Fetcher] = MappingProxyType(
    {"file": fetch_file, "http": fetch_http, "https": fetch_http}
)
"""The fetchers every caller gets, by URI scheme; a caller's own mapping adds or overrides."""


def resolve_fetcher(uri: str, fetchers: Mapping[str, Fetcher] | None = None) -> Fetcher:
    """Return the fetcher for ``uri``'s scheme: ``fetchers`` first, then the built-in ones.

    Raises:
        UnsupportedSchemeError: Neither knows the scheme.

    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    fetcher = (fetchers or {}).get(scheme) or BUILTIN_FETCHERS.get(scheme)
    if fetcher is None:
        known = sorted({*BUILTIN_FETCHERS, *(fetchers or {})})
        raise UnsupportedSchemeError(
            f"no fetcher for scheme {scheme!r} of {uri!r} (known: {', '.join(known)})", uri=uri
        )
    return fetcher


def file_sha256(path: Path) -> str:
    """Return the lowercase hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_artifact(
    uri: str,
    dest_dir: Path,
    *,
    sha256: str,
    size_bytes: int,
    fetchers: Mapping[str, Fetcher] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Fetch and verify an artifact into ``dest_dir/{sha256}``; blocking (use a thread).

    A file already there is reused when its size and digest still match (otherwise replaced).
    The transfer goes to a uniquely named temporary file in ``dest_dir`` and is renamed only
    once verified, so concurrent fetches of the same artifact are safe.

    Args:
        uri: Where the artifact lives (``ModelVersion.artifact_uri``).
        dest_dir: Directory of verified artifacts; created if missing.
        sha256: The registered lowercase hex digest (``ModelVersion.sha256``).
        size_bytes: The registered size (``ModelVersion.size_bytes``).
        fetchers: Extra or overriding fetchers by scheme.
        cancel: When set, the transfer stops at its next write with
            :class:`FetchCancelledError`.

    Returns:
        The path of the verified artifact.

    Raises:
        UnsupportedSchemeError: No fetcher for the scheme.
        ArtifactFetchError: The fetcher failed.
        DigestMismatchError: The bytes are not the registered artifact; nothing is kept.
        FetchCancelledError: ``cancel`` was set.

    """
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ArtifactError(f"cannot verify {uri!r}: bad digest {sha256!r}", uri=uri)
    fetcher = resolve_fetcher(uri, fetchers)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / sha256
    if _cached_ok(final, sha256, size_bytes):
        return final

    tmp = dest_dir / f".{sha256[:16]}.{uuid.uuid4().hex}.part"
    try:
        with tmp.open("wb") as f:
            writer = _HashingWriter(f, uri, sha256, size_bytes, cancel or threading.Event())
            try:
                fetcher(uri, writer)
            except ArtifactError:
                raise
            except Exception as err:
                raise ArtifactFetchError(f"fetching {uri!r} failed: {err}", uri=uri) from err
        actual = writer.hash.hexdigest()
        if writer.written != size_bytes or actual != sha256:
            what = "sha256" if writer.written == size_bytes else "size"
            raise DigestMismatchError(
                f"{uri}: {what} mismatch (expected {size_bytes} bytes sha256 {sha256}, "
                f"got {writer.written} bytes sha256 {actual})",
                uri=uri,
                expected_sha256=sha256,
                actual_sha256=actual,
                expected_size=size_bytes,
                actual_size=writer.written,
            )
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return final


def _cached_ok(path: Path, sha256: str, size_bytes: int) -> bool:
    """Tell whether ``path`` holds the artifact; delete it if it holds something else."""
    try:
        if path.stat().st_size == size_bytes and file_sha256(path) == sha256:
            return True
    except FileNotFoundError:
        return False
    path.unlink(missing_ok=True)
    return False
