"""The wire shapes of the OpenAI API this server speaks (the fields it reads and writes), as
pydantic models: a request that does not fit is a 400 naming its field, before anything runs.

Fields OpenAI defines that this server does not build (logprobs, echo, best_of > 1, suffix,
penalties, logit_bias, tools) are refused when set to anything but their neutral value, never
silently ignored; unknown fields are ignored (as OpenAI's own server and vLLM's do).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]
MAX_CHOICES = 128  # `n`'s bound, as OpenAI's
TokenIds = Annotated[list[Annotated[int, Field(strict=True)]], Field(min_length=1)]


class StreamOptions(BaseModel):
  include_usage: bool = False


class _Sampled(BaseModel):
  """What completions and chat completions share: sampling, budget, stops, streaming, and vLLM's
  extra fields (`extra_body` in the openai client)."""

  model_config = ConfigDict(extra="ignore")

  model: str | None = None
  max_tokens: Count | None = None
  temperature: Temperature | None = None
  top_p: TopP | None = None
  top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM's -1)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # choices per prompt
  ignore_eos: bool = False
  return_token_ids: bool = False
  # Refused unless neutral (see the module docstring).
  logprobs: Any = None
  presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
  frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
  logit_bias: dict[str, float] | None = None
  best_of: Annotated[int, Field(ge=1, le=1)] | None = None

  @model_validator(mode="after")
  def _neutral(self):
    if self.logprobs not in (None, False, 0):
      raise ValueError("logprobs are not supported by this server")
    if self.logit_bias:
      raise ValueError("logit_bias is not supported by this server")
    if isinstance(self.stop, list) and any(not s for s in self.stop):
      raise ValueError("stop strings must be non-empty")
    return self

  @property
  def stops(self) -> tuple[str, ...]:
    if self.stop is None or self.stop == "":
      return ()
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

  @property
  def include_usage(self) -> bool:
    return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampled):
  prompt: str | TokenIds | list[str] | list[TokenIds]
  echo: Literal[False] = False
  suffix: None = None

  @property
  def prompts(self) -> list[str | list[int]]:
    """Each prompt of the request (a list of strings or of token-id lists is several)."""
    p = self.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
      return [p]
    if not p:
      raise ValueError("prompt must not be empty")
    return list(p)


class TextPart(BaseModel):
  type: Literal["text"]
  text: str


class Message(BaseModel):
  model_config = ConfigDict(extra="ignore")

  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[TextPart]

  @property
  def text(self) -> str:
    return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampled):
  messages: Annotated[list[Message], Field(min_length=1)]
  max_completion_tokens: Count | None = None
  tools: None = None
  top_logprobs: None = None

  @property
  def budget(self) -> int | None:
    return self.max_completion_tokens or self.max_tokens


# -- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


def usage(prompt: int, completion: int) -> Usage:
  return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionChoice(BaseModel):
  index: int
  text: str
  finish_reason: Literal["stop", "length"] | None
  logprobs: None = None
  token_ids: list[int] | None = None  # vLLM's return_token_ids
  prompt_token_ids: list[int] | None = None


class Completion(BaseModel):
  id: str
  object: Literal["text_completion"] = "text_completion"
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  choices: list[CompletionChoice]
  usage: Usage | None = None


class ChatMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class ChatChoice(BaseModel):
  index: int
  message: ChatMessage
  finish_reason: Literal["stop", "length"] | None
  logprobs: None = None
  token_ids: list[int] | None = None
  prompt_token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  choices: list[ChatChoice]
  usage: Usage


class Delta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class ChatChunkChoice(BaseModel):
  index: int
  delta: Delta
  finish_reason: Literal["stop", "length"] | None = None
  logprobs: None = None
  token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int = Field(default_factory=lambda: int(time.time()))
  model: str
  choices: list[ChatChunkChoice]
  usage: Usage | None = None


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int = Field(default_factory=lambda: int(time.time()))
  owned_by: str = "ssd_jax"
  max_model_len: int


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ErrorBody(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: int


class ErrorResponse(BaseModel):
  error: ErrorBody


ERROR_TYPES = {
  400: "BadRequestError",
  401: "AuthenticationError",
  404: "NotFoundError",
  429: "RateLimitError",
  500: "InternalServerError",
  503: "ServiceUnavailableError",
}


def error(status: int, message: str, param: str | None = None) -> ErrorResponse:
  kind = ERROR_TYPES.get(status, "InternalServerError")
  return ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=status))


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"
