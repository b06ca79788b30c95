"""The hello between a target and a speculator (channel protocol 3): each end proves it holds the
token, then the target names the draft; the speculator loads nothing and connects nowhere before
the target's proof has checked out and the draft is one it serves.

  target -> speculator  hello      protocol, token (whether it holds one), challenge tc
  speculator -> target  challenge  protocol, token, challenge sc (with a token)
  target -> speculator  proof      HMAC-SHA256(token, "target", sc, tc)
  speculator -> target  proof      HMAC-SHA256(token, "speculator", sc, tc)
  target -> speculator  load       draft, dtype, draft_vocab, attention_impl, pipe,
                                   transfer_address (the target's, with the transfer pipe)
  speculator -> target  ready      pid, config, head_size, transfer_address (the draft loaded)

The speculator refuses another protocol, a target without its token or with another one, a draft
it does not serve, a transfer address not on the target's own host, and any malformed field; the
target refuses a speculator with a token when it holds none or the other way round, and one whose
proof is not its token's. Without a token on either end (a loopback address) the proofs are left
out. A refusal is a `refused` message giving the reason and what to do, then the connection
closes; each end raises `RefusedError`. The speculator gives a connection HANDSHAKE_SECONDS, from
connecting to its load request, and takes at most HANDSHAKE_LIMIT bytes a message before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import time
from typing import Any, NoReturn

from ssd_jax.speculator import auth
from ssd_jax.speculator.channel import (
  MESSAGE_LIMIT,
  PROTOCOL,
  ChannelError,
  Connection,
  RefusedError,
)

HANDSHAKE_SECONDS = 5.0  # the speculator's patience, connection to load request
HANDSHAKE_LIMIT = 4096  # bytes a handshake message may have (the hello's is about 150)
TARGET_WAIT = 30.0  # the target's patience for each handshake answer (a busy host answers late)
DTYPES = ("float32", "float16", "bfloat16")
PIPES = ("shm", "transfer")

GIVE_TOKEN = (
  "give the target the speculator's token (python -m ssd_jax.run --speculator-token-file PATH, "
  f"Placement(address=..., token_file=PATH), or {auth.TOKEN_ENV})"
)


@dataclasses.dataclass(frozen=True)
class Request:
  """What an admitted target asked the speculator for.

  Attributes:
    draft: what to load: a registry name or a resolved path the speculator serves.
    dtype: the draft's params' dtype.
    draft_vocab: its head (as `Engine(draft_vocab=)`).
    pipe: "shm" or "transfer".
    transfer_address: the target's transfer server (with "transfer"), on the target's own host.
  """

  draft: str
  dtype: str
  draft_vocab: int | tuple[int, ...] | None
  pipe: str
  transfer_address: str | None


def admit(conn: Connection, token: str | None, drafts: auth.Drafts, peer: str) -> Request:
  """The speculator's side, up to the load request: the target's `Request` once it has proven
  the token (if this speculator has one) and asked for what is served here. `peer`: the
  target's address as this connection sees it.

  Raises:
    RefusedError: sent to the target as well; ChannelError: the target broke off or took too long.
  """
  deadline = time.monotonic() + HANDSHAKE_SECONDS

  def receive(op: str, limit: int = HANDSHAKE_LIMIT) -> dict[str, Any]:
    try:
      message = conn.receive(timeout=max(deadline - time.monotonic(), 0.0), limit=limit)
    except ChannelError:
      if time.monotonic() < deadline:
        raise
      raise ChannelError(
        f"the handshake did not complete within {HANDSHAKE_SECONDS:.0f} s"
      ) from None
    if message.get("op") != op:
      refuse(conn, f"expected the target's {op}, got {str(message.get('op'))[:40]!r}")
    return message

  hello = receive("hello")
  if hello.get("protocol") != PROTOCOL:
    refuse(
      conn,
      f"this speculator speaks protocol {PROTOCOL}, the target {str(hello.get('protocol'))[:20]}: "
      "run the same ssd_jax on both ends",
    )
  if token is None:
    conn.send({"op": "challenge", "protocol": PROTOCOL, "token": False})
  else:
    _prove_to_target(conn, token, hello, receive)
  try:
    return request(receive("load", MESSAGE_LIMIT), drafts, peer)
  except ValueError as e:
    refuse(conn, str(e))


def _prove_to_target(conn: Connection, token: str, hello: dict[str, Any], receive) -> None:
  """Challenge the target, check its proof, then prove this side's."""
  if hello.get("token") is not True:
    refuse(conn, f"this speculator asks for a token and the target sent none: {GIVE_TOKEN}")
  target_challenge = hello.get("challenge")
  if not auth.is_challenge(target_challenge):
    refuse(conn, "the target's challenge is malformed")
  challenge = auth.new_challenge()
  conn.send({"op": "challenge", "protocol": PROTOCOL, "token": True, "challenge": challenge})
  claimed = receive("proof").get("proof")
  if not auth.verify(token, "target", challenge, target_challenge, claimed):
    refuse(
      conn,
      "the target's token is not this speculator's (its proof does not match): give both ends "
      "the same token",
    )
  conn.send({"op": "proof", "proof": auth.prove(token, "speculator", challenge, target_challenge)})


