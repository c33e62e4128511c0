"""The one namespaced meta key the analyses write: `node.meta["pipefusion"]`."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.fx as fx

from ..errors import PipefusionError

META_KEY = "pipefusion"


class Kind(enum.Enum):
    GLOBAL = "global"          # does not depend on the image tokens
    POSITIONAL = "positional"  # GLOBAL, but combined token-by-token with patched data: sliced per patch
    PATCHED = "patched"        # carries image tokens on `axis`
    MIXING = "mixing"          # combines tokens across the axis: an op with a `MixingRule` (its `mixing`)
    REDUCED = "reduced"        # depends on the image tokens but has no token axis: a reduction over the tokens
                               # (linear attention's sum of phi(K)^T V, a mean over tokens) and what is computed
                               # from it alone; full size in every piece, computed in the stage from its caches


class MixingRule(enum.Enum):
    """How the pipeline handles an op that combines image tokens across patches. Every rule but LOCAL reads
    a full-size per-layer mixing cache that each patch writes before reading it (`stage_split.CacheSpec`)."""

    STALE_KV = "K/V cache: fresh for the patches done this step, one step stale for the rest"
    STALE_KV_GLOBAL_KEYS = ("K/V cache over the whole key sequence: image part fresh for the patches done this "
                            "step, one step stale for the rest; the other keys (computed without the image "
                            "tokens, e.g. the prompt's) fresh, written by every patch")
    STALE_KV_CROSS_GROUP = ("K/V cache between two token streams: the piece of the keys writes it, the piece "
                            "of the queries reads it (image keys fresh for the patches done this step, stale for "
                            "the rest; a stream's keys written by its piece once per step)")
    LOCAL = "local to a token row (attention within a frame): needs nothing of other patches"
    STALE_INPUTS = ("full-size cache of the reduction's token-carrying inputs (fresh for the patches done this "
                    "step, one step stale for the rest); the reduction runs over the whole cache")
    HALO_ROWS = ("cache of the conv's input rows: a patch reads its rows plus the halo (rows of earlier patches "
                 "fresh, of later ones one step stale, zeros beyond the image border)")


class ValueEnum(str, enum.Enum):
    """A str-valued enum printed as its value (in f-strings and messages too), equal to its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class TokenRule(ValueEnum):
    """The token rule that gave a value its `TokenInfo` (`token_rules.py`, `sample_rules.py`, `cross_group.py`,
    `tokens.py`). A str, printed as its value ("cat-joint"), so plans and messages read as before; building a
    `TokenInfo` from an unknown name raises ValueError."""

    NONE = ""                                         # the default of `TokenInfo.rule`
    # graph inputs and the values around them (tokens.py)
    IMAGE_INPUT = "image input"
    JOINT_IMAGE_INPUT = "joint image input"
    POSITIONAL = "positional"                         # a GLOBAL table read token by token (`TokenInfo.used_by`)
    GLOBAL = "global"
    FROM_REDUCTION = "from-reduction"
    REDUCE_TOKENS = "reduce-tokens"
    # token-wise ops
    ELEMENTWISE = "elementwise"
    VIEW_COMPLEX = "view-complex"
    CAST = "cast"
    LINEAR = "linear"
    MATMUL = "matmul"
    EINSUM = "einsum"
    NORM = "norm"
    REDUCE = "reduce"
    PAD = "pad"
    EMBEDDING = "embedding"
    # shape ops
    RESHAPE = "reshape"
    RESHAPE_FOLD = "reshape-fold"
    RESHAPE_UNFOLD = "reshape-unfold"
    EXPAND = "expand"
    PERMUTE = "permute"
    MOVEDIM = "movedim"
    TRANSPOSE = "transpose"
    REPEAT = "repeat"
    REPEAT_INTERLEAVE = "repeat-interleave"
    FLIP = "flip"
    NARROW = "narrow"
    # convolutions
    CONV_BATCH_AXIS = "conv-batch-axis"
    CONV_PATCH_EMBED = "conv-patch-embed"
    CONV_HALO = "conv-halo"
    CONV_TRANSPOSE_UNPATCHIFY = "conv-transpose-unpatchify"
    # attention
    SELF_ATTENTION = "self-attention"
    SELF_ATTENTION_GLOBAL_KEYS = "self-attention-global-keys"
    CROSS_ATTENTION = "cross-attention"
    ATTENTION_LOCAL = "attention-local"
    ATTENTION_STREAM_QUERIES = "attention-stream-queries"
    ATTENTION_IMAGE_QUERIES = "attention-image-queries"
    # token groups of a joint sequence: concatenation, selection, split, in-place writes
    CAT = "cat"
    STACK = "stack"
    CAT_JOINT = "cat-joint"
    CAT_TEXT = "cat-text"
    TEXT_GROUP = "text-group"
    TOKEN_GROUP = "token-group"
    GETITEM = "getitem"
    GETITEM_GROUP = "getitem-group"
    SETITEM = "setitem"
    SETITEM_GROUP = "setitem-group"
    SPLIT = "split"
    SPLIT_GROUPS = "split-groups"
    # per-sample blocks of a list latent (sample_rules.py)
    CAT_SAMPLES = "cat-samples"
    SPLIT_SAMPLES = "split-samples"
    UNFLATTEN_SAMPLES = "unflatten-samples"
    PAD_SEQUENCE_STACK = "pad-sequence-stack"


