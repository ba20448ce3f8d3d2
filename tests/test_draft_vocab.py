"""Reduced draft vocabulary (``drafter.draft_vocab_size``): the map from a cache, losses against a brute-force
full-vocabulary computation, lossless decoding (greedy equality and the exact law at T=1), the Markov walk's
kernel, export -> loader checks -> reload, and a short run of the train entry point."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, data_config
from deepspec.config.base import ConfigError
from deepspec.config.data import InputConfig, TargetConfig
from deepspec.config.train import LossConfig, TrainStageConfig
from deepspec.decoding import kernels
from deepspec.decoding.kernels import reference
from deepspec.decoding.speculative import autoregressive_generate, speculative_generate
from deepspec.decoding.verify import SamplingConfig
from deepspec.drafters import DFlashConfig, DFlashDrafter, DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from deepspec.drafters.blocks import make_blocks, sample_anchors
from deepspec.drafters.draft_vocab import DraftVocab
from deepspec.export import export_drafter, load_drafter
from deepspec.losses import block_draft_loss, eagle3_loss
from deepspec.serving_loaders import check_export
from deepspec.target import TargetModel, load_frozen_embeddings, load_tokenizer
from deepspec.training.trainer import build_drafter
from test_drafters import LAYERS, MASK_ID, batch, parts  # noqa: F401  (fixture re-used)
from test_exact_law import chi2_pvalue, draw, exact_law, tiny  # noqa: F401  (fixture re-used)
from test_speculative import TOY, prompts

V = 4096


def random_vocab(n: int, seed: int = 0, vocab_size: int = V) -> DraftVocab:
    return DraftVocab(torch.sort(torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:n]).values, vocab_size)


def reduced(kind: str, parts, vocab: DraftVocab):  # noqa: F811
    tc, embed, head = parts
    torch.manual_seed(0)
    if kind == "dflash":
        m = DFlashDrafter(DFlashConfig(block_size=4, num_hidden_layers=1, num_anchors=6, mask_token_id=MASK_ID, target_layer_ids=LAYERS,
                                       draft_vocab_size=vocab.size), tc, embed, head, vocab)
    elif kind == "eagle3":
        m = Eagle3Drafter(Eagle3Config(ttt_steps=3, target_layer_ids=LAYERS, draft_vocab_size=vocab.size), tc, embed, head, vocab)
    else:
        m = DSparkDrafter(DSparkConfig(block_size=4, num_hidden_layers=1, markov_rank=8, markov_head_type=kind, num_anchors=6,
                                       mask_token_id=MASK_ID, target_layer_ids=LAYERS, draft_vocab_size=vocab.size), tc, embed, head, vocab)
    for p in m.parameters():  # away from the init (the reduced head starts as the target's rows)
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    return m


# ---------------------------------------------------------------------------------------------- the map
def test_the_map_is_the_most_frequent_ids_ties_by_id_sorted_with_offset_d2t(tmp_path):
    counts = torch.tensor([5, 3, 5, 0, 3, 9, 0, 3])
    vocab = DraftVocab.from_counts(counts, 4)
    assert vocab.draft_ids.tolist() == [0, 1, 2, 5]  # 9, 5, 5, then the first of the three 3s
    assert vocab.d2t.dtype == torch.int64 and vocab.d2t.tolist() == [0, 0, 0, 2]  # target = draft + d2t[draft]
    assert vocab.t2d.dtype == torch.bool and vocab.t2d.tolist() == [True, True, True, False, False, True, False, False]
    back = DraftVocab.load(vocab.save(tmp_path / "map.safetensors", counts), 8)
    assert torch.equal(back.draft_ids, vocab.draft_ids)
    save_file({"d2t": vocab.d2t, "t2d": ~vocab.t2d}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="t2d"):
        DraftVocab.load(tmp_path / "bad.safetensors", 8)


@pytest.fixture(scope="module")
def small_cache(tiny_target, chat_jsonl, tmp_path_factory) -> Path:
    """12 samples from the tiny target, one per row group."""
    from deepspec.data.build import build_cache

    out = tmp_path_factory.mktemp("vocab_cache")
    build_cache(data_config(tiny_target, [chat_jsonl], out, input={"max_rows": 12}, max_length=128,
                            cache={"rows_per_row_group": 1, "samples_per_shard": 4}))
    return out


def test_label_counts_of_a_cache_are_the_training_labels(small_cache):
    from deepspec.data.cache.reader import TargetCacheDataset
    from deepspec.data.cache.token_counts import supervised_token_counts

    expected = torch.zeros(V, dtype=torch.int64)
    for s in TargetCacheDataset(small_cache, shuffle=False, prefetch=0, split="train", val_fraction=0.25, rank=0, world_size=1):
        labels = s["input_ids"][1:][s["loss_mask"][1:].bool()]  # the tokens a drafter is trained to predict
        expected += torch.bincount(labels.long(), minlength=V)
    assert 0 < int(expected.sum()) < 12 * 128
    assert torch.equal(supervised_token_counts(small_cache, V, 0.25), expected)
    shares = [supervised_token_counts(small_cache, V, 0.25, rank=r, world=2) for r in range(2)]  # what each rank counts
    assert torch.equal(shares[0] + shares[1], expected) and int(shares[0].sum()) and int(shares[1].sum())


def test_config_errors_name_the_key(tiny_target):
    from deepspec.config.base import check

    for bad in (0, -3, "many", 1.5):
        cfg = TrainStageConfig(cache_dir="x", drafter={"name": "dspark", "draft_vocab_size": bad})
        with pytest.raises(ConfigError, match=r"drafter\.draft_vocab_size"):
            check(cfg)
    with pytest.raises(ConfigError, match=r"drafter\.draft_vocab_file"):
        check(TrainStageConfig(online=True, input=InputConfig(paths=["x.jsonl"]), drafter={"name": "dspark", "draft_vocab_size": 8}))
    too_big = TrainStageConfig(cache_dir="x", target=TargetConfig(name_or_path=str(tiny_target), layer_ids=LAYERS, mask_token_id=3),
                               drafter={"name": "dflash", "draft_vocab_size": V + 1})
    with pytest.raises(ConfigError, match=rf"drafter\.draft_vocab_size={V + 1} must be in \[1, the target's vocab_size {V}\]"):
        build_drafter(too_big, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- losses
def scattered(model, logits_d: torch.Tensor) -> torch.Tensor:
    """The drafter's law over the full vocabulary, by hand: zeros outside the draft ids."""
    q = torch.zeros(*logits_d.shape[:-1], V)
    q[..., model.d2t + torch.arange(len(model.d2t))] = torch.softmax(logits_d.float(), -1)
    return q


