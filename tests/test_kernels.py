"""The data-movement kernels: the interpreted Triton cases (in a subprocess), the `kernels` option, the pass
that writes it into graphs, and the ops inside compiled graphs (inductor on CPU; a fake-CUDA trace for GPU)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx

import pipefusion_compile.ops  # noqa: F401
from pipefusion_compile.errors import OptionsError
from pipefusion_compile.kernels import KernelError
from pipefusion_compile.kernels.strided_copy import _multi_copy_kernel, coalesce
from pipefusion_compile.kernels.triton_support import is_interpreted
from pipefusion_compile.options import PipefusionOptions
from pipefusion_compile.passes.kernels import select_kernels

HERE = os.path.dirname(__file__)
INTERPRETED = is_interpreted(_multi_copy_kernel)


@pytest.mark.slow
def test_triton_kernels_equal_references_under_the_interpreter():
    """`interpreted_kernel_cases.py` in a fresh process with TRITON_INTERPRET=1 (it must be set before triton
    is imported, and this process already imported it): every kernel bit-equal to its reference, the
    pipeline (simulate and 2 ranks) equal with kernels='triton' and 'torch'."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "log_level=WARNING",
         os.path.join(HERE, "interpreted_kernel_cases.py")],
        env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_kernels_option_is_validated():
    assert PipefusionOptions.from_dict({}).kernels == "auto"
    assert PipefusionOptions.from_dict({"kernels": "torch"}).kernels == "torch"
    with pytest.raises(OptionsError, match="kernels='cuda'"):
        PipefusionOptions.from_dict({"kernels": "cuda"})


@pytest.mark.skipif(INTERPRETED, reason="this process runs Triton interpreted")
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    cache, k = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 4, 4)
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        torch.ops.pipefusion.kv_cache_update(cache, cache.clone(), k, k, torch.tensor(0), 2, 4, 0, "triton")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        torch.ops.pipefusion.pack([k], "triton")


def test_coalesce_merges_what_is_contiguous_in_every_view():
    assert coalesce((2, 3, 4), (12, 4, 1), (24, 8, 1)) == ([6, 4], [[4, 1], [8, 1]])
    # a [B, H, S, D] patch into a [B, H, S_cache, D] cache: (B, H) and (S, D) merge, a 2-d copy
    assert coalesce((2, 3, 5, 7), (105, 35, 7, 1), (231, 77, 7, 1)) == ([6, 35], [[35, 1], [77, 1]])
    # the same patch as a transposed [B, S, H, D] view: nothing merges
    assert coalesce((2, 3, 5, 7), (105, 7, 21, 1), (231, 77, 7, 1))[0] == [2, 3, 5, 7]
    assert coalesce((1, 1), (5, 1), (9, 1)) == ([1], [[0], [0]])


def _graph_with_ops():
    g = fx.Graph()
    ck, cv, k, v, rs, out = (g.placeholder(n) for n in ("ck", "cv", "k", "v", "row_start", "out"))
    g.call_function(torch.ops.pipefusion.kv_cache_update.default, (ck, cv, k, v, rs, 2, 4))
    g.call_function(torch.ops.pipefusion.write_band.default, (out, k, 2, 0, "auto"))
    g.output(None)
    return fx.GraphModule(torch.nn.Module(), g)


def test_select_kernels_writes_the_choice_into_every_data_movement_op():
    gm = select_kernels(_graph_with_ops(), "torch")
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls[0].kwargs == {"kernels": "torch"}             # default argument: added as a kwarg
    assert calls[1].args[-1] == "torch" and not calls[1].kwargs  # positional: replaced
    assert "kernels = 'torch'" in gm.code


def test_unpack_gives_each_tensor_the_memory_order_it_is_told():
    """A value crossing ranks keeps its producer's layout (a transposed activation stays transposed)."""
    from pipefusion_compile.ops import stride_order

    a, b = torch.randn(2, 5, 3).transpose(1, 2), torch.randn(4, 1, 6).permute(2, 1, 0)
    orders = [*stride_order(a.shape, a.stride()), *stride_order(b.shape, b.stride())]
    assert orders[:3] == [0, 2, 1]
    buf = torch.ops.pipefusion.pack([a, b])
    x, y = torch.ops.pipefusion.unpack(buf, [*a.shape, *b.shape], [3, 3], [0, 0], orders)
    assert torch.equal(x, a) and torch.equal(y, b)
    assert x.stride() == a.stride() and stride_order(y.shape, y.stride()) == stride_order(b.shape, b.stride())
    x, y = torch.ops.pipefusion.unpack(buf, [*a.shape, *b.shape], [3, 3], [0, 0])  # default: row-major
    assert x.is_contiguous() and y.is_contiguous() and torch.equal(x, a)