def request(message: dict[str, Any], drafts: auth.Drafts, peer: str) -> Request:
  """The load request `message` checked field by field (ValueError says what is wrong)."""
  asked = message.get("draft")
  draft = drafts.find(asked)
  if draft is None:
    raise ValueError(
      f"draft {str(asked)[:200]!r} is not served here: this speculator serves "
      f"{', '.join(drafts.given)} (start one with --draft for another)"
    )
  dtype, vocab, pipe = message.get("dtype"), message.get("draft_vocab"), message.get("pipe")
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {str(dtype)[:20]!r}")
  if pipe not in PIPES:
    raise ValueError(f"pipe must be shm or transfer, got {str(pipe)[:20]!r}")
  if pipe == "shm" and not auth.is_loopback(peer):
    raise ValueError("shared memory needs the target on this host: use the transfer pipe")
  address = message.get("transfer_address") if pipe == "transfer" else None
  if pipe == "transfer":
    check_transfer_address(address, peer, "the target")
  return Request(draft, dtype, _vocab(vocab), pipe, address)


def _vocab(value) -> int | tuple[int, ...] | None:
  """A draft head: None, a count, or token ids."""
  if value is None:
    return None
  if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
    return value
  if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    return tuple(value)
  raise ValueError(f"draft_vocab must be a count or token ids, got {str(value)[:40]}")


def check_transfer_address(address, peer: str, whose: str) -> None:
  """A transfer address ("host:port") must be on `peer`, the host at the other end of this
  connection: neither end connects anywhere else for the other."""
  host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
  if not port.isdigit() or not 0 < int(port) < 65536 or not _same_host(host, peer):
    raise ValueError(
      f"the transfer address {str(address)[:80]!r} is not {whose}'s own address ({peer})"
    )


def _same_host(host: str, peer: str) -> bool:
  try:
    a, b = ipaddress.ip_address(host.strip("[]")), ipaddress.ip_address(peer)
  except ValueError:
    return False
  unmap = lambda ip: getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:1.2.3.4 is 1.2.3.4
  return unmap(a) == unmap(b)


def refuse(conn: Connection, reason: str) -> NoReturn:
  """Tell the peer why it is not let in, then raise `RefusedError` here."""
  with contextlib.suppress(Exception):  # it may be gone already: the reason is logged here
    conn.send({"op": "refused", "message": reason})
  raise RefusedError(reason)


def introduce(conn: Connection, token: str | None, where: str) -> None:
  """The target's side, up to the load request: hello, then (with a token) both proofs.
  `where` names the speculator in errors ("the speculator at HOST:PORT").

  Raises:
    RefusedError: either end would not go on; the message says why and what to do.
  """
  target_challenge = auth.new_challenge()
  hello = {"op": "hello", "protocol": PROTOCOL, "token": token is not None}
  conn.send(hello | {"challenge": target_challenge})
  challenge = _answer(conn, "challenge", where)
  if challenge.get("protocol") != PROTOCOL:
    raise RefusedError(
      f"{where} speaks protocol {challenge.get('protocol')}, this target {PROTOCOL}: run the "
      "same ssd_jax on both ends"
    )
  if challenge.get("token") is not True:
    if token is not None:
      raise RefusedError(
        f"{where} runs without a token but this target holds one: start it with --token-file "
        "holding the same token (or give this target none)"
      )
    return
  if token is None:  # the speculator refuses first; this is a peer that does not
    raise RefusedError(f"{where} asks for a token: {GIVE_TOKEN}")
  speculator_challenge = challenge.get("challenge")
  if not auth.is_challenge(speculator_challenge):
    raise RefusedError(f"{where} sent a malformed challenge")
  proof = auth.prove(token, "target", speculator_challenge, target_challenge)
  conn.send({"op": "proof", "proof": proof})
  claimed = _answer(conn, "proof", where).get("proof")
  if not auth.verify(token, "speculator", speculator_challenge, target_challenge, claimed):
    raise RefusedError(
      f"{where} did not prove it holds this target's token (it holds another, or it is not an "
      "ssd_jax speculator): give both ends the same token"
    )


def _answer(conn: Connection, op: str, where: str) -> dict[str, Any]:
  try:
    message = conn.receive(timeout=TARGET_WAIT, limit=HANDSHAKE_LIMIT)
  except RefusedError as e:
    raise RefusedError(f"{where} refused this target: {e}") from None
  if message.get("op") != op:
    raise RefusedError(
      f"{where} answered {str(message.get('op'))[:40]!r} where a protocol-{PROTOCOL} speculator "
      f"sends its {op}: is it an ssd_jax speculator of the same version?"
    )
  return message


def load(conn: Connection, message: dict[str, Any], where: str, wait: float) -> dict[str, Any]:
  """Send the target's load request; the speculator's ready (waiting up to `wait` seconds while
  it loads the draft)."""
  conn.send(message | {"op": "load"})
  try:
    ready = conn.receive(timeout=wait)
  except RefusedError as e:
    raise RefusedError(f"{where} refused this target: {e}") from None
  if ready.get("op") != "ready":
    raise RefusedError(f"{where} answered {str(ready.get('op'))[:40]!r} to the load request")
  return ready
