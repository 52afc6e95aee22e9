"""Score Forgetting Distillation (SFD): distil a class-conditional diffusion model into a one-step generator
whose forgotten class draws a safe class instead.

Chen, Zhang, Zhou. "Score Forgetting Distillation: A Swift, Data-Free Method for Machine Unlearning in
Diffusion Models". ICLR 2025, arXiv 2409.11219. Official code: github.com/tqch/score-forgetting-distillation
(the DDPM folder: functions/losses.py, runners/diffusion.py::train_sfd, configs/cifar10_sfd.yml).

Idea. Score identity Distillation (SiD; Zhou et al., ICML 2024) trains a one-step generator
    x = G_theta(z, c) = sigma_init (z - eps_theta(b_init z, t_init, c)),    z ~ N(0, I),
so that the score of its output distribution, tracked by a "fake" network eps_psi trained on the generator's own
samples, matches the frozen teacher eps_phi. With f(x_t) = (x_t - b_t eps(x_t, t, c)) / a_t the x0-prediction:
    L_psi   = E || eps_psi(a_t x + b_t eps, t, c) - eps ||^2                                  (x detached)
    L_theta = E sum (f_phi - f_psi) ((f_phi - x) - alpha (f_phi - f_psi)) / omega,   omega = mean |f_phi - x|
SFD adds a cross-class term to both, weighted 0.01: the generator is asked for the forget class c_f, the teacher
is read at the safe "override" class c_o and the fake score at c_f, which pulls G(., c_f) onto the teacher's c_o
images. The other classes are distilled as in SiD. No real image is used, only labels. All three networks
start from the base model's EMA weights; the generator is the eps-network evaluated once, at t_init = 440.

    python sfd.py                                        # digits, forget 0 -> draws 1, CPU, about 5 minutes
    python sfd.py --forget 3 --override 8 --tag f3
    python sfd.py --forget none --tag sid                # plain SiD distillation (stage 1 of "SFD-Two Stage")
    python sfd.py --init runs/sfd-digits-sid --tag 2stage     # stage 2: SFD from the SiD generator
    python sfd.py --init runs/sfd-digits --iters 0 --tag re   # only evaluate a finished generator
    python sfd.py --dataset mnist --device cuda --amp    # the paper's values: 50k iterations, batch 128, lr 1e-5
    torchrun --nproc_per_node 4 sfd.py --dataset cifar10 --amp --compile   # data-parallel, as the official runs

A run writes runs/sfd-<dataset>[-<tag>]/: model.safetensors (the EMA generator, loaded again by --init; also the fake
score and the raw generator for a second stage), samples.pt (one-step samples, n_per_class per class),
samples.png, metrics.json. --sampler and --sample-steps set the base model's sampler it is compared with.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common as C
import eval as E


@dataclass
class Args(C.RunArgs):
    forget: str = "0"
    """class whose generation is overridden, or 'none' for plain SiD distillation of all classes"""
    override: int = 1
    """the safe class the forget label is mapped to (the paper's CIFAR-10 setting: forget 0, override 1)"""
    iters: int = 300
    """alternating fake-score / generator iterations (0: only evaluate the --init generator)"""
    batch_size: int = 32
    """generator samples per loss term and iteration, over all processes"""
    lr_g: float = 1e-4
    """generator Adam lr (cifar10_sfd.yml: 1e-5 for 50k iterations; digits: 1e-4 for a few hundred)"""
    lr_fake: float = 1e-4
    """fake-score Adam lr (cifar10_sfd.yml: 1e-5; the run behind the official README's figures used 3e-5)"""
    alpha: float = 1.2
    """SiD's alpha in the generator loss"""
    forget_coef: float = 0.01
    """weight of the forget terms in both losses (sg_forget_coef = g_forget_coef in the official configs)"""
    t_init: int = 440
    """DDPM index at which the eps-network acts as the generator (sigma_init = 2.50, SiD's default)"""
    t_min: int = 38
    """smallest DDPM index drawn for the losses"""
    t_max: int = 712
    """largest DDPM index drawn for the losses, exclusive"""
    grad_clip: float = 1.0
    """element-wise gradient value clipping for both networks (not norm clipping)"""
    ema: float = 0.95
    """generator EMA decay (cifar10_sfd.yml: 0.9999; digits: 0.95, for a run of a few hundred iterations)"""
    init: str = ""
    """an earlier sfd.py run (its folder or model.safetensors) to continue from (two-stage: generator and fake
    score from it)"""
    log_every: int = 50
    """iterations between log lines (losses; forget / override rate and retain accuracy of 30 probe samples
    per class) and sample grids"""
    presets = {ds: dict(iters=50_000, batch_size=128, lr_g=1e-5, lr_fake=1e-5, ema=0.9999)  # cifar10_sfd.yml
               for ds in ("mnist", "fashion", "cifar10")}


# ----------------------------------------------------------------------------------------------------------
# SFD LOGIC: the generator and the two losses (alpha_bar: the DDPM schedule's cumulative product, a [T] tensor
# on the networks' device, float64 so that 1 - alpha_bar keeps its precision)
# ----------------------------------------------------------------------------------------------------------

def init_coefs(alpha_bar, t_init: int):
    """(b_init, sigma_init) = (sqrt(1 - abar), sqrt((1 - abar) / abar)) at t_init, as 0-dim tensors: 0.9286 and
    2.5023 at 440 (init_b and init_sigma of the official runners/diffusion.py::train_sfd)."""
    ab = alpha_bar[t_init]
    return (1 - ab).sqrt(), ((1 - ab) / ab).sqrt()


def generate(gen, z, c, t_init: int, alpha_bar):
    """The one-step generator G_theta(z, c) = sigma_init (z - eps_theta(b_init z, t_init, c)): the eps-network's
    x0-prediction at t_init from x_t = b_init z (run_generator in the official runners/diffusion.py::train_sfd,
    SiD's G(sigma_init z) written for a VP network). One network evaluation; no clamping during training."""
    b, sigma = init_coefs(alpha_bar, t_init)
    return sigma.to(z.dtype) * (z - gen(b.to(z.dtype) * z, t_init, c))


def diffuse(x, t, eps, alpha_bar):
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, the forward process of the official functions/losses.py."""
    ab = alpha_bar[t].view(-1, *[1] * (x.ndim - 1))
    return ab.sqrt().to(x.dtype) * x + (1 - ab).sqrt().to(x.dtype) * eps


def predict_x0(model, x_t, t, c, alpha_bar):
    """f(x_t, t, c) = (x_t - sqrt(1 - abar_t) eps(x_t, t, c)) / sqrt(abar_t): p_x and sg_x of the official
    functions/losses.py::sid_g_loss_conditional."""
    ab = alpha_bar[t].view(-1, *[1] * (x_t.ndim - 1))
    return (x_t - (1 - ab).sqrt().to(x_t.dtype) * model(x_t, t.float(), c)) / ab.sqrt().to(x_t.dtype)


def fake_score_loss(fake, x, c, alpha_bar, t_min: int, t_max: int):
    """The fake score's denoising score matching on (detached) generator samples x, eps-MSE summed over pixels
    and averaged over the batch, t ~ U{t_min, ..., t_max - 1} per sample (official functions/losses.py::
    sid_sg_loss_conditional): E || eps_psi(a_t x + b_t eps, t, c) - eps ||^2."""
    t = torch.randint(t_min, t_max, (len(x),), device=x.device)
    eps = torch.randn_like(x)
    return (fake(diffuse(x, t, eps, alpha_bar), t.float(), c) - eps).square().flatten(1).sum(1).mean()


def sid_loss(f_phi, f_psi, x, alpha: float):
    """SiD's generator loss (the alpha-weighted Fisher-divergence surrogate of Zhou et al. 2024, as in the
    official functions/losses.py::sid_g_loss_conditional), per sample and averaged over the batch:
        sum_pixels (f_phi - f_psi) * ((f_phi - x) - alpha (f_phi - f_psi)) / omega,
        omega = max(mean_pixels |f_phi - x|, 1e-5), without gradient.
    f_phi, f_psi: teacher and fake x0-predictions from x_t; x: the generator's samples (with gradient)."""
    with torch.no_grad():
        omega = (f_phi - x).abs().flatten(1).mean(1).clamp_min(1e-5).view(-1, *[1] * (x.ndim - 1))
    d = f_phi - f_psi
    return (d * ((f_phi - x) - alpha * d) / omega).flatten(1).sum(1).mean()


