"""OpenAI-shaped request, response and error models of the sampler service.

Requests accept the OpenAI fields real clients send plus the diffusion sampler's knobs as
extensions (`coda_trainer.config.SamplerKnobs`: `preset`, `steps`, `alg`, `alg_temp`,
`block_length`, `threshold`, `cache`, `top_k`), which the `openai` client passes through
`extra_body`. Types are strict (`"max_tokens": "10"` and `"stream": "yes"` are
errors, as in OpenAI's API; an integer is still a valid float). OpenAI parameters this sampler does
not implement (`UNSUPPORTED`: logit_bias, tools, response_format, ...) are rejected by name rather
than silently ignored; fields nobody knows are ignored, as OpenAI's own server tolerates newer
client fields. Types and ranges are checked here; limits that depend on the loaded model (prompt
length, largest generation) are checked by the engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from coda_trainer.config import MAX_NEW_TOKENS, SamplerKnobs

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ErrorBody",
    "ErrorResponse",
    "InfillRequest",
    "SamplingParams",
]

MAX_N = 16
UNSUPPORTED = (
    "logit_bias", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
    "response_format", "audio", "modalities", "prediction",
)  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class SamplingParams(_Request, SamplerKnobs):
    """Fields common to every generation route: the sampler's knobs (`SamplerKnobs`: `preset`,
    `steps`, `alg`, ..., `cache`, with the bounds every surface shares), each None = the server's
    default, plus the OpenAI fields below."""

    model: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    user: str | None = None


class _TextGeneration(SamplingParams):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # Accepted for compatibility; only the neutral values are supported.
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logprobs: Any = None
    # OpenAI parameters the diffusion sampler does not implement: an error when set (None, {} or
    # [] are their neutral values and pass).
    logit_bias: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> None:
        if v not in (None, {}, []):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by the diffusion sampler")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_TextGeneration):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _nonempty(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(p, str | list) and len(p) == 0 for p in v):
            raise ValueError("prompts must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatCompletionRequest(_TextGeneration):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)

    @property
    def max_new(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class InfillRequest(SamplingParams):
    """Fill exactly `max_tokens` masked positions between `prefix` and `suffix`."""

    prefix: str
    suffix: str
    max_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)
    n: int = Field(default=1, ge=1, le=MAX_N)


# ---- responses ----


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class InfillChoice(BaseModel):
    index: int
    text: str = Field(description="prefix + infill + suffix")
    infill: str = Field(description="the generated middle")
    finish_reason: Literal["length"] = "length"


class InfillResponse(BaseModel):
    id: str
    object: Literal["infill"] = "infill"
    created: int
    model: str
    choices: list[InfillChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coda"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
