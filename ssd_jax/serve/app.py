"""The HTTP routes: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, and /health
and /metrics, on a `Runner` (the session in its thread).

Every error answers in OpenAI's shape with its status (see `protocol.error`); a request that
fails while it streams ends with a data chunk holding the error, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ssd_jax.decode.sampling import Sampling
from ssd_jax.models.tokenizer import render_messages
from ssd_jax.runtime.requests import Event, QueueFullError, Request
from ssd_jax.serve import protocol as p
from ssd_jax.serve.runner import Call, Runner
from ssd_jax.serve.text import Detokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Served:
  """What the routes need to know of the model and the server's defaults.

  Attributes:
    name: the model's name in requests and /v1/models.
    tokenizer: the target's (text prompts, chat templates, text out); None: token ids only.
    eos_ids: tokens that end a turn (counted as tokens, never shown as text).
    max_model_len, lookahead: a request's prompt + max_tokens + lookahead + 1 must fit.
    sampling, max_new_tokens, seed: the defaults of requests that omit them.
    api_key: the Bearer key of /v1 routes (None: open).
  """

  name: str
  tokenizer: object | None
  eos_ids: tuple[int, ...]
  max_model_len: int
  lookahead: int
  sampling: Sampling = dataclasses.field(default_factory=lambda: Sampling(temperature=1.0))
  max_new_tokens: int = 256
  seed: int | None = None
  api_key: str | None = None


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
  return JSONResponse(p.error(status, message, param).model_dump(), status_code=status)


def create_app(runner: Runner, served: Served, metrics) -> FastAPI:
  app = FastAPI(title="ssd_jax", docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return _error(e.status, e.message, e.param)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, e: RequestValidationError):
    # FastAPI's 422 as OpenAI's 400, naming the first field at fault.
    first = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
      return _error(400, f"the body is not valid JSON: {first.get('msg', '')}")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return _error(400, f"{where}: {first.get('msg', 'invalid')}", param)

  @app.exception_handler(HTTPException)
  async def _http(_, e: HTTPException):
    return _error(e.status_code, str(e.detail))

  @app.exception_handler(Exception)
  async def _crash(_, e: Exception):
    return _error(500, f"internal error: {type(e).__name__}: {e}")

  async def authorized(request: HttpRequest) -> None:
    if served.api_key is None:
      return
    # compare_digest: a comparison whose time does not tell how much of a guess was right.
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {served.api_key}".encode()):
      raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY")

  def check_model(model: str | None) -> None:
    if model is not None and model != served.name:
      raise ApiError(
        404, f"the model {model!r} does not exist; this server has {served.name!r}", "model"
      )

  @app.get("/health")
  async def health():
    why = runner.dead()
    return Response(status_code=200) if why is None else _error(503, why)

  @app.get("/metrics")
  async def scrape():
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models", dependencies=[Depends(authorized)])
  async def models():
    return p.ModelList(data=[p.ModelCard(id=served.name, max_model_len=served.max_model_len)])

  @app.post("/v1/completions", dependencies=[Depends(authorized)])
  async def completions(body: p.CompletionRequest, http: HttpRequest):
    check_model(body.model)
    try:
      prompts = [_encode(served, x) for x in body.prompts]
    except ValueError as e:
      raise ApiError(400, str(e), "prompt") from None
    call = _submit(runner, served, prompts, body, body.max_tokens)
    cid, model = p.new_id("cmpl"), served.name
    prompt = sum(map(len, prompts))  # each prompt counted once, however many choices it has
    if body.stream:
      return _sse(_completion_chunks(runner, call, served, body, cid, prompt))
    events = await _collect(runner, call, http)
    choices, completion = [], 0
    for i, handle in enumerate(call.handles):
      completion += len(handle.tokens)
      choices.append(
        p.CompletionChoice(
          index=i,
          text=_text(served, handle.tokens, body.stops),
          finish_reason=events[i].finish_reason,
          token_ids=list(handle.tokens) if body.return_token_ids else None,
          prompt_token_ids=list(prompts[i // body.n]) if body.return_token_ids else None,
        )
      )
    return p.Completion(id=cid, model=model, choices=choices, usage=p.usage(prompt, completion))

  @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
  async def chat(body: p.ChatRequest, http: HttpRequest):
    check_model(body.model)
    if served.tokenizer is None:
      raise ApiError(400, f"{served.name} has no tokenizer: chat needs one")
    ids = _chat_prompt(served, body.messages)
    call = _submit(runner, served, [ids], body, body.budget)
    cid = p.new_id("chatcmpl")
    if body.stream:
      return _sse(_chat_chunks(runner, call, served, body, cid))
    events = await _collect(runner, call, http)
    choices = []
    for i, handle in enumerate(call.handles):
      choices.append(
        p.ChatChoice(
          index=i,
          message=p.ChatMessage(content=_text(served, handle.tokens, body.stops)),
          finish_reason=events[i].finish_reason,
          token_ids=list(handle.tokens) if body.return_token_ids else None,
          prompt_token_ids=list(ids) if body.return_token_ids else None,
        )
      )
    usage = p.usage(len(ids), sum(len(h.tokens) for h in call.handles))
    return p.ChatCompletion(id=cid, model=served.name, choices=choices, usage=usage)

  return app


# -- requests in -----------------------------------------------------------------------------


def _encode(served: Served, prompt: str | list[int]) -> list[int]:
  if not isinstance(prompt, str):
    return list(prompt)
  if served.tokenizer is None:
    raise ValueError(f"{served.name} has no tokenizer: send the prompt as token ids")
  ids = served.tokenizer.encode(prompt)
  if not ids:
    raise ValueError("the prompt is empty")
  return ids


def _chat_prompt(served: Served, messages: list[p.Message]) -> list[int]:
  """The conversation through the model's chat template (as `run --chat` renders it)."""
  system = None
  if messages[0].role in ("system", "developer"):
    system, messages = messages[0].text, messages[1:]
  turns = [(m.role, m.text) for m in messages]
  template = served.tokenizer.chat_template
  try:
    text = render_messages(template, turns, system) if template else "\n".join(t for _, t in turns)
  except ValueError as e:
    raise ApiError(400, str(e), "messages") from None
  return served.tokenizer.encode(text)


