"""python -m ssd_jax.speculator: the draft side of SSD in a process (or on a host) of its own.

An Engine whose ssd runs in a process (`Placement(kind="process")`) starts one as its child
(`--connect`, pinned with `--cores` before JAX starts here, so XLA's thread pool is sized to
those cores); for another process or host start it by hand and point the target at it
(`python -m ssd_jax.run --speculator HOST:PORT`):

  python -m ssd_jax.speculator --listen 127.0.0.1:7100 --cores 1

It loads the draft the target names (registry name or path, the same files on both hosts),
answers the target's rounds (first proposal, expand, lookup, backups) and exits when its target
says bye, when the connection drops, or when its parent process is gone. With --listen it then
waits for the next target (until --once, or Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import socket
import sys


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m ssd_jax.speculator", description=__doc__.split("\n\n")[0]
  )
  where = p.add_mutually_exclusive_group(required=True)
  where.add_argument("--listen", metavar="HOST:PORT", help="wait for targets here")
  where.add_argument("--connect", metavar="HOST:PORT", help="connect to the target (a child)")
  p.add_argument("--cores", help="CPU cores to run on, e.g. 1 or 2,3 (default: all)")
  p.add_argument("--parent", type=int, help="exit when this process is gone")
  p.add_argument("--log", help=argparse.SUPPRESS)  # the parent's log file for us: ours to remove
  p.add_argument("--once", action="store_true", help="with --listen: serve one target, then exit")
  p.add_argument(
    "--extension",
    action="append",
    default=[],
    metavar="MODULE",
    help="import MODULE at start-up: operations it registers are answered beside the protocol's "
    "(the benchmarks' probes)",
  )
  return p


def _address(text: str, parser) -> tuple[str, int]:
  host, _, port = text.rpartition(":")
  if not host or not port.isdigit():
    parser.error(f"expected HOST:PORT, got {text!r}")
  return host, int(port)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.cores:
    try:
      cores = {int(c) for c in args.cores.split(",")}
      os.sched_setaffinity(0, cores)  # before JAX starts: its thread pool takes these cores
    except (ValueError, OSError) as e:
      parser.error(f"--cores {args.cores}: {e}")
  from ssd_jax.speculator.process import exit_with_parent  # noqa: PLC0415 (after pinning)
  from ssd_jax.speculator.worker import serve_connection  # noqa: PLC0415

  if args.parent:
    exit_with_parent(args.parent, remove=args.log)
  for module in args.extension:
    importlib.import_module(module)

  if args.connect:
    sock = socket.create_connection(_address(args.connect, parser), timeout=30)
    sock.settimeout(None)
    serve_connection(sock)
    if args.log:  # a goodbye: the parent needs no last output, and may be gone before it unlinks
      with contextlib.suppress(OSError):
        os.unlink(args.log)
    return 0
  listener = socket.create_server(_address(args.listen, parser))
  print(f"ssd_jax speculator listening on {args.listen} (pid {os.getpid()})", flush=True)
  while True:
    sock, peer = listener.accept()
    print(f"serving {peer[0]}:{peer[1]}", flush=True)
    try:
      serve_connection(sock)
    except Exception as e:  # one target's failure must not stop a listener
      print(f"target {peer[0]}:{peer[1]} ended with {e!r}", file=sys.stderr, flush=True)
    if args.once:
      return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    sys.exit(130)