@pytest.mark.parametrize("kind", ["vanilla", "rnn", "dflash"])
def test_block_loss_equals_the_full_vocabulary_brute_force(parts, kind):  # noqa: F811
    model = reduced(kind, parts, random_vocab(1500))
    ids, loss_mask, valid, hidden = batch()  # labels drawn from 5..4000: about 60% fall outside the draft vocabulary
    target_final = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(5)) * 0.3
    anchors, keep = sample_anchors(loss_mask, model.cfg.num_anchors, [1, 2])
    blocks = make_blocks(ids, loss_mask, anchors, keep, model.cfg.block_size, MASK_ID)
    h = model(hidden, valid, blocks)
    out = block_draft_loss(model, h, blocks, target_final, LossConfig(chunk_blocks=2))
    num, den, ce_den, outside, n = {"ce": 0.0, "l1": 0.0}, 0.0, 0.0, 0, 0
    acc = torch.zeros(model.cfg.block_size)
    B, A, g, _ = h.shape
    for b in range(B):
        for a in range(A):
            prev = model.prev_tokens(blocks.input_ids[b, a], blocks.labels[b, a])[None]
            q = scattered(model, model.logits(h[b, a][None], prev)[0])  # (g, V)
            for k in range(g):
                if not blocks.label_valid[b, a, k]:
                    continue
                w, label = math.exp(-k / 4.0), int(blocks.labels[b, a, k])
                p = torch.softmax(model.target_head(target_final[b, blocks.anchors[b, a] + k]).float(), -1)
                l1 = (q[k] - p).abs().sum()
                assert torch.allclose(1 - l1 / 2, torch.minimum(q[k], p).sum(), atol=1e-5)  # the true acceptance rate
                num["l1"] += w * l1
                acc[k] += torch.minimum(q[k], p).sum()
                den += w
                n += 1
                if q[k, label] > 0:
                    num["ce"] += w * -torch.log(q[k, label])
                    ce_den += w
                else:
                    outside += 1
    assert outside > 0 and ce_den > 0
    assert torch.allclose(out["l1"], num["l1"] / den, rtol=1e-5)
    assert torch.allclose(out["ce"], num["ce"] / ce_den, rtol=1e-5)
    assert torch.allclose(out["acc_sum"], acc, rtol=1e-5)
    assert math.isclose(float(out["label_outside_draft_vocab"]), outside / n, rel_tol=1e-6)
    grads = torch.autograd.grad(out["loss"], [model.lm_head.weight, model.fc.weight])
    assert all(float(gr.abs().sum()) > 0 for gr in grads) and not model.target_head.weight.requires_grad


