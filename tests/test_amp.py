"""Mixed precision on the CPU, and the diffusers folder every run leaves. Every method a few steps
under bf16 autocast and under fp16 with loss scaling (the GradScaler path a GPU without bf16 takes),
on the digits base: each run's folder is complete, every number it reports is finite, and its first
update points where the fp32 update points. The measure: cosine similarity of the weight update
(trained weights minus starting weights, over every floating-point tensor of the model file)
against the fp32 run of the same seed. The fp32 runs' <run>/diffusers folders then load with
diffusers' API and draw the runs' own samples."""
import copy
import importlib
import math

import pytest
import torch

import common as C

# judged on almost nothing: these runs test the training path, not the effect
EVAL = ["--sample-steps", "2", "--n-nll", "1", "--nll-tol", "0.01", "--device", "cpu"]
FEW = {
    "siss": ["--forget", "0", "--steps", "2", "--ema", "0", "--batch-size", "16", "--eval-every",
             "1000", "--n-eval", "2", "--n-uncond", "2", "--no-stop-at-zero", "--n-per-class", "2",
             "--save-every", "0", "--scaling-norm", "1", "--n-monitor", "2",
             "--monitor-steps", "2"],
    "sfd": ["--forget", "0", "--iters", "2", "--batch-size", "8", "--n-per-class", "2",
            "--save-every", "0"],
    "srs_me": ["--erase", "0", "--min-steps", "2", "--max-steps", "2", "--n-train-images", "8",
               "--batch-size", "4", "--n-per-class", "2"],    # no resume: nothing to save
    "bilevel_prune": ["--forget", "0", "--steps", "3", "--upper-every", "2", "--warmup", "0",
                      "--ema", "0", "--batch-size", "16", "--keep", "0.8", "--n-per-class", "2",
                      "--save-every", "0"],
    "msgm": ["--forget", "0", "--finetune", "--steps", "2", "--ema", "0", "--forget-every", "1",
             "--no-control", "--n-samples", "20", "--batch-size", "16", "--save-every", "0"],
}
FILES = {"args.json", "model.safetensors", "samples.pt", "samples.png", "metrics.json"}
# bf16 keeps 8 bits of mantissa, fp16 11. Adam's first steps move each weight by about +-lr whatever
# its gradient's size, so a weight whose gradient rounding flips moves the other way. Measured on
# the CI base, the cosine to the fp32 update is 0.977-0.996 (bf16) and 0.997-0.9996 (fp16) for the
# UNet methods; SRS-ME's null-space coefficients have far smaller gradients: 0.58 (bf16) and 0.94
# (fp16). A random update has cosine about 0.
BOUND = {"bf16": 0.9, "fp16": 0.95}
BOUND_SRS_ME = {"bf16": 0.4, "fp16": 0.85}


def _update(name: str, out, base) -> torch.Tensor:
    """The run's weight change as one float64 vector: the model file's trained weights minus the
    ones it started from (SRS-ME stores the change itself: its shifts; SFD: the raw generator,
    initialised as the base; bilevel: the student, the base pruned by the stored plan)."""
    ck = C.load(out / "model.safetensors")
    if name == "srs_me":
        return torch.cat([w.double().flatten() for k in sorted(ck["shifts"])
                          for _, w in sorted(ck["shifts"][k].items())])
    start = base.state_dict()
    if name == "bilevel_prune":
        B = importlib.import_module(name)
        start = B.apply_plan(copy.deepcopy(base), ck["plan"]).state_dict()
    new = ck["generator_raw" if name == "sfd" else "model"]
    return torch.cat([(new[k].double() - start[k].double()).flatten() for k in sorted(new)
                      if new[k].is_floating_point()])


