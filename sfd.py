"""Score Forgetting Distillation (SFD): distil a class-conditional diffusion model into a one-step generator
whose forgotten class draws a safe class instead.

Chen, Zhang, Zhou. "Score Forgetting Distillation: A Swift, Data-Free Method for Machine Unlearning in
Diffusion Models". ICLR 2025, arXiv 2409.11219. Official code: github.com/tqch/score-forgetting-distillation
(the DDPM folder: functions/losses.py, runners/diffusion.py::train_sfd, configs/cifar10_sfd.yml).

Idea. Score identity Distillation (SiD; Zhou et al., ICML 2024) trains a one-step generator G_theta so that
the score of its output distribution, tracked by a "fake" score network psi trained on the generator's own
samples, matches the frozen teacher's score phi. SFD adds one cross-class term: the generator is asked for the
forget class c_f while the teacher is evaluated at the safe "override" class c_o and the fake score at c_f,
so the generator's c_f-conditional distribution is pulled onto the teacher's c_o-conditional one. The other
classes are distilled as in SiD. No real image is used, only labels. All three networks start from the
pretrained model's EMA weights; the generator is the eps-network evaluated once at t_init = 440.

    python sfd.py                                         # digits, forget 0 -> draws 1, CPU, a few minutes
    python sfd.py --forget 3 --override 8 --tag f3
    python sfd.py --forget none --tag sid                 # plain SiD distillation (stage 1 of "SFD-Two Stage")
    python sfd.py --init runs/sfd-digits-sid/model.pt --tag 2stage     # stage 2: SFD from the SiD generator
    python sfd.py --init runs/sfd-digits/model.pt --iters 0 --tag re   # only evaluate a finished generator
    python sfd.py --dataset cifar10 --device cuda         # the paper's values: 50k iterations, batch 128, lr 1e-5
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import common as C
import eval as E


@dataclass
class Args:
    dataset: str = "digits"
    """digits (bundled, CPU) | mnist | fashion | cifar10 (torchvision data under --data-root)"""
    forget: str = "0"
    """class whose generation is overridden, or 'none' for plain SiD distillation of all classes"""
    override: int = 1
    """the safe class the forget label is mapped to (the paper's CIFAR-10 setting: forget 0, override 1)"""
    iters: int = -1
    """alternating fake-score / generator iterations; -1 = the dataset's default (digits 300, others 50k);
    0 = only evaluate the --init generator"""
    batch_size: int = 0
    """generator samples per term and step; 0 = default (digits 32, others the paper's 128)"""
    lr_g: float = 0.0
    """generator Adam lr; 0 = default (digits 1e-4, scaled for a few hundred iterations; others the paper's 1e-5)"""
    lr_fake: float = 0.0
    """fake-score Adam lr; 0 = default (digits 1e-4; others 1e-5 as in cifar10_sfd.yml, its README run used 3e-5)"""
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
    ema: float = 0.0
    """generator EMA decay; 0 = default (digits 0.95, for a run of a few hundred iterations; others 0.9999)"""
    init: str = ""
    """model.pt of an earlier sfd.py run to continue from (two-stage: generator and fake score from it)"""
    n_per_class: int = 100
    """evaluation samples per class, for both the base model and the generator"""
    eval_steps: int = 50
    """DDIM steps of the base model's sampler in the comparison"""
    log_every: int = 50
    """iterations between log lines (with forget / override rate and retain accuracy of 30 probe samples per class) and sample grids"""
    tag: str = ""
    """run name suffix: runs/sfd-<dataset>[-<tag>]/"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    seed: int = 0
    """seed for noise, timesteps and labels"""


def defaults(dataset: str) -> dict:
    if dataset == "digits":   # CPU-scaled: the paper's lr 1e-5 is for 50k iterations
        return dict(iters=300, batch_size=32, lr_g=1e-4, lr_fake=1e-4, ema=0.95)
    return dict(iters=50_000, batch_size=128, lr_g=1e-5, lr_fake=1e-5, ema=0.9999)   # configs/cifar10_sfd.yml


# ----------------------------------------------------------------------------------------------------------
# SFD LOGIC
# ----------------------------------------------------------------------------------------------------------

def init_coefs(vp: C.VP, t_init: int):
    """(b_init, sigma_init) = (sqrt(1 - abar), sqrt((1 - abar) / abar)) at t_init: 0.9286 and 2.5023 at 440."""
    ab = vp.alpha_bar[t_init].item()
    return math.sqrt(1 - ab), math.sqrt((1 - ab) / ab)


def generate(gen, z, c, t_init: int, vp: C.VP):
    """The one-step generator (spec 1.5): G_theta(z, c) = sigma_init (z - eps_theta(b_init z, t_init, c)),
    i.e. the x0-prediction of the eps-network at t_init from the input x_t = b_init z (SiD's G(sigma_init z)
    written for a VP network). One network evaluation; no clamping during training."""
    b, sigma = init_coefs(vp, t_init)
    return sigma * (z - gen(b * z, t_init, c))


def draw_t(n: int, args: Args, device):
    """t ~ Uniform{t_min, ..., t_max - 1}, independently per sample and fresh for every loss term."""
    return torch.randint(args.t_min, args.t_max, (n,), device=device)


def fake_score_loss(fake, x, c, args: Args, vp: C.VP):
    """Spec 2.1: denoising score matching of the fake score on (detached) generator samples, eps-MSE summed
    over pixels and averaged over the batch: E || eps_psi(a_t x + b_t eps, t, c) - eps ||^2."""
    t = draw_t(len(x), args, x.device)
    eps = torch.randn_like(x)
    return (fake(vp.q_sample(x, t, eps), t.float(), c) - eps).square().flatten(1).sum(1).mean()


def sid_loss(f_phi, f_psi, x, alpha: float):
    """SiD's generator loss (Zhou et al. 2024, the alpha-weighted Fisher-divergence surrogate; SFD's
    sid_g_loss_conditional), per sample and averaged over the batch:
        sum_pixels (f_phi - f_psi) * ((f_phi - x) - alpha (f_phi - f_psi)) / omega,
        omega = max(mean_pixels |f_phi - x|, 1e-5), without gradient.
    f_phi, f_psi: teacher and fake x0-predictions from x_t; x: the generator's samples (with gradient)."""
    with torch.no_grad():
        omega = (f_phi - x).abs().flatten(1).mean(1).clamp_min(1e-5).view(-1, *[1] * (x.ndim - 1))
    d = f_phi - f_psi
    return (d * ((f_phi - x) - alpha * d) / omega).flatten(1).sum(1).mean()


