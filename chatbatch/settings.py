"""The one settings object. No other module reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from chatbatch.egress import Allowed

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """chatbatch configuration, from `CHATBATCH_*` environment variables.

    S3 access is configured through boto3's own chain (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
    ...), never here.
    """

    model_config = SettingsConfigDict(env_prefix="CHATBATCH_", extra="ignore")

    #: Broker, job records and results. `rediss://` for TLS; a password goes in the URL.
    redis_url: str = DEFAULT_REDIS_URL
    #: The model a worker serves when `--model` is not given; empty means the default model.
    model_uri: str = ""
    #: Where converted models and other caches live.
    home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "chatbatch")
    #: How long a single request's result stays readable in Redis, in seconds.
    result_ttl: int = Field(default=86_400, ge=1)
    #: How long a job's record and lines stay in Redis after it ends, in seconds.
    job_ttl: int = Field(default=7 * 86_400, ge=1)
    #: Seconds a task may stay unacknowledged before Redis redelivers it to another worker.
    visibility_timeout: int = Field(default=3_600, ge=1)
    #: Deliveries of one task before its requests become `internal_error` lines.
    max_deliveries: int = Field(default=3, ge=1)
    #: Largest input line, in bytes (OpenAI: 1 MB... per request body).
    max_line_bytes: int = Field(default=1_000_000, ge=1)
    #: Largest input file, in bytes (OpenAI: 200 MB).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    #: Most lines in one input file (OpenAI: 50,000).
    max_file_lines: int = Field(default=50_000, ge=1)
    #: Most lines per Celery message when a file is enqueued; unset: sized to the file (see
    #: `chunk_lines`).
    chunk_size: int | None = Field(default=None, ge=1)
    #: Most sequences (requests times n) in one batch; unset: 32 on CPU, 512 on CUDA.
    max_batch_size: int | None = Field(default=None, ge=1)
    #: Most prompt plus new tokens in one batch (padding included); bounds KV cache and
    #: activation memory. Unset: 65,536 on CPU; on CUDA, what fits in free device memory (a
    #: value set higher than that is lowered to it).
    max_batch_tokens: int | None = Field(default=None, ge=1)
    #: How long the engine waits for more requests before running a partial batch, in ms.
    batch_wait_ms: int = Field(default=20, ge=0)
    #: How the engine batches: `continuous` admits waiting requests into the running batch at
    #: every step (every decode mode; pyfunc models run one request at a time); `request` runs
    #: a group of requests until the group is done. See docs/engine.md.
    schedule: Literal["continuous", "request"] = "continuous"
    #: Most prompt tokens prefilled per step of a continuous batch (those found in the prefix
    #: cache not counted), so that admitting never stalls the rows decoding; a longer prompt is
    #: admitted alone. Unset: 2,048 on CPU, 16,384 on CUDA.
    max_prefill_tokens: int | None = Field(default=None, ge=1)
    #: MB of prompt-block KV kept for prompts that begin alike (continuous schedule); 0 turns
    #: prefix reuse off.
    prefix_cache_mb: int = Field(default=512, ge=0)
    #: max_tokens used when a request sends none (capped by the model's context).
    default_max_tokens: int = Field(default=1_024, ge=1)
    #: Where the model runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...
    device: str = "auto"
    #: How batches are decoded: auto (compiled on CUDA, dynamic elsewhere), dynamic, static or
    #: compiled; see docs/engine.md.
    decode: Literal["auto", "dynamic", "static", "compiled"] = "auto"
    #: The dtype the model's weights and activations run in: auto (bfloat16 on CUDA and on CPUs
    #: with AMX or AVX-512 bf16, as torch detects them; float32 elsewhere), float32, bfloat16 or
    #: float16; see docs/engine.md.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: How long writing a job's S3 files keeps retrying (on top of boto3's own retries) before
    #: the job fails; each failed try leaves nothing behind.
    s3_retry_seconds: float = Field(default=120.0, ge=0)
    #: Bearer keys the HTTP API accepts, comma-separated; empty means no auth (with a warning).
    api_keys: str = ""
    #: The key that signs callbacks (HMAC-SHA256); needed before a request may name a callback.
    callback_secret: str = ""
    #: Callback destinations allowed although not public, comma-separated host names,
    #: addresses or CIDR networks (e.g. `127.0.0.1` for local development); every other URL
    #: that is, or resolves to, a loopback, private, link-local, metadata or reserved address
    #: is refused (chatbatch/egress.py).
    callback_allow: str = ""
    #: Tries per callback before its delivery is marked failed (backoff 1 s, 2 s, 4 s, ... 60 s).
    callback_max_attempts: int = Field(default=6, ge=1)
    #: Seconds a callback receiver has to answer.
    callback_timeout: float = Field(default=10.0, gt=0)
    #: Where the HTTP API keeps uploaded files (shared storage when several gateways run).
    files_dir: Path | None = None
    #: How long `POST /v1/chat/completions` waits for the answer before it returns 504: under
    #: the openai SDK's own timeout (600 s), so that the SDK gets the 504 that tells it not to
    #: retry, rather than giving up first, which cancels the request and sends it again.
    gateway_timeout: float = Field(default=570.0, gt=0)
    #: Seconds between keep-alive comments (`: ping`) of a streamed answer while no chunk is
    #: sent, so that proxies and clients with idle timeouts keep the stream open.
    stream_ping_seconds: float = Field(default=15.0, gt=0)
    #: Weights of owners in the fair share between jobs, "owner=weight,..." (others: 1); an
    #: owner of weight 2 gets twice the lines of one of weight 1 while both have jobs waiting.
    owner_weights: str = ""
    #: Port on which a worker or a gateway serves its Prometheus metrics (`/metrics`), apart
    #: from the API's port; unset: none.
    metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    #: Log lines as readable `text`, or `json`: one object per line (docs/operations.md).
    log_format: Literal["text", "json"] = "text"
    #: Seconds between a worker's heartbeats in the model registry.
    heartbeat_interval: float = Field(default=5.0, gt=0)
    #: MLflow experiment in which each job is tracked as a run (docs/lineage.md), unless the
    #: producer names one; empty: jobs are not tracked. The server is MLflow's own
    #: MLFLOW_TRACKING_URI, in the workers' environment.
    mlflow_experiment: str = ""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "CHATBATCH_REDIS_URL must start with redis://, rediss:// or unix://"
            )
        return value

    @field_validator("owner_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        parse_weights(value)
        return value

    @field_validator("callback_allow")
    @classmethod
    def _allowed(cls, value: str) -> str:
        from chatbatch.egress import Allowed

        Allowed.parse(value)
        return value

    @property
    def allowed_callbacks(self) -> Allowed:
        """`callback_allow`, parsed."""
        from chatbatch.egress import Allowed

        return Allowed.parse(self.callback_allow)

    @property
    def model_cache(self) -> Path:
        return self.home / "models"

    @property
    def files_path(self) -> Path:
        return self.files_dir or self.home / "files"

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]


def parse_weights(spec: str) -> dict[str, float]:
    """`CHATBATCH_OWNER_WEIGHTS`, "owner=weight,owner=weight", as a mapping.

    Raises:
        ValueError: an entry that is not owner=positive number.
    """
    weights: dict[str, float] = {}
    for part in (piece.strip() for piece in spec.split(",")):
        if not part:
            continue
        owner, _, value = part.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = 0.0
        if not owner or not weight > 0:
            raise ValueError(f"CHATBATCH_OWNER_WEIGHTS entry {part!r} is not owner=weight with a positive weight")
        weights[owner] = weight
    return weights


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
