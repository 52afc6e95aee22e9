"""Every method's loss functions are copy-paste ready: they name no global but torch, math and each
other (no private member of common.py, no Args object, no module alias), so a user can lift them
into another project. Each method's own test file runs its copies (conftest.isolated) on tiny
tensors against the originals."""
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
        doc = fn.__doc__ or ""
        assert "Eq." in doc or ".py" in doc or "official" in doc, \
            f"{name}.{fn.__name__}: the docstring should cite the paper's equation or official code"


@pytest.mark.parametrize("name", METHODS)
def test_steps_name_only_torch_math_the_losses_and_the_hyperparameters(name):
    """Each training step (STEPS) is copy-paste ready too: besides torch and math it names only the
    file's losses, its other steps and its hyperparameter dataclass; mixed precision and the loss
    scaler come in as arguments. Each method's test file runs the copied step on a tiny model
    against the original."""
    from conftest import hparams
    module = importlib.import_module(name)
    hp = hparams(module)
    assert module.STEPS, f"{name}.STEPS is empty"
    allowed = {"torch", "math", hp.__name__}
    allowed |= {fn.__name__ for fn in (*module.LOSSES, *module.STEPS)}
    for fn in module.STEPS:
        used = inspect.getclosurevars(fn)
        assert not used.nonlocals, (fn.__name__, used.nonlocals)
        assert set(used.globals) <= allowed, (fn.__name__, set(used.globals) - allowed)
        assert fn.__module__ == name and inspect.getsource(fn).lstrip().startswith("def ")
        doc = fn.__doc__ or ""
        assert "Eq." in doc or "Algorithm" in doc or ".py" in doc or "official" in doc, \
            f"{name}.{fn.__name__}: the docstring should cite the paper or the official code"