def generator_loss(teacher, fake, x, c_teacher, c_fake, args: Args, vp: C.VP):
    """Spec 2.2: noise the generator samples x, take the teacher's x0-prediction at label c_teacher and the
    fake score's at c_fake (both frozen, gradients flow to x through their inputs), and apply the SiD loss.
    Distillation term: c_teacher = c_fake = c. Forget term: x ~ G(z, c_f), c_teacher = c_o, c_fake = c_f."""
    t = draw_t(len(x), args, x.device)
    x_t = vp.q_sample(x, t, torch.randn_like(x))
    f_phi = vp.eps_to_x0(x_t, t, teacher(x_t, t.float(), c_teacher))
    f_psi = vp.eps_to_x0(x_t, t, fake(x_t, t.float(), c_fake))
    return sid_loss(f_phi, f_psi, x, args.alpha)


def fake_score_step(gen, fake, opt, c, c_forget, args: Args, vp: C.VP) -> dict:
    """psi-step: L_psi = L(kept labels) + forget_coef * L(forget label) on fresh, detached generator samples.
    Two backward passes accumulate, as in the official loop (half the peak memory of one summed graph)."""
    fake.train().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    shape = (len(c), gen.info.channels, gen.info.size, gen.info.size)
    out = {}
    for name, labels, coef in (("remain", c, 1.0), ("forget", c_forget, args.forget_coef)):
        if labels is None or coef == 0:
            continue
        with torch.no_grad():
            x = generate(gen, torch.randn(shape, device=c.device), labels, args.t_init, vp)
        loss = fake_score_loss(fake, x, labels, args, vp)
        (coef * loss).backward()
        out[f"fake_{name}"] = loss.item()
    nn.utils.clip_grad_value_(fake.parameters(), args.grad_clip)
    opt.step()
    return out


