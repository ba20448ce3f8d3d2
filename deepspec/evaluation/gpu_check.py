"""What one GPU says about this project at a real shape, in minutes: decoding physics, training speed, memory.

Random weights throughout (nothing is downloaded): a Qwen3-8B-shaped target (36 layers, d 4,096, V 151,936) and the
DSpark drafter of the reference recipe (5 layers of the target's shape, block 7, Markov rank 256, 512 anchors, 5 target
layers). Random weights decide nothing about acceptance; they fix every cost, which is what is measured here.

    decoding_physics   verify cost t(rows, width) / t(1, 1), the draft's cost in target steps at 1k and 8k tokens of
                       context, a round's split (draft / verify / overhead), the Triton kernels' share of a round, and
                       the speedup those costs imply at tau = 2, 3, 5 (implied, not measured: random drafters are
                       rarely accepted)
    training_speed     DeepSpeed ZeRO-2 steps on random cached features: tokens/s, peak memory, achieved TFLOP/s
                       and MFU against the device's bf16 peak, with the full vocabulary or a reduced one
    training_memory    the largest micro-batch that fits at each sequence length, and what the loss's chunking saves

``TINY`` runs the same code at toy sizes on a CPU (``scripts/gpu_check.py --dry-run``, in the test suite), so that no
section can rot between the rare occasions a GPU is at hand.
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from deepspec.config.data import TargetConfig
from deepspec.config.train import DeepSpeedConfig, LossConfig, OptimConfig, TrainStageConfig
from deepspec.decoding import kernels
from deepspec.decoding.scheduler import VerifyCostModel
from deepspec.decoding.sessions import make_session
from deepspec.decoding.speculative import speculative_generate
from deepspec.decoding.target_cache import TargetCache
from deepspec.decoding.verify import SamplingConfig, gumbel_noise
from deepspec.drafters import DSparkConfig, DSparkDrafter
from deepspec.drafters.draft_vocab import DraftVocab
from deepspec.target import TargetModel
from deepspec.training.step import DrafterWithLoss

GIB = 2**30

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "RTX 4090": 165.0}


@dataclass(frozen=True)
class CheckShape:
    """Every size the check uses: the target's shape, the drafter's recipe and each section's sweep."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    drafter_layers: int
    block: int
    markov_rank: int
    anchors: int
    draft_vocab: int
    """Reduced draft vocabulary N (the reference deployments' 32,768)."""
    verify_rows: int
    """Verify cost is profiled for rows 1, 2, 4, ... up to this."""
    verify_widths: int
    """... and widths 1 .. this."""
    verify_context_tokens: int
    draft_contexts_tokens: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    train_seq_tokens: int
    train_steps: int
    memory_seq_tokens: tuple[int, ...]
    memory_max_micro: int
    """The largest micro-batch tried (a cap: 'fits up to the cap' is a result too)."""
    repeats: int
    kernel_vocabs: tuple[int, ...]
    kernel_blocks: tuple[int, ...]
    kernel_rows: tuple[int, ...]


QWEN3_8B = CheckShape(
    name="qwen3-8b", hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151_936,
    mask_token_id=151_669, target_layer_ids=(1, 9, 17, 25, 33), drafter_layers=5, block=7, markov_rank=256, anchors=512,
    draft_vocab=32_768, verify_rows=64, verify_widths=16, verify_context_tokens=1024, draft_contexts_tokens=(1024, 8192),
    prompt_tokens=1024, new_tokens=128, train_seq_tokens=4096, train_steps=4, memory_seq_tokens=(4096, 8192),
    memory_max_micro=32, repeats=5, kernel_vocabs=(151_936, 262_144, 32_768), kernel_blocks=(7, 16), kernel_rows=(1, 7, 64))

