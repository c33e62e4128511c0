"""The configurations of the differential sweep (`test_sweep.py`): built-in model x resolution x batch x
N stages x M patches x every legal cut x warmup, each compiled fresh and compared with the eager reference.

Every legal cut: an explicit `partition` (self-attention layers per stage) for every composition of the model's
self-attention layer count into N positive parts; `layer_cuts` places each cut at the last cut candidate
before the next stage's first layer, so the compositions are exactly the cut positions the planner can choose
between layers. The depths are the built-in configs' (4 self-attention layers; HunyuanDiT 6, for nested long
skips across the cuts), except Flux with 2 single-stream blocks instead of 4 (the same three kinds of cut, in
7 partitions instead of 25, each traced faster): small enough for the cuts to be exhaustive.

`full()` is the whole product (`len(full())` configs); `sample(k, seed)` a deterministic, seeded sample of k of
them that covers every model x N and every value of every other dimension before it repeats one; `small()` is
the sample `make test` runs (every cut of Flux at N = 2 and 3, every cut of PixArt, and a few of the others).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable

import torch

from pipefusion_compile.models import cogvideox, dit, flux, hunyuan_dit, ltx_video, pixart, sd3, wan

STEPS = 4                # DDIM steps per configuration (so warmup 2 still leaves two pipelined steps)
STAGES = (2, 3, 4)
PATCHES = (1, 2, 3, 4)   # M = 3 (and M = 4 on 6 or 7 rows) gives uneven bands
BATCHES = (1, 2)
WARMUPS = (0, 1, 2)


def _resized(factory: Callable, shape: tuple[int, ...]) -> Callable:
    """`factory`'s model with an image input of another spatial size (a size the model accepts without a new
    config: its positional table is computed for the input's size)."""
    def make(**kw):
        model, kwargs = factory(**kw)
        b, c = kwargs["hidden_states"].shape[:2]
        kwargs["hidden_states"] = torch.randn(b, c, *shape)
        return model, kwargs
    return make


