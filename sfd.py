"""Score Forgetting Distillation (SFD): distil a class-conditional diffusion model into a one-step
generator whose forgotten class draws a safe class instead.

Chen, Zhang, Zhou. "Score Forgetting Distillation: A Swift, Data-Free Method for Machine Unlearning
in Diffusion Models". ICLR 2025, arXiv 2409.11219. Official code:
github.com/tqch/score-forgetting-distillation (the DDPM folder: functions/losses.py,
runners/diffusion.py::train_sfd, configs/cifar10_sfd.yml).

Idea. Score identity Distillation (SiD; Zhou et al., ICML 2024) trains a one-step generator
    x = G_theta(z, c) = sigma_init (z - eps_theta(b_init z, t_init, c)),    z ~ N(0, I),
so that the score of its output distribution, tracked by a "fake" network eps_psi trained on the
generator's own samples, matches the frozen teacher eps_phi. With f(x_t) = (x_t - b_t eps(x_t, t,
c)) / a_t the x0-prediction:
    L_psi   = E || eps_psi(a_t x + b_t eps, t, c) - eps ||^2                        (x detached)
    L_theta = E sum (f_phi - f_psi) ((f_phi - x) - alpha (f_phi - f_psi)) / omega,
              omega = mean |f_phi - x|
SFD adds a cross-class term to both, weighted 0.01: the generator is asked for the forget class
c_f, the teacher is read at the safe "override" class c_o and the fake score at c_f, which pulls
G(., c_f) onto the teacher's c_o images. The other classes are distilled as in SiD. No real image
is used, only labels. All three networks start from the base model's EMA weights; the generator is
the eps-network evaluated once, at t_init = 440.

Here: generate (G_theta), fake_score_loss (L_psi), sid_loss and generator_loss (L_theta);
kept_labels (the batch: labels only), fake_score_step (the psi-step), generator_step (the
theta-step), distill (the alternating loop of runners/diffusion.py::train_sfd).

    python sfd.py                   # digits, forget 0 -> draws 1, CPU, 3 min; --protocol paper: 300
    python sfd.py --forget 3 --override 8 --tag f3
    python sfd.py --forget none --tag sid           # plain SiD (stage 1 of "SFD-Two Stage")
    python sfd.py --init runs/sfd-digits-sid --tag 2stage     # stage 2: SFD from the SiD generator
    python sfd.py --init runs/sfd-digits --iters 0 --tag re   # only evaluate a finished generator
    python sfd.py --dataset mnist --device cuda --amp   # the paper's values: 50k iterations, 1e-5
    torchrun --nproc_per_node 4 sfd.py --dataset cifar10 --amp --compile   # as the official runs

A run writes runs/sfd-<dataset>[-<tag>]/: model.safetensors (the EMA generator, read by --init; the
fake score and raw generator for a second stage), samples.pt, samples.png, metrics.json.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common as C
import eval as E


@dataclass
class SFDHparams:
    """What SFD's losses, steps and distill read (digits values; Args.presets: the others)."""
    override: int = 1
    """the safe class c_o the forget label is mapped to (label_to_override, official configs: 1)"""
    iters: int = 300
    """fake-score / generator iterations (cifar10_sfd.yml: 50,000; 0: only evaluate --init)"""
    batch_size: int = 32
    """generator samples per loss term and iteration, over all processes (cifar10_sfd.yml: 128)"""
    lr_g: float = 1e-4
    """generator Adam lr (cifar10_sfd.yml: 1e-5 over 50k iterations; digits: 1e-4 over 300)"""
    lr_fake: float = 1e-4
    """fake-score Adam lr (cifar10_sfd.yml: 1e-5; the run of the official README's figures: 3e-5)"""
    alpha: float = 1.2
    """SiD's alpha in the generator loss (the official configs' distill.alpha: 1.2)"""
    forget_coef: float = 0.01
    """weight of both losses' forget terms (official sg_forget_coef = g_forget_coef = 0.01)"""
    t_init: int = 440
    """DDPM index at which the eps-network acts as the generator (official: 440, sigma_init 2.50)"""
    t_min: int = 38
    """smallest DDPM index drawn for the losses (official configs: 38)"""
    t_max: int = 712
    """largest DDPM index drawn for the losses, exclusive (official configs: 712)"""
    grad_clip: float = 1.0
    """element-wise gradient value clipping of both networks, not norm clipping (official: 1)"""
    ema: float = 0.95
    """generator EMA decay (cifar10_sfd.yml: 0.9999; digits: 0.95, for a few hundred iterations)"""


