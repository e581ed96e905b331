"""The command line: `python -m tools.triton_cpu setup | twin | serve` (`make triton-cpu` runs setup)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tools.triton_cpu.errors import TritonCpuError
from tools.triton_cpu.home import TRITONSERVER_VERSION
from tools.triton_cpu.install import setup
from tools.triton_cpu.server import start
from tools.triton_cpu.twin import write_twin


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    home = setup(args.home, install=False)
    # Triton runs in its own process group: stop it on Ctrl-C (even where the shell started us with
    # SIGINT ignored, as background jobs are), on SIGTERM and when the terminal goes away.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    with tempfile.TemporaryDirectory(prefix="ctl-triton-twin-") as tmp:
        twin = write_twin(args.repo, Path(tmp) / "repo")
        server = start(
            home,
            twin,
            grpc_port=args.grpc_port,
            address=args.address,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
        )
        try:
            server.wait_ready(args.timeout)
            models = ", ".join(server.models)
            print(f"Triton {TRITONSERVER_VERSION} ready: gRPC {server.grpc_url}, models {models}")
            print("Ctrl-C stops it.")
            sys.stdout.flush()
            code = server.wait()
            print(f"tritonserver exited by itself with status {code}", file=sys.stderr)
            return code or 1
        except KeyboardInterrupt:
            print("stopping Triton ...")
            return 0
        finally:
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.triton_cpu",
        description="Triton (from the nvidia-pytriton wheel) on this CPU, serving exported encoders.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the output of pip")
    sub = parser.add_subparsers(dest="command", required=True)
    home_help = "Triton home (default: $CTL_TRITON_HOME or <checkout>/.triton-cpu)"
    p_setup = sub.add_parser(
        "setup", help="download and install Triton and its Python environment (idempotent)"
    )
    p_setup.add_argument("--home", type=Path, default=None, help=home_help)
    p_twin = sub.add_parser("twin", help="write the CPU twin of an exported repository")
    p_twin.add_argument("--repo", type=Path, required=True, help="repository written by `ctl export`")
    p_twin.add_argument("--out", type=Path, required=True)
    p_serve = sub.add_parser("serve", help="serve an exported repository (as its CPU twin) until Ctrl-C")
    p_serve.add_argument("--repo", type=Path, required=True, help="repository written by `ctl export`")
    p_serve.add_argument("--home", type=Path, default=None, help=home_help)
    p_serve.add_argument("--grpc-port", type=int, default=8001)
    p_serve.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0: all interfaces)")
    p_serve.add_argument("--http-port", type=int, default=None, help="also serve HTTP on this port")
    p_serve.add_argument("--metrics-port", type=int, default=None, help="also serve metrics on this port")
    p_serve.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        if args.command == "setup":
            home = setup(args.home)
            print(f"Triton CPU home: {home.home}")
        elif args.command == "twin":
            print(write_twin(args.repo, args.out))
        else:
            return _serve(args)
    except TritonCpuError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