def _request(
  served: Served, ids: list[int], body: p._Sampled, budget: int | None, choice: int = 0
) -> Request:
  """Choice `choice` of a prompt: with a seed (the request's or the server's), choice j draws
  with seed + j, so that a prompt's choices differ and the same call gives the same ones."""
  d = served.sampling
  top_k = d.top_k if body.top_k is None else max(body.top_k, 0)
  try:
    sampling = Sampling(
      temperature=d.temperature if body.temperature is None else body.temperature,
      top_k=top_k,
      top_p=d.top_p if body.top_p is None else body.top_p,
    )
  except ValueError as e:
    raise ApiError(400, str(e)) from None
  if budget is None:  # the default, where the context leaves room for it
    budget = max(
      1, min(served.max_new_tokens, served.max_model_len - len(ids) - served.lookahead - 1)
    )
  seed = body.seed if body.seed is not None else served.seed
  return Request(
    prompt=ids,
    sampling=sampling,
    max_new_tokens=budget,
    stop=body.stops,
    ignore_eos=body.ignore_eos,
    seed=None if seed is None else seed + choice,
  )


def _submit(runner: Runner, served: Served, prompts, body: p._Sampled, budget) -> Call:
  """Every prompt's `n` requests queued, or none (the first that cannot be is the error): the
  call's request k is prompt k // n's choice k % n, its choice index k (OpenAI's order)."""
  if (k := len(prompts) * body.n) > (room := runner.session.max_queue):
    raise ApiError(
      400, f"this call makes {k} requests (prompts x n) but at most {room} may wait here", "n"
    )
  requests = [_request(served, ids, body, budget, j) for ids in prompts for j in range(body.n)]
  try:
    for r in requests:
      runner.session.validate(r)
  except ValueError as e:
    param = "max_tokens" if "max_new_tokens" in str(e) else "prompt"
    raise ApiError(400, str(e).replace("max_new_tokens", "max_tokens"), param) from None
  try:
    return runner.submit(requests)
  except QueueFullError as e:
    raise ApiError(429, str(e)) from None
  except RuntimeError as e:
    raise ApiError(503, str(e)) from None


