"""An independent, plainly written eager PipeFusion, for checking the compiled backend.

It knows nothing of graphs. While the model runs, it intercepts every call of
`torch.nn.functional.scaled_dot_product_attention` (the one attention entry point of diffusers' processors),
and of any other attention entry point it is given (`attention_fns`: a module and the name of a function
`fn(query, key, value, ...)` in it that the model calls through that module's globals, e.g. a hand-written
softmax(q @ k^T) @ v). In every one of them the tokens lie on axis -2 of query, key and value
([B, H, S, D], or [B * H, S, D] for a bmm-style function).

A call whose query and keys both span the image tokens (plus the extra token groups, below) is a
self-attention layer (numbered by call order within the forward, over all entry points together); its K/V
are assembled as PipeFusion defines them:

    tokens of patches already done this step   -> their K/V from this step (fresh)
    tokens of the current patch                -> K/V computed now (fresh)
    tokens of patches not yet done this step   -> K/V from the previous step (stale)

For each patch of a step the *whole* model runs on the full sequence, and only the patch's rows of the
output are kept. Warmup steps run the model plainly and record all K/V. Slow (M full forwards per step)
and obviously right, which is the point.

Extra token groups (joint text+image attention in SD3, Flux, CogVideoX; U-ViT's time and class tokens and
register tokens): the attention sequence is [before | image | after], where `before` is the text when
`text_first` (Flux, CogVideoX, U-ViT's two global tokens) and `after` is the text when not `text_first`
(SD3), followed by `after_tokens` more (U-ViT's registers). Each group is one more patch at its place in
that sequence (run once per step, in sequence order with the bands, only to refresh its K/V), and with one
patch the whole joint sequence is that patch.

Convs over the token rows (a conv FFN's depthwise 3x3 conv, a temporal conv over frames): every call of
`F.conv1d/2d/3d` whose first spatial axis holds the image's token rows, with stride 1 and a kernel longer
than 1 there, is a conv layer (numbered by call order, apart from the attention layers); its *input* rows
are assembled exactly as K/V are (rows of patches done this step and of the current patch fresh, the rest
from the previous step) and the conv runs, with its own padding, on the whole assembled input.

Reductions over the tokens (`reductions=True`; linear attention's phi(K)^T V and its normalizer): every call
of `torch.matmul` whose two operands both span the image tokens on the contracted axis (axis -1 of the first,
-2 of the second), and of `Tensor.sum(dim)` over an axis of that many elements, is a reduction layer
(numbered by call order); its operands are assembled along those axes exactly as K/V are, and the reduction
runs on the whole assembled operands.

Image queries over keys that are the image's K/V concatenated with K/V computed from the prompt alone
(NucleusMoE-Image: [image | text], PRX: [text | image]; `key_text_tokens` text keys, first when
`text_first`): the query holds no text, so the text is no patch of its own. The image part of the keys is
assembled as above; the text part is the one computed now, in every patch (it depends on no image token, so
it is this step's for every patch).

A second token stream kept in its own tensor (`stream_tokens` tokens: LTX-2's audio, register tokens): one
more group after all the others, so one more piece, the last of a step. Its queries over the image keys
(a call of `stream_tokens` queries over the image tokens' keys) read the image K/V assembled as above (in
the stream's piece: all of this step). Image queries over the stream's keys (the image tokens' queries over
`stream_tokens` keys) read the stream's K/V assembled as above along the stream (in a band: the ones its
piece computed last step; in its own piece: the ones computed now), once the stream has attended to the
image in this forward; before that the stream depends on no image token and its K/V are used as computed
now (the same in every piece). The stream's own attention runs as it is.

Attention with the image tokens folded into its batch axis (a factorized video model, whose rows are
frames): with the tokens of a row on the sequence axis and the rows in the batch (spatial attention per
frame, [B * F, H, HW, D]) a call never mixes rows, so it is local to a band of whole rows and runs as it
is. With the rows on the sequence axis and the positions of a row in the batch (temporal attention per
position, [B * HW, H, F, D]) it mixes rows: its K/V are assembled as above along its own sequence axis, in
rows (a band of rows r0..r1 reads fresh K/V for rows < r1, stale for rows >= r1). The two are told apart
by the sequence length, so they are recognized only where rows != tokens_per_row (an image whose rows
are as long as its columns would make row and column attention look alike: that is an error here).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass
class ImageLayout:
    """How the model's image tokens are laid out, in the terms PipeFusion splits them by."""

    rows: int            # token rows of the image (patches are bands of these)
    tokens_per_row: int  # tokens per row in the attention sequence
    out_axis: int        # output axis that carries the rows
    out_per_row: int     # output elements per token row along `out_axis`
    frames: int = 1      # > 1: the image tokens are `frames` blocks of `rows` rows each (frame-major), and a
                         # patch is the same rows of every frame

    @classmethod
    def of(cls, model, hidden_states: torch.Tensor, num_patches: int | None = None) -> "ImageLayout":
        if isinstance(hidden_states, (list, tuple)):  # a list latent: each sample as a batch of one
            hidden_states = hidden_states[0][None]
        if hidden_states.dim() == 3:  # packed tokens [B, S, C]: one token per "row"
            return cls(hidden_states.shape[1], 1, 1, 1)
        p = model.config.patch_size
        if hidden_states.dim() == 5:  # video [B, C, F, H, W] with (pt, ph, pw) patches: bands of frames
            pt, ph, pw = p
            frames, height, width = hidden_states.shape[-3:]
            if frames // pt == 1:  # one latent frame: its token rows are the H rows, as in an image
                return cls(height // ph, width // pw, 3, ph)
            if num_patches is not None and frames // pt < num_patches:  # fewer frames than patches: rows of
                return cls(height // ph, width // pw, 3, ph, frames // pt)  # every frame
            return cls(frames // pt, (height // ph) * (width // pw), 2, pt)
        height, width = hidden_states.shape[-2:]
        return cls(height // p, width // p, hidden_states.dim() - 2, p)


def bands(rows: int, num_patches: int) -> list[tuple[int, int]]:
    """Equal row bands; when M does not divide the rows the earlier bands get one more row."""
    q, r = divmod(rows, num_patches)
    out, start = [], 0
    for j in range(num_patches):
        n = q + (1 if j < r else 0)
        out.append((start, n))
        start += n
    return out


@dataclass
class _Piece:
    """One forward of a step: image rows [row0, row0 + n) (of every frame; row0 None: an extra token group),
    its positions `mine` in the joint attention sequence and the positions `fresh` once it is done (those of
    the pieces before it and its own), row range [r0, r1) for attention over rows (folded)."""

    row0: int | None
    n: int | None
    mine: torch.Tensor
    fresh: torch.Tensor
    r0: int
    r1: int
    image_at: int = 0   # where the image tokens start in the joint sequence

    @property
    def lo(self) -> int:
        """First position of the piece in the sequence (its positions are [lo, hi) in one frame)."""
        return int(self.mine[0])

    @property
    def hi(self) -> int:
        return int(self.mine[-1]) + 1


class ReferencePipeFusion:
    """Call it like the model's forward (returns the output tensor): one call = one diffusion step.

    attention_fns: more attention entry points to intercept besides F.scaled_dot_product_attention, as
    (module, function name) pairs; each is called as fn(query, key, value, *rest) with tokens on axis -2.
    after_tokens: tokens of one more group after the image (and after the text when not text_first).
    prediction: (output, latent argument) -> the part of the output that carries the image rows (the noise
    prediction, when the model returns more: its whole joint sequence, a list of per-sample tensors); the
    reference then returns that part. A list latent (per-sample tensors) is passed to the model as it is; a
    list output is assembled element by element (`layout.out_axis` is then an axis of one element).
    key_text_tokens: text keys that image queries attend to besides the image keys (text first in the keys
    when text_first), with no text queries and no text piece.
    stream_tokens: tokens of a second stream in its own tensor (see above); stream_output: the position of
    the stream's own output in the model's output tuple: the reference then returns (prediction, that output
    as the stream's piece computed it).
    """

    def __init__(self, model, num_patches: int, warmup_steps: int = 1, text_tokens: int = 0,
                 text_first: bool = False, layout: ImageLayout | None = None, after_tokens: int = 0,
                 attention_fns: Sequence[tuple[object, str]] = (),
                 prediction: Callable[[object, object], torch.Tensor] | None = None, reductions: bool = False,
                 key_text_tokens: int = 0, stream_tokens: int = 0, stream_output: int | None = None):
        self.model = model
        self.num_patches = num_patches
        self.warmup_steps = warmup_steps
        self.text_tokens = text_tokens  # text tokens in the joint attention sequence (0: image only)
        self.text_first = text_first
        self.after_tokens = after_tokens
        self.key_text_tokens = key_text_tokens  # text keys of image queries (no text queries)
        self.stream_tokens = stream_tokens  # tokens of a second stream in its own tensor (its piece is last)
        self.stream_output = stream_output  # which element of the model's output tuple is the stream's own
        self.attention_fns = list(attention_fns)
        self.prediction = prediction
        self.layout = layout  # None: derived from the input's shape (`ImageLayout.of`)
        self.step = 0
        self.previous: list[tuple[torch.Tensor, torch.Tensor]] = []  # per self-attention layer, last step
        self.current: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer, being filled this step
        # what the last forward saw, for tests to check the interception: stale-assembled layers, and
        # calls run as they are because they are local to a band (attention within a row, folded)
        self.layers_seen = 0
        self.local_calls = 0
        self.conv_previous: list[torch.Tensor] = []  # per conv layer over rows: its input, last step
        self.conv_current: list[torch.Tensor] = []
        self.convs_seen = 0
        self.reductions = reductions
        self.red_previous: list[tuple[torch.Tensor, torch.Tensor]] = []  # per reduction layer: its operands
        self.red_current: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reductions_seen = 0

    def reset(self):
        self.step = 0
        self.previous = []
        self.conv_previous = []
        self.red_previous = []

    def _groups(self) -> tuple[list[int], list[int]]:
        """Sizes of the extra token groups before and after the image, in sequence order."""
        before = [self.text_tokens] if self.text_tokens and self.text_first else []
        after = [self.text_tokens] if self.text_tokens and not self.text_first else []
        if self.after_tokens:
            after.append(self.after_tokens)
        if self.stream_tokens:
            after.append(self.stream_tokens)
        return before, after

    def _kind(self, query, key, layout: ImageLayout, num_tokens: int) -> str | None:
        """"joint": self-attention over the whole sequence; "image": over the image tokens alone (in a model
        whose sequence has other groups too); "rows": over the rows, with the positions of a
        row folded into the batch; "local": within one row; None: anything else (cross-attention)."""
        n, m = query.shape[-2], key.shape[-2]
        image = layout.frames * layout.rows * layout.tokens_per_row
        if self.stream_tokens and (n, m) in ((self.stream_tokens, image), (image, self.stream_tokens)):
            if image == self.stream_tokens:
                raise ValueError("reference: the stream has as many tokens as the image: its attention and the "
                                 "image's cannot be told apart")
            return "stream queries" if n == self.stream_tokens else "stream keys"
        if n == num_tokens and m == num_tokens:
            return "joint"
        if n == m == layout.frames * layout.rows * layout.tokens_per_row:
            return "image"  # a joint model's self-attention over its image tokens alone (Flux3's per-mode blocks)
        if self.key_text_tokens and n == layout.rows * layout.tokens_per_row and m == n + self.key_text_tokens:
            return "image+text keys"
        rows, per_row = layout.rows, layout.tokens_per_row
        if layout.frames > 1:
            return None  # attention over the rows of a factorized model is recognized for bands of frames only
        if n != m or rows <= 1 or per_row <= 1 or n not in (rows, per_row) or num_tokens != rows * per_row:
            return None
        folded = query.numel() // (n * query.shape[-1])  # all leading (batch, heads) elements
        if rows == per_row:
            if folded % rows == 0:
                raise ValueError(
                    f"reference: a self-attention of {n} tokens with the others in its batch axis, and the "
                    f"image has {rows} rows of {per_row} tokens: attention within a row and attention over "
                    "the rows look alike, so it cannot tell whether this one mixes rows"
                )
            return None
        if n == rows and folded % per_row == 0:
            return "rows"
        if n == per_row and folded % rows == 0:
            return "local"
        return None

    def _assemble(self, layer: int, key, value, mine: torch.Tensor, fresh: torch.Tensor, warmup: bool):
        """K/V of one layer: the piece's own positions `mine` (sequence indices) computed now, the positions
        `fresh` (done this step, `mine` among them) from this step, the rest from the previous step."""
        if len(self.current) <= layer:
            self.current.append((torch.zeros_like(key), torch.zeros_like(value)))
        ck, cv = self.current[layer]
        ck[..., mine, :] = key[..., mine, :]
        cv[..., mine, :] = value[..., mine, :]
        if warmup:
            return key, value
        # warmup_steps=0: the first step's "previous" K/V are the zero-initialised caches
        pk, pv = self.previous[layer] if self.previous else (torch.zeros_like(ck), torch.zeros_like(cv))
        key, value = pk.clone(), pv.clone()
        key[..., fresh, :] = ck[..., fresh, :]
        value[..., fresh, :] = cv[..., fresh, :]
        return key, value

    @contextlib.contextmanager
    def _stale_attention(self, layout: ImageLayout, num_tokens: int, piece: _Piece, warmup: bool):
        layer = 0
        inside = False  # an entry point that calls another one is one attention layer, not two
        attended = False  # the stream has attended to the image in this forward (it depends on image tokens)
        self.layers_seen = self.local_calls = 0

        def intercept(original: Callable) -> Callable:
            def attention(query, key, value, *args, **kwargs):
                nonlocal layer, inside, attended
                kind = None if inside else self._kind(query, key, layout, num_tokens)
                if kind == "local":
                    self.local_calls += 1
                if kind == "stream keys" and not attended:
                    kind = None  # the stream depends on no image token yet: its K/V as computed now
                if kind not in ("joint", "rows", "image", "image+text keys", "stream queries", "stream keys"):
                    return original(query, key, value, *args, **kwargs)  # cross-attention, or local
                if kind == "joint":
                    mine, fresh = piece.mine, piece.fresh
                elif kind == "stream keys":  # the stream's positions, the last group of the sequence
                    at = num_tokens - self.stream_tokens
                    mine, fresh = (i[(i >= 0) & (i < self.stream_tokens)] for i in (piece.mine - at,
                                                                                    piece.fresh - at))
                elif kind == "rows":
                    mine, fresh = torch.arange(piece.r0, piece.r1), torch.arange(piece.r1)
                else:  # the image part of the joint sequence: its positions less the groups before the image
                    attended = attended or kind == "stream queries"
                    size = layout.frames * layout.rows * layout.tokens_per_row
                    mine, fresh = (i[(i >= 0) & (i < size)] for i in (piece.mine - piece.image_at,
                                                                       piece.fresh - piece.image_at))
                if kind == "image+text keys":  # the image part assembled, the text part as computed now
                    t, n_image = self.key_text_tokens, key.shape[-2] - self.key_text_tokens
                    image_at, text_at = (t, 0) if self.text_first else (0, n_image)
                    image = [x.narrow(-2, image_at, n_image) for x in (key, value)]
                    text = [x.narrow(-2, text_at, t) for x in (key, value)]
                    image = self._assemble(layer, *image, mine, fresh, warmup)
                    key, value = [torch.cat([tx, im] if self.text_first else [im, tx], dim=-2)
                                  for im, tx in zip(image, text)]
                else:
                    key, value = self._assemble(layer, key, value, mine, fresh, warmup)
                layer += 1
                self.layers_seen += 1
                inside = True
                try:
                    return original(query, key, value, *args, **kwargs)
                finally:
                    inside = False

            return attention

        # Eager nn.MultiheadAttention (need_weights=False) reaches attention in one of two ways: its fast
        # path (torch._native_multi_head_attention, taken for batch_first self-attention in eval mode under
        # no_grad) never calls a Python function, so it is switched off here; its regular path,
        # F.multi_head_attention_forward, calls `scaled_dot_product_attention` through torch.nn.functional's
        # module globals, with query/key/value [B, H, S, D], so the patched F.scaled_dot_product_attention
        # below sees it (checked by the MHA tests in test_handwritten.py through `layers_seen`).
        targets = [(F, "scaled_dot_product_attention"), *self.attention_fns]
        originals = [getattr(module, name) for module, name in targets]
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        for (module, name), original in zip(targets, originals):
            setattr(module, name, intercept(original))
        try:
            yield
        finally:
            for (module, name), original in zip(targets, originals):
                setattr(module, name, original)
            torch.backends.mha.set_fastpath_enabled(fastpath)

    @contextlib.contextmanager
    def _stale_convs(self, layout: ImageLayout, piece: _Piece, warmup: bool):
        """Convs over the token rows read their input assembled from fresh and stale rows (axis 2)."""
        layer = 0
        self.convs_seen = 0

        def intercept(original: Callable) -> Callable:
            def conv(input, weight, bias=None, stride=1, *args, **kwargs):
                nonlocal layer
                s = stride[0] if isinstance(stride, (tuple, list)) else stride
                if input.dim() != weight.dim() or input.shape[2] != layout.rows or weight.shape[2] == 1 or s != 1:
                    return original(input, weight, bias, stride, *args, **kwargs)
                if len(self.conv_current) <= layer:
                    self.conv_current.append(torch.zeros_like(input))
                cur = self.conv_current[layer]
                cur[:, :, piece.r0:piece.r1] = input[:, :, piece.r0:piece.r1]
                if not warmup:
                    prev = self.conv_previous[layer] if self.conv_previous else torch.zeros_like(cur)
                    input = torch.cat([cur[:, :, :piece.r1], prev[:, :, piece.r1:]], dim=2)
                layer += 1
                self.convs_seen += 1
                return original(input, weight, bias, stride, *args, **kwargs)

            return conv

        names = ("conv1d", "conv2d", "conv3d")
        originals = [getattr(F, name) for name in names]
        for name, original in zip(names, originals):
            setattr(F, name, intercept(original))
        try:
            yield
        finally:
            for name, original in zip(names, originals):
                setattr(F, name, original)

    @contextlib.contextmanager
    def _stale_reductions(self, layout: ImageLayout, piece: _Piece, warmup: bool):
        """torch.matmul contracting the image tokens of both operands reads them assembled from fresh and
        stale tokens (a along -1, b along -2)."""
        layer = 0
        self.reductions_seen = 0
        tokens = layout.rows * layout.tokens_per_row
        lo, hi = piece.r0 * layout.tokens_per_row, piece.r1 * layout.tokens_per_row
        original = torch.matmul

        def matmul(a, b, **kwargs):
            nonlocal layer
            if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != tokens or b.shape[-2] != tokens:
                return original(a, b, **kwargs)
            a, b = a.movedim(-1, -2), b   # both with the tokens on -2, as K/V
            if len(self.red_current) <= layer:
                self.red_current.append((torch.zeros_like(a), torch.zeros_like(b)))
            ca, cb = self.red_current[layer]
            ca[..., lo:hi, :] = a[..., lo:hi, :]
            cb[..., lo:hi, :] = b[..., lo:hi, :]
            if not warmup:
                pa, pb = self.red_previous[layer] if self.red_previous else (torch.zeros_like(ca), torch.zeros_like(cb))
                a = torch.cat([ca[..., :hi, :], pa[..., hi:, :]], dim=-2)
                b = torch.cat([cb[..., :hi, :], pb[..., hi:, :]], dim=-2)
            layer += 1
            self.reductions_seen += 1
            return original(a.movedim(-2, -1), b, **kwargs)

        original_sum = torch.Tensor.sum

        def tensor_sum(x, dim=None, keepdim=False, **kwargs):
            nonlocal layer
            if not isinstance(dim, int) or x.dim() < 2 or x.shape[dim] != tokens:
                return original_sum(x, dim, keepdim, **kwargs) if dim is not None else original_sum(x, **kwargs)
            x = x.movedim(dim, -2)
            if len(self.red_current) <= layer:
                self.red_current.append((torch.zeros_like(x), torch.zeros_like(x)))
            cx = self.red_current[layer][0]
            cx[..., lo:hi, :] = x[..., lo:hi, :]
            if not warmup:
                px = self.red_previous[layer][0] if self.red_previous else torch.zeros_like(cx)
                x = torch.cat([cx[..., :hi, :], px[..., hi:, :]], dim=-2)
            layer += 1
            self.reductions_seen += 1
            return original_sum(x.movedim(-2, dim), dim, keepdim, **kwargs)

        if self.reductions:
            torch.matmul = matmul
            torch.Tensor.sum = tensor_sum
        try:
            yield
        finally:
            torch.matmul = original
            torch.Tensor.sum = original_sum

    def _pieces(self, layout: ImageLayout, warmup: bool) -> list[_Piece]:
        before, after = self._groups()
        per_row, per_frame = layout.tokens_per_row, layout.rows * layout.tokens_per_row
        image_at = sum(before)  # where the image tokens start in the sequence
        image = layout.frames * per_frame
        num_tokens = image_at + image + sum(after)
        everything = torch.arange(num_tokens)
        if warmup or self.num_patches == 1:  # the whole (joint) sequence is one patch
            return [_Piece(0, layout.rows, everything, everything, 0, layout.rows, image_at)]
        pieces, at = [], 0
        for size in before:
            pieces.append(_Piece(None, None, torch.arange(at, at + size), torch.arange(at + size), 0, 0, image_at))
            at += size
        frame_starts = image_at + per_frame * torch.arange(layout.frames)[:, None]
        for row0, n in bands(layout.rows, self.num_patches):
            mine = (frame_starts + torch.arange(row0 * per_row, (row0 + n) * per_row)).flatten()
            fresh = torch.cat([torch.arange(image_at), (frame_starts + torch.arange((row0 + n) * per_row)).flatten()])
            pieces.append(_Piece(row0, n, mine, fresh, row0, row0 + n, image_at))
        at = image_at + image
        for size in after:  # the image is all done: rows all fresh
            pieces.append(_Piece(None, None, torch.arange(at, at + size), torch.arange(at + size), layout.rows,
                                 layout.rows, image_at))
            at += size
        return pieces

    @torch.no_grad()
    def __call__(self, hidden_states, **kwargs):
        layout = self.layout or ImageLayout.of(self.model, hidden_states, self.num_patches)
        before, after = self._groups()
        num_tokens = sum(before) + layout.frames * layout.rows * layout.tokens_per_row + sum(after)
        warmup = self.step < self.warmup_steps
        result = stream = None
        for piece in self._pieces(layout, warmup):
            with self._stale_attention(layout, num_tokens, piece, warmup), self._stale_convs(layout, piece, warmup), \
                    self._stale_reductions(layout, piece, warmup):
                outs = self.model(hidden_states, **kwargs, return_dict=False)
            out = outs[0]
            if self.stream_output is not None:
                stream = outs[self.stream_output]  # the last piece is the stream's (or the only one)
            if self.prediction is not None:
                out = self.prediction(out, hidden_states)
            # a list output (one tensor per sample, for a list latent): each element assembled alike
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            if result is None:
                result = [torch.empty_like(o) for o in outs]
            if piece.row0 is None:
                continue  # an extra token group's piece only refreshes its K/V
            a, k = layout.out_axis, layout.out_per_row
            for r, o in zip(result, outs):
                r.narrow(a, piece.row0 * k, piece.n * k).copy_(o.narrow(a, piece.row0 * k, piece.n * k))
        self.previous = [(k.clone(), v.clone()) for k, v in self.current]
        self.conv_previous = [x.clone() for x in self.conv_current]
        self.red_previous = [(a.clone(), b.clone()) for a, b in self.red_current]
        self.step += 1
        final = result if isinstance(out, (list, tuple)) else result[0]
        return final if self.stream_output is None else (final, stream)