def test_ops_compile_with_inductor_without_graph_breaks():
    """The ops as a stage graph has them, under `fullgraph=True` inductor on CPU, equal to eager."""
    def f(ck, cv, k, v, row_start, out, a, b):
        torch.ops.pipefusion.kv_cache_update(ck, cv, k + 1, v, row_start, 2, 2, 1)
        torch.ops.pipefusion.write_band(out, ck[:, :, :3] * 2, 2, 1)
        buf = torch.ops.pipefusion.pack([a.t(), b])
        x, y = torch.ops.pipefusion.unpack(buf, [*a.t().shape, *b.shape], [2, 1], [0, 2])
        return ck[:, :, 0] + cv[:, :, 0], x, y    # element-wise: exact under inductor too

    args = [torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4), torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4),
            torch.tensor(1), torch.zeros(2, 2, 5, 4), torch.randn(3, 5), torch.randn(6).to(torch.bfloat16)]
    want_args = [a.clone() for a in args]
    got = torch.compile(f, backend="inductor", fullgraph=True)(*args)
    want = f(*want_args)
    for g_, w_ in zip([*got, *args], [*want, *want_args]):
        assert torch.equal(g_, w_)


@pytest.mark.skipif(INTERPRETED, reason="this process runs Triton interpreted")
def test_cuda_trace_sees_the_triton_kernel():
    """On CUDA tensors the K/V update traces to the Triton kernel itself (what inductor then compiles), with
    the whole caches as the kernel's destinations; checked with fake CUDA tensors, so no GPU is needed."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Stage(torch.nn.Module):
        def forward(self, ck, cv, k, v, row_start):
            torch.ops.pipefusion.kv_cache_update(ck, cv, k, v, row_start, 2, 4)
            return (ck.sum(),)

    with FakeTensorMode(allow_non_fake_inputs=True):
        ck, cv = torch.empty(1, 2, 16, 8, device="cuda"), torch.empty(1, 2, 16, 8, device="cuda")
        k, v = torch.empty(1, 4, 2, 8, device="cuda").transpose(1, 2), torch.empty(1, 2, 4, 8, device="cuda")
        row_start = torch.empty((), dtype=torch.int64)
    try:
        gm, _ = aot_export_module(Stage(), (ck, cv, k, v, row_start), trace_joint=False)
    except Exception as e:  # noqa: BLE001 - a torch build that cannot fake CUDA here
        pytest.skip(f"cannot trace fake CUDA tensors in this build: {e}")
    wrapper = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(wrapper) == 1, gm.code                                   # both caches, one launch
    assert "kv_cache_update_host" not in gm.code
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kwargs = wrapper[0].kwargs["kwargs"]
    assert kwargs["dst0"] is placeholders[0] and kwargs["dst1"] is placeholders[1]
    assert kwargs["N_JOBS"] == 2 and kwargs["HAS_SHIFT"]


def test_row_offsets_made_by_the_runtime_are_read_on_the_host_without_touching_the_device():
    """The runtime makes each patch's row offset once, on the device; ops that need it on the host read the
    recorded value. A tensor on the meta device has no data: reading it would fail, the recorded value works."""
    from pipefusion_compile.ops import host_int, row_offset

    t = row_offset(3, "meta")
    assert t.device.type == "meta" and t.dtype == torch.int64 and t.dim() == 0
    assert host_int(t) == 3
    assert host_int(torch.tensor(5)) == 5          # any other 0-d tensor: read
    cache = torch.zeros(1, 8, 2)
    torch.ops.pipefusion.cache_rows(cache, torch.ones(1, 2, 2), row_offset(2, "cpu"), 1, 1)
    assert cache[0, 2:4].eq(1).all() and cache[0, :2].eq(0).all() and cache[0, 4:].eq(0).all()
