"""Eagle3 and DSpark on a Qwen3 target against the DeepSpec reference's own classes and loss functions
(tests/fixtures/reference_qwen3: the reference's save_pretrained folders, one padded batch, and the outputs, losses and
gradients its code produced on them; README.md there says how). fp32, within 1e-4, without the reference installed:
the reference folder loads into ours, and on the same weights, batch and anchors ours gives every TTT step's output,
the loss and every trainable parameter's gradient the reference gave. Our export in DeepSpec's layout
(``layout="reference"``) is the reference's folder again, and the engines' layout (``Eagle3Qwen3ForCausalLM``)
round-trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deepspec.config.train import LossConfig
from deepspec.drafters.blocks import make_blocks
from deepspec.export import export_drafter, load_drafter
from deepspec.losses import block_draft_loss, eagle3_loss
from deepspec.serving_loaders import check_export

FIXTURE = Path(__file__).parent / "fixtures" / "reference_qwen3"
TOL = 1e-4
# config.json keys DeepSpec's Qwen3Eagle3Model reads (its __init__, Qwen3 layers and rotary), which our export must keep
EAGLE3_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "rms_norm_eps", "vocab_size", "attention_bias", "num_hidden_layers", "num_target_layers", "target_layer_ids",
               "ttt_length", "step_loss_decay", "draft_num_hidden_layers", "tie_word_embeddings", "rope_parameters", "hidden_act")


def io(name: str) -> dict:
    return load_file(FIXTURE / name / "io.safetensors")


def settings() -> dict:
    return json.loads((FIXTURE / "settings.json").read_text())


def eagle3_steps(drafter, x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> pre-norm layer output (B, K, S, d) per TTT step, post-norm h (B, K, S, d), and a (B, K, S) mask of the rows the
    reference computes (step k at t < length - k: its TTT mask leaves later queries empty; none is ever supervised)."""
    valid = x["attention_mask"].bool()
    seen = []
    hook = drafter.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    h = drafter(x["hidden_eagle3"], x["input_ids"], valid)  # ours shifts: token t+1+k at position t, as the reference's loss
    hook.remove()
    K, S = h.shape[1:3]
    rows = torch.arange(S)[None, None] < valid.sum(1)[:, None, None] - torch.arange(K)[None, :, None]
    return torch.stack(seen, 1), h, rows


def grad_diff(drafter, loss: torch.Tensor, x: dict, rename=lambda n: n) -> float:
    """Max |ours - reference| over every trainable parameter's gradient (the same set on both sides)."""
    params = {n: p for n, p in drafter.named_parameters() if p.requires_grad}
    assert {f"grad.{rename(n)}" for n in params} == {k for k in x if k.startswith("grad.")}
    grads = torch.autograd.grad(loss, list(params.values()))
    return max(float((g - x[f"grad.{rename(n)}"]).abs().max()) for n, g in zip(params, grads))


def eagle3_name(n: str) -> str:
    return n.replace("midlayer.", "layers.0.")


def test_eagle3_every_ttt_step_matches_the_reference():
    drafter, x = load_drafter(FIXTURE / "eagle3"), io("eagle3")
    assert drafter.cfg.qk_norm and drafter.cfg.ttt_steps == settings()["ttt_length"]
    with torch.no_grad():
        pre, h, rows = eagle3_steps(drafter, x)
    assert (pre - x["h"]).abs()[rows].max() <= TOL
    assert (drafter.lm_head(h) - x["logits"]).abs()[rows].max() <= TOL


