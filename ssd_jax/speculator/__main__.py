"""python -m ssd_jax.speculator: the draft side of SSD in a process (or on a host) of its own.

An Engine whose ssd runs in a process (`Placement(kind="process")`) starts one as its child
(`--connect`, pinned with `--cores` before JAX starts here, so XLA's thread pool is sized to
those cores); for another process or host start it by hand and point the target at it
(`python -m ssd_jax.run --speculator HOST:PORT`):

  python -m ssd_jax.speculator --listen 127.0.0.1:7100 --draft smollm2-135m-draft-wide --cores 1

It serves only the drafts it is started with (--draft, registry names or paths: the same files
on both hosts). A target first proves it holds the speculator's token (--token-file, or the
environment variable SSD_JAX_SPECULATOR_TOKEN; required to listen beyond loopback) and names one
of those drafts (see handshake.py); the speculator then loads it, answers the target's rounds
(first proposal, expand, lookup, backups) and is done when its target says bye, when the
connection drops, or when its parent process is gone. With --listen it then serves the next
target (until --once, or Ctrl-C); a connection that does not complete the handshake within a
few seconds, or sends what is not the protocol, is dropped with a log line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import queue
import socket
import sys
import threading
import time

from ssd_jax.speculator import auth

MAX_PENDING = 32  # handshakes under way at once; a flood of silent connections waits no longer


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m ssd_jax.speculator", description=__doc__.split("\n\n")[0]
  )
  where = p.add_mutually_exclusive_group(required=True)
  where.add_argument("--listen", metavar="HOST:PORT", help="wait for targets here")
  where.add_argument("--connect", metavar="HOST:PORT", help="connect to the target (a child)")
  p.add_argument(
    "--draft",
    action="append",
    required=True,
    metavar="NAME|PATH",
    help="a draft this speculator serves (repeatable): a registry name, or a path compared "
    "resolved; a target asking for another is refused",
  )
  p.add_argument(
    "--token-file",
    metavar="PATH",
    help=f"the secret a target must prove it holds (default: ${auth.TOKEN_ENV}); required to "
    f"listen beyond loopback. Make one: {auth.MAKE_TOKEN}",
  )
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
  try:
    token = auth.token_from(args.token_file)
  except ValueError as e:
    parser.error(str(e))
  os.environ.pop(auth.TOKEN_ENV, None)  # read: nothing this process starts inherits it
  if args.listen and token is None and not auth.is_loopback(_address(args.listen, parser)[0]):
    parser.error(auth.no_token_message(args.listen))
  if args.cores:
    try:
      cores = {int(c) for c in args.cores.split(",")}
      os.sched_setaffinity(0, cores)  # before JAX starts: its thread pool takes these cores
    except (ValueError, OSError) as e:
      parser.error(f"--cores {args.cores}: {e}")
  from ssd_jax.models.registry import known_models  # noqa: PLC0415 (after pinning)
  from ssd_jax.speculator.process import exit_with_parent  # noqa: PLC0415
  from ssd_jax.speculator.worker import serve_connection  # noqa: PLC0415

  try:
    drafts = auth.Drafts.of(args.draft, known_models())
  except ValueError as e:
    parser.error(str(e))
  if args.parent:
    exit_with_parent(args.parent, remove=args.log)
  for module in args.extension:
    importlib.import_module(module)

  if args.connect:
    sock = socket.create_connection(_address(args.connect, parser), timeout=30)
    serve_connection(sock, token, drafts)
    if args.log:  # a goodbye: the parent needs no last output, and may be gone before it unlinks
      with contextlib.suppress(OSError):
        os.unlink(args.log)
    return 0
  return listen(_address(args.listen, parser), args.listen, token, drafts, once=args.once)


def listen(address: tuple[str, int], name: str, token: str | None, drafts, once: bool) -> int:
  """Serve targets one at a time; handshakes run beside, each in a thread of its own, so that a
  connection that stalls or sends garbage delays nobody: only admitted targets queue here."""
  from ssd_jax.speculator.worker import serve_request  # noqa: PLC0415

  listener = socket.create_server(address)
  admitted: queue.Queue = queue.Queue()
  threading.Thread(
    target=_admit_all, args=(listener, token, drafts, admitted), name="admit", daemon=True
  ).start()
  print(f"ssd_jax speculator listening on {name} (pid {os.getpid()})", flush=True)
  if token is None:
    _log(f"no token: any process that reaches {name} on this host may use this speculator")
  while True:
    conn, request, who = admitted.get()
    _log(f"serving {who}: draft {request.draft}")
    try:
      serve_request(conn, request)
      _log(f"target {who} is done")
    except Exception as e:  # one target's failure must not stop a listener
      _log(f"target {who} ended with {e!r}")
    if once:
      return 0


def _admit_all(listener: socket.socket, token, drafts, admitted: queue.Queue) -> None:
  pending = threading.BoundedSemaphore(MAX_PENDING)
  while True:
    try:
      sock, peer = listener.accept()
    except OSError as e:  # out of file descriptors, say: wait, and keep listening
      _log(f"cannot accept a connection ({e})")
      time.sleep(1)
      continue
    who = f"{peer[0]}:{peer[1]}"
    if not pending.acquire(blocking=False):
      _log(f"dropped {who}: {MAX_PENDING} handshakes are under way")
      sock.close()
      continue
    threading.Thread(
      target=_admit, args=(sock, who, token, drafts, admitted, pending), daemon=True
    ).start()


def _admit(sock, who: str, token, drafts, admitted: queue.Queue, pending) -> None:
  """One connection's handshake: admitted, it queues for the listener; else it is logged."""
  from ssd_jax.speculator.channel import ChannelError, RefusedError  # noqa: PLC0415
  from ssd_jax.speculator.worker import accept  # noqa: PLC0415

  try:
    conn, request = accept(sock, token, drafts)
    admitted.put((conn, request, who))
  except RefusedError as e:
    _log(f"refused {who}: {e}")
  except ChannelError as e:
    _log(f"dropped {who}: {e}")
  except Exception as e:  # a bug here must not take the listener down
    _log(f"dropped {who}: {e!r}")
  finally:
    pending.release()


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    sys.exit(130)
