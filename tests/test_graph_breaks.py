"""Graph breaks inside the transformer split it into graphs with too few attention layers for num_stages: the
error names each break dynamo recorded and the change that removes it."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipefusion_compile.errors import (GraphBreakFix, PipefusionError, PlanError, TooFewLayersError,
                                       recorded_graph_breaks)


class Block(nn.Module):
    def __init__(self, index: int, dim: int = 8, breaks: bool = True):
        super().__init__()
        self.index, self.breaks = index, breaks
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, t):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.proj(a)
        if self.breaks and self.index == 1:
            x = x * (t.max().item() / 1000.0)          # .item(): a graph break unless capture_scalar_outputs
        if self.breaks and self.index == 2:
            print("block", self.index)                 # print: a graph break
        return x


class BreakingDiT(nn.Module):
    """[B, C, H, W] -> patch conv -> 4 attention blocks -> back; breaks in blocks 1 and 2."""

    def __init__(self, breaks: bool = True):
        super().__init__()
        self.embed = nn.Conv2d(4, 8, 2, stride=2)
        self.blocks = nn.ModuleList(Block(i, breaks=breaks) for i in range(4))
        self.out = nn.Linear(8, 16)

    def forward(self, x, t):
        b, _, h, w = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2) + torch.sin(t)[:, None, None]
        for block in self.blocks:
            tokens = block(tokens, t)
        out = self.out(tokens).reshape(b, h // 2, w // 2, 2, 2, 4).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, 4, h, w)


def _compile_error(model, **options):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="pipefusion", options={"stage_backend": "eager", **options})
    try:
        with torch.no_grad():
            compiled(torch.randn(1, 4, 8, 8), torch.full((1,), 500.0))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        return e.inner_exception
    pytest.fail("no error was raised")


def test_too_few_layers_names_each_graph_break_and_its_fix(capsys):
    err = _compile_error(BreakingDiT(), num_stages=2)
    assert isinstance(err, TooFewLayersError) and isinstance(err, PlanError) and isinstance(err, PipefusionError)
    text = str(err)
    assert "num_stages=2 is more than the 1 attention layers" in text
    assert "Unsupported Tensor.item() call with capture_scalar_outputs=False" in text
    assert "torch._dynamo.config.capture_scalar_outputs = True" in text
    assert "graph break in loop" in text and "compiles each block on its own" in text
    assert "fullgraph=True" in text
    fixes = {b.fix for b in recorded_graph_breaks()}
    assert {GraphBreakFix.CAPTURE_SCALAR_OUTPUTS, GraphBreakFix.LOOP} <= fixes


def test_print_break_is_named():
    class PrintOnly(BreakingDiT):
        def __init__(self):
            super().__init__()
            for block in self.blocks:
                block.index = 2 if block.index == 1 else block.index + 10
            self.blocks[1].index = 2

    err = _compile_error(PrintOnly(), num_stages=3)
    assert isinstance(err, TooFewLayersError)
    assert GraphBreakFix.PRINT in {b.fix for b in recorded_graph_breaks()}, str(err)
    assert "remove the print" in str(err)


def test_without_breaks_the_error_is_unchanged():
    err = _compile_error(BreakingDiT(breaks=False), num_stages=5)
    assert isinstance(err, TooFewLayersError)
    assert "num_stages=5 is more than the 4 attention layers" in str(err)
    assert "graph breaks in this process" not in str(err)


class PooledPromptDiT(BreakingDiT):
    """The prompt is pooled by attention (a mean query over its tokens, as Mochi's caption pooler does), then a
    print breaks the graph before the latent is read: the first graph holds the prompt's attention only."""

    def __init__(self):
        super().__init__(breaks=False)
        self.text_kv = nn.Linear(8, 16)

    def forward(self, x, t, text):
        k, v = self.text_kv(text).unflatten(-1, (2, 1, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        q = text.mean(1, keepdim=True)[:, None]
        pooled = F.scaled_dot_product_attention(q, k, v)[:, 0]
        text = text + pooled
        print("pooled")
        return super().forward(x, t + text.sum((1, 2)))


def test_a_graph_between_breaks_without_the_latent_names_the_breaks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(PooledPromptDiT(), backend="pipefusion", options={"stage_backend": "eager",
                                                                                "num_stages": 2})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as raised, torch.no_grad():
        compiled(torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.randn(1, 6, 8))
    err = raised.value.inner_exception
    text = str(err)
    assert isinstance(err, PipefusionError)
    assert text.startswith("a graph between graph breaks (listed below) cannot be pipelined: "), text
    assert "may not hold the image input" in text and "remove the print" in text
