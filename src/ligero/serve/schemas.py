"""The OpenAI wire format `ligero serve` speaks: request bodies, answers, stream chunks and errors, as pydantic models.

Requests are validated by construction: a body that does not fit its model is a 400 naming the field
(`validation_error`). Fields Ligero does not implement (tools, response_format, echo, best_of, suffix, ...) are
refused with a 400 naming them, as OpenAI refuses what it does not know, unless they hold the value that changes
nothing (tools: [], echo: false, best_of: 1, response_format: {"type": "text"}, ...). Other unknown fields are
ignored, as clients send options that do not concern a server (e.g. stream_options' extras).

Sampling fields left out (temperature, top_p, max_tokens) stay None here; the pipeline fills them with the
server's defaults (OpenAI's, or a deployment card's reference-profile settings).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_STOPS = 4
MAX_COMPLETION_LOGPROBS = 5  # completions: `logprobs` is the number of alternatives per token, 0-5
MAX_CHAT_TOP_LOGPROBS = 20  # chat: `top_logprobs`, 0-20
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               499: "invalid_request_error"}
UNSUPPORTED = "unsupported_parameter"  # the error code of a field Ligero does not implement


# --- errors ---------------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def body(self) -> ErrorBody:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return ErrorBody(error=ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def validation_error(exc: ValidationError) -> ApiError:
    """The 400 for a body that does not fit its model: the first problem, naming its field."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    code = UNSUPPORTED if err["type"] == UNSUPPORTED else "invalid_request"
    return ApiError(400, f"{param}: {msg}" if param else msg, code, param)


# --- requests -------------------------------------------------------------------------------------------------------

# Fields Ligero does not implement -> (the values that change nothing, why it is refused and what to do).
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tool calling is not supported; leave tools out"),
    "tool_choice": ((None, "none"), "tool calling is not supported; leave tool_choice out"),
    "parallel_tool_calls": ((None,), "tool calling is not supported; leave parallel_tool_calls out"),
    "functions": ((None, []), "function calling is not supported; leave functions out"),
    "function_call": ((None, "none"), "function calling is not supported; leave function_call out"),
    "response_format": ((None, {"type": "text"}), "only plain text output is supported (no JSON mode); leave "
                                                  "response_format out"),
    "echo": ((None, False), "echoing the prompt is not supported; leave echo out or send false"),
    "best_of": ((None, 1), "best_of is not supported; send one request per candidate"),
    "suffix": ((None, ""), "suffix (insertion) is not supported; leave it out"),
}


def _implemented_only(value: Any, info: ValidationInfo) -> Any:
    no_ops, why = NOT_IMPLEMENTED[info.field_name]
    if not any(value == v and type(value) is type(v) for v in no_ops):
        raise PydanticCustomError(UNSUPPORTED, why)
    return None


TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
Penalty = Annotated[float | None, Field(default=None, ge=-2, le=2, allow_inf_nan=False)]


class GenerationRequest(BaseModel):
    """What both generation endpoints accept."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # int64, as OpenAI; torch rejects larger seeds
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: Penalty
    frequency_penalty: Penalty
    logit_bias: dict[TokenId, Bias] | None = None  # JSON keys are strings: "1234" -> token 1234

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("Ligero returns one choice per request; send n = 1 (or several requests)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]  # "" would stop at once
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # alternatives per token
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    _not_implemented = field_validator("echo", "best_of", "suffix", mode="before")(_implemented_only)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("send one prompt per request (a string or a list of one string)")
            return prompt[0]
        return prompt

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        """None: no log-probs; else how many alternatives per token (0 = only the chosen token's)."""
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text_and_images(self, mark: str) -> tuple[str, list[str]]:
        """The message's text with `mark` where each image part was, and the images' URLs in order. Parts are
        OpenAI's: {"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": ...}}."""
        if isinstance(self.content, str):
            return self.content.replace(mark, "") if mark else self.content, []
        parts, images = [], []
        for part in self.content:
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"].replace(mark, "") if mark else part["text"])
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise ValueError("an image_url part needs {'image_url': {'url': 'data:image/png;base64,...'}}")
                if self.role != "user":
                    raise ValueError(f"images go in user messages, not {self.role} messages")
                images.append(url)
                parts.append(mark)
            else:
                raise ValueError("content parts are {'type': 'text', 'text': ...} or {'type': 'image_url', "
                                 "'image_url': {'url': 'data:image/...;base64,...'}}")
        return "".join(parts), images


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    _not_implemented = field_validator("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                                       "response_format", mode="before")(_implemented_only)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=128)
    value: bool | float | Literal["up", "down", "thumbs_up", "thumbs_down"]
    comment: str | None = Field(default=None, max_length=4000)
    source: Literal["human", "model", "code"] = "human"
    name: str = Field(default="user_feedback", min_length=1, max_length=64)
    data_type: Literal["boolean", "numeric", "categorical"] | None = None

    def typed_value(self) -> tuple[float, str]:
        """(value as a number, data type): thumbs up / down and booleans are boolean, other numbers numeric."""
        if isinstance(self.value, str):
            return float(self.value in ("up", "thumbs_up")), self.data_type or "boolean"
        if isinstance(self.value, bool):
            return float(self.value), self.data_type or "boolean"
        return float(self.value), self.data_type or "numeric"


# --- answers --------------------------------------------------------------------------------------------------------


def _absent(value: Any) -> bool:
    return value is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The completions format: per token its text, log-prob, alternatives and offset in the returned text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """The chat format: one entry per token of the message's content."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class WatermarkInfo(BaseModel):
    """Set on answers of a server started with --watermark: the text was generated under this key."""

    key_id: str
    scheme: str


class Completion(BaseModel):
    """A text completion, whole or as one stream chunk (a chunk has no usage; the last one may carry it alone)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_absent)
    watermark: WatermarkInfo | None = Field(default=None, exclude_if=_absent)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    watermark: WatermarkInfo | None = Field(default=None, exclude_if=_absent)


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_absent)
    content: str | None = Field(default=None, exclude_if=_absent)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_absent)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ligero"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackAnswer(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: int
    response_id: str
    value: float
    data_type: str
    source: str