def test_eagle3_soft_ce_is_against_the_renormalised_target_on_the_draft_vocabulary(parts):  # noqa: F811
    model = reduced("eagle3", parts, random_vocab(1500))
    ids, loss_mask, valid, hidden = batch()
    target_final = torch.randn(2, 30, 64) * 0.3
    h = model(hidden, ids, valid)
    out = eagle3_loss(model, h, loss_mask * valid, valid, target_final, LossConfig(chunk_positions=7), step_decay=0.8)
    draft_ids = model.d2t + torch.arange(len(model.d2t))
    total, acc = 0.0, torch.zeros(3)
    B, K, S, _ = h.shape
    for k in range(K):
        ces = []
        for b in range(B):
            for t in range(S):
                if t + k + 1 < S and loss_mask[b, t + k] and valid[b, t + k] and valid[b, t + k + 1]:  # DeepSpec's rule
                    p = torch.softmax(model.target_head(target_final[b, t + 1 + k]).float(), -1)
                    logits_d = model.lm_head(h[b, k, t]).float()
                    soft = p[draft_ids] / p[draft_ids].sum()
                    ces.append(-(soft * torch.log_softmax(logits_d, -1)).sum())
                    acc[k] += torch.minimum(scattered(model, logits_d), p).sum()
        total = total + 0.8**k * torch.stack(ces).sum() / (B * S)  # local_mean: each step / batch x padded length
    assert torch.allclose(out["loss"], total, rtol=1e-5)
    assert torch.allclose(out["acc_sum"], acc, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- the Markov walk
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
def test_the_walk_feeds_target_ids_to_w1_in_the_reference_and_the_triton_kernel(temperature):
    N, g, Vt, R = 3, 4, 300, 16
    vocab = random_vocab(120, 1, Vt)
    gen = torch.Generator().manual_seed(0)
    base, w1 = torch.randn(N, g, vocab.size, generator=gen), torch.randn(Vt, R, generator=gen)  # W1 rows: target ids
    w2 = torch.randn(vocab.size, R, generator=gen)  # W2 rows: draft ids
    x0, noise = torch.randint(Vt, (N,), generator=gen), reference.gumbel(torch.rand(N, g, vocab.size, generator=gen))
    noise = None if temperature == 0 else noise
    if temperature:  # the CPU's walk by inversion: each slot's logits from the previous drawn *target* id
        tokens, logits, _ = reference.markov_walk_by_inversion(base, w1, w2, x0, temperature, torch.rand(N, g, generator=gen), vocab.d2t)
        assert bool(vocab.t2d[tokens].all())
        prev = torch.cat([x0[:, None], tokens[:, :-1]], dim=1)
        assert torch.allclose(logits, base + w1[prev] @ w2.T, atol=1e-4)
    tokens, logits = reference.markov_walk(base, w1, w2, x0, temperature, noise, vocab.d2t)
    assert bool(vocab.t2d[tokens].all())  # target ids, every one in the draft vocabulary
    if kernels.triton_kernels is None:
        pytest.skip("triton not installed: the reference walks were checked, not the kernel")
    x = x0
    for k in range(g):  # by hand: the slot's logits from the previous *target* id, its argmax a draft id
        noise_k = None if noise is None else noise[:, k]
        tok, lk_triton = kernels.triton_kernels.markov_step(base[:, k], w1, w2, x, temperature, noise_k, block=64)
        lk = base[:, k] + w1[x] @ w2.T
        key = lk if temperature == 0 else lk / temperature + noise_k
        x = vocab.draft_ids[key.argmax(-1)]
        assert torch.allclose(lk, logits[:, k], atol=1e-4) and torch.allclose(lk_triton, logits[:, k], atol=1e-4)
        assert torch.equal(x, tokens[:, k]) and torch.equal(vocab.draft_ids[tok], tokens[:, k])
    if noise is not None:  # the dispatcher's per-slot Triton loop maps ids the same way
        monkey = kernels.use_triton
        kernels.use_triton = lambda t: True
        try:
            got = kernels.markov_walk(base, w1, w2, x0, temperature, noise, vocab.d2t)
        finally:
            kernels.use_triton = monkey
        assert torch.equal(got[0], tokens) and torch.allclose(got[1], logits, atol=1e-4)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def toy():
    return TargetModel.from_config(TOY), load_tokenizer(TOY)


TOY_DRAFTERS = {"dspark": {"name": "dspark", "block_size": 5, "num_hidden_layers": 1, "markov_rank": 16},
                "dflash": {"name": "dflash", "block_size": 5, "num_hidden_layers": 1},
                "eagle3": {"name": "eagle3", "ttt_steps": 4}}


@pytest.mark.parametrize("name", ["dspark", "dflash", "eagle3"])
def test_greedy_speculative_with_a_reduced_vocabulary_equals_plain_greedy(toy, tmp_path, name):
    target, tok = toy
    map_file = random_vocab(1024, 3).save(tmp_path / "map.safetensors")
    dcfg = {**TOY_DRAFTERS[name], "draft_vocab_size": 1024, "draft_vocab_file": str(map_file)}
    drafter, _ = build_drafter(TrainStageConfig(target=TOY, drafter=dcfg, cache_dir="x"), torch.device("cpu"))
    assert drafter.lm_head.weight.shape[0] == 1024 and drafter.d2t is not None
    greedy = SamplingConfig(temperature=0)
    accepted = 0
    for ids in prompts(tok, 3):
        ref = autoregressive_generate(target, ids, 40, greedy, eos_token_id=tok.eos_token_id)
        got = speculative_generate(target, drafter.eval(), ids, 40, greedy, eos_token_id=tok.eos_token_id)
        assert got.tokens == ref.tokens
        accepted += sum(got.accepted_per_round)
    if name != "eagle3":  # block drafters' drafts (target rows over a random backbone) are accepted at times: ids map right
        assert accepted > 0


def tiny_reduced(kind: str, tiny):  # noqa: F811
    """A random drafter over 4 of the 6 tokens of test_exact_law's target (ids 0, 2, 3, 5)."""
    _, tcfg, cfg = tiny
    embed, head = load_frozen_embeddings(tcfg)
    vocab = DraftVocab(torch.tensor([0, 2, 3, 5]), 6)
    torch.manual_seed(1)
    if kind == "dflash":
        d = DFlashDrafter(DFlashConfig(block_size=3, num_hidden_layers=1, mask_token_id=5, target_layer_ids=[0, 1], draft_vocab_size=4),
                          cfg, embed, head, vocab)
    elif kind == "eagle3":
        d = Eagle3Drafter(Eagle3Config(ttt_steps=3, target_layer_ids=[0, 1], draft_vocab_size=4), cfg, embed, head, vocab)
    else:
        d = DSparkDrafter(DSparkConfig(block_size=3, num_hidden_layers=1, markov_rank=4, markov_head_type=kind, mask_token_id=5,
                                       target_layer_ids=[0, 1], draft_vocab_size=4), cfg, embed, head, vocab)
    for p in d.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.6)
    return d.eval()


