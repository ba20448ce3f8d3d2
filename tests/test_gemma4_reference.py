"""Gemma-4 drafters against the DeepSpec reference's own Gemma-4 classes (tests/fixtures/reference_gemma4: folders the
reference's save_pretrained wrote, with inputs and the reference's fp32 outputs; README.md there says how they were
made). Both ways, without the reference installed: its folders load into ours and give its outputs, and our export
of them is the reference's layout (the same config keys and tensors) and gives its outputs again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deepspec.export import export_drafter, load_drafter

FIXTURE = Path(__file__).parent / "fixtures" / "reference_gemma4"
VARIANTS = ["dspark_vanilla", "dspark_gated", "dspark_rnn", "dflash", "eagle3"]
KIND = {"dspark_vanilla": "DSparkDrafter", "dspark_gated": "DSparkDrafter", "dspark_rnn": "DSparkDrafter", "dflash": "DFlashDrafter",
        "eagle3": "Eagle3Drafter"}
TOL = 1e-4
# config.json keys the reference's Gemma-4 classes (and vLLM's Gemma-4 DSpark class) read, which an export must keep
READ_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "attention_bias", "hidden_activation",
             "rms_norm_eps", "vocab_size", "final_logit_softcapping", "num_hidden_layers", "num_target_layers", "layer_types",
             "target_layer_ids", "hidden_size_per_layer_input", "enable_moe_block", "num_kv_shared_layers", "use_double_wide_mlp")
BLOCK_KEYS = ("block_size", "mask_token_id", "markov_rank", "enable_confidence_head")


def outputs(drafter, io: dict) -> dict:
    """Our drafter on the fixture's inputs, under the fixture's output names."""
    with torch.no_grad():
        if KIND_OF(drafter) == "Eagle3Drafter":
            ids = torch.cat([torch.zeros_like(io["ids"][:, :1]), io["ids"][:, :-1]], 1)  # ours reads token t+1 at position t
            seen = []  # the layer output before the final norm (the norm hides a uniform scale such as layer_scalar)
            hook = drafter.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            normed = drafter(io["hidden"], ids, torch.ones_like(ids, dtype=torch.bool))[:, 0]  # TTT step 0, (1, S, d)
            hook.remove()
            return {"h": seen[0], "normed": normed, "logits": drafter.lm_head(normed)}
        A, G = io["prev"].shape[1:]
        h = drafter.block_hidden(io["block_ids"], io["block_pos"], drafter.context_kv(io["hidden"], io["ctx_pos"]), io["mask"])
        out = {"h": h, "base_logits": drafter.lm_head(h), "logits": drafter.logits(h.view(A, G, -1), io["prev"][0])[None]}
        conf = drafter.confidence_logits(h.view(A, G, -1), io["prev"][0])
        return out if conf is None else {**out, "confidence": conf[None]}


def KIND_OF(drafter) -> str:
    return type(drafter).__name__


def max_diff(ours: dict, io: dict) -> float:
    assert set(ours) <= set(io), (sorted(ours), sorted(io))
    return max(float((ours[k] - io[k]).abs().max()) for k in ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_folder_loads_and_gives_the_reference_outputs(variant):
    drafter = load_drafter(FIXTURE / variant)
    io = load_file(FIXTURE / variant / "io.safetensors")
    assert KIND_OF(drafter) == KIND[variant] and drafter.family == "gemma4"
    if variant.startswith("dspark"):
        assert drafter.cfg.markov_head_type == variant.removeprefix("dspark_")
    assert max_diff(outputs(drafter, io), io) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_export_is_the_reference_layout_and_round_trips(tmp_path, variant):
    ref_cfg = json.loads((FIXTURE / variant / "config.json").read_text())
    out = export_drafter(load_drafter(FIXTURE / variant), tmp_path / variant)
    cfg = json.loads((out / "config.json").read_text())
    keys = READ_KEYS + (BLOCK_KEYS if variant != "eagle3" else ("ttt_length",))
    if not ref_cfg["attention_k_eq_v"]:  # the count is read only under K=V sharing; transformers 5.2x keeps it nowhere else
        keys = tuple(k for k in keys if k != "num_global_key_value_heads")
    assert {k: cfg.get(k) for k in keys} == {k: ref_cfg.get(k) for k in keys}
    assert cfg["rope_parameters"]["full_attention"] == ref_cfg["rope_parameters"]["full_attention"]
    assert "hidden_act" not in cfg  # the drafter's MLP is the target's gelu, not a SwiGLU (hidden_activation says so)

    def shapes(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(out) == shapes(FIXTURE / variant)  # every tensor, the reference's names (layer_scalar included)
    io = load_file(FIXTURE / variant / "io.safetensors")
    assert max_diff(outputs(load_drafter(out), io), io) <= TOL


def test_the_fixture_is_small_and_documented():
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 2_000_000, size
    readme = (FIXTURE / "README.md").read_text()
    assert "afdfa7c9382a3341a3e6f17756dd816da79f132c" in readme and "make_gemma4_reference_fixture.py" in readme
