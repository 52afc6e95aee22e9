"""MSGM: Moderating the Generalization of Score-based Generative Model (Jiang et al., ICCV 2025, arXiv 2412.07229).

The paper's claim has two halves. (1) The machine-unlearning "gold standard", retraining without the undesirable
data, does not stop a score-based model from generating it: the model generalises, and the score function it
learns barely changes. (2) MSGM keeps the undesirable data in training and redirects the score away from it: on
perturbed undesirable images x_t = alpha(t) x_0 + sigma(t) z it asks the model score s_theta(x_t, t) to be
orthogonal to (Orthogonal-MSGM, `--task square`) or to form an obtuse angle with (Obtuse-MSGM, `--task norm`)
the conditional score grad log p(x_t | x_0) = -z / sigma(t), while plain denoising score matching fits the kept
data. Training is the continuous-time VP-SDE of score_sde (beta 0.1..20, t ~ U(1e-5, 1), network time 999 t,
s_theta = -eps_theta / sigma(t)); the model is unconditional (our CondUNet always gets the null token) and the
class labels only decide which images are undesirable.

    python msgm.py                                    # digits, CPU: normal, retrain (cached), Orthogonal, Obtuse
    python msgm.py --task norm --forget-weight 0.1    # one MSGM variant, a larger forget weight
    python msgm.py --task square --released           # the released code's forget terms instead of the paper's geometry
    python msgm.py --no-finetune --task norm          # MSGM from scratch (the paper's main mode)
    python msgm.py --dataset cifar10 --device cuda --paper --no-finetune   # the paper's CIFAR-10 settings
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common as C
import eval as E

TASKS = ("all", "normal", "retrain", "square", "norm")


@dataclass
class Args:
    dataset: str = "digits"
    """digits (bundled, CPU) | mnist | fashion | cifar10"""
    forget: str = "1,5"
    """undesirable classes, comma-separated (the README's CIFAR-10 automobile and dog are 1 and 5)"""
    task: str = "all"
    """all (normal, retrain, square and norm side by side) | normal | retrain (gold standard) | square
    (Orthogonal-MSGM) | norm (Obtuse-MSGM)"""
    finetune: bool = True
    """normal = the cached base and MSGM fine-tunes it (the CPU default); --no-finetune trains every model from
    scratch (the paper's main mode)"""
    steps: int = 0
    """training steps of MSGM (and of normal from scratch); 0 = 500 fine-tuning or the base's pretraining length
    from scratch (digits 1400); with --paper 660k from scratch (the released CIFAR-10 n_iters)"""
    retrain_steps: int = 0
    """steps of the gold-standard retrain on kept data from scratch; 0 = as --steps from scratch"""
    batch_size: int = 0
    """kept images per step, and as many undesirable images on forget steps; 0 = 64 (paper: 400 + 400)"""
    lr: float = 0.0
    """Adam learning rate; 0 = digits 2e-4 fine-tuning / 1e-3 from scratch (the base's recipe); paper 2e-4"""
    warmup: int = -1
    """linear learning-rate warm-up steps; -1 = none on digits, 5000 with --paper (fine-tuning skips it, as the
    released code restores the pretrained step)"""
    ema: float = 0.0
    """EMA decay of the weights that are evaluated; 0 = 0.995 (digits), 0.9999 with --paper"""
    forget_weight: float = 0.01
    """lambda in L = (1 - lambda) L_retain + lambda L_forget (released code: 0.99 / 0.01)"""
    forget_every: int = 4
    """the forget term enters on every k-th step only (released code: 4)"""
    released: bool = False
    """use the released code's forget terms (square: mean of squared element-wise products; norm: its sign,
    which pulls the score toward the undesirable data) instead of the geometry the paper names"""
    paper: bool = False
    """the paper's CIFAR-10 settings where not given: batch 400, lr 2e-4, warm-up 5000, EMA 0.9999, 660k steps"""
    n_samples: int = 5000
    """unconditional samples per model for the forget share, FID and IS"""
    sampler: str = "ddim"
    """ddim | ddpm | em (common.sample)"""
    sample_steps: int = 20
    """sampler steps (ddpm: strided as DDPMPipeline, 0 = all 1000); 20 DDIM steps keep 5000 samples per model
    affordable on a CPU"""
    nll_n: int = 0
    """held-out test images per group (kept / undesirable) for the NLL; 0 = all"""
    nll_tol: float = 1e-4
    """rtol = atol of the probability-flow ODE solver for the NLL (score_sde: 1e-5; 1e-4 agrees to ~0.001 bpd)"""
    tag: str = ""
    """run folder runs/msgm-<dataset>-<tag>; empty = the task, plus -scratch / -w<lambda> / -released"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    seed: int = 0
    """seed for batches, noise and sampling"""


def hyper(args: Args, info: C.DataInfo, scratch: bool) -> dict:
    """The training recipe: the paper's (released configs) with --paper, else scaled to the base model's budget."""
    base = C.train_defaults(info)
    hp = dict(steps=660_000 if scratch else 10_000, batch_size=400, lr=2e-4, warmup=5000 if scratch else 0,
              ema=0.9999) if args.paper else dict(
        steps=base["steps"] if scratch else 500, batch_size=64, lr=base["lr"] if scratch else 2e-4,
        warmup=base["warmup"] if scratch else 0, ema=base["ema"])
    for k in ("steps", "batch_size", "lr", "ema"):
        if getattr(args, k):
            hp[k] = getattr(args, k)
    if args.warmup >= 0:
        hp["warmup"] = args.warmup
    return hp


# ----------------------------------------------------------------------------------------------------------
# LOSS: denoising score matching on kept data, a score-redirecting term on undesirable data
# ----------------------------------------------------------------------------------------------------------

def perturb(vp: C.VP, x0, t, z):
    """x_t = alpha(t) x_0 + sigma(t) z, the VP-SDE's perturbation kernel p(x_t | x_0) (score_sde, Eq. 29)."""
    alpha, sigma = vp.marginal(t)
    shape = (-1, *[1] * (x0.ndim - 1))
    return alpha.view(shape) * x0 + sigma.view(shape) * z


def retain_term(eps, z):
    """L_retain = E (1/D) || sigma(t) s_theta(x_t, t) + z ||^2 = E (1/D) || eps_theta - z ||^2: denoising score
    matching with lambda(t) = sigma(t)^2 and the mean over the D coordinates (score_sde's reduce_mean=True)."""
    return (eps - z).square().flatten(1).mean(1).mean()


def orthogonal_term(eps, z, released: bool = False):
    """Orthogonal-MSGM. sigma(t)^2 <s_theta, grad log p(x_t|x_0)> = <eps_theta, z>, so the score is orthogonal to
    the undesirable data's conditional score exactly when <eps_theta, z> = 0: we penalise (<eps_theta, z> / D)^2.
    The released losses.py squares the element-wise product before averaging, (1/D) sum_d (eps_d z_d)^2, which
    is minimised by eps = 0 (a zero score) rather than by orthogonality; --released restores it."""
    prod = (eps * z).flatten(1)
    return (prod.square().mean(1) if released else prod.mean(1).square()).mean()


def obtuse_term(eps, z, released: bool = False):
    """Obtuse-MSGM. Minimising +<eps_theta, z> / D drives <s_theta, grad log p(x_t|x_0)> = <eps_theta, z> / sigma^2
    negative: the score at a perturbed undesirable image points away from it (an obtuse angle). Linear and
    unbounded, as released; the small weight, the every-4th-step schedule and clipping keep it in check.
    The released loss is (1/D) sum_d sigma s_theta,d z_d = -<eps_theta, z> / D, whose minimisation makes the
    angle acute (a 2-D check in the tests confirms it); --released restores that sign."""
    inner = (eps * z).flatten(1).mean(1)
    return (-inner if released else inner).mean()


def msgm_loss(eps_fn, vp: C.VP, x_keep, x_forget, task: str, lam: float, forget_step: bool, released=False,
              t_eps: float = 1e-5):
    """L = (1 - lam) L_retain + lam L_forget (released get_step_fngu: 0.99 / 0.01), L_forget only on forget steps,
    each batch with its own t ~ U(t_eps, 1) and z ~ N(0, I). eps_fn(x_t, t) takes continuous time t.
    Returns (loss, retain term, forget term or None)."""
    t = torch.rand(len(x_keep), device=x_keep.device) * (1 - t_eps) + t_eps
    z = torch.randn_like(x_keep)
    l_keep = retain_term(eps_fn(perturb(vp, x_keep, t, z), t), z)
    if task not in ("square", "norm"):
        return l_keep, l_keep, None
    if not forget_step or lam == 0:
        return (1 - lam) * l_keep, l_keep, None
    t_u = torch.rand(len(x_forget), device=x_forget.device) * (1 - t_eps) + t_eps
    z_u = torch.randn_like(x_forget)
    eps_u = eps_fn(perturb(vp, x_forget, t_u, z_u), t_u)
    l_forget = (orthogonal_term if task == "square" else obtuse_term)(eps_u, z_u, released)
    return (1 - lam) * l_keep + lam * l_forget, l_keep, l_forget


@torch.no_grad()
def score_cosine(eps_fn, vp: C.VP, x0, ts=(0.02, 0.1, 0.3), seed: int = 0) -> dict:
    """The angle diagnostic: mean cosine between the model score s_theta(x_t, t) and the conditional score
    grad log p(x_t | x_0) = -z / sigma(t) (= cos(eps_theta, z)), and the norm ratio ||s_theta|| / ||z / sigma||,
    at a few t, over images x0 (fixed noise, so models are compared on the same x_t)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in ts:
        z = torch.randn(x0.shape, generator=g).to(x0.device)
        tt = torch.full((len(x0),), float(t), device=x0.device)
        eps = eps_fn(perturb(vp, x0, tt, z), tt)
        out[f"cos@{t:g}"] = F.cosine_similarity(eps.flatten(1), z.flatten(1), dim=1).mean().item()
        out[f"norm@{t:g}"] = (eps.flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)).mean().item()
    return out


def unconditional(model: C.CondUNet):
    """eps_theta(x_t, t) of the CondUNet under the null token, in continuous time t (network time 999 t)."""
    vp = C.VP()
    return lambda x, t: model(x, (vp.T - 1) * t, torch.full((len(x),), model.tok["null"], device=x.device))


# ----------------------------------------------------------------------------------------------------------
# TRAINING
# ----------------------------------------------------------------------------------------------------------

def train(model: C.CondUNet, x_keep, x_forget, task: str, hp: dict, lam: float = 0.01, every: int = 4,
          released: bool = False, flip: bool = False, device="cpu", desc: str = "msgm"):
    """Adam, linear warm-up, global grad-norm clip 1.0, EMA (released run_lib3.train); returns the EMA model.
    task normal / retrain: plain DSM on the given kept data; square / norm: MSGM on kept + undesirable data."""
    vp = C.VP()
    model = model.to(device).train()
    ema = C.EMA(model, hp["ema"])
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    eps_fn = unconditional(model)
    B, log = hp["batch_size"], []
    bar = tqdm(range(hp["steps"]), desc=desc)
    for step in bar:
        x_k = x_keep[torch.randint(len(x_keep), (B,))].to(device)
        forget_step = task in ("square", "norm") and step % every == 0   # released: keyed on state['step']
        x_u = x_forget[torch.randint(len(x_forget), (B,))].to(device) if forget_step else None
        if flip:  # random horizontal flips (CIFAR-10 configs); digits are not flip-invariant
            x_k = torch.where(torch.rand(B, 1, 1, 1, device=device) < 0.5, x_k.flip(3), x_k)
        loss, l_keep, l_forget = msgm_loss(eps_fn, vp, x_k, x_u, task, lam, forget_step, released)
        for g in opt.param_groups:
            g["lr"] = hp["lr"] * min(1.0, (step + 1) / hp["warmup"]) if hp["warmup"] else hp["lr"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        log.append((l_keep.item(), l_forget.item() if l_forget is not None else math.nan))
        if (step + 1) % 100 == 0 or step + 1 == hp["steps"]:
            k = torch.tensor(log[-100:])
            bar.set_postfix(retain=f"{k[:, 0].mean():.4f}", forget=f"{k[:, 1].nanmean():.4f}")
    return ema.model


def cached_scratch(name: str, args: Args, info, x, hp, device):
    """A from-scratch DSM model (retrain = the gold standard, or normal from scratch), trained once and cached in
    runs/msgm-<dataset>-<name>/model.pt under its recipe, so later runs (and --task all) reuse it."""
    path = C.run_dir("msgm", info.name, name) / "model.pt"
    recipe = dict(hp, forget=args.forget, seed=args.seed, n_train=len(x))
    if path.exists():
        model, ck = C.load_checkpoint(path, info.name, device)
        if ck.get("recipe") == recipe:
            print(f"{name}: cached {path} ({ck.get('seconds', 0):.0f}s of training)")
            return model, ck.get("seconds", 0.0)
        print(f"{name}: {path} was trained with another recipe, training again")
    C.seed_everything(args.seed)
    t0 = time.time()
    model = train(C.CondUNet(info.name), x, None, name.split("-")[0], hp, flip=info.name == "cifar10",
                  device=device, desc=name)
    secs = time.time() - t0
    C.save_checkpoint(path, model, hp["steps"], recipe=recipe, seconds=secs)
    return model, secs


# ----------------------------------------------------------------------------------------------------------
# EVALUATION
# ----------------------------------------------------------------------------------------------------------

def evaluate(model, clf, args: Args, forget, data, device) -> tuple:
    """Unconditional samples judged by the classifier (share of undesirable classes, FID vs real kept images),
    NLL in bits/dim of held-out kept and undesirable images, and the angle diagnostic on both."""
    x_tr, y_tr, xt_keep, xt_forget = data
    model = model.to(device).eval()
    null = torch.full((args.n_samples,), model.tok["null"], device=device)
    x = C.sample(model, C.VP(), null, args.sampler, args.sample_steps, seed=args.seed)
    m = E.sample_metrics(clf, x, None, x_tr, y_tr, forget)
    p, n = m["forget_rate"], len(x)
    m["forget_rate_se"] = math.sqrt(p * (1 - p) / n)
    # An unconditional model has no asked-for class: retain_acc is the classifier's mean confidence on the samples
    # it assigns to a kept class (how recognisable the kept digits are).
    with torch.no_grad():
        prob = torch.cat([F.softmax(clf(b.to(device)), 1).cpu() for b in x.split(1000)])
    kept = ~torch.isin(prob.argmax(1), torch.tensor(forget))
    m["retain_acc"] = prob[kept].max(1).values.mean().item()
    tol = dict(rtol=args.nll_tol, atol=args.nll_tol)
    for group, xs in (("retain", xt_keep), ("forget", xt_forget)):
        bpd = E.model_nll(model, xs, **tol)
        m[f"nll_{group}_bpd"], m[f"nll_{group}_se"] = float(bpd.mean()), float(bpd.std() / math.sqrt(len(bpd)))
        for k, v in score_cosine(unconditional(model), C.VP(), xs.to(device), seed=args.seed).items():
            m[f"{k.split('@')[0]}_{group}@{k.split('@')[1]}"] = v
    return m, x


def evaluate_cached(name: str, ckpt, model, clf, args: Args, forget, data, device) -> tuple:
    """evaluate() for a model that does not change between runs (the base, the cached retrain): its figures are
    kept in runs/msgm-<dataset>-<name>/eval-cache.json under the checkpoint's identity and the evaluation settings."""
    path = C.run_dir("msgm", args.dataset, name) / "eval-cache.json"
    st = ckpt.stat()
    key = json.dumps([str(ckpt), st.st_mtime_ns, st.st_size, forget, args.n_samples, args.sampler,
                      args.sample_steps, args.nll_n, args.nll_tol, args.seed])
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key in cache:
        print(f"{name}: evaluation cached in {path}")
        return cache[key]["metrics"], torch.tensor(cache[key]["grid"])
    m, x = evaluate(model, clf, args, forget, data, device)
    cache[key] = {"metrics": m, "grid": x[:32].tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache))
    return m, x