def test_eagle3_loss_and_gradients_match_the_reference():
    """The reference's compute_eagle3_loss: its loss mask (step k at t when loss_mask[t+k] and t+k+1 is real) and
    normalization (each step's sum / batch x padded length) are our defaults."""
    drafter, x = load_drafter(FIXTURE / "eagle3").train(), io("eagle3")
    assert drafter.cfg.loss_normalization == "local_mean"
    _, h, _ = eagle3_steps(drafter, x)
    valid = x["attention_mask"].bool()
    out = eagle3_loss(drafter, h, x["loss_mask"] * valid, valid, x["target_last_hidden_states"], LossConfig(),
                      drafter.cfg.step_loss_decay, drafter.cfg.loss_normalization)
    assert abs(float(out["loss"].detach()) - float(x["loss"])) <= TOL
    assert grad_diff(drafter, out["loss"], x, eagle3_name) <= TOL
    token_mean = eagle3_loss(drafter, h.detach(), x["loss_mask"] * valid, valid, x["target_last_hidden_states"], LossConfig(),
                             drafter.cfg.step_loss_decay, "valid_token_mean")["loss"]
    assert abs(float(token_mean) - float(x["loss"])) > 0.1  # the option is another objective, not a relabelling


def test_dspark_loss_and_gradients_match_the_reference():
    drafter, x = load_drafter(FIXTURE / "dspark").train(), io("dspark")
    valid = x["attention_mask"].bool()
    anchors = x["anchors"]
    blocks = make_blocks(x["input_ids"], x["loss_mask"] * valid, anchors, torch.ones_like(anchors, dtype=torch.bool),
                         drafter.cfg.block_size, drafter.cfg.mask_token_id)
    assert torch.equal(blocks.label_valid, x["eval_mask"].bool())
    h = drafter(x["hidden_dspark"], valid, blocks)
    prev = drafter.prev_tokens(blocks.input_ids, blocks.labels).flatten(0, 1)
    assert (drafter.logits(h.flatten(0, 1), prev).view_as(x["draft_logits"]) - x["draft_logits"]).abs().max() <= TOL
    assert (drafter.confidence_logits(h.flatten(0, 1), prev).view_as(x["confidence"]) - x["confidence"]).abs().max() <= TOL
    w = settings()["dspark_loss"]
    cfg = LossConfig(ce_weight=w["ce_loss_alpha"], l1_weight=w["l1_loss_alpha"], confidence_weight=w["confidence_head_alpha"],
                     decay_gamma=w["loss_decay_gamma"])
    out = block_draft_loss(drafter, h, blocks, x["target_last_hidden_states"], cfg)
    assert abs(float(out["loss"].detach()) - float(x["loss"])) <= TOL
    assert grad_diff(drafter, out["loss"], x) <= TOL


def shapes(path: Path) -> dict:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("layout", ["reference", "serving"])
def test_eagle3_export_layouts_round_trip(tmp_path, layout):
    out = export_drafter(load_drafter(FIXTURE / "eagle3"), tmp_path / layout, layout=layout)
    cfg, ref_cfg = (json.loads((p / "config.json").read_text()) for p in (out, FIXTURE / "eagle3"))
    if layout == "reference":  # DeepSpec's Qwen3Eagle3Model: its keys and its tensors, layer under layers.0.*
        assert {k: cfg.get(k) for k in EAGLE3_KEYS} == {k: ref_cfg.get(k) for k in EAGLE3_KEYS}
        assert shapes(out) == shapes(FIXTURE / "eagle3")
        assert check_export(out) == {}  # no engine loader of DeepSpec's own class was read
    else:  # vLLM's Qwen3 Eagle3 class: midlayer.* with q_norm/k_norm
        assert cfg["architectures"] == ["Eagle3Qwen3ForCausalLM"]
        assert {"midlayer.self_attn.q_norm.weight", "midlayer.self_attn.k_norm.weight"} <= set(shapes(out))
        assert check_export(out)["vLLM eagle3"] == []
    x = io("eagle3")
    with torch.no_grad():
        pre, _, rows = eagle3_steps(load_drafter(out), x)
    assert (pre - x["h"]).abs()[rows].max() <= TOL


def test_the_fixture_is_small_and_documented():
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 1_000_000, size
    readme = (FIXTURE / "README.md").read_text()
    assert "afdfa7c9382a3341a3e6f17756dd816da79f132c" in readme and "make_qwen3_reference_fixture.py" in readme
