"""One micro-batch: sample anchors (block drafters), run the drafter, compute its loss.

``DrafterWithLoss`` is the module DeepSpeed wraps: its forward takes a padded batch and returns
the loss with its metric sums, so the engine's hooks (ZeRO-3 gathering, bf16 casting) see every
parameter use.
"""
from __future__ import annotations

from torch import nn

from deepspec.config.train import LossConfig
from deepspec.drafters.blocks import make_blocks, sample_anchors
from deepspec.losses import block_draft_loss, eagle3_loss


class DrafterWithLoss(nn.Module):
    def __init__(self, drafter: nn.Module, kind: str, loss: LossConfig):
        super().__init__()
        self.drafter, self.kind, self.loss_cfg = drafter, kind, loss

    def forward(self, batch: dict, anchor_seed: int = 0) -> dict:
        """batch from ``training.data.collate`` (on the engine's device) -> {"loss", metric sums...}.

        Anchors of sample i are drawn with seed (anchor_seed, sample_seed[i]).
        """
        d = self.drafter
        dtype = d.fc.weight.dtype
        hidden, final = batch["hidden"].to(dtype), batch["final_hidden"].to(dtype)
        loss_mask = batch["loss_mask"] * batch["valid"]
        if self.kind == "chain":
            h = d(hidden, batch["input_ids"], batch["valid"])
            return eagle3_loss(d, h, loss_mask, batch["valid"], final, self.loss_cfg, d.cfg.step_loss_decay,
                               d.cfg.loss_normalization, batch.get("final_valid"))
        seeds = [(anchor_seed * 1_000_003 + int(s)) % 2**63 for s in batch["sample_seed"].tolist()]
        anchors, keep = sample_anchors(loss_mask, d.cfg.num_anchors, seeds)
        blocks = make_blocks(batch["input_ids"], loss_mask, anchors, keep, d.cfg.block_size, d.cfg.mask_token_id)
        h = d(hidden, batch["valid"], blocks)
        return block_draft_loss(d, h, blocks, final, self.loss_cfg)


def anchor_seed(seed: int, step: int) -> int:
    """Anchors depend on (seed, optimizer step, sample): a resumed run, or one with another number of
    ranks, samples the same anchors for the same sample at the same step."""
    return seed * 1_000_003 + step
