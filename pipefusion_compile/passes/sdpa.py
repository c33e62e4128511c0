"""Matching `scaled_dot_product_attention` nodes by op identity, whatever the call style."""
from __future__ import annotations

import torch
import torch.fx as fx

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_NAMES = ("query", "key", "value")


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_qkv(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(query, key, value) of an SDPA node, passed positionally or by keyword."""
    return tuple(node.args[i] if len(node.args) > i else node.kwargs[name] for i, name in enumerate(_NAMES))


def set_sdpa_kv(node: fx.Node, key: fx.Node, value: fx.Node) -> None:
    """Replace the key and value operands of an SDPA node in place, keeping its call style."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, name, new in ((1, "key", key), (2, "value", value)):
        if len(args) > i:
            args[i] = new
        else:
            kwargs[name] = new
    node.args, node.kwargs = tuple(args), kwargs
