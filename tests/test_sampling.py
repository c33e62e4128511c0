"""The sample `make test` runs (tests/conftest.py SAMPLE_EVERY) names groups that exist: a renamed test would
otherwise leave its whole group in the sample, or a stale key would hide that a group lost its sampling."""
import importlib

from conftest import SAMPLE_EVERY


def test_every_sampled_group_is_a_parametrized_test():
    for key, every in SAMPLE_EVERY.items():
        filename, function = key.split("::")
        module = importlib.import_module(filename.removesuffix(".py"))
        fn = getattr(module, function, None)
        assert fn is not None, f"{key}: no such test"
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        assert marks, f"{key}: not parametrized"
        assert isinstance(every, int) and every >= 2, key