def generator_loss(teacher, fake, x, c_teacher, c_fake, alpha_bar, alpha: float, t_min: int, t_max: int):
    """Noise the generator samples x, take the teacher's x0-prediction at label c_teacher and the fake score's at
    c_fake (frozen weights; gradients reach x through their inputs), and apply the SiD loss (the official
    functions/losses.py::sid_g_loss_conditional with p_c = c_teacher, sg_c = c_fake). Distillation term:
    c_teacher = c_fake = c. Forget term: x ~ G(z, c_f), c_teacher = c_o, c_fake = c_f."""
    t = torch.randint(t_min, t_max, (len(x),), device=x.device)
    x_t = diffuse(x, t, torch.randn_like(x), alpha_bar)
    f_phi = predict_x0(teacher, x_t, t, c_teacher, alpha_bar)
    f_psi = predict_x0(fake, x_t, t, c_fake, alpha_bar)
    return sid_loss(f_phi, f_psi, x, alpha)


LOSSES = (init_coefs, generate, diffuse, predict_x0, fake_score_loss, sid_loss, generator_loss)


# ----------------------------------------------------------------------------------------------------------
# TRAINING: the alternating loop of runners/diffusion.py::train_sfd
# ----------------------------------------------------------------------------------------------------------

def fake_score_step(gen, fake, opt, scaler, c, c_forget, img, alpha_bar, args: Args) -> dict:
    """psi-step: L_psi = L(kept labels) + forget_coef * L(forget label), each on a fresh batch of detached
    generator samples. Two backward passes accumulate, as in the official loop (half the peak memory of one
    summed graph). img: (channels, size, size)."""
    fake.train().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    out = {}
    for name, labels, coef in (("remain", c, 1.0), ("forget", c_forget, args.forget_coef)):
        if labels is None or coef == 0:
            continue
        with C.autocast(c.device, args.amp):
            with torch.no_grad():
                x = generate(gen, torch.randn((len(c), *img), device=c.device), labels, args.t_init, alpha_bar)
            loss = fake_score_loss(fake, x, labels, alpha_bar, args.t_min, args.t_max)
        scaler.scale(coef * loss).backward()
        out[f"fake_{name}"] = loss.item()
    scaler.unscale_(opt)
    nn.utils.clip_grad_value_(fake.parameters(), args.grad_clip)
    scaler.step(opt)
    scaler.update()
    return out


