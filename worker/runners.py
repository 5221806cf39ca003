"""Model runners: a batched transformers runner and the pyfunc fallback."""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from schemas.chat import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Usage,
)
from schemas.errors import ErrorCode, RequestError
from worker.engine import Pending

logger = logging.getLogger(__name__)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


@dataclass
class Prepared:
    prompt_ids: list[int]
    max_new: int
    stops: list[str]


@dataclass
class _Row:
    item: int
    choice: int
    prepared: Prepared
    params: Any
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    finish: str | None = None
    text: str | None = None


class TransformersRunner:
    """Runs many chat requests as one batched decode on a transformers causal LM.

    Prompts are left-padded, with an attention mask and explicit position ids, so a request's
    greedy output does not depend on what else is in its batch. Rows leave the batch (and the
    KV cache) as soon as they finish.
    """

    batched = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        served_name: str,
        default_max_tokens: int = 1_024,
        device: str = "auto",
    ) -> None:
        import torch

        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template: save the model from a chat model "
                "(one whose tokenizer defines chat_template)"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and model.dtype == torch.float32:
            model = model.to(torch.bfloat16)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        config = model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048)
        )
        eos: set[int] = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(t) for t in source)
        self.eos_ids = eos
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(eos) if eos else 0))
        # transformers renamed `past_key_values` to `cache`; use whichever this version takes.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _encode(self, text: str) -> list[int]:
        # The Rust tokenizer directly, when there is one: the same ids without the Python
        # wrapping, which matters when thousands of short requests arrive at once.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return list(backend.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # Hooks called by the engine.

    def prepare(self, item: Pending) -> None:
        request = item.request
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = self._encode(text)
        room = self.context_length - len(prompt_ids)
        wanted = request.max_new_tokens
        if wanted is None:
            wanted = min(self.default_max_tokens, room)
        if room < 1 or len(prompt_ids) + wanted > self.context_length:
            raise RequestError(
                ErrorCode.context_length_exceeded,
                f"the prompt is {len(prompt_ids)} tokens and max_tokens is {wanted}, over the "
                f"model's context of {self.context_length} tokens: shorten the messages or "
                "lower max_tokens",
                param="messages",
            )
        item.prepared = Prepared(prompt_ids=prompt_ids, max_new=wanted, stops=request.stop_sequences)
        item.rows = request.n
        item.cost = len(prompt_ids) + wanted

    def run_batch(self, items: list[Pending]) -> list[ChatCompletion | RequestError]:
        import torch

        from worker.sampling import SamplingParams, row_generator

        rows: list[_Row] = []
        for index, item in enumerate(items):
            request: ChatCompletionRequest = item.request
            for choice in range(request.n):
                generator = None
                if request.temperature > 0:
                    generator = row_generator(self.device, request.seed, choice)
                params = SamplingParams(request.temperature, request.top_p, generator)
                rows.append(_Row(item=index, choice=choice, prepared=item.prepared, params=params))
        with torch.inference_mode():
            self._decode(rows)
        created = int(time.time())
        results: list[ChatCompletion | RequestError] = []
        for index, item in enumerate(items):
            mine = [row for row in rows if row.item == index]
            prompt_tokens = len(item.prepared.prompt_ids)
            completion_tokens = sum(row.generated for row in mine)
            results.append(
                ChatCompletion(
                    id=completion_id(),
                    created=created,
                    model=self.served_name,
                    choices=[
                        ChatCompletionChoice(
                            index=row.choice,
                            message=ChatCompletionMessage(content=row.text or ""),
                            finish_reason=row.finish or "length",
                        )
                        for row in mine
                    ],
                    usage=Usage(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    ),
                )
            )
        return results

    def _decode(self, rows: list[_Row]) -> None:
        import torch

        from worker.sampling import choose_tokens

        device = self.device
        width = max(len(row.prepared.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row.prepared.prompt_ids
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        logits = out.logits[:, -1, :].float()
        next_pos = positions[:, -1] + 1
        active = list(range(len(rows)))
        while active:
            tokens = choose_tokens(logits, [rows[r].params for r in active])
            keep: list[int] = []
            for j, token in enumerate(tokens.tolist()):
                row = rows[active[j]]
                row.generated += 1
                if token in self.eos_ids:
                    row.finish = "stop"
                    continue
                row.tokens.append(token)
                if row.prepared.stops and self._hit_stop(row):
                    continue
                if row.generated >= row.prepared.max_new:
                    row.finish = "length"
                    continue
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{self._cache_arg: cache},
            )
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        for row in rows:
            if row.text is None:
                row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def _hit_stop(self, row: _Row) -> bool:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in row.prepared.stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        row.text = text[:cut]
        row.finish = "stop"
        return True

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()


class PyfuncRunner:
    """Fallback for llm/v1/chat pyfunc models that are not transformers pipelines.

    MLflow's pyfunc `predict` takes one request at a time, so this runner does too.
    """

    batched = False

    def __init__(self, model: Any, *, served_name: str) -> None:
        self.model = model
        self.served_name = served_name

    def prepare(self, item: Pending) -> None:
        item.rows = item.request.n

    def run_batch(self, items: list[Pending]) -> list[ChatCompletion | RequestError]:
        results: list[ChatCompletion | RequestError] = []
        for item in items:
            body = item.request.model_dump(exclude_none=True, exclude={"model", "metadata", "user", "seed", "max_completion_tokens"})
            if item.request.max_new_tokens is not None:
                body["max_tokens"] = item.request.max_new_tokens
            if "stop" in body and isinstance(body["stop"], str):
                body["stop"] = [body["stop"]]
            try:
                raw = self.model.predict(body)
                if isinstance(raw, list):
                    raw = raw[0]
                raw = dict(raw)
                raw.update(id=completion_id(), model=self.served_name, object="chat.completion")
                raw.setdefault("created", int(time.time()))
                results.append(ChatCompletion.model_validate(raw))
            except Exception as error:
                logger.exception("pyfunc predict failed for %s", item.request_id)
                results.append(RequestError(ErrorCode.internal_error, f"the model failed: {error}"))
        return results
