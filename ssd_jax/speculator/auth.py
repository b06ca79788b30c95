"""Who may use a speculator, and what for: a shared token, proven and never sent, and the drafts
the speculator serves. No JAX here: a speculator checks its start-up flags before JAX starts.

The token is a secret both ends hold (a file, `--token-file` / `--speculator-token-file`, or the
environment variable SSD_JAX_SPECULATOR_TOKEN). Each end proves it holds it with an HMAC-SHA256
over both ends' fresh random challenges and its own role, so a proof cannot be replayed on
another connection nor reflected back as the other end's (see `handshake.py` for the messages).
A speculator the engine starts itself gets a fresh token through its environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path

TOKEN_ENV = "SSD_JAX_SPECULATOR_TOKEN"
MIN_TOKEN_CHARS = 32  # secrets.token_hex(16); a short word would be guessed
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_hex(32))" > token && chmod 600 token'
CHALLENGE_BYTES = 32
MAX_DRAFT_CHARS = 4096  # longer than any path this host can have: not a draft


def new_token() -> str:
  """A fresh random token (for a speculator this process starts)."""
  return secrets.token_hex(32)


def new_challenge() -> str:
  return secrets.token_hex(CHALLENGE_BYTES)


def is_challenge(value) -> bool:
  """Whether `value` looks like a challenge of `new_challenge` (a peer's is checked before use)."""
  if not isinstance(value, str) or len(value) != 2 * CHALLENGE_BYTES:
    return False
  try:
    bytes.fromhex(value)
  except ValueError:
    return False
  return True


def checked_token(token: str, source: str) -> str:
  """`token` stripped of surrounding white space, if it is long enough; `source` names where it
  came from in the error."""
  token = token.strip()
  if len(token) < MIN_TOKEN_CHARS:
    raise ValueError(
      f"{source}: a token needs at least {MIN_TOKEN_CHARS} characters, it has {len(token)}; "
      f"make one with: {MAKE_TOKEN}"
    )
  return token


def read_token(path: str | os.PathLike) -> str:
  """The token in file `path`. Warns when others may read the file (it is a secret)."""
  path = Path(path)
  try:
    text = path.read_text()
    mode = path.stat().st_mode
  except (OSError, UnicodeDecodeError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else e
    raise ValueError(
      f"token file {path}: cannot read it ({reason}); make one with: {MAKE_TOKEN}"
    ) from None
  if mode & (stat.S_IRWXG | stat.S_IRWXO):
    warnings.warn(
      f"token file {path} can be read by other users: chmod 600 {path}", UserWarning, stacklevel=2
    )
  return checked_token(text, f"token file {path}")


def token_from(path: str | os.PathLike | None) -> str | None:
  """The token in `path` if one is named, else in SSD_JAX_SPECULATOR_TOKEN, else None."""
  if path is not None:
    return read_token(path)
  text = os.environ.get(TOKEN_ENV, "")
  return checked_token(text, TOKEN_ENV) if text.strip() else None


def prove(token: str, role: str, speculator_challenge: str, target_challenge: str) -> str:
  """`role`'s proof ("target" or "speculator") that it holds `token`, for these challenges."""
  message = f"ssd_jax speculator handshake|{role}|{speculator_challenge}|{target_challenge}"
  return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def verify(
  token: str, role: str, speculator_challenge: str, target_challenge: str, claimed
) -> bool:
  """Whether `claimed` is `role`'s proof for `token` (compared in constant time)."""
  if not isinstance(claimed, str):
    return False
  expected = prove(token, role, speculator_challenge, target_challenge)
  return hmac.compare_digest(expected.encode(), claimed.encode("utf-8", "replace"))


def is_loopback(host: str) -> bool:
  """Whether a listening address `host` is reachable from this host only."""
  host = host.strip("[]")
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a host name: it may resolve to anything
    return False


def no_token_message(address: str) -> str:
  """Why a speculator will not listen on `address` without a token, and how to make one."""
  port = address.rpartition(":")[2]
  return (
    f"refusing to listen on {address} without a token: anyone who reaches that port could use "
    "this speculator. Make a token and give it to both ends:\n"
    f"  {MAKE_TOKEN}\n"
    f"  python -m ssd_jax.speculator --listen {address} --draft NAME --token-file token\n"
    f"  python -m ssd_jax.run --speculator THIS_HOST:{port} --speculator-token-file token\n"
    f"(or set {TOKEN_ENV} on both); a loopback address (127.0.0.1) needs none"
  )


@dataclasses.dataclass(frozen=True)
class Drafts:
  """The drafts a speculator serves: registry names, and paths compared resolved (absolute,
  symbolic links followed), so that another spelling of a served path is that path and nothing
  else is.

  Attributes:
    given: the drafts as the speculator was started with them (for messages).
    names: those that are registry names.
    paths: the others, resolved (what is loaded for them).
  """

  given: tuple[str, ...]
  names: frozenset[str]
  paths: frozenset[str]

  @classmethod
  def of(cls, specs: Iterable[str], known: Iterable[str]) -> Drafts:
    """The drafts `specs` (registry names among `known`, or paths that exist here).

    Raises:
      ValueError: a spec is neither.
    """
    specs, known, names, paths = tuple(specs), set(known), set(), set()
    if not specs:
      raise ValueError("name the drafts this speculator serves: --draft NAME|PATH (repeatable)")
    for spec in specs:
      if spec in known:
        names.add(spec)
        continue
      path = Path(spec).expanduser().resolve()
      if not path.exists():
        raise ValueError(f"--draft {spec}: neither a registry name nor a path that exists here")
      paths.add(str(path))
    return cls(specs, frozenset(names), frozenset(paths))

  def find(self, requested) -> str | None:
    """What to load for a target that asks for `requested` (a registry name or a path), or
    None when it is not served here. Nothing is opened: a path is only resolved."""
    if not isinstance(requested, str) or not requested or len(requested) > MAX_DRAFT_CHARS:
      return None
    if requested in self.names:
      return requested
    try:
      resolved = str(Path(requested).resolve())
    except (OSError, ValueError, RuntimeError):  # a NUL, a symbolic-link loop
      return None
    return resolved if resolved in self.paths else None