def generator_step(gen, teacher, fake, opt, scaler, c, c_forget, c_override, img, alpha_bar, args: Args) -> dict:
    """theta-step: L_theta = SiD(phi@c, psi@c; G(z, c)) + forget_coef * SiD(phi@c_o, psi@c_f; G(z', c_f)).
    The fake score is frozen here; gradients reach only the generator, which leaves the step in eval mode, as
    in the official loop (the next fake-score step draws from it without dropout)."""
    fake.eval().requires_grad_(False)
    gen.train().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    out = {}
    for name, c_gen, c_phi, coef in (("remain", c, c, 1.0), ("forget", c_forget, c_override, args.forget_coef)):
        if c_gen is None or coef == 0:
            continue
        with C.autocast(c.device, args.amp):
            x = generate(gen, torch.randn((len(c), *img), device=c.device), c_gen, args.t_init, alpha_bar)
            loss = generator_loss(teacher, fake, x, c_phi, c_gen, alpha_bar, args.alpha, args.t_min, args.t_max)
        scaler.scale(coef * loss).backward()
        out[f"g_{name}"] = loss.item()
    scaler.unscale_(opt)
    nn.utils.clip_grad_value_(gen.parameters(), args.grad_clip)
    scaler.step(opt)
    scaler.update()
    gen.eval().requires_grad_(False)
    return out


