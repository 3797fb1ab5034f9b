"""The OpenAI completions API as tinylm speaks it: a request body checked into a `CompletionRequest`, and the shapes
of responses, streamed chunks, usage and errors (https://platform.openai.com/docs/api-reference/completions), so the
official `openai` client works unchanged. tinylm's own settings (`top_k`, `min_p`, `repetition_penalty`) ride along
in the body (the client's `extra_body`)."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from tinylm.data.shards import frame_prefix
from tinylm.errors import TinylmError
from tinylm.infer.engine import check_prompts
from tinylm.recipe import Sampling

SEED_RANGE = (-2**63, 2**64)  # what torch's generator holds
# Accepted and without effect: what the client sends for identification or streaming options.
IGNORED = {"user", "stream_options"}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs", "echo",
         "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "best_of", "logit_bias",
         "suffix"} | IGNORED


@dataclass(frozen=True)
class Limits:
    """What one request and the server may ask for; beyond them a request is refused (400, 413 or 429)."""

    max_batch: int = 64  # rows decoding together per model
    max_queue: int = 256  # rows waiting to join, per model; more is answered 429
    max_n: int = 16  # choices per prompt
    max_prompts: int = 16  # prompts per request
    max_rows: int = 64  # prompts x n per request
    max_prompt_chars: int = 100_000
    max_body_bytes: int = 1 << 20
    max_logprobs: int = 20
    max_stop: int = 4


class ApiError(Exception):
    """A request the server refuses, as the OpenAI API words it: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """A loaded model as the server offers it: its name, the recipe's sampling defaults and frame prefix."""

    name: str
    model: object
    tokenizer: object
    settings: Sampling
    framing: str
    end_ids: list[int] | None = None  # where a row ends when the model's directory says (else the tokenizer's)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def story_end_ids(self) -> list[int]:
        return self.tokenizer.story_end_ids if self.end_ids is None else self.end_ids

    @property
    def prefix(self) -> list[int]:
        return frame_prefix(self.tokenizer, self.framing)

    def card(self) -> dict:
        s = self.settings
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tinylm",
                "family": self.model.family, "context_length": self.model.max_positions,
                "defaults": {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                             "top_k": s.top_k, "min_p": s.min_p, "repetition_penalty": s.repetition_penalty}}


@dataclass
class CompletionRequest:
    model: ServedModel
    prompts: list[str]
    prompt_ids: list[list[int]]
    sampling: Sampling
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    logprobs: int | None
    echo: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _integer(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{name} must be an integer, got {value!r:.60}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _bad(name, f"{name} must be {bounds}, got {value}")
    return value


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, f"{name} must be a finite number, got {value!r:.60}")
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {value!r:.60}")
    return value


def _text_list(body: dict, name: str, limit: int, default: list[str]) -> list[str]:
    value = body.get(name)
    if value is None:
        return default
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _bad(name, f"{name} must be a string or a list of strings")
    if not items or len(items) > limit:
        raise _bad(name, f"{name} must hold 1 to {limit} strings, got {len(items)}")
    return items


def _unsupported(body: dict) -> None:
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name) not in (None, 0.0):
            raise _bad(name, f"{name} is not supported: use repetition_penalty (tinylm's, 1 = off)")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "logit_bias is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "suffix is not supported: these models continue text, they do not fill in")
    if _integer(body, "best_of", None, 1) not in (None, _integer(body, "n", 1)):
        raise _bad("best_of", "best_of is not supported beyond n")


def parse_completion(body, models: dict[str, ServedModel], limits: Limits) -> CompletionRequest:
    """A checked request, or an ApiError naming the parameter at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _unsupported(body)
    name = body.get("model")
    if not isinstance(name, str):
        raise _bad("model", "model is required: one of " + ", ".join(models))
    if name not in models:
        raise ApiError(404, f"The model '{name:.100}' does not exist; this server has: {', '.join(models)}",
                       param="model", code="model_not_found")
    served = models[name]
    prompts = _text_list(body, "prompt", limits.max_prompts, [""])
    if sum(len(p) for p in prompts) > limits.max_prompt_chars:
        raise _bad("prompt", f"prompt holds more than {limits.max_prompt_chars} characters")
    n = _integer(body, "n", 1, 1, limits.max_n)
    if n * len(prompts) > limits.max_rows:
        raise _bad("n", f"n x prompts must be at most {limits.max_rows}, got {n * len(prompts)}")
    logprobs = _integer(body, "logprobs", None, 0, limits.max_logprobs)
    seed = _integer(body, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise _bad("seed", f"seed must be in [-2**63, 2**64), got {seed}")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "stream_options must be an object")
    return CompletionRequest(
        model=served, prompts=prompts, prompt_ids=_prompt_ids(served, prompts), sampling=_sampling(body, served),
        n=n, stop=_text_list(body, "stop", limits.max_stop, []), seed=seed, stream=_boolean(body, "stream"),
        logprobs=logprobs, echo=_boolean(body, "echo"), include_usage=stream_options.get("include_usage") is True)


def _sampling(body: dict, served: ServedModel) -> Sampling:
    changes = {"max_new_tokens": _integer(body, "max_tokens", None, 0), "top_k": _integer(body, "top_k", None, 0)}
    changes |= {name: _number(body, name) for name in ("temperature", "top_p", "min_p", "repetition_penalty")}
    try:
        return served.settings.with_changes(**changes)
    except TinylmError as exc:  # the settings' own check names the field
        param = str(exc).split()[0]
        raise _bad("max_tokens" if param == "max_new_tokens" else param, str(exc)) from None


def _prompt_ids(served: ServedModel, prompts: list[str]) -> list[list[int]]:
    ids = [served.prefix + served.tokenizer.encode(p) for p in prompts]
    if any(not i for i in ids):
        raise _bad("prompt", "prompt is empty and this model starts sequences with no special token: give some text")
    try:
        check_prompts(served.model, ids)
    except TinylmError as exc:
        raise _bad("prompt", str(exc)) from None
    return ids


# ------------------------------------------------------------------------------------------------- response shapes
def logprobs_body(tokens: list[str], chosen: list[float | None], top: list[dict | None], offset: int) -> dict:
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: CompletionRequest, choices: list[dict], usage_body: dict | None) -> dict:
    body = {"id": request.id, "object": "text_completion", "created": request.created, "model": request.model.name,
            "choices": choices, "system_fingerprint": None}
    if usage_body is not None:
        body["usage"] = usage_body
    return body
