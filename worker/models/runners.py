"""Model runners: a batched transformers runner and the pyfunc fallback."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

from chatbatch.ids import new_id
from chatbatch.structured import schema_for, schemas_to_check
from schemas.chat import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChoiceLogprobs,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from schemas.errors import ErrorCode, RequestError
from worker.decode.chat_format import ChatFormat, parse_hermes
from worker.decode.grammar import Grammars, cut_calls, forced_calls
from worker.decode.stops import StopFinder
from worker.engine.interface import ContinuousBatch
from worker.engine.pending import Pending
from worker.engine.rows import Prepared, Row
from worker.models.sizing import kv_bytes_per_token, size_for_cpu, timed

logger = logging.getLogger(__name__)


def completion_id() -> str:
    return new_id("chatcmpl-")


#: How a batch is decoded (CHATBATCH_DECODE): `dynamic` drops finished rows from a growing KV
#: cache and checks every token on the host (best on CPU); `static` keeps every row in a
#: preallocated KV cache of bucketed shape and checks on the device, syncing with the host only
#: every few tokens; `compiled` is `static` with the decode step compiled by torch.compile into
#: CUDA graphs (the default on CUDA). `auto` picks `compiled` on CUDA, `dynamic` elsewhere.
DECODE_MODES = ("dynamic", "static", "compiled")
#: Batch limits of a runner that does not time its steps (a transformers runner sizes its
#: batches on CPU from memory and its measured step cost, worker/models/sizing.py; on CUDA its token
#: limit comes from free device memory).
CPU_BATCH_SIZE = 32
CPU_BATCH_TOKENS = 65_536
CUDA_BATCH_SIZE = 512
def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


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
        decode: str = "auto",
        prefix_cache_bytes: int = 512 * 1024 * 1024,
        dtype: str = "auto",
    ) -> None:
        import torch

        from worker.engine.prefix_cache import PrefixCache
        from worker.models.dtypes import choose

        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template: save the model from a chat model "
                "(one whose tokenizer defines chat_template)"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if decode == "auto":
            decode = "compiled" if self.device.type == "cuda" else "dynamic"
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of auto, {', '.join(DECODE_MODES)}; got {decode!r}")
        self.decode = decode
        self._static_caches: dict[tuple[int, int], Any] = {}
        self._compiled_step: Any = None
        self.model = model.to(device=self.device, dtype=choose(dtype, self.device)).eval()
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        config = model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", None) or 2048
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
        head = self.model.get_output_embeddings()
        text_config = getattr(config, "get_text_config", lambda: config)()
        #: The width of the model's logits (the tokenizer's vocabulary may be smaller).
        self.vocab_size = int(head.weight.shape[0] if head is not None else getattr(text_config, "vocab_size", None) or len(tokenizer))
        self.format = ChatFormat(tokenizer, served_name)
        #: The model's grammar compiler and token bytes, built with the model (not by the first
        #: request that needs it, in the engine thread).
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_ids)
        #: Forward passes of one token per row run so far (every decode mode and schedule).
        self.decode_steps = 0
        #: KV of prompt blocks, for continuous batches whose prompts begin alike.
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        #: Most prompt tokens prefilled per continuous step, unless configured.
        self.default_prefill_tokens = 16_384 if self.device.type == "cuda" else 2_048

    def continuous(self, max_rows: int, max_tokens: int) -> ContinuousBatch | None:
        """A continuous batch over this runner: rows joining a growing cache in the dynamic
        decode (worker/engine/continuous.py), slots of one static cache in the static and
        compiled ones (worker/engine/slots.py).
        None for a model whose cache is not plain per-layer tensors (sliding windows, linear
        attention): it batches per request.

        Slots: `max_rows` of them, each as long as `max_tokens` allows (up to the model's
        context, at least SLOT_TOKENS where the context is that long: fewer slots then). A
        request longer than a slot runs per request, alone."""
        from transformers.cache_utils import DynamicLayer

        from worker.engine.continuous import ContinuousDecode
        from worker.engine.slots import SlotDecode, slot_shape

        if any(type(layer) is not DynamicLayer for layer in getattr(self._dynamic_cache(), "layers", [None])):
            return None
        if self.decode == "dynamic":
            return ContinuousDecode(self, self.prefix_cache, max_tokens=max_tokens)
        slots, length = slot_shape(max_rows, max_tokens, self.context_length)
        logger.info("continuous batch of %d slots of %d tokens (%d KV tokens)", slots, length, slots * length)
        return SlotDecode(self, self.prefix_cache, slots=slots, length=length)

    def batch_limits(self, max_batch_size: int | None, max_batch_tokens: int | None) -> tuple[int, int]:
        """Most sequences and most padded tokens per batch: what was configured, else defaults;
        on CUDA the defaults come from free device memory, and no configured value may exceed
        what fits."""
        if self.device.type != "cuda":
            sizing = size_for_cpu(self.model, self.time_step, max_rows=max_batch_size, max_tokens=max_batch_tokens)
            return sizing.rows, sizing.tokens
        fits = self._tokens_that_fit()
        tokens = min(max_batch_tokens or fits, fits)
        logger.info("batches of up to %d padded tokens fit in free %s memory", fits, self.device)
        return max_batch_size or CUDA_BATCH_SIZE, tokens

    def time_step(self, rows: int, width: int) -> float:
        """Seconds of one decode step of `rows` rows over a cache `width` tokens wide (zeros:
        a step costs the same whatever the values), the fastest of two."""
        import torch

        with torch.inference_mode():
            cache = self.new_cache()
            config = self.model.config
            config = getattr(config, "get_text_config", lambda: config)()
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            for layer in range(config.num_hidden_layers):
                shape = (rows, kv_heads, width, head_dim)
                cache.update(torch.zeros(shape, dtype=self.model.dtype, device=self.device),
                             torch.zeros(shape, dtype=self.model.dtype, device=self.device), layer)
            tokens = torch.full((rows, 1), self.pad_id, device=self.device)

            def step() -> None:
                seen = cache.get_seq_length()
                mask = torch.ones((rows, seen + 1), dtype=torch.long, device=self.device)
                self.last_logits(tokens, mask, torch.full((rows, 1), seen, device=self.device), cache)

            return timed(step)

    def _tokens_that_fit(self) -> int:
        """Padded tokens whose KV cache fits in free device memory, with room for activations,
        the sampling workspace, the prefix cache, a second cached batch shape and shape
        rounding."""
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        config = self.model.config
        config = getattr(config, "get_text_config", lambda: config)()
        per_token = kv_bytes_per_token(self.model)
        # Logits, softmax, top-p sort and the sampling noise: about 40 bytes per vocabulary
        # entry per row, for the largest batch.
        sampling = CUDA_BATCH_SIZE * 2 * config.vocab_size * 40
        usable = int(free * 0.8) - 2 * 1024**3 - sampling - self.prefix_cache.max_bytes
        # Two cached shapes, each up to twice the requested size after rounding up.
        return max(4_096, usable // (4 * per_token))

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        # The Rust tokenizer directly, when there is one: all texts in one call, which runs
        # without the GIL (and in parallel), so Celery's threads go on meanwhile.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [list(encoding.ids) for encoding in backend.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _encode_each(self, texts: list[str]) -> list[list[int] | RequestError]:
        """Token ids of each text: all in one call, or, when that call raises (one text the
        tokenizer refuses fails the whole call), one text at a time, so that only a text the
        tokenizer refuses gets an error (invalid_request), not its neighbours."""
        try:
            return list(self._encode_many(texts))
        except Exception as failure:
            if len(texts) == 1:
                return [RequestError(
                    ErrorCode.invalid_request,
                    f"the model's tokenizer refused the rendered messages ({type(failure).__name__}: {str(failure)[:200]}): send plain UTF-8 text",
                    param="messages",
                )]
            logger.warning("encoding %d prompts together failed (%s): encoding each alone", len(texts), type(failure).__name__)
        return [ids for text in texts for ids in self._encode_each([text])]

    def text_of(self, row: Row) -> str:
        """A finished row's text, from its tokens."""
        return str(self.tokenizer.decode(row.tokens, skip_special_tokens=True))

    # Hooks called by the engine.

    def prepare_many(self, items: list[Pending]) -> list[RequestError | None]:
        errors: list[RequestError | None] = [None] * len(items)
        texts: list[str] = []
        rendered: list[int] = []
        for index, item in enumerate(items):
            errors[index] = self._check(item.request)
            if errors[index] is not None:
                continue
            try:
                texts.append(self.format.render(item.request))
                rendered.append(index)
            except Exception as error:  # a template that raises (e.g. on a role it refuses)
                errors[index] = RequestError(
                    ErrorCode.invalid_request, f"the model's chat template refused the messages: {error}", param="messages"
                )
        for index, prompt_ids in zip(rendered, self._encode_each(texts)):
            errors[index] = prompt_ids if isinstance(prompt_ids, RequestError) else self._fit(items[index], prompt_ids)
        return errors

    def _check(self, request: ChatCompletionRequest) -> RequestError | None:
        """What this model cannot do of a request: a tool-call format it does not write, a
        biased token outside its vocabulary, a schema the grammar library cannot compile."""
        refusal = self.format.check(request)
        if refusal is not None:
            return refusal
        for token in request.logit_bias or {}:
            if int(token) >= self.vocab_size:
                return RequestError(
                    ErrorCode.invalid_request,
                    f"'logit_bias': token id {token} is not in the vocabulary of {self.served_name!r} ({self.vocab_size} tokens)",
                    param="logit_bias",
                )
        try:
            for schema, where in schemas_to_check(request):
                self.grammars.matcher(schema, where)  # compiled once here, cached for the rows
        except RequestError as error:
            return error
        return None

    def _fit(self, item: Pending, prompt_ids: list[int]) -> RequestError | None:
        """Size a rendered request against the context; its error, or None once prepared."""
        request = item.request
        room = self.context_length - len(prompt_ids)
        wanted = request.max_new_tokens
        if wanted is None:
            wanted = min(self.default_max_tokens, room)
        if room < 1 or len(prompt_ids) + wanted > self.context_length:
            return RequestError(
                ErrorCode.context_length_exceeded,
                f"the prompt is {len(prompt_ids)} tokens and max_tokens is {wanted}, over the "
                f"model's context of {self.context_length} tokens: shorten the messages or "
                "lower max_tokens",
                param="messages",
            )
        schema = schema_for(request)
        # A grammar decides where a JSON answer ends: `stop` would cut it mid-value.
        stops = request.stop_sequences if schema is None else []
        item.prepared = Prepared(prompt_ids=prompt_ids, max_new=wanted, stops=stops, schema=schema)
        item.rows = request.n
        item.cost = len(prompt_ids) + wanted
        return None

    def run_batch(self, items: list[Pending]) -> list[ChatCompletion | RequestError]:
        if self.decode == "dynamic":
            return self._run_dynamic(items)
        import torch

        rows = [self.row(index, choice, item) for index, item in enumerate(items) for choice in range(item.request.n)]
        with torch.inference_mode():
            self._decode_static(rows)
        created = int(time.time())
        by_item: list[list[Row]] = [[] for _ in items]
        for row in rows:
            by_item[row.item].append(row)
        results: list[ChatCompletion | RequestError] = []
        for item, mine in zip(items, by_item):
            try:
                results.append(self.completion(item, mine, created))
            except RequestError as error:  # this request's answer cannot be given; its neighbours' can
                results.append(error)
            except Exception as error:
                logger.exception("building the answer of %s failed", item.request_id)
                results.append(RequestError(ErrorCode.internal_error, f"the answer could not be built: {error}"))
        return results

    def _run_dynamic(self, items: list[Pending]) -> list[ChatCompletion | RequestError]:
        """A group in the dynamic decode: the continuous decode, given the whole group at once
        and nothing after (rows leave as they finish; no prefix reuse)."""
        from worker.engine.continuous import ContinuousDecode
        from worker.engine.prefix_cache import PrefixCache

        decode = ContinuousDecode(self, PrefixCache(0), max_tokens=0)
        decode.admit(items)
        answers: dict[int, ChatCompletion | RequestError] = {}
        while len(decode):
            answers.update((id(item), result) for item, result in decode.step())
        return [answers[id(item)] for item in items]

    def row(self, index: int, choice: int, item: Pending) -> Row:
        stops = item.prepared.stops
        return Row(item=index, choice=choice, prepared=item.prepared, params=self._params(item, choice),
                    finder=StopFinder(self.tokenizer, stops) if stops else None, stream=item.stream)

    def completion(self, item: Pending, rows: list[Row], created: int) -> ChatCompletion:
        """A request's chat.completion, built without validation (model_construct): every value
        comes from the code above, and this runs once per request on the engine thread.

        Raises:
            RequestError: internal_error, when a row's grammar failed.
        """
        for row in rows:
            if row.finish == "cancelled":
                generated = sum(row.generated for row in rows)
                raise RequestError(ErrorCode.cancelled, f"the client disconnected ({generated} tokens generated)")
            if row.grammar_error:
                raise RequestError(ErrorCode.internal_error, f"the answer's grammar failed: {row.grammar_error}")
            if row.failure:
                raise RequestError(ErrorCode.internal_error, f"generation failed for this request: {row.failure}")
        prompt_tokens = len(item.prepared.prompt_ids)
        completion_tokens = sum(row.generated for row in rows)
        return ChatCompletion.model_construct(
            id=completion_id(),
            object="chat.completion",
            created=created,
            model=self.served_name,
            choices=[self._choice(row, item.request) for row in rows],
            usage=Usage.model_construct(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    def _params(self, item: Pending, choice: int) -> Any:
        """The sampling settings of one row (one choice of a request)."""
        from worker.decode.sampling import SamplingParams, row_seed

        request: ChatCompletionRequest = item.request
        schema = item.prepared.schema
        return SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            seed=row_seed(request.seed, choice) if request.temperature > 0 else 0,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias={int(token): bias for token, bias in request.logit_bias.items()} if request.logit_bias else None,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            matcher=self.grammars.matcher(*schema) if schema is not None else None,
        )

    def sampler(self, params: list[Any], *, host_logprobs: bool = False) -> Any:
        from worker.decode.sampling import BatchSampler

        return BatchSampler(params, self.device, vocab_size=self.vocab_size, grammars=self.grammars, host_logprobs=host_logprobs)

    @staticmethod
    def _keep_logprobs(rows: list[Row], sampler: Any) -> None:
        """Give each row what the sampler kept for it: log probabilities, a grammar's failure."""
        for index, error in sampler.failed_grammars().items():
            rows[index].grammar_error = error
        if not sampler.logprob_rows:
            return
        found = sampler.logprobs_of()
        for index, row in enumerate(rows):
            if row.params.logprobs is not None:
                row.logprobs = found.get(index, [])

    def _choice(self, row: Row, request: ChatCompletionRequest) -> ChatCompletionChoice:
        """One choice of the answer: its text or tool calls, finish reason and log probabilities."""
        finish = row.finish or "length"
        content, calls = self._calls(row.text or "", finish, request)
        tool_calls = [
            ToolCall.model_construct(id=new_id("call_"), type="function", function=FunctionCall.model_construct(name=name, arguments=arguments))
            for name, arguments in calls
        ]
        logprobs = None
        if row.logprobs is not None:
            logprobs = ChoiceLogprobs.model_construct(content=self._token_logprobs(row), refusal=None)
        return ChatCompletionChoice.model_construct(
            index=row.choice,
            message=ChatCompletionMessage.model_construct(role="assistant", content=content, tool_calls=tool_calls or None),
            logprobs=logprobs,
            finish_reason="tool_calls" if tool_calls and finish == "stop" else finish,
        )

    def _calls(self, text: str, finish: str, request: ChatCompletionRequest) -> tuple[str | None, list[tuple[str, str]]]:
        """(content, [(name, arguments)]) of an answer's text. A forced call is calls only, also
        when `max_tokens` cut it (`finish` "length": the calls as far as they were written);
        with `tool_choice: "auto"` the model's Hermes blocks are calls, a cut last one too."""
        if request.calls_tools:
            return None, forced_calls(text, request) if finish == "stop" else cut_calls(text, request)
        if request.tools and request.effective_tool_choice == "auto" and self.format.hermes:
            content, calls = parse_hermes(text, {tool.function.name for tool in request.tools}, cut=finish == "length")
            return content, calls[:1] if request.parallel_tool_calls is False else calls
        return text, []

    def _token_logprobs(self, row: Row) -> list[TokenLogprob]:
        """The log probabilities of the tokens the answer returns (a stop string's tokens and
        the EOS token are not returned)."""
        kept = len(row.tokens) if row.kept is None else row.kept
        entries: list[TokenLogprob] = []
        for token, (logprob, alternatives) in zip(row.tokens[:kept], row.logprobs or []):
            top = [TopLogprob.model_construct(**self._token(alt), logprob=value) for alt, value in alternatives]
            entries.append(TokenLogprob.model_construct(**self._token(token), logprob=logprob, top_logprobs=top))
        return entries

    def _token(self, token: int) -> dict[str, Any]:
        """A token as `logprobs` shows it: its text and UTF-8 bytes (a special token as its name)."""
        raw = self.grammars.token_bytes(token) or str(self.tokenizer.convert_ids_to_tokens(token)).encode()
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}

    # The static decode: fixed shapes, checks on the device.

    def _static_shape(self, rows: int, tokens: int) -> tuple[int, int]:
        """Rows and cache length of a static batch, rounded up so that few distinct shapes (each
        compiled once, and each with its own cache) serve every batch."""
        if self.device.type != "cuda" and self.decode == "static":
            return rows, tokens
        size = 8 if rows <= 8 else 1 << (rows - 1).bit_length()
        return size, max(tokens, min(_round_up(tokens, 256), self.context_length))

    def _static_cache(self, size: int, length: int) -> Any:
        """A static KV cache of this shape, reused across batches (CUDA graphs need its buffers
        to stay put); only the most recent shapes are kept."""
        from transformers import StaticCache

        key = (size, length)
        cache = self._static_caches.pop(key, None)
        if cache is None:
            while len(self._static_caches) >= 2:
                self._static_caches.pop(next(iter(self._static_caches)))
            cache = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()
        self._static_caches[key] = cache
        return cache

    def slot_cache(self, slots: int, length: int) -> Any:
        """A static KV cache of `slots` rows of `length` tokens, allocated now (the slot
        layout's own, apart from the per-request shapes, which are reset for reuse)."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=length)
        config = self.model.config
        config = getattr(config, "get_text_config", lambda: config)()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        cache.early_initialization(slots, kv_heads, head_dim, self.model.dtype, self.device)
        return cache

    def last_logits(self, input_ids: Any, mask: Any, positions: Any, cache: Any, **extra: Any) -> Any:
        """One forward pass that fills `cache`; the float32 logits of each row's last position."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
            **extra,
        )
        return out.logits[:, -1, :].float()

    def _forward_step(self, tokens: Any, positions: Any, cache_position: Any, mask: Any, cache: Any) -> Any:
        return self.last_logits(tokens, mask, positions, cache, cache_position=cache_position)

    def decode_step(self, tokens: Any, positions: Any, cache_position: Any, mask: Any, cache: Any) -> Any:
        """One decode step over a static cache, compiled when the decode mode says so (falling
        back to eager, with a warning, if this model or torch cannot compile it)."""
        import torch

        args = (tokens, positions, cache_position, mask, cache)
        # Counted here, outside the compiled function: a Python int that changes every step
        # would be a new graph input each time.
        self.decode_steps += 1
        if self.decode != "compiled":
            return self._forward_step(*args)
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._forward_step, mode="reduce-overhead", fullgraph=True)
        try:
            logits = self._compiled_step(*args)
        except Exception as error:  # an unsupported model or backend: run eager from now on
            logger.warning("compiled decode failed (%s: %s); decoding without compilation", type(error).__name__, error)
            self.decode = "static"
            return self._forward_step(*args)
        # CUDA graphs reuse their output buffer on the next replay.
        return logits.clone()

    def _decode_static(self, rows: list[Row]) -> None:
        import torch

        from worker.decode.sampling import SamplingParams
        from worker.engine.kvcache import left_padded
        from worker.engine.slots import SYNC_EVERY

        device = self.device
        count = len(rows)
        width = max(len(row.prepared.prompt_ids) for row in rows)
        max_new = max(row.prepared.max_new for row in rows)
        size, length = self._static_shape(count, width + max_new)
        # The attention mask spans the whole cache: left padding is masked; slots not written
        # yet are excluded by causality. Filler rows (up to the bucketed size) hold one token.
        input_ids, prompt_mask = left_padded([row.prepared.prompt_ids for row in rows], size, width, self.pad_id)
        mask = torch.ones((size, length), dtype=torch.long)
        mask[:, :width] = prompt_mask
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        cache = self._static_cache(size, length)
        logits = self.last_logits(input_ids, mask, positions, cache, cache_position=torch.arange(width, device=device), logits_to_keep=1)
        params = [row.params for row in rows] + [SamplingParams(0.0, 1.0, 0)] * (size - count)
        sampler = self.sampler(params)
        limits = torch.tensor([row.prepared.max_new for row in rows] + [1] * (size - count), device=device)
        eos = torch.tensor(sorted(self.eos_ids) or [-1], device=device)
        produced = torch.full((size, max_new), self.pad_id, dtype=torch.long, device=device)
        done = torch.zeros(size, dtype=torch.bool, device=device)
        next_pos = positions[:, -1:] + 1
        cache_position = torch.tensor([width], device=device)
        with_stops = [i for i, row in enumerate(rows) if row.prepared.stops]
        watchers = {i: StopFinder(self.tokenizer, rows[i].prepared.stops) for i in with_stops}
        step = 0
        while True:
            tokens = sampler.choose(logits)
            produced[:, step] = tokens
            done |= torch.isin(tokens, eos) | (limits <= step + 1)
            step += 1
            if step >= max_new:
                break
            if step % SYNC_EVERY == 0:
                # The only host syncs: once every SYNC_EVERY tokens.
                if with_stops:
                    recent = produced[:count, step - SYNC_EVERY : step].tolist()
                    hit = [i for i in with_stops if self._has_stop(watchers[i], recent[i])]
                    if hit:
                        done[torch.tensor(hit, device=device)] = True
                if bool(done.all()):
                    break
            logits = self.decode_step(tokens[:, None], next_pos, cache_position, mask, cache)
            next_pos = next_pos + 1
            cache_position = cache_position + 1
        for row, tokens in zip(rows, produced[:count, :step].tolist()):
            try:
                self._finish(row, tokens)
                if row.text is None:
                    row.text = self.text_of(row)
            except Exception as error:  # this row's own work (stop strings, stream, text); its neighbours' stands
                logger.exception("a row of a static batch failed; its neighbours are answered")
                row.failure = f"{type(error).__name__}: {error}"
        self._keep_logprobs(rows, sampler)

    def _has_stop(self, watcher: StopFinder, tokens: list[int]) -> bool:
        """Whether a row's text, with these new tokens (up to an EOS), holds one of its stop
        strings; a row already at EOS is not looked at again."""
        if watcher.ended:
            return False
        for token in tokens:
            if token in self.eos_ids:
                watcher.ended = True
                return False
            if watcher.feed(token):
                return True
        return False

    def _finish(self, row: Row, tokens: list[int]) -> str | None:
        """Settle a row from the tokens a static decode produced for it: cut at its first EOS,
        stop string or max_tokens, as the dynamic decode would have. Returns its finish reason,
        or None while it is still running."""
        row.tokens, row.finish, row.text, row.generated = [], None, None, 0
        if row.finder is not None:
            row.finder = StopFinder(self.tokenizer, row.finder.stops)
        for token in tokens:
            if self.advance(row, token):
                break
        return row.finish

    def advance(self, row: Row, token: int) -> bool:
        """Add one generated token to a row; True once the row is finished (EOS, a stop
        string, its max_tokens, or its stream's client gone: `cancelled`), with its finish
        reason set. A streamed row's token goes to its stream's sink (a queue append)."""
        stream = row.stream
        if stream is not None and stream.cancelled:
            row.finish = "cancelled"
            return True
        row.generated += 1
        if token in self.eos_ids:
            row.finish = "stop"
            return True
        row.tokens.append(token)
        if stream is not None:
            stream.put(row.choice, token)
        if row.finder is not None and row.finder.feed(token) and self._hit_stop(row):
            return True
        if row.generated >= row.prepared.max_new:
            row.finish = "length"
            return True
        return False

    def _hit_stop(self, row: Row) -> bool:
        """Cut a row's answer at the first stop string of its whole text (decoded once, when
        the incremental text shows one)."""
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in row.prepared.stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        row.text = text[:cut]
        row.finish = "stop"
        # The tokens the answer returns: those whose text lies before the stop string.
        kept = len(row.tokens)
        while kept and len(self.tokenizer.decode(row.tokens[: kept - 1], skip_special_tokens=True)) >= cut:
            kept -= 1
        row.kept = kept
        return True

    def new_cache(self) -> Any:
        """A DynamicCache whose plain layers grow in place (worker/engine/kvcache.py)."""
        from transformers.cache_utils import DynamicLayer

        from worker.engine.kvcache import GrowingLayer

        cache = self._dynamic_cache()
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def _dynamic_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)


