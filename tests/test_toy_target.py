"""The embedded toy target is a real language model, not a random one.

Greedy continuations of held-out prompts (packages the model never saw) must be far more likely
under the trained model than under a randomly initialised model of the same shape, and the
held-out reference bodies must cost far fewer nats per token.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import TOY_DIR, TOY_PROMPTS

N_PROMPTS, NEW_TOKENS = 6, 32


@pytest.fixture(scope="module")
def toy():
    tok = AutoTokenizer.from_pretrained(TOY_DIR)
    trained = AutoModelForCausalLM.from_pretrained(TOY_DIR, dtype=torch.float32).eval()
    torch.manual_seed(0)
    random_init = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TOY_DIR)).float().eval()
    rows = [json.loads(l) for l in (TOY_PROMPTS / "heldout.jsonl").read_text().splitlines()[:N_PROMPTS]]
    return tok, trained, random_init, rows


def _prompt_ids(tok, row) -> torch.Tensor:
    text = tok.apply_chat_template([{"role": "user", "content": row["turns"][0]}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _mean_logprob(model, prompt: torch.Tensor, continuation: torch.Tensor) -> float:
    ids = torch.cat([prompt, continuation], dim=1)
    logp = torch.log_softmax(model(ids).logits[0, prompt.shape[1] - 1 : -1].float(), dim=-1)
    return logp.gather(-1, continuation[0, :, None]).mean().item()


def test_greedy_continuations_far_more_likely_than_under_random_init(toy):
    tok, trained, random_init, rows = toy
    gaps = []
    for row in rows:
        prompt = _prompt_ids(tok, row)
        out = trained.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        cont = out[:, prompt.shape[1]:]
        gaps.append(_mean_logprob(trained, prompt, cont) - _mean_logprob(random_init, prompt, cont))
    # A random model gives about -log(4096) = -8.3 nats per token; the trained one should be near 0.
    assert min(gaps) > 4.0, gaps


def test_heldout_reference_bodies_cost_far_fewer_nats(toy):
    tok, trained, random_init, rows = toy
    nats = {"trained": [], "random": []}
    for row in rows:
        prompt = _prompt_ids(tok, row)
        body = tok(row["reference"] + "<|im_end|>", return_tensors="pt", add_special_tokens=False)["input_ids"][:, :128]
        nats["trained"].append(-_mean_logprob(trained, prompt, body))
        nats["random"].append(-_mean_logprob(random_init, prompt, body))
    trained_ce, random_ce = (sum(v) / len(v) for v in nats.values())
    assert random_ce > math.log(4096) - 1.0  # sanity: the baseline is really uninformed
    assert trained_ce < random_ce / 2, nats


def test_mask_token_is_reserved_and_unused(toy):
    tok, _, _, rows = toy
    from deepspec.config import CONFIG_DIR
    from omegaconf import OmegaConf

    preset = OmegaConf.load(CONFIG_DIR / "target" / "toy.yaml")
    assert tok.convert_ids_to_tokens(preset.mask_token_id) == "<|mask|>"
    for line in (TOY_PROMPTS / "train.jsonl").read_text().splitlines()[:500]:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        assert preset.mask_token_id not in ids
