"""Export drafters to HF folders (config.json + model.safetensors) in the layouts serving engines
load, and load them back.

* DSpark / DFlash: the DeepSpec reference layout (``Qwen3DSparkModel``): the target's config
  fields plus block_size, mask_token_id, target_layer_ids, markov_* and confidence fields; tensors
  ``embed_tokens``, ``layers.i.*``, ``norm``, ``fc``, ``hidden_norm``, ``lm_head``, ``markov_head.*``,
  ``confidence_head.proj.*``. DFlash is the same layout with markov_rank 0 and no confidence head,
  named ``DFlashDraftModel`` (what vLLM, SGLang and TensorRT-LLM load DFlash as).
* Eagle3: the SpecForge/SGLang/vLLM layout: ``midlayer.*``, ``fc``, ``norm``, ``lm_head`` (+ ``embed_tokens``),
  ``eagle_config.eagle_aux_hidden_state_layer_ids`` (layer outputs, SGLang) and the top-level
  ``eagle_aux_hidden_state_layer_ids`` (layer inputs, vLLM), named ``LlamaForCausalLMEagle3`` (no QK-norm: vLLM,
  SGLang, TensorRT-LLM) or, with QK-norm (``midlayer.self_attn.{q,k}_norm.weight``), ``Eagle3Qwen3ForCausalLM``
  (vLLM's Qwen3 Eagle3 class, the one engine class read that applies them). ``layout="reference"`` writes DeepSpec's
  own ``Qwen3Eagle3Model`` instead: the target's config plus num_target_layers, num_hidden_layers 1,
  draft_num_hidden_layers, target_layer_ids, ttt_length, step_loss_decay; the layer under ``layers.0.*``
  (DeepSpec's loader validates exactly five target layers when it builds a new model; loading a folder does not).
  Gemma-4 drafters are always written in the reference's layout.

What each engine's loader reads, and a check of an export against it: ``deepspec/serving_loaders.py``.

A reduced draft vocabulary (``drafter.draft_vocab_size`` N < V) adds ``draft_vocab_size`` to the
config and ``d2t`` (N,) int64 (offsets: target id = draft id + d2t[draft id]) and ``t2d`` (V,) bool
to the tensors; ``lm_head.weight`` is then the drafter's own (N, d), always written, and DSpark's
``markov_head.markov_w2.weight`` is (N, r). The target's full LM head (the losses' p_t) is not exported.

``include_frozen=False`` leaves out the frozen embedding and LM head (they are the target's); the
config records it under ``deepspec.frozen_from_target`` and ``load_drafter`` restores them from
the target. Our own loader reads both forms; ``deepspec`` in config.json holds the drafter config.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deepspec.config.data import TargetConfig
from deepspec.drafters import DRAFTERS
from deepspec.drafters.draft_vocab import DraftVocab
from deepspec.drafters.gemma4_layers import full_attention_shape
from deepspec.drafters.layer_family import layer_family
from deepspec.integrity import SELF_DIGEST_KEY, checksum_problems, file_checksums, read_json_checked, with_self_digest

FROZEN = ("embed_tokens.weight", "lm_head.weight")  # the target's, at full vocabulary
TRAINING_ONLY = ("rotary.", "target_lm_head.")  # never exported: recomputed / the target's own (uncapped) head
STS_FILE = "confidence_temperatures.json"
CHECKSUMS_FILE = "checksums.json"


def gathered_state_dict(engine) -> dict:
    """Full state dict of a DeepSpeed engine's module (ZeRO-3 shards gathered onto rank 0)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict() or {}
    return engine.module.state_dict()


def drafter_name(drafter) -> str:
    return next(name for name, spec in DRAFTERS.items() if isinstance(drafter, spec.model_class))


EXPORT_LAYOUTS = ("serving", "reference")  # the engines' layout / DeepSpec's own classes (they differ only for Qwen3 Eagle3)


def serving_config(drafter, name: str, include_frozen: bool, target: TargetConfig | None, layout: str = "serving") -> dict:
    c = drafter.cfg
    if drafter.family == "gemma4":
        cfg = gemma4_layout_config(drafter, name)
    elif name == "eagle3" and layout == "reference":
        cfg = qwen3_reference_eagle3_config(drafter, target)
    else:
        cfg = qwen3_layout_config(drafter, name)
    if drafter.d2t is not None:  # reduced: every engine sizes lm_head / markov_w2 / logits from it
        cfg["draft_vocab_size"] = drafter.draft_vocab_size
    cfg["deepspec"] = {"drafter": name, "config": c.to_dict(), "frozen_from_target": None if include_frozen else (target.name_or_path if target else True),
                       "checksums": CHECKSUMS_FILE}
    return cfg


