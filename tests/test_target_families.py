"""The target returns what HF's own model returns, per family: Gemma-2's final-logit soft-capping
is applied wherever the engine, the cache or the losses compute the target's logits. The drafters
compute what vLLM's drafters compute (bare embedding rows, uncapped draft logits; docs/targets.md),
and every family that can have a drafter runs cache -> train -> export -> reload -> decode."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_FILES, TOY_DIR
from deepspec.config.data import TargetConfig
from deepspec.decoding.speculative import autoregressive_generate, speculative_generate
from deepspec.decoding.verify import SamplingConfig
from deepspec.target import TargetModel, final_logit_softcap


# Layers 0-2 gated delta-nets (a recurrent and a conv state each), layer 3 attention, as the real models' 3:1 pattern.
HYBRID = {"linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_num_value_heads": 4, "linear_value_head_dim": 16}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}


def family_classes(family: str):
    """(config class, model class, family-specific config fields) of a tiny random text model."""
    import transformers as T

    return {
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"tie_word_embeddings": True}),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"final_logit_softcapping": 2.0, "attn_logit_softcapping": 50.0,
                                                         "sliding_window": 8, "query_pre_attn_scalar": 32}),
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 8}),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"sliding_window": 8, "query_pre_attn_scalar": 32}),
        # 12B-like: global layers with wider heads (64 vs 32) and one shared K=V head, soft-capped logits, no per-layer input
        "gemma4": (T.Gemma4TextConfig, T.Gemma4ForCausalLM, {"sliding_window": 8, "global_head_dim": 64, "num_global_key_value_heads": 1,
                                                             "attention_k_eq_v": True, "hidden_size_per_layer_input": 0,
                                                             "final_logit_softcapping": 2.0}),
        "qwen3_5": (T.Qwen3_5TextConfig, T.Qwen3_5ForCausalLM, HYBRID),  # hybrid: gated delta-net (linear attention) layers
        "qwen3_5_moe": (T.Qwen3_5MoeTextConfig, T.Qwen3_5MoeForCausalLM, HYBRID | MOE),
        "qwen3_next": (T.Qwen3NextConfig, T.Qwen3NextForCausalLM, HYBRID | MOE),
    }[family]


FAMILIES = ["qwen3", "gemma2", "llama", "mistral", "qwen3_moe", "gemma3", "gemma4", "qwen3_5", "qwen3_5_moe", "qwen3_next"]
def save_tiny(path: Path, family: str) -> Path:
    common = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    config_cls, model_cls, extra = family_classes(family)
    torch.manual_seed(0)
    model = model_cls(config_cls(**common, **extra))
    path.mkdir(parents=True)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(TOY_DIR / f, path / f)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_target_logits_and_layers_equal_hf(tmp_path, family):
    """Every family's logits and chosen layers (embedding output, layer outputs) are HF's own, to fp32 tolerance:
    embedding scaling (Gemma), sliding windows, MoE routing, hybrid linear attention (Qwen3.5) included."""
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / family, family)
    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=[-1, 0, 2], dtype="float32", device="cpu",
                                                  attn_implementation="eager"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(4, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    layers, final = target(ids, torch.ones_like(ids))
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
    hs = out.hidden_states  # hs[0] = embedding output, hs[i + 1] = layer i's output (the last one is after the norm)
    torch.testing.assert_close(layers, torch.cat([hs[0], hs[1], hs[3]], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.logits(final), out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,cap", [("gemma2", 2.0), ("gemma4", 2.0), ("qwen3", None)])
def test_target_logits_equal_hf_logits(tmp_path, family, cap):
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / family, family)
    attn = "eager" if family == "gemma2" else "sdpa"  # HF: Gemma-2's attention soft-capping has no sdpa path
    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=[0, 2], dtype="float32", device="cpu",
                                                  attn_implementation=attn))
    assert final_logit_softcap(target.model.config) == cap
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    ids = torch.randint(4, 4096, (2, 12))
    mask = torch.ones_like(ids)
    from transformers import DynamicCache

    _, final = target.decoder_with_positions(ids, mask, torch.arange(12).expand(2, 12), DynamicCache())
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(target.logits(final), expected, rtol=1e-5, atol=1e-5)
    if cap:
        assert (target.lm_head(final) - expected).abs().max() > 1e-2  # the raw head differs: the cap matters here


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_equals_plain_greedy_per_family(tmp_path, family):
    """The batched engine (KV cache with holes, crops, explicit positions) on every family: lossless."""
    from deepspec.drafters import DSparkConfig, DSparkDrafter
    from deepspec.target import load_frozen_embeddings

    path = save_tiny(tmp_path / family, family)
    tcfg = TargetConfig(name_or_path=str(path), layer_ids=[0, 2], dtype="float32", device="cpu", mask_token_id=3,
                        attn_implementation="eager")
    target = TargetModel.from_config(tcfg)
    embed, head = load_frozen_embeddings(tcfg)
    torch.manual_seed(1)
    drafter = DSparkDrafter(DSparkConfig(block_size=3, num_hidden_layers=1, markov_rank=8, target_layer_ids=[0, 2], mask_token_id=3),
                            target.model.config, embed, head).eval()
    from deepspec.decoding.target_cache import TargetCache
    from deepspec.losses import target_logits

    ids = torch.randint(4, 4096, (1, 6))
    _, final = target.decoder_with_positions(ids, torch.ones_like(ids), torch.arange(6)[None], TargetCache(target.config))
    torch.testing.assert_close(target_logits(drafter, final), target.logits(final))  # the losses' soft labels, capped too
    greedy = SamplingConfig(temperature=0)

    for n in (5, 9):
        prompt = torch.randint(4, 4096, (n,))
        assert speculative_generate(target, drafter, prompt, 20, greedy).tokens == autoregressive_generate(target, prompt, 20, greedy).tokens


@pytest.mark.parametrize("family", ["mistral", "gemma3", "qwen3_5"])
def test_ragged_batches_with_compacted_caches_equal_plain_greedy_per_family(tmp_path, family, monkeypatch):
    """Rows that accept different amounts leave holes, which the engine compacts (``_compact_holes``): each row's real
    slots keep their order, which a sliding window counts in (Mistral, Gemma-3), and recurrent layers (Qwen3.5) hold
    no slots to move. Sessions replay each row's plain continuation, corrupted at chosen offsets."""
    from deepspec.decoding.speculative import speculative_generate_batch
    from deepspec.decoding.target_cache import TargetCache
    from test_speculative import ReplaySession

    path = save_tiny(tmp_path / family, family)
    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=[0, 2], dtype="float32", device="cpu",
                                                  attn_implementation="eager"))
    greedy = SamplingConfig(temperature=0)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 4096, (n,), generator=gen) for n in (6, 11, 9)]
    refs = [autoregressive_generate(target, p, 28, greedy).tokens for p in prompts]
    gathers = []
    real = TargetCache.gather_slots
    monkeypatch.setattr(TargetCache, "gather_slots", lambda self, s: gathers.append(s.shape) or real(self, s))
    session = ReplaySession(refs, 5, [set(), set(range(99)), {1, 4, 8, 13, 19}], [len(p) for p in prompts])
    assert [r.tokens for r in speculative_generate_batch(target, session, prompts, 28, greedy)] == refs
    assert gathers, "no compaction happened"


