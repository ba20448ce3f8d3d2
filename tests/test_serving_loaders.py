"""Exports against what vLLM's, SGLang's and TensorRT-LLM's draft loaders read (deepspec/serving_loaders.py),
and docs/serving_loaders.md rendering the same table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepspec.export import export_drafter, load_drafter
from deepspec.serving_loaders import check_export, requirements_markdown
from deepspec.training.trainer import build_drafter
from test_online_and_export import DRAFTER, train_cfg

KINDS = {"dspark": DRAFTER["dspark"], "dspark_gated": {**DRAFTER["dspark"], "markov_head_type": "gated"},
         "dspark_rnn": {**DRAFTER["dspark"], "markov_head_type": "rnn"}, "dflash": DRAFTER["dflash"], "eagle3": DRAFTER["eagle3"],
         "eagle3_llama": {**DRAFTER["eagle3"], "qk_norm": False}}
# what is expected not to load, with the reasons the table gives (each problem names one of them)
EXPECTED = {("dspark_gated", "vLLM dspark"): ("markov_head_type is vanilla",), ("dspark_rnn", "vLLM dspark"): ("markov_head_type is vanilla",),
            ("dspark_gated", "llama.cpp dspark"): ("markov_head_type is vanilla",), ("dspark_rnn", "llama.cpp dspark"): ("markov_head_type is vanilla",),
            # a QK-normed Eagle3 (the tiny target is a Qwen3) is vLLM's Eagle3Qwen3ForCausalLM: no SGLang/TensorRT-LLM class reads it
            ("eagle3", "SGLang eagle3"): ("architectures", "q_norm/k_norm"), ("eagle3", "TensorRT-LLM eagle3"): ("architectures",),
            # vLLM's and SGLang's DFlash runtimes read drafts from the mask slots; ours are anchor-first (one position off)
            ("dflash", "vLLM dflash"): ("mask slots only",), ("dflash", "SGLang dflash"): ("mask slots only",)}


def export(tiny_target, tmp_path, kind: str, include_frozen: bool = True) -> Path:
    cfg = train_cfg(tiny_target, [], KINDS[kind], cache_dir="unused")
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    return export_drafter(drafter, tmp_path / f"{kind}-{include_frozen}", include_frozen=include_frozen, target=cfg.target)


@pytest.mark.parametrize("include_frozen", [True, False])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_export_meets_its_loaders_requirements(tiny_target, tmp_path, kind, include_frozen):
    report = check_export(export(tiny_target, tmp_path, kind, include_frozen))
    assert report, "no loader checked"
    for loader, problems in report.items():
        expected = EXPECTED.get((kind, loader))
        if expected:
            assert problems and all(any(e in p for e in expected) for p in problems), problems
        else:
            assert problems == [], (loader, problems)


def _rewrite(path: Path, config_edit=None, drop: tuple[str, ...] = ()) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v for k, v in load_file(path / "model.safetensors").items() if k not in drop}
    save_file(tensors, path / "model.safetensors")
    return path


def test_exports_the_loaders_would_refuse_are_caught(tiny_target, tmp_path):
    # the old DFlash layout: named like DSpark, which SGLang would build as a DSpark with markov_rank 0
    old = _rewrite(export(tiny_target, tmp_path, "dflash"), lambda c: c.update(architectures=["Qwen3DSparkModel"]))
    assert all(any("architectures" in p for p in problems) for problems in check_export(old).values())
    # Eagle3 ids only nested: vLLM would read layer inputs one layer early (or fall back to its default layers)
    nested = _rewrite(export(tiny_target, tmp_path, "eagle3_llama"), lambda c: c.pop("eagle_aux_hidden_state_layer_ids"))
    assert check_export(nested)["vLLM eagle3"] and not check_export(nested)["SGLang eagle3"]
    # SGLang range-checks the target layers against num_target_layers; a missing confidence bias is refused
    no_n = _rewrite(export(tiny_target, tmp_path, "dspark"), lambda c: c.pop("num_target_layers"), drop=("confidence_head.proj.bias",))
    report = check_export(no_n)
    assert any("num_target_layers" in p for p in report["SGLang dspark"])
    assert any("proj.bias" in p or "confidence_head" in p for p in report["vLLM dspark"])
    # Eagle3 with draft_vocab_size but no LM head: SGLang would leave it uninitialised
    headless = _rewrite(export(tiny_target, tmp_path, "eagle3_llama"), drop=("lm_head.weight",))
    assert any("lm_head" in p for p in check_export(headless)["SGLang eagle3"])
    # a QK-normed layer named like Llama's: vLLM's Llama class fails on q_norm, SGLang's would drop it silently
    renamed = _rewrite(export(tiny_target, tmp_path, "eagle3"), lambda c: c.update(architectures=["LlamaForCausalLMEagle3"]))
    report = check_export(renamed)
    assert any("q_norm" in p for p in report["vLLM eagle3"]) and any("q_norm" in p for p in report["SGLang eagle3"])


def test_reference_layout_dflash_folders_load(tiny_target, tmp_path):
    """A DFlashDraftModel folder without our metadata (as another tool writes it) loads as a DFlash drafter."""
    path = _rewrite(export(tiny_target, tmp_path, "dflash"), lambda c: c.pop("deepspec"))
    (path / "checksums.json").unlink()  # another tool's folder has no checksums of ours (with them, the edit is caught)
    cfg = train_cfg(tiny_target, [], KINDS["dflash"], cache_dir="unused")
    assert type(load_drafter(path, target=cfg.target)).__name__ == "DFlashDrafter"


def test_the_docs_table_is_the_checked_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving_loaders.md").read_text()
    assert requirements_markdown() in doc, "docs/serving_loaders.md is stale: paste deepspec.serving_loaders.requirements_markdown()"


def test_gemma4_exports_meet_vllms_gemma4_dspark_loader(tmp_path):
    """Gemma-4 drafters export as the reference's Gemma4DSparkModel, which vLLM's Gemma-4 DSpark class loads: vanilla
    passes; a gated head, a folder without the frozen embedding/LM head (the class is self-contained), a dropped
    soft-cap (draft logits would be served uncapped) or no K=V sharing are reported. No loader is known for the rest."""
    fixture = Path(__file__).parent / "fixtures" / "reference_gemma4"

    def gemma4_export(variant: str, **kw) -> Path:
        return export_drafter(load_drafter(fixture / variant), tmp_path / f"{variant}-{len(kw)}", **kw)

    assert check_export(gemma4_export("dspark_vanilla")) == {"vLLM dspark": []}
    assert any("markov_head_type" in p for p in check_export(gemma4_export("dspark_gated"))["vLLM dspark"])
    headless = check_export(gemma4_export("dspark_vanilla", include_frozen=False, target=None))["vLLM dspark"]
    assert any("embed_tokens" in p for p in headless) and any("lm_head" in p for p in headless)
    uncapped = _rewrite(gemma4_export("dspark_vanilla"), lambda c: c.update(final_logit_softcapping=None))
    assert any("final_logit_softcapping" in p for p in check_export(uncapped)["vLLM dspark"])
    no_k_eq_v = _rewrite(gemma4_export("dspark_vanilla"), lambda c: c.update(attention_k_eq_v=False))
    assert any("attention_k_eq_v" in p for p in check_export(no_k_eq_v)["vLLM dspark"])
    assert check_export(gemma4_export("dflash")) == {} and check_export(gemma4_export("eagle3")) == {}
