"""Online mode = offline mode on the same sample; export -> load round trips with identical logits."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import data_config, write_jsonl
from deepspec.config.data import InputConfig, TargetConfig
from deepspec.config.train import LossConfig, TrainStageConfig
from deepspec.data.cache.reader import TargetCacheDataset
from deepspec.export import export_drafter, load_drafter
from deepspec.training.data import collate
from deepspec.training.online import OnlineTargetDataset
from deepspec.training.step import DrafterWithLoss
from deepspec.training.trainer import build_drafter

DRAFTER = {"dspark": {"name": "dspark", "block_size": 4, "num_hidden_layers": 1, "markov_rank": 16, "num_anchors": 32},
           "dflash": {"name": "dflash", "block_size": 4, "num_hidden_layers": 1, "num_anchors": 32},
           "eagle3": {"name": "eagle3", "ttt_steps": 3}}


def train_cfg(tiny_target, inputs, drafter: dict, **kw) -> TrainStageConfig:
    return TrainStageConfig(target=TargetConfig(name_or_path=str(tiny_target), layer_ids=[-1, 1, 3], mask_token_id=3,
                                                dtype="bfloat16"),
                            drafter=drafter, input=InputConfig(paths=[str(p) for p in inputs]), max_length=128,
                            min_loss_tokens=4, **kw)


@pytest.mark.parametrize("name", ["dspark", "eagle3"])
def test_online_step_equals_offline_step(tiny_target, chat_jsonl, tmp_path, name):
    from deepspec.data.build import build_cache

    row = chat_jsonl.read_text().splitlines()[3]
    inp = write_jsonl(tmp_path / "one.jsonl", [row])
    # The cache stores bf16 features of a bf16 target: exactly what online mode computes.
    dcfg = data_config(tiny_target, [inp], tmp_path / "cache", max_length=128, batch_size=1,
                       target={"dtype": "bfloat16"}, cache={"storage_dtype": "bf16"})
    build_cache(dcfg)
    cfg = train_cfg(tiny_target, [inp], DRAFTER[name], online=True)
    drafter, kind = build_drafter(cfg, torch.device("cpu"))
    model = DrafterWithLoss(drafter, kind, LossConfig())
    offline = collate([next(iter(TargetCacheDataset(tmp_path / "cache", shuffle=False, prefetch=0)))])
    online = collate(list(OnlineTargetDataset(cfg, rank=0, world=1)))
    assert torch.equal(offline["input_ids"], online["input_ids"]) and torch.equal(offline["hidden"], online["hidden"])
    a, b = model(offline, anchor_seed=7), model(online, anchor_seed=7)
    assert a["loss"].item() == b["loss"].item()
    ga = torch.autograd.grad(a["loss"], drafter.fc.weight)[0]
    gb = torch.autograd.grad(model(online, anchor_seed=7)["loss"], drafter.fc.weight)[0]
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("name", ["dspark", "dflash", "eagle3"])
@pytest.mark.parametrize("include_frozen", [True, False])
def test_export_round_trip_gives_identical_logits(tiny_target, tmp_path, name, include_frozen):
    cfg = train_cfg(tiny_target, [], DRAFTER[name], cache_dir="unused")
    drafter, kind = build_drafter(cfg, torch.device("cpu"))
    for p in drafter.parameters():  # move away from the init so a load that kept the init would show
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    out = export_drafter(drafter, tmp_path / "export", include_frozen=include_frozen, target=cfg.target)
    config = json.loads((out / "config.json").read_text())
    loaded = load_drafter(out, target=None if include_frozen else cfg.target)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 20, 3 * 64, generator=g)
    ids = torch.randint(5, 4000, (1, 20), generator=g)
    valid = torch.ones(1, 20, dtype=torch.bool)
    with torch.no_grad():
        if name == "eagle3":
            assert config["architectures"] == ["Eagle3Qwen3ForCausalLM"]  # a Qwen3 target: QK-norm, vLLM's Qwen3 Eagle3 class
            assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 1, 3]
            a, b = drafter.lm_head(drafter(hidden, ids, valid)), loaded.lm_head(loaded(hidden, ids, valid))
        else:
            from deepspec.drafters.blocks import make_blocks

            assert config["architectures"] == (["Qwen3DSparkModel"] if name == "dspark" else ["DFlashDraftModel"]) and config["block_size"] == 4
            assert config["markov_rank"] == (16 if name == "dspark" else 0)
            mask = torch.zeros(1, 20, dtype=torch.uint8)
            mask[:, 5:] = 1
            blocks = make_blocks(ids, mask, torch.tensor([[5, 9]]), torch.tensor([[True, True]]), 4, 3)
            prev = drafter.prev_tokens(blocks.input_ids, blocks.labels)[0]
            a = drafter.logits(drafter(hidden, valid, blocks)[0], prev)
            b = loaded.logits(loaded(hidden, valid, blocks)[0], prev)
    assert torch.equal(a, b)
    from safetensors.torch import load_file

    names = set(load_file(out / "model.safetensors"))
    assert ("embed_tokens.weight" in names) == include_frozen
    assert ("lm_head.weight" in names) == (include_frozen or name == "eagle3")  # SGLang's Eagle3 loader needs it in the file
    if name == "dspark":
        assert {"fc.weight", "hidden_norm.weight", "norm.weight", "markov_head.markov_w1.weight",
                "markov_head.markov_w2.weight", "confidence_head.proj.weight", "confidence_head.proj.bias",
                "layers.0.self_attn.q_norm.weight"} <= names
    if name == "eagle3":
        assert {"midlayer.self_attn.q_proj.weight", "midlayer.self_attn.q_norm.weight", "midlayer.self_attn.k_norm.weight",
                "midlayer.hidden_norm.weight", "fc.weight", "norm.weight"} <= names


def test_a_widened_eagle3_exports_its_own_mlp_width(tiny_target, tmp_path):
    """Eagle3 with intermediate_size (parameter-matched comparisons): config.json carries the midlayer's
    width (what Eagle3 loaders read) and the export loads back with the same weights."""
    cfg = train_cfg(tiny_target, [], {**DRAFTER["eagle3"], "intermediate_size": 100}, cache_dir="unused")
    drafter, _ = build_drafter(cfg, torch.device("cpu"))
    assert drafter.midlayer.mlp.up_proj.weight.shape[0] == 100
    out = export_drafter(drafter, tmp_path / "export", target=cfg.target)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 100
    loaded = load_drafter(out)
    assert torch.equal(loaded.midlayer.mlp.down_proj.weight, drafter.midlayer.mlp.down_proj.weight)


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_a_folder_in_the_reference_layout_imports_with_every_tensor(tiny_target, tmp_path, head_type):
    """A DSpark checkpoint written by another tool in the reference layout (shared/reference/dspark.md: the target's
    config plus the drafter keys, the listed tensor names and shapes; built here from that list, not by our exporter)
    loads with every tensor in place, and our own export of the loaded drafter names the same tensors and shapes."""
    from safetensors.torch import load_file, save_file

    target_config = json.loads((tiny_target / "config.json").read_text())
    d, V, r, layers, L = target_config["hidden_size"], target_config["vocab_size"], 16, 2, 3
    with_markov = head_type != "rnn"  # both settings of confidence_head_with_markov (engines default it differently)
    heads, kv, hd, inter = (target_config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"))
    shapes = {"embed_tokens.weight": (V, d), "norm.weight": (d,), "fc.weight": (d, L * d), "hidden_norm.weight": (d,),
              "lm_head.weight": (V, d), "markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (V, r),
              "confidence_head.proj.weight": (1, d + r if with_markov else d), "confidence_head.proj.bias": (1,)}
    for i in range(layers):
        shapes |= {f"layers.{i}.self_attn.q_proj.weight": (heads * hd, d), f"layers.{i}.self_attn.k_proj.weight": (kv * hd, d),
                   f"layers.{i}.self_attn.v_proj.weight": (kv * hd, d), f"layers.{i}.self_attn.o_proj.weight": (d, heads * hd),
                   f"layers.{i}.self_attn.q_norm.weight": (hd,), f"layers.{i}.self_attn.k_norm.weight": (hd,),
                   f"layers.{i}.mlp.gate_proj.weight": (inter, d), f"layers.{i}.mlp.up_proj.weight": (inter, d),
                   f"layers.{i}.mlp.down_proj.weight": (d, inter), f"layers.{i}.input_layernorm.weight": (d,),
                   f"layers.{i}.post_attention_layernorm.weight": (d,)}
    if head_type == "gated":
        shapes |= {"markov_head.gate_proj.weight": (r, d + r), "markov_head.gate_proj.bias": (r,)}
    if head_type == "rnn":
        shapes |= {"markov_head.joint_proj.weight": (3 * r, 2 * r + d), "markov_head.joint_proj.bias": (3 * r,)}
    g = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(shape, generator=g) * 0.1 for name, shape in shapes.items()}
    folder = tmp_path / "reference"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    config = {**target_config, "architectures": ["Qwen3DSparkModel"], "num_target_layers": target_config["num_hidden_layers"],
              "num_hidden_layers": layers, "block_size": 4, "mask_token_id": 3, "target_layer_ids": [-1, 1, 3],
              "num_anchors": 32, "enable_confidence_head": True, "confidence_head_with_markov": with_markov, "markov_rank": r,
              "markov_head_type": head_type, "layer_types": ["full_attention"] * layers}
    (folder / "config.json").write_text(json.dumps(config))

    loaded = load_drafter(folder)
    state = loaded.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), f"{name} not loaded from the file"
    assert loaded.cfg.markov_head_type == head_type and loaded.cfg.num_hidden_layers == layers
    out = export_drafter(loaded, tmp_path / "again", target=TargetConfig(name_or_path=str(tiny_target), layer_ids=[-1, 1, 3],
                                                                         mask_token_id=3))
    again = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in again.items()} == shapes  # both ways: the same names and shapes
    assert all(torch.equal(again[k], tensors[k]) for k in shapes)