def test_gemma4_variants_without_draft_layers_are_refused_by_name():
    """Gemma-4 drafters are built from the target's full-attention layer; the variants the reference's Gemma-4 drafters
    do not build either (MoE blocks: 26B-A4B; per-layer input gates: E2B/E4B) are refused naming the key, not built wrong."""
    import transformers as T

    from deepspec.drafters import DSparkConfig, DSparkDrafter

    for extra, key in (({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}, "enable_moe_block"),
                       ({"hidden_size_per_layer_input": 16}, "hidden_size_per_layer_input")):
        tc = T.Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, **{"hidden_size_per_layer_input": 0, **extra})
        with pytest.raises(ValueError, match=f"gemma4_text.*{key}"):
            DSparkDrafter(DSparkConfig(block_size=3, num_hidden_layers=1, markov_rank=8, target_layer_ids=[0], mask_token_id=3),
                          tc, torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False))


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def test_hybrid_targets_are_verified_not_refused(tmp_path, family):
    """Gated delta-net layers are rolled back per row (deepspec/decoding/target_cache.py), so no hybrid family that
    transformers runs is refused; the engine's cache has a rollback-capable layer for each linear-attention layer."""
    from deepspec.decoding.speculative import check_speculative_support
    from deepspec.decoding.target_cache import TargetCache

    target = TargetModel.from_config(TargetConfig(name_or_path=str(save_tiny(tmp_path / family, family)), layer_ids=[0, 2],
                                                  dtype="float32", device="cpu"))
    check_speculative_support(target)
    assert TargetCache(target.config).recurrent == [0, 1, 2]


