"""What the serving engines' draft loaders read from a drafter folder, as data, and a check of an export
against it. ``docs/serving_loaders.md`` renders the same table (``requirements_markdown``) with the notes.

Read from the engines' public source (file and commit of the version read in ``source``); nothing here
runs an engine. Layer-id conventions differ between engines, so they are spelled out:
``target_layer_ids`` (ours, DeepSpec's, SGLang's nested Eagle3 ids) name layer *outputs* (HF
``hidden_states[i + 1]``); vLLM's top-level ``eagle_aux_hidden_state_layer_ids`` name layer *inputs*
(``hidden_states[i]``), so they are ours + 1.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safetensors import safe_open

Check = tuple[str, Callable[[dict, dict], bool]]  # (what must hold, predicate(config, {tensor name: shape}))


@dataclass(frozen=True)
class LoaderRequirements:
    engine: str
    drafter: str  # dspark | dflash | eagle3
    source: str  # repo/path@commit of the loader version read
    architectures: tuple[str, ...]
    config_keys: tuple[str, ...]  # required; dotted = nested
    tensors: tuple[str, ...]  # regexes every export must contain a match for
    checks: tuple[Check, ...] = field(default_factory=tuple)
    notes: str = ""
    family: str = "qwen3"  # the draft-layer layout it reads: "qwen3" or "gemma4" (deepspec/drafters/layer_family.py)


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _names(tensors: dict, pattern: str) -> list[str]:
    return [n for n in tensors if re.fullmatch(pattern, n)]


BACKBONE = (r"layers\.\d+\.self_attn\.[qkvo]_proj\.weight", r"layers\.\d+\.self_attn\.[qk]_norm\.weight",
            r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", r"layers\.\d+\.(input|post_attention)_layernorm\.weight",
            r"fc\.weight", r"hidden_norm\.weight", r"norm\.weight")
EAGLE3 = (r"midlayer\.self_attn\.[qkvo]_proj\.weight", r"midlayer\.mlp\.(gate|up|down)_proj\.weight",
          r"midlayer\.(input_layernorm|hidden_norm|post_attention_layernorm)\.weight", r"fc\.weight", r"norm\.weight")
QWEN3_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "rms_norm_eps", "vocab_size")
GEMMA4_SHAPE = (*QWEN3_SHAPE, "global_head_dim", "attention_k_eq_v", "hidden_activation", "layer_types", "rope_parameters")
GEMMA4_BACKBONE = (r"layers\.\d+\.self_attn\.[qko]_proj\.weight", r"layers\.\d+\.self_attn\.[qk]_norm\.weight",
                   r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
                   r"layers\.\d+\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.weight",
                   r"layers\.\d+\.layer_scalar", r"fc\.weight", r"hidden_norm\.weight", r"norm\.weight")

def _draft_vocab(c: dict) -> int:
    return c.get("draft_vocab_size") or c["vocab_size"]


_full_vocab_or_d2t: Check = ("a reduced draft vocabulary ships d2t (offset: target id = draft id + d2t[id]) and lm_head, each with "
                             "draft_vocab_size rows (as markov_w2 where there is one)",
                             lambda c, t: _draft_vocab(c) >= c["vocab_size"]
                             or (t.get("d2t") == (_draft_vocab(c),) and t.get("lm_head.weight", (0,))[0] == _draft_vocab(c)
                                 and t.get("markov_head.markov_w2.weight", (_draft_vocab(c),))[0] == _draft_vocab(c)))
_full_vocab_only: Check = ("the full vocabulary (this loader always uses the target's LM head; it reads neither draft_vocab_size nor d2t)",
                           lambda c, t: _draft_vocab(c) >= c["vocab_size"])
_silu_mlp: Check = ("hidden_act is silu (the drafter's SwiGLU MLP; vLLM's Qwen3 MLP refuses any other, and Gemma "
                    "configs carry none)", lambda c, t: c.get("hidden_act") == "silu")
_EAGLE3_QK_NORM = r"midlayer\.self_attn\.[qk]_norm\.weight"
_vllm_eagle3_class: Check = ("q_norm/k_norm tensors exactly when the architecture is Eagle3Qwen3ForCausalLM (its Qwen3 layer norms q "
                             "and k; the Llama class has no such parameters and fails on them)",
                             lambda c, t: bool(_names(t, _EAGLE3_QK_NORM)) == (c["architectures"][0] == "Eagle3Qwen3ForCausalLM"))
_vllm_llama_eagle3_aux: Check = ("LlamaForCausalLMEagle3 takes three aux layers (its fc is target_hidden_size x 3; the Qwen3 class "
                                 "sizes fc from num_aux_layers or the ids)",
                                 lambda c, t: c["architectures"][0] != "LlamaForCausalLMEagle3"
                                 or len(c.get("eagle_aux_hidden_state_layer_ids") or []) == 3)
_no_eagle3_qk_norm: Check = ("no q_norm/k_norm tensors (its Llama layer has none: the loader skips unknown names and would serve a "
                             "drafter without QK-norm)", lambda c, t: not _names(t, _EAGLE3_QK_NORM))
_no_unknown_markov: Check = ("no markov_head.* tensors beyond the head type's own",
                             lambda c, t: all(re.fullmatch(r"markov_head\.(markov_w[12]\.weight|gate_proj\.(weight|bias)|joint_proj\.(weight|bias))", n)
                                              for n in t if n.startswith("markov_head.")))

_drafts_from_mask_slots: Check = ("drafts read from the mask slots only, as this runtime does (slot j predicts anchor + j); ours "
                                  "and DeepSpec's DFlash are anchor-first (slot k predicts the token after anchor + k): served "
                                  "here each draft is one position late", lambda c, t: c.get("sample_from_anchor", True) is False)

LLAMACPP = "b11434"  # the llama.cpp tag read (and run: deepspec/llamacpp.py, tests/test_llamacpp.py)
_llamacpp_anchor_first: Check = ("no sample_from_anchor false (ours is anchor-first: slot k predicts the token after anchor + k, "
                                 "the converter's default)", lambda c, t: c.get("sample_from_anchor", True) is True)
_llamacpp_confidence_input: Check = ("a confidence head reads [h; W1[x_{k-1}]] (confidence_head_with_markov true: conf_proj is "
                                     "{n_embd + markov_rank, 1})",
                                     lambda c, t: "confidence_head.proj.weight" not in t or c.get("confidence_head_with_markov") is True)

REQUIREMENTS: tuple[LoaderRequirements, ...] = (
    LoaderRequirements(
        "vLLM", "dspark", "vllm-project/vllm vllm/model_executor/models/qwen3_dspark.py@0302ff40 (+ qwen3_dflash.py@036a00d1, "
        "qwen2.py@cb24295e, v1/worker/gpu/spec_decode/eagle/eagle3_utils.py@0cfdd2e1, config/speculative.py@002e77c1)",
        ("Qwen3DSparkModel",), (*QWEN3_SHAPE, "markov_rank", "mask_token_id", "target_layer_ids"),
        (*BACKBONE, r"markov_head\.markov_w1\.weight", r"markov_head\.markov_w2\.weight"),
        (("markov_rank > 0", lambda c, t: (c.get("markov_rank") or 0) > 0),
         ("markov_head_type is vanilla (the Qwen3 loader builds only the vanilla head)",
          lambda c, t: c.get("markov_head_type", "vanilla") == "vanilla"),
         ("confidence_head_with_markov written (its default differs between engines)", lambda c, t: "confidence_head_with_markov" in c),
         ("an enabled confidence head ships proj.weight and proj.bias",
          lambda c, t: not c.get("enable_confidence_head") or {"confidence_head.proj.weight", "confidence_head.proj.bias"} <= set(t)),
         _full_vocab_or_d2t, _silu_mlp,
         ("no rotary/mask tensors (AutoWeightsLoader refuses unknown names)",
          lambda c, t: not any(n.startswith(("rotary", "mask_hidden", "mask_embedding")) for n in t))),
        "block_size is not read: pass num_speculative_tokens = block_size. Never name the architecture DSparkDraftModel "
        "(vLLM <= 0.28 maps it to the DeepSeek-V4 drafter)."),
    LoaderRequirements(
        "vLLM", "dflash", "vllm-project/vllm vllm/model_executor/models/qwen3_dflash.py@036a00d1 (+ qwen2.py@cb24295e, "
        "v1/worker/gpu/spec_decode/dflash/speculator.py@00746147)",
        ("DFlashDraftModel",), (*QWEN3_SHAPE, "mask_token_id", "target_layer_ids"), BACKBONE,
        (("no markov_head/confidence_head tensors", lambda c, t: not any(n.startswith(("markov_head", "confidence_head")) for n in t)),
         _full_vocab_or_d2t, _silu_mlp, _drafts_from_mask_slots),
        "method=dflash wraps the config and prefixes 'DFlash' to any architecture not already named DFlash*, "
        "so a DFlash export named Qwen3DSparkModel would not load."),
    LoaderRequirements(
        "vLLM", "eagle3", "vllm-project/vllm vllm/model_executor/models/llama_eagle3.py@00bd1493 (+ qwen3_eagle3.py@93221aeb, "
        "registry: Eagle3Qwen3ForCausalLM -> qwen3_eagle3; eagle3_utils.py@0cfdd2e1)",
        ("LlamaForCausalLMEagle3", "Eagle3Qwen3ForCausalLM"), (*QWEN3_SHAPE, "eagle_aux_hidden_state_layer_ids"), EAGLE3,
        (("top-level eagle_aux_hidden_state_layer_ids = layer inputs = target_layer_ids + 1",
          lambda c, t: c.get("eagle_aux_hidden_state_layer_ids") == [i + 1 for i in (_get(c, "eagle_config.eagle_aux_hidden_state_layer_ids") or [])]),
         ("norm_before_residual written false (the midlayer's residual is the un-normed hidden state)",
          lambda c, t: c.get("norm_before_residual") is False),
         _vllm_eagle3_class, _vllm_llama_eagle3_aux, _full_vocab_or_d2t),
        "vLLM reads the top-level ids as layer inputs (no +1); the V2 runner ignores the nested ids. A QK-normed Eagle3 "
        "(Qwen3-like targets) loads only as Eagle3Qwen3ForCausalLM, which maps midlayer.* to layers.0.*."),
    LoaderRequirements(
        "SGLang", "dspark", "sgl-project/sglang python/sglang/srt/models/dspark.py@01f47623 "
        "(+ speculative/dspark_components/dspark_config.py@01f47623)",
        ("Qwen3DSparkModel",), (*QWEN3_SHAPE, "markov_rank", "markov_head_type", "mask_token_id", "target_layer_ids",
                                "num_target_layers", "confidence_head_with_markov"),
        (*BACKBONE, r"markov_head\.markov_w1\.weight", r"markov_head\.markov_w2\.weight", r"confidence_head\.proj\.(weight|bias)"),
        (("markov_rank > 0", lambda c, t: (c.get("markov_rank") or 0) > 0),
         ("markov_head_type in vanilla/gated/rnn with its tensors",
          lambda c, t: {"vanilla": True, "gated": bool(_names(t, r"markov_head\.gate_proj\.(weight|bias)")),
                        "rnn": bool(_names(t, r"markov_head\.joint_proj\.(weight|bias)"))}.get(c.get("markov_head_type"), False)),
         ("target_layer_ids inside num_target_layers", lambda c, t: all(-1 <= i < c["num_target_layers"] for i in c["target_layer_ids"])),
         _no_unknown_markov,
         ("no speculators_model_type (the speculators slot convention is refused)", lambda c, t: "speculators_model_type" not in c),
         _full_vocab_only),
        "The confidence head is built in every non-static ragged-verify mode whatever enable_confidence_head says, so its "
        "weights must be present. embed_tokens/lm_head are skipped (the target's are used); draft_vocab_size is ignored."),
    LoaderRequirements(
        "SGLang", "dflash", "sgl-project/sglang python/sglang/srt/models/dflash.py@003b23d7 (+ "
        "srt/speculative/dflash_worker.py@7f151c5e)",
        ("DFlashDraftModel",), (*QWEN3_SHAPE, "mask_token_id", "target_layer_ids", "num_target_layers", "block_size"), BACKBONE,
        (("target_layer_ids inside num_target_layers", lambda c, t: all(-1 <= i < c["num_target_layers"] for i in c["target_layer_ids"])),
         _full_vocab_only, _drafts_from_mask_slots),
        "A DFlash folder named Qwen3DSparkModel would load SGLang's DSpark class and fail on markov_rank 0."),
    LoaderRequirements(
        "SGLang", "eagle3", "sgl-project/sglang python/sglang/srt/models/llama_eagle3.py@03d5a777",
        ("LlamaForCausalLMEagle3",), (*QWEN3_SHAPE, "draft_vocab_size", "eagle_config.eagle_aux_hidden_state_layer_ids"),
        (*EAGLE3, r"lm_head\.weight"),
        (("tie_word_embeddings false", lambda c, t: c.get("tie_word_embeddings") is False),
         ("three aux layers (fc is target_hidden_size x 3 in the versions read)",
          lambda c, t: len(_get(c, "eagle_config.eagle_aux_hidden_state_layer_ids") or []) == 3),
         _no_eagle3_qk_norm, _full_vocab_or_d2t),
        "SGLang reads only the nested ids (layer outputs; it adds +1 itself). With draft_vocab_size set, lm_head must be in "
        "the file: a missing one is not detected and stays uninitialised."),
    LoaderRequirements(
        "TensorRT-LLM", "eagle3", "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_speculative.py@00679c66",
        ("LlamaForCausalLMEagle3",), (*QWEN3_SHAPE,), EAGLE3, (_full_vocab_or_d2t,),
        "Capture layers come from the LLM API's eagle3_layers_to_capture (layer outputs), not the checkpoint."),
    LoaderRequirements(
        "vLLM", "dspark", "vllm-project/vllm vllm/model_executor/models/gemma4_dspark.py@9d9cfb5d (+ gemma4_mtp.py@03b60164, "
        "registry.py: Gemma4DSparkModel -> Gemma4DSparkForCausalLM)",
        ("Gemma4DSparkModel",), (*GEMMA4_SHAPE, "markov_rank", "target_layer_ids", "final_logit_softcapping"),
        (*GEMMA4_BACKBONE, r"embed_tokens\.weight", r"lm_head\.weight", r"markov_head\.markov_w1\.weight", r"markov_head\.markov_w2\.weight"),
        (("markov_rank > 0", lambda c, t: (c.get("markov_rank") or 0) > 0),
         ("markov_head_type is vanilla (the loader builds only the vanilla head)", lambda c, t: c.get("markov_head_type", "vanilla") == "vanilla"),
         ("every draft layer is full_attention (head size and K=V sharing are chosen per layer type)",
          lambda c, t: c.get("layer_types") == ["full_attention"] * c["num_hidden_layers"]),
         ("attention_k_eq_v with num_global_key_value_heads (its fused context-K/V precompute asserts K=V on every layer)",
          lambda c, t: c.get("attention_k_eq_v") is True and bool(c.get("num_global_key_value_heads"))),
         ("final_logit_softcapping written (its logits processor caps draft logits with it, as they were trained)",
          lambda c, t: bool(c.get("final_logit_softcapping"))),
         _full_vocab_only),
        "Self-contained: embed_tokens and lm_head are read from the folder (dspark_shares_target_embeddings False), so export "
        "with the frozen tensors (the default). The sqrt(hidden_size) embedding scale is not a key: the class applies it. "
        "Confidence-head weights are skipped; block_size is not read.", family="gemma4"),
    LoaderRequirements(
        "TensorRT-LLM", "dflash", "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_dflash.py@7c7504c0",
        ("DFlashDraftModel",), (*QWEN3_SHAPE, "dflash_config.target_layer_ids", "dflash_config.mask_token_id", "block_size"),
        BACKBONE, (_full_vocab_only,),
        "Reads target_layer_ids only from dflash_config. TensorRT-LLM has no merged Qwen3 DSpark loader (PR #16813 closed)."),
    LoaderRequirements(
        "llama.cpp", "dspark", f"ggml-org/llama.cpp conversion/qwen.py@{LLAMACPP} (DSparkModel; + src/models/dflash.cpp, "
        "common/speculative.cpp)",
        ("Qwen3DSparkModel",), (*QWEN3_SHAPE, "markov_rank", "mask_token_id", "target_layer_ids", "block_size"),
        (*BACKBONE, r"markov_head\.markov_w1\.weight", r"markov_head\.markov_w2\.weight"),
        (("markov_head_type is vanilla (the converter raises on any other)",
          lambda c, t: c.get("markov_head_type", "vanilla") == "vanilla"),
         _llamacpp_anchor_first, _llamacpp_confidence_input, _full_vocab_or_d2t),
        "Convert with convert_hf_to_gguf.py --target-model-dir <target> (the vocabulary is the target's); run with "
        "--spec-type draft-dspark --spec-draft-n-max block_size. The Markov chain runs in the graph, greedily."),
    LoaderRequirements(
        "llama.cpp", "dflash", f"ggml-org/llama.cpp conversion/qwen.py@{LLAMACPP} (DFlashModel, DSparkModel; + "
        "src/models/dflash.cpp, common/speculative.cpp)",
        ("DFlashDraftModel",), (*QWEN3_SHAPE, "mask_token_id", "target_layer_ids", "block_size"), BACKBONE,
        (("no markov_head/confidence_head tensors", lambda c, t: not any(n.startswith(("markov_head", "confidence_head")) for n in t)),
         _llamacpp_anchor_first, _full_vocab_or_d2t),
        "llama.cpp's draft-dflash reads the in-place block (slots 1..g-1 predict their own positions) and its DFlash "
        "converter maps no d2t; ours is anchor-first, so deepspec.llamacpp converts it with the DSpark class "
        "(sample_from_anchor true) and runs it as draft-dspark, whose graph without Markov tensors is DFlash's."),
)


def read_export(path: str | Path) -> tuple[dict, dict]:
    """-> (config.json, {tensor name: shape}) without loading tensor data."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, tensors


