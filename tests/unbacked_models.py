"""Plain-PyTorch DiTs whose forward computes a size from a mask (`int(mask.sum())`, `torch.nonzero(mask)`), the
way diffusers DiTs trim the prompt to its valid tokens (QwenImage, Framepack, Lumina2, Mochi). Under
`torch._dynamo.config.capture_scalar_outputs` / `capture_dynamic_output_shape_ops` dynamo traces them into one
graph whose fake tensors carry *unbacked* sizes (u0, u1, ...): the backend specializes such a graph to the
values of the call (see passes/unbacked.py).

Each `make_*()` returns `(model.eval(), kwargs)` (the shared MM-DiT of handwritten_dits: joint attention over
[text | image], text first), with a prompt mask keeping the first `keep` of its `PROMPT` tokens."""
from __future__ import annotations

import torch

import handwritten_dits as hd

# what dynamo needs to trace a data-dependent size into the graph instead of breaking the graph there
UNBACKED_CONFIG = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)


class MaskSumDiT(hd.HandMMDiT):
    """`n = int(mask.sum(1).max())`, then the prompt is cut to its first n tokens (QwenImage's `text_seq_len`)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        n = int(encoder_attention_mask.sum(dim=1).max())
        return super().forward(hidden_states, timestep, encoder_hidden_states[:, :n], return_dict)


class NonzeroDiT(hd.HandMMDiT):
    """The prompt tokens kept are gathered by `torch.nonzero` of the mask (Mochi's processor keeps the valid
    tokens of a sample with `nonzero`): the prompt's length is the number of nonzero mask entries."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        keep = torch.nonzero(encoder_attention_mask[0]).flatten()
        return super().forward(hidden_states, timestep, encoder_hidden_states[:, keep], return_dict)


def prompt_mask(keep: int, batch: int = hd.BATCH, tokens: int = hd.PROMPT) -> torch.Tensor:
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[:, :keep] = True
    return mask


def _kwargs(keep: int) -> dict:
    kwargs = hd._prompt_kwargs()
    kwargs["encoder_attention_mask"] = prompt_mask(keep)
    return kwargs


def make_mask_sum_dit(keep: int = 4):
    torch.manual_seed(0)
    model = MaskSumDiT()
    return model.eval(), _kwargs(keep)


def make_nonzero_dit(keep: int = 4):
    torch.manual_seed(0)
    model = NonzeroDiT()
    return model.eval(), _kwargs(keep)
