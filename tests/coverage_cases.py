from dataclasses import dataclass
from typing import Callable
import torch

@dataclass(frozen=True)
class Case:
    name: str                                   # the diffusers class name
    build: Callable[[], tuple[torch.nn.Module, dict]]  # seeded model in eval() with random weights, and the forward kwargs
                                                # (hidden_states + the rest; CFG batch 2; no return_dict)
    text_tokens: int = 0                        # text tokens in a joint text+image attention sequence (for the reference)
    text_first: bool = False                    # text before image in that sequence
    layout: "ImageLayout | None" = None         # reference's image layout when ImageLayout.of cannot tell it (see tests/reference_pipefusion.py)
    options: tuple = ()                         # backend options the class needs, as (key, value) pairs (ideally none)
    skip: str | None = None                     # why it is not built (not a latent denoiser, needs weights, ...)
