"""A diffusers pipeline whose transformer runs as a PipeFusion pipeline, one stage per rank.

CPU, tiny random-weight model (the default, what CI runs):

    torchrun --standalone --nproc-per-node 2 examples/torchrun_dit_pipeline.py --patches 4

GPUs, real weights (documented, not run in CI; needs the weights in the Hugging Face cache):

    torchrun --standalone --nproc-per-node 2 examples/torchrun_dit_pipeline.py \\
        --real-weights facebook/DiT-XL-2-256 --device cuda --steps 25 --patches 4

Several machines: start the same command on each, with torchrun's rendezvous instead of --standalone
(`--nnodes 2 --node-rank K --rdzv-backend c10d --rdzv-endpoint HOST:PORT`); the process group spans the
machines and the backend needs nothing else.

The pipeline's own loop, classifier-free guidance (batch 2 inside the transformer) and scheduler are
unchanged: every rank gets the full model output each step and steps its scheduler identically. Rank 0
first runs the same generation serially (before compiling: with release_params each rank frees the
weights its stage never reads) and prints the plan, the time per generation and the difference.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import numpy as np
import torch
import torch.distributed as dist


def tiny_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=4, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        out_channels=8, patch_size=2, num_embeds_ada_norm=1000,  # DiTPipeline's "no class" label is 1000
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    )
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler(num_train_timesteps=1000))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--labels", type=int, nargs="*", default=[1, 7])
    parser.add_argument("--real-weights", default=None, help="a DiT checkpoint id (GPUs; not run in CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default=None, help="rank 0 saves the pipelined images here (.npy)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    if device.type == "cpu":
        torch.set_num_threads(1)

    if args.real_weights:
        from diffusers import DiTPipeline

        pipe = DiTPipeline.from_pretrained(args.real_weights, torch_dtype=torch.float16)
    else:
        pipe = tiny_pipeline()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=rank != 0)

    def generate():
        t0 = time.perf_counter()
        images = pipe(class_labels=args.labels, num_inference_steps=args.steps, output_type="np",
                      generator=torch.Generator(device="cpu").manual_seed(0)).images
        return images, time.perf_counter() - t0

    serial = None
    if rank == 0:
        serial, serial_s = generate()
    dist.barrier()

    pipe.transformer = torch.compile(pipe.transformer, backend="pipefusion", options={
        # a pipeline over every rank (left out, parallel='auto' may split the CFG batch over the ranks instead)
        "num_stages": dist.get_world_size(), "num_patches": args.patches, "stage_backend": "eager" if device.type == "cpu" else "inductor",
        "timeout_s": args.timeout})
    generate()  # compiles the stage graphs
    images, piped_s = generate()

    import pipefusion_compile

    (program,) = pipefusion_compile.programs(pipe.transformer)
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([float(np.abs(images).sum())]))
    if rank == 0:
        print(program.plan)
        print(f"\nranks agree on the output: {len({float(g) for g in gathered}) == 1}")
        print(f"serial {serial_s:.2f} s, PipeFusion {piped_s:.2f} s per generation of {args.steps} steps "
              f"(tiny models gain little: the per-patch overhead dominates)")
        print(f"max |PipeFusion - serial| over the images: {np.abs(images - serial).max():.4f} "
              f"(stale K/V after {program.options.warmup_steps} warmup step; random weights)")
        print(f"bytes sent per step by rank 0: {program.stats['bytes_sent']} (plan: "
              f"{program.plan.p2p_bytes_per_step(0)})")
        if args.out:
            np.save(args.out, images)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
