"""Request and response bodies of the HTTP API (pydantic, kept apart from internal types).

Value ranges (temperature, top_p, max_tokens, prompt length) are checked by
:class:`expertmesh.platform.sampling.SamplingParams` and the router's ``validate`` so the HTTP
edge and the SDK share one set of rules; the schemas here check shapes and types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]


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
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` (OpenAI), with vLLM's ``ignore_eos``/``return_token_ids`` and
    expertmesh's ``expertmesh_routing`` extensions. Unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None  # None: the deployed model
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt = 16
    temperature: StrictFloat = 1.0
    top_p: StrictFloat = 1.0
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False
    expertmesh_routing: StrictBool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Routing(BaseModel):
    """Which experts served the request (expertmesh extension)."""

    expert_counts: list[list[int]] | None = None  # (MoE layer, expert): tokens served
    token_experts: list[list[list[int]]] | None = None  # per token, per MoE layer: experts


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None
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
    logprobs: None = None
    token_ids: list[int] | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (OpenAI's chunk format)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
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
class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: Annotated[int, Field(strict=True, ge=1, le=1024)]


class UpgradeRequest(BaseModel):
    """``PUT /api/model``: the registered version to serve, e.g. ``"expertmesh-tiny/2"``."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(strict=True, min_length=1, max_length=512)]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model_ready: bool


ClusterStatus = dict[str, Any]  # the controller's status() record, passed through as is
Event = dict[str, Any]