def _block_keys(c, name: str, num_target_layers: int) -> dict:
    """The DSpark/DFlash keys of the reference layout (DFlash: markov_rank 0, no confidence head)."""
    dspark = name == "dspark"
    rank = c.markov_rank if dspark else 0
    conf = dspark and c.enable_confidence_head
    return dict(num_target_layers=num_target_layers, num_hidden_layers=c.num_hidden_layers, block_size=c.block_size,
                mask_token_id=c.mask_token_id, target_layer_ids=list(c.target_layer_ids), num_anchors=c.num_anchors,
                enable_confidence_head=conf, markov_rank=rank, layer_types=["full_attention"] * c.num_hidden_layers,
                confidence_head_with_markov=bool(conf and c.confidence_head_with_markov and rank > 0),
                markov_head_type=c.markov_head_type if dspark else "vanilla")


def qwen3_layout_config(drafter, name: str) -> dict:
    """config.json for Qwen3-shaped drafters: vLLM/SGLang/TensorRT-LLM's Qwen3 DSpark/DFlash and Eagle3 layouts."""
    tc = drafter.target_config.to_dict()
    c = drafter.cfg
    cfg = {k: v for k, v in tc.items() if k not in ("architectures", "auto_map", "_name_or_path", "transformers_version")}
    cfg["tie_word_embeddings"] = False
    # The drafter's MLP is SwiGLU whatever the target's is; vLLM builds the drafter's MLP from hidden_act and refuses any
    # other, and Gemma configs carry none (theirs is hidden_activation, the target's own, left as it is).
    cfg["hidden_act"] = "silu"
    if name == "eagle3":
        ids = list(c.target_layer_ids)
        # SGLang reads the nested ids as layer outputs (ours) and adds +1 itself; vLLM reads the top-level ids as
        # layer inputs: the same layers are ours + 1 there (docs/serving_loaders.md). A QK-normed layer loads only as
        # vLLM's Eagle3Qwen3ForCausalLM (its Llama class refuses q_norm/k_norm tensors; SGLang's skips them).
        arch, model_type = ("Eagle3Qwen3ForCausalLM", "qwen3") if c.qk_norm else ("LlamaForCausalLMEagle3", "llama")
        cfg.update(architectures=[arch], model_type=model_type, num_hidden_layers=1, layer_types=["full_attention"],
                   draft_vocab_size=tc["vocab_size"], target_hidden_size=tc["hidden_size"],
                   eagle_config={"eagle_aux_hidden_state_layer_ids": ids}, eagle_aux_hidden_state_layer_ids=[i + 1 for i in ids],
                   norm_before_residual=False, intermediate_size=c.intermediate_size or tc["intermediate_size"])
        return cfg
    # DFlash loads as DFlashDraftModel everywhere (vLLM, SGLang, TensorRT-LLM); under Qwen3DSparkModel SGLang would
    # build a DSpark and refuse markov_rank 0. TensorRT-LLM reads DFlash's ids from dflash_config only.
    cfg.update(architectures=[layer_family(drafter.target_config).architectures[name]], **_block_keys(c, name, tc["num_hidden_layers"]))
    if name == "dflash":
        cfg["dflash_config"] = {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids), "block_size": c.block_size}
    return cfg


def qwen3_reference_eagle3_config(drafter, target: TargetConfig | None) -> dict:
    """config.json of DeepSpec's ``Qwen3Eagle3Model``: the target's config with the drafter's keys (its class always
    norms q and k, so a drafter without QK-norm has no such layout)."""
    c = drafter.cfg
    if not c.qk_norm:
        raise ValueError("layout='reference': DeepSpec's Qwen3Eagle3Model always norms q and k; this Eagle3 has no QK-norm "
                         "(drafter.qk_norm=false or a Llama-like target): export it with layout='serving'")
    tc = drafter.target_config.to_dict()
    cfg = {k: v for k, v in tc.items() if k not in ("architectures", "auto_map", "_name_or_path", "transformers_version")}
    cfg.update(architectures=["Qwen3Eagle3Model"], num_target_layers=tc["num_hidden_layers"], num_hidden_layers=1,
               draft_num_hidden_layers=1, layer_types=["full_attention"], target_layer_ids=list(c.target_layer_ids),
               ttt_length=c.ttt_steps, step_loss_decay=c.step_loss_decay, tie_word_embeddings=False, hidden_act="silu",
               intermediate_size=c.intermediate_size or tc["intermediate_size"])
    if target is not None:
        cfg["target_model_name_or_path"] = target.name_or_path
    return cfg


