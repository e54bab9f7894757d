"""Request and response bodies of the HTTP API (pydantic, kept apart from internal types).

The schemas state every range a value must be in, so that the OpenAPI schema FastAPI publishes
and the validation agree: a request the schema allows is served, except where a rule spans fields
(a prompt longer than the model's context with ``max_tokens``; ``best_of < n``; and a few
more, each said in its field's description), which answers 400 naming the field. The same ranges are checked again by
:class:`expertmesh.platform.sampling.SamplingParams` for the SDK. Unknown fields are refused
(400 naming the field) rather than ignored, so a client never believes a parameter took effect
when it did not.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from expertmesh.platform.sampling import MAX_BEST_OF, MAX_LOGPROBS


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes numbers with a zero fraction (``1.0``), so the
    validation takes them too; ``1.5``, strings and booleans are still refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(**bounds: int) -> Any:
    """An integer field with ``ge``/``le`` bounds. NOTE: the bounds must sit in the same
    ``Field`` as ``strict`` and before the validator; anywhere else pydantic checks them but
    writes ``ge``/``le`` into the JSON schema instead of ``minimum``/``maximum``."""
    return Annotated[int, Field(strict=True, **bounds), BeforeValidator(_integral)]


StrictInt = Int()
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]
Prompt = Annotated[str, Field(strict=True, min_length=1)]
Stop = Annotated[str, Field(strict=True, min_length=1)]
SEED_MODULUS = 2**63  # torch's generators take seeds below 2**64; best_of adds its index


class Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used by every route."""

    error: ErrorDetail


# ---------------------------------------------------------------------- completions
class StreamOptions(Forbid):
    include_usage: StrictBool = False


class SamplingFields(Forbid):
    """What completions and chat completions share: sampling and the penalties (vLLM's)."""

    model: StrictStr | None = Field(None, description="the deployed model's id; omit for it")
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=5.0)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(
        None, description="any integer; the same seed gives the same tokens (taken mod 2**63)"
    )
    n: Int(ge=1, le=MAX_BEST_OF) = Field(1, description="choices per prompt")
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, le=2.0)] = Field(
        1.0, description="vLLM's: >1 makes tokens of the prompt and output less likely"
    )
    ignore_eos: StrictBool = False

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (OpenAI), with vLLM's ``ignore_eos``, ``repetition_penalty`` and
    ``return_token_ids`` and expertmesh's ``expertmesh_routing`` extensions."""

    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1)] = Field(
        description="one prompt or a list; each with max_tokens must fit the model's context"
    )
    max_tokens: Int(ge=1) = 16
    best_of: Int(ge=1, le=MAX_BEST_OF) | None = Field(
        None,
        description="candidates per prompt, of which the n with the highest cumulative "
        "logprob are returned; must be >= n",
    )
    echo: StrictBool = Field(False, description="prepend the prompt to each choice's text")
    logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="chosen tokens' logprobs and this many top alternatives per token"
    )
    return_token_ids: StrictBool = False
    expertmesh_routing: StrictBool = Field(
        False,
        description="report the experts that served each token (streamed: each chunk those "
        "of its tokens, the last the counts)",
    )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Routing(BaseModel):
    """Which experts served the request (expertmesh extension)."""

    expert_counts: list[list[int]] | None = None  # (MoE layer, expert): tokens served
    token_experts: list[list[list[int]]] | None = None  # per token, per MoE layer: experts


class CompletionLogprobs(BaseModel):
    """OpenAI's (legacy) completion logprobs; ``text_offset`` indexes the choice's ``text``."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    token_ids: list[int] | None = None  # with return_token_ids (vLLM)
    prompt_tokens: int | None = None  # with return_token_ids: this prompt's length
    expertmesh_routing: Routing | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    token_ids: list[int] | None = None
    # with expertmesh_routing: the experts of the tokens fed since the choice's last chunk
    # (the prompt's with the first); expert_counts on its last chunk
    expertmesh_routing: Routing | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (OpenAI's chunk format)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------- chat
class ChatMessage(Forbid):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions`` (OpenAI); the model's chat template makes the prompt."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int(ge=1) | None = Field(
        None, description="default: what the model's context leaves after the prompt"
    )
    max_completion_tokens: Int(ge=1) | None = Field(
        None, description="OpenAI's newer name for max_tokens; give one of them"
    )
    logprobs: StrictBool = False
    top_logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="alternatives per token; needs logprobs=true"
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------- models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "expertmesh"
    root: str | None = None  # the checkpoint URI


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------- cluster
class ScaleRequest(Forbid):
    shards: Int(ge=1, le=1024)


class UpgradeRequest(Forbid):
    """``PUT /api/model``: the registered version to serve, e.g. ``"expertmesh-tiny/2"``."""

    model: Annotated[str, Field(strict=True, min_length=1, max_length=512)]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model_ready: bool


class ScaleAccepted(BaseModel):
    """``PUT /api/shards`` (202): the scale started; its events carry ``scale_id``."""

    scale_id: str
    from_: int = Field(alias="from", description="shards in service when it started")
    to: int = Field(description="the shard count asked for")
    seq: int = Field(description="its scale_started event's seq: page events after seq - 1")

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class EventRecord(BaseModel):
    """One controller event; kinds add their own fields (``shard``, ``scale_id``, ...)."""

    seq: int = Field(description="one higher than the event before, across controller restarts")
    ts: float = Field(description="Unix time")
    kind: str
    message: str

    model_config = ConfigDict(extra="allow")


class EventsPage(BaseModel):
    """``GET /api/events``: one page of the controller's persisted event log, oldest first."""

    events: list[EventRecord]
    next: int = Field(description="after_seq for the next page (the last event looked at)")
    has_more: bool = Field(description="whether the next page has events already")
    first_seq: int = Field(description="the oldest event kept (the log is bounded)")
    last_seq: int = Field(description="the newest event; 0 when there is none")


ClusterStatus = dict[str, Any]  # the controller's status() record, passed through as is
Event = dict[str, Any]