TINY = CheckShape(
    name="tiny", hidden=64, layers=5, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1024, mask_token_id=1023,
    target_layer_ids=(0, 1, 2, 3, 4), drafter_layers=1, block=3, markov_rank=16, anchors=8, draft_vocab=256,
    verify_rows=2, verify_widths=3, verify_context_tokens=16, draft_contexts_tokens=(16, 32), prompt_tokens=12,
    new_tokens=8, train_seq_tokens=64, train_steps=1, memory_seq_tokens=(32, 64), memory_max_micro=4, repeats=1,
    kernel_vocabs=(300, 1000), kernel_blocks=(3,), kernel_rows=(1, 3))


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously: a clock read without this times the launch, not the work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall seconds of each function, called in turn (a, b, a, b, ...) after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def device_info(device: torch.device) -> dict:
    """Name, memory and bf16 peak of the device (peak None where unknown, e.g. a CPU)."""
    if device.type != "cuda":
        from deepspec.precision import cpu_name

        return {"type": "cpu", "name": cpu_name(), "memory_gib": None, "bf16_peak_tflops": None}
    props = torch.cuda.get_device_properties(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in props.name), None)
    return {"type": "cuda", "name": props.name, "memory_gib": props.total_memory / GIB, "bf16_peak_tflops": peak,
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


def free_memory() -> None:
    """Drop what the last section left (a DeepSpeed engine keeps references until collected)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- random models at a shape
def qwen3_config(shape: CheckShape):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                       head_dim=shape.head_dim, max_position_embeddings=40_960, tie_word_embeddings=False,
                       rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=None, pad_token_id=0)


def random_target(shape: CheckShape, device: torch.device, dtype: torch.dtype) -> TargetModel:
    """A Qwen3 of ``shape`` with HF's random initialisation, built directly on ``device`` in ``dtype`` (an 8B model
    initialised on a CPU would take minutes)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen3_config(shape), dtype=dtype, attn_implementation="sdpa")
    return TargetModel(model, list(shape.target_layer_ids))


def random_dspark(shape: CheckShape, target_config, embed: torch.nn.Embedding, head: torch.nn.Linear, device: torch.device,
                  draft_vocab: DraftVocab | None = None, backend: str = "sdpa") -> DSparkDrafter:
    """The reference recipe's DSpark over the given (frozen) embedding and LM head, built on ``device`` in fp32."""
    cfg = DSparkConfig(block_size=shape.block, num_hidden_layers=shape.drafter_layers, markov_rank=shape.markov_rank,
                       num_anchors=shape.anchors, mask_token_id=shape.mask_token_id, target_layer_ids=list(shape.target_layer_ids),
                       attention_backend=backend, draft_vocab_size=draft_vocab.size if draft_vocab else None)
    torch.manual_seed(1)
    with torch.device(device):
        return DSparkDrafter(cfg, target_config, embed, head, draft_vocab)


def random_draft_vocab(shape: CheckShape) -> DraftVocab:
    """N ids drawn at random (the map's content does not change the cost)."""
    ids = torch.randperm(shape.vocab, generator=torch.Generator().manual_seed(0))[: shape.draft_vocab]
    return DraftVocab(torch.sort(ids).values, shape.vocab)


def random_batch(shape: CheckShape, micro: int, seq: int, device: torch.device) -> dict:
    """What ``training.data.collate`` yields for ``micro`` samples of ``seq`` tokens, every token supervised after the
    first 16: random ids, random bf16 target features (B, S, L*d) and final hidden states (B, S, d)."""
    g = torch.Generator().manual_seed(micro * 10_000 + seq)
    F = len(shape.target_layer_ids) * shape.hidden
    loss_mask = torch.ones(micro, seq, dtype=torch.uint8)
    loss_mask[:, :16] = 0
    batch = {"input_ids": torch.randint(0, shape.mask_token_id, (micro, seq), generator=g), "loss_mask": loss_mask,
             "valid": torch.ones(micro, seq, dtype=torch.bool), "final_valid": torch.ones(micro, seq, dtype=torch.bool),
             "sample_seed": torch.arange(micro)}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["hidden"] = torch.randn(micro, seq, F, device=device, dtype=torch.bfloat16)
    batch["final_hidden"] = torch.randn(micro, seq, shape.hidden, device=device, dtype=torch.bfloat16)
    return batch