def gemma4_layout_config(drafter, name: str) -> dict:
    """config.json of the reference's Gemma-4 drafters (``Gemma4DSparkModel``, DFlash included, and
    ``Gemma4Eagle3Model``): the target's text config with the full-attention sizes under its flat keys
    (``global_head_dim``, ``num_global_key_value_heads``; ``head_dim`` stays the sliding one) and the drafter's
    keys. ``final_logit_softcapping`` stays: vLLM's Gemma-4 DSpark class caps draft logits with it. The embedding
    scale is not a key: the reference and vLLM derive sqrt(hidden_size) themselves."""
    tcfg, c = drafter.target_config, drafter.cfg
    tc = tcfg.to_dict()
    kv_heads, head_dim = full_attention_shape(tcfg)
    drop = ("architectures", "auto_map", "_name_or_path", "transformers_version", "per_layer_config")
    cfg = {k: v for k, v in tc.items() if k not in drop}
    cfg.update(global_head_dim=head_dim, num_global_key_value_heads=kv_heads if tc.get("attention_k_eq_v") else None,
               tie_word_embeddings=False, target_model_type=tc["model_type"].removesuffix("_text"), target_text_model_type=tc["model_type"],
               num_target_layers=tc["num_hidden_layers"], architectures=[layer_family(tcfg).architectures[name]])
    if name == "eagle3":
        cfg.update(num_hidden_layers=1, draft_num_hidden_layers=1, layer_types=["full_attention"], target_layer_ids=list(c.target_layer_ids),
                   ttt_length=c.ttt_steps, step_loss_decay=c.step_loss_decay, intermediate_size=c.intermediate_size or tc["intermediate_size"])
    else:
        cfg.update(_block_keys(c, name, tc["num_hidden_layers"]))
    return cfg


# Tensor names that differ from our modules' in an architecture's layout: architecture -> (ours, the layout's).
# DeepSpec's Eagle3 classes keep their one layer in a list.
LAYOUT_RENAMES = {"Gemma4Eagle3Model": ("midlayer.", "layers.0."), "Qwen3Eagle3Model": ("midlayer.", "layers.0.")}


def export_drafter(drafter, out_dir: str | Path, state_dict: dict | None = None, include_frozen: bool = True,
                   target: TargetConfig | None = None, layout: str = "serving") -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors``; ``layout`` in ``EXPORT_LAYOUTS``."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(EXPORT_LAYOUTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = drafter_name(drafter)
    config = serving_config(drafter, name, include_frozen, target, layout)
    state = state_dict if state_dict is not None else drafter.state_dict()
    # Eagle3 keeps its LM head: SGLang's loader expects it in the file whenever draft_vocab_size is set; a reduced
    # vocabulary's LM head is trained, not the target's, so it is always written.
    left_out = () if include_frozen else ("embed_tokens.weight",) if name == "eagle3" or drafter.d2t is not None else FROZEN
    tensors = {}
    ours, theirs = LAYOUT_RENAMES.get(config["architectures"][0], ("", ""))
    for k, v in state.items():
        if k.startswith(TRAINING_ONLY) or k in left_out:
            continue
        k = theirs + k.removeprefix(ours) if ours and k.startswith(ours) else k
        tensors[k] = v.detach().to("cpu").contiguous().clone()  # clone: tied embed/lm_head must not share storage
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    # sha256 of both files, checked by load_drafter (engines ignore the extra file; `sha256sum` users can read it too)
    (out / CHECKSUMS_FILE).write_text(json.dumps(with_self_digest(file_checksums(out, ["config.json", "model.safetensors"])), indent=1))
    return out


def check_export_files(path: Path) -> None:
    """Refuse an export of ours whose files are not the ones written (flipped, truncated, replaced, deleted),
    naming the file. Folders written by other tools (no checksums, no ``deepspec`` block) are read as they are."""
    sums = path / CHECKSUMS_FILE
    if not sums.exists():
        try:
            expected = (json.loads((path / "config.json").read_text()).get("deepspec") or {}).get("checksums")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / 'config.json'}: unreadable ({e}); the export is corrupt") from None
        if expected:
            raise ValueError(f"{sums}: missing (the export recorded its checksums there); the export is incomplete")
        return
    recorded = read_json_checked(sums, "the export's checksums")
    problems = checksum_problems(path, {k: v for k, v in recorded.items() if k != SELF_DIGEST_KEY})
    if problems:
        raise ValueError(f"{path}: the export is corrupt:\n  " + "\n  ".join(problems))


REFERENCE_BLOCK = (["Qwen3DSparkModel"], ["DFlashDraftModel"], ["Gemma4DSparkModel"])


