"""`bench serving --http URL`: the same load points against a running `python -m ssd_jax.serve`,
so that the HTTP layer's own cost shows beside the in-process session's numbers.

`HttpSession` stands where the benchmark's `Session` stands: `submit` sends the request as a
streamed completion of token ids (a thread per request, the standard library's HTTP client) and
feeds each chunk's token ids to a `Handle` as the session's thread would, so TTFT, TPOT and
tokens are measured as in process, from the client's side of the socket.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

from ssd_jax.runtime.requests import Event, Handle, Request
from ssd_jax.runtime.stats import SessionStats


class HttpSession:
  """The part of `Session` the serving benchmark uses, over HTTP (see the module docstring)."""

  def __init__(self, url: str, lookahead: int = 0, api_key: str | None = None):
    self.url = url.rstrip("/").removesuffix("/v1")
    self.headers = {"Content-Type": "application/json"}
    if api_key:
      self.headers["Authorization"] = f"Bearer {api_key}"
    self.stats = SessionStats(lookahead)  # the server counts rounds: its /metrics has them
    self._lock = threading.Lock()
    self._waiting: list[Handle] = []

  def max_model_len(self) -> int:
    """The served model's context (its /v1/models card)."""
    request = urllib.request.Request(f"{self.url}/v1/models", headers=self.headers)
    with urllib.request.urlopen(request, timeout=60) as response:
      return int(json.loads(response.read())["data"][0]["max_model_len"])

  def warm_up(self) -> float:
    return 0.0  # the server compiled before it listened

  def start(self) -> None:
    pass

  def close(self) -> None:
    return None

  def waiting(self) -> list[Handle]:
    """Requests sent that have no token yet."""
    with self._lock:
      return [h for h in self._waiting if h.first_token is None and not h.done]

  def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
    handle = Handle(request, on_event)
    with self._lock:
      self._waiting = [h for h in self._waiting if not h.done] + [handle]
    body = {
      "prompt": list(map(int, request.prompt)),
      "max_tokens": request.max_new_tokens,
      "temperature": request.sampling.temperature,
      "top_p": request.sampling.top_p,
      "top_k": request.sampling.top_k,
      "seed": request.seed,
      "ignore_eos": request.ignore_eos,
      "stream": True,
      "return_token_ids": True,
    }
    threading.Thread(target=self._stream, args=(handle, body), daemon=True).start()
    return handle

  def _stream(self, handle: Handle, body: dict) -> None:
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{self.url}/v1/completions", data, self.headers)
    try:
      with urllib.request.urlopen(request, timeout=3600) as response:
        for line in response:
          text = line.decode().strip()
          if not text.startswith("data: ") or text == "data: [DONE]":
            continue
          chunk = json.loads(text[len("data: ") :])
          if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
          for choice in chunk["choices"]:
            handle.rounds += 1
            handle._emit(Event(handle.id, choice["token_ids"] or [], choice["finish_reason"]))
    except urllib.error.HTTPError as e:  # the server's error says why
      why = e.read().decode(errors="replace")
      handle._emit(Event(handle.id, [], "error", error=f"HTTP {e.code}: {why}"))
    except Exception as e:  # the request fails; the benchmark's result() says why
      if not handle.done:
        handle._emit(Event(handle.id, [], "error", error=f"{type(e).__name__}: {e}"))
    if not handle.done:
      handle._emit(Event(handle.id, [], "error", error="the stream ended without a finish"))
