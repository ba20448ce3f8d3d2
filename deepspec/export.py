"""Export drafters to HF folders (config.json + model.safetensors) in the layouts serving engines
load, and load them back.

* DSpark / DFlash: the DeepSpec reference layout (``Qwen3DSparkModel``): the target's config
  fields plus block_size, mask_token_id, target_layer_ids, markov_* and confidence fields; tensors
  ``embed_tokens``, ``layers.i.*``, ``norm``, ``fc``, ``hidden_norm``, ``lm_head``, ``markov_head.*``,
  ``confidence_head.proj.*``. DFlash is the same layout with markov_rank 0 and no confidence head,
  named ``DFlashDraftModel`` (what vLLM, SGLang and TensorRT-LLM load DFlash as).
* Eagle3: the SpecForge/SGLang/vLLM layout (``LlamaForCausalLMEagle3``): ``midlayer.*``, ``fc``,
  ``norm``, ``lm_head`` (+ ``embed_tokens``), ``eagle_config.eagle_aux_hidden_state_layer_ids``
  (layer outputs, SGLang) and the top-level ``eagle_aux_hidden_state_layer_ids`` (layer inputs, vLLM).

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
from deepspec.integrity import SELF_DIGEST_KEY, checksum_problems, file_checksums, read_json_checked, with_self_digest

FROZEN = ("embed_tokens.weight", "lm_head.weight")  # the target's, at full vocabulary
TRAINING_ONLY = ("rotary.", "target_lm_head.")  # never exported: recomputed / the target's own head
STS_FILE = "confidence_temperatures.json"
CHECKSUMS_FILE = "checksums.json"


def gathered_state_dict(engine) -> dict:
    """Full state dict of a DeepSpeed engine's module (ZeRO-3 shards gathered onto rank 0)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict() or {}
    return engine.module.state_dict()


def drafter_name(drafter) -> str:
    return next(name for name, spec in DRAFTERS.items() if isinstance(drafter, spec.model_class))


def serving_config(drafter, name: str, include_frozen: bool, target: TargetConfig | None) -> dict:
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
        # layer inputs: the same layers are ours + 1 there (docs/serving_loaders.md).
        cfg.update(architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1, layer_types=["full_attention"],
                   draft_vocab_size=tc["vocab_size"], target_hidden_size=tc["hidden_size"],
                   eagle_config={"eagle_aux_hidden_state_layer_ids": ids}, eagle_aux_hidden_state_layer_ids=[i + 1 for i in ids],
                   norm_before_residual=False, intermediate_size=c.intermediate_size or tc["intermediate_size"])
    else:
        dspark = name == "dspark"
        rank = c.markov_rank if dspark else 0
        conf = dspark and c.enable_confidence_head
        # DFlash loads as DFlashDraftModel everywhere (vLLM, SGLang, TensorRT-LLM); under Qwen3DSparkModel SGLang would
        # build a DSpark and refuse markov_rank 0. TensorRT-LLM reads DFlash's ids from dflash_config only.
        cfg.update(architectures=["Qwen3DSparkModel" if dspark else "DFlashDraftModel"], num_target_layers=tc["num_hidden_layers"],
                   num_hidden_layers=c.num_hidden_layers, block_size=c.block_size, mask_token_id=c.mask_token_id,
                   target_layer_ids=list(c.target_layer_ids), num_anchors=c.num_anchors, enable_confidence_head=conf,
                   markov_rank=rank, layer_types=["full_attention"] * c.num_hidden_layers)
        cfg["confidence_head_with_markov"] = bool(conf and c.confidence_head_with_markov and rank > 0)
        cfg["markov_head_type"] = c.markov_head_type if dspark else "vanilla"
        if not dspark:
            cfg["dflash_config"] = {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids), "block_size": c.block_size}
    if drafter.d2t is not None:  # reduced: every engine sizes lm_head / markov_w2 / logits from it
        cfg["draft_vocab_size"] = drafter.draft_vocab_size
    cfg["deepspec"] = {"drafter": name, "config": c.to_dict(), "frozen_from_target": None if include_frozen else (target.name_or_path if target else True),
                       "checksums": CHECKSUMS_FILE}
    return cfg


def export_drafter(drafter, out_dir: str | Path, state_dict: dict | None = None, include_frozen: bool = True,
                   target: TargetConfig | None = None) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = drafter_name(drafter)
    state = state_dict if state_dict is not None else drafter.state_dict()
    # Eagle3 keeps its LM head: SGLang's loader expects it in the file whenever draft_vocab_size is set; a reduced
    # vocabulary's LM head is trained, not the target's, so it is always written.
    left_out = () if include_frozen else ("embed_tokens.weight",) if name == "eagle3" or drafter.d2t is not None else FROZEN
    tensors = {}
    for k, v in state.items():
        if k.startswith(TRAINING_ONLY) or k in left_out:
            continue
        tensors[k] = v.detach().to("cpu").contiguous().clone()  # clone: tied embed/lm_head must not share storage
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(serving_config(drafter, name, include_frozen, target), indent=2, default=str))
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


def load_drafter(path: str | Path, target: TargetConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """Load an export (ours, either form, or a reference-layout DSpark folder) as a drafter module."""
    from transformers import AutoConfig

    from deepspec.target import load_frozen_embeddings

    path = Path(path)
    check_export_files(path)
    raw = json.loads((path / "config.json").read_text())
    meta = raw.get("deepspec")
    if meta is not None:
        name, fields = meta["drafter"], meta["config"]
    elif raw.get("architectures") in (["Qwen3DSparkModel"], ["DFlashDraftModel"]):  # a reference-layout folder not written by us
        name = "dspark" if raw.get("markov_rank", 0) or raw.get("enable_confidence_head") else "dflash"
        keys = DRAFTERS[name].config_class.__dataclass_fields__
        fields = {k: raw[k] for k in keys if k in raw}
        fields["num_hidden_layers"] = raw["num_hidden_layers"]
    else:
        raise ValueError(f"{path}: config.json is neither a deepspec export nor a Qwen3DSparkModel/DFlashDraftModel folder")
    spec = DRAFTERS[name]
    dcfg = spec.config_class(**fields)
    tconf_dict = {k: v for k, v in raw.items() if k != "deepspec"}
    if name != "eagle3":  # the file's num_hidden_layers/layer_types are the drafter's; the target's shape is wanted here
        tconf_dict["num_hidden_layers"] = raw.get("num_target_layers", tconf_dict["num_hidden_layers"])
    tconf_dict.pop("layer_types", None)
    tconf = AutoConfig.for_model(tconf_dict.pop("model_type", "qwen3"), **tconf_dict)
    state = load_file(path / "model.safetensors")
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