@torch.no_grad()
def sample_generator(gen, c, t_init: int, alpha_bar, seed: int = 0, batch: int = 1000):
    """One network evaluation per image, in batches like C.sample; images clamped to [-1, 1]."""
    dev, info = next(gen.parameters()).device, gen.info
    g, out = torch.Generator().manual_seed(seed), []
    for c_b in c.split(batch):
        z = torch.randn((len(c_b), info.channels, info.size, info.size), generator=g).to(dev)
        out.append(generate(gen, z, c_b.to(dev), t_init, alpha_bar.to(dev)).clamp(-1, 1).cpu())
    return torch.cat(out)


def probe(gen, clf, forget, override: int, t_init: int, alpha_bar, n: int = 30) -> dict:
    """Forget / override rate and retain accuracy of n fixed-noise samples per class from the generator."""
    c = C.class_tokens(gen.info.num_classes, n)
    pred = E.predict(clf, sample_generator(gen, c, t_init, alpha_bar, seed=1))
    r = {"retain_acc": (pred == c)[c != (-1 if forget is None else forget)].float().mean().item()}
    if forget is not None:
        r |= {"forget_rate": (pred == c)[c == forget].float().mean().item(),
              "override_rate": (pred == override)[c == forget].float().mean().item()}
    return r


def train(args: Args, teacher, gen, fake, forget, clf, out):
    """Alternate fake-score and generator steps for args.iters iterations; resumable, and data-parallel under
    torchrun. Returns the EMA generator, the probe curve and the loop's wall-clock and CPU seconds."""
    info, dev, (rank, world) = teacher.info, next(teacher.parameters()).device, C.distributed()
    ab = C.VP().alpha_bar.to(dev, torch.float32 if dev.type == "mps" else torch.float64)
    ema = C.EMA(gen, args.ema)
    adam = dict(betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)   # cifar10_sfd.yml, both networks
    opt_fake = torch.optim.Adam(fake.parameters(), lr=args.lr_fake, **adam)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr_g, **adam)
    # Speed, in a few lines: mixed precision (loss scaling only where fp16 needs it), compiled networks, and the two
    # trained networks data-parallel under torchrun, called through DDP where their weights get gradients
    # (the official loop's sg_model_ddp / g_model_ddp) and directly where they are only read.
    scaler_fake, scaler_g = C.grad_scaler(dev, args.amp), C.grad_scaler(dev, args.amp)
    gen_c, fake_c = (torch.compile(m) if args.compile else m for m in (gen.requires_grad_(), fake.requires_grad_()))
    ddp = lambda m: DistributedDataParallel(m, device_ids=[dev.index] if dev.type == "cuda" else None)
    gen_ddp, fake_ddp = (ddp(gen_c), ddp(fake_c)) if world > 1 else (gen_c, fake_c)
    # A resumable checkpoint every save_every iterations; the official loop saves every 5,000 (snapshot_freq of
    # configs/cifar10_sfd.yml, runners/diffusion.py::train_sfd), but cannot resume from it.
    curve, clock = [], {"seconds": 0.0, "cpu_seconds": 0.0}
    resume = C.Resume(out / "resume.pt", dict(asdict(args), world=world), args.save_every, args.track and out / "tb",
                      gen=gen, fake=fake, ema=ema, opt_g=opt_g, opt_fake=opt_fake, scaler_g=scaler_g,
                      scaler_fake=scaler_fake, curve=curve, clock=clock)
    start = resume.load()                      # one process: restores the RNG streams exactly
    if world > 1:                              # several: each its own labels and noise (fresh ones on a resume)
        torch.manual_seed(args.seed + 1000 * rank + start)
    n, img = args.batch_size // world, (info.channels, info.size, info.size)
    kept = torch.tensor([k for k in range(info.num_classes) if k != forget], device=dev)
    c_forget = None if forget is None else torch.full((n,), forget, device=dev)
    c_override = None if forget is None else torch.full((n,), args.override, device=dev)
    if start == 0 and rank == 0:
        curve.append({"iter": 0} | probe(ema.model, clf, forget, args.override, args.t_init, ab))
    t0, cpu0 = time.time() - clock["seconds"], time.process_time() - clock["cpu_seconds"]
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc="sfd", disable=rank > 0)
    for step in bar:
        c = kept[torch.randint(len(kept), (n,), device=dev)]   # labels only, never images: kept classes uniformly
        logs = fake_score_step(gen_c, fake_ddp, opt_fake, scaler_fake, c, c_forget, img, ab, args)
        logs |= generator_step(gen_ddp, teacher, fake_c, opt_g, scaler_g, c, c_forget, c_override, img, ab, args)
        ema.update(gen)
        if world > 1:   # the logged losses are means over the processes, as the official loop all-reduces them
            v = torch.tensor(list(logs.values()), device=dev)
            torch.distributed.all_reduce(v)
            logs = dict(zip(logs, (v / world).tolist()))
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        clock.update(seconds=time.time() - t0, cpu_seconds=time.process_time() - cpu0)
        if ((step + 1) % args.log_every == 0 or step + 1 == args.iters) and rank == 0:
            r = probe(ema.model, clf, forget, args.override, args.t_init, ab)
            curve.append({"iter": step + 1} | logs | r)
            tqdm.write(f"iter {step + 1:>6}  " + "  ".join(f"{k} {v:.4g}" for k, v in logs.items())
                       + "".join(f"  {k} {r[k]:.2f}" for k in ("forget_rate", "override_rate", "retain_acc") if k in r)
                       + f"  {clock['seconds']:6.0f}s")
            grid = sample_generator(ema.model, C.class_tokens(info.num_classes, 10), args.t_init, ab)
            C.save_grid(grid, out / "samples.png", nrow=10, highlight_rows=[] if forget is None else [forget])
        resume.save(step + 1)
    resume.finish()
    return ema.model, curve, clock


