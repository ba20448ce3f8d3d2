"""TargetModel: any HF causal LM, frozen, with the features a drafter learns from.

A forward pass returns the hidden states of the configured layers (captured with forward hooks,
so no other layer's output is kept) and the final-norm hidden state, from which the frozen LM
head recovers the logits. Layer id ``i`` is the output of decoder layer ``i`` (0-based);
``-1`` is the embedding output, i.e. what enters decoder layer 0 (this includes any embedding
scale such as Gemma's sqrt(d)).

A drafter's own token input is not that: it is the raw rows of the target's ``embed_tokens.weight``
(``load_frozen_embeddings``), unscaled for every family, because that is what vLLM's drafter loaders
embed with (docs/targets.md, "What a drafter sees").
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from deepspec.config.data import TargetConfig
from deepspec.precision import resolve_dtype

log = logging.getLogger(__name__)
TOY_TARGET_DIR = Path(__file__).resolve().parent / "assets" / "toy_target"
# Fields of config.json that do not change what the model computes.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache")


def resolve_target_path(name_or_path: str) -> str:
    """``toy`` -> the embedded target folder; anything else is returned unchanged."""
    return str(TOY_TARGET_DIR) if name_or_path == "toy" else name_or_path


def config_sha256(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((backend + (tokenizer.chat_template or "")).encode()).hexdigest()


def weights_fingerprint(name_or_path: str) -> str:
    """Cheap fingerprint of the weights: each safetensors file's size, header and first/last MiB.

    Hashing every byte of a 16-140 GB checkpoint would take minutes; the header (names, shapes,
    offsets) plus two MiB of values per file tells a fine-tuned variant from its base.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name_or_path, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:
            return "unavailable"
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(size - (1 << 20), 0))
            tail = fh.read()
        h.update(f"{f.name}:{size}".encode() + head + tail)
    return h.hexdigest() if files else "unavailable"


@dataclass
class TargetIdentity:
    """What a cache records about its target, and what the reader checks against."""

    name_or_path: str
    config_sha256: str
    tokenizer_sha256: str
    weights_fingerprint: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int

    def mismatches(self, other: "TargetIdentity") -> list[str]:
        keys = ("config_sha256", "tokenizer_sha256", "weights_fingerprint", "num_hidden_layers", "hidden_size", "vocab_size")
        if "unavailable" in (self.weights_fingerprint, other.weights_fingerprint):  # weights not on local disk: cannot compare
            keys = tuple(k for k in keys if k != "weights_fingerprint")
        return [f"{k}: cache has {getattr(other, k)!r}, target has {getattr(self, k)!r}"
                for k in keys if getattr(self, k) != getattr(other, k)]


_REMOTE_CODE_WARNED: set[str] = set()


def trust_remote_code(cfg: TargetConfig) -> bool:
    """``target.trust_remote_code`` (off by default), logged once per target when on."""
    if cfg.trust_remote_code and cfg.name_or_path not in _REMOTE_CODE_WARNED:
        _REMOTE_CODE_WARNED.add(cfg.name_or_path)
        log.warning("target.trust_remote_code=true: transformers will run the Python code shipped with %s", cfg.name_or_path)
    return cfg.trust_remote_code