class PyfuncRunner:
    """Fallback for llm/v1/chat pyfunc models that are not transformers pipelines.

    MLflow's pyfunc `predict` takes one request at a time, so this runner does too.
    """

    batched = False

    def __init__(self, model: Any, *, served_name: str) -> None:
        self.model = model
        self.served_name = served_name

    def batch_limits(self, max_batch_size: int | None, max_batch_tokens: int | None) -> tuple[int, int]:
        return max_batch_size or CPU_BATCH_SIZE, max_batch_tokens or CPU_BATCH_TOKENS

    def prepare_many(self, items: list[Pending]) -> list[RequestError | None]:
        errors: list[RequestError | None] = []
        for item in items:
            item.rows = item.request.n
            errors.append(self._refuse(item.request))
        return errors

    def _refuse(self, request: ChatCompletionRequest) -> RequestError | None:
        """`predict` takes messages and sampling settings only: a request that needs the
        decode loop (a grammar, log probabilities, penalties, bias, tools) is refused."""
        used = {
            "response_format": request.response_format is not None and request.response_format.type != "text",
            "logprobs": request.logprobs,
            "presence_penalty": bool(request.presence_penalty),
            "frequency_penalty": bool(request.frequency_penalty),
            "logit_bias": bool(request.logit_bias),
            "tools": bool(request.tools),
        }
        for name, wanted in used.items():
            if wanted:
                return RequestError(
                    ErrorCode.unsupported_parameter,
                    f"'{name}' is not supported by {self.served_name!r}, which is served through MLflow's pyfunc "
                    "predict (only transformers models run in chatbatch's own decode loop): remove it",
                    param=name,
                )
        return None

    def run_batch(self, items: list[Pending]) -> list[ChatCompletion | RequestError]:
        results: list[ChatCompletion | RequestError] = []
        for item in items:
            body = item.request.model_dump(
                exclude_none=True,
                include={"messages", "temperature", "top_p", "n", "stop"},
            )
            for message in body["messages"]:
                if message["role"] == "developer":  # MLflow's chat schema knows system, user, assistant, tool
                    message["role"] = "system"
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
