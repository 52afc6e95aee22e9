"""common.py and eval.py: the schedule against diffusers, the NLL against an analytic density, FID
against an independent formula, the plumbing's error handling, and an end-to-end pretrain-and-sample
smoke test."""
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, run_here, run_script

import common as C
import eval as E

# ----------------------------------------------------------------------------------------- schedule


def test_alpha_bar_and_q_sample_match_diffusers():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear")
    vp = C.VP()
    assert torch.allclose(vp.alpha_bar.float(), ref.alphas_cumprod, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, torch.randn(16, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    assert torch.allclose(vp.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("t", [999, 500, 37, 1, 0])
def test_ancestral_step_matches_diffusers(t):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_sample=True,
                        variance_type="fixed_small")
    # diffusers keeps alpha_bar in float32, so near t = 0 its 1 - alpha_bar (~1e-4) carries a 2e-4
    # relative rounding error; give it the float64 cumulative product (alpha_bar parity is the test
    # above) and compare the step's algebra alone.
    ref.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(8, 1, 8, 8, generator=g) * 1.5, torch.randn(8, 1, 8, 8, generator=g)
    expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
    # the noise diffusers drew
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(C.VP().ddpm_step(eps, t, x_t, noise), expected, atol=1e-5)


def test_strided_ancestral_sampler_matches_diffusers_pipeline_steps():
    """sample("ddpm", steps=50) is DDPMPipeline(num_inference_steps=50): the same timesteps, and
    each strided step the same as diffusers' (its beta_t = 1 - alpha_bar_t / alpha_bar_prev, not the
    schedule's beta_t)."""
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_sample=True,
                        variance_type="fixed_small")
    ref.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    ref.set_timesteps(50)
    seen = []

    class Recorder(torch.nn.Module):   # a stand-in model: records the timesteps it is called at
        info = C.data_info("digits")
        tok = {"null": 10}

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, c):
            seen.append(int(t))
            return 0.3 * x
    x = C.sample(Recorder(), C.VP(), torch.tensor([0, 1]), "ddpm", 50)
    assert seen == ref.timesteps.tolist() and x.shape == (2, 1, 8, 8)
    seen.clear()
    # steps 0: the whole chain, t = 999 ... 0
    C.sample(Recorder(), C.VP(), torch.tensor([0, 1]), "ddpm", 0)
    assert seen == list(range(999, -1, -1))
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
    for t in (980, 500, 20, 0):
        expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
        got = C.VP().ddpm_step(eps, t, x_t, noise, t_prev=t - 20)
        assert torch.allclose(got, expected, atol=1e-5), t
    strided = ref.step(eps, 500, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
    # one step of T is not
    assert not torch.allclose(C.VP().ddpm_step(eps, 500, x_t, noise), strided, atol=1e-2)


def test_continuous_marginal_is_the_limit_of_the_discrete_schedule():
    vp = C.VP()
    # An independent construction: the DDPM product with a very fine grid converges to
    # exp(-int beta).
    for T in (1000, 200_000):
        fine = C.VP(T=T)
        i = torch.arange(1, T + 1, dtype=torch.float64)
        alpha, sigma = vp.marginal(i / T)
        assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(alpha))
        rel = ((alpha ** 2 - fine.alpha_bar) / fine.alpha_bar).abs()
        if T == 1000:
            # At T = 1000 the two agree to 1e-3 while abar > 0.78 (t <= 0.14); beyond, the
            # second-order term sum(beta_i^2)/2 of log(1 - beta) grows to a 7% relative gap in abar
            # at t = 1 (abar ~ 4e-5).
            assert rel[:140].max() < 1e-3
            assert 0.06 < rel.max() < 0.075
        else:
            assert rel.max() < 1e-3


# ---------------------------------------------------------------------------------------------- NLL


def _gaussian_eps(s: float):
    """Exact eps for data N(0, s^2 I): x_t ~ N(0, (alpha^2 s^2 + sigma^2) I),
    eps = sigma x / var."""
    vp = C.VP()

    def eps(x, t):
        a, sig = vp.marginal(t.double())
        a, sig = a.float().view(-1, 1, 1, 1), sig.float().view(-1, 1, 1, 1)
        return sig * x / (a ** 2 * s ** 2 + sig ** 2)
    return eps