REFERENCE_ONLY = ("Qwen3Eagle3Model",)  # DeepSpec's own Qwen3 Eagle3 class (export layout="reference"): no engine loader read


def export_family(config: dict) -> str:
    """The draft-layer layout of an export: "gemma4" for the reference's Gemma-4 architectures, "reference" for
    DeepSpec-only classes (no loader row), else "qwen3"."""
    arch = (config.get("architectures") or [""])[0]
    return "gemma4" if arch.startswith("Gemma4") else "reference" if arch in REFERENCE_ONLY else "qwen3"


def export_kind(config: dict) -> str:
    meta = config.get("deepspec") or {}
    if meta.get("drafter"):
        return meta["drafter"]
    arch = (config.get("architectures") or [""])[0]
    if "Eagle3" in arch:
        return "eagle3"
    if arch.startswith("DFlash") or (arch == "Gemma4DSparkModel" and not config.get("markov_rank")):
        return "dflash"
    return "dspark"


def check_export(path: str | Path) -> dict[str, list[str]]:
    """Every loader of this drafter kind -> the requirements the export at ``path`` misses (empty = it should load)."""
    config, tensors = read_export(path)
    kind, family = export_kind(config), export_family(config)
    out = {}
    for req in REQUIREMENTS:
        if req.drafter != kind or req.family != family:
            continue
        problems = []
        if not set(config.get("architectures") or []) & set(req.architectures):
            problems.append(f"architectures {config.get('architectures')} is not one of {list(req.architectures)}")
        problems += [f"config key '{k}' missing" for k in req.config_keys if _get(config, k) is None]
        problems += [f"no tensor matches '{p}'" for p in req.tensors if not _names(tensors, p)]
        problems += [f"fails: {desc}" for desc, ok in req.checks if not _safe(ok, config, tensors)]
        out[f"{req.engine} {req.drafter}"] = problems
    return out


def _safe(pred, config, tensors) -> bool:
    try:
        return bool(pred(config, tensors))
    except (KeyError, TypeError):
        return False


def requirements_markdown() -> str:
    """The table of ``docs/serving_loaders.md``."""
    lines = ["| engine | drafter | architectures | config keys required | tensors required | also checked | loader read |",
             "|---|---|---|---|---|---|---|"]
    for r in REQUIREMENTS:
        family, shape = ("Gemma-4", GEMMA4_SHAPE) if r.family == "gemma4" else ("Qwen3", QWEN3_SHAPE)
        tensors = ", ".join(f"`{p}`" for p in r.tensors if not p.startswith("layers"))
        if any(p.startswith("layers") for p in r.tensors):
            tensors = f"`layers.{{i}}.*` ({family} names), " + tensors
        keys = ", ".join(f"`{k}`" for k in r.config_keys if k not in shape)
        lines.append(f"| {r.engine} | {r.drafter} | {', '.join(f'`{a}`' for a in r.architectures)} | the {family} shape keys, {keys or '-'} | "
                     f"{tensors} | {'; '.join(d for d, _ in r.checks) or '-'} | {r.source} |")
    return "\n".join(lines)
