import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# each pytest-xdist worker (`make test` runs one per core) gets its share of the cores; alone, at most 2 threads
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# `make test` runs a fixed sample of the long parametrized groups below and `make test-full` all of them: every
# k-th parameter set of each group (the first always) is in the sample, the others are marked `full` and
# deselected by `-m "not full"`. The sample is the same on every run; each group keeps at least one model of
# each kind it covers only when its parameters are ordered so (they are sorted by model, then by setting).
SAMPLE_EVERY = {
    "test_coverage.py::test_case_builds_and_is_traced": 3,            # every class traced: make coverage runs all
    "test_coverage.py::test_plan_command_names_the_rule_of_every_mixing_op": 4,
    "test_coverage_cases_b.py::test_case_runs_eagerly": 3,
    "test_numerics.py::test_stale_kv_equals_eager_reference": 2,      # models x {2, 4} patches
    "test_numerics.py::test_warmup_covering_all_steps_equals_plain_model": 2,
    "test_numerics.py::test_one_patch_equals_plain_model_every_step": 2,
    "test_handwritten.py::test_stale_kv_equals_eager_reference": 2,   # hand-written DiTs x {2, 4} stages
    "test_handwritten.py::test_one_patch_equals_plain_model_every_step": 2,
    "test_handwritten.py::test_reference_on_its_own": 2,
    "test_pipelines.py::test_input_sequence_equals_plain": 3,         # pipelines x input sequences
    "test_pipelines.py::test_harness_plain_references": 2,
    "test_multiprocess.py::test_ranks_equal_each_other_and_simulate_bit_for_bit": 3,   # world 2 (3 and 4: full)
    "test_multiprocess_pipelines.py::test_pipeline_on_two_ranks_equals_simulate_across_shapes": 2,
    "test_side_effects.py::test_every_write_is_in_the_globals_of_each_stage_that_reads_its_target": 2,
    "test_hybrid.py::test_batch_split_of_every_transformer_class": 3,   # every class: make test-full
}


def pytest_collection_modifyitems(config, items):
    seen: dict[str, int] = {}
    for item in items:
        if not hasattr(item, "callspec"):
            continue
        key = f"{os.path.basename(str(item.fspath))}::{item.originalname}"
        every = SAMPLE_EVERY.get(key)
        if every is None:
            continue
        index = seen.get(key, 0)
        seen[key] = index + 1
        if index % every:
            item.add_marker(pytest.mark.full)
