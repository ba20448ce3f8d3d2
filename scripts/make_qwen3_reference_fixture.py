"""Write tests/fixtures/reference_qwen3/ with the DeepSpec reference's own Qwen3 Eagle3 and DSpark classes and their
own loss functions: the weights, one padded batch, and the reference's fp32 forward outputs, losses and gradients.

This runs the *reference* (deepseek-ai/DeepSpec), never this project's package: both are named ``deepspec``, so
the reference checkout is put first on sys.path and this script imports nothing from the repository. The reference
pins transformers 5.10.2; give such a transformers with --site (see tests/fixtures/reference_qwen3/README.md).

    python scripts/make_qwen3_reference_fixture.py --reference /tmp/deepspec_ref --site /tmp/tf5102 \
        --out tests/fixtures/reference_qwen3

Two departures from a GPU run, both outside the math. Attention: flex_attention has no CPU backward, so the
reference's own BlockMasks (its ``create_eagle3_attention_mask`` / ``create_dspark_attention_mask``) are evaluated
densely through their ``mask_mod`` and attention runs eagerly (Eagle3: ``dense_flex_attention``, a query with no
allowed key gives 0 as flex does; DSpark: transformers' SDPA path with the dense mask). Loss: Eagle3's Triton soft-CE
kernel (``FusedLogSoftmaxLoss``, CUDA only) is replaced by
its definition, sum over unmasked rows of -sum_v p_t log softmax(logits), divided by the normalizer the reference's
``compute_eagle3_loss`` passes. DSpark's anchors are fixed (the reference samples them with torch.rand) by replacing
its ``sample_anchor_positions`` with one returning ``ANCHORS``; everything after the sampler is the reference's.

Per folder (``eagle3``, ``dspark``): the model's ``save_pretrained`` output and ``io.safetensors``; the names and
shapes are in ``eagle3_io`` / ``dspark_io``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

V, D, S, B = 128, 32, 12, 2  # vocabulary, hidden size, padded length, batch
LENGTHS = [12, 9]  # real tokens per row (right padding)
EAGLE3_LAYERS, DSPARK_LAYERS = [0, 1, 2, 3, 4], [0, 2, 4]  # the reference Eagle3 takes exactly five
TTT, DECAY = 4, 0.8
G, MASK_ID, MARKOV_RANK = 4, 4, 8
ANCHORS = [[2, 5, 8], [1, 4, 6]]  # (B, A): every one a candidate (loss_mask at a and a + 1)
DSPARK_LOSS = dict(loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0)


class Args(dict):
    """The reference reads its model arguments both as attributes and with ``in``."""

    __getattr__ = dict.__getitem__


def target_config():
    """A tiny Qwen3 target: 6 layers, 2 query heads and 1 KV head of 16, q_norm/k_norm."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=6, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


def batch() -> dict:
    """input_ids (B, S), attention_mask (B, S) 1 on real tokens, loss_mask (B, S) assistant tokens (a hole in row 1),
    target_last_hidden_states (B, S, D); hidden_* (B, S, L*D) per drafter."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, S), generator=g)
    attention = (torch.arange(S)[None] < torch.tensor(LENGTHS)[:, None]).long()
    loss_mask = torch.zeros(B, S, dtype=torch.long)
    loss_mask[0, 2:12] = 1
    loss_mask[1, 1:9] = 1
    loss_mask[1, 5] = 0
    ids = ids * attention  # padding id 0
    return dict(input_ids=ids, attention_mask=attention, loss_mask=loss_mask,
                hidden_eagle3=torch.randn(B, S, len(EAGLE3_LAYERS) * D, generator=g),
                hidden_dspark=torch.randn(B, S, len(DSPARK_LAYERS) * D, generator=g),
                target_last_hidden_states=torch.randn(B, S, D, generator=g))


def perturb(model, seed: int) -> None:
    """Every weight off its initialisation (norms included), so a dropped or misnamed tensor shows; embedding and LM
    head frozen, as in training."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.1))
    model.embed_tokens.requires_grad_(False)
    model.lm_head.requires_grad_(False)


def dense_mask(block_mask, batch_size: int, q_len: int, kv_len: int):
    """A flex BlockMask's ``mask_mod`` on every (batch, query, key): (B, Q, K) bool."""
    import torch

    b = torch.arange(batch_size)[:, None, None]
    return block_mask.mask_mod(b, torch.zeros_like(b), torch.arange(q_len)[None, :, None], torch.arange(kv_len)[None, None, :])


def dense_flex_attention(query, key, value, block_mask, enable_gqa=False, scale=None, **_):
    """flex_attention(q (B, H, Q, hd), k/v (B, Hkv, K, hd), block_mask) computed densely; rows with no key give 0."""
    import torch

    B, H, Q, hd = query.shape
    key, value = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (key, value))
    allowed = dense_mask(block_mask, B, Q, key.shape[2])[:, None]  # (B, 1, Q, K)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (hd**-0.5 if scale is None else scale)
    w = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
    return torch.matmul(torch.where(allowed.any(-1, keepdim=True), w, torch.zeros_like(w)), value)


