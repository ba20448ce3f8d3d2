"""llama.cpp (CPU, tag b11434) serves our exports: its converter turns the embedded toy target and DSpark / DFlash
exports (full and reduced draft vocabulary) into F32 GGUF files, and its greedy speculative decoding prints the
text of its own plain greedy decoding of the same target. The real binaries run (scripts/setup_llamacpp.sh builds
them); without them every test here is skipped with the reason."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TOY_DIR, TOY_PROMPTS
from deepspec import llamacpp
from deepspec.config.data import TargetConfig
from deepspec.config.train import TrainStageConfig
from deepspec.decoding.speculative import autoregressive_generate
from deepspec.decoding.verify import SamplingConfig
from deepspec.drafters.draft_vocab import DraftVocab
from deepspec.export import export_drafter
from deepspec.serving_loaders import check_export
from deepspec.target import TargetModel, load_tokenizer
from deepspec.training.trainer import build_drafter

pytestmark = [pytest.mark.slow, pytest.mark.skipif(llamacpp.unavailable_reason() is not None,
                                                   reason=llamacpp.unavailable_reason() or "")]

TOY = TargetConfig(name_or_path="toy", layer_ids=[0, 2, 4], mask_token_id=3)
DRAFTERS = {"dspark": {"name": "dspark", "block_size": 4, "num_hidden_layers": 1, "markov_rank": 16},
            "dflash": {"name": "dflash", "block_size": 4, "num_hidden_layers": 1}}
DRAFT_VOCAB_SIZE = 700
NEW_TOKENS = 40
THREADS = 1  # the outputs do not depend on it; 2 threads' spin barriers crawl on a machine busy with other work


def chat_prompts(n: int) -> list[str]:
    """Held-out toy prompts in the toy target's chat template (as strings: llama.cpp tokenizes them)."""
    rows = [json.loads(line) for line in (TOY_PROMPTS / "heldout.jsonl").read_text().splitlines()[:n]]
    return [f"<|im_start|>user\n{r['turns'][0]}<|im_end|>\n<|im_start|>assistant\n" for r in rows]


@pytest.fixture(scope="module")
def target_gguf(tmp_path_factory):
    return llamacpp.convert(TOY_DIR, tmp_path_factory.mktemp("gguf") / "toy_target_f32.gguf")


def random_export(tmp_path, kind: str, reduced: bool, **drafter_overrides):
    """A random-weight drafter for the toy target, exported as users get it (an identity test needs no training)."""
    drafter = dict(DRAFTERS[kind], **drafter_overrides)
    if reduced:
        ids = torch.sort(torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:DRAFT_VOCAB_SIZE]).values
        DraftVocab(ids, 4096).save(tmp_path / "draft_vocab.safetensors")
        drafter.update(draft_vocab_size=DRAFT_VOCAB_SIZE, draft_vocab_file=str(tmp_path / "draft_vocab.safetensors"))
    torch.manual_seed(0)
    cfg = TrainStageConfig(target=TOY, drafter=drafter, cache_dir="unused")
    model, _ = build_drafter(cfg, torch.device("cpu"))
    return export_drafter(model, tmp_path / f"{kind}{'_reduced' if reduced else ''}", target=cfg.target)


@pytest.mark.parametrize("reduced", [False, True], ids=["full_vocab", "reduced_vocab"])
@pytest.mark.parametrize("kind", ["dspark", "dflash"])
def test_speculative_output_equals_plain_greedy_output(target_gguf, tmp_path, kind, reduced):
    export = random_export(tmp_path, kind, reduced)
    assert check_export(export)[f"llama.cpp {kind}"] == []
    draft_gguf = llamacpp.convert(export, tmp_path / "draft_f32.gguf", target_dir=TOY_DIR)
    for prompt in chat_prompts(2):
        spec = llamacpp.decode_speculative(target_gguf, draft_gguf, prompt, NEW_TOKENS, draft_max=DRAFTERS[kind]["block_size"],
                                           threads=THREADS)
        assert spec.drafted > 0, "llama.cpp drafted nothing: the drafter did not run"
        plain = llamacpp.decode_plain(target_gguf, prompt, spec.tokens, THREADS)  # the speculative run may overshoot NEW_TOKENS
        assert spec.text == plain.text


def test_our_f32_greedy_decoding_is_llamacpps_token_for_token(target_gguf):
    """The same token ids in (llama.cpp's tokenization), the same text out: our fp32 greedy decoding of the toy target
    and llama.cpp's F32 one agree on every token (the text of our ids, decoded, is llama.cpp's text)."""
    target, tok = TargetModel.from_config(TargetConfig(name_or_path="toy", layer_ids=[0, 2, 4], dtype="float32")), \
        load_tokenizer(TOY)
    for prompt in chat_prompts(2):
        ids = llamacpp.tokenize(target_gguf, prompt)
        ours = autoregressive_generate(target, torch.tensor(ids), NEW_TOKENS, SamplingConfig(temperature=0), eos_token_id=2)
        theirs = llamacpp.decode_plain(target_gguf, prompt, NEW_TOKENS, THREADS)
        assert tok.decode(ours.tokens).rstrip("\n") == theirs.text


def test_a_confidence_head_without_markov_input_is_refused(target_gguf, tmp_path):
    """llama.cpp builds conf_proj as {n_embd + markov_rank, 1} (src/models/dflash.cpp): a head on h alone does not load,
    and the loader table says so before any engine runs."""
    export = random_export(tmp_path, "dspark", False, confidence_head_with_markov=False)
    assert any("confidence_head_with_markov" in p for p in check_export(export)["llama.cpp dspark"])
    draft_gguf = llamacpp.convert(export, tmp_path / "draft_f32.gguf", target_dir=TOY_DIR)
    with pytest.raises(RuntimeError, match="conf_proj"):
        llamacpp.decode_speculative(target_gguf, draft_gguf, chat_prompts(1)[0], 8, draft_max=4, threads=THREADS)
