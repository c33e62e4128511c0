"""The coverage table: every diffusers transformer class that denoises latents (tests/coverage_cases.py), built
tiny with random weights, through the backend: traced graphs, plan, M=1 == plain, M=4 == the eager reference,
(with --ranks) 2 real ranks == simulate, and the first error.

    python benchmarks/coverage.py [--only NAME...] [--ranks] [--out benchmarks/results/coverage.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

from coverage_cases import all_cases  # noqa: E402
from coverage_runner import run_case  # noqa: E402

COLUMNS = ("class", "traced graphs", "plan", "M=1 == plain", "M=4 == reference", "2 ranks == simulate", "s",
           "first error")


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def row_cells(r) -> list[str]:
    return [cell(c) for c in (f"`{r.name}`", r.graphs, r.plan, r.m1_equal_plain, r.m4_equal_reference,
                              r.ranks2_equal_simulate, f"{r.seconds:.1f}", r.error)]


def read_rows(path: str) -> dict[str, list[str]]:
    """The rows of a table this script wrote, by class name (for --update)."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.startswith("| `"):
                cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
                rows[cells[0].strip("`")] = cells
    return rows


def table(rows: list[list[str]], title: str) -> str:
    built = [r for r in rows if not r[7].startswith("skip:")]
    passed = [r for r in built if r[4] == "yes"]
    classes = {r[0].strip("`").split("[")[0] for r in built}  # a class's extra cases (e.g. [2f]) count once
    passed_classes = {r[0].strip("`") for r in passed} & classes
    lines = [f"# {title}", "",
             f"{time.strftime('%Y-%m-%d')}, diffusers {__import__('diffusers').__version__}, torch {torch.__version__}, "
             "N = 2 stages, M = 4 patches, warmup 1, 3 DDIM steps, eager stages, CPU, 1 thread.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    lines += ["", f"**{len(passed_classes)} of {len(classes)} classes pipelined and equal at M=4** (their main case; "
                  f"{len(passed)} of {len(built)} cases with the extra frame counts; {len(rows) - len(built)} "
                  "classes skipped, reasons in the table).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="class names (or prefixes) to run")
    ap.add_argument("--ranks", action="store_true", help="also run 2 real ranks (gloo) against simulate (slow)")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--title", default="Coverage: every diffusers DiT class through the pipefusion backend")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of --out for the classes not run now (same order as the cases)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the 2-rank column compares with ranks that each run 1 thread
    cases = [c for c in all_cases() if not args.only or any(c.name == o or c.name.startswith(o) for o in args.only)]
    rows = []
    for case in cases:
        row = run_case(case, ranks=args.ranks)
        rows.append(row)
        print(f"{row.name:48s} {row.seconds:6.1f}s  m1={row.m1_equal_plain:6s} m4={row.m4_equal_reference:8s} "
              f"{row.error}", flush=True)
    cells = {r.name: row_cells(r) for r in rows}
    if args.update and args.out and os.path.exists(args.out):
        old = read_rows(args.out)
        cells = {c.name: cells.get(c.name, old.get(c.name)) for c in all_cases() if c.name in cells or c.name in old}
    text = table(list(cells.values()), args.title)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
