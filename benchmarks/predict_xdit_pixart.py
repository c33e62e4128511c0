"""parallel='auto''s prediction for xDiT's published PixArt-alpha 1024px latency on 4 x A100 PCIe.

    python benchmarks/predict_xdit_pixart.py

PixArt-alpha at 1024 px (PixArtTransformer2DModel: 28 layers, 16 x 72 heads, 128 x 128 latent, patch 2 = 4096
tokens, 120 prompt tokens; random weights, 607 M parameters), batch 2 (cond + uncond), 20 steps. Published (xDiT,
DESIGN.md section 7): serial 2.085 s, PipeFusion on 4 x A100 PCIe 0.866 s. The compute rate is calibrated on the
published serial latency (its FLOPs per step / (2.085 s / 20 - per-call overhead)); the link is PCIe 4.0 x16's
public 25 GB/s with 10 us latency; the per-piece and per-call host overheads are the cost model's CUDA
assumptions (60 us, 2 ms). Nothing runs on a GPU: the model is traced and planned on this CPU.
"""
from __future__ import annotations

import torch

from pipefusion_compile import models
from pipefusion_compile.cli import degree_choices

SERIAL_S, PUBLISHED_S, STEPS = 2.085, 0.866, 20
MACHINE = dict(link_bytes_per_s=25e9, link_latency_s=10e-6, piece_overhead_s=60e-6, call_overhead_s=2e-3,
               memory_bytes=40 * 2**30)


def main():
    model, kw = models.pixart(sample_size=128, num_layers=28, heads=16, head_dim=72, batch=2, prompt_tokens=120)
    kw["added_cond_kwargs"] = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2),
                               "aspect_ratio": torch.tensor([[1.0]] * 2)}
    probe = degree_choices(model, kw, 4, {**MACHINE, "flops_per_s": 1e12}, 1, stage_backend="eager")[0]
    pp = next(c for c in probe.candidates if c.cfg == 1 and c.patches == 4)
    step_flops = pp.compute_s * 1e12 * pp.pp   # balanced stages: the slowest stage x N
    rate = step_flops / (SERIAL_S / STEPS - MACHINE["call_overhead_s"])
    choice = degree_choices(model, kw, 4, {**MACHINE, "flops_per_s": rate}, 1, stage_backend="eager")[0]
    print(choice)
    c = choice.chosen
    warmup = SERIAL_S / STEPS    # the warmup step runs the full sequence through the stages in turn
    total = warmup + (STEPS - 1) * c.step_s
    print(f"\nFLOPs per step {step_flops / 1e12:.1f} TFLOP; rate from the published serial {rate / 1e12:.0f} TFLOP/s")
    print(f"predicted: cfg {c.cfg} x pp {c.pp}, M={c.patches}: {total:.3f} s for {STEPS} steps "
          f"(1 warmup + {STEPS - 1} x {c.step_s * 1e3:.1f} ms); published PipeFusion on 4 x A100 PCIe: "
          f"{PUBLISHED_S} s ({total / PUBLISHED_S - 1:+.0%})")


if __name__ == "__main__":
    main()