# ----------------------------------------------------------------------------------------------------------
# EVALUATION: the one-step EMA generator against the base model's multi-step sampler
# ----------------------------------------------------------------------------------------------------------

COLS = ("forget_rate", "override_rate", "retain_acc", "fid_retain", "is", "nfe", "images_per_s", "params",
        "nll_forget_bpd", "nll_kept_bpd", "nll_forget_null_bpd", "class_acc")


def evaluate(args: Args, gen, clf, forget, out) -> dict:
    """samples.pt and samples.png from the generator (nfe 1), judged by E.judge as the comparison judges every
    run; the base model's figures (--sampler, --sample-steps) from the cached E.evaluate_base. NLL: None for the
    generator (one network call from noise to image defines no likelihood)."""
    info, fset, ab, n = gen.info, [] if forget is None else [forget], C.VP().alpha_bar, args.n_per_class
    c = C.class_tokens(info.num_classes, n)
    t1 = time.time()
    x = sample_generator(gen, c, args.t_init, ab, seed=args.seed)
    secs = time.time() - t1
    s = dict(x=x, c=c, sampler="sfd-1step", nfe=1, null=gen.tok["null"])   # C.sample_record's fields, one step
    C.save_samples(out, s)
    C.save_grid(x.view(info.num_classes, n, *x.shape[1:])[:, :10].flatten(0, 1), out / "samples.png",
                nrow=min(10, n), highlight_rows=fset)
    m = E.judge(s, clf, *C.load_data(args.dataset, args.data_root, "train"), fset)
    m |= dict(params=C.n_params(gen), images_per_s=len(x) / secs)
    base, _ = E.evaluate_base(args.base or C.base_path(args.dataset), clf, args, fset)
    for r in (m, base):   # the share of the samples asked for the forget class classified as the override class
        row = None if forget is None else r["confusion"][forget]
        r["override_rate"] = None if row is None else row[args.override] / sum(row)
    print(f"\nclassifier test accuracy {clf.test_acc:.4f}; {n} samples per class")
    print(E.table({f"base ({args.sampler} {args.sample_steps})": base, "SFD generator (1 step)": m}, COLS[:7]))
    print(f"sample grid (one row per class{', forget row framed' if fset else ''}): {out / 'samples.png'}")
    return {k: m.get(k) for k in COLS} | {f"base_{k}": base.get(k) for k in COLS} | dict(
        base_seconds=None, speedup=m["images_per_s"] / base["images_per_s"], classifier_test_acc=clf.test_acc)


# ----------------------------------------------------------------------------------------------------------
# MAIN: check the arguments, load, train, evaluate, report
# ----------------------------------------------------------------------------------------------------------