def generator_step(gen, teacher, fake, opt, c, c_forget, c_override, args: Args, vp: C.VP) -> dict:
    """theta-step: L_theta = SiD(phi@c, psi@c; G(z, c)) + forget_coef * SiD(phi@c_o, psi@c_f; G(z', c_f)).
    The fake score is frozen here; gradients reach only the generator."""
    fake.eval().requires_grad_(False)
    gen.train().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    shape = (len(c), gen.info.channels, gen.info.size, gen.info.size)
    out = {}
    for name, c_gen, c_phi, coef in (("remain", c, c, 1.0), ("forget", c_forget, c_override, args.forget_coef)):
        if c_gen is None or coef == 0:
            continue
        x = generate(gen, torch.randn(shape, device=c.device), c_gen, args.t_init, vp)
        loss = generator_loss(teacher, fake, x, c_phi, c_gen, args, vp)
        (coef * loss).backward()
        out[f"g_{name}"] = loss.item()
    nn.utils.clip_grad_value_(gen.parameters(), args.grad_clip)
    opt.step()
    gen.requires_grad_(False)
    return out


@torch.no_grad()
def sample_generator(gen, c, args: Args, vp: C.VP, seed: int = 0, batch: int = 1000):
    """One network evaluation per image, in batches like C.sample; images clamped to [-1, 1]."""
    dev = next(gen.parameters()).device
    g = torch.Generator().manual_seed(seed)
    info, out = gen.info, []
    for c_b in c.split(batch):
        z = torch.randn((len(c_b), info.channels, info.size, info.size), generator=g).to(dev)
        out.append(generate(gen, z, c_b.to(dev), args.t_init, vp).clamp(-1, 1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# MAIN: check the arguments, train, evaluate
# ----------------------------------------------------------------------------------------------------------

def check_args(args: Args):
    """Every mistake a user can make, as one UsageError, before any work starts."""
    info = C.data_info(args.dataset)
    for k, v in defaults(args.dataset).items():
        if getattr(args, k) == (-1 if k == "iters" else 0):
            setattr(args, k, v)
    if args.forget.strip().lower() == "none":
        forget = None
    else:
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
    if args.iters < 0 or args.batch_size <= 0 or args.n_per_class <= 0 or args.eval_steps <= 0:
        raise C.UsageError("--iters must be >= 0 and --batch-size, --n-per-class, --eval-steps positive")
    if not 0 < args.ema < 1:
        raise C.UsageError(f"--ema {args.ema} must lie in (0, 1)")
    init = None
    if args.init:
        _, init = C.load_checkpoint(args.init, args.dataset)
        if init.get("method") != "sfd":
            raise C.UsageError(f"{args.init} is not an sfd.py run (no fake score in it): pass runs/sfd-*/model.pt")
        if init["t_init"] != args.t_init:
            raise C.UsageError(f"{args.init} was trained with --t-init {init['t_init']}: pass the same value")
    elif args.iters == 0:
        raise C.UsageError("--iters 0 only evaluates, which needs --init runs/sfd-.../model.pt")
    return info, forget, init


def main(args: Args):
    info, forget, init = check_args(args)
    dev = C.pick_device(args.device)
    C.seed_everything(args.seed)
    out = C.run_dir("sfd", args.dataset, args.tag)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    vp = C.VP()
    clf = E.load_classifier(args.dataset, args.data_root, dev)

    # Three copies of the base model's EMA weights (spec 1.4): frozen teacher phi, fake score psi, generator theta.
    teacher = C.load_base(args.dataset, dev, root=args.data_root).eval().requires_grad_(False)
    fake, gen = copy.deepcopy(teacher), copy.deepcopy(teacher)
    if init is not None:
        # Two-stage: psi from the stage-1 fake score, theta from the stage-1 EMA generator. The official code also
        # loads the teacher from the stage-1 fake score (its --init_ckpt_0 fix re-reads the same file); we keep
        # the original pretrained teacher, which is what --init_ckpt_0 was written to restore.
        gen.load_state_dict(init["model"])
        fake.load_state_dict(init["fake"])
    ema = C.EMA(gen, args.ema)
    adam = dict(betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)
    opt_fake = torch.optim.Adam(fake.parameters(), lr=args.lr_fake, **adam)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr_g, **adam)
    kept = torch.tensor([k for k in range(info.num_classes) if k != forget], device=dev)
    n = args.batch_size
    c_forget = None if forget is None else torch.full((n,), forget, device=dev)
    c_override = None if forget is None else torch.full((n,), args.override, device=dev)
    b_init, sigma_init = init_coefs(vp, args.t_init)
    print(f"SFD on {args.dataset}: forget {forget} -> {args.override if forget is not None else '-'}, "
          f"{args.iters} iterations of batch {n}, lr g {args.lr_g:g} / fake {args.lr_fake:g}, alpha {args.alpha}, "
          f"t_init {args.t_init} (sigma_init {sigma_init:.4f}, b_init {b_init:.4f}), t in [{args.t_min}, {args.t_max})")

    probe_c = C.class_tokens(info.num_classes, 30).to(dev)
    curve = []

    def probe(step):
        """Forget / override rate and retain accuracy of 30 fixed-noise samples per class from the EMA generator."""
        pred, c = E.predict(clf, sample_generator(ema.model, probe_c, args, vp, seed=1)), probe_c.cpu()
        kept_c = torch.isin(c, kept.cpu())
        r = {"iter": step, "retain_acc": (pred == c)[kept_c].float().mean().item()}
        if forget is not None:
            r |= {"forget_rate": (pred == c)[c == forget].float().mean().item(),
                  "override_rate": (pred == args.override)[c == forget].float().mean().item()}
        curve.append(r)
        return r

    probe(0)
    t0, cpu0 = time.time(), time.process_time()
    bar = tqdm(range(args.iters), desc="sfd")
    for step in bar:
        # Labels only, never images: kept classes uniformly (all classes for plain SiD).
        c = kept[torch.randint(len(kept), (n,), device=dev)]
        logs = fake_score_step(gen, fake, opt_fake, c, c_forget, args, vp)
        logs |= generator_step(gen, teacher, fake, opt_g, c, c_forget, c_override, args, vp)
        ema.update(gen)
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        if (step + 1) % args.log_every == 0 or step + 1 == args.iters:
            r = probe(step + 1)
            tqdm.write(f"iter {step + 1:>6}  " + "  ".join(f"{k} {v:.4g}" for k, v in logs.items())
                       + "".join(f"  {k} {r[k]:.2f}" for k in ("forget_rate", "override_rate", "retain_acc") if k in r)
                       + f"  {time.time() - t0:6.0f}s")
            grid = sample_generator(ema.model, C.class_tokens(info.num_classes, 10).to(dev), args, vp)
            C.save_grid(grid, out / "samples.png", nrow=10, highlight_rows=[] if forget is None else [forget])
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    C.save_checkpoint(out / "model.pt", ema.model, args.iters + (init["step"] if init else 0), method="sfd",
                      t_init=args.t_init, forget=forget, override=args.override, fake=fake.state_dict(),
                      generator_raw=gen.state_dict(), args=asdict(args))

    # EVALUATION: the base model with its multi-step sampler vs the one-step EMA generator, same labels.
    fset = [] if forget is None else [forget]
    x_real, y_real = C.load_data(args.dataset, args.data_root, "train")
    base, xb, c_eval = E.evaluate_model(teacher, clf, fset, args.n_per_class, "ddim", args.eval_steps,
                                        seed=args.seed, root=args.data_root)
    t1 = time.time()
    xg = sample_generator(ema.model, c_eval, args, vp, seed=args.seed)
    gen_secs = time.time() - t1
    sfd = E.sample_metrics(clf, xg, c_eval, x_real, y_real, fset)
    sfd.update(nfe=1, images_per_s=len(xg) / gen_secs)
    for m, x in ((base, xb), (sfd, xg)):
        m["override_rate"] = (None if forget is None else
                              (E.predict(clf, x[c_eval == forget]) == args.override).float().mean().item())
    C.save_grid(xg[torch.cat([torch.nonzero(c_eval == k)[:10, 0] for k in range(info.num_classes)])],
                out / "samples.png", nrow=min(10, args.n_per_class), highlight_rows=fset)

    cols = ["forget_rate", "override_rate", "retain_acc", "fid_retain", "is", "nfe", "images_per_s"]
    print(f"\nclassifier test accuracy {clf.test_acc:.4f}; {args.n_per_class} samples per class; "
          f"training {seconds:.0f}s wall, {cpu_seconds:.0f}s CPU")
    print(E.table({f"base (DDIM {args.eval_steps})": base, "SFD generator (1 step)": sfd}, cols))
    print(f"sample grid (one row per class{', forget row framed' if fset else ''}): {out / 'samples.png'}")
    metrics = {k: sfd[k] for k in cols + ["class_acc"]}
    metrics |= {f"base_{k}": base[k] for k in cols + ["class_acc"]}
    metrics |= dict(speedup=sfd["images_per_s"] / base["images_per_s"], seconds=seconds, cpu_seconds=cpu_seconds,
                    iters=args.iters, classifier_test_acc=clf.test_acc, curve=curve)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
