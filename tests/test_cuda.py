"""The paper-scale path on a GPU: pretraining and each method for a few steps at MNIST size with
mixed precision (--amp) on CUDA. Stand-in tensors of MNIST's shape replace the dataset (a GPU
machine may have no network). Skipped where torch sees no CUDA device."""
import importlib
import json

import pytest
import torch

import common as C
import eval as E

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# every method with the CI budget of the comparison, on 32x32 stand-in data, a tiny evaluation
FLAGS = ["--dataset", "mnist", "--device", "cuda", "--amp", "--tag", "cuda", "--n-per-class", "2",
         "--sample-steps", "2", "--n-nll", "1", "--nll-tol", "0.01", "--save-every", "5"]


@pytest.fixture(scope="module")
def mnist_stand_in():
    g = torch.Generator().manual_seed(0)
    data = {split: (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.arange(n) % 10)
            for split, n in (("train", 640), ("test", 100))}
    real = C.load_data
    C.load_data = lambda name="digits", root="data", split="train": \
        data[split] if name in ("mnist", "fashion") else real(name, root, split)
    # the cached "base" the methods load
    C.pretrain("mnist", steps=5, batch_size=32, device="cuda", amp=True)
    E.load_classifier("mnist", device="cuda")
    yield data
    C.load_data = real


def test_pretraining_step_under_amp_and_compile(mnist_stand_in, tmp_path):
    path = C.pretrain("mnist", steps=4, batch_size=32, device="cuda", amp=True, compile=True,
                      out=tmp_path / "model.safetensors")
    ck = C.load(path)
    assert ck["done"] and all(torch.isfinite(v).all() for v in ck["model"].values()
                              if v.is_floating_point())


@pytest.mark.parametrize("name", ["sfd", "srs_me", "siss", "bilevel_prune", "msgm"])
def test_method_runs_a_few_steps_on_cuda_with_amp(mnist_stand_in, name):
    M = importlib.import_module(name)
    budget = dict(E.COMPARE_BUDGETS[("digits", "ci")][name])
    forget = ["--erase", "0"] if name == "srs_me" else ["--forget", "0"]
    # msgm fine-tunes the cached base as eval.py compare has it do (alone it would train mnist's
    # normal model from scratch first: 50,000 steps)
    n = ["--n-samples", "20", "--base", str(C.base_path("mnist"))] if name == "msgm" else []
    m = M.main(C.parse_args(M.Args, FLAGS + forget + n + E.flags(budget)))
    assert m["seconds"] > 0 and 0 <= m["retain_acc"] <= 1
    assert (C.run_dir(name, "mnist", "cuda") / "samples.pt").exists()


def _training_rate(name: str, amp: bool, compile_: bool, batch: int = 128,
                   steps: int = 20) -> tuple:
    """Images per second and peak GPU memory (GiB) of pretraining steps as common.pretrain takes
    them (C.denoising_step: forward under autocast, backward, clipping, AdamW, EMA) on stand-in
    images of the dataset's shape."""
    import time
    model = C.CondUNet(name).cuda()
    ema, opt, vp = C.EMA(model, 0.9999), torch.optim.AdamW(model.parameters(), lr=2e-4), C.VP()
    net, scaler = torch.compile(model) if compile_ else model, C.grad_scaler("cuda", amp)
    x = torch.rand(batch, model.info.channels, 32, 32, device="cuda") * 2 - 1
    c = torch.arange(batch, device="cuda") % 10

    def step():
        t, noise = torch.randint(vp.T, (batch,), device="cuda"), torch.randn_like(x)
        C.denoising_step(net, model, opt, scaler, ema, vp, x, t, c, noise, amp)
    for _ in range(10 if compile_ else 3):     # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0), torch.cuda.max_memory_allocated() / 2 ** 30


def test_throughput_table(mnist_stand_in, capsys):
    """The README's GPU table (`python -m pytest -s -m cuda tests/test_cuda.py`): pretraining
    images/s and peak memory at MNIST and CIFAR-10 size in fp32, bf16 and bf16 + compile, and each
    method's seconds at MNIST size (the runs above). bf16 must need less memory than fp32."""
    rows = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch 128, "
            f"stand-in images", "",
            "| data | precision | images/s | peak memory (GiB) |", "|---|---|---|---|"]
    for name in ("mnist", "cifar10"):
        got = {label: _training_rate(name, amp, comp) for label, amp, comp in
               (("fp32 (TF32)", False, False), ("bf16", True, False),
                ("bf16 + compile", True, True))}
        rows += [f"| {name} | {k} | {v[0]:,.0f} | {v[1]:.1f} |" for k, v in got.items()]
        assert got["bf16"][1] < got["fp32 (TF32)"][1]
    rows += ["", "| method (MNIST size, --amp, the comparison's ci budget) | steps | seconds |",
             "|---|---|---|"]
    for name in ("sfd", "srs_me", "siss", "bilevel_prune", "msgm"):
        path = C.run_dir(name, "mnist", "cuda") / "metrics.json"
        if path.exists():
            budget = E.COMPARE_BUDGETS[("digits", "ci")][name]
            per_concept = f"<= {budget.get('max_steps')} per concept"
            steps = budget.get("iters", budget.get("steps", per_concept))
            rows.append(f"| {name} | {steps} | {json.loads(path.read_text())['seconds']:.1f} |")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
