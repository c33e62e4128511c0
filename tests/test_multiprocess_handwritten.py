"""The newer mixing rules on real ranks (gloo): bit-identical to simulate mode.

Hand-written DiTs (tests/handwritten_dits.py): attention rewritten to SDPA (baddbmm/bmm softmax attention,
nn.MultiheadAttention), extra token groups on both sides of the image (U-ViT with register tokens: HEAD and
TAIL pieces), attention local to a token row next to temporal attention (factorized video), a conv over token rows
(a depthwise conv FFN: halo rows from the conv's input cache), ReLU linear attention (a reduction over the
tokens reading caches of its operands), and image queries over [text | image] keys whose text K/V every patch
writes into the cache."""
from dist_utils import run_ranks
from dist_workers import generate
from test_multiprocess import assert_bit_identical, simulate

JOBS = [("hw:make_manual_attention_dit:bmm", {}, {"num_patches": 4}),
        ("hw:make_mha_dit", {}, {"num_patches": 4}),
        ("hw:make_uvit:4", {}, {"num_patches": 4}),
        ("hw:make_factorized_video_dit", {}, {"num_patches": 4}),
        ("hw:make_conv_ffn_dit", {}, {"num_patches": 4}),
        ("hw:make_linear_attention_dit", {}, {"num_patches": 4}),
        ("hw:make_text_keys_dit:1", {}, {"num_patches": 4})]
STEPS = 4


def test_new_mixing_rules_on_two_ranks_equal_simulate_bit_for_bit(tmp_path):
    results = run_ranks(generate, 2, JOBS, STEPS, tmp_path=tmp_path, timeout=600)
    for j, (name, fkw, options) in enumerate(JOBS):
        want = simulate(name, fkw, {**options, "num_stages": 2}, steps=STEPS)
        for res in results:
            got = res["value"][j]
            assert_bit_identical(got, want)
            assert got["stats"]["bytes_sent"] == got["plan_bytes"], (name, res["rank"])
            assert got["stats"]["pipelined_calls"] == STEPS - 1