async def _collect(runner: Runner, call: Call, http: HttpRequest) -> dict[int, Event]:
  """Each request's last event, cancelling them if the client goes away meanwhile."""

  async def drain() -> dict[int, Event]:
    last = {}
    async with contextlib.aclosing(runner.events(call)) as events:
      async for i, event in events:
        if event.finish_reason is not None:
          last[i] = event
    return last

  task = asyncio.ensure_future(drain())
  while not task.done():
    await asyncio.wait({task}, timeout=0.5)
    if not task.done() and await http.is_disconnected():
      task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await task
      raise ApiError(499, "the client disconnected")
  last = task.result()
  for event in last.values():
    if event.finish_reason not in ("stop", "length"):
      raise ApiError(503, _failure(event))
  return last


def _text(served: Served, tokens, stops) -> str:
  """A finished request's whole text (none without a tokenizer: token ids in, token ids out)."""
  if served.tokenizer is None:
    return ""
  detok = Detokenizer(served.tokenizer, served.eos_ids, stops)
  detok.ids = list(tokens)
  return detok.text()


def _failure(event: Event) -> str:
  if event.finish_reason == "cancelled":
    return "the request was cancelled: the server is shutting down"
  return f"the request failed: {event.error}"


# -- streams out -----------------------------------------------------------------------------


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
  return StreamingResponse(chunks, media_type="text/event-stream")


def _data(payload: BaseModel) -> str:
  return f"data: {payload.model_dump_json()}\n\n"


async def _rounds(runner: Runner, call: Call, served: Served, stops) -> AsyncIterator:
  """(index, text delta, tokens, finish_reason) per event, or an error's message as text and
  None at the end of a request that failed."""
  detoks = [Detokenizer(served.tokenizer, served.eos_ids, stops) for _ in call.handles]
  async with contextlib.aclosing(runner.events(call)) as events:
    async for i, event in events:
      finish = event.finish_reason
      if finish is not None and finish not in ("stop", "length"):
        yield i, _failure(event), None, "error"
        return
      text = detoks[i].add(event.tokens, final=finish is not None) if served.tokenizer else ""
      yield i, text, event.tokens, finish


async def _completion_chunks(runner, call: Call, served: Served, body, cid: str, prompt: int):
  async for i, text, tokens, finish in _rounds(runner, call, served, body.stops):
    if finish == "error":
      yield _data(p.error(503, text))
      break
    if not text and finish is None and not body.return_token_ids:
      continue
    choice = p.CompletionChoice(
      index=i,
      text=text,
      finish_reason=finish,
      token_ids=tokens if body.return_token_ids else None,
    )
    yield _data(p.Completion(id=cid, model=served.name, choices=[choice]))
  else:
    if body.include_usage:
      completion = sum(len(h.tokens) for h in call.handles)
      usage = p.usage(prompt, completion)
      yield _data(p.Completion(id=cid, model=served.name, choices=[], usage=usage))
  yield "data: [DONE]\n\n"


async def _chat_chunks(runner, call: Call, served: Served, body, cid: str):
  chunk = lambda choices, usage=None: p.ChatCompletionChunk(
    id=cid, model=served.name, choices=choices, usage=usage
  )
  role = p.Delta(role="assistant", content="")
  yield _data(chunk([p.ChatChunkChoice(index=i, delta=role) for i in range(len(call.handles))]))
  async for i, text, tokens, finish in _rounds(runner, call, served, body.stops):
    if finish == "error":
      yield _data(p.error(503, text))
      break
    if not text and finish is None and not body.return_token_ids:
      continue
    choice = p.ChatChunkChoice(
      index=i,
      delta=p.Delta(content=text),
      finish_reason=finish,
      token_ids=tokens if body.return_token_ids else None,
    )
    yield _data(chunk([choice]))
  else:
    if body.include_usage:
      completion = sum(len(h.tokens) for h in call.handles)
      yield _data(chunk([], p.usage(len(call.handles[0].request.prompt), completion)))
  yield "data: [DONE]\n\n"
