"""Train the digit classifier and the class-conditional DiT shipped in examples/digits/weights/.

    PYTHONPATH=. python examples/digits/train.py            # the exact command that made the shipped weights

Data: scikit-learn's 8x8 digits, bilinear-upscaled to 32x32, one channel, pixel space in [-1, 1]; a fixed
80/20 split (seed 0). The classifier trains on the 80 % (with random shifts of up to 2 pixels) and reports
its accuracy on the held-out 20 %. The DiT (`DiTTransformer2DModel`, 8 layers, hidden 64, patch 2: 16x16
tokens) learns epsilon under a cosine DDPM schedule on the same 80 %, with 10 % label dropout (the null
class used for classifier-free guidance) and an EMA of the weights, which is what ships (fp16).
Deterministic for a given torch build and thread count (1 thread by default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from examples.digits import common


def shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation of each image by up to max_shift pixels (background -1 fills in)."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    size = x.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = pad[i, :, dy: dy + size, dx: dx + size]
    return out


def train_classifier(x, y, x_test, y_test, steps: int, seed: int) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = common.DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(clf(shift(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x_test).argmax(1) == y_test).float().mean().item()
    return clf, acc


def train_dit(x, y, steps: int, batch: int, lr: float, seed: int, log_every: int):
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = common.build_dit().train()
    ema = common.build_dit().eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    noise_sched = DDPMScheduler(**common.SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)

    def lr_at(s: int) -> float:  # linear warmup, then cosine decay to 10 %
        return lr * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))

    ema_decay = 0.998
    log, running, t0 = [], None, time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        x0, labels = x[idx], y[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = model(xt, timestep=t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - t0
            log.append({"step": step + 1, "loss_ema": round(running, 5), "s": round(elapsed, 1)})
            print(f"step {step + 1:5d}/{steps}  loss (running mean) {running:.4f}  {elapsed:7.1f} s", flush=True)
    return ema, log


def save_fp16(module: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in module.state_dict().items()}, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1100, help="DiT optimizer steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest on a shared machine: 2 OpenMP threads with other jobs running ran 4x slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=common.WEIGHTS_DIR)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    x, y, x_test, y_test = common.load_digits()
    t0 = time.perf_counter()
    clf, acc = train_classifier(x, y, x_test, y_test, args.classifier_steps, args.seed)
    clf_s = time.perf_counter() - t0
    print(f"classifier: held-out accuracy {acc:.4f} on {len(x_test)} digits ({clf_s:.0f} s)", flush=True)
    save_fp16(clf, os.path.join(args.out, "classifier.safetensors"))

    t0 = time.perf_counter()
    ema, log = train_dit(x, y, args.steps, args.batch, args.lr, args.seed, args.log_every)
    dit_s = time.perf_counter() - t0
    save_fp16(ema, os.path.join(args.out, "dit_digits.safetensors"))
    # the classifier's verdict on held-out digits after an fp16 round trip (what ships)
    clf16 = common.load_classifier(os.path.join(args.out, "classifier.safetensors"))
    acc16 = (common.classify(clf16, x_test) == y_test).float().mean().item()
    meta = {
        "command": "PYTHONPATH=. python examples/digits/train.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "torch": torch.__version__,
        "dit_config": common.DIT_CONFIG,
        "scheduler_config": common.SCHEDULER_CONFIG,
        "train_digits": len(x), "test_digits": len(x_test),
        "classifier_heldout_accuracy": round(acc16, 4),
        "classifier_train_s": round(clf_s, 1),
        "dit_train_s": round(dit_s, 1),
        "dit_final_loss": log[-1]["loss_ema"],
        "dit_params": sum(p.numel() for p in ema.parameters()),
        "loss_log": log,
        "note": "wall times on a 2-core machine shared with other jobs",
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"DiT: {meta['dit_params']} parameters, final loss {log[-1]['loss_ema']:.4f}, {dit_s:.0f} s; "
          f"weights in {args.out}")


if __name__ == "__main__":
    main()