def load_tokenizer(cfg: TargetConfig) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve_target_path(cfg.name_or_path), trust_remote_code=trust_remote_code(cfg))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def target_identity(cfg: TargetConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> TargetIdentity:
    """Identity of the configured target from its config and tokenizer only (no weights loaded)."""
    path = resolve_target_path(cfg.name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code(cfg))
    text = getattr(config, "text_config", None) or config
    tokenizer = tokenizer or load_tokenizer(cfg)
    return TargetIdentity(cfg.name_or_path, config_sha256(config), tokenizer_sha256(tokenizer), weights_fingerprint(path),
                          text.num_hidden_layers, text.hidden_size, text.vocab_size)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def final_logit_softcap(config) -> float | None:
    """The family's final-logit soft-capping (Gemma-2/3: logits = cap * tanh(logits / cap)), else None."""
    text = getattr(config, "text_config", None) or config
    return getattr(text, "final_logit_softcapping", None) or None


def apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def check_layer_ids(layer_ids: list[int], num_hidden_layers: int, where: str = "target.layer_ids") -> None:
    bad = [i for i in layer_ids if not -1 <= i < num_hidden_layers]
    if bad:
        raise ValueError(f"{where}={list(layer_ids)}: ids {bad} are out of range for a target with "
                         f"{num_hidden_layers} decoder layers (valid: -1 .. {num_hidden_layers - 1})")


class TargetModel(nn.Module):
    """A frozen HF causal LM that returns selected-layer and final-norm hidden states."""

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.decoder = model.get_decoder()
        self.layers = self._find_layers()
        check_layer_ids(layer_ids, len(self.layers))
        self.layer_ids = list(layer_ids)
        self.norm = getattr(self.decoder, "norm", None)
        if self.norm is None:
            raise ValueError(f"{type(model).__name__}: cannot find the final norm (expected `model.norm`)")
        self._captured: dict[int, torch.Tensor] = {}
        self._sliding = sliding_window_of(model.config)  # read once: decoder_with_positions runs every decoding step
        self._hooks = [self._hook(i) for i in sorted(set(self.layer_ids))]
        self._hooks.append(self.norm.register_forward_hook(self._save("final")))

    @classmethod
    def from_config(cls, cfg: TargetConfig) -> "TargetModel":
        path = resolve_target_path(cfg.name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(cfg.dtype, resolve_device(cfg.device)), attn_implementation=cfg.attn_implementation,
            trust_remote_code=trust_remote_code(cfg),
        )
        return cls(model, cfg.layer_ids).to(resolve_device(cfg.device))

    # ------------------------------------------------------------------ hooks
    def _find_layers(self) -> nn.ModuleList:
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(self.model).__name__}: cannot find decoder layers (expected `model.layers`)")
        return layers

    def _save(self, key):
        def hook(module, args, output):
            self._captured[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def _hook(self, layer_id: int):
        if layer_id >= 0:
            return self.layers[layer_id].register_forward_hook(self._save(layer_id))

        def pre_hook(module, args, kwargs):  # the embedding output is the first layer's input
            self._captured[-1] = args[0] if args else kwargs["hidden_states"]
        return self.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)

    # ------------------------------------------------------------------ api
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) final-norm hidden states -> (..., V) logits exactly as the HF model computes them: the LM
        head, then the family's final-logit soft-capping where its config has one (Gemma-2/3)."""
        return apply_softcap(self.lm_head(final_hidden), final_logit_softcap(self.model.config))

    @torch.no_grad()
    def decoder_with_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                               past_key_values) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward`` on a KV cache, with an attention mask over past + new positions (holes allowed)
        and explicit position ids (B, S_new). Used by batched speculative decoding."""
        self._captured.clear()
        self.decoder(input_ids=input_ids, attention_mask=self._positional_masks(attention_mask, position_ids),
                     position_ids=position_ids, past_key_values=past_key_values, use_cache=True)
        layer_hidden = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1)
        final_hidden = self._captured["final"]
        self._captured.clear()
        return layer_hidden, final_hidden

    def _positional_masks(self, mask: torch.Tensor, position_ids: torch.Tensor):
        """(B, K) slot mask (1 = a real token, 0 = padding or hole) -> what the decoder gets.

        Without sliding-window layers: the 2D mask; HF builds the causal mask from it. With them, HF would
        measure the window in cache slots, and the holes the batched engine leaves where drafts were rejected
        would shrink the window below the target's (outputs that differ from plain decoding). So they get
        explicit additive 4D masks (B, 1, Q, K) in logical positions, per layer type: a key is seen when it is
        real and not after the query, and, in a sliding layer, fewer than ``sliding_window`` positions back.
        """
        window, per_type = self._sliding
        if not window:
            return mask
        Q, K = position_ids.shape[1], mask.shape[1]
        kv_pos = mask.cumsum(1) - 1  # (B, K) logical position of each real slot
        seen = mask.bool()[:, None, :] & (kv_pos[:, None, :] <= position_ids[:, :, None])  # (B, Q, K)
        own = torch.zeros(Q, K, dtype=torch.bool, device=mask.device)
        own[torch.arange(Q), K - Q + torch.arange(Q)] = True  # a padded query still sees its own slot: no empty rows
        dtype = next(self.model.parameters()).dtype

        def additive(allowed):
            return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~(allowed | own), torch.finfo(dtype).min)[:, None]

        near = additive(seen & (position_ids[:, :, None] - kv_pos[:, None, :] < window))
        return {"full_attention": additive(seen), "sliding_attention": near} if per_type else near

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder (no LM head), optionally continuing an HF KV cache.

        Args:
            input_ids: (B, S) token ids; attention_mask: (B, S) 1 for real tokens (right padding);
            past_key_values: an HF ``Cache`` holding the earlier positions (extended in place).
        Returns:
            layer_hidden: (B, S, L*d) the configured layers' outputs concatenated in ``layer_ids`` order.
            final_hidden: (B, S, d) the final-norm hidden state (logits = lm_head(final_hidden)).
        """
        self._captured.clear()
        self.decoder(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                     use_cache=past_key_values is not None)
        layer_hidden = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1)  # (B, S, L*d)
        final_hidden = self._captured["final"]  # (B, S, d)
        self._captured.clear()
        return layer_hidden, final_hidden


