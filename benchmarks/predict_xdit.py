"""parallel='auto''s prediction for xDiT's published latencies, with their hardware's public figures.

    python benchmarks/predict_xdit.py [--cases pixart sd3]

Nothing runs on a GPU: each model is built at its published size with random weights, traced and planned on this
CPU, and the cost model predicts its step with the machine constants below. The compute rate is calibrated on
the published serial latency (the graph's FLOPs per step / (serial s / steps - per-call overhead)); the per-piece
and per-call host overheads are the cost model's CUDA assumptions (60 us, 2 ms), a small NCCL all-to-all
within a node is assumed 25 us.

  pixart  PixArt-alpha 1024 px (PixArtTransformer2DModel: 28 layers, 16 x 72 heads, 128 x 128 latent, patch 2 =
          4096 tokens, 120 prompt tokens, 607 M parameters), batch 2 (cond + uncond), 20 steps. Published (xDiT,
          DESIGN.md section 7): serial 2.085 s, PipeFusion on 4 x A100 PCIe 0.866 s. Link: PCIe 4.0 x16, 25 GB/s
          + 10 us.
  sd3     SD3-medium 1024 px (SD3Transformer2DModel: 24 joint layers, 24 x 64 heads, 128 x 128 latent, patch 2 =
          4096 image tokens + 333 prompt tokens; the builder's small text projections, which do not change the
          FLOPs that matter), batch 2, 20 steps (assumed: xDiT's benchmarks' default). Published (xDiT, the issue
          this was built for): serial 3.09 s, CFG-parallel 2 x PipeFusion 4 on 8 x A100 0.90 s. Link: NVLink 3
          (A100 SXM, 300 GB/s per direction) + 5 us.
"""
from __future__ import annotations

import argparse

import torch

from pipefusion_compile import models
from pipefusion_compile.cli import degree_choices, plan_graphs

CUDA = dict(piece_overhead_s=60e-6, call_overhead_s=2e-3, collective_s=25e-6, memory_bytes=40 * 2**30)
CASES = {
    "pixart": dict(world=4, serial_s=2.085, published_s=0.866, steps=20, published="PipeFusion on 4 x A100 PCIe",
                   machine=dict(CUDA, link_bytes_per_s=25e9, link_latency_s=10e-6)),
    "sd3": dict(world=8, serial_s=3.09, published_s=0.90, steps=20,
                published="CFG-parallel 2 x PipeFusion 4 on 8 x A100",
                machine=dict(CUDA, link_bytes_per_s=300e9, link_latency_s=5e-6, memory_bytes=80 * 2**30)),
}


def build(case: str):
    if case == "pixart":
        model, kw = models.pixart(sample_size=128, num_layers=28, heads=16, head_dim=72, batch=2, prompt_tokens=120)
        kw["added_cond_kwargs"] = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2),
                                   "aspect_ratio": torch.tensor([[1.0]] * 2)}
        return model, kw
    return models.sd3(sample_size=128, num_layers=24, heads=24, head_dim=64, batch=2, prompt_tokens=333)


def predict(case: str) -> str:
    spec = CASES[case]
    model, kw = build(case)
    (plan,) = plan_graphs(model, kw, num_stages=1, num_patches=1, stage_backend="eager")
    step_flops = plan.total_flops
    rate = step_flops / (spec["serial_s"] / spec["steps"] - CUDA["call_overhead_s"])
    choice = degree_choices(model, kw, spec["world"], {**spec["machine"], "flops_per_s": rate}, 1,
                            stage_backend="eager")[0]
    c = choice.chosen
    warmup = spec["serial_s"] / spec["steps"]   # the warmup step runs the full sequence through the stages in turn
    total = warmup + (spec["steps"] - 1) * c.step_s
    return "\n".join([
        str(choice), "",
        f"{case}: FLOPs per step {step_flops / 1e12:.1f} TFLOP; rate from the published serial "
        f"{rate / 1e12:.0f} TFLOP/s",
        f"predicted: {c.label} ({c.form}): {total:.3f} s for {spec['steps']} steps (1 warmup + {spec['steps'] - 1} "
        f"x {c.step_s * 1e3:.1f} ms); published {spec['published']}: {spec['published_s']} s "
        f"({total / spec['published_s'] - 1:+.0%})"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args(argv)
    for case in args.cases:
        print(predict(case), flush=True)
        print()


if __name__ == "__main__":
    main()