LAW_CASES = [("vanilla", SamplingConfig(1.0)),  # the fused walk, reduced
             ("gated", SamplingConfig(0.7, top_k=3)),  # the unfused walk
             ("eagle3", SamplingConfig(1.0)),
             ("dflash", SamplingConfig(0.8, top_p=0.9))]


@pytest.mark.parametrize("kind,sampling", LAW_CASES, ids=[k for k, _ in LAW_CASES])
def test_whole_generations_follow_the_target_law_with_a_reduced_vocabulary(tiny, kind, sampling):  # noqa: F811
    """The chi-square harness of test_exact_law: tokens outside the draft vocabulary come from the residual only."""
    samples = draw(tiny, tiny_reduced(kind, tiny), sampling)
    outside_seen = False
    for prompt, got in zip([torch.tensor([1, 2, 3]), torch.tensor([4, 0, 1, 5, 2])], samples):
        law = exact_law(tiny[0], prompt, sampling)
        p = chi2_pvalue(got, law)
        assert p > 1e-4, (kind, p)
        outside_seen |= any(t in (1, 4) for s in got for t in s)
    assert outside_seen  # tokens the drafter cannot propose were generated (from the residual) and counted


# ---------------------------------------------------------------------------------------------- export
def train_cfg(tiny_target, drafter: dict) -> TrainStageConfig:
    return TrainStageConfig(target=TargetConfig(name_or_path=str(tiny_target), layer_ids=LAYERS, mask_token_id=3), drafter=drafter,
                            cache_dir="unused")