# ----------------------------------------------------------------------------- decoding physics
@torch.inference_mode()
def step_verify_draft(target: TargetModel, drafter: DSparkDrafter, contexts: tuple[int, ...], repeats: int) -> dict:
    """Per context (tokens): a plain decode step (forward of 1 token + its logits), a verify of the block (g + 1 tokens
    + their logits) and a steady-state draft (3 accepted tokens appended to the drafter's context, then one block),
    timed alternately on the same caches -> ms of each and the draft in target steps."""
    dev, g = target.device, drafter.cfg.block_size
    F = len(target.layer_ids) * target.config.hidden_size
    dtype = next(drafter.parameters()).dtype
    out = {}
    for n in contexts:
        cache = TargetCache(target.config)
        target(torch.zeros(1, n, dtype=torch.long, device=dev), past_key_values=cache)
        session = make_session(drafter, 1)
        session.extend(torch.randn(1, n, F, device=dev, dtype=dtype), torch.zeros(1, n, dtype=torch.long, device=dev),
                       torch.ones(1, n, dtype=torch.bool, device=dev))

        def forward(width: int) -> None:
            _, final = target(torch.ones(1, width, dtype=torch.long, device=dev), past_key_values=cache)
            target.logits(final)
            cache.drop_slots(width)

        def draft() -> None:
            session.extend(torch.randn(1, 3, F, device=dev, dtype=dtype), torch.zeros(1, 3, dtype=torch.long, device=dev),
                           torch.ones(1, 3, dtype=torch.bool, device=dev))
            session.draft(torch.tensor([0], device=dev), torch.tensor([5], device=dev), SamplingConfig(1.0), None)

        t = median_seconds({"step": lambda: forward(1), "verify": lambda: forward(g + 1), "draft": draft}, repeats, dev)
        out[str(n)] = {"step_ms": 1e3 * t["step"], "verify_ms": 1e3 * t["verify"], "draft_ms": 1e3 * t["draft"],
                       "verify_in_target_steps": t["verify"] / t["step"], "draft_in_target_steps": t["draft"] / t["step"]}
        del cache, session
    return out


@torch.inference_mode()
def kernel_seconds(drafter: DSparkDrafter, rows: int, repeats: int) -> dict:
    """The fused steps of a round at its real shape (``rows`` rows, block g, the drafter's vocabulary): the sampled
    Markov walk and the sampled acceptance rule (Triton on CUDA, the PyTorch reference elsewhere) -> seconds each."""
    dev, g, V = drafter.fc.weight.device, drafter.cfg.block_size, drafter.lm_head.weight.shape[0]
    gen = torch.Generator(device=dev).manual_seed(0)
    head = drafter.markov_head
    base = torch.randn(rows, g, V, device=dev, dtype=drafter.fc.weight.dtype)  # the drafter's LM head output
    x0 = torch.zeros(rows, dtype=torch.long, device=dev)
    q = torch.softmax(torch.randn(rows, g, V, device=dev), -1)
    p = torch.softmax(torch.randn(rows, g + 1, V, device=dev), -1)
    draft = torch.randint(0, V, (rows, g), device=dev)
    lengths = torch.full((rows,), g, device=dev)
    d2t = drafter.d2t
    t = median_seconds({
        "markov_walk": lambda: kernels.sample_walk(base, head.markov_w1.weight, head.markov_w2.weight, x0, 1.0, gen, d2t),
        "verify": lambda: kernels.sample_verify(draft, q, p, lengths, gen),
        "verify_greedy": lambda: kernels.verify(draft, None, p, lengths, None, None, True)}, repeats, dev)
    return {**t, "triton": kernels.use_triton(p)}