def _hunyuan_non_square(height: int, width: int) -> Callable:
    """HunyuanDiT at another latent size: the pipeline's 2-D RoPE for that grid."""
    def make(**kw):
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        model, kwargs = hunyuan_dit(**kw)
        b, c = kwargs["hidden_states"].shape[:2]
        kwargs["hidden_states"] = torch.randn(b, c, height, width)
        grid = (height // 2, width // 2)
        head_dim = model.config.attention_head_dim
        kwargs["image_rotary_emb"] = get_2d_rotary_pos_embed(head_dim, ((0, 0), grid), grid, output_type="pt")
        return model, kwargs
    return make


def _with(factory: Callable, **fixed) -> Callable:
    return lambda **kw: factory(**fixed, **kw)


# model -> (self-attention layers, {resolution name: factory(batch=...) -> (model, kwargs)}); the first
# resolution is the built-in default, the second a non-square or other-size input the model accepts
MODELS: dict[str, tuple[int, dict[str, Callable]]] = {
    "pixart": (4, {"16x16": pixart, "12x20": _resized(pixart, (12, 20))}),
    "dit": (4, {"16x16": dit, "12x12": _resized(dit, (12, 12))}),  # DiT's unpatchify needs a square input
    "ltx_video": (4, {"2x8x8": ltx_video, "3x4x6": _with(ltx_video, frames=3, height=4, width=6)}),
    "hunyuan_dit": (6, {"16x16": hunyuan_dit, "12x20": _hunyuan_non_square(12, 20)}),
    "wan": (4, {"4x8x8": wan, "3x6x10": _with(wan, frames=3, height=6, width=10)}),
    "sd3": (4, {"16x16": sd3, "12x16": _resized(sd3, (12, 16))}),  # SD3 crops its table: up to the config size
    # 2 double- + 2 single-stream blocks: cuts between two double-stream blocks, right after the first
    # single-stream block's cat([text, image]), and between two single-stream blocks
    "flux": (4, {"8x8": _with(flux, num_single_layers=2),
                 "6x10": _with(flux, num_single_layers=2, height=6, width=10)}),
    # CogVideoX's sin-cos table is built for the config's sample size: the other size is another config
    "cogvideox": (4, {"4x8x8": cogvideox, "3x6x10": _with(cogvideox, frames=3, height=6, width=10)}),
    "cogvideox_rope": (4, {"4x8x8": _with(cogvideox, rope=True),
                           "3x6x10": _with(cogvideox, rope=True, frames=3, height=6, width=10)}),
    "cogvideox_1_5": (4, {"8x8x8": _with(cogvideox, frames=8, rope=True, patch_size_t=2),
                          "6x6x10": _with(cogvideox, frames=6, height=6, width=10, rope=True, patch_size_t=2)}),
}

# token rows (what M is bounded by) per model and resolution: image rows / patch size, latent frames (video
# split into whole frames; CogVideoX 1.5 patches frames in pairs), or tokens (LTX-Video's packed sequence)
TOKEN_ROWS = {
    ("pixart", "16x16"): 8, ("pixart", "12x20"): 6, ("dit", "16x16"): 8, ("dit", "12x12"): 6,
    ("ltx_video", "2x8x8"): 128, ("ltx_video", "3x4x6"): 72, ("hunyuan_dit", "16x16"): 8,
    ("hunyuan_dit", "12x20"): 6, ("wan", "4x8x8"): 4, ("wan", "3x6x10"): 3, ("sd3", "16x16"): 8,
    ("sd3", "12x16"): 6, ("flux", "8x8"): 64, ("flux", "6x10"): 60, ("cogvideox", "4x8x8"): 4,
    ("cogvideox", "3x6x10"): 3, ("cogvideox_rope", "4x8x8"): 4, ("cogvideox_rope", "3x6x10"): 3,
    ("cogvideox_1_5", "8x8x8"): 4, ("cogvideox_1_5", "6x6x10"): 3,
}


@dataclass(frozen=True)
class Config:
    model: str
    resolution: str
    batch: int
    stages: int
    patches: int
    partition: tuple[int, ...]
    warmup: int

    @property
    def id(self) -> str:
        cut = "-".join(map(str, self.partition))
        return (f"{self.model}-{self.resolution}-b{self.batch}-N{self.stages}-M{self.patches}-p{cut}"
                f"-w{self.warmup}")

    @property
    def reference_key(self) -> tuple:
        """What the eager reference's result depends on (not N nor the cuts: one reference run serves all)."""
        return (self.model, self.resolution, self.batch, self.patches, self.warmup)

    def build(self):
        """(model, example kwargs), freshly constructed (seeded)."""
        return MODELS[self.model][1][self.resolution](batch=self.batch)


def compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to write `total` as an ordered sum of `parts` positive ints (a partition list per cut)."""
    out = []
    for bars in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *bars, total)
        out.append(tuple(b - a for a, b in zip(bounds, bounds[1:])))
    return out


def full() -> list[Config]:
    """The whole sweep, ordered so that configurations sharing a reference run are adjacent."""
    configs = []
    for model, (layers, resolutions) in MODELS.items():
        for resolution in resolutions:
            rows = TOKEN_ROWS[(model, resolution)]
            for batch, patches, warmup in itertools.product(BATCHES, PATCHES, WARMUPS):
                if patches > rows:
                    continue
                for stages in STAGES:
                    for partition in compositions(layers, stages):
                        configs.append(Config(model, resolution, batch, stages, patches, partition, warmup))
    return configs


def sample(k: int, seed: int = 0, start: int = 0) -> list[Config]:
    """A deterministic sample of `k` configurations of `full()`: rounds over the model x N cells (in a seeded
    order), each round taking one not-yet-taken configuration per cell, chosen to bring the cell's least-seen
    values of the other dimensions (resolution, batch, M, warmup, cut) first; returned in `full()` order.
    The choice does not depend on `k`, so a larger sample contains a smaller one: `start` leaves out the first
    `start` chosen (`sample(500, start=250)` is what `sample(500)` adds to `sample(250)`)."""
    rng = random.Random(seed)
    cells: dict[tuple, list[Config]] = {}
    for c in full():
        cells.setdefault((c.model, c.stages), []).append(c)
    for pool in cells.values():
        rng.shuffle(pool)
    seen: dict[tuple, dict] = {key: {} for key in cells}
    order = list(cells)
    rng.shuffle(order)
    chosen: list[Config] = []
    while len(chosen) < k and any(cells.values()):
        for key in order:
            pool = cells[key]
            if not pool or len(chosen) >= k:
                continue
            counts = seen[key]

            def novelty(c: Config) -> tuple:
                dims = (("r", c.resolution), ("b", c.batch), ("m", c.patches), ("w", c.warmup), ("p", c.partition))
                return tuple(sorted(counts.get(d, 0) for d in dims))

            best = min(range(len(pool)), key=lambda i: novelty(pool[i]))
            c = pool.pop(best)
            for d in (("r", c.resolution), ("b", c.batch), ("m", c.patches), ("w", c.warmup), ("p", c.partition)):
                counts[d] = counts.get(d, 0) + 1
            chosen.append(c)
    position = {c: i for i, c in enumerate(full())}
    return sorted(chosen[start:], key=position.get)


def small(seed: int = 0) -> list[Config]:
    """The sample of the normal test suite: every cut of Flux at N = 2 and N = 3 (cuts right after a joint
    `cat([text, image])` among them) and every cut of PixArt at N = 2, 3, 4, the other dimensions drawn per
    configuration (seeded); plus one configuration of each other model."""
    rng = random.Random(seed)
    out = []
    for model, stage_counts in (("flux", (2, 3)), ("pixart", (2, 3, 4))):
        layers, resolutions = MODELS[model]
        for stages in stage_counts:
            for partition in compositions(layers, stages):
                resolution = rng.choice(list(resolutions))
                patches = rng.choice([m for m in PATCHES if m <= TOKEN_ROWS[(model, resolution)]])
                out.append(Config(model, resolution, rng.choice(BATCHES), stages, patches, partition,
                                  rng.choice(WARMUPS)))
    everything = full()
    for model in MODELS:
        if model not in ("flux", "pixart"):
            out.append(rng.choice([c for c in everything if c.model == model]))
    return out