def check_args(args: Args):
    """Every mistake a user can make, as one UsageError, before any work starts."""
    info = C.data_info(args.dataset)
    forget = None
    if args.forget.strip().lower() != "none":
        try:
            forget = C.check_class(info, int(args.forget), "forget class")
        except ValueError:
            raise C.UsageError(f"--forget {args.forget!r} must be a class index or 'none'") from None
        C.check_class(info, args.override, "override class")
        if args.override == forget:
            raise C.UsageError(f"--override {args.override} equals --forget: pick another class as the safe one")
    T = C.VP().T
    if not 0 <= args.t_min < args.t_max <= T or not 0 <= args.t_init < T:
        raise C.UsageError(f"need 0 <= t_min < t_max <= {T} and 0 <= t_init < {T}")
    if min(args.iters, args.save_every) < 0 or min(args.batch_size, args.n_per_class, args.sample_steps,
                                                   args.log_every) <= 0:
        raise C.UsageError("--iters, --save-every must be >= 0 and --batch-size, --n-per-class, --sample-steps, "
                           "--log-every positive")
    if not 0 < args.ema < 1:
        raise C.UsageError(f"--ema {args.ema} must lie in (0, 1)")
    world = C.distributed()[1]
    if args.batch_size % world:
        raise C.UsageError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    init = None
    if args.init:
        _, init = C.load_checkpoint(args.init, args.dataset)
        if init.get("method") != "sfd":
            raise C.UsageError(f"{args.init} is not an sfd.py run (no fake score in it): pass a runs/sfd-* folder")
        if init["t_init"] != args.t_init:
            raise C.UsageError(f"{args.init} was trained with --t-init {init['t_init']}: pass the same value")
    elif args.iters == 0:
        raise C.UsageError("--iters 0 only evaluates, which needs --init runs/sfd-...")
    return info, forget, init


def main(args: Args):
    info, forget, init = check_args(args)
    dev, (rank, world) = C.pick_device(args.device), C.distributed()
    C.seed_everything(args.seed)
    out = C.start_run("sfd", args) if rank == 0 else C.run_dir("sfd", args.dataset, args.tag)
    clf = E.load_judge(args, dev) if rank == 0 else None

    # Three copies of the base model's EMA weights (init_from_ema in the official configs): frozen teacher phi,
    # fake score psi, generator theta.
    teacher = C.base_model(args, dev)[0].eval().requires_grad_(False)
    fake, gen = copy.deepcopy(teacher), copy.deepcopy(teacher)
    if init is not None:
        # Two-stage: psi from the stage-1 fake score, theta from the stage-1 EMA generator. The official code also
        # loads the teacher from the stage-1 fake score (its --init_ckpt_0 fix re-reads the same file); we keep
        # the original pretrained teacher, which is what --init_ckpt_0 was written to restore.
        gen.load_state_dict(init["model"])
        fake.load_state_dict(init["fake"])
    b_init, sigma_init = (float(v) for v in init_coefs(C.VP().alpha_bar, args.t_init))
    if rank == 0:
        print(f"SFD on {args.dataset}: forget {forget} -> {args.override if forget is not None else '-'}, "
              f"{args.iters} iterations of batch {args.batch_size}" + (f" ({world} processes)" if world > 1 else "")
              + f", lr g {args.lr_g:g} / fake {args.lr_fake:g}, "
              f"alpha {args.alpha}, t_init {args.t_init} (sigma_init {sigma_init:.4f}, b_init {b_init:.4f}), "
              f"t in [{args.t_min}, {args.t_max})")

    ema_gen, curve, clock = train(args, teacher, gen, fake, forget, clf, out)
    if rank != 0:
        return None
    C.save_checkpoint(out / "model.safetensors", ema_gen, args.iters + (init["step"] if init else 0), method="sfd",
                      t_init=args.t_init, forget=forget, override=args.override, fake=fake.state_dict(),
                      generator_raw=gen.state_dict(), args=asdict(args))
    metrics = evaluate(args, ema_gen, clf, forget, out)
    print(f"training {clock['seconds']:.0f}s wall, {clock['cpu_seconds']:.0f}s CPU")
    metrics |= dict(clock, iters=args.iters, curve=curve)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