def _numbers(v):
    """Every number in a metrics dict, however nested."""
    if isinstance(v, dict):
        for x in v.values():
            yield from _numbers(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _numbers(x)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield v


def _run(name: str, precision: str, base) -> tuple:
    """A few steps of the method at this precision: (its update, its run folder), the folder
    complete and every number it reports finite."""
    M = importlib.import_module(name)
    argv = FEW[name] + EVAL + ["--amp", precision, "--tag", f"amp-{precision}"]
    m = M.main(C.parse_args(M.Args, argv))
    out = C.run_dir(name, "digits", f"amp-{precision}")
    assert FILES <= {p.name for p in out.iterdir()}, precision
    assert all(math.isfinite(v) for v in _numbers(m)), precision
    return _update(name, out, base), out


@pytest.fixture(scope="module")
def fp32_runs(digits_base, digits_classifier):
    """{method: (update, run folder)} of the fp32 runs, each made on first use."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = _run(name, "off", digits_base[1])
        return runs[name]
    return get


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(FEW))
def test_a_few_steps_in_half_precision_follow_fp32(name, amp, digits_base, fp32_runs,
                                                   monkeypatch):
    ref = fp32_runs(name)[0]
    # fp16: the loss scale starts at 2^8, not torch's 2^16, at which SFD's pixel-summed losses
    # overflow and the scaler skips the first steps (as designed: it halves the scale per skipped
    # step), so that the first update exists to be compared; scaling and unscaling stay in the path
    scaler = C.grad_scaler
    monkeypatch.setattr(C, "grad_scaler", lambda device, amp="auto": torch.amp.GradScaler(
        torch.device(device).type, init_scale=2.0 ** 8, enabled=scaler(device, amp).is_enabled()))
    got = _run(name, amp, digits_base[1])[0]
    assert ref.norm() > 0 and torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
    print(f"{name} {amp}: cosine of the update to fp32's {cos:.4f}")
    assert cos > (BOUND_SRS_ME if name == "srs_me" else BOUND)[amp]


@pytest.mark.parametrize("name", ["base", "msgm", "sfd", "siss", "srs_me"])
def test_a_run_folder_is_a_diffusers_pipeline_that_draws_its_samples(name, digits_base,
                                                                      fp32_runs):
    """<run>/diffusers loads with diffusers' from_pretrained (the UNet alone with
    UNet2DConditionModel's, the token table inside it) and, given the labels of the run's samples.pt
    and its seed, draws its first image within 1e-5; its model card names the method and the paper;
    --base takes the folder (a pipeline root) and gives the same model."""
    from diffusers import UNet2DConditionModel
    from huggingface_hub import ModelCard
    if name == "base":
        path, model = digits_base
        folder = path.parent / "diffusers"
        c = torch.tensor([3])
        want = C.sample(model, C.VP(), c, "ddim", 10, seed=5, progress=False)[0]
        seed, steps, sampler = 5, 10, "ddim"
    else:
        folder = fp32_runs(name)[1] / "diffusers"
        s = C.load(folder.parent / "samples.pt")
        # the whole batch drawn with the first image (a conv's rounding depends on its size):
        # SISS appends null-token samples of another seed to its class samples
        c, want = s["c"], s["x"][0]
        c = c[c != s["null"]] if name == "siss" else c
        sampler, steps = s["sampler"].split("-")      # SFD's "sfd-1step": the pipeline's one step
        seed, steps = 0, 1 if name == "sfd" else int(steps)
    pipe = C.UnlearnPipeline.from_pretrained(folder)
    null = C.tokens(C.data_info("digits"))["null"]
    labels = [None if int(k) == null else int(k) for k in c]
    got = pipe(class_labels=labels, num_inference_steps=steps, sampler=sampler, seed=seed,
               output_type="pt")
    assert (got.images[0] - want).abs().max() <= 1e-5
    pil = pipe(class_labels=[0, 1, None], num_inference_steps=2).images     # the README's call
    assert len(pil) == 3 and pil[0].size == (8, 8)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert unet.config.encoder_hid_dim_type == "text_proj"
    card = ModelCard.load(folder / "README.md")
    assert name in card.data.tags and C.PAPERS[name].split(" (")[0] in card.text
    again = C.base_model(C.make_args(C.RunArgs, base=str(folder)), "cpu")[0]
    reference = C.from_diffusers(pipe.unet, "digits")
    for k, v in reference.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.compile
def test_compiled_pretraining_takes_the_eager_steps():
    """--compile on the CPU (torch.compile's inductor, a C++ compiler): four pretraining steps
    (C.denoising_step, as common.pretrain takes them) from the same weights and batches give the
    eager losses within 1e-4 relative (fused kernels round differently) and weights within 1e-4.
    Compiling takes minutes on 2 cores: run it with `python -m pytest -m compile tests`."""
    vp, results = C.VP(), []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = C.CondUNet("digits")
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        ema, scaler = C.EMA(model, 0.999), C.grad_scaler("cpu", "off")
        net = torch.compile(model) if compiled else model
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
            t, c = torch.randint(vp.T, (16,), generator=g), torch.randint(10, (16,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            losses.append(C.denoising_step(net, model, opt, scaler, ema, vp, x0, t, c, noise,
                                           "off"))
        results.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (eager, w_eager), (comp, w_comp) = results
    assert comp == pytest.approx(eager, rel=1e-4)
    assert torch.allclose(w_comp, w_eager, rtol=1e-4, atol=1e-4)
