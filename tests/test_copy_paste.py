"""Every method's loss functions are copy-paste ready: they name no global but torch, math and each other (no
private member of common.py, no Args object, no module alias), so a user can lift them into another project.
Each method's own test file runs its copies (conftest.isolated) on tiny tensors against the originals."""
import importlib
import inspect

import pytest

METHODS = ("msgm", "sfd", "srs_me", "siss", "bilevel_prune")


@pytest.mark.parametrize("name", METHODS)
def test_losses_name_only_torch_math_and_each_other(name):
    module = importlib.import_module(name)
    losses = module.LOSSES
    assert losses, f"{name}.LOSSES is empty"
    allowed = {"torch", "math"} | {fn.__name__ for fn in losses}
    for fn in losses:
        used = inspect.getclosurevars(fn)
        assert not used.nonlocals, (fn.__name__, used.nonlocals)
        assert set(used.globals) <= allowed, (fn.__name__, set(used.globals) - allowed)
        assert fn.__module__ == name and inspect.getsource(fn).lstrip().startswith("def ")
        assert fn.__doc__ and ("Eq." in fn.__doc__ or ".py" in fn.__doc__ or "official" in fn.__doc__), \
            f"{name}.{fn.__name__}: the docstring should cite the paper's equation or the official code"