# The generator and the two losses (alpha_bar: the DDPM schedule's cumulative product, a [T] tensor
# on the networks' device, float64 so that 1 - alpha_bar keeps its precision)

def init_coefs(alpha_bar, t_init: int):
    """(b_init, sigma_init) = (sqrt(1 - abar), sqrt((1 - abar) / abar)) at t_init, 0-dim tensors:
    0.9286, 2.5023 at 440 (init_b, init_sigma of the official runners/diffusion.py::train_sfd)."""
    ab = alpha_bar[t_init]
    return (1 - ab).sqrt(), ((1 - ab) / ab).sqrt()


def generate(gen, z, c, t_init: int, alpha_bar):
    """The one-step generator G_theta(z, c) = sigma_init (z - eps_theta(b_init z, t_init, c)): the
    eps-network's x0-prediction at t_init from x_t = b_init z (run_generator in the official
    runners/diffusion.py::train_sfd, SiD's G(sigma_init z) written for a VP network). One network
    evaluation; no clamping during training."""
    b, sigma = init_coefs(alpha_bar, t_init)
    return sigma.to(z.dtype) * (z - gen(b.to(z.dtype) * z, t_init, c))


def diffuse(x, t, eps, alpha_bar):
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps (the official functions/losses.py)."""
    ab = alpha_bar[t].view(-1, *[1] * (x.ndim - 1))
    return ab.sqrt().to(x.dtype) * x + (1 - ab).sqrt().to(x.dtype) * eps


def predict_x0(model, x_t, t, c, alpha_bar):
    """f(x_t, t, c) = (x_t - sqrt(1 - abar_t) eps(x_t, t, c)) / sqrt(abar_t): p_x and sg_x of the
    official functions/losses.py::sid_g_loss_conditional."""
    ab = alpha_bar[t].view(-1, *[1] * (x_t.ndim - 1))
    eps = model(x_t, t.float(), c)
    return (x_t - (1 - ab).sqrt().to(x_t.dtype) * eps) / ab.sqrt().to(x_t.dtype)


def fake_score_loss(fake, x, c, alpha_bar, t_min: int, t_max: int):
    """The fake score's denoising score matching on (detached) generator samples x, eps-MSE summed
    over pixels and averaged over the batch, t ~ U{t_min, ..., t_max - 1} per sample: E || eps_psi(
    a_t x + b_t eps, t, c) - eps ||^2 (official functions/losses.py::sid_sg_loss_conditional)."""
    t = torch.randint(t_min, t_max, (len(x),), device=x.device)
    eps = torch.randn_like(x)
    x_t = diffuse(x, t, eps, alpha_bar)
    return (fake(x_t, t.float(), c) - eps).square().flatten(1).sum(1).mean()


def sid_loss(f_phi, f_psi, x, alpha: float):
    """SiD's generator loss (the alpha-weighted Fisher-divergence surrogate of Zhou et al. 2024, as
    in the official functions/losses.py::sid_g_loss_conditional), averaged over the batch:
        sum_pixels (f_phi - f_psi) * ((f_phi - x) - alpha (f_phi - f_psi)) / omega,
        omega = max(mean_pixels |f_phi - x|, 1e-5), without gradient.
    f_phi, f_psi: teacher and fake x0-predictions from x_t; x: the generator's samples (with
    gradient)."""
    with torch.no_grad():
        omega = (f_phi - x).abs().flatten(1).mean(1).clamp_min(1e-5).view(-1, *[1] * (x.ndim - 1))
    d = f_phi - f_psi
    return (d * ((f_phi - x) - alpha * d) / omega).flatten(1).sum(1).mean()


def generator_loss(teacher, fake, x, c_teacher, c_fake, alpha_bar, alpha: float, t_min: int,
                   t_max: int):
    """Noise the generator samples x, take the teacher's x0-prediction at label c_teacher and the
    fake score's at c_fake (frozen weights; gradients reach x through their inputs), and apply the
    SiD loss (the official functions/losses.py::sid_g_loss_conditional with p_c = c_teacher, sg_c =
    c_fake). Distillation term: c_teacher = c_fake = c. Forget term: x ~ G(z, c_f), c_teacher =
    c_o, c_fake = c_f."""
    t = torch.randint(t_min, t_max, (len(x),), device=x.device)
    x_t = diffuse(x, t, torch.randn_like(x), alpha_bar)
    f_phi = predict_x0(teacher, x_t, t, c_teacher, alpha_bar)
    f_psi = predict_x0(fake, x_t, t, c_fake, alpha_bar)
    return sid_loss(f_phi, f_psi, x, alpha)


LOSSES = (init_coefs, generate, diffuse, predict_x0, fake_score_loss, sid_loss, generator_loss)


# Training: the labels, the two steps, the alternating loop of runners/diffusion.py::train_sfd

def kept_labels(kept, n: int):
    """The batch, labels only: n kept classes drawn uniformly (the official train_sfd reads the
    labels of a loader of the kept classes and never its images)."""
    return kept[torch.randint(len(kept), (n,), device=kept.device)]


def fake_score_step(*, generator, fake_score, opt, scaler, ctx, c, c_forget, img: tuple,
                    alpha_bar, hp: SFDHparams) -> dict:
    """The psi-step of official runners/diffusion.py::train_sfd: L_psi = L(c) + forget_coef L(c_f),
    each on fresh generator samples drawn without gradient, two backward passes accumulating (half
    the peak memory of one summed graph), value clipping, Adam. fake_score: trained here by opt
    (under torchrun its DDP wrapper, which averages the gradients); generator: only read (the
    module itself). ctx: the autocast context; scaler: the GradScaler (a pass-through unless fp16).
    c: kept labels; c_forget: c_f or None (plain SiD); img: (channels, size, size)."""
    fake_score.train().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    out = {}
    for name, labels, coef in (("remain", c, 1.0), ("forget", c_forget, hp.forget_coef)):
        if labels is None or coef == 0:
            continue
        with ctx:
            with torch.no_grad():
                z = torch.randn((len(c), *img), device=c.device)
                x = generate(generator, z, labels, hp.t_init, alpha_bar)
            loss = fake_score_loss(fake_score, x, labels, alpha_bar, hp.t_min, hp.t_max)
        scaler.scale(coef * loss).backward()
        out[f"fake_{name}"] = loss.item()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_value_(fake_score.parameters(), hp.grad_clip)
    scaler.step(opt)
    scaler.update()
    return out


def generator_step(*, generator, teacher, fake_score, opt, scaler, ctx, c, c_forget, c_override,
                   img: tuple, alpha_bar, hp: SFDHparams) -> dict:
    """The theta-step of official runners/diffusion.py::train_sfd:
        L_theta = SiD(phi@c, psi@c; G(z, c)) + forget_coef SiD(phi@c_o, psi@c_f; G(z', c_f)),
    two backward passes, value clipping, Adam. generator: trained here by opt (under torchrun its
    DDP wrapper); teacher, fake_score: only read (frozen; the fake score's module itself), the
    gradients reach the generator through their inputs. It leaves in eval mode, as in the official
    loop (the next psi-step draws without dropout). c_override: c_o or None; see fake_score_step."""
    fake_score.eval().requires_grad_(False)
    generator.train().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    out = {}
    terms = (("remain", c, c, 1.0), ("forget", c_forget, c_override, hp.forget_coef))
    for name, c_gen, c_phi, coef in terms:
        if c_gen is None or coef == 0:
            continue
        with ctx:
            z = torch.randn((len(c), *img), device=c.device)
            x = generate(generator, z, c_gen, hp.t_init, alpha_bar)
            loss = generator_loss(teacher, fake_score, x, c_phi, c_gen, alpha_bar, hp.alpha,
                                  hp.t_min, hp.t_max)
        scaler.scale(coef * loss).backward()
        out[f"g_{name}"] = loss.item()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_value_(generator.parameters(), hp.grad_clip)
    scaler.step(opt)
    scaler.update()
    generator.eval().requires_grad_(False)
    return out


STEPS = (fake_score_step, generator_step)


def distill(teacher, generator, fake_score, forget, args: Args, out, on_check) -> tuple:
    """The loop of official runners/diffusion.py::train_sfd, resumable, data-parallel under
    torchrun: args.iters times kept labels, a psi-step, a theta-step, the generator's EMA update.
    forget: c_f (None: plain SiD). At iteration 0, every log_every and the last (process 0), the
    experiment's on_check(iteration, EMA generator, losses, clock) -> figures adds a point to the
    curve. args: an Args (SFDHparams, run options). Returns (EMA generator, curve, clock)."""
    info, dev = teacher.info, next(teacher.parameters()).device
    rank, world = C.distributed()
    dtype = torch.float32 if dev.type == "mps" else torch.float64      # mps has no float64
    alpha_bar = C.VP().alpha_bar.to(dev, dtype)
    ema = C.EMA(generator, args.ema)
    adam = dict(betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)   # cifar10_sfd.yml, both networks
    opt_fake = torch.optim.Adam(fake_score.parameters(), lr=args.lr_fake, **adam)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, **adam)
    # Paper scale: mixed precision (loss scaling only where fp16 needs it), compiled networks, two
    # handles per trained network. Its own step trains it through the "train" handle, under torchrun
    # a DistributedDataParallel wrapper averaging its gradients (the official sg_model_ddp /
    # g_model_ddp); the other step reads it through the "read" one, the module: no gradient there.
    ctx = C.autocast(dev, args.amp)
    scaler_fake = C.grad_scaler(dev, args.amp)
    scaler_g = C.grad_scaler(dev, args.amp)
    generator_read = generator.requires_grad_()
    fake_score_read = fake_score.requires_grad_()
    if args.compile:
        generator_read = torch.compile(generator_read)
        fake_score_read = torch.compile(fake_score_read)
    generator_train = generator_read
    fake_score_train = fake_score_read
    if world > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        generator_train = DistributedDataParallel(generator_read, device_ids=ids)
        fake_score_train = DistributedDataParallel(fake_score_read, device_ids=ids)
    # Resumable every save_every iterations (the official loop saves every 5,000, not resumable)
    curve = []
    resume = C.Resume(out / "resume.pt", dict(asdict(args), world=world), args.save_every,
                      args.track and out / "tb", gen=generator, fake=fake_score, ema=ema,
                      opt_g=opt_g, opt_fake=opt_fake, scaler_g=scaler_g, scaler_fake=scaler_fake,
                      curve=curve)
    start = resume.load()                  # one process: restores the RNG streams exactly
    if world > 1:                          # several: each its own labels and noise, fresh on resume
        torch.manual_seed(args.seed + 1000 * rank + start)
    n = args.batch_size // world           # this process's share of the batch
    img = (info.channels, info.size, info.size)
    kept = torch.tensor([k for k in range(info.num_classes) if k != forget], device=dev)
    c_forget = None
    c_override = None
    if forget is not None:
        c_forget = torch.full((n,), forget, device=dev)
        c_override = torch.full((n,), args.override, device=dev)
    if start == 0 and rank == 0:
        curve.append({"iter": 0} | on_check(0, ema.model, {}, resume.clock()))
    bar = tqdm(range(start + 1, args.iters + 1), initial=start, total=args.iters, desc="sfd",
               disable=rank > 0)
    for iteration in bar:
        c = kept_labels(kept, n)
        logs = fake_score_step(generator=generator_read, fake_score=fake_score_train, opt=opt_fake,
                               scaler=scaler_fake, ctx=ctx, c=c, c_forget=c_forget, img=img,
                               alpha_bar=alpha_bar, hp=args)
        logs |= generator_step(generator=generator_train, teacher=teacher,
                               fake_score=fake_score_read, opt=opt_g, scaler=scaler_g, ctx=ctx,
                               c=c, c_forget=c_forget, c_override=c_override, img=img,
                               alpha_bar=alpha_bar, hp=args)
        ema.update(generator)
        if world > 1:   # the logged losses: means over the processes, as the official loop's
            v = torch.tensor(list(logs.values()), device=dev)
            torch.distributed.all_reduce(v)
            logs = dict(zip(logs, (v / world).tolist()))
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        if (iteration % args.log_every == 0 or iteration == args.iters) and rank == 0:
            figures = on_check(iteration, ema.model, logs, resume.clock())
            curve.append({"iter": iteration} | logs | figures)
        resume.save(iteration)
    clock = resume.clock()
    resume.finish()
    return ema.model, curve, clock


# ---- EXPERIMENT: python sfd.py (monitor, judging, report); not needed to follow SFD ----

@dataclass
class Args(SFDHparams, C.RunArgs):
    forget: str = "0"
    """class c_f whose generation is overridden, or 'none' for plain SiD distillation of all
    classes"""
    init: str = ""
    """an earlier sfd.py run (its folder or model.safetensors) to continue from (two-stage:
    generator and fake score from it)"""
    log_every: int = 50
    """iterations between log lines (losses; forget / override rate and retain accuracy of 30
    probe samples per class) and sample grids"""
    iters: int = 150
    """fake-score / generator iterations (digits: the forget rate reaches 0 by 150, the README's
    table ran 300; 0: only evaluate --init)"""
    n_per_class: int = 50
    """samples per class drawn by the generator (samples.pt, the evaluation) and by the base"""
    presets = {ds: dict(iters=50_000, batch_size=128, lr_g=1e-5, lr_fake=1e-5, ema=0.9999)
               for ds in ("mnist", "fashion", "cifar10")}   # cifar10_sfd.yml
    # --protocol paper: the sizes of the README's table
    paper = dict(iters=300, n_per_class=100)


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
    """Forget / override rate and retain accuracy of n fixed-noise samples per class from the
    generator."""
    c = C.class_tokens(gen.info.num_classes, n)
    pred = E.predict(clf, sample_generator(gen, c, t_init, alpha_bar, seed=1))
    r = {"retain_acc": (pred == c)[c != (-1 if forget is None else forget)].float().mean().item()}
    if forget is not None:
        r |= {"forget_rate": (pred == c)[c == forget].float().mean().item(),
              "override_rate": (pred == override)[c == forget].float().mean().item()}
    return r


def progress_monitor(clf, forget, args: Args, out):
    """distill's on_check: the probe figures of the EMA generator, one log line (the losses, the
    probe's rates, the seconds) and the sample grid out/samples.png (forget row framed)."""
    framed = [] if forget is None else [forget]

    def on_check(iteration: int, gen, logs: dict, clock: dict) -> dict:
        dev = next(gen.parameters()).device
        ab = C.VP().alpha_bar.to(dev, torch.float32 if dev.type == "mps" else torch.float64)
        r = probe(gen, clf, forget, args.override, args.t_init, ab)
        rates = [k for k in ("forget_rate", "override_rate", "retain_acc") if k in r]
        parts = [f"iter {iteration:>6}", *(f"{k} {v:.4g}" for k, v in logs.items()),
                 *(f"{k} {r[k]:.2f}" for k in rates), f"{clock['seconds']:6.0f}s"]
        tqdm.write("  ".join(parts))
        grid = sample_generator(gen, C.class_tokens(gen.info.num_classes, 10), args.t_init, ab)
        C.save_grid(grid, out / "samples.png", nrow=10, highlight_rows=framed)
        return r
    return on_check


COLS = ("forget_rate", "override_rate", "retain_acc", "fid_retain", "is", "nfe", "images_per_s",
        "params", "nll_forget_bpd", "nll_kept_bpd", "nll_forget_null_bpd", "class_acc")


def evaluate(args: Args, gen, clf, forget, out) -> dict:
    """samples.pt and samples.png from the generator (nfe 1), judged by E.judge as the comparison
    judges every run; the base model's figures (--sampler, --sample-steps) from the cached
    E.evaluate_base. NLL: None for the generator (one network call from noise to image defines no
    likelihood)."""
    info, ab, n = gen.info, C.VP().alpha_bar, args.n_per_class
    fset = [] if forget is None else [forget]
    c = C.class_tokens(info.num_classes, n)
    t1 = time.time()
    x = sample_generator(gen, c, args.t_init, ab, seed=args.seed)
    secs = time.time() - t1
    # C.sample_record's fields, one step
    s = dict(x=x, c=c, sampler="sfd-1step", nfe=1, null=gen.tok["null"])
    C.save_samples(out, s)
    C.save_grid(x.view(info.num_classes, n, *x.shape[1:])[:, :10].flatten(0, 1),
                out / "samples.png", nrow=min(10, n), highlight_rows=fset)
    m = E.judge(s, clf, *C.load_data(args.dataset, args.data_root, "train"), fset)
    m |= dict(params=C.n_params(gen), images_per_s=len(x) / secs)
    base, _ = E.evaluate_base(args.base or C.base_path(args.dataset), clf, args, fset)
    for r in (m, base):   # the share of the forget class's samples classified as the override class
        r["override_rate"] = None
        if forget is not None:
            row = r["confusion"][forget]
            r["override_rate"] = row[args.override] / sum(row)
    print(f"\nclassifier test accuracy {clf.test_acc:.4f}; {n} samples per class")
    print(E.table({f"base ({args.sampler} {args.sample_steps})": base,
                   "SFD generator (1 step)": m}, COLS[:7]))
    print(f"sample grid (one row per class{', forget row framed' if fset else ''}): "
          f"{out / 'samples.png'}")
    print(headline(args, forget, base, m))
    return {k: m.get(k) for k in COLS} | {f"base_{k}": base.get(k) for k in COLS} | dict(
        base_seconds=None, speedup=m["images_per_s"] / base["images_per_s"],
        classifier_test_acc=clf.test_acc)


def headline(args: Args, forget, base: dict, gen: dict) -> str:
    """The effect in counts with their exact 95% intervals, the base (multi-step) then the
    generator, on the same labels: samples asked for the forgotten class that are classified as it
    and as the override class; the other classes' samples classified as asked."""
    n, K = args.n_per_class, len(base["confusion"])
    keep = [k for k in range(K) if k != forget]
    rows = [("other classes drawn as asked", lambda cm: sum(cm[k][k] for k in keep), n * len(keep))]
    if forget is not None:
        rows = [(f"class {forget} drawn as {forget}", lambda cm: cm[forget][forget], n),
                (f"class {forget} drawn as {args.override}", lambda cm: cm[forget][args.override],
                 n), *rows]
    return E.effect_table(f"base ({args.sampler} {args.sample_steps})", "SFD generator (1 step)",
                          [(name, E.count(k(base["confusion"]), m), E.count(k(gen["confusion"]), m))
                           for name, k, m in rows])


def check_args(args: Args):
    """Every mistake a user can make, as one UsageError, before any work starts. Returns (data
    info, the forget class or None for 'none', the --init checkpoint or None)."""
    info = C.data_info(args.dataset)
    forget = None
    if args.forget.strip().lower() != "none":
        try:
            forget = C.check_class(info, int(args.forget), "forget class")
        except ValueError:
            raise C.UsageError(f"--forget {args.forget!r} must be a class index or "
                               "'none'") from None
        C.check_class(info, args.override, "override class")
        if args.override == forget:
            raise C.UsageError(f"--override {args.override} equals --forget: pick another class "
                               "as the safe one")
    T = C.VP().T
    if not 0 <= args.t_min < args.t_max <= T or not 0 <= args.t_init < T:
        raise C.UsageError(f"need 0 <= t_min < t_max <= {T} and 0 <= t_init < {T}")
    sizes = (args.batch_size, args.n_per_class, args.sample_steps, args.log_every)
    if min(args.iters, args.save_every) < 0 or min(sizes) <= 0:
        raise C.UsageError("--iters, --save-every must be >= 0 and --batch-size, --n-per-class, "
                           "--sample-steps, --log-every positive")
    if not 0 < args.ema < 1:
        raise C.UsageError(f"--ema {args.ema} must lie in (0, 1)")
    world = C.distributed()[1]
    if args.batch_size % world:
        raise C.UsageError(f"--batch-size {args.batch_size} must be a multiple of the {world} "
                           "processes")
    init = None
    if args.init:
        _, init = C.load_checkpoint(args.init, args.dataset)
        if init.get("method") != "sfd":
            raise C.UsageError(f"{args.init} is not an sfd.py run (no fake score in it): pass a "
                               "runs/sfd-* folder")
        if init["t_init"] != args.t_init:
            raise C.UsageError(f"{args.init} was trained with --t-init {init['t_init']}: pass the "
                               "same value")
    elif args.iters == 0:
        raise C.UsageError("--iters 0 only evaluates, which needs --init runs/sfd-...")
    return info, forget, init


def main(args: Args):
    info, forget, init = check_args(args)
    dev, (rank, world), phases = C.pick_device(args.device), C.distributed(), C.Clock()
    C.seed_everything(args.seed)
    out = C.start_run("sfd", args) if rank == 0 else C.run_dir("sfd", args.dataset, args.tag)
    with phases("base and classifier"):
        clf = E.load_judge(args, dev) if rank == 0 else None
        # Three copies of the base model's EMA weights (init_from_ema in the official configs):
        # frozen teacher phi, fake score psi, generator theta.
        teacher, base_path = C.base_model(args, dev)
        teacher = teacher.eval().requires_grad_(False)
    fake, gen = copy.deepcopy(teacher), copy.deepcopy(teacher)
    if init is not None:
        # Two-stage: psi from the stage-1 fake score, theta from the stage-1 EMA generator. The
        # official code also loads the teacher from the stage-1 fake score (its --init_ckpt_0 fix
        # re-reads the same file); the teacher here stays the original pretrained one, which is
        # what --init_ckpt_0 was written to restore.
        gen.load_state_dict(init["model"])
        fake.load_state_dict(init["fake"])
    b_init, sigma_init = (float(v) for v in init_coefs(C.VP().alpha_bar, args.t_init))
    if rank == 0:
        procs = f" ({world} processes)" if world > 1 else ""
        print(f"SFD on {args.dataset}: forget {forget} -> "
              f"{args.override if forget is not None else '-'}, {args.iters} iterations of batch "
              f"{args.batch_size}{procs}, lr g {args.lr_g:g} / fake {args.lr_fake:g}, alpha "
              f"{args.alpha}, t_init {args.t_init} (sigma_init {sigma_init:.4f}, b_init "
              f"{b_init:.4f}), t in [{args.t_min}, {args.t_max})")

    on_check = phases.timed("judging", progress_monitor(clf, forget, args, out))
    with phases("training"):
        ema_gen, curve, clock = distill(teacher, gen, fake, forget, args, out, on_check)
    if rank != 0:
        return None
    steps = args.iters + (init["step"] if init else 0)
    C.save_checkpoint(out / "model.safetensors", ema_gen, steps, method="sfd", t_init=args.t_init,
                      forget=forget, override=args.override, fake=fake.state_dict(),
                      generator_raw=gen.state_dict(), args=asdict(args))
    with phases("judging"):
        metrics = evaluate(args, ema_gen, clf, forget, out)
    print(f"{out}: {phases.line()}; training {clock['cpu_seconds']:.0f} CPU-s")
    metrics |= dict(clock, iters=args.iters, curve=curve, time=phases.seconds())
    C.save_result(ema_gen, out, "sfd", base_path, forget, metrics, one_step_t=args.t_init)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