def grads(model) -> dict:
    return {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def eagle3_io(x: dict) -> tuple[object, dict]:
    """Qwen3Eagle3Model + compute_eagle3_loss. Outputs: h (B, TTT, S, D) each step's layer output before the final norm,
    logits (B, TTT, S, V), loss (), grad.<reference parameter name>. Step k's rows t >= length - k are queries the
    reference's TTT mask leaves empty (never supervised); compare the others."""
    import torch
    from deepspec.modeling.eagle3 import loss as eagle3_loss
    from deepspec.modeling.eagle3.qwen3 import Qwen3Eagle3Model, build_draft_config
    from deepspec.modeling.eagle3.qwen3 import modeling as eagle3_modeling

    eagle3_modeling.flex_attention = dense_flex_attention  # q_len <= 128: the reference calls this name directly

    class SoftCE:  # FusedLogSoftmaxLoss's definition, on any device
        @staticmethod
        def apply(logits, target_p, position_mask, normalizer):
            rows = -(target_p * torch.log_softmax(logits.float(), dim=-1)).sum(-1)  # (B, S)
            return (rows * position_mask.squeeze(-1)).sum() / float(normalizer)

    eagle3_loss.FusedLogSoftmaxLoss = SoftCE
    cfg = build_draft_config(target_config=target_config(), model_args=Args(
        target_layer_ids=EAGLE3_LAYERS, ttt_length=TTT, step_loss_decay=DECAY, draft_num_hidden_layers=1,
        target_model_name_or_path="tiny-qwen3"))
    torch.manual_seed(1)  # the initialisation too (perturb adds to it)
    model = Qwen3Eagle3Model(cfg).float()
    perturb(model, 1)
    seen, forward = [], model.forward

    def recording_forward(*args, **kw):
        out = forward(*args, **kw)
        if kw.get("return_logits"):
            seen.append(out)
        return out

    model.forward = recording_forward
    loss = eagle3_loss.compute_eagle3_loss(model=model, batch=dict(
        input_ids=x["input_ids"], attention_mask=x["attention_mask"], loss_mask=x["loss_mask"],
        target_hidden_states=x["hidden_eagle3"], target_last_hidden_states=x["target_last_hidden_states"]),
        ttt_length=TTT, step_loss_decay=DECAY)
    loss.backward()
    del model.forward
    return model, dict(h=torch.stack([o.hidden_states.detach() for o in seen], 1),
                       logits=torch.stack([o.draft_logits.detach() for o in seen], 1), loss=loss.detach(), **grads(model))


def dspark_io(x: dict) -> tuple[object, dict]:
    """Qwen3DSparkModel (vanilla Markov head, confidence head with the Markov input) + compute_dspark_loss with
    ``DSPARK_LOSS``, anchors ``ANCHORS``. Outputs: draft_logits (B, A, G, V) with the Markov bias, confidence (B, A, G)
    logits, eval_mask (B, A, G), loss (), grad.<parameter name>."""
    import torch
    from deepspec.modeling.dspark import loss as dspark_loss
    from deepspec.modeling.dspark.qwen3 import modeling as dspark_modeling
    from deepspec.modeling.dspark.qwen3.config import build_draft_config

    anchors = torch.tensor(ANCHORS)
    dspark_modeling.sample_anchor_positions = lambda **kw: (anchors, torch.ones_like(anchors, dtype=torch.bool))
    block_mask = dspark_modeling.create_dspark_attention_mask
    dspark_modeling.create_dspark_attention_mask = lambda **kw: dense_mask(
        block_mask(**kw), B, anchors.shape[1] * G, S + anchors.shape[1] * G)[:, None]  # (B, 1, A*G, S + A*G) for SDPA
    cfg = build_draft_config(target_config(), Args(
        num_draft_layers=2, target_layer_ids=DSPARK_LAYERS, mask_token_id=MASK_ID, num_anchors=anchors.shape[1], block_size=G,
        markov_rank=MARKOV_RANK, markov_head_type="vanilla", confidence_head_alpha=DSPARK_LOSS["confidence_head_alpha"],
        confidence_head_with_markov=True))
    torch.manual_seed(2)
    model = dspark_modeling.Qwen3DSparkModel(cfg).float()
    model.config._attn_implementation = "sdpa"  # with the dense mask above (flex has no CPU backward)
    perturb(model, 2)
    out = model(input_ids=x["input_ids"], target_hidden_states=x["hidden_dspark"], loss_mask=x["loss_mask"],
                target_last_hidden_states=x["target_last_hidden_states"])
    loss = dspark_loss.compute_dspark_loss(outputs=out, **DSPARK_LOSS)
    loss.backward()
    return model, dict(anchors=anchors, draft_logits=out.draft_logits.detach(), confidence=out.confidence_pred.detach(),
                       eval_mask=out.eval_mask, loss=loss.detach(), **grads(model))


def write(out: Path) -> None:
    import deepspec
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    print("reference package:", Path(deepspec.__file__).parent)
    if not dist.is_initialized():  # compute_dspark_loss all-reduces its denominators
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    x = batch()
    from deepspec.utils import metrics

    for name, make in (("eagle3", eagle3_io), ("dspark", dspark_io)):
        metrics._metrics.clear()  # both losses log train/loss, with different reductions
        model, io = make(x)
        folder = out / name
        model.save_pretrained(folder, safe_serialization=True)
        keep = {k: v for k, v in x.items() if not k.startswith("hidden_") or k == f"hidden_{name}"}
        save_file({k: v.contiguous().clone() for k, v in {**keep, **io}.items()}, folder / "io.safetensors")
        print(name, json.loads((folder / "config.json").read_text())["architectures"], f"loss {float(io['loss']):.6f}")
    (out / "settings.json").write_text(json.dumps(dict(ttt_length=TTT, step_loss_decay=DECAY, dspark_loss=DSPARK_LOSS,
                                                       torch=torch.__version__), indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="a checkout of deepseek-ai/DeepSpec")
    ap.add_argument("--site", help="a folder with transformers 5.10.2 (put first on sys.path)")
    ap.add_argument("--out", type=Path, required=True, help="write the fixture here")
    a = ap.parse_args()
    sys.path[:0] = [p for p in (a.site, a.reference) if p]
    write(a.out)


if __name__ == "__main__":
    main()