def _gaussian_bpd(x, s):
    D = x[0].numel()
    logp = (-0.5 * D * math.log(2 * math.pi * s ** 2)
            - (x.double() ** 2).flatten(1).sum(1) / (2 * s ** 2))
    return (-logp / math.log(2) / D).numpy()


@pytest.mark.parametrize("s", [0.5, 1.5])
def test_nll_exact_divergence_reproduces_gaussian_density(s):
    x = torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(0)) * s
    bpd = E.nll_bpd(_gaussian_eps(s), x, C.VP(), exact=True)
    assert np.abs(bpd - _gaussian_bpd(x, s)).max() < 0.01


def test_nll_hutchinson_reproduces_gaussian_density_on_average():
    s = 0.7
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * s
    bpd = np.mean([E.nll_bpd(_gaussian_eps(s), x, C.VP(), seed=k).mean() for k in range(3)])
    assert abs(bpd - _gaussian_bpd(x, s).mean()) < 0.05


def test_nll_takes_a_module_without_parameters_like_a_function():
    class Zero(torch.nn.Module):   # no parameters: the device cannot come from them
        def forward(self, x, t):
            return torch.zeros_like(x)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = E.nll_bpd(Zero(), x, C.VP(), rtol=1e-4, atol=1e-4)
    b = E.nll_bpd(lambda xs, t: torch.zeros_like(xs), x, C.VP(), rtol=1e-4, atol=1e-4)
    assert np.isfinite(a).all() and np.array_equal(a, b)


def test_nll_offset_is_log2_of_half_the_bins():
    x = torch.zeros(2, 1, 2, 2)
    raw, quantised = (E.nll_bpd(_gaussian_eps(1.0), x, C.VP(), bins=b) for b in (None, 16))
    assert np.allclose(quantised - raw, 3.0)


# ---------------------------------------------------------------------------------------------- FID