COLS = ["forget_rate", "forget_rate_se", "retain_acc", "fid_retain", "nll_retain_bpd", "nll_forget_bpd",
        "cos_forget@0.02", "cos_forget@0.1", "cos_forget@0.3", "cos_retain@0.1", "train_seconds"]


def main(args: Args):
    # every mistake a user can make is caught here, before any work
    info = C.data_info(args.dataset)
    forget = E.parse_classes(args.forget, info, "forget class")
    if not forget:
        raise C.UsageError("--forget is empty: name at least one undesirable class, e.g. --forget 1,5")
    if len(set(forget)) == info.num_classes:
        raise C.UsageError(f"--forget {args.forget} leaves no kept class: keep at least one of 0..{info.num_classes - 1}")
    if args.task not in TASKS:
        raise C.UsageError(f"unknown --task {args.task!r}: use one of {', '.join(TASKS)}")
    if not 0 <= args.forget_weight <= 1:
        raise C.UsageError(f"--forget-weight {args.forget_weight} must lie in [0, 1] (paper: 0.01)")
    if args.forget_every < 1 or args.n_samples < 2 or args.nll_n < 0:
        raise C.UsageError("--forget-every must be >= 1, --n-samples >= 2 and --nll-n >= 0")
    if args.sampler not in ("ddim", "ddpm", "em"):
        raise C.UsageError(f"unknown --sampler {args.sampler!r}: use ddim, ddpm or em")
    device = C.pick_device(args.device)
    scratch = not args.finetune
    hp, hp_scratch = hyper(args, info, scratch), hyper(args, info, True)
    if args.retrain_steps:
        hp_scratch["steps"] = args.retrain_steps
    default_tag = args.task + ("-scratch" if scratch and args.task != "retrain" else "") + (
        f"-w{args.forget_weight:g}" if args.forget_weight != 0.01 and args.task in ("square", "norm") else "") + (
        "-released" if args.released and args.task in ("all", "square", "norm") else "")
    out = C.run_dir("msgm", info.name, args.tag or default_tag)

    x, y = C.load_data(info.name, args.data_root, "train")
    xt, yt = C.load_data(info.name, args.data_root, "test")
    f = torch.tensor(forget)
    x_keep, x_forget = x[~torch.isin(y, f)], x[torch.isin(y, f)]
    xt_keep, xt_forget = xt[~torch.isin(yt, f)], xt[torch.isin(yt, f)]
    if args.nll_n:
        xt_keep, xt_forget = xt_keep[:args.nll_n], xt_forget[:args.nll_n]
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(dict(asdict(args), hp=hp, hp_scratch=hp_scratch), indent=2) + "\n")
    clf = E.load_classifier(info.name, args.data_root, device)
    print(f"MSGM on {info.name}: undesirable classes {forget} ({len(x_forget)} train / {len(xt_forget)} test "
          f"images), kept {len(x_keep)} / {len(xt_keep)}; classifier test accuracy {clf.test_acc:.3f}; "
          f"{'fine-tuning the base' if args.finetune else 'from scratch'}: {hp}")
    t_all = time.time()
    tasks = ["normal", "retrain", "square", "norm"] if args.task == "all" else [args.task]
    data = (x, y, xt_keep, xt_forget)
    rows, samples, models = {}, {}, {}
    # the normal (all-data) model is the starting point and the "base_" figures of every report
    if args.finetune:
        models["normal"], secs = C.load_base(info.name, device, root=args.data_root), 0.0
        normal_ckpt = C.base_path(info.name)
    else:
        models["normal"], secs = cached_scratch("normal-scratch", args, info, x, hp, device)
        normal_ckpt = C.run_dir("msgm", info.name, "normal-scratch") / "model.pt"
    base_m, samples["normal"] = evaluate_cached("normal" if args.finetune else "normal-scratch", normal_ckpt,
                                                models["normal"], clf, args, forget, data, device)
    rows["normal"] = dict(base_m, train_seconds=secs)
    for task in tasks:
        if task == "normal":
            continue
        if task == "retrain":
            model, secs = cached_scratch("retrain", args, info, x_keep, hp_scratch, device)
        else:
            C.seed_everything(args.seed)
            start = copy.deepcopy(models["normal"]) if args.finetune else C.CondUNet(info.name)
            t0 = time.time()
            model = train(start, x_keep, x_forget, task, hp, args.forget_weight, args.forget_every, args.released,
                          flip=info.name == "cifar10", device=device, desc=task)
            secs = time.time() - t0
            C.save_checkpoint(out / ("model.pt" if args.task != "all" else f"model-{task}.pt"), model, hp["steps"],
                              task=task, args=asdict(args), hp=hp)
        models[task] = model
        if task == "retrain":
            ckpt = C.run_dir("msgm", info.name, "retrain") / "model.pt"
            m, samples[task] = evaluate_cached("retrain", ckpt, model, clf, args, forget, data, device)
        else:
            m, samples[task] = evaluate(model, clf, args, forget, data, device)
        rows[task] = dict(m, train_seconds=secs)

    head = "norm" if args.task == "all" else args.task
    names = {"normal": "normal (all data)", "retrain": "retrain (gold std)", "square": "Orthogonal-MSGM",
             "norm": "Obtuse-MSGM"}
    grid = torch.cat([samples[k][:32] for k in rows])
    C.save_grid(grid, out / "samples.png", nrow=16)
    print(f"\nunconditional samples: {args.n_samples} per model ({args.sampler}, {args.sample_steps} steps); "
          f"NLL of {len(xt_keep)} kept / {len(xt_forget)} undesirable test images (ODE tol {args.nll_tol:g}); "
          f"samples.png: 2 rows per model, in the order {', '.join(rows)}")
    print(E.table({names[k]: v for k, v in rows.items()}, COLS))
    metrics = {k: v for k, v in rows[head].items() if not isinstance(v, list)}
    metrics.update({f"base_{k}": v for k, v in rows["normal"].items() if not isinstance(v, list)})
    metrics.update(task=head, seconds=rows[head]["train_seconds"], total_seconds=time.time() - t_all,
                   class_share=rows[head]["class_share"], models=rows, hp=hp)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
