"""Run real multi-process pipelines in tests: gloo over 127.0.0.1, every collective with a timeout."""
from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    torch.set_num_threads(1)
    result = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        result["value"] = fn(rank, world, *args)
    except BaseException as e:  # report, never hang the parent
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world: int, *args, tmp_path, timeout: float = 240.0, allow_errors: bool = False):
    """Run `fn(rank, world, *args)` on `world` spawned processes; return the per-rank results (dicts)."""
    out_dir = str(tmp_path)
    os.makedirs(out_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out_dir), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:  # a rank that dies is just recorded: the others must notice on their own
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"rank": r, "error": "no result"})
    if not allow_errors:
        for res in results:
            assert "error" not in res, f"rank {res['rank']} failed: {res.get('traceback', res['error'])}"
    return results