def sliding_window_of(config) -> tuple[int | None, bool]:
    """(window, per layer type) when some layer attends through a sliding window, else (None, False)."""
    cfg = getattr(config, "text_config", None) or config
    window = getattr(cfg, "sliding_window", None)
    types = list(getattr(cfg, "layer_types", None) or [])
    slides = bool(window) and ("sliding_attention" in types if types else getattr(cfg, "use_sliding_window", True))
    return (window, bool(types)) if slides else (None, False)


def load_frozen_embeddings(cfg: TargetConfig, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None) -> tuple[nn.Embedding, nn.Linear]:
    """The target's input embedding and LM head only, read tensor by tensor from its safetensors.

    A drafter needs these two matrices, not the whole target: loading them alone keeps a second
    copy of the target out of every training rank. Tied embeddings give one shared tensor.
    The embedding is the stored rows as they are: no family scale (Gemma-2/3 multiply by sqrt(d) inside
    their own forward pass, HF's Gemma-3 inside its embedding module), since vLLM's DSpark/DFlash/Eagle3
    drafters embed with the bare target table too (docs/targets.md, "What a drafter sees").
    Returns (embed_tokens (V, d), lm_head (V, d)), frozen.
    """
    from safetensors import safe_open

    path = Path(resolve_target_path(cfg.name_or_path))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(cfg.name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code(cfg))
    text = getattr(config, "text_config", None) or config
    index = path / "model.safetensors.index.json"
    files = ({name: path / f for name, f in json.loads(index.read_text())["weight_map"].items()} if index.exists()
             else {name: path / "model.safetensors" for name in safe_open(path / "model.safetensors", "pt").keys()})

    def read(suffix: str) -> torch.Tensor | None:
        names = [n for n in files if n.endswith(suffix)]
        if not names:
            return None
        name = min(names, key=len)  # the text model's, when a vision tower has its own
        with safe_open(files[name], "pt", device="cpu") as f:
            return f.get_tensor(name)

    embed_w = read("embed_tokens.weight")
    if embed_w is None:
        raise ValueError(f"{path}: no '*embed_tokens.weight' tensor found in its safetensors")
    head_w = read("lm_head.weight")
    tied = head_w is None or getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    dtype = dtype or embed_w.dtype
    embed = nn.Embedding(*embed_w.shape, _weight=embed_w.to(device, dtype), _freeze=True)
    head = nn.Linear(embed_w.shape[1], embed_w.shape[0], bias=False, device="meta")
    head.weight = embed.weight if tied else nn.Parameter(head_w.to(device, dtype), requires_grad=False)
    return embed, head
