"""Typed configs of the data stage (target cache). Registered with Hydra in ``deepspec.config``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from deepspec.config.base import WandbConfig, at_least, one_of

STORAGE_DTYPES = ("bf16", "fp16", "fp8", "int8")
CACHE_FORMATS = ("parquet", "webdataset")
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TargetConfig:
    """The frozen target model whose features the drafter learns from."""

    name_or_path: str = "toy"
    """HF model folder or hub id; ``toy`` is the embedded target shipped in deepspec/assets."""
    layer_ids: list[int] = field(default_factory=lambda: [0, 2, 4])
    """Decoder layers whose output hidden states feed the drafter (-1 = embedding output)."""
    layer_selection: str = "listed"
    """``listed`` (layer_ids as given) | ``full_attention``: on a hybrid target (Qwen3.5, Qwen3-Next), each listed id moves
    to the nearest full-attention layer below the last layer (ties: the lower one), resolved at start-up from the
    target's config (``resolve_layer_selection``)."""
    mask_token_id: Optional[int] = None
    """Unused vocabulary id the drafter uses as MASK (None: look up ``<|mask|>`` in the tokenizer)."""
    dtype: str = "auto"
    """Compute dtype of the target forward pass: auto (bfloat16 where the device runs it natively,
    else float32; see deepspec/precision.py), float32, bfloat16 or float16."""
    device: str = "auto"
    """``auto`` (cuda:LOCAL_RANK if available, else cpu), ``cpu`` or ``cuda``."""
    attn_implementation: str = "sdpa"
    """HF attention backend (``sdpa``, ``eager``, ``flash_attention_2``)."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained`` for models with custom code."""

    def problems(self, prefix: str = "target.") -> list[str]:
        out = one_of(prefix, "dtype", self.dtype, TORCH_DTYPES)
        out += one_of(prefix, "device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        if not self.layer_ids:
            out.append(f"{prefix}layer_ids is empty: give at least one layer id")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            out.append(f"{prefix}layer_ids={list(self.layer_ids)} has duplicates")
        out += [f"{prefix}layer_ids has {i}: ids must be >= -1" for i in self.layer_ids if i < -1]
        out += one_of(prefix, "layer_selection", self.layer_selection, ("listed", "full_attention"))
        return out


def nearest_full_attention(layer_ids: list[int], layer_types: list[str]) -> list[int]:
    """Each id -> the nearest full-attention layer below the last layer (whose output the LM head reads anyway);
    ties go to the lower layer. Raises ValueError when there is none, or when two ids land on the same layer."""
    full = [i for i, t in enumerate(layer_types[:-1]) if t == "full_attention"]
    if not full:
        raise ValueError(f"target.layer_selection=full_attention: the target has no full-attention layer below its last "
                         f"(layer types {sorted(set(layer_types))})")
    picked = [min(full, key=lambda f: (abs(f - i), f)) for i in layer_ids]
    if len(set(picked)) != len(picked):
        raise ValueError(f"target.layer_selection=full_attention: layer_ids={list(layer_ids)} map to {picked}, which repeats a "
                         f"layer (full-attention layers: {full}); list ids further apart")
    return picked


def resolve_layer_selection(cfg: TargetConfig) -> None:
    """Apply ``layer_selection`` to ``layer_ids`` in place, reading only the target's config.json (no weights)."""
    if cfg.layer_selection == "listed":
        return
    from transformers import AutoConfig

    from deepspec.target import resolve_target_path

    config = AutoConfig.from_pretrained(resolve_target_path(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
    text = getattr(config, "text_config", None) or config
    cfg.layer_ids = nearest_full_attention(cfg.layer_ids, list(getattr(text, "layer_types", None) or []) or
                                           ["full_attention"] * text.num_hidden_layers)


@dataclass
class InputConfig:
    """Where the prompt/conversation rows come from."""

    paths: list[str] = field(default_factory=list)
    """JSONL (``.jsonl``/``.json``) or Parquet files, read in the order given."""
    dataset: Optional[str] = None
    """A ``datasets`` name or local path, read with ``load_dataset(dataset, split=split, streaming=True)``."""
    split: str = "train"
    """Split of ``dataset``."""
    max_rows: Optional[int] = None
    """Read at most this many rows (None: all)."""
    max_malformed_fraction: float = 0.01
    """Fail the run when more than this fraction of rows is malformed (each one is reported)."""

    def problems(self, prefix: str = "input.") -> list[str]:
        out = []
        if not self.paths and not self.dataset:
            out.append(f"{prefix}paths and {prefix}dataset are both empty: give input files or a dataset")
        if not 0.0 <= self.max_malformed_fraction <= 1.0:
            out.append(f"{prefix}max_malformed_fraction={self.max_malformed_fraction} must be in [0, 1]")
        if self.max_rows is not None:
            out += at_least(prefix, "max_rows", self.max_rows, 1)
        return out


@dataclass
class RegenerateConfig:
    """Let the target (or an OpenAI-compatible server) rewrite the assistant turns before caching."""

    enabled: bool = False
    """Regenerate assistant answers; otherwise the answers in the input are cached as they are."""
    backend: str = "hf"
    """``hf`` (batched ``generate`` on the target) or ``openai`` (``/v1/chat/completions`` at ``url``)."""
    url: Optional[str] = None
    """Base URL of an OpenAI-compatible server, e.g. http://localhost:8000 (backend=openai)."""
    server_model: Optional[str] = None
    """``model`` field sent to the server (default: target.name_or_path)."""
    max_new_tokens: int = 256
    """Longest regenerated answer, in tokens."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy)."""
    top_p: float = 0.8
    """Nucleus sampling threshold."""
    top_k: int = 20
    """Top-k sampling (0 = off)."""
    batch_size: int = 16
    """Rows per ``generate`` call (hf) or concurrent requests (openai)."""
    timeout_seconds: float = 120.0
    """Per-request timeout (openai)."""
    max_retries: int = 3
    """Retries per request before the row is reported as failed (openai)."""
    seed: int = 0
    """Base seed; each generation batch is seeded from (seed, shard, batch) so resumes are exact."""

    def problems(self, prefix: str = "regenerate.") -> list[str]:
        out = one_of(prefix, "backend", self.backend, ("hf", "openai"))
        if self.enabled and self.backend == "openai" and not self.url:
            out.append(f"{prefix}url is required when {prefix}backend=openai")
        out += at_least(prefix, "max_new_tokens", self.max_new_tokens, 1)
        out += at_least(prefix, "batch_size", self.batch_size, 1)
        out += at_least(prefix, "temperature", self.temperature, 0.0)
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"{prefix}top_p={self.top_p} must be in (0, 1]")
        return out


@dataclass
class CacheConfig:
    """On-disk layout of the target cache."""

    format: str = "parquet"
    """``parquet`` (pyarrow, one row per sample) or ``webdataset`` (tar shards)."""
    storage_dtype: str = "bf16"
    """Hidden-state storage: bf16, fp16 (exact copies), fp8 (e4m3 + fp32 scale per token row), int8 (absmax per token row)."""
    samples_per_shard: int = 256
    """Input rows per shard; shard k always holds input rows [k*n, (k+1)*n), whatever the world size."""
    rows_per_row_group: int = 32
    """Parquet row-group size in samples (the reader's unit of shuffling and sharding)."""
    compression: str = "zstd"
    """Parquet compression codec (``none``, ``zstd``, ``snappy``, ``lz4``)."""
    topk_logprobs: int = 0
    """Also store the target's top-k log-probabilities at supervised positions (0 = off)."""
    write_queue_batches: int = 4
    """Forward batches that may wait for the writer thread (bounds memory, overlaps I/O and compute)."""

    def problems(self, prefix: str = "cache.") -> list[str]:
        out = one_of(prefix, "format", self.format, CACHE_FORMATS)
        out += one_of(prefix, "storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        out += one_of(prefix, "compression", self.compression, ("none", "zstd", "snappy", "lz4", "gzip"))
        out += at_least(prefix, "samples_per_shard", self.samples_per_shard, 1)
        out += at_least(prefix, "rows_per_row_group", self.rows_per_row_group, 1)
        out += at_least(prefix, "topk_logprobs", self.topk_logprobs, 0)
        out += at_least(prefix, "write_queue_batches", self.write_queue_batches, 1)
        return out


@dataclass
class DataStageConfig:
    """The data stage: rows -> (regeneration) -> target forward -> cache shards + manifest."""

    command: str = "build"
    """``build``, ``verify``, ``stats``, ``estimate`` or ``finalize`` (write manifest.json once all shards exist)."""
    out_dir: str = "runs/cache"
    """Cache directory (manifest.json, shards, regenerated answers)."""
    max_length: int = 1024
    """Truncate rendered samples to this many tokens."""
    min_loss_tokens: int = 14
    """Drop samples with fewer supervised (assistant) tokens."""
    batch_size: int = 8
    """Samples per target forward pass."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    target: TargetConfig = field(default_factory=TargetConfig)
    input: InputConfig = field(default_factory=InputConfig)
    regenerate: RegenerateConfig = field(default_factory=RegenerateConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B run of the build: the manifest's counts and sizes."""

    def problems(self, prefix: str = "") -> list[str]:
        out = one_of(prefix, "command", self.command, ("build", "verify", "stats", "estimate", "finalize"))
        out += at_least(prefix, "max_length", self.max_length, 2)
        out += at_least(prefix, "min_loss_tokens", self.min_loss_tokens, 1)
        out += at_least(prefix, "batch_size", self.batch_size, 1)
        if self.min_loss_tokens >= self.max_length:
            out.append(f"{prefix}min_loss_tokens={self.min_loss_tokens} must be < max_length={self.max_length}")
        out += self.target.problems(prefix + "target.")
        out += self.cache.problems(prefix + "cache.")
        out += self.wandb.problems(prefix + "wandb.")
        if self.command in ("build", "estimate"):
            out += self.input.problems(prefix + "input.")
            out += self.regenerate.problems(prefix + "regenerate.")
        return out
