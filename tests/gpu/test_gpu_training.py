"""Training on CUDA: flex attention (compiled) against sdpa, forward and backward; a DeepSpeed ZeRO-2 bf16 step against
the CPU fp32 step of the same drafter on the same batch.

Tolerances, stated once: fp32 flex vs sdpa, loss within 1e-4 relative and every gradient within 1e-3 of the largest
gradient entry of its tensor (the kernels sum in other orders); bf16 flex vs sdpa, loss within 2% and the gradient
cosine >= 0.99; DeepSpeed bf16 (CUDA) vs plain fp32 (CPU), loss within 2%, every gradient tensor's cosine >= 0.98 and
the whole gradient's norm within 5% (bf16 keeps 8 bits of mantissa through ~10 matmuls), and the first AdamW update,
read back from DeepSpeed's fp32 master weights, with cosine >= 0.9 to the CPU's (Adam's first step is ~lr x sign(g):
entries whose gradient is near 0 may flip sign in bf16).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from deepspec.config.train import LossConfig
from deepspec.drafters import Eagle3Config, Eagle3Drafter
from deepspec.evaluation import gpu_check as gc
from deepspec.training.step import DrafterWithLoss

SHAPE = replace(gc.TINY, name="small", hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vocab=8192,
                mask_token_id=8191, target_layer_ids=(1, 3, 5), drafter_layers=2, block=7, anchors=64, markov_rank=64)


def frozen_embeddings(device: str) -> tuple[nn.Embedding, nn.Linear]:
    torch.manual_seed(0)
    with torch.device(device):
        embed = nn.Embedding(SHAPE.vocab, SHAPE.hidden).requires_grad_(False)
        head = nn.Linear(SHAPE.hidden, SHAPE.vocab, bias=False).requires_grad_(False)
    return embed, head


def drafter_with_loss(kind: str, backend: str, device: str) -> DrafterWithLoss:
    embed, head = frozen_embeddings(device)
    if kind == "eagle3":
        torch.manual_seed(1)
        with torch.device(device):
            d = Eagle3Drafter(Eagle3Config(ttt_steps=3, target_layer_ids=list(SHAPE.target_layer_ids), attention_backend=backend),
                              gc.qwen3_config(SHAPE), embed, head)
        return DrafterWithLoss(d, "chain", LossConfig())
    return DrafterWithLoss(gc.random_dspark(SHAPE, gc.qwen3_config(SHAPE), embed, head, torch.device(device), backend=backend),
                           "block", LossConfig())


def ragged_batch(device: str) -> dict:
    """Two samples of 1,024 tokens, the second with 200 padded positions."""
    batch = gc.random_batch(SHAPE, 2, 1024, torch.device(device))
    batch["valid"][1, -200:] = False
    batch["final_valid"][1, -200:] = False
    return batch


def loss_and_grads(model: DrafterWithLoss, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(batch, 0)["loss"]
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("kind,dtype", [("dspark", torch.float32), ("dspark", torch.bfloat16), ("eagle3", torch.bfloat16)],
                         ids=["dspark-fp32", "dspark-bf16", "eagle3-bf16"])  # each a flex compile (forward + backward)
def test_flex_attention_training_matches_sdpa_forward_and_backward(kind, dtype):
    sdpa, flex = drafter_with_loss(kind, "sdpa", "cuda"), drafter_with_loss(kind, "flex", "cuda")
    flex.load_state_dict(sdpa.state_dict())
    sdpa, flex = sdpa.to(dtype), flex.to(dtype)
    batch = ragged_batch("cuda")
    (loss_s, grads_s), (loss_f, grads_f) = loss_and_grads(sdpa, batch), loss_and_grads(flex, batch)
    assert grads_s.keys() == grads_f.keys() and grads_s
    if dtype == torch.float32:
        assert abs(loss_f - loss_s) <= 1e-4 * abs(loss_s), (loss_f, loss_s)
        for n in grads_s:
            scale = grads_s[n].abs().max().clamp_min(1e-12)
            assert float((grads_f[n] - grads_s[n]).abs().max() / scale) <= 1e-3, n
    else:
        assert abs(loss_f - loss_s) <= 2e-2 * abs(loss_s), (loss_f, loss_s)
        flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
        assert cosine(flat(grads_f), flat(grads_s)) >= 0.99


def test_deepspeed_zero2_bf16_step_on_cuda_matches_the_cpu_fp32_step():
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from deepspec import distributed
    from deepspec.training.engine import build_engine

    cpu_model = drafter_with_loss("dspark", "sdpa", "cpu")
    cuda_model = copy.deepcopy(cpu_model).to("cuda")
    batch = ragged_batch("cpu")
    names = [n for n, p in cpu_model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in cpu_model.named_parameters() if p.requires_grad}

    cfg = gc.train_config(SHAPE, torch.device("cuda"))
    loss_cpu, grads_cpu = loss_and_grads(cpu_model, batch)
    params = [p for p in cpu_model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay).step()

    distributed.init_process_group(single_process=True)
    engine, _ = build_engine(cuda_model, cfg, total_steps=100, world=1)
    by_name = dict(engine.module.named_parameters())
    start_cuda = {n: safe_get_full_fp32_param(by_name[n]).float().cpu() for n in names}  # the fp32 master weights
    out = engine({k: v.cuda() for k, v in batch.items()}, 0)
    engine.backward(out["loss"])
    grads_cuda = {n: safe_get_full_grad(by_name[n]).float().cpu() for n in names}
    engine.step()
    after_cuda = {n: safe_get_full_fp32_param(by_name[n]).float().cpu() for n in names}

    loss_cuda = float(out["loss"].detach())
    assert abs(loss_cuda - loss_cpu) <= 2e-2 * abs(loss_cpu), (loss_cuda, loss_cpu)
    for n in names:
        assert cosine(grads_cuda[n], grads_cpu[n]) >= 0.98, n
    norm = lambda g: float(torch.cat([g[n].flatten() for n in names]).norm())  # noqa: E731
    assert abs(norm(grads_cuda) / norm(grads_cpu) - 1) <= 0.05
    delta_cpu = torch.cat([(dict(cpu_model.named_parameters())[n].detach() - before[n]).flatten() for n in names])
    delta_cuda = torch.cat([(after_cuda[n] - start_cuda[n]).flatten() for n in names])
    assert cosine(delta_cuda, delta_cpu) >= 0.9
