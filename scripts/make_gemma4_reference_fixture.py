"""Write tests/fixtures/reference_gemma4/ with the DeepSpec reference's own Gemma-4 drafter classes, or check a
deepspec export against them.

This runs the *reference* (deepseek-ai/DeepSpec), never this project's package: both are named ``deepspec``, so
the reference checkout is put first on sys.path and this script imports nothing from the repository. The
reference pins transformers 5.10.2 (its requirements.txt), whose Gemma-4 API it calls; give such a transformers
with --site (a folder put before the venv's site-packages), e.g.

    pip install --no-deps --target /tmp/tf5102 transformers==5.10.2 tokenizers==0.22.2 "huggingface-hub<2"
    python scripts/make_gemma4_reference_fixture.py --reference /tmp/deepspec_ref --site /tmp/tf5102 \
        --out tests/fixtures/reference_gemma4
    python scripts/make_gemma4_reference_fixture.py --reference /tmp/deepspec_ref --site /tmp/tf5102 \
        --check-export /tmp/our_export --variant dspark_vanilla --fixture tests/fixtures/reference_gemma4

Fixture (per variant: dspark_vanilla, dspark_gated, dspark_rnn, dflash, eagle3): ``<variant>/`` is the
reference model's ``save_pretrained`` folder; ``<variant>/io.safetensors`` holds the inputs and the reference's
fp32 outputs on them (see ``block_io`` / ``eagle3_io`` for the names and shapes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

V, D, S, G, A = 128, 32, 10, 4, 2  # vocabulary, hidden size, context length, block size, anchors
TARGET_LAYERS = [0, 1, 2, 3, 4]  # the reference Eagle3 takes exactly five
MASK_ID = 4
ANCHORS = [3, 6]
VARIANTS = {
    "dspark_vanilla": dict(markov_rank=8, markov_head_type="vanilla", confidence_head_alpha=1.0, k_eq_v=True),
    "dspark_gated": dict(markov_rank=8, markov_head_type="gated", confidence_head_alpha=1.0, k_eq_v=True),
    "dspark_rnn": dict(markov_rank=8, markov_head_type="rnn", confidence_head_alpha=1.0, k_eq_v=True),
    "dflash": dict(markov_rank=0, confidence_head_alpha=0.0, k_eq_v=False),  # also covers the v_proj path
    "eagle3": dict(k_eq_v=True),
}


class Args(dict):
    """The reference reads its model arguments both as attributes and with ``in``."""

    __getattr__ = dict.__getitem__


def target_config(k_eq_v: bool):
    """A tiny Gemma-4 target: 256-wide sliding heads become 8, 512-wide global heads 16, one global KV head."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4Config, Gemma4TextConfig

    text = Gemma4TextConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=6, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                            attention_k_eq_v=k_eq_v, sliding_window=8, final_logit_softcapping=3.0, hidden_size_per_layer_input=0,
                            layer_types=["sliding_attention"] * 5 + ["full_attention"], max_position_embeddings=256)
    return Gemma4Config(text_config=text)


def build(variant: str):
    import torch

    spec = VARIANTS[variant]
    tc = target_config(spec["k_eq_v"])
    if variant == "eagle3":
        from deepspec.modeling.eagle3.gemma4 import Gemma4Eagle3Model, build_draft_config

        cfg = build_draft_config(target_config=tc, model_args=Args(target_layer_ids=TARGET_LAYERS, ttt_length=3, step_loss_decay=0.8,
                                                                   draft_num_hidden_layers=1, target_model_name_or_path="tiny-gemma4"))
        cls = Gemma4Eagle3Model
    else:
        from deepspec.modeling.dspark.gemma4 import Gemma4DSparkModel, build_draft_config

        args = dict(num_draft_layers=2, target_layer_ids=TARGET_LAYERS, mask_token_id=MASK_ID, num_anchors=8, block_size=G,
                    markov_rank=spec["markov_rank"], confidence_head_alpha=spec["confidence_head_alpha"], confidence_head_with_markov=True)
        if spec["markov_rank"]:
            args["markov_head_type"] = spec["markov_head_type"]
        cfg = build_draft_config(tc, Args(args))
        cls = Gemma4DSparkModel
    torch.manual_seed(sorted(VARIANTS).index(variant))
    model = cls(cfg).float().eval()
    with torch.no_grad():  # every parameter and layer_scalar off its init, so a dropped or misnamed one shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.05))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.75)
    model.config._attn_implementation = "sdpa"  # CPU, explicit boolean masks (training uses flex_attention)
    return model