# ----------------------------------------------------------------------------- what a drafter sees (docs/targets.md)
DRAFT_LAYER_IDS = [-1, 1, 3]  # the tiny targets have 4 layers; three ids also suit SGLang's Eagle3 loader


def tiny_drafter(path: Path, name: str):
    """The drafter ``name`` (tests/test_online_and_export.py's tiny configs) over the family target at ``path``,
    moved off its init so a load that kept the init would show."""
    from test_online_and_export import DRAFTER, train_cfg

    from deepspec.training.trainer import build_drafter

    cfg = train_cfg(path, [], DRAFTER[name], cache_dir="unused")
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    for p in drafter.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    return drafter, cfg


def first_layer_token_input(drafter, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (1, S) -> (token part of what enters the drafter's first layer, the token ids it embeds).

    Block drafters: the block [anchor, MASK, ...] entering layers.0, (1, A*g, d). Eagle3: the embedding half of the
    midlayer input at TTT step 0, i.e. what enters input_layernorm, (1, S, d) (token t+1 at position t)."""
    import torch.nn.functional as F

    from deepspec.drafters.blocks import make_blocks

    seen = []
    hidden = torch.randn(1, ids.shape[1], len(DRAFT_LAYER_IDS) * drafter.target_config.hidden_size)
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        if hasattr(drafter, "midlayer"):
            hook = drafter.midlayer.input_layernorm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            drafter(hidden, ids, valid)
            hook.remove()
            return seen[0], F.pad(ids[:, 1:], (0, 1))
        mask = torch.zeros_like(ids, dtype=torch.uint8)
        mask[:, 2:] = 1
        g = drafter.cfg.block_size
        blocks = make_blocks(ids, mask, torch.tensor([[2, 6]]), torch.tensor([[True, True]]), g, drafter.cfg.mask_token_id)
        hook = drafter.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        drafter(hidden, valid, blocks)
        hook.remove()
        return seen[0], blocks.input_ids.view(1, -1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3"])
def test_drafters_embed_the_bare_target_rows_as_vllm_does(tmp_path, family):
    """Every drafter's token input is the stored rows of the target's embed_tokens.weight, with no sqrt(d) scale for
    Gemma: vLLM's DSpark/DFlash/Eagle3 drafters embed with the target's bare table (the scale lives in the Gemma
    model's own forward), so a drafter trained on scaled rows would be served unscaled ones. The target's own
    embedding output (layer id -1, a context feature) does carry the scale. Also after export -> reload."""
    from safetensors.torch import load_file

    from deepspec.export import export_drafter, load_drafter

    path = save_tiny(tmp_path / family, family)
    rows = load_file(path / "model.safetensors")["model.embed_tokens.weight"]  # (V, d) as stored
    ids = torch.randint(4, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=[-1], dtype="float32", device="cpu",
                                                  attn_implementation="eager"))
    target_embedding_output, _ = target(ids, torch.ones_like(ids))
    scale = 64 ** 0.5 if family.startswith("gemma") else 1.0  # hidden_size 64
    torch.testing.assert_close(target_embedding_output, rows[ids] * scale)
    for name in ("dspark", "dflash", "eagle3"):
        drafter, cfg = tiny_drafter(path, name)
        loaded = load_drafter(export_drafter(drafter, tmp_path / f"{family}-{name}", target=cfg.target))
        for model in (drafter, loaded):
            seen, token_ids = first_layer_token_input(model, ids)
            torch.testing.assert_close(seen, rows[token_ids], rtol=0, atol=0, msg=f"{name}: not the bare target rows")


@pytest.mark.parametrize("name", ["dspark", "dflash"])
def test_draft_logits_are_not_soft_capped_where_the_target_is(tmp_path, name):
    """Gemma-2 soft-caps its final logits (the tiny config at 2.0); the target's logits here are capped (HF's), the
    drafter's are not: vLLM's DSpark/DFlash heads build their logits processor without the target's soft-cap, so
    the q the engine samples drafts from is uncapped, and so is the q the losses train."""
    path = save_tiny(tmp_path / "gemma2", "gemma2")
    drafter, _ = tiny_drafter(path, name)
    h = torch.randn(2, drafter.cfg.block_size, 64, generator=torch.Generator().manual_seed(0)) * 10
    prev = torch.randint(4, 4096, (2, drafter.cfg.block_size))
    with torch.no_grad():
        draft = drafter.logits(h, prev)
    assert draft.abs().max() > 2.0 * 1.5, "draft logits look soft-capped at the target's 2.0"
    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=[0], dtype="float32", device="cpu",
                                                  attn_implementation="eager"))
    assert target.logits(h).abs().max() <= 2.0


def test_gemma4_drafters_embed_scaled_rows_and_cap_their_logits(tmp_path):
    """Gemma-4 drafters are the reference's (and vLLM's Gemma-4 DSpark class): token input = the stored rows times
    sqrt(d), draft logits soft-capped with the target's final_logit_softcapping (the tiny config's 2.0), before
    and after export; the losses' p_t stays the target's own capped distribution (capped once)."""
    from safetensors.torch import load_file

    from deepspec.export import export_drafter, load_drafter
    from deepspec.losses import target_logits

    path = save_tiny(tmp_path / "gemma4", "gemma4")
    rows = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
    ids = torch.randint(4, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=[0], dtype="float32", device="cpu",
                                                  attn_implementation="eager"))
    for name in ("dspark", "dflash", "eagle3"):
        drafter, cfg = tiny_drafter(path, name)
        loaded = load_drafter(export_drafter(drafter, tmp_path / f"gemma4-{name}", target=cfg.target))
        for model in (drafter, loaded):
            seen, token_ids = first_layer_token_input(model, ids)
            torch.testing.assert_close(seen, rows[token_ids] * 64**0.5, msg=f"{name}: not the sqrt(d)-scaled rows")
            h = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)) * 10
            with torch.no_grad():
                draft = model.lm_head(h)
                assert draft.abs().max() <= 2.0 and (model.target_head(h) - draft).abs().max() > 1.0, name
                torch.testing.assert_close(target_logits(model, h), target.logits(h))


# ----------------------------------------------------------------------------- each family end to end
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_cache_train_export_reload_decodes_losslessly(tmp_path, chat_jsonl, family):
    """cache (a few chat rows) -> 3 DSpark steps (micro batch 1, fp32) -> export -> vLLM DSpark loader table ->
    load_drafter -> speculative greedy decoding equal to plain greedy, with the reloaded drafter drafting exactly
    what the trained one drafts (so an export or reload that loses a tensor fails here, not only a lossless check)."""
    from test_online_and_export import DRAFTER, train_cfg

    from conftest import data_config
    from deepspec.config.train import LossConfig
    from deepspec.data.build import build_cache
    from deepspec.data.cache.reader import TargetCacheDataset
    from deepspec.export import TRAINING_ONLY, export_drafter, load_drafter
    from deepspec.serving_loaders import check_export
    from deepspec.training.data import collate
    from deepspec.training.step import DrafterWithLoss
    from deepspec.training.trainer import build_drafter

    path = save_tiny(tmp_path / family, family)
    target_fields = {"dtype": "float32", "attn_implementation": "eager", "mask_token_id": 3}  # eager: Gemma-2's attention cap
    build_cache(data_config(path, [chat_jsonl], tmp_path / "cache", input={"max_rows": 6}, max_length=128, target=target_fields))
    cfg = train_cfg(path, [], DRAFTER["dspark"], cache_dir=str(tmp_path / "cache"))
    drafter, kind = build_drafter(cfg, torch.device("cpu"))
    model = DrafterWithLoss(drafter, kind, LossConfig())
    optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=3e-3)
    samples = list(TargetCacheDataset(tmp_path / "cache", shuffle=False, prefetch=0))[:3]
    assert len(samples) == 3  # rows with too few loss tokens in 128 are dropped
    for step, sample in enumerate(samples):
        loss = model(collate([sample]), anchor_seed=step)["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    out = export_drafter(drafter.eval(), tmp_path / "export", target=cfg.target)
    assert check_export(out)["vLLM dspark"] == []
    loaded = load_drafter(out)
    trained = {k: v for k, v in drafter.state_dict().items() if not k.startswith(TRAINING_ONLY)}
    reloaded = loaded.state_dict()
    assert not [k for k, v in trained.items() if k not in reloaded or not torch.equal(reloaded[k], v)]

    target = TargetModel.from_config(TargetConfig(name_or_path=str(path), layer_ids=cfg.target.layer_ids, device="cpu",
                                                  **target_fields))
    greedy = SamplingConfig(temperature=0)
    prompt = torch.tensor(samples[0]["input_ids"][:10].tolist())

    plain = autoregressive_generate(target, prompt, 16, greedy)
    spec_trained, spec_loaded = (speculative_generate(target, d, prompt, 16, greedy) for d in (drafter, loaded))
    assert spec_loaded.tokens == plain.tokens
    assert spec_loaded.accepted_per_round == spec_trained.accepted_per_round
    assert spec_loaded.confidences == spec_trained.confidences