def _fid_by_eigenvalues(f1, f2):
    """Independent route: Tr sqrt(S1 S2) = sum of sqrt of the (real, non-negative) eigenvalues of S1
    S2."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum()


def test_frechet_distance_matches_eigenvalue_formula():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    f2 = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 0.3
    d = E.frechet_distance(*E.feature_stats(f1), *E.feature_stats(f2))
    assert d == pytest.approx(_fid_by_eigenvalues(f1, f2), rel=1e-6)


def test_frechet_distance_identity_and_mean_shift():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 8))
    mu, sig = E.feature_stats(f)
    assert abs(E.frechet_distance(mu, sig, mu, sig)) < 1e-6
    d = rng.normal(size=8)
    assert E.frechet_distance(mu + d, sig, mu, sig) == pytest.approx((d ** 2).sum(), rel=1e-6,
                                                                     abs=1e-6)


def test_fid_is_none_where_undefined_not_a_crash(digits_classifier):
    x = C.load_data("digits")[0][:20]
    assert E.fid(digits_classifier, x[:1], x) is None and E.fid(digits_classifier, x, x[:0]) is None
    bad = x.clone()
    bad[3] = float("nan")
    assert E.fid(digits_classifier, bad, x) is None
    # defined otherwise
    assert E.fid(digits_classifier, x[:10], x[10:]) > 0
    m = E.sample_metrics(digits_classifier, x[:1], torch.tensor([3]), x,
                         C.load_data("digits")[1][:20])
    assert m["fid_retain"] is None and m["retain_acc"] in (0.0, 1.0)


def test_inception_score_bounds():
    assert E.inception_score(torch.eye(10)) == pytest.approx(10.0, rel=1e-6)
    assert E.inception_score(torch.full((50, 10), 0.1)) == pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------------------------------- plumbing


def test_digits_split_is_fixed_and_scaled():
    x, y = C.load_data("digits", split="train")
    xt, _ = C.load_data("digits", split="test")
    assert x.shape == (1500, 1, 8, 8) and xt.shape == (297, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
    assert torch.equal(C.load_data("digits")[0], x)
    grid = x * 8 + 8                                   # back to the 17 integer levels
    assert torch.allclose(grid, grid.round())


def test_missing_torchvision_dataset_says_where_to_put_it(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(C.UsageError, match="--data-root"):
        C.load_data("mnist", str(tmp_path))


@pytest.mark.parametrize("argv, message, as_process", [
    (["common.py", "--dataset", "svhn"], "unknown dataset", True),
    (["eval.py", "--forget", "12"], "out of range", False),
    (["eval.py", "--ckpt", "nowhere.pt"], "no checkpoint", False),
])
def test_bad_input_is_one_line_error(argv, message, as_process, runs_dir, capsys):
    before = sorted(p for p in runs_dir.rglob("*"))
    r = run_script(*argv) if as_process else run_here(_module(argv[0]), argv[1:], capsys)
    assert r.returncode == 2 and message in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")
    assert sorted(p for p in runs_dir.rglob("*")) == before


def _module(script: str):
    """The module a script is, to call its entry point in this process (what `python <script>` runs,
    without the start-up)."""
    import importlib
    return importlib.import_module(script[:-3])


@pytest.mark.parametrize("argv, message", [
    (["common.py", "--device", "gpu"], "unknown --device 'gpu'"),
    (["common.py", "--steps", "-5"], "--steps -5: must not be negative"),
    (["msgm.py", "--steps", "-3"], "--steps -3: must not be negative"),
    (["siss.py", "--lr", "inf"], "--lr inf: must be a finite number"),
    (["common.py", "--lr", "nan"], "--lr nan: must be a finite number"),
    (["common.py", "--sampler", "heun"], "unknown --sampler 'heun': use ddim, ddpm, em"),
    (["bilevel_prune.py", "--sampler", "DDPM"], "unknown --sampler 'DDPM'"),
    (["srs_me.py", "--batch-size", "-1"], "must not be negative"),
    (["eval.py", "--n-per-class", "0"], "--n-per-class 0: must be positive"),
    (["eval.py", "--sample-steps", "0"], "--sample-steps 0: must be positive"),
    (["sfd.py", "--device", "cuda"] if not torch.cuda.is_available()
     else ["sfd.py", "--device", "tpu"], "--device"),
    (["siss.py", "--device", "mps"] if not torch.backends.mps.is_available()
     else ["siss.py", "--device", "x"], "--device"),
    (["common.py", "--tag", "../../escape", "--steps", "1"], "--tag '../../escape': use one plain"),
    (["siss.py", "--tag", "a/b"], "--tag 'a/b': use one plain name"),
    (["msgm.py", "--tag", ".."], "--tag '..'"),
    (["eval.py", "--fid-features", "fancy"], "unknown --fid-features 'fancy'"),
    (["srs_me.py", "--inception-weights", "nowhere.pth"], "--inception-weights nowhere.pth: no"),
])
def test_numbers_and_devices_a_run_cannot_mean_are_one_line_errors(argv, message, runs_dir, capsys):
    before = sorted(p for p in runs_dir.rglob("*"))
    r = run_here(_module(argv[0]), argv[1:], capsys)
    assert r.returncode == 2 and message in r.stderr and r.stderr.startswith("error:")
    assert r.stderr.strip().count("\n") == 0
    assert sorted(p for p in runs_dir.rglob("*")) == before


def test_a_plain_tag_names_the_run_folder():
    args = C.parse_args(C.RunArgs, ["--tag", "lr1e-4_v2.b"])
    assert C.run_dir("x", args.dataset, args.tag).parent == C.RUNS


def test_inception_without_pytorch_fid_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """In a fresh runs folder (no base, no classifier) the refusal comes within seconds: it depends
    only on the arguments and the installed packages."""
    import sys
    import time
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)          # not installed
    monkeypatch.setattr(C, "RUNS", tmp_path)
    t0 = time.time()
    for script in ("eval.py", "siss.py", "bilevel_prune.py"):
        r = run_here(_module(script), ["--fid-features", "inception"], capsys)
        assert r.returncode == 2 and "needs pytorch-fid" in r.stderr, (script, r.stderr)
    assert time.time() - t0 < 10 and not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["siss.py", "msgm.py", "srs_me.py", "bilevel_prune.py"])
def test_torchrun_of_a_one_process_method_is_refused(script, runs_dir, monkeypatch, capsys):
    """Without a data-parallel loop, N torchrun copies would each run the whole job into one run
    folder: refused in one line naming the scripts that are data-parallel, before any work."""
    before = sorted(runs_dir.rglob("*"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = run_here(_module(script), [], capsys)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert f"{script} runs in one process (torchrun started 2)" in r.stderr
    assert "common.py, sfd.py" in r.stderr
    assert sorted(runs_dir.rglob("*")) == before


def test_diverged_training_is_an_error_and_caches_nothing(runs_dir):
    r = run_script("common.py", "--force", "--lr", "1e6", "--steps", "30", "--tag", "diverged")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: training diverged at step")
    assert not C.base_path("digits", "diverged").exists()


@pytest.mark.parametrize("script", ["common.py", "eval.py", "msgm.py", "sfd.py", "srs_me.py",
                                    "siss.py", "bilevel_prune.py"])
def test_every_entry_point_prints_its_help(script, capsys):
    """--help of each script (in this process: the parser is all that runs); no docstring can break
    it."""
    with pytest.raises(SystemExit) as exit_:
        C.parse_args(_module(script).Args, ["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--seed" in out and "examples:" in out


def test_a_failed_run_leaves_no_folder_behind(runs_dir):
    """A run that fails after start_run leaves no folder holding only args.json (a folder that was
    there before, or holds more, stays)."""
    def fails(args):
        C.start_run("failing", args)
        raise RuntimeError("the data could not be read")

    def fails_late(args):
        out = C.start_run("failing", args)
        (out / "resume.pt").write_bytes(b"")
        raise C.UsageError("stopped")
    with pytest.raises(RuntimeError):
        C.cli(fails, C.RunArgs, ["--tag", "early"])
    assert not C.run_dir("failing", "digits", "early").exists()
    with pytest.raises(SystemExit):
        C.cli(fails_late, C.RunArgs, ["--tag", "late"])
    assert (C.run_dir("failing", "digits", "late") / "resume.pt").exists()


def test_saved_files_are_readable_by_the_group_and_others(tmp_path):
    """Files get the mode open() gives under the umask (safetensors alone would leave 0600)."""
    import os
    old = os.umask(0o022)
    try:
        C.atomic_save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
        C.atomic_save({"w": torch.ones(2)}, tmp_path / "r.pt")
        (tmp_path / "unet").mkdir()
        from safetensors.torch import save_file
        save_file({"w": torch.ones(2)}, str(tmp_path / "unet" / "w.safetensors"))
        C.share_files(tmp_path / "unet")
    finally:
        os.umask(old)
    for name in ("m.safetensors", "r.pt", "unet/w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_save_every_0_writes_no_resumable_state(tmp_path):
    """--save-every 0: no checkpoints in the loop, so a rerun starts afresh; N: every N steps."""
    model = torch.nn.Linear(2, 2)
    none = C.Resume(tmp_path / "none.pt", {"a": 1}, 0, model=model)
    every3 = C.Resume(tmp_path / "every3.pt", {"a": 1}, 3, model=model)
    for step in range(1, 3):
        none.save(step)
        every3.save(step)
    assert not (tmp_path / "every3.pt").exists()
    for step in range(3, 10):
        none.save(step)
        every3.save(step)
    assert not (tmp_path / "none.pt").exists() and (tmp_path / "every3.pt").exists()
    assert C.Resume(tmp_path / "none.pt", {"a": 1}, 0, model=model).load() == 0
    assert C.Resume(tmp_path / "every3.pt", {"a": 1}, 3, model=model).load() == 9


def test_two_savers_of_one_path_never_collide(tmp_path):
    """Each save writes its own temporary file: two threads saving the same checkpoint 50 times each
    all succeed (with one shared temporary name, one rename finds its file taken by the other), and
    the file left behind is whole."""
    import threading
    path, errors = tmp_path / "m.pt", []

    def saver(value):
        for _ in range(50):
            try:
                C.atomic_save({"w": torch.full((256, 256), float(value))}, path)
            except Exception as e:   # noqa: BLE001 (collected and reported below)
                errors.append(e)
    threads = [threading.Thread(target=saver, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = torch.load(path)["w"]
    assert not errors and w.unique().numel() == 1 and not list(tmp_path.glob("*.tmp"))


class _RunsCode:
    """A pickle that calls a function when loaded, as a hostile checkpoint would (here a harmless
    one)."""
    def __reduce__(self):
        return (os.getcwd, ())


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    torch.save({"config": _RunsCode(), "model": {}}, tmp_path / "hostile.pt")
    with pytest.raises(C.UsageError, match="cannot read"):
        C.load_checkpoint(tmp_path / "hostile.pt", "digits")
    # what the repository itself writes (numpy values included) reads back with weights_only=True
    C.atomic_save({"a": np.float64(1.5), "b": np.arange(3), "p": tmp_path,
                   "rng": np.random.get_state()}, tmp_path / "ok.pt")
    back = C.load(tmp_path / "ok.pt")
    assert back["a"] == 1.5 and back["b"].tolist() == [0, 1, 2] and back["p"] == str(tmp_path)


def test_weights_files_are_safetensors_that_round_trip(tmp_path):
    """*.safetensors: tensors in the body (any safetensors reader gets them), the rest as JSON in
    the header; nested dicts with int keys, tuples, numbers, strings and None come back as they went
    in."""
    from safetensors.torch import load_file
    # a view: stored on its own
    shifts = {3: {"w": torch.randn(2, 3)}, 7: {"w": torch.randn(4)[1:3]}}
    obj = {"shifts": shifts, "t": (1, (2.5, None)), "s": "x", "n": [np.int64(4), float("inf")]}
    C.atomic_save(obj, tmp_path / "m.safetensors")
    back = C.load(tmp_path / "m.safetensors")
    assert back["t"] == (1, (2.5, None)) and back["s"] == "x" and back["n"] == [4, float("inf")]
    assert all(torch.equal(back["shifts"][k]["w"], shifts[k]["w"]) for k in (3, 7))
    assert sorted(load_file(tmp_path / "m.safetensors")) == ["shifts/3/w", "shifts/7/w"]
    code = "".join(p.read_text() for p in ROOT.glob("*.py"))
    # only inside common.load
    assert "weights_only=False" not in code and code.count("torch.load(") == 1


def test_other_methods_models_are_named_not_misread(tmp_path, runs_dir):
    """A pruned student or an SRS-ME run is refused by the plain loader with the function that loads
    it; an SFD generator (the same network) is refused by eval.py, which would sample it for 50
    steps."""
    model = C.CondUNet("digits")
    C.save_checkpoint(tmp_path / "student.pt", model, 1, plan={"unet.mid_block": [0]})
    with pytest.raises(C.UsageError, match="bilevel_prune.load_student"):
        C.load_checkpoint(tmp_path / "student.pt", "digits")
    C.atomic_save({"base": "x", "shifts": {}}, tmp_path / "srs.pt")
    with pytest.raises(C.UsageError, match="srs_me.load_model"):
        C.load_checkpoint(tmp_path / "srs.pt", "digits")
    C.save_checkpoint(tmp_path / "gen.pt", model, 1, method="sfd")
    before = sorted(runs_dir.rglob("*"))
    r = run_script("eval.py", "--ckpt", str(tmp_path / "gen.pt"))
    assert r.returncode == 2 and "sfd.py --init" in r.stderr and r.stderr.strip().count("\n") == 0
    assert sorted(runs_dir.rglob("*")) == before


def test_checkpoint_refuses_other_dataset_and_garbage(tmp_path):
    model = C.CondUNet("digits")
    path = tmp_path / "model.safetensors"
    C.save_checkpoint(path, model, step=3)
    # a run folder names its model file
    assert C.load_checkpoint(tmp_path, "digits")[1]["step"] == 3
    # written through a temp file, then renamed
    assert not list(tmp_path.glob("*.tmp"))
    loaded, ck = C.load_checkpoint(path, "digits")
    assert ck["step"] == 3 and ck["config"]["dataset"] == "digits"
    with pytest.raises(C.UsageError, match="trained on 'digits'"):
        C.load_checkpoint(path, "mnist")
    ck["config"]["unet"]["block_out_channels"] = [16, 32]
    C.atomic_save(ck, tmp_path / "other.safetensors")
    with pytest.raises(C.UsageError, match="do not fit the architecture"):
        C.load_checkpoint(tmp_path / "other.safetensors", "digits")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(C.UsageError, match="cannot read"):
        C.load_checkpoint(tmp_path / "bad.pt", "digits")


def test_32px_models_build_and_run_a_training_step():
    for name in ("mnist", "cifar10"):
        m = C.CondUNet(name)
        x = torch.randn(2, m.info.channels, 32, 32)
        loss = m(x, torch.tensor([3.0, 900.0]), torch.tensor([1, m.tok["null"]])).square().mean()
        loss.backward()
        assert m.token_emb.weight.grad is not None


# --------------------------------------------------------------------------------------- end to end


def test_pretrain_caches_and_samples(tmp_path):
    path = tmp_path / "model.safetensors"
    C.pretrain("digits", steps=20, out=path)
    ck = C.load(path)
    assert ck["done"] and ck["step"] == 20 and "train" not in ck
    model = C.load_checkpoint(path, "digits")[0]
    for sampler, steps in (("ddim", 10), ("em", 20), ("ddpm", 5)):
        x = C.sample(model, C.VP(), torch.tensor([0, 1, model.tok["null"]]), sampler, steps,
                     guidance=2.0)
        assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    again = C.sample(model, C.VP(), torch.tensor([0, 1]), "ddim", 10, seed=5)
    assert torch.equal(again, C.sample(model, C.VP(), torch.tensor([0, 1]), "ddim", 10, seed=5))


def test_base_unet_opens_in_diffusers(digits_base):
    """runs/base-<dataset>/unet is a diffusers folder (safetensors) holding the base's UNet: loaded
    with from_pretrained and fed our token embeddings, it predicts what our loader's model
    predicts."""
    from diffusers import UNet2DConditionModel
    path, model = digits_base
    unet = UNet2DConditionModel.from_pretrained(path.parent / "unet")
    assert (path.parent / "unet" / "diffusion_pytorch_model.safetensors").exists()
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([10, 200, 500, 900])
    c = torch.tensor([0, 3, 7, model.tok["null"]])
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=model.context(c)).sample
        assert torch.allclose(theirs, model(x, t, c), atol=1e-6)


def test_base_and_classifier_quality(digits_base, digits_classifier):
    """The CI-sized base already draws the asked class most of the time; real digits beat noise in
    NLL."""
    _, model = digits_base
    clf = digits_classifier
    assert clf.test_acc >= 0.97
    c = C.class_tokens(10, 30)
    x = C.sample(model, C.VP(), c, steps=25)
    assert (E.predict(clf, x) == c).float().mean() > 0.75
    xt, _ = C.load_data("digits", split="test")
    real = E.model_nll(model, xt[:40], rtol=1e-4, atol=1e-4)
    noise = E.model_nll(model, E.noise_images(model.info, 40), rtol=1e-4, atol=1e-4)
    assert real.mean() + 1.0 < noise.mean()


def test_eval_cli_prints_json_last(digits_base, digits_classifier):
    r = run_script("eval.py", "--n-per-class", "20", "--sample-steps", "10", "--nll-real", "10",
                   "--n-nll", "2", "--nll-tol", "1e-3", "--forget", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("classifier_test_acc", "class_acc", "fid_retain", "is", "nll_real_bpd",
              "nll_noise_bpd", "forget_rate", "nll_forget_bpd", "nll_kept_bpd",
              "nll_forget_null_bpd"):
        assert k in m
    assert m["nll_real_bpd"] < m["nll_noise_bpd"]


def test_samples_pt_is_judged_like_the_samples_themselves(digits_base, digits_classifier):
    """judge() on a samples.pt agrees with sample_metrics on its class-conditional part, and takes
    the share of a class among null-token samples as the forget rate of a model that has only those
    (an unconditional model)."""
    _, model = digits_base
    clf = digits_classifier
    x_real, y_real = C.load_data("digits")
    c = torch.cat([C.class_tokens(10, 8), torch.full((60,), model.tok["null"])])
    x = C.sample(model, C.VP(), c, steps=10)
    both = E.judge({"x": x, "c": c, "sampler": "ddim-10", "nfe": 10, "null": 10}, clf, x_real,
                   y_real, [0])
    direct = E.sample_metrics(clf, x[:80], c[:80], x_real, y_real, [0])
    assert all(both[k] == direct[k]
               for k in ("forget_rate", "retain_acc", "fid_retain", "class_acc"))
    share = (E.predict(clf, x[80:]) == 0).float().mean().item()
    assert both["forget_rate_uncond"] == pytest.approx(share)
    uncond = E.judge({"x": x[80:], "c": c[80:], "sampler": "ddim-10", "nfe": 10, "null": 10}, clf,
                     x_real, y_real, [0])
    assert uncond["forget_rate"] == pytest.approx(share) and 0 < uncond["retain_acc"] <= 1


def test_the_sampler_flag_reaches_the_samples(digits_base, digits_classifier):
    """A run's --sampler (common.RunArgs) draws its samples and those of the base it is compared
    with: ancestral DDPM draws other images than DDIM from the same seeds, and the samples are named
    after it."""
    _, model = digits_base
    runs = {s: E.evaluate_model(model, digits_classifier,
                                C.make_args(C.RunArgs, sampler=s, n_per_class=2, sample_steps=5),
                                [0], nll=False)[1]
            for s in ("ddim", "ddpm")}
    assert runs["ddim"]["sampler"] == "ddim-5" and runs["ddpm"]["sampler"] == "ddpm-5"
    assert runs["ddpm"]["nfe"] == 5
    assert (runs["ddim"]["x"] - runs["ddpm"]["x"]).abs().max() > 0.1
    direct = C.sample(model, C.VP(), C.class_tokens(10, 2), "ddpm", 5, seed=0)
    assert torch.equal(runs["ddpm"]["x"], direct)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_network_sees_a_batch_in_chunks_without_changing_it(digits_base, monkeypatch,
                                                                sampler):
    """On a CPU the sampler runs the network CHUNK images at a time: each chunk with its own
    tokens, so the samples are those of one call on the whole batch (guided too)."""
    _, model = digits_base
    c = torch.tensor([0, 3, 7, 9, 1, 12, 4])          # classes and the watermark token
    whole = C.sample(model, C.VP(), c, sampler, 4, guidance=2.0, seed=3)
    monkeypatch.setitem(C.CHUNK, "cpu", 3)
    chunked = C.sample(model, C.VP(), c, sampler, 4, guidance=2.0, seed=3)
    assert (whole - chunked).abs().max() < 1e-5
    shuffled = C.sample(model, C.VP(), c.roll(1), sampler, 4, guidance=2.0, seed=3)
    assert (whole - shuffled).abs().max() > 0.1      # the tokens matter: a misaligned chunk shows


# ---------------------------------------------------------------------------- plumbing, paper scale


def test_help_shows_the_value_used_for_each_dataset():
    r = run_script("common.py", "--help")
    text = " ".join(r.stdout.split())
    assert "[1400; mnist, fashion: 50000; cifar10: 800000]" in text
    assert "[0.001; mnist, fashion, cifar10: 0.0002]" in text
    assert C.make_args(C.Args, dataset="cifar10").steps == 800_000
    assert C.make_args(C.Args).steps == 1400
    given = C.parse_args(C.Args, ["--dataset", "cifar10", "--lr", "0.001", "--no-flip"])
    # flags win
    assert (given.lr, given.flip, given.steps, given.warmup) == (1e-3, False, 800_000, 5000)


def test_cache_recomputes_only_when_its_key_changes(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"v": torch.arange(3)}
    a = C.cached(tmp_path / "c.pt", {"steps": 5}, compute)
    b = C.cached(tmp_path / "c.pt", {"steps": 5}, compute)
    assert torch.equal(a["v"], b["v"]) and len(calls) == 1
    C.cached(tmp_path / "c.pt", {"steps": 6}, compute)
    assert len(calls) == 2
    f = tmp_path / "m.bin"
    f.write_bytes(b"abc")
    before = C.file_id(f)
    # same size, new contents: a new identity
    f.write_bytes(b"abd")
    assert C.file_id(f) != before


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed after its checkpoint at step 20, the rerun continues with the saved optimiser, EMA and
    RNG streams and ends with exactly the weights of an uninterrupted run."""
    whole = C.pretrain("digits", steps=30, save_every=10, out=tmp_path / "a" / "model.safetensors")
    real, calls = C.F.mse_loss, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(C.F, "mse_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        C.pretrain("digits", steps=30, save_every=10, out=tmp_path / "b" / "model.safetensors")
    monkeypatch.setattr(C.F, "mse_loss", real)
    assert C.load(tmp_path / "b" / "resume.pt")["step"] == 20
    resumed = C.pretrain("digits", steps=30, save_every=10,
                         out=tmp_path / "b" / "model.safetensors")
    a, b = (C.load(p)["model"] for p in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a) and not (tmp_path / "b" / "resume.pt").exists()


def test_two_processes_take_the_steps_of_one(runs_dir):
    """torchrun with 2 CPU processes (gloo) and the global batch split between them ends with the
    weights of one process with the same global batch: each process keeps its share of the same draw
    and DDP averages."""
    common = ["--steps", "12", "--batch-size", "32", "--save-every", "0", "--n-per-class", "1",
              "--sample-steps", "2"]
    one = run_script("common.py", *common, "--tag", "one-process")
    # one thread per process and core
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "common.py", *common, "--tag", "two-processes", "--threads", "1")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    assert "x 2 processes" in two.stdout
    a, b = (C.load(C.base_path("digits", t))["model"] for t in ("one-process", "two-processes"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    moved = max((a[k] - C.CondUNet("digits").state_dict()[k]).abs().max().item()
                for k in a if "norm" not in k)
    assert moved > 1e-3                                      # and the steps did move the weights


def test_inception_features_follow_pytorch_fids_pipeline(tmp_path):
    """With a stand-in network (the weights are not on this machine): images reach it as
    pytorch-fid's PNG reader gives them (8-bit levels in [0, 1], grey repeated to RGB), and its pool
    features come back flat."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor
    seen = []

    # shaped like pytorch_fid.inception.InceptionV3([3]): a list of maps
    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            seen.append(x)
            pooled = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)[:, :, None, None]
            return [pooled.repeat(1, 1, 2, 2) * self.w]
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    f = E.inception_features(StandIn(), x)
    for i in range(5):                       # what pytorch-fid reads back from a saved PNG
        path = tmp_path / f"{i}.png"
        Image.fromarray(((x[i, 0] + 1) * 127.5).round().byte().numpy()).convert("RGB").save(path)
        assert torch.allclose(seen[0][i], to_tensor(Image.open(path).convert("RGB")), atol=1e-6)
    assert f.shape == (5, 6)
    clf = E.Classifier(1, 10)
    clf.fid_net = StandIn()
    assert np.allclose(E.features(clf, x), f)


def test_inception_fid_without_its_weights_is_a_one_line_error(tmp_path, monkeypatch):
    import sys
    import types
    # digits: classifier features
    assert E.fid_network("auto", "", "digits", "cpu") is None
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)                     # not installed
    with pytest.raises(C.UsageError, match="pip install pytorch-fid.*--inception-weights"):
        E.fid_network("inception", "", "cifar10", "cpu")
    # auto falls back, with a note
    assert E.fid_network("auto", "", "cifar10", "cpu") is None
    # installed (a stand-in module), weights given by path: the network is built from that file
    weights = tmp_path / E.INCEPTION_FILE
    torch.save({"w": torch.ones(())}, weights)
    built = []

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()
            self.w = torch.nn.Parameter(fake.load_state_dict_from_url("https://unreachable")["w"])
            built.append(blocks)
    fake = types.SimpleNamespace(InceptionV3=InceptionV3, load_state_dict_from_url=None)
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.SimpleNamespace(inception=fake))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", fake)
    net = E.fid_network("inception", str(weights), "cifar10", "cpu")
    assert built == [[3]] and net.w.item() == 1.0
    with pytest.raises(C.UsageError, match="no such file"):
        E.fid_network("inception", str(tmp_path / "missing.pth"), "cifar10", "cpu")


def test_sample_grid_frames_only_the_gaps_around_highlighted_rows(tmp_path):
    from PIL import Image
    # white images, 3 per row
    x = torch.full((6, 1, 2, 2), 1.0)
    C.save_grid(x, tmp_path / "g.png", nrow=3, scale=1, highlight_rows=[1])
    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert im.shape == (7, 10, 3)
    red = (im == [255, 0, 0]).all(2)
    # the gaps above and below row 1
    assert red[3:7].all(1)[[0, 3]].all() and red[:3].sum() == 0
    assert (im[4:6, 1:3] == 255).all()                                     # its images stay white
