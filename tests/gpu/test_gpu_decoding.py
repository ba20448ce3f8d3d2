"""The exact-law and greedy-identity checks of tests/test_exact_law.py, with the target and drafters on CUDA: the
Triton walk and acceptance kernels, the batched KV cache and the loop's device code all run on the GPU.

The law tests run the bf16 target (what `auto` picks on a GPU); the exact law is enumerated with the same CUDA model,
so bf16 rounding is part of the law being checked against. Greedy identity runs an fp32 target: in bf16 a verify
forward of W tokens and a plain step of 1 may round a near-tied pair of logits apart (kernels differ by shape), which
would be a numerics finding, not the engine's.
"""
from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import test_exact_law as law  # tests/ is on sys.path (the folder of tests/conftest.py)
from deepspec.decoding.verify import SamplingConfig
from deepspec.target import TargetModel

CPU_DRAFTER = law.drafter


class SeenFromCPU:
    """A CUDA target as the enumeration in ``law.exact_law`` calls it: CPU ids in, CPU outputs out."""

    def __init__(self, target: TargetModel):
        self.target = target

    def __call__(self, ids: torch.Tensor):
        return tuple(x.cpu() for x in self.target(ids.to(self.target.device)))

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        return self.target.logits(final.to(self.target.device)).float().cpu()


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory):
    """(bf16 CUDA target, its TargetConfig, HF config) of the vocabulary-6 model, and an fp32 CUDA twin."""
    target, tcfg, cfg = law.tiny_target(tmp_path_factory.mktemp("v6_cuda"))
    assert target.device.type == "cuda" and next(target.model.parameters()).dtype == torch.bfloat16
    fp32 = TargetModel.from_config(replace(tcfg, dtype="float32"))
    return (target, tcfg, cfg), (fp32, tcfg, cfg)


def cuda_drafter(tiny, kind: str, block: int = 3, **eagle3):
    """``law.drafter`` moved to the target's device and dtype (as the eval stage loads a drafter)."""
    target = tiny[0]
    return CPU_DRAFTER(kind, tiny, block, **eagle3).to(device=target.device, dtype=next(target.model.parameters()).dtype)


LAW_CASES = [law.CASES[i] for i in (0, 1, 4, 5, 6, 9, 10)]  # fused walk, top-k, DFlash, Eagle3, draft-cost gate, threshold


@pytest.mark.parametrize("kind,sampling,policy", LAW_CASES, ids=[f"{k}-T{s.temperature}-k{s.top_k}-p{s.top_p}-{p}" for k, s, p in LAW_CASES])
def test_whole_generations_on_cuda_follow_the_target_law(tiny_cuda, kind, sampling, policy):
    tiny, _ = tiny_cuda
    samples = law.draw(tiny, cuda_drafter(tiny, kind), sampling, policy)
    assert law.law_pvalue((SeenFromCPU(tiny[0]),) + tiny[1:], samples, sampling) > law.P_MIN


def test_a_broken_acceptance_rule_is_caught_on_cuda(tiny_cuda, monkeypatch):
    """The check has power on this path too: the Triton verify with the residual replaced by p fails it."""
    from deepspec.decoding import kernels

    tiny, _ = tiny_cuda
    broken = lambda draft, q, p, lengths, u_accept, noise_u, greedy: kernels.reference.verify(  # noqa: E731
        draft, torch.zeros_like(q) if q is not None else q, p, lengths, u_accept, noise_u, greedy)
    monkeypatch.setattr(kernels.triton_kernels, "verify", broken)
    sampling = SamplingConfig(1.0)
    samples = law.draw(tiny, cuda_drafter(tiny, "vanilla"), sampling)
    assert law.law_pvalue((SeenFromCPU(tiny[0]),) + tiny[1:], samples, sampling) < 1e-12


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**law.GREEDY_CASES)
def test_greedy_on_cuda_equals_plain_greedy(tiny_cuda, kind, block, lengths, max_new, eos, policy, seed):
    _, fp32 = tiny_cuda
    with mock.patch.object(law, "drafter", lambda kind, tiny, block=3, **kw: cuda_drafter(tiny, kind, block, **kw)):
        law.check_greedy_identity(fp32, kind, block, lengths, max_new, eos, policy, seed)
