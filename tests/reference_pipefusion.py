"""An independent, plainly written eager PipeFusion, for checking the compiled backend.

It knows nothing of graphs. While the model runs, it intercepts every call of
`torch.nn.functional.scaled_dot_product_attention` (the one attention entry point of diffusers' processors).
A call whose query and keys both span the image tokens is a self-attention layer (numbered by call order
within the forward); its K/V are assembled as PipeFusion defines them:

    tokens of patches already done this step   -> their K/V from this step (fresh)
    tokens of the current patch                -> K/V computed now (fresh)
    tokens of patches not yet done this step   -> K/V from the previous step (stale)

For each patch of a step the *whole* model runs on the full sequence, and only the patch's rows of the
output are kept. Warmup steps run the model plainly and record all K/V. Slow (M full forwards per step)
and obviously right, which is the point.

Joint text+image attention (SD3, Flux, CogVideoX): the attention sequence is [image | text] or [text | image]; the
text is one more patch at its place in that sequence (run once per step, in sequence order with the
bands, only to refresh its K/V), and with one patch the whole joint sequence is that patch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ImageLayout:
    """How the model's image tokens are laid out, in the terms PipeFusion splits them by."""

    rows: int            # token rows of the image (patches are bands of these)
    tokens_per_row: int  # tokens per row in the attention sequence
    out_axis: int        # output axis that carries the rows
    out_per_row: int     # output elements per token row along `out_axis`

    @classmethod
    def of(cls, model, hidden_states: torch.Tensor) -> "ImageLayout":
        if hidden_states.dim() == 3:  # packed tokens [B, S, C]: one token per "row"
            return cls(hidden_states.shape[1], 1, 1, 1)
        p = model.config.patch_size
        if hidden_states.dim() == 5:  # video [B, C, F, H, W] with (pt, ph, pw) patches: bands of frames
            pt, ph, pw = p
            frames, height, width = hidden_states.shape[-3:]
            return cls(frames // pt, (height // ph) * (width // pw), 2, pt)
        height, width = hidden_states.shape[-2:]
        return cls(height // p, width // p, hidden_states.dim() - 2, p)


def bands(rows: int, num_patches: int) -> list[tuple[int, int]]:
    """Equal row bands; when M does not divide the rows the earlier bands get one more row."""
    q, r = divmod(rows, num_patches)
    out, start = [], 0
    for j in range(num_patches):
        n = q + (1 if j < r else 0)
        out.append((start, n))
        start += n
    return out


class ReferencePipeFusion:
    """Call it like the model's forward (returns the output tensor): one call = one diffusion step."""

    def __init__(self, model, num_patches: int, warmup_steps: int = 1, text_tokens: int = 0,
                 text_first: bool = False, layout: ImageLayout | None = None):
        self.model = model
        self.num_patches = num_patches
        self.warmup_steps = warmup_steps
        self.text_tokens = text_tokens  # text tokens in the joint attention sequence (0: image only)
        self.text_first = text_first
        self.layout = layout  # None: derived from the input's shape (`ImageLayout.of`)
        self.step = 0
        self.previous: list[tuple[torch.Tensor, torch.Tensor]] = []  # per self-attention layer, last step
        self.current: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer, being filled this step

    def reset(self):
        self.step = 0
        self.previous = []

    @contextlib.contextmanager
    def _stale_attention(self, num_tokens: int, lo: int, hi: int, warmup: bool):
        original = F.scaled_dot_product_attention
        layer = 0

        def attention(query, key, value, *args, **kwargs):
            nonlocal layer
            if query.shape[-2] != num_tokens or key.shape[-2] != num_tokens:
                return original(query, key, value, *args, **kwargs)  # cross-attention over the prompt
            if len(self.current) <= layer:
                self.current.append((torch.zeros_like(key), torch.zeros_like(value)))
            ck, cv = self.current[layer]
            ck[..., lo:hi, :] = key[..., lo:hi, :]
            cv[..., lo:hi, :] = value[..., lo:hi, :]
            if not warmup:
                # warmup_steps=0: the first step's "previous" K/V are the zero-initialised caches
                pk, pv = self.previous[layer] if self.previous else (torch.zeros_like(ck), torch.zeros_like(cv))
                key = torch.cat([ck[..., :hi, :], pk[..., hi:, :]], dim=-2)
                value = torch.cat([cv[..., :hi, :], pv[..., hi:, :]], dim=-2)
            layer += 1
            return original(query, key, value, *args, **kwargs)

        F.scaled_dot_product_attention = attention
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original

    @torch.no_grad()
    def __call__(self, hidden_states, **kwargs):
        layout = self.layout or ImageLayout.of(self.model, hidden_states)
        image_tokens = layout.rows * layout.tokens_per_row
        num_tokens = image_tokens + self.text_tokens
        image_at = self.text_tokens if self.text_first else 0  # where the image tokens start in the sequence
        warmup = self.step < self.warmup_steps
        one_patch = warmup or (self.text_tokens and self.num_patches == 1)
        # (first row, rows, token range in the attention sequence), in sequence order; rows None = text
        pieces = [(row0, n, image_at + row0 * layout.tokens_per_row, image_at + (row0 + n) * layout.tokens_per_row)
                  for row0, n in ([(0, layout.rows)] if one_patch else bands(layout.rows, self.num_patches))]
        if one_patch:
            pieces = [(0, layout.rows, 0, num_tokens)]
        elif self.text_tokens:
            text = (None, None, 0, self.text_tokens) if self.text_first else (None, None, image_tokens, num_tokens)
            pieces = [text, *pieces] if self.text_first else [*pieces, text]
        result = None
        for row0, n, lo, hi in pieces:
            with self._stale_attention(num_tokens, lo, hi, warmup):
                out = self.model(hidden_states, **kwargs, return_dict=False)[0]
            if result is None:
                result = torch.empty_like(out)
            if row0 is None:
                continue  # the text piece only refreshes the text K/V
            a, k = layout.out_axis, layout.out_per_row
            result.narrow(a, row0 * k, n * k).copy_(out.narrow(a, row0 * k, n * k))
        self.previous = [(k.clone(), v.clone()) for k, v in self.current]
        self.step += 1
        return result
