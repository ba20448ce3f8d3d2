"""``estimate``: how many bytes a cache will take, before building it (no target weights loaded).

Tokenizes the input with the target's tokenizer and chat template, applies max_length and
min_loss_tokens, and applies the record formula (records.RecordCodec.bytes_per_token) for every
storage dtype. With regeneration on, answer lengths are not known in advance: the estimate then
also gives an upper bound with every assistant turn at regenerate.max_new_tokens.
"""
from __future__ import annotations

from deepspec.config.data import STORAGE_DTYPES, DataStageConfig
from deepspec.data.cache.records import RecordCodec, supervised_positions
from deepspec.data.chat import render_sample
from deepspec.data.sources import MalformedRow, iter_raw_rows, parse_row
from deepspec.target import check_layer_ids, load_tokenizer, target_identity


def estimate_cache(cfg: DataStageConfig) -> dict:
    tokenizer = load_tokenizer(cfg.target)
    identity = target_identity(cfg.target, tokenizer)
    check_layer_ids(cfg.target.layer_ids, identity.num_hidden_layers)
    rows = malformed = dropped = samples = tokens = supervised = prompt_only = 0
    for raw in iter_raw_rows(cfg.input):
        rows += 1
        s = parse_row(raw)
        if isinstance(s, MalformedRow):
            malformed += 1
            continue
        if s.needs_answers:
            prompt_only += 1
        r = render_sample(tokenizer, s, cfg.max_length)
        if r.loss_tokens < cfg.min_loss_tokens:
            dropped += 1
            continue
        samples += 1
        tokens += len(r.input_ids)
        supervised += len(supervised_positions(r.loss_mask))
    frac = supervised / max(tokens, 1)
    L, d = len(cfg.target.layer_ids), identity.hidden_size
    per_dtype = {}
    for dt in STORAGE_DTYPES:
        bpt = RecordCodec(dt, L, d, cfg.cache.topk_logprobs).bytes_per_token(frac)
        per_dtype[dt] = {"bytes_per_token": bpt, "bytes": bpt * tokens, "gib": bpt * tokens / 2**30}
    out = {
        "target": cfg.target.name_or_path, "hidden_size": d, "layer_ids": list(cfg.target.layer_ids),
        "rows": rows, "malformed": malformed, "samples": samples, "dropped_short": dropped, "tokens": tokens,
        "supervised_fraction": frac, "by_storage_dtype": per_dtype, "configured_storage_dtype": cfg.cache.storage_dtype,
        "note": "before container overhead and compression (Parquet zstd, tar headers)",
    }
    if cfg.regenerate.enabled:
        users = prompt_only + samples  # every kept or prompt-only row gets at least one new answer
        extra = users * cfg.regenerate.max_new_tokens
        out["regeneration_upper_bound_tokens"] = tokens + extra
        out["regeneration_note"] = (f"answers are regenerated; up to {cfg.regenerate.max_new_tokens} new tokens per "
                                    f"answer could add {extra:,} tokens ({prompt_only} rows are prompts only)")
    return out