def loop_split(target: TargetModel, drafter: DSparkDrafter, shape: CheckShape) -> dict:
    """One real speculative generation per temperature (random prompt, fixed verification of the whole block):
    tau, ms per round, and the round's split into draft / verify / overhead (schedule, acceptance, bookkeeping)."""
    dev = target.device
    prompt = torch.randint(0, shape.mask_token_id, (shape.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    out = {}
    for T in (0.0, 1.0):
        speculative_generate(target, drafter, prompt, 8, SamplingConfig(T), None, torch.Generator(device=dev).manual_seed(1))
        r = speculative_generate(target, drafter, prompt, shape.new_tokens, SamplingConfig(T), None,
                                 torch.Generator(device=dev).manual_seed(0))
        loop = sum(v for k, v in r.seconds.items() if k != "prefill")
        rounds = len(r.emitted_per_round)
        out[f"T{T:g}"] = {"tau": sum(r.emitted_per_round) / rounds, "rounds": rounds, "round_ms": 1e3 * loop / rounds,
                          "draft_share": r.seconds["draft"] / loop, "verify_share": r.seconds["verify"] / loop,
                          "overhead_share": (r.seconds["schedule"] + r.seconds["other"]) / loop,
                          "overhead_ms_per_round": 1e3 * (r.seconds["schedule"] + r.seconds["other"]) / rounds}
    return out


def implied_speedup(costs: dict, overhead_ms: float, taus: tuple[float, ...] = (2.0, 3.0, 5.0)) -> dict:
    """tau x t_step / (t_draft + t_verify(g+1) + t_overhead) per tau: what the measured costs imply for a drafter of
    that acceptance at batch 1 (not measured: these random drafters are not accepted)."""
    round_ms = costs["draft_ms"] + costs["verify_ms"] + overhead_ms
    return {f"tau_{tau:g}": tau * costs["step_ms"] / round_ms for tau in taus}


def decoding_physics(shape: CheckShape, device: torch.device) -> dict:
    """The decoding section (module docstring), with the draft's cost measured again for a drafter with a reduced
    draft vocabulary (its own LM head over ``draft_vocab`` tokens); the target is freed before returning."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = random_target(shape, device, dtype)
    drafter = random_dspark(shape, target.config, target.model.get_input_embeddings(), target.lm_head, device).to(dtype).eval()
    cost = VerifyCostModel.profile(target, max_rows=shape.verify_rows, max_width=shape.verify_widths,
                                   context=shape.verify_context_tokens, repeats=shape.repeats)
    t11 = cost.seconds[0][0]
    costs = step_verify_draft(target, drafter, shape.draft_contexts_tokens, shape.repeats)
    split = loop_split(target, drafter, shape)
    kern = kernel_seconds(drafter, 1, shape.repeats)
    round_s = split["T1"]["round_ms"] / 1e3
    overhead = split["T1"]["overhead_ms_per_round"]
    result = {
        "target_parameters": sum(p.numel() for p in target.model.parameters()), "dtype": str(dtype).removeprefix("torch."),
        "drafter_parameters": sum(p.numel() for n, p in drafter.named_parameters() if "embed_tokens" not in n and "lm_head" not in n),
        "verify_cost": {"context_tokens": shape.verify_context_tokens, "rows": cost.rows, "widths": cost.widths,
                        "t11_ms": 1e3 * t11, "ratio": [[s / t11 for s in line] for line in cost.seconds]},
        "by_context": costs, "loop": split,
        "kernels": {**{f"{k}_ms": 1e3 * v for k, v in kern.items() if k != "triton"}, "triton": kern["triton"],
                    "share_of_round_T1": (kern["markov_walk"] + kern["verify"]) / round_s},
        "implied_speedup": {ctx: implied_speedup(c, overhead) for ctx, c in costs.items()},
    }
    del drafter
    free_memory()
    reduced = random_dspark(shape, target.config, target.model.get_input_embeddings(), target.lm_head, device,
                            random_draft_vocab(shape)).to(dtype).eval()
    reduced_costs = step_verify_draft(target, reduced, shape.draft_contexts_tokens, shape.repeats)
    result["reduced_vocab"] = {"draft_vocab": shape.draft_vocab, "by_context": reduced_costs,
                               "implied_speedup": {ctx: implied_speedup(c, overhead) for ctx, c in reduced_costs.items()}}
    del target, reduced
    free_memory()
    return result


# ----------------------------------------------------------------------------- training: speed and memory
def train_config(shape: CheckShape, device: torch.device, loss: LossConfig | None = None) -> TrainStageConfig:
    """The recipe's optimiser and DeepSpeed ZeRO-2 (bf16 on CUDA, fp32 on a CPU), one micro-batch per step."""
    return TrainStageConfig(cache_dir="unused", micro_batch_size=1, global_batch_size=1, loss=loss or LossConfig(),
                            optim=OptimConfig(warmup_ratio=0.0), target=TargetConfig(name_or_path="random", device=device.type),
                            deepspeed=DeepSpeedConfig(zero_stage=2, precision="bf16" if device.type == "cuda" else "fp32"))


def build_training(shape: CheckShape, device: torch.device, reduced_vocab: bool, loss: LossConfig | None = None):
    """A DeepSpeed engine over DrafterWithLoss(random DSpark) with random frozen embedding and LM head -> (engine, trainable)."""
    from torch import nn

    from deepspec import distributed
    from deepspec.training.engine import build_engine

    distributed.init_process_group(single_process=True)
    torch.manual_seed(0)
    with torch.device(device):
        embed = nn.Embedding(shape.vocab, shape.hidden).requires_grad_(False)
        head = nn.Linear(shape.hidden, shape.vocab, bias=False).requires_grad_(False)
    drafter = random_dspark(shape, qwen3_config(shape), embed, head, device, random_draft_vocab(shape) if reduced_vocab else None)
    cfg = train_config(shape, device, loss)
    engine, _ = build_engine(DrafterWithLoss(drafter, "block", cfg.loss), cfg, total_steps=10**6, world=1)
    return engine, sum(p.numel() for p in drafter.parameters() if p.requires_grad)


def train_step(engine, batch: dict) -> float:
    """One optimizer step on one micro-batch -> its loss (a host sync)."""
    out = engine(batch, 0)
    engine.backward(out["loss"])
    engine.step()
    return float(out["loss"].detach())


def step_flops(engine, batch: dict) -> tuple[int | None, str | None]:
    """FLOPs of one forward + backward, counted by torch per executed op (recomputed loss chunks included: hardware
    FLOPs, not model FLOPs); the optimizer's elementwise work is not counted. -> (flops, None), or (None, the error)
    where counting fails (the step then runs uncounted: the timing does not depend on it)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            out = engine(batch, 0)
            engine.backward(out["loss"])
        engine.step()
        return counter.get_total_flops(), None
    except Exception as e:  # noqa: BLE001 - a counting failure costs the TFLOP/s figure, not the section
        engine.zero_grad()
        train_step(engine, batch)
        return None, f"{type(e).__name__}: {e}"[:300]


def peak_gib(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak allocated GiB while ``fn`` runs (None on a CPU: torch keeps no allocator statistics there)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / GIB


def training_speed(shape: CheckShape, device: torch.device, reduced_vocab: bool) -> dict:
    """tokens/s, peak memory, achieved TFLOP/s and MFU of ``train_steps`` steps of one sample of ``train_seq_tokens``."""
    engine, trainable = build_training(shape, device, reduced_vocab)
    batch = random_batch(shape, 1, shape.train_seq_tokens, device)
    flops, flop_error = step_flops(engine, batch)  # the first step: optimizer states, kernels and caches are made here
    train_step(engine, batch)  # a warm one
    losses: list[float] = []
    sync(device)
    t = time.perf_counter()
    peak = peak_gib(device, lambda: losses.extend(train_step(engine, batch) for _ in range(shape.train_steps)))
    step_s = (time.perf_counter() - t) / shape.train_steps
    peak_tflops = device_info(device)["bf16_peak_tflops"]
    tflops = flops / step_s / 1e12 if flops else None
    result = {"trainable_parameters": trainable, "draft_vocab": shape.draft_vocab if reduced_vocab else shape.vocab,
              "seq_tokens": shape.train_seq_tokens, "anchors": shape.anchors, "steps_timed": shape.train_steps,
              "step_s": step_s, "tokens_per_s": shape.train_seq_tokens / step_s,
              "block_tokens_per_s": shape.anchors * shape.block / step_s, "peak_gib": peak,
              "flops_per_step": flops, "flop_count_error": flop_error, "achieved_tflops": tflops,
              "mfu": tflops / peak_tflops if tflops and peak_tflops else None,
              "loss_first_last": [losses[0], losses[-1]]}
    del engine
    free_memory()
    return result


def micro_batch_peaks(engine, shape: CheckShape, seq: int, device: torch.device) -> dict:
    """Peak memory at micro-batches 1 and 2 (one step each) and the largest micro-batch a linear fit of the two predicts
    within 95% of the device's memory (None on a CPU)."""
    peaks = {b: peak_gib(device, lambda b=b: train_step(engine, random_batch(shape, b, seq, device))) for b in (1, 2)}
    out = {"seq_tokens": seq, "peak_gib_micro_1": peaks[1], "peak_gib_micro_2": peaks[2], "predicted": None}
    if device.type == "cuda":
        per_sample, fixed = peaks[2] - peaks[1], 2 * peaks[1] - peaks[2]
        out["predicted"] = int((0.95 * device_info(device)["memory_gib"] - fixed) / max(per_sample, 1e-9))
    return out


def confirm_micro_batch(engine, shape: CheckShape, probe: dict, device: torch.device) -> dict:
    """One step at the predicted micro-batch (capped at ``memory_max_micro``): the largest that fits, confirmed, or the
    failure. Any error is recorded, not raised: an out-of-memory step can leave DeepSpeed's buckets half filled."""
    if probe["predicted"] is None:
        return {**probe, "largest_micro_batch": None, "confirmed": None}
    tried = max(1, min(probe["predicted"], shape.memory_max_micro))
    try:
        peak = peak_gib(device, lambda: train_step(engine, random_batch(shape, tried, probe["seq_tokens"], device)))
        return {**probe, "largest_micro_batch": tried, "confirmed": True, "peak_gib": peak,
                "capped": probe["predicted"] > shape.memory_max_micro}
    except Exception as e:  # noqa: BLE001 - the finding is the failure itself
        engine.zero_grad()
        free_memory()
        return {**probe, "largest_micro_batch": 2, "confirmed": False, "failed_at": tried, "error": f"{type(e).__name__}: {e}"[:300]}


def training_memory(shape: CheckShape, device: torch.device) -> dict:
    """One sample's step with the loss chunked (32 blocks' logits at a time, recomputed in backward: the default)
    against unchunked (every block's logits at once, kept for backward); then per sequence length the peaks at
    micro-batches 1 and 2, and last, one confirming step per length at the largest predicted micro-batch."""
    engine, _ = build_training(shape, device, reduced_vocab=False)
    module = engine.module
    batch = random_batch(shape, 1, shape.train_seq_tokens, device)
    train_step(engine, batch)
    chunked = peak_gib(device, lambda: train_step(engine, batch))
    module.loss_cfg = replace(module.loss_cfg, chunk_blocks=10**9, recompute_logits=False)
    try:
        unchunked = peak_gib(device, lambda: train_step(engine, batch))
    except torch.OutOfMemoryError:
        engine.zero_grad()
        free_memory()
        unchunked = float("inf")
    module.loss_cfg = LossConfig()
    del batch
    probes = [micro_batch_peaks(engine, shape, seq, device) for seq in shape.memory_seq_tokens]
    result = {"loss_chunking": {"seq_tokens": shape.train_seq_tokens, "anchors": shape.anchors, "chunked_peak_gib": chunked,
                                "unchunked_peak_gib": unchunked,
                                "saved_gib": None if chunked is None else unchunked - chunked},
              "micro_batch": [confirm_micro_batch(engine, shape, probe, device) for probe in probes]}
    del engine, module
    free_memory()
    return result


def shape_dict(shape: CheckShape) -> dict:
    return asdict(shape)
