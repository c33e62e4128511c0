"""An independent, plainly written eager PipeFusion, for checking the compiled backend.

It knows nothing of graphs. It installs an attention processor on every self-attention module of a diffusers
DiT and, for each patch of a step, runs the *whole* model on the full sequence, with each self-attention's
K/V assembled as PipeFusion defines them:

    tokens of patches already done this step   -> their K/V from this step (fresh)
    tokens of the current patch                -> K/V computed now (fresh)
    tokens of patches not yet done this step    -> K/V from the previous step (stale)

and keeps only the current patch's rows of the output. Warmup steps run the model plainly and record all K/V.
Slow (M full forwards per step) and obviously right, which is the point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class StaleKVProcessor:
    """Self-attention with PipeFusion's K/V. One instance per attention module (it owns that layer's K/V)."""

    def __init__(self, driver: "ReferencePipeFusion"):
        self.driver = driver
        self.previous = None   # (k, v) of the whole sequence at the previous step
        self.current = None    # (k, v) being filled during this step

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is None and attention_mask is None, "self-attention only"
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)

        lo, hi = self.driver.token_range
        if self.current is None:
            self.current = (torch.zeros_like(k), torch.zeros_like(v))
        ck, cv = self.current
        ck[:, :, lo:hi] = k[:, :, lo:hi]
        cv[:, :, lo:hi] = v[:, :, lo:hi]
        if self.driver.warmup:
            k_used, v_used = k, v
        else:
            pk, pv = self.previous
            k_used = torch.cat([ck[:, :, :hi], pk[:, :, hi:]], dim=2)
            v_used = torch.cat([cv[:, :, :hi], pv[:, :, hi:]], dim=2)

        out = F.scaled_dot_product_attention(q, k_used, v_used)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def end_step(self):
        self.previous = tuple(t.clone() for t in self.current)


class ReferencePipeFusion:
    """Call it like the model: one call = one diffusion step. `reset()` starts a new generation."""

    def __init__(self, model, num_patches: int, warmup_steps: int = 1):
        self.model = model
        self.num_patches = num_patches
        self.warmup_steps = warmup_steps
        self.step = 0
        self.warmup = True
        self.token_range = (0, 0)
        self.processors = {}
        for name, module in model.named_modules():
            # PixArt and DiT blocks: attn1 is self-attention over the image tokens, attn2 cross-attention.
            if name.endswith("attn1"):
                self.processors[name] = StaleKVProcessor(self)
                module.set_processor(self.processors[name])

    def reset(self):
        self.step = 0

    @staticmethod
    def bands(rows: int, num_patches: int) -> list[tuple[int, int]]:
        """Equal row bands; when M does not divide the rows the earlier bands get one more row."""
        q, r = divmod(rows, num_patches)
        out, start = [], 0
        for j in range(num_patches):
            n = q + (1 if j < r else 0)
            out.append((start, n))
            start += n
        return out

    @torch.no_grad()
    def __call__(self, hidden_states, **kwargs):
        p = self.model.config.patch_size
        height, width = hidden_states.shape[-2:]
        rows, cols = height // p, width // p
        self.warmup = self.step < self.warmup_steps
        patches = [(0, rows)] if self.warmup else self.bands(rows, self.num_patches)
        result = None
        for row0, n in patches:
            self.token_range = (row0 * cols, (row0 + n) * cols)
            out = self.model(hidden_states, **kwargs, return_dict=False)[0]
            if result is None:
                result = torch.empty_like(out)
            result[..., row0 * p:(row0 + n) * p, :] = out[..., row0 * p:(row0 + n) * p, :]
        for proc in self.processors.values():
            proc.end_step()
        self.step += 1
        return result
