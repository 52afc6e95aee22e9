"""Shared fixtures: every test run writes below one temporary runs/ folder, and method tests share
one small base model and one classifier, trained once per session (a shorter pretraining than the
default, for CI)."""
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Before `common` is imported anywhere (also in subprocesses), so that nothing lands in the user's
# runs/.
os.environ.setdefault("UNLEARN_RUNS", tempfile.mkdtemp(prefix="unlearn-tests-"))
# two threads on the 2-core CI machine; OMP_NUM_THREADS=1 when several test runs share the cores.
# The scripts the tests start get the same number (their own default is half the cores).
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, os.cpu_count() or 1))))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import common as C  # noqa: E402

# CI-sized pretraining: enough for a base whose class-conditional samples are mostly right (checked
# below).
TEST_BASE_STEPS = 700


@pytest.fixture(scope="session")
def runs_dir() -> Path:
    return C.RUNS


@pytest.fixture(scope="session")
def digits_base(runs_dir):
    """(path, model) of the shared digits base, cached at the place load_base("digits") looks."""
    path = C.pretrain("digits", steps=TEST_BASE_STEPS)
    return path, C.load_checkpoint(path, "digits")[0]


@pytest.fixture(scope="session")
def digits_classifier(runs_dir):
    import eval as E
    return E.load_classifier("digits")


def run_script(*argv, timeout=900):
    """Run a method file as a user would; return its CompletedProcess (stdout, stderr and
    returncode)."""
    import subprocess
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_here(module, argv, capsys, entry=("main", "Args")):
    """What `python <module>.py argv` does after start-up, run in this process: returncode and
    stderr as run_script gives them. For the many one-line-error cases; one case per script still
    goes through run_script, where anything the start-up prints would show too."""
    import types
    capsys.readouterr()   # only what this call writes
    try:
        C.cli(getattr(module, entry[0]), getattr(module, entry[1]), list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def isolated(functions, extra=None) -> dict:
    """Compile the source of each function (in order) in a namespace that holds only torch and math
    (and `extra`, e.g. a method's hyperparameter dataclass), as a user who copies a method's loss
    functions or its training step into their own project would: {name: the re-created function}."""
    import inspect
    import math
    import textwrap
    ns = {"torch": torch, "math": math, **(extra or {})}
    for fn in functions:
        src = textwrap.dedent(inspect.getsource(fn))
        exec(compile(src, f"<copy of {fn.__name__}>", "exec"), ns)
    return {fn.__name__: ns[fn.__name__] for fn in functions}


def hparams(module):
    """A method's own hyperparameter dataclass: the base of its Args outside the shared run
    options."""
    import dataclasses
    return next(k for k in module.Args.__mro__[1:]
                if dataclasses.is_dataclass(k) and not issubclass(k, C.RunArgs))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (skipped where torch sees none)")
    config.addinivalue_line("markers", "compile: torch.compile on the CPU, minutes of compiling "
                                       "(run only when asked for: -m compile)")


def pytest_collection_modifyitems(config, items):
    if "compile" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="compiles for minutes: python -m pytest -m compile tests")
    for item in items:
        if "compile" in item.keywords:
            item.add_marker(skip)