def drafter_fields(path: Path, raw: dict) -> tuple[str, dict]:
    """(drafter name, its config fields) of an export: ours (the ``deepspec`` block), or a folder in the reference's
    layout written by another tool (Qwen3DSparkModel / DFlashDraftModel / Gemma4DSparkModel / Gemma4Eagle3Model /
    Qwen3Eagle3Model)."""
    meta = raw.get("deepspec")
    if meta is not None:
        return meta["drafter"], meta["config"]
    if raw.get("architectures") in REFERENCE_BLOCK:
        name = "dspark" if raw.get("markov_rank", 0) or raw.get("enable_confidence_head") else "dflash"
        keys = DRAFTERS[name].config_class.__dataclass_fields__
        fields = {k: raw[k] for k in keys if k in raw}
        fields["num_hidden_layers"] = raw["num_hidden_layers"]
        return name, fields
    arch = (raw.get("architectures") or [None])[0]
    if arch in ("Gemma4Eagle3Model", "Qwen3Eagle3Model"):
        if raw.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"{path}: a {arch} with {raw['num_hidden_layers']} layers; deepspec's Eagle3 has one")
        return "eagle3", {"target_layer_ids": raw["target_layer_ids"], "ttt_steps": raw.get("ttt_length", 7),
                          "step_loss_decay": raw.get("step_loss_decay", 0.8), "qk_norm": True}  # both classes norm q and k
    raise ValueError(f"{path}: config.json is neither a deepspec export nor a {'/'.join(a[0] for a in REFERENCE_BLOCK)}/"
                     "Gemma4Eagle3Model/Qwen3Eagle3Model folder")


def target_config_of(raw: dict, name: str):
    """The target's (text) config rebuilt from an export's config.json: its num_hidden_layers/layer_types are the
    drafter's, so the target's layer count comes from num_target_layers (layer types then take the family default)."""
    from transformers import AutoConfig

    tconf = {k: v for k, v in raw.items() if k != "deepspec"}
    if name != "eagle3" or "num_target_layers" in raw:
        tconf["num_hidden_layers"] = raw.get("num_target_layers", tconf["num_hidden_layers"])
    tconf.pop("layer_types", None)
    rope = tconf.get("rope_parameters")
    if isinstance(rope, dict) and "full_attention" in rope:  # per layer type; the reference's files add flat leftovers
        tconf["rope_parameters"] = {k: v for k, v in rope.items() if isinstance(v, dict)}
    return AutoConfig.for_model(tconf.pop("model_type", "qwen3"), **tconf)


def load_drafter(path: str | Path, target: TargetConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """Load an export (ours, either form, or a reference-layout DSpark/DFlash/Eagle3 folder) as a drafter module."""
    from deepspec.target import load_frozen_embeddings

    path = Path(path)
    check_export_files(path)
    raw = json.loads((path / "config.json").read_text())
    name, fields = drafter_fields(path, raw)
    spec = DRAFTERS[name]
    dcfg = spec.config_class(**fields)
    tconf = target_config_of(raw, name)
    state = load_file(path / "model.safetensors")
    ours, theirs = LAYOUT_RENAMES.get((raw.get("architectures") or [""])[0], ("", ""))
    state = {ours + k.removeprefix(theirs) if theirs and k.startswith(theirs) else k: v for k, v in state.items()}
    vocab = DraftVocab.from_d2t(state["d2t"], tconf.vocab_size) if "d2t" in state else None
    frozen = FROZEN if vocab is None else ("embed_tokens.weight",)  # a reduced vocabulary's lm_head is the drafter's own
    if all(k in state for k in frozen):
        V, d = state["embed_tokens.weight"].shape
        embed = torch.nn.Embedding(V, d, _weight=state.pop("embed_tokens.weight").to(dtype), _freeze=True)
        head = None  # reduced: the target's full head only serves the losses; from the target when it is given
        if vocab is None:
            head = torch.nn.Linear(d, V, bias=False, device="meta")
            head.weight = torch.nn.Parameter(state.pop("lm_head.weight").to(dtype), requires_grad=False)
        elif target is not None:
            head = load_frozen_embeddings(target, "cpu", dtype)[1]
    else:
        if target is None:
            raise ValueError(f"{path} was exported without the frozen embedding/LM head: pass the target to restore them")
        embed, head = load_frozen_embeddings(target, "cpu", dtype)
    model = spec.model_class(dcfg, tconf, embed, head, vocab)
    if vocab is not None and "t2d" not in state:  # engines do not need t2d; other tools may leave it out
        state["t2d"] = vocab.t2d
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith(TRAINING_ONLY) and m not in frozen]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    sts = path / STS_FILE
    if sts.exists():  # Sequential Temperature Scaling fitted by an eval run: applied to the confidences
        model.confidence_temperatures = json.loads(sts.read_text())["temperatures"]
    return model.to(device=device, dtype=dtype).eval()