@dataclass(frozen=True)
class TokenInfo:
    """Where a value carries image tokens.

    `axis` is the tensor dim along which token rows lie in order; `epr` is how many elements along that axis
    one row of the image input owns (e.g. 1/2 for a patch-2 conv output, W/2 for [B, S, D] tokens). A patch
    of the image input's rows [r0, r1) is the slice [r0 * epr, r1 * epr) of this axis.
    """

    kind: Kind
    axis: int | None = None
    epr: Fraction | None = None
    rule: TokenRule = TokenRule.NONE
    attention: str | None = None       # "self" or "cross" on attention nodes
    elements: tuple["TokenInfo", ...] | None = None  # for tuple-valued nodes (chunk, split, unbind)
    prefix: int = 0   # elements along `axis` before the image part that belong to another token group (text)
    suffix: int = 0   # ... and after it. A text-only value has prefix = its extent and no image part.
    mixing: MixingRule | None = None   # on MIXING nodes: the rule that pipelines them
    halo: tuple[int, int] = (0, 0)     # HALO_ROWS: elements before / after a patch along `axis` that it reads
    outer: int = 1    # > 1: the axis is dims before it (e.g. batch) folded with the token dim, outer-major
                      # (`x.reshape(-1, C, H, W)` of [B, F, C, H, W]); until a reshape unfolds it, a patch
                      # is not one contiguous range of it, so only ops that ignore token positions may run
    used_by: str | None = None   # POSITIONAL: the node that reads the table token by token (the last one met)

    def __post_init__(self):
        if not isinstance(self.rule, TokenRule):   # a rule given by name: an unknown one raises ValueError
            object.__setattr__(self, "rule", TokenRule(self.rule))

    @property
    def rule_name(self) -> str:
        """The rule as messages name it: a positional table also names the node that reads it."""
        return f"{self.rule} (used by {self.used_by})" if self.used_by is not None else str(self.rule)

    @property
    def joint(self) -> bool:
        """Holds tokens of another group (the text of a joint text+image sequence) along its axis."""
        return bool(self.prefix or self.suffix)

    @property
    def carries_tokens(self) -> bool:
        return self.kind in (Kind.PATCHED, Kind.MIXING)

    @property
    def in_stage(self) -> bool:
        """Computed per piece inside a stage (token-carrying, or REDUCED from tokens), never hoisted."""
        return self.carries_tokens or self.kind is Kind.REDUCED


@dataclass(frozen=True)
class BatchInfo:
    """Where a value carries the batch (`passes/batch.py`): `axis` holds B * `per` elements, samples outermost;
    `axis` None: the same for every sample. Tuple-valued nodes have one per element in `elements`."""

    axis: int | None = None
    per: int = 1
    rule: "ValueEnum | str" = "none"
    elements: tuple["BatchInfo", ...] | None = None


@dataclass
class NodeMeta:
    """Everything pipefusion knows about one node. Analyses fill their own field."""

    token: TokenInfo | None = None
    batch: BatchInfo | None = None
    flops: int = 0
    out_bytes: int = 0
    extra: dict = field(default_factory=dict)


def node_meta(node: fx.Node) -> NodeMeta:
    meta = node.meta.get(META_KEY)
    if meta is None:
        meta = node.meta[META_KEY] = NodeMeta()
    return meta


def token_info(node: fx.Node) -> TokenInfo:
    info = node_meta(node).token
    if info is None:
        raise PipefusionError(f"internal: the token analysis has not run on {node.name}")
    return info


def example_value(node: fx.Node):
    """The fake value dynamo recorded for a node (tensor, tuple of tensors, int, ...)."""
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def cache_placeholders(gm: fx.GraphModule) -> tuple[dict[tuple[str, str], fx.Node], fx.Node | None]:
    """A stage graph's K/V cache placeholders by (attention node, "k" or "v"), and its `row_start` placeholder
    (the extras `stage_split.extract_stage` writes on them), for the passes that rewrite attention over the
    caches."""
    caches: dict[tuple[str, str], fx.Node] = {}
    row_start = None
    for ph in gm.graph.find_nodes(op="placeholder"):
        extra = node_meta(ph).extra
        if "cache_of" in extra:
            caches[(extra["cache_of"].attention, extra["cache_which"])] = ph
        if extra.get("row_start"):
            row_start = ph
    return caches, row_start
