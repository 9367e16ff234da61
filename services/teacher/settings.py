"""Teacher settings: model, vLLM engine, request defaults and limits, and the prompt → sample worker."""

from __future__ import annotations

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.common.models import DEFAULT_TEACHER
from services.common.settings import ServiceSettings
from services.common.vllm_engine import VllmSettings

CONSUMER_GROUP = "distillery-teacher"


class PromptWorkerSettings(BaseModel):
    """The Kafka pipeline worker (nested: `DISTILLERY_TEACHER_WORKER__BATCH_SIZE=64`)."""

    enabled: bool = True
    """Consume the prompts topic and publish teacher samples (off: gRPC only)."""
    group_id: str = CONSUMER_GROUP
    """Consumer group; teacher replicas in one group share the prompt partitions."""
    batch_size: int = Field(0, ge=0, le=100_000)
    """Prompts the worker keeps submitted to the engine at once, refilled as they finish (continuous batching);
    0 = vllm.max_num_seqs."""
    poll_timeout_s: float = Field(0.5, gt=0, le=60)
    """Longest wait for new prompts when the engine has room."""
    commit_interval_s: float = Field(0.5, ge=0, le=600)
    """How often finished prompts' offsets are committed (offsets only move past fully acknowledged work)."""
    stream_interval: int = Field(1_000_000, ge=1)
    """Tokens between the engine's progress reports per request; large = first token and end only (cheapest)."""
    ack_timeout_s: float = Field(60.0, gt=0)
    """Longest wait for the broker to acknowledge a sample before the worker gives up (and exits)."""
    publish_retry_s: float = Field(300.0, gt=0, le=86_400)
    """How long a prompt's samples are resent (on a rebuilt producer) while the broker does not acknowledge them —
    a broker restart; past it the worker fails and the process exits for the orchestrator to restart."""


class TeacherSettings(ServiceSettings):
    """`distillery teacher serve` (env prefix `DISTILLERY_TEACHER_`, nested fields with `__`)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_TEACHER_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)
    model: str = DEFAULT_TEACHER
    """Teacher: a prepared model name under the models folder (the default teacher is prepared on first use) or
    any Hugging Face-format folder with safetensors weights."""
    revision: str | None = None
    """Teacher revision recorded in every sample; default: derived from the model folder's manifest or weights."""
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    max_concurrent_streams: int = Field(64, ge=1, le=100_000)
    """Generate streams open at once; more are refused with RESOURCE_EXHAUSTED."""
    max_prompt_chars: int = Field(100_000, ge=1, le=100_000_000)
    """Longest Generate/Score prompt in characters (prompt text or all message contents), checked before the
    tokenizer runs; longer is refused with RESOURCE_EXHAUSTED."""
    max_prompt_bytes: int = Field(400_000, ge=1, le=400_000_000)
    """Longest Generate/Score prompt in UTF-8 bytes, checked like `max_prompt_chars`."""
    default_top_k: int = Field(20, ge=1, le=100)
    """Top-k logprobs per token when a request does not say (capped by vllm.max_logprobs)."""
    default_max_tokens: int = Field(256, ge=1, le=1_000_000)
    """Completion length when a request does not say."""
    default_temperature: float = Field(1.0, ge=0, le=10)
    """Sampling temperature when a request does not say (1.0: the teacher's own distribution)."""
    max_n: int = Field(16, ge=1, le=1024)
    """Most completions per prompt a request may ask for."""
    worker: PromptWorkerSettings = Field(default_factory=PromptWorkerSettings)
