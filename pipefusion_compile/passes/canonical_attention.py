"""Attention in any form, rewritten to `scaled_dot_product_attention` before the token analysis.

The rest of the backend (the token rule of attention, the K/V caches, the stale rewrite, the cost) knows one
attention op: `torch.nn.functional.scaled_dot_product_attention`. Models write attention other ways; this
pass finds them by dataflow and op identity (never by names) and replaces each by the equivalent SDPA call,
so every form is pipelined the same way. Each rewritten node records its form (`AttentionForm`) in
`node.meta["pipefusion"].extra["attention_form"]`, which the plan reports.

Forms (before -> after):

    HAND_WRITTEN   %s = matmul(%q, transpose(%k, -2, -1))      %o = sdpa(%q, %k, %v, attn_mask=%m, scale=c)
                   %s2 = mul(%s, c); %s3 = add(%s2, %m)
                   %p = softmax(%s3, -1); %o = matmul(%p, %v)
                   also `bmm`, `baddbmm(bias, q, kT, beta=0, alpha=c)`, and
                   einsum("...id,...jd->...ij") / einsum("...ij,...jd->...id"); scalar scales anywhere before
                   the mask, an additive mask, dropout that is off, casts that keep the dtype
    MHA            %r = multi_head_attention_forward(q, k, v, E, H, w_in, b_in, ...)   (seq-first [L, B, E])
                   %o = getitem(%r, 0)
                   ->  linear(q, w_in[:E], b_in[:E]) ... reshape [B, H, L, E/H], sdpa, permute back to
                       [L, B, E], linear(out_proj); the averaged weights (need_weights=True) must be unused
    ATEN           %r = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v); %o = getitem(%r, 0)
                   (or any aten SDPA kernel, or aten.scaled_dot_product_attention) -> sdpa(q, k, v, ...)

Numerics: SDPA computes the same function in another order (fp32: ~1e-7 apart). A form with parts that SDPA
cannot express (a softmax over another dim, a multiplicative mask, a cast to another dtype, MHA's bias_k or
its returned weights) is left as it is; the token analysis then refuses it, and the backend's decline names it
(`attention_like.find_attention_like`).
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention_ops import ATEN_SDPA, BADDBMM, EINSUM, MATMUL, MHA, SOFTMAX
from .meta import TokenRule, example_value, node_meta
from .sdpa import is_sdpa
from .side_effects import is_impure

aten = torch.ops.aten
SDPA = F.scaled_dot_product_attention


class AttentionForm(enum.Enum):
    SDPA = "scaled_dot_product_attention"
    HAND_WRITTEN = "hand-written softmax(q k^T) v"
    MHA = "nn.MultiheadAttention"
    ATEN = "aten SDPA kernel"
    CONV = "conv over token rows"   # not attention: the forms HALO_ROWS and STALE_INPUTS mixing ops take
    REDUCTION = "reduction over the tokens"   # linear attention's phi(K)^T V (matmul, einsum), sum, mean


@dataclass(frozen=True)
class Rewritten:
    """One attention rewritten to SDPA: the new node and what it replaced."""

    node: str            # the new SDPA node
    form: AttentionForm
    replaced: str        # the node whose value it now computes (the product with V, the MHA call, ...)


def attention_form(node: fx.Node) -> AttentionForm:
    if node_meta(node).token is not None and node_meta(node).token.rule is TokenRule.CONV_HALO:
        return AttentionForm.CONV
    if node_meta(node).token is not None and node_meta(node).token.rule is TokenRule.REDUCE_TOKENS:
        return AttentionForm.REDUCTION
    return node_meta(node).extra.get("attention_form", AttentionForm.SDPA)


# ----------------------------------------------------------------------------------------------------------
# Emitting nodes with fake example values (the analyses read `example_value` on every node)


def _fake_mode(*nodes):
    for n in nodes:
        v = example_value(n)
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _value(a):
    return example_value(a) if isinstance(a, fx.Node) else a


def _emit(g: fx.Graph, op: str, target, args: tuple, kwargs: dict, origin: fx.Node) -> fx.Node:
    """A new node before `origin`'s position (the caller sets the insertion point) with its example value."""
    node = g.create_node(op, target, args, kwargs)
    mode = _fake_mode(*[a for a in (*args, *kwargs.values()) if isinstance(a, fx.Node)], origin)
    vals = torch.utils._pytree.tree_map(_value, (args, kwargs))
    with mode:
        if op == "call_method":
            val = getattr(vals[0][0], target)(*vals[0][1:], **vals[1])
        else:
            val = target(*vals[0], **vals[1])
    node.meta["example_value"] = val
    if "stack_trace" in origin.meta:
        node.meta["stack_trace"] = origin.meta["stack_trace"]
    return node


