"""Image quality under PipeFusion on a trained model: serial DiT vs PipeFusion with stale K/V.

    PYTHONPATH=. python benchmarks/bench_quality.py [--steps 20] [--per-class 5] [--guidance 2.0]

Model: the class-conditional DiT trained on scikit-learn's digits (examples/digits, 32x32 pixels, 16 token
rows, 8 self-attention layers), run in fp32. The same fixed noise (seed 0) and labels (`--per-class` of
each digit) are sampled with DDIM serially and with PipeFusion for N in {2, 4} stages, M in {2, 4, 8}
patches and warmup in {0, 1, 2} steps. PipeFusion runs in simulate mode (all stages in this process): the
same plan, schedule and numbers, bit for bit, as one rank per stage under torchrun (the suite tests that).

Reported per configuration: PSNR of the final images vs serial (whole batch, and the worst single image),
max abs error (images in [-1, 1]), the shipped classifier's accuracy on the generated digits against the
requested labels (serial vs PipeFusion) and how often it gives the two images the same label, and the
relative error ||out_pf - out_serial|| / ||out_serial|| of the model output at every step (plotted).
Writes benchmarks/results/quality.md, quality.json, quality_error_vs_step.png and quality_samples.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from examples.digits import common

RESULTS = os.path.join(ROOT, "benchmarks", "results")
# "keeps quality": final images within this PSNR of serial and classifier accuracy within this many points
PSNR_MIN_DB = 30.0
ACC_MAX_DROP = 2.0


def pipefusion(model, stages: int, patches: int, warmup: int):
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(model, backend="pipefusion", options={
        "num_stages": stages, "num_patches": patches, "warmup_steps": warmup, "stage_backend": "eager"})


def keeps_quality(row) -> bool:
    # on the rounded values the table shows (98.0 - 96.0 is 2.0 points, not 2.0000029)
    return row["psnr_db"] >= PSNR_MIN_DB and round(row["serial_accuracy"] - row["accuracy"], 1) <= ACC_MAX_DROP


def per_image_psnr(a, b):
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-30))


def rel_errors(outs, refs):
    return [((o - r).norm() / r.norm()).item() for o, r in zip(outs, refs)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-class", type=int, default=5)
    p.add_argument("--guidance", type=float, default=common.GUIDANCE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", type=int, nargs="*", default=[2, 4])
    p.add_argument("--patches", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--warmup", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown table from a saved quality*.json")
    args = p.parse_args()
    if args.render:
        with open(args.render) as f:
            summary = json.load(f)
        for row in summary["rows"]:
            row["keeps_quality"] = keeps_quality(row)
        with open(args.render, "w") as f:
            json.dump(summary, f, indent=1)
        write_markdown(summary, args.render[: -len(".json")] + ".md")
        return
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    model = common.load_dit()
    clf = common.load_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    gen = {"steps": args.steps, "seed": args.seed, "guidance": args.guidance}

    t0 = time.perf_counter()
    serial_outs = []
    serial = common.sample(model, labels, record=serial_outs, **gen)
    serial_s = time.perf_counter() - t0
    serial_pred = common.classify(clf, serial)
    serial_acc = 100 * (serial_pred == labels).float().mean().item()
    print(f"serial: {len(labels)} digits, {args.steps} steps, {serial_s:.1f} s, classifier accuracy {serial_acc:.1f} %",
          flush=True)

    rows, curves, images = [], {}, {}
    for n in args.stages:
        for m in args.patches:
            for w in args.warmup:
                compiled = pipefusion(model, n, m, w)
                outs = []
                t0 = time.perf_counter()
                img = common.sample(compiled, labels, record=outs, **gen)
                secs = time.perf_counter() - t0
                pred = common.classify(clf, img)
                acc = 100 * (pred == labels).float().mean().item()
                psnr = common.psnr(img, serial)
                row = {
                    "N": n, "M": m, "warmup": w,
                    "psnr_db": round(psnr, 2),
                    "worst_image_psnr_db": round(per_image_psnr(img, serial).min().item(), 2),
                    "max_abs_err": round((img - serial).abs().max().item(), 4),
                    "accuracy": round(acc, 1),
                    "serial_accuracy": round(serial_acc, 1),
                    "same_label_as_serial": round(100 * (pred == serial_pred).float().mean().item(), 1),
                    "max_step_rel_err": round(max(rel_errors(outs, serial_outs)), 5),
                    "final_step_rel_err": round(rel_errors(outs, serial_outs)[-1], 5),
                    "seconds_simulated": round(secs, 1),
                }
                row["keeps_quality"] = keeps_quality(row)
                rows.append(row)
                curves[f"N={n} M={m} warmup={w}"] = rel_errors(outs, serial_outs)
                images[(n, m, w)] = img
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    # the staleness pattern depends on M and warmup only (patch j sees fresh K/V of patches < j, stale of the
    # rest, whichever stage computes a layer): check that N leaves the images unchanged
    same_across_n = {
        f"M={m} warmup={w}": all(torch.equal(images[(args.stages[0], m, w)], images[(n, m, w)]) for n in args.stages)
        for m in args.patches for w in args.warmup}
    summary = {
        "model": "examples/digits DiT (DiTTransformer2DModel, 32x32 px, patch 2, 16 token rows, 8 layers)",
        "steps": args.steps, "digits": len(labels), "guidance": args.guidance, "seed": args.seed,
        "serial_accuracy": round(serial_acc, 1), "serial_seconds": round(serial_s, 1),
        "criterion": f"PSNR >= {PSNR_MIN_DB} dB and accuracy within {ACC_MAX_DROP} points of serial",
        "rows": rows, "rel_err_per_step": curves,
        "images_identical_across_N": all(same_across_n.values()), "identical_across_N": same_across_n,
    }
    tag = "" if (args.steps, args.guidance) == (20, common.GUIDANCE) else f"_s{args.steps}_g{args.guidance:g}"
    with open(os.path.join(args.out, f"quality{tag}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_markdown(summary, os.path.join(args.out, f"quality{tag}.md"))
    plot_curves(curves, args.steps, args.stages[-1], os.path.join(args.out, f"quality{tag}_error_vs_step.png"))
    worst = min(rows, key=lambda r: r["psnr_db"])
    plot_samples(serial, images[(worst["N"], worst["M"], worst["warmup"])], worst,
                 os.path.join(args.out, f"quality{tag}_samples.png"))
    print(f"wrote {args.out}/quality{tag}.md")


def write_markdown(s, path):
    lines = [
        f"# Quality: serial vs PipeFusion ({s['model']})",
        "",
        (f"{s['digits']} digits (fixed labels, seed {s['seed']}), DDIM {s['steps']} steps, "
         f"guidance {s['guidance']:g}, fp32, PipeFusion in simulate mode (bit-identical to multi-process). "
         f"Serial classifier accuracy: {s['serial_accuracy']} %. Keeps quality = {s['criterion']}."),
        "",
        ("| N | M | warmup | PSNR dB | worst image PSNR dB | max abs err | accuracy % (serial) "
         "| same label as serial % | model-output rel err: median / last step | keeps quality |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        curve = sorted(s["rel_err_per_step"][f"N={r['N']} M={r['M']} warmup={r['warmup']}"])
        lines.append(
            f"| {r['N']} | {r['M']} | {r['warmup']} | {r['psnr_db']:.1f} | {r['worst_image_psnr_db']:.1f} | "
            f"{r['max_abs_err']:.3f} | {r['accuracy']:.1f} ({r['serial_accuracy']:.1f}) | "
            f"{r['same_label_as_serial']:.1f} | {curve[len(curve) // 2]:.3f} / {r['final_step_rel_err']:.3f} | "
            f"{'yes' if r['keeps_quality'] else 'no'} |")
    lines += ["", (f"Images bit-identical for every N at the same M and warmup: "
              f"{'yes' if s['images_identical_across_N'] else 'no: ' + str(s['identical_across_N'])}"), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_curves(curves, steps, n, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    show = [k for k in curves if k.startswith(f"N={n} ")]
    styles = {"warmup=0": "-", "warmup=1": "--", "warmup=2": ":"}
    colors = {}
    for k in show:
        nm, w = k.rsplit(" ", 1)
        color = colors.setdefault(nm, f"C{len(colors)}")
        # warmup steps run the full sequence with fresh K/V: error ~1e-7 or 0, not drawn
        ax.semilogy(range(steps), [e if e >= 1e-5 else float("nan") for e in curves[k]], styles[w], color=color,
                    label=k, lw=1.4, marker=".", ms=3)
    ax.set_xlabel("sampling step (warmup steps, error < 1e-5, not drawn)")
    ax.set_ylabel("||out_pf - out_serial|| / ||out_serial||")
    ax.set_title(f"model output vs serial, per step (digits DiT, DDIM, N={n}; other N: same curves)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(serial, piped, row, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrow = 10
    panels = [common.grid(serial[:50], nrow), common.grid(piped[:50], nrow),
              common.grid((piped[:50] - serial[:50]).abs() * 2 - 1, nrow)]
    titles = ["serial", f"PipeFusion N={row['N']} M={row['M']} warmup={row['warmup']} (worst PSNR)",
              "|difference|"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, im, t in zip(axes, panels, titles):
        ax.imshow(im.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