def block_inputs():
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, S, len(TARGET_LAYERS) * D, generator=g)
    ids = torch.randint(5, V, (1, S), generator=g)
    block_ids = torch.full((1, A, G), MASK_ID)
    block_ids[0, :, 0] = ids[0, ANCHORS]
    block_pos = torch.tensor(ANCHORS)[:, None] + torch.arange(G)  # (A, G)
    prev = torch.cat([block_ids[:, :, :1], torch.randint(5, V, (1, A, G - 1), generator=g)], dim=-1)  # teacher-forced x_{k-1}
    q_anchor = torch.tensor(ANCHORS).repeat_interleave(G)
    ctx = torch.arange(S)[None, :] < q_anchor[:, None]  # a block sees context positions before its anchor ...
    own = (torch.arange(A * G)[:, None] // G) == (torch.arange(A * G)[None, :] // G)  # ... and its whole block
    mask = torch.cat([ctx, own], dim=-1)[None, None]  # (1, 1, A*G, S + A*G)
    return dict(hidden=hidden, block_ids=block_ids.view(1, A * G), ctx_pos=torch.arange(S)[None], block_pos=block_pos.view(1, A * G),
                prev=prev, mask=mask)


def block_io(model) -> dict:
    """inputs + the reference's outputs: h (1, A*G, D) after the final norm, base_logits (1, A*G, V) capped,
    logits (1, A, G, V) with the Markov bias, confidence (1, A, G) logits (absent without the head)."""
    import torch

    x = block_inputs()
    with torch.no_grad():
        h = model._forward_backbone(position_ids=torch.cat([x["ctx_pos"], x["block_pos"]], 1), attention_mask=x["mask"],
                                    noise_embedding=model.embed_tokens(x["block_ids"]), target_hidden_states=x["hidden"])
        base = model.compute_logits(h)
        h4 = h.view(1, A, G, D)
        logits = base.view(1, A, G, V)
        if model.markov_head is not None:
            logits = model.markov_head.apply_block_logits(logits, token_ids=x["prev"], hidden_states=h4)
        out = dict(x, h=h, base_logits=base, logits=logits)
        if model.confidence_head is not None:
            feats = torch.cat([h4, model.markov_head.get_prev_embeddings(x["prev"])], -1) if model.confidence_head_with_markov else h4
            out["confidence"] = model.confidence_head(feats)
    return out


def eagle3_io(model) -> dict:
    """inputs + the reference's step-0 outputs: ids (1, S) the token fed at each position (0 at the last),
    hidden (1, S, L*D), h (1, S, D) the layer output before the final norm, normed (1, S, D) after it, logits
    (1, S, V) capped."""
    import torch

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, S, len(TARGET_LAYERS) * D, generator=g)
    ids = torch.randint(5, V, (1, S), generator=g)
    ids[0, -1] = 0
    with torch.no_grad():
        h = model(hidden_states=hidden, input_ids=ids, position_ids=torch.arange(S)[None])
        return dict(hidden=hidden, ids=ids, h=h, normed=model.norm(h), logits=model.compute_logits(h))


def write(out: Path) -> None:
    import deepspec
    from safetensors.torch import save_file

    print("reference package:", Path(deepspec.__file__).parent)
    for variant in VARIANTS:
        model = build(variant)
        folder = out / variant
        model.save_pretrained(folder, safe_serialization=True)
        io = eagle3_io(model) if variant == "eagle3" else block_io(model)
        save_file({k: v.contiguous().clone() for k, v in io.items()}, folder / "io.safetensors")
        print(variant, sorted(json.loads((folder / "config.json").read_text())["architectures"]), "written")


def check_export(export: Path, variant: str, fixture: Path) -> float:
    """Load a deepspec export with the reference class and return its max abs difference from the fixture's outputs."""
    import torch
    from safetensors.torch import load_file

    model = build(variant)
    state = load_file(export / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "embed_scale" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    expected = load_file(fixture / variant / "io.safetensors")
    got = eagle3_io(model) if variant == "eagle3" else block_io(model)
    return max(float((got[k] - expected[k]).abs().max()) for k in expected if k in ("h", "normed", "base_logits", "logits", "confidence"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="a checkout of deepseek-ai/DeepSpec")
    ap.add_argument("--site", help="a folder with transformers 5.10.2 (put first on sys.path)")
    ap.add_argument("--out", type=Path, help="write the fixture here")
    ap.add_argument("--check-export", type=Path, help="a deepspec export to load with the reference class")
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--fixture", type=Path, default=Path("tests/fixtures/reference_gemma4"))
    a = ap.parse_args()
    sys.path[:0] = [p for p in (a.site, a.reference) if p]
    if a.out:
        write(a.out)
    if a.check_export:
        print(f"{a.variant}: max abs difference {check_export(a.check_export, a.variant, a.fixture):.3g}")


if __name__ == "__main__":
    main()
