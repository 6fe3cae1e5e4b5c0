"""A tiny, real model format for the example: a linear or logistic model in 40-odd bytes.

File layout (all integers and floats little-endian)::

    offset  size  field
    0       8     magic: the ASCII bytes TINYMDL and a NUL byte
    8       2     format version (uint16, 1)
    10      1     kind: 0 linear (y = w.x + b), 1 logistic (y = sigmoid(w.x + b))
    11      1     reserved, 0
    12      4     n, the number of features (uint32, 1-4096)
    16      8*n   weights (float64)
    16+8n   8     bias (float64)
    24+8n   4     CRC-32 of every byte before it (uint32)

:func:`load` is strict: a wrong magic, version, kind, length, checksum or a non-finite
number raises :class:`FormatError`, so a corrupt file is never served. Stdlib only.

Example::

    weights, bias = train([[1.0, 2.0], [2.0, 0.5]], [3.0, 2.1])
    write("model.tmdl", weights, bias)
    load("model.tmdl").predict([1.0, 2.0])
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAGIC = b"TINYMDL\x00"
"""The first eight bytes of every file."""

FORMAT_VERSION = 1
"""The only format version this module reads and writes."""

MAX_FEATURES = 4096
"""The most features a model may have."""

Kind = Literal["linear", "logistic"]
_KINDS: tuple[Kind, ...] = ("linear", "logistic")
_HEADER = struct.Struct("<8sHBBI")
_CRC = struct.Struct("<I")


class FormatError(ValueError):
    """The file is not a valid tinymodel file (truncated, corrupt, wrong version...)."""


@dataclass(frozen=True)
class Model:
    """A loaded model: immutable, safe to share between threads."""

    weights: tuple[float, ...]
    """One weight per feature."""
    bias: float
    """The intercept."""
    kind: Kind = "linear"
    """``linear``: the raw score; ``logistic``: the score through a sigmoid."""

    def predict(self, features: Sequence[float]) -> float:
        """Return the prediction for one feature vector.

        Raises:
            ValueError: ``features`` has the wrong length or a non-finite value.

        """
        if len(features) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} features, got {len(features)}")
        if not all(math.isfinite(x) for x in features):
            raise ValueError("features must be finite numbers")
        score = math.fsum(w * x for w, x in zip(self.weights, features, strict=True)) + self.bias
        if self.kind == "logistic":
            return _sigmoid(score)
        return score


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def encode(weights: Sequence[float], bias: float, kind: Kind = "linear") -> bytes:
    """Return the file bytes of a model.

    Raises:
        ValueError: No weights, too many, a non-finite number or an unknown kind.

    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, not {kind!r}")
    if not 1 <= len(weights) <= MAX_FEATURES:
        raise ValueError(f"a model has 1-{MAX_FEATURES} weights, not {len(weights)}")
    values = [float(w) for w in weights] + [float(bias)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("weights and bias must be finite numbers")
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, _KINDS.index(kind), 0, len(weights))
    body += struct.pack(f"<{len(values)}d", *values)
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes) -> Model:
    """Parse and validate file bytes.

    Raises:
        FormatError: The bytes are not a valid tinymodel file.

    """
    if len(data) < _HEADER.size:
        raise FormatError(f"truncated: {len(data)} bytes, shorter than the header")
    magic, version, kind, reserved, n = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"bad magic {magic!r}: not a tinymodel file")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported format version {version} (this reads {FORMAT_VERSION})")
    if kind >= len(_KINDS) or reserved != 0:
        raise FormatError(f"bad header: kind {kind}, reserved {reserved}")
    if not 1 <= n <= MAX_FEATURES:
        raise FormatError(f"bad feature count {n}")
    expected = _HEADER.size + 8 * (n + 1) + _CRC.size
    if len(data) != expected:
        raise FormatError(f"bad length: {len(data)} bytes, expected {expected} for {n} features")
    (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
    if crc != zlib.crc32(data[: expected - _CRC.size]):
        raise FormatError("checksum mismatch: the file is corrupt")
    values = struct.unpack_from(f"<{n + 1}d", data, _HEADER.size)
    if not all(math.isfinite(v) for v in values):
        raise FormatError("non-finite weight or bias")
    return Model(weights=tuple(values[:n]), bias=values[n], kind=_KINDS[kind])


def write(path: str | os.PathLike[str], weights: Sequence[float], bias: float,
          kind: Kind = "linear") -> Path:
    """Write a model file atomically (temporary file, fsync, rename) and return its path."""
    target = Path(path)
    data = encode(weights, bias, kind)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load(path: str | os.PathLike[str]) -> Model:
    """Read and validate a model file; the loader to give a model watcher.

    Raises:
        FormatError: The file is not a valid tinymodel file.
        OSError: It cannot be read.

    """
    with open(path, "rb") as f:
        data = f.read(_HEADER.size + 8 * (MAX_FEATURES + 1) + _CRC.size + 1)
    return decode(data)


def train(xs: Sequence[Sequence[float]], ys: Sequence[float], *, epochs: int = 2000,
          learning_rate: float = 0.05) -> tuple[list[float], float]:
    """Fit a linear model to ``(xs, ys)`` by full-batch gradient descent on squared error.

    Returns:
        ``(weights, bias)``, ready for :func:`write`.

    Raises:
        ValueError: No samples, or rows of different lengths.

    """
    if not xs or len(xs) != len(ys):
        raise ValueError("need as many targets as samples, and at least one sample")
    n = len(xs[0])
    if n == 0 or any(len(row) != n for row in xs):
        raise ValueError("every sample needs the same, non-zero number of features")
    weights, bias, m = [0.0] * n, 0.0, len(xs)
    for _ in range(epochs):
        errors = [sum(w * x for w, x in zip(weights, row, strict=True)) + bias - y
                  for row, y in zip(xs, ys, strict=True)]
        for j in range(n):
            weights[j] -= learning_rate * 2 / m * sum(e * row[j] for e, row in
                                                      zip(errors, xs, strict=True))
        bias -= learning_rate * 2 / m * sum(errors)
    return weights, bias