EXPORT_DRAFTERS = {"dspark": {"name": "dspark", "block_size": 4, "num_hidden_layers": 1, "markov_rank": 16},
                   "dflash": {"name": "dflash", "block_size": 4, "num_hidden_layers": 1},
                   "eagle3": {"name": "eagle3", "ttt_steps": 3},
                   # without QK-norm: LlamaForCausalLMEagle3, read by all three engines (QK-normed: vLLM's Qwen3 class only)
                   "eagle3_llama": {"name": "eagle3", "ttt_steps": 3, "qk_norm": False}}
# Loaders that always use the target's LM head (no d2t): a reduced export does not load as trained there
FULL_VOCAB_ONLY = {"SGLang dspark", "SGLang dflash", "TensorRT-LLM dflash"}


@pytest.mark.parametrize("include_frozen", [True, False])
@pytest.mark.parametrize("name", ["dspark", "dflash", "eagle3", "eagle3_llama"])
def test_reduced_export_meets_the_loaders_and_reloads_with_identical_logits(tiny_target, tmp_path, name, include_frozen):
    map_file = random_vocab(700, 2).save(tmp_path / "map.safetensors")
    cfg = train_cfg(tiny_target, {**EXPORT_DRAFTERS[name], "draft_vocab_size": 700, "draft_vocab_file": str(map_file)})
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    for p in drafter.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.1)
    out = export_drafter(drafter, tmp_path / "export", include_frozen=include_frozen, target=cfg.target)
    config, tensors = json.loads((out / "config.json").read_text()), load_file(out / "model.safetensors")
    assert config["draft_vocab_size"] == 700 and config["vocab_size"] == V
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool and tensors["lm_head.weight"].shape == (700, 64)
    assert torch.equal(tensors["d2t"], DraftVocab.load(map_file, V).d2t) and not any(k.startswith("target_lm_head") for k in tensors)
    if name == "dspark":
        assert tensors["markov_head.markov_w2.weight"].shape == (700, 16) and tensors["markov_head.markov_w1.weight"].shape == (V, 16)
    for loader, problems in check_export(out).items():
        if name == "eagle3" and loader != "vLLM eagle3":  # Eagle3Qwen3ForCausalLM: no SGLang/TensorRT-LLM class reads it
            assert problems and any("architectures" in p for p in problems), (loader, problems)
        elif loader in FULL_VOCAB_ONLY:
            assert problems and all("full vocabulary" in p or "mask slots only" in p for p in problems), (loader, problems)
        elif name == "dflash" and loader == "vLLM dflash":  # anchor-first blocks: one position off there
            assert problems and all("mask slots only" in p for p in problems), (loader, problems)
        else:
            assert problems == [], (loader, problems)
    assert check_export(out).get("vLLM dspark", []) == []
    loaded = load_drafter(out, target=None if include_frozen else cfg.target)
    ids, loss_mask, valid, hidden = batch()
    with torch.no_grad():
        if name.startswith("eagle3"):
            a, b = (m.lm_head(m(hidden, ids, valid)) for m in (drafter.eval(), loaded))
        else:
            anchors, keep = sample_anchors(loss_mask, 6, [1, 2])
            blocks = make_blocks(ids, loss_mask, anchors, keep, 4, MASK_ID)
            prev = drafter.prev_tokens(blocks.input_ids, blocks.labels).flatten(0, 1)
            a, b = (m.logits(m(hidden, valid, blocks).flatten(0, 1), prev) for m in (drafter.eval(), loaded))
    assert a.shape[-1] == 700 and torch.equal(a, b)
    assert torch.equal(loaded.d2t, drafter.d2t) and torch.equal(loaded.t2d, drafter.t2d)