# ----------------------------------------------------------------------------------------------------------
# Op identity


def _is_method(n, *names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def _is_fn(n, *targets) -> bool:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    packet = getattr(n.target, "overloadpacket", None)
    return any(n.target is t or (packet is not None and packet is t) for t in targets)


_MUL = (operator.mul, torch.mul)
_DIV = (operator.truediv, torch.div)
_ADD = (operator.add, torch.add)
_DROPOUT = (F.dropout, torch.dropout)


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _is_activation(n) -> bool:
    """A value computed in the graph (not a parameter or a buffer of the module, not a constant)."""
    return isinstance(n, fx.Node) and n.op not in ("get_attr",) and not isinstance(example_value(n), torch.nn.Parameter)


def _ndim(n) -> int:
    v = example_value(n)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _dtype(n):
    v = example_value(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _same_dtype_cast(n: fx.Node) -> fx.Node | None:
    """The input of a cast that keeps the dtype (`.float()` on fp32, `.to(x.dtype)`, `.type_as(x)`), else None."""
    if n.op != "call_method" or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.target in ("float", "half", "bfloat16", "double", "to", "type_as", "type", "contiguous") \
            and _dtype(n) == _dtype(n.args[0]) and example_value(n).shape == example_value(n.args[0]).shape:
        return n.args[0]
    return None


def _is_last_dim(dim, n: fx.Node) -> bool:
    return isinstance(dim, int) and dim in (-1, _ndim(n) - 1)


def _softmax_input(n: fx.Node) -> fx.Node | None:
    """x for a softmax over the last dim of x with no dtype change, else None."""
    if not SOFTMAX.matches(n):
        return None
    x, dim = n.args[0], _arg(n, 1, "dim")
    if (n.target is torch._softmax or _is_fn(n, aten._softmax)) and len(n.args) > 2 and n.args[2]:
        return None  # half_to_float
    if not isinstance(x, fx.Node) or not _is_last_dim(dim, x) or _dtype(n) != _dtype(x):
        return None
    return x


# ----------------------------------------------------------------------------------------------------------
# HAND_WRITTEN


def _key_of_transposed(kt: fx.Node) -> fx.Node | None:
    """k for kT = k.transpose(-2, -1) (also .mT, transpose(1, 2) of a 3-D k, permute of the last two)."""
    if not isinstance(kt, fx.Node):
        return None
    nd = _ndim(kt)
    if _is_method(kt, "transpose") or _is_fn(kt, torch.transpose):
        d0, d1 = (_arg(kt, 1, "dim0"), _arg(kt, 2, "dim1"))
        if isinstance(d0, int) and isinstance(d1, int) and {d0 % nd, d1 % nd} == {nd - 2, nd - 1}:
            return kt.args[0]
    if _is_method(kt, "mT"):
        return kt.args[0]
    if _is_method(kt, "permute") or _is_fn(kt, torch.permute):
        dims = kt.args[1:] if len(kt.args) > 2 else kt.args[1]
        if list(d % nd for d in dims) == [*range(nd - 2), nd - 1, nd - 2]:
            return kt.args[0]
    return None


def _einsum_parts(n: fx.Node):
    eq = n.args[0]
    ops = n.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (tuple, list)):
        ops = ops[0]
    if not isinstance(eq, str) or "->" not in eq or "..." in eq or len(ops) != 2:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    return (subs[0], subs[1], out), ops


def _scores(p: fx.Node):
    """(q, k, scale) for a product p = q k^T (matmul/bmm of a transposed k, baddbmm with beta 0, einsum
    '...id,...jd->...ij'), else None. k has the tokens on -2, like q."""
    scale = 1.0
    if MATMUL.matches(p):
        q, kt = p.args[0], p.args[1]
    elif BADDBMM.matches(p):
        q, kt = p.args[1], p.args[2]
        beta, alpha = _arg(p, 3, "beta", 1), _arg(p, 4, "alpha", 1)
        if beta != 0 or not isinstance(alpha, (int, float)):
            return None  # the bias would be added (a mask computed into the buffer): not matched
        scale = float(alpha)
    elif EINSUM.matches(p):
        parts = _einsum_parts(p)
        if parts is None:
            return None
        (sq, sk, so), (q, k) = parts
        # q: B i d, k: B j d, out: B i j with the same batch letters B
        if len(sq) < 2 or len(sq) != len(sk) or sq[:-2] != sk[:-2] or sq[-1] != sk[-1] \
                or so != sq[:-1] + sk[-2] or len(set(sq + sk[-2])) != len(sq) + 1:
            return None
        return (q, k, scale) if _is_activation(q) and _is_activation(k) else None
    else:
        return None
    k = _key_of_transposed(kt)
    if k is None or not (_is_activation(q) and _is_activation(k)) or _ndim(q) != _ndim(k) or _ndim(q) < 3:
        return None
    return q, k, scale


def _av(n: fx.Node, probs: fx.Node):
    """v for n = probs @ v (matmul/bmm or einsum '...ij,...jd->...id'), else None."""
    if MATMUL.matches(n):
        if n.args[0] is probs and _is_activation(n.args[1]):
            return n.args[1]
        return None
    if EINSUM.matches(n):
        parts = _einsum_parts(n)
        if parts is None:
            return None
        (sp, sv, so), (a, v) = parts
        if a is not probs or len(sp) != len(sv) or sp[:-2] != sv[:-2] or sp[-1] != sv[-2] \
                or so != sp[:-1] + sv[-1] or len(set(sp + sv[-1])) != len(sp) + 1:
            return None
        return v if _is_activation(v) else None
    return None


def _scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _chain_to_softmax(start: fx.Node):
    """Walk from the scores product to the softmax: (softmax node, scale factor, mask or None, nodes), or None.

    Allowed in between: multiplication/division by a Python number (before the mask), one added mask
    tensor, casts that keep the dtype. Each intermediate must have a single user (the next step)."""
    scale, mask, node, chain = 1.0, None, start, []
    for _ in range(16):
        if len(node.users) != 1:
            return None
        (user,) = node.users
        chain.append(user)
        if _softmax_input(user) is node:
            return user, scale, mask, chain
        other = [a for a in user.args if a is not node]
        if (_is_fn(user, *_MUL) or _is_method(user, "mul", "__mul__")) and len(other) == 1 and _scalar(other[0]):
            if mask is not None:
                return None
            scale *= float(other[0])
        elif (_is_fn(user, *_DIV) or _is_method(user, "div", "__truediv__")) and user.args[0] is node \
                and len(other) == 1 and _scalar(other[0]):
            if mask is not None:
                return None
            scale /= float(other[0])
        elif (_is_fn(user, *_ADD) or _is_method(user, "add", "__add__")) and len(other) == 1 \
                and isinstance(other[0], fx.Node) and mask is None and not user.kwargs:
            mask = other[0]
        elif _same_dtype_cast(user) is node:
            pass
        else:
            return None
        node = user
    return None


def _chain_to_product(softmax: fx.Node):
    """From the softmax to the product with V: (product node, v), skipping dropout that is off and casts
    that keep the dtype; None if anything else is on the way."""
    node = softmax
    for _ in range(4):
        if len(node.users) != 1:
            return None
        (user,) = node.users
        v = _av(user, node)
        if v is not None:
            return user, v
        if _is_fn(user, *_DROPOUT) and user.args[0] is node:
            p, training = _arg(user, 1, "p", 0.5), _arg(user, 2, "training", True)
            if p != 0 and training:
                return None
        elif _same_dtype_cast(user) is not node:
            return None
        node = user
    return None


def _rewrite_hand_written(gm: fx.GraphModule, softmax: fx.Node) -> Rewritten | None:
    scores = softmax_input = _softmax_input(softmax)
    if softmax_input is None:
        return None
    # walk back from the softmax to the product through single-user ops; then check the forward chain
    for _ in range(16):
        if _scores(scores) is not None:
            break
        ins = [a for a in scores.all_input_nodes]
        if not ins:
            return None
        scores = ins[0]
    else:
        return None
    found = _scores(scores)
    chain = _chain_to_softmax(scores) if found is not None else None
    if chain is None or chain[0] is not softmax:
        return None
    q, k, scale0 = found
    _, scale, mask, _ = chain
    after = _chain_to_product(softmax)
    if after is None:
        return None
    product, v = after
    if _ndim(v) != _ndim(q) or _dtype(q) != _dtype(k) or _dtype(k) != _dtype(v):
        return None
    if mask is not None:
        mv = example_value(mask)
        if not isinstance(mv, torch.Tensor) or mv.dtype != _dtype(q):
            return None
    g = gm.graph
    kwargs = {"scale": scale0 * scale}
    if mask is not None:
        kwargs["attn_mask"] = mask
    with g.inserting_before(product):
        new = _emit(g, "call_function", SDPA, (q, k, v), kwargs, product)
    if tuple(example_value(new).shape) != tuple(example_value(product).shape):
        g.erase_node(new)
        return None
    node_meta(new).extra["attention_form"] = AttentionForm.HAND_WRITTEN
    product.replace_all_uses_with(new)
    return Rewritten(new.name, AttentionForm.HAND_WRITTEN, product.name)


# ----------------------------------------------------------------------------------------------------------
# ATEN


def _rewrite_aten(gm: fx.GraphModule, n: fx.Node) -> Rewritten | None:
    q, k, v = (_arg(n, i, name) for i, name in enumerate(("query", "key", "value")))
    if n.target in (aten.scaled_dot_product_attention.default,) or _is_fn(n, aten.scaled_dot_product_attention):
        outs = [n]
        value_users = list(n.users)
        kwargs = {}
        names = ("attn_mask", "dropout_p", "is_causal")
        for i, name in enumerate(names):
            val = _arg(n, 3 + i, name)
            if val is not None:
                kwargs[name] = val
        if _arg(n, 6, "scale") is not None:
            kwargs["scale"] = _arg(n, 6, "scale")
        target_users = value_users
    else:
        # (output, logsumexp, ...): only the output may be read
        getitems = list(n.users)
        if not all(u.target is operator.getitem for u in getitems) or any(
                u.args[1] != 0 and u.users for u in getitems):
            return None
        outs = [u for u in getitems if u.args[1] == 0]
        kwargs = {}
        schema = getattr(n.target, "_schema", None) or getattr(getattr(n.target, "default", None), "_schema", None)
        if schema is None:
            return None
        for i, arg in enumerate(schema.arguments[3:], start=3):
            val = n.args[i] if len(n.args) > i else n.kwargs.get(arg.name)
            if val is None or val is False or (arg.name == "dropout_p" and val == 0):
                continue  # the default: nothing to carry over
            if arg.name in ("scale", "is_causal"):
                kwargs[arg.name] = val
            elif arg.name in ("attn_mask", "attn_bias"):
                kwargs["attn_mask"] = val
            elif arg.name in ("compute_log_sumexp", "return_debug_mask"):
                continue  # only change the outputs besides the first, which must be unread (checked above)
            else:
                return None  # dropout, or an argument this rewrite does not know: leave it (refused later)
        target_users = outs
    if not outs:
        return None
    g = gm.graph
    with g.inserting_before(n):
        new = _emit(g, "call_function", SDPA, (q, k, v), kwargs, n)
    node_meta(new).extra["attention_form"] = AttentionForm.ATEN
    for o in target_users:
        if o is n:
            n.replace_all_uses_with(new)
        else:
            o.replace_all_uses_with(new)
    return Rewritten(new.name, AttentionForm.ATEN, n.name)


# ----------------------------------------------------------------------------------------------------------
# MHA


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                 "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                 "is_causal": False}


def _rewrite_mha(gm: fx.GraphModule, n: fx.Node) -> Rewritten | None:
    a = {name: _arg(n, i, name, _MHA_DEFAULTS.get(name)) for i, name in enumerate(_MHA_ARGS)}
    getitems = list(n.users)
    if not all(u.target is operator.getitem for u in getitems) or any(u.args[1] != 0 and u.users for u in getitems):
        return None  # the attention weights are read
    if any(a[x] is not None for x in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")) \
            or a["add_zero_attn"] or a["is_causal"] or (a["training"] and a["dropout_p"]):
        return None
    query, key, value = a["query"], a["key"], a["value"]
    if _ndim(query) != 3 or _ndim(key) != 3:
        return None  # unbatched
    e, h = a["embed_dim_to_check"], a["num_heads"]
    if not isinstance(e, int) or not isinstance(h, int) or e % h:
        return None
    length, batch, _ = example_value(query).shape
    src = example_value(key).shape[0]
    g = gm.graph
    outs = [u for u in getitems if u.args[1] == 0]
    if not outs:
        return None
    with g.inserting_before(n):
        def emit(op, target, *args, **kwargs):
            return _emit(g, op, target, args, kwargs, n)

        if a["use_separate_proj_weight"]:
            ws = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        else:
            ws = tuple(emit("call_function", operator.getitem, a["in_proj_weight"], slice(i * e, (i + 1) * e))
                       for i in range(3))
        bias = a["in_proj_bias"]
        bs = (None,) * 3 if bias is None else tuple(
            emit("call_function", operator.getitem, bias, slice(i * e, (i + 1) * e)) for i in range(3))
        heads = []
        for x, w, b, n_tok in zip((query, key, value), ws, bs, (length, src, src)):
            y = emit("call_function", F.linear, x, w, b)                                # [L, B, E]
            y = emit("call_method", "reshape", y, n_tok, batch, h, e // h)               # [L, B, H, D]
            heads.append(emit("call_method", "permute", y, 1, 2, 0, 3))                  # [B, H, L, D]
        o = emit("call_function", SDPA, *heads)                                          # [B, H, L, D]
        node_meta(o).extra["attention_form"] = AttentionForm.MHA
        o2 = emit("call_method", "permute", o, 2, 0, 1, 3)                               # [L, B, H, D]
        o2 = emit("call_method", "reshape", o2, length, batch, e)
        out = emit("call_function", F.linear, o2, a["out_proj_weight"], a["out_proj_bias"])
    for u in outs:
        u.replace_all_uses_with(out)
    return Rewritten(o.name, AttentionForm.MHA, n.name)


# ----------------------------------------------------------------------------------------------------------


def canonicalize_attention(gm: fx.GraphModule) -> list[Rewritten]:
    """Rewrite every attention that is not an SDPA call into one (see the module docstring); returns what
    was rewritten. The replaced nodes are removed (dead code); nothing else changes."""
    done: list[Rewritten] = []
    for n in list(gm.graph.nodes):
        if n.graph is None or n.op != "call_function" and n.op != "call_method":
            continue
        r = None
        if _softmax_input(n) is not None:
            r = _rewrite_hand_written(gm, n)
        elif MHA.matches(n):
            r = _rewrite_mha(gm, n)
        elif ATEN_SDPA.matches(n) and not is_sdpa(n):
            r = _rewrite_aten(gm, n)
        if r is not None:
            done.append(r)
    if done:
        _remove_dead(gm)
        gm.graph.lint()
        gm.recompile()
    return done


def _remove_dead(gm: fx.GraphModule) -> None:
    """Remove the calls the rewrites left without users (only pure ones: in-place writes stay; FX's own
    purity test calls the attention kernels impure, for their dropout, so the replaced ones are named)."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op not in ("call_function", "call_method") or (
        not (ATEN_SDPA | MHA).matches(n) and is_impure(n)))
