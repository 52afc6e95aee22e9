"""The paper-scale path on a GPU: pretraining and each method for a few steps at MNIST size with mixed precision
(--amp) on CUDA. Stand-in tensors of MNIST's shape replace the dataset (a GPU machine may have no network).
Skipped where torch sees no CUDA device."""
import importlib

import pytest
import torch

import common as C
import eval as E

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# every method with the CI budget of the comparison, on 32x32 stand-in data, a tiny evaluation
FLAGS = ["--dataset", "mnist", "--device", "cuda", "--amp", "--tag", "cuda", "--n-per-class", "2",
         "--sample-steps", "2", "--n-nll", "1", "--nll-tol", "0.01", "--save-every", "5"]


@pytest.fixture(scope="module")
def mnist_stand_in():
    g = torch.Generator().manual_seed(0)
    data = {split: (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.arange(n) % 10)
            for split, n in (("train", 640), ("test", 100))}
    real = C.load_data
    C.load_data = lambda name="digits", root="data", split="train": data[split] if name in ("mnist", "fashion") \
        else real(name, root, split)
    C.pretrain("mnist", steps=5, batch_size=32, device="cuda", amp=True)   # the cached "base" the methods load
    E.load_classifier("mnist", device="cuda")
    yield data
    C.load_data = real


def test_pretraining_step_under_amp_and_compile(mnist_stand_in, tmp_path):
    path = C.pretrain("mnist", steps=4, batch_size=32, device="cuda", amp=True, compile=True,
                      out=tmp_path / "model.safetensors")
    ck = C.load(path)
    assert ck["done"] and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("name", ["sfd", "srs_me", "siss", "bilevel_prune", "msgm"])
def test_method_runs_a_few_steps_on_cuda_with_amp(mnist_stand_in, name):
    M = importlib.import_module(name)
    budget = dict(E.COMPARE_BUDGETS[("digits", "ci")][name])
    forget = ["--erase", "0"] if name == "srs_me" else ["--forget", "0"]
    n = ["--n-samples", "20"] if name == "msgm" else []
    m = M.main(C.parse_args(M.Args, FLAGS + forget + n + E.flags(budget)))
    assert m["seconds"] > 0 and 0 <= m["retain_acc"] <= 1
    assert (C.run_dir(name, "mnist", "cuda") / "samples.pt").exists()
