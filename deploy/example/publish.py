"""Write a tinymodel artifact and register it as the next version of a model.

The artifact is written to ``OUT/{model}-{sha256[:16]}.tmdl`` (content-addressed, so a
registered file is never overwritten by a later publish), its sha256 and size computed, and
``CreateModelVersion`` called with its ``file://`` URI; the model is created first if missing.
Prints the new version number, and only that, on stdout::

    python deploy/example/publish.py --model fraud-detector --weights 0.5,1.2 --bias 0.1
    python deploy/example/publish.py --model fraud-detector --train data.csv   # x1,...,xn,y

Exit codes: 0 registered, 1 refused by the server, 2 usage error, 3 server unavailable.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import tinymodel

from modelreg.client import (
    DEFAULT_TARGET,
    DeadlineExceededError,
    NotFoundError,
    RegistryClient,
    RegistryError,
    UnavailableError,
)


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def _read_training_csv(path: Path) -> tuple[list[list[float]], list[float]]:
    xs: list[list[float]] = []
    ys: list[float] = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and not row[0].lstrip().startswith("#"):
                *features, target = (float(cell) for cell in row)
                xs.append(features)
                ys.append(target)
    return xs, ys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("MODELREG_TARGET", DEFAULT_TARGET),
                        help="modelreg server host:port (default %(default)s)")
    parser.add_argument("--actor", default=None, help="who publishes, for the audit trail")
    parser.add_argument("--model", default="fraud-detector", help="model id (%(default)s)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=_floats, help="comma-separated weights: 0.5,1.2")
    source.add_argument("--train", type=Path, metavar="CSV",
                        help="fit a linear model to rows x1,...,xn,y instead")
    parser.add_argument("--bias", type=float, default=0.0, help="with --weights (0.0)")
    parser.add_argument("--kind", choices=["linear", "logistic"], default="linear")
    parser.add_argument("--out", type=Path, default=Path("artifacts"),
                        help="directory for the artifact (%(default)s)")
    parser.add_argument("--description", default="", help="the version's description")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.train is not None:
        try:
            weights, bias = tinymodel.train(*_read_training_csv(args.train))
        except (OSError, ValueError) as err:
            print(f"publish: cannot train on {args.train}: {err}", file=sys.stderr)
            return 2
    else:
        weights, bias = args.weights, args.bias
    try:
        data = tinymodel.encode(weights, bias, args.kind)
    except ValueError as err:
        print(f"publish: {err}", file=sys.stderr)
        return 2
    sha256 = hashlib.sha256(data).hexdigest()
    args.out.mkdir(parents=True, exist_ok=True)
    path = tinymodel.write(args.out / f"{args.model}-{sha256[:16]}.tmdl", weights, bias,
                           args.kind).resolve()
    tinymodel.load(path)  # what the watcher will do, before anything is registered

    try:
        with RegistryClient(args.target, actor=args.actor) as registry:
            try:
                registry.get_model(args.model)
            except NotFoundError:
                registry.create_model(args.model, description="tinymodel example")
            created = registry.create_version(
                args.model,
                artifact_uri=path.as_uri(),
                sha256=sha256,
                size_bytes=len(data),
                framework=f"tinymodel-{tinymodel.FORMAT_VERSION}",
                signature=f"{args.kind}: {len(weights)} float features -> float",
                params={"weights": ",".join(repr(float(w)) for w in weights),
                        "bias": repr(float(bias)), "kind": args.kind},
                description=args.description,
            )
    except (UnavailableError, DeadlineExceededError) as err:
        print(f"publish: server unavailable at {args.target}: {err}", file=sys.stderr)
        return 3
    except RegistryError as err:
        print(f"publish: refused: {err}", file=sys.stderr)
        return 1
    version = created.model_version.version
    print(f"registered {args.model} v{version}: {path} ({len(data)} bytes, sha256 {sha256})",
          file=sys.stderr)
    print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