def test_a_reduced_export_without_d2t_or_with_a_full_size_head_is_refused(tiny_target, tmp_path):
    map_file = random_vocab(700, 2).save(tmp_path / "map.safetensors")
    cfg = train_cfg(tiny_target, {**EXPORT_DRAFTERS["dspark"], "draft_vocab_size": 700, "draft_vocab_file": str(map_file)})
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    out = export_drafter(drafter, tmp_path / "export", target=cfg.target)
    tensors = load_file(out / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "d2t"}, str(out / "model.safetensors"))
    assert any("d2t" in p for p in check_export(out)["vLLM dspark"])
    save_file({**tensors, "lm_head.weight": torch.zeros(V, 64)}, str(out / "model.safetensors"))
    assert any("d2t" in p for p in check_export(out)["vLLM dspark"])  # lm_head must have draft_vocab_size rows


def test_full_vocabulary_exports_are_unchanged(tiny_target, tmp_path):
    drafter, _ = build_drafter(train_cfg(tiny_target, EXPORT_DRAFTERS["dspark"]), torch.device("cpu"))
    assert drafter.d2t is None and "d2t" not in drafter.state_dict() and not drafter.lm_head.weight.requires_grad
    out = export_drafter(drafter, tmp_path / "export")
    assert "draft_vocab_size" not in json.loads((out / "config.json").read_text())
    assert not {"d2t", "t2d"} & set(load_file(out / "model.safetensors"))


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("ranks, zero_stage", [(1, 0), (2, 3)])
def test_the_train_entry_point_trains_and_exports_a_reduced_vocabulary(tiny_target, small_cache, tmp_path, ranks, zero_stage):
    """One process, and 2 ranks under ZeRO-3: each rank counts its share of the labels and the summed counts give every
    rank the same map (the one a single pass over the cache gives); the export gathers the partitioned reduced head."""
    import subprocess
    import sys

    from deepspec.data.cache.token_counts import supervised_token_counts

    run_dir = tmp_path / "run"
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ranks > 1 else [])
    cmd = [*launcher, str(REPO / "train" / "train.py"), f"target.name_or_path={tiny_target}", "target.layer_ids=[-1,1,3]",
           "target.mask_token_id=3", f"cache_dir={small_cache}", f"run_dir={run_dir}", "drafter=dspark_debug",
           "drafter.draft_vocab_size=256", "deepspeed.precision=fp32", f"deepspeed.zero_stage={zero_stage}", "logging.progress=false",
           "logging.every_steps=1", "eval.val_fraction=0", "max_steps=3", "global_batch_size=2", "micro_batch_size=1",
           "checkpoint.every_steps=100"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = DraftVocab.from_counts(supervised_token_counts(small_cache, V), 256)
    run_map = DraftVocab.load(run_dir / "draft_vocab.safetensors", V)
    exported = load_file(run_dir / "export" / "model.safetensors")
    assert torch.equal(run_map.draft_ids, expected.draft_ids) and torch.equal(exported["d2t"], expected.d2t)
    assert check_export(run_dir / "export")["vLLM dspark"] == []
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["label_outside_draft_vocab"] < 1 for r in logs if "loss" in r)
    loaded = load_drafter(run_dir / "export")
    assert loaded.lm_head.weight.shape == (256, 64) and torch.equal(loaded.lm_head.weight, exported["lm_head.weight"])
