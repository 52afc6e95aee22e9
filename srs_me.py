"""SRS-ME: separable, recoverable multi-concept erasure by weight shifts in a null space.

Paper: "Forget All That Should Be Forgotten: Separable, Recoverable, and Sustainable Multi-Concept
Erasure from Diffusion Models", M. Zhao, L. Zhang, T. Zheng, Y. Kong, B. Yin (SRS-ME; the earlier
version, SepME, is arXiv 2402.05947). Official code: github.com/Dlut-lab-zmn/SRS-ME.

Each erasable concept k gets its own shift of the cross-attention key/value projections (they see
the condition tokens alone, linearly, without bias), every row in the null space of the embeddings
e_m of the protected prompts (null, watermark trigger, the other erasable concepts):

    dW_k = P_k (beta B_k),  e_m(k) B_k^T = 0                                (Eqs. 25-26, 36)
    r_c(theta) = eps_theta(x_t, c) - eps_theta(x_t, null)                    (Eq. 27)
    min_P mean(r_k(theta + dW_k) * r_k(theta)) + lambda ||dW_k||_1 / M       (Eq. 28)
    m_n = alpha m_{n-1} + (1 - alpha) L_cor,  stop once m_n < tau            (Eq. 37)

Protected prompts keep their keys and values under any sum of shifts: erasing S is
theta + sum_{k in S} dW_k, restoring j drops dW_j exactly, the watermark survives every
combination, the shifts train one at a time (optimisation decoupling, Q7); regular concepts
(unprotected) are kept only approximately.

The paper in this file: null_space_basis (Eqs. 25-26, Algorithm 1 lines 1-7), shift (Eq. 36),
concept_representation (Eq. 27), correlation_loss (Eq. 28), l1_size (the L_p term, s3),
balancing_weights (Eq. 35), momentum_statistic and stop_rule (Eq. 37); shift_step is one iteration
of Algorithm 1 (Eq. 28; Eq. 34 for several concepts), train_shifts its loop: one concept (SRS-ME)
or several at once (SRS-ME-dagger). load_model(run folder) reads back base + the erased shifts.

    python srs_me.py                              # Scene 1: erase 0-5, restore 0,1, then 2
    python srs_me.py --protocol paper             # the README's table: 300 samples a class
    python srs_me.py --erase 3                    # erase one concept (the others stay protected)
    python srs_me.py --erase 0,2,4 --restore 2    # combine the run folder's saved shifts
    python srs_me.py --scene 4 --tag s4           # another scene of the paper (Fig. 7)
    python srs_me.py --dataset mnist --device cuda --amp
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import dataclass

import torch

import common as C
import eval as E


@dataclass
class SRSMEHparams:
    """What the losses, shift_step and train_shifts use (the paper's values for SD in each doc)."""
    scale_factor: float = 1e-2
    """beta, the scale on the unit null-space basis (paper 1e-4 for SD); beta * lr sets Adam's step
    in weight space"""
    lr: float = 0.1
    """Adam learning rate on the shift coefficients P (paper)"""
    tau: float = -0.1
    """stop once the momentum statistic of L_cor(theta + dW) / L_cor(theta) is below tau (paper:
    L_cor < 1e-4, near 0; digits' null token draws each digit ~10% of the time, and only past 0
    does the concept fall below that)"""
    alpha: float = 0.9
    """momentum of the stopping statistic (paper Eq. 37)"""
    reg_share: float = 1.0
    """lambda of the L1 size term, set at the first non-zero shift so that its gradient is this
    share of L_cor's (norms); the share kept over training is logged (paper: lambda 1e-6 for SD)"""
    min_steps: int = 10
    """never stop at or before this step (official code: n > 10)"""
    max_steps: int = 1000
    """iteration cap per shift (paper)"""
    max_base: int = 1024
    """at most this many null-space vectors per concept (columns of P); digits has 64 - 8 = 56, all
    kept"""
    batch_size: int = 16
    """noised images per concept and step, t stratified over them (the official code uses 1)"""
    zero_grad: bool = True
    """zero gradients every step (paper's Adam); --no-zero-grad accumulates them as the official
    code does"""


# THE LOSSES: weight decoupling (Q1-Q3, Eqs. 17-26, 36), concept-irrelevant unlearning (27-37)

def null_space_basis(e_m: torch.Tensor, max_base: int, e_k=None) -> torch.Tensor:
    """Rows B [n_b, d] with e_m B^T = 0 (Eqs. 25-26), at most max_base, orthonormal (SVD). Given
    concept k's embedding e_k, row 0 is its projection into the null space, the rest orthogonal to
    it: L_cor's gradient on P is then in column 0 alone, Adam moves dW along e_k only (in another
    basis it spreads dW over all null directions, moving regular concepts without erasing k).
    Official SRSME_Solution.py: sympy's RREF basis, same span."""
    e = e_m.detach().double().cpu()
    _, s, vh = torch.linalg.svd(e, full_matrices=True)
    rank = int((s > s.max() * max(e.shape) * torch.finfo(torch.float64).eps).sum())
    if rank >= e.shape[1]:
        raise ValueError(f"the {len(e)} protected embeddings span all {e.shape[1]} dimensions: "
                         f"protect fewer concepts (--erasable, --protect)")
    B = vh[rank:]
    if e_k is not None:   # QR of [B e_k | I]: Q's first column is B e_k / |B e_k|
        u = B @ e_k.detach().double().cpu()
        B = torch.linalg.qr(torch.cat([u[:, None], torch.eye(len(u), dtype=u.dtype)], 1))[0].T @ B
    return B[:max_base].float()


def shift(P: torch.Tensor, B: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 36 in PyTorch's [out, in] convention: dW = P (beta B); each row of dW is in null(e_m)."""
    return P @ (beta * B)


def concept_representation(eps_c: torch.Tensor, eps_null: torch.Tensor) -> torch.Tensor:
    """Eq. 27: r_{c,t} = eps(x_t, c) - eps(x_t, null), what the concept adds to one step."""
    return eps_c - eps_null


def correlation_loss(r_new: torch.Tensor, r_orig: torch.Tensor) -> torch.Tensor:
    """Eq. 28: mean over elements of r(theta + dtheta) * r(theta); the target is 0, not -1."""
    return (r_new * r_orig).mean()


def relative_correlation(r_new: torch.Tensor, r_orig: torch.Tensor) -> torch.Tensor:
    """L_cor(theta + dtheta) / L_cor(theta) on the same noised images (Eq. 28 relative to its
    start, 1 for every concept; free of the batch-to-batch swings of |r|): the statistic our
    stopping rule watches."""
    return correlation_loss(r_new, r_orig) / correlation_loss(r_orig, r_orig)


def stratified_t(n_groups: int, n: int, T: int, device) -> torch.Tensor:
    """Per group of n images, one t in each of n slices of {0..T-1} (SRS_ME.py: t ~ U{0..T-1})."""
    u = torch.arange(n_groups * n, device=device) % n + torch.rand(n_groups * n, device=device)
    return (u * T / n).long()


def l1_size(deltas: dict) -> torch.Tensor:
    """||dtheta||_p = ||dtheta||_1 / M over the M shifted matrices (s3; SRS_ME.py: of P beta B)."""
    return sum(d.abs().sum() for d in deltas.values()) / len(deltas)


def momentum_statistic(m_prev, l_cor, alpha: float):
    """Eq. 37: m_n = alpha m_{n-1} + (1 - alpha) L_cor, from m_1 = L_cor (official SRS_ME.py)."""
    return l_cor if m_prev is None else alpha * m_prev + (1 - alpha) * l_cor


def balancing_weights(l_cor: list) -> list:
    """Eq. 35: eta_i = max_k |L_cor(c_k)| / |L_cor(c_i)|, each loss scaled up to the largest."""
    big = max(abs(float(l)) for l in l_cor)
    return [big / max(abs(float(l)), 1e-12) for l in l_cor]


def stop_rule(n: int, m: float, tau: float, min_steps: int, max_steps: int) -> bool:
    """Eq. 37's stopping condition as the official SRS_ME.py applies it: stop at step n once
    n > min_steps and m_n < tau (the regulariser is not in the statistic), or at the iteration
    cap."""
    return (n > min_steps and m < tau) or n >= max_steps


LOSSES = (null_space_basis, shift, concept_representation, correlation_loss, relative_correlation,
          stratified_t, l1_size, momentum_statistic, balancing_weights, stop_rule)


# THE SHIFTS: which weights, which tokens are protected; the batch, the step, the loop

def kv_weights(model) -> dict:
    """The image-independent layers: to_k / to_v of every cross-attention (attn2), {parameter
    name: weight}. They map the context [BOS, c] linearly and have no bias, so e(c) dW^T = 0 leaves
    K and V for c unchanged."""
    layers = {f"{name}.{p}": getattr(mod, p) for name, mod in model.named_modules()
              if name.endswith("attn2") for p in ("to_k", "to_v")}
    assert all(lin.bias is None for lin in layers.values()), "a bias shift changes every prompt"
    return {f"{name}.weight": lin.weight for name, lin in layers.items()}


def protected_tokens(model, k: int, kept) -> list:
    """e_m of Eq. 24 for concept k: BOS (in every context), null, the watermark trigger, the other
    erasable concepts (and the regular ones of --protect) in `kept`. Never k itself."""
    tok = model.tok
    return [tok["bos"], tok["null"], tok["watermark"]] + [j for j in kept if j != k]


def combine(model, shifts: dict, concepts) -> torch.nn.Module:
    """theta + sum_{k in concepts} dtheta_k in a copy (what the paper adds to the state dict)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in kv_weights(out).items():
            w += sum(shifts[k][name].to(w.device) for k in concepts)
    return out


def concept_batch(data: dict, active: list, hp: SRSMEHparams, vp, null: int, device) -> tuple:
    """(x, t, c): per active concept, batch_size of its images noised at stratified t, once with
    the concept's token and once with the null token (the two terms of Eq. 27)."""
    pick = [data[k][torch.randint(len(data[k]), (hp.batch_size,))] for k in active]
    x0 = torch.cat(pick).to(device)
    t = stratified_t(len(active), hp.batch_size, vp.T, device)
    x_t = vp.q_sample(x0, t, torch.randn_like(x0))
    tokens = torch.tensor(active, device=device).repeat_interleave(hp.batch_size)
    x = torch.cat([x_t, x_t])
    t = torch.cat([t, t])
    c = torch.cat([tokens, torch.full_like(tokens, null)])
    return x, t, c


def shift_step(base, W: dict, P: dict, B: dict, opt: dict, active: list, batch: tuple, lam,
               hp: SRSMEHparams, ctx, scaler) -> dict:
    """One iteration of Algorithm 1 for the active concepts (official SRS_ME.py's training loop):
    the balanced correlation loss sum_i eta_i L_cor(c_i, theta + sum_j dW_j) (Eqs. 28, 34, 35),
    plus lambda times the L1 size of the shifts, one Adam step on each active concept's P.
    lam: None until the first step with a non-zero shift fixes it (|dW|_1' is zero at dW = 0).
    Returns per concept L_cor and its ratio to L_cor(theta); lambda; the L1 gradient's share."""
    x, t, c = batch
    with torch.no_grad(), ctx:                 # the original model: the pseudo ground truth
        r_orig = concept_representation(*base(x, t, c).float().chunk(2))
    delta = {n: sum(shift(P[k][n], B[k], hp.scale_factor) for k in P) for n in W}
    with ctx:
        weights = {n: W[n] + delta[n] for n in W}
        eps = torch.func.functional_call(base, weights, (x, t, c)).float()
    r_new = concept_representation(*eps.chunk(2))
    r_new_k = r_new.chunk(len(active))
    r_orig_k = r_orig.chunk(len(active))
    l_cor = [correlation_loss(a, b) for a, b in zip(r_new_k, r_orig_k)]
    eta = balancing_weights([l.item() for l in l_cor])               # all 1 for one concept
    loss_cor = sum(e * l for e, l in zip(eta, l_cor))
    params = [p for k in active for p in P[k].values()]
    grad_cor = torch.autograd.grad(scaler.scale(loss_cor), params)
    # autograd.grad freed the graph of delta: build it again for the L1 term
    delta = {n: sum(shift(P[k][n], B[k], hp.scale_factor) for k in P) for n in W}
    grad_reg = torch.autograd.grad(l1_size(delta), params)          # zero at step 1 (dW = 0)
    norm_cor = torch.cat([g.flatten() for g in grad_cor]).norm().item() / scaler.get_scale()
    norm_reg = torch.cat([g.flatten() for g in grad_reg]).norm().item()
    if lam is None and norm_reg > 0:
        lam = hp.reg_share * norm_cor / norm_reg
    reg_weight = 0.0 if lam is None else lam          # before lambda is fixed, grad_reg is 0
    for p, g_cor, g_reg in zip(params, grad_cor, grad_reg):
        grad = g_cor + reg_weight * scaler.get_scale() * g_reg
        if not hp.zero_grad and p.grad is not None:   # the official SRS_ME.py never zeroes them
            grad = grad + p.grad
        p.grad = grad
    for k in active:
        scaler.step(opt[k])
    scaler.update()
    return {"l_cor": [l.item() for l in l_cor],
            "rho": [relative_correlation(a, b).item() for a, b in zip(r_new_k, r_orig_k)],
            "lam": lam, "reg_share": reg_weight * norm_reg / max(norm_cor, 1e-30)}


STEPS = (shift_step,)


def train_shifts(base, concepts, kept, data: dict, hp: SRSMEHparams, ctx, scaler,
                 desc: str = "") -> tuple:
    """Algorithm 1: train dtheta_k for the concepts together (SRS-ME-dagger, Eq. 34); one concept
    is SRS-ME. Each concept stops on its own (Eq. 37) while the others go on. `base` stays frozen;
    shifts enter through functional_call. ctx: the forward passes' context (autocast; the caller
    may add hooks); scaler: the GradScaler. Returns ({k: {layer: dW}}, log)."""
    device = next(base.parameters()).device
    vp = C.VP()
    emb = base.token_emb.weight.detach()
    W = {n: w.detach() for n, w in kv_weights(base).items()}
    B = {k: null_space_basis(emb[protected_tokens(base, k, kept)], hp.max_base, emb[k]).to(device)
         for k in concepts}
    P = {k: {n: torch.zeros(w.shape[0], len(B[k]), device=device, requires_grad=True)
             for n, w in W.items()}
         for k in concepts}                          # zero init (paper's s2): starts at theta
    opt = {k: torch.optim.Adam(P[k].values(), lr=hp.lr) for k in concepts}   # each its own stop
    active = list(concepts)
    lam = None
    shares = []
    steps = {}
    seconds = {}
    first_loss = {}
    l_cor_momentum = {}          # Eq. 37's m_n on L_cor
    rho_momentum = {}            # m_n on the ratio to L_cor(theta): what stop_rule watches
    t0 = time.time()
    cpu0 = time.process_time()
    bar = C.tqdm(total=hp.max_steps, desc=desc or f"shift {','.join(map(str, concepts))}",
                 leave=False)
    step = 0
    while active:
        step += 1
        batch = concept_batch(data, active, hp, vp, base.tok["null"], device)
        out = shift_step(base, W, P, B, opt, active, batch, lam, hp, ctx, scaler)
        lam = out["lam"]
        shares.append(out["reg_share"])
        for k, l_cor, rho in zip(list(active), out["l_cor"], out["rho"]):
            first_loss.setdefault(k, l_cor)
            l_cor_momentum[k] = momentum_statistic(l_cor_momentum.get(k), l_cor, hp.alpha)
            rho_momentum[k] = momentum_statistic(rho_momentum.get(k), rho, hp.alpha)
            if stop_rule(step, rho_momentum[k], hp.tau, hp.min_steps, hp.max_steps):
                active.remove(k)
                steps[k] = step
                seconds[k] = time.time() - t0
        bar.update(1)
        bar.set_postfix(l_cor=f"{sum(out['l_cor']) / len(out['l_cor']):.2e}", left=len(active))
    bar.close()
    final_lambda = 0.0 if lam is None else lam   # None: no step had a non-zero shift
    log = {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0,
           "steps": steps, "concept_seconds": seconds, "first_loss": first_loss,
           "l_cor_momentum": l_cor_momentum, "final_rho": rho_momentum,
           "reg_lambda": dict.fromkeys(concepts, final_lambda),
           "reg_share": dict.fromkeys(concepts, sum(shares) / len(shares)),
           "null_dim": {k: len(B[k]) for k in B}}
    shifts = {k: {n: shift(P[k][n], B[k], hp.scale_factor).detach().cpu() for n in W}
              for k in concepts}
    return shifts, log


# ---- EXPERIMENT: python srs_me.py (scenes, saved shifts, judging, report); not needed for SRS-ME

# The paper's scenes (Fig. 7) as (operation, concepts) steps; concepts are erasable class ids.
SCENES = {"1": "erase 0,1,2,3,4,5; restore 0,1; restore 2",
          "2": "erase 0,1,2,3,4,5; restore 3,4; restore 5",
          "3": "erase 0,2,4; restore 0,2; erase 1,3; restore 1; erase 5",
          "4": "erase 0,1,2; restore 0; erase 3,4; restore 1; erase 5; restore 2"}


@dataclass
class Args(SRSMEHparams, C.RunArgs):
    erasable: str = "0,1,2,3,4,5"
    """concepts that get a shift; each is protected in every other's null space (the paper's
    c0-c5)"""
    scene: str = "1"
    """1-4 (the paper's Fig. 7) or steps like 'erase 0,1; restore 0'"""
    protect: str = ""
    """regular concepts to keep exact too, in every null space (official --em_indexes; the paper
    protects none)"""
    erase: str = ""
    """instead of a scene: evaluate base + the sum of these concepts' shifts (e.g. 0,2,4)"""
    restore: str = ""
    """with --erase: drop these shifts from it; alone: every erasable concept erased except
    these"""
    n_train_images: int = 64
    """the base model's own samples of each concept used as x0 (the repo's generated training
    folder)"""
    joint: bool = False
    """train all shifts of a scene at once (SRS-ME-dagger, Eq. 34) instead of one at a time"""
    compare_variants: bool = False
    """after training, train the other variant once too, to report seconds and memory of both"""
    check_subsets: bool = False
    """check that every subset of the shifts (63 for six) leaves the protected tokens' eps exact,
    not only the scene's combinations"""
    n_per_class: int = 20
    """samples per class (and of the watermark) drawn from the base and after every scene step,
    from the same noise"""
    n_nll: int = 8
    """held-out images per group (erased / kept) whose NLL in bits/dim the run reports"""
    presets = {}   # the digits values serve every dataset
    # --protocol paper: the sizes of the README's Scene 1 table
    paper = dict(compare_variants=True, check_subsets=True, n_per_class=300, n_nll=16)
    # run options of the other methods that SRS-ME has no use for (one line of error if given)
    unsupported = dict(
        compile="the shifts enter the frozen base through torch.func.functional_call, which is not "
                "compiled here",
        save_every="each shift is saved as soon as it is trained and reused by a rerun; there is "
                   "no resume.pt",
        track="no TensorBoard log: each shift's losses are printed and kept in metrics.json")


class SavedTensorMeter:
    """The forward passes' context for train_shifts: autocast, plus saved-tensor hooks that count
    the bytes autograd keeps for backward (the activation memory that grows with the number of
    concepts trained together). `peak`: the most of one forward pass."""

    def __init__(self, autocast):
        self.autocast = autocast
        self.peak = 0
        self.saved = {}
        self.stack = contextlib.ExitStack()

    def pack(self, t):
        storage = t.untyped_storage()
        self.saved[storage.data_ptr()] = storage.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t

    def __enter__(self):
        self.saved = {}
        self.stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
        self.stack.enter_context(self.autocast)

    def __exit__(self, *exc):
        self.stack.__exit__(*exc)
        self.peak = max(self.peak, sum(self.saved.values()))


def measured_train(base, group, kept, data, args: Args, desc: str) -> tuple:
    """train_shifts with its memory measured: the saved-tensor peak of one forward pass plus P and
    Adam's two moments (12 bytes a coefficient) as train_mem_mb; CUDA's own peak on a GPU."""
    device = next(base.parameters()).device
    meter = SavedTensorMeter(C.autocast(device, args.amp))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shifts, log = train_shifts(base, group, kept, data, args, meter,
                               C.grad_scaler(device, args.amp), desc)
    rows = sum(w.shape[0] for w in kv_weights(base).values())
    n_coef = sum(rows * log["null_dim"][k] for k in group)
    log["train_mem_mb"] = (meter.peak + 12 * n_coef) / 2 ** 20
    if device.type == "cuda":
        log["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return shifts, log


def load_model(path, device="cpu", concepts=None) -> torch.nn.Module:
    """A run (its folder or model.safetensors) as a model: its base plus the shifts of `concepts`
    (default: those erased at the run's first step). Refuses a base that changed since the shifts
    were trained."""
    ck = C.load(C.model_file(path))
    if C.file_id(ck["base"]) != ck["base_id"]:
        raise C.UsageError(f"{ck['base']} is not the base the shifts in {path} were trained for: "
                           f"run again")
    base = C.load_checkpoint(ck["base"], ck["dataset"], device)[0]
    return combine(base, ck["shifts"], ck["erased"] if concepts is None else concepts)


def merge(stats: list) -> dict:
    """The stats of several trainings as one: per-concept dicts joined, seconds summed, memory the
    largest."""
    joined = {q: {k: v for s in stats for k, v in s[q].items()}
              for q, v in stats[0].items() if isinstance(v, dict)}
    summed = {q: sum(s[q] for s in stats) for q in ("seconds", "cpu_seconds", "data_seconds")}
    largest = {q: max(s[q] for s in stats) for q in ("train_mem_mb", "cuda_peak_mb")
               if q in stats[0]}
    return joined | summed | largest


def get_shifts(base, base_id: str, concepts, kept, args: Args, folder) -> tuple:
    """(shifts, stats, compare, trained): each shift read from folder/concept_k.safetensors while
    base, k's protected tokens and settings match (C.cached), else trained one at a time (SRS-ME,
    Q7) or jointly."""
    dev, data, trained = next(base.parameters()).device, {}, []

    def train(group, desc):
        t0 = time.time()
        for k in sorted(set(group) - set(data)):   # x0: the base's own samples of k
            data[k] = C.sample(base, C.VP(), torch.full((args.n_train_images,), k, device=dev),
                               "ddim", args.sample_steps, seed=1000 * (args.seed + 1) + k,
                               amp=args.amp)
        C.seed_everything(1000 * args.seed + group[0])
        s, st = measured_train(base, group, kept, data, args, desc)
        trained.extend(group)
        for k in group:
            print(f"  {desc}: concept {k}, {st['steps'][k]} steps, L_cor {st['first_loss'][k]:.2e}"
                  f", momentum {st['l_cor_momentum'][k]:.2e} (left {st['final_rho'][k]:.3f}), "
                  f"L1 gradient {st['reg_share'][k]:.2f} x L_cor's, "
                  f"{st['concept_seconds'][k]:.1f}s")
        return {"shifts": s, "stats": dict(st, data_seconds=time.time() - t0 - st["seconds"])}

    hp = {h: getattr(args, h) for h in ("scale_factor lr tau alpha reg_share min_steps max_steps "
                                        "max_base batch_size n_train_images zero_grad "
                                        "sample_steps seed").split()}
    groups = [list(concepts)] if args.joint else [[k] for k in concepts]
    variant = "joint" if args.joint else "one at a time"
    got = []
    for g in groups:
        name = f"{'joint' if len(g) > 1 else 'concept'}_{''.join(map(str, g))}.safetensors"
        key = dict(base=base_id, concepts=g, protected=[protected_tokens(base, k, kept) for k in g],
                   hp=hp)
        got.append(C.cached(folder / name, key, lambda g=g: train(g, variant)))
    shifts = {k: v for r in got for k, v in r["shifts"].items()}
    stats = merge([r["stats"] for r in got])
    print(f"shifts for {list(concepts)}: "
          + (f"trained {trained}" if trained else f"saved in {folder}"))
    fresh, compare = list(trained), {}
    if trained and args.compare_variants and len(concepts) > 1:   # the other way: its cost only
        others = [[k] for k in concepts] if args.joint else [list(concepts)]
        other = merge([train(g, "other variant")["stats"] for g in others])
        names = ("joint", "one_at_a_time") if args.joint else ("one_at_a_time", "joint")
        compare = {f"{v}_{q}": st[q] for v, st in zip(names, (stats, other))
                   for q in ("seconds", "cpu_seconds", "train_mem_mb", "steps", "cuda_peak_mb")
                   if q in st}
    return shifts, stats, compare, fresh


def parse_steps(args: Args, info) -> tuple:
    """(erasable, steps): the scene as [("erase", [0, 1]), ("restore", [0])], or the one
    --erase/--restore step."""
    erasable = sorted(set(C.parse_classes(args.erasable, info, "erasable class")))
    erase = C.parse_classes(args.erase, info, "erase class")
    restore = C.parse_classes(args.restore, info, "restore class")
    if not erasable:
        raise C.UsageError("--erasable is empty: name the concepts that get shifts, e.g. 0,1,2")
    if erase or restore:   # one combination of shifts instead of a scene
        if erase and not set(restore) <= set(erase):
            raise C.UsageError(f"--restore {args.restore}: restores only concepts of --erase "
                               f"{args.erase}")
        active = [k for k in (erase or erasable) if k not in restore]
        if not set(erase) | set(restore) <= set(erasable) or not active:
            raise C.UsageError(f"--erase minus --restore must leave a concept, all from "
                               f"--erasable {erasable}")
        base = f"--erase {args.erase}" if erase else f"every --erasable concept {erasable}"
        but = f" but --restore {args.restore}" if restore else ""
        print(f"one combination of shifts: erasing {active} ({base}{but})")
        return erasable, [("erase", active)]
    steps = []
    for part in SCENES.get(args.scene, args.scene).split(";"):
        op, _, cs = part.strip().partition(" ")
        cs = C.parse_classes(cs.replace(" ", ""), info, f"{op} class")
        if op not in ("erase", "restore") or not cs or not set(cs) <= set(erasable):
            raise C.UsageError(f"scene step {part.strip()!r} must read 'erase 0,1' or 'restore 0',"
                               f" concepts from --erasable {erasable} (or use --scene 1-4)")
        steps.append((op, cs))
    if steps[0][0] != "erase":
        raise C.UsageError("a scene starts with an 'erase' step")
    return erasable, steps


def judge_step(clf, x, xb, c, info, active, ever, erasable, real) -> dict:
    """One scene step against the base model's same-seed samples xb: per class accuracy, FID vs
    base, mean pixel distance (the paper's LPIPS role) and max abs difference; the same per group;
    the watermark."""
    K = info.num_classes
    wm = c == info.num_classes + 2
    cls = c < info.num_classes
    m = E.sample_metrics(clf, x[cls], c[cls], *real, forget=sorted(active))
    d = (x - xb).abs().flatten(1)
    m["max_abs_diff"] = [d[c == k].max().item() for k in range(K)]
    groups = {"erased": sorted(active), "restored": sorted(set(ever) - set(active)),
              "regular": [k for k in range(K) if k not in erasable],
              "untouched": sorted(set(erasable) - set(ever))}
    for g, ks in groups.items():
        sel = torch.isin(c, torch.tensor(ks, dtype=torch.long))
        m |= {f"{g}_classes": ks,
              f"{g}_acc": sum(m["class_acc"][k] for k in ks) / len(ks) if ks else None,
              f"{g}_fid_vs_base": E.fid(clf, x[sel], xb[sel]) if ks else None,
              f"{g}_pixel_dist": d[sel].mean().item() if ks else None,
              f"{g}_max_abs_diff": d[sel].max().item() if ks else None}
    # to the pattern itself; then vs the base model's watermark samples
    m["watermark_dist"] = (x[wm] - C.watermark_image(info).to(x)).abs().mean().item()
    m["watermark_max_diff"] = d[wm].max().item()
    return m


@torch.no_grad()
def exactness(base, shifts: dict, kept, seed: int, subsets=None) -> dict:
    """Every subset S of the shifts (or those given): max |eps_{theta+sum_S}(x_t, t, c) -
    eps_theta(x_t, t, c)| over the protected c (null, BOS, watermark, kept j not in S) at 8 random
    (x_t, t) per token, one batch."""
    g = torch.Generator().manual_seed(seed)
    dev, info, ks = next(base.parameters()).device, base.info, sorted(shifts)
    toks = torch.tensor([base.tok["null"], base.tok["bos"], base.tok["watermark"], *kept])
    toks = toks.repeat_interleave(8)
    x = torch.randn(len(toks), info.channels, info.size, info.size, generator=g).to(dev)
    t, toks = torch.randint(0, C.VP().T, (len(toks),), generator=g).to(dev), toks.to(dev)
    ref = base(x, t, toks)
    W = {n: w.detach() for n, w in kv_weights(base).items()}
    worst = 0.0
    if subsets is None:
        subsets = itertools.chain(*(itertools.combinations(ks, r) for r in range(1, len(ks) + 1)))
    subsets = [tuple(S) for S in subsets if S]
    for S in subsets:
        params = {n: W[n] + sum(shifts[k][n].to(dev) for k in S) for n in W}
        out = torch.func.functional_call(base, params, (x, t, toks))
        kept_rows = ~torch.isin(toks, torch.tensor(S, device=dev))
        worst = max(worst, (out - ref)[kept_rows].abs().max().item())
    return {"protected_eps_max_diff": worst, "n_subsets": len(subsets)}


def run_scene(base, shifts, steps, erasable, clf, args: Args, out) -> tuple:
    """Draw n per class and n of the watermark trigger from the base and every step of the scene
    (same seeds); samples.pt holds the first step, samples.png every model."""
    info, real, n = base.info, C.load_data(args.dataset, args.data_root, "train"), args.n_per_class
    c = torch.cat([C.class_tokens(info.num_classes, n), torch.full((n,), base.tok["watermark"])])

    def draw(model):
        return C.sample(model, C.VP(), c.to(next(base.parameters()).device), args.sampler,
                        args.sample_steps, seed=args.seed, amp=args.amp)

    xb = draw(base)
    base_m = judge_step(clf, xb, xb, c, info, steps[0][1], steps[0][1], erasable, real)
    results, active, ever, grids = [], set(), set(), [xb]
    for i, (op, cs) in enumerate(steps):
        if op == "erase":
            active = active | set(cs)
        else:
            active = active - set(cs)
        ever |= set(cs)
        x = draw(combine(base, shifts, sorted(active)))
        results.append(dict(judge_step(clf, x, xb, c, info, active, ever, erasable, real),
                            step=f"t{i}", op=op, concepts=cs, active=sorted(active)))
        grids.append(x)
    record = C.sample_record(grids[1], c, args.sampler, args.sample_steps, base.tok["null"])
    C.save_samples(out, record)
    # the regular (never erasable) classes, base then the first step, from the same noise
    results[0]["regular_change"] = E.paired_change(clf, dict(record, x=xb), record, erasable)
    # one row per token (classes, then watermark); blocks of 8 samples per model (base, t0, t1, ...)
    per = min(8, n)
    cells = [g.view(info.num_classes + 1, n, *g.shape[1:])[:, :per] for g in grids]
    C.save_grid(torch.cat(cells, 1).flatten(0, 1), out / "samples.png", nrow=per * len(grids),
                highlight_rows=erasable)
    return base_m, results


def judge_run(base, base_path, shifts, steps, erasable, kept, clf, args: Args, out) -> dict:
    """Every figure of the run: the scene's steps (run_scene), the first step's samples.pt judged
    as every run's, its NLL, the base's cached figures, the protected tokens' exactness (every
    subset of the shifts with --check-subsets, else the scene's combinations)."""
    first = sorted(steps[0][1])
    base_m, results = run_scene(base, shifts, steps, erasable, clf, args, out)
    metrics = E.judge(E.load_samples(out / "samples.pt"), clf,
                      *C.load_data(args.dataset, args.data_root), first)
    final = combine(base, shifts, first)
    if args.n_nll > 0:
        test = C.load_data(args.dataset, args.data_root, "test")
        metrics.update(E.class_nll(final, *test, first, args.n_nll, args.nll_tol))
    keys = ("forget_rate", "retain_acc", "fid_retain", "nll_forget_bpd", "nll_kept_bpd",
            "nll_forget_null_bpd")
    base_eval = E.evaluate_base(base_path, clf, args, first)[0]
    subsets = None if args.check_subsets else [r["active"] for r in results]
    return ({k: metrics.get(k) for k in keys}
            | {f"base_{k}": base_eval.get(k) for k in (*keys, "nfe", "params")}
            | {"nfe": metrics["nfe"], "params": C.n_params(final),
               "classifier_test_acc": clf.test_acc, "scene_steps": (base_m, results),
               **exactness(base, shifts, kept, args.seed, subsets)})


def summarise(base_m, results, steps, erasable, info) -> dict:
    """Print the per-class and per-group tables of the scene; the scene's own figures for
    metrics.json."""
    rows = {"base": base_m,
            **{f"{m['step']} {m['op']} {','.join(map(str, m['concepts']))}": m for m in results}}
    print("\nper-class accuracy of samples (same seeds for every model):")
    print(E.table({n: {str(k): a for k, a in enumerate(m["class_acc"])} for n, m in rows.items()},
                  [str(k) for k in range(info.num_classes)]))
    print("\n" + E.table(rows, ["erased_acc", "restored_acc", "regular_acc", "untouched_acc",
                                "erased_fid_vs_base", "regular_fid_vs_base", "regular_pixel_dist",
                                "restored_max_abs_diff", "watermark_max_diff", "watermark_dist"]))
    first, reg = results[0], [k for k in range(info.num_classes) if k not in erasable]
    drops = [base_m["class_acc"][k] - first["class_acc"][k] for k in reg]
    restored = max([m["restored_max_abs_diff"] for m in results if m["restored_acc"] is not None],
                   default=None)
    return {"erased_acc": first["erased_acc"], "regular_acc": first["regular_acc"],
            "base_regular_acc": base_m["regular_acc"] if reg else None,
            "regular_max_drop": max(drops, default=None),
            "regular_mean_drop": sum(drops) / len(drops) if drops else None,
            "restored_acc": results[-1]["restored_acc"], "restored_max_abs_diff": restored,
            "watermark_max_diff": max(m["watermark_max_diff"] for m in results),
            "watermark_dist": results[-1]["watermark_dist"],
            "base_watermark_dist": base_m["watermark_dist"],
            "base_class_acc": base_m["class_acc"], "scene": results}


def headline(summary: dict, n: int) -> str:
    """The effect of the scene's first step in two lines: samples of the erased concepts classified
    as asked (a count with its exact 95% interval), base then erased, from the same noise; the
    regular concepts' accuracy with its paired change."""
    first, base_acc = summary["scene"][0], summary["base_class_acc"]
    ks = first["erased_classes"]
    k_base, k_after = (round(sum(acc[k] for k in ks) * n) for acc in (base_acc,
                                                                       first["class_acc"]))
    r = first["regular_change"]
    return E.effect_table("base", "erased", [
        (f"erased {','.join(map(str, ks))}, drawn as asked", E.count(k_base, n * len(ks)),
         E.count(k_after, n * len(ks))),
        ("regular concepts, accuracy", f"{100 * r['before']:.1f}%", E.change(r))])


def main(args: Args):
    C.one_process("srs_me.py")   # no data-parallel loop: N copies would write one folder
    info, clock = C.data_info(args.dataset), C.Clock()
    erasable, steps = parse_steps(args, info)
    protect = C.parse_classes(args.protect, info, "protected class")
    kept = erasable + [k for k in protect if k not in erasable]
    out, dev = C.start_run("srs_me", args), C.pick_device(args.device)
    C.seed_everything(args.seed)
    with clock("base and classifier"):
        base, base_path = C.base_model(args, dev)
        base, clf = base.eval().requires_grad_(False), E.load_judge(args, dev)
    needed = sorted({k for op, cs in steps if op == "erase" for k in cs})
    first = sorted(steps[0][1])
    # ---- the shifts: saved ones that fit, the rest trained (one at a time unless --joint)
    base_id = C.file_id(base_path)
    with clock("training"):
        shifts, train, compare, trained = get_shifts(base, base_id, needed, kept, args,
                                                     out / "shifts")
    C.atomic_save({"base": str(base_path), "base_id": base_id, "dataset": args.dataset,
                   "erased": first, "erasable": erasable, "shifts": shifts},
                  out / "model.safetensors")
    # ---- every step of the scene against the base, same seeds; samples.pt = the first step
    with clock("judging"):
        metrics = judge_run(base, base_path, shifts, steps, erasable, kept, clf, args, out)
    summary = summarise(*metrics.pop("scene_steps"), steps, erasable, info)
    metrics |= {"seconds": train["seconds"] + train["data_seconds"], "base_seconds": None,
                "shifts_loaded": not trained, "erased_concepts": first, **summary,
                "train": train, "compare": compare, "time": clock.seconds()}
    print(f"\n{headline(summary, args.n_per_class)}\n{out}: {clock.line()}")
    # the first step's combination as a model of its own, beside the shifts
    C.save_result(combine(base, shifts, first), out, "srs_me", base_path, first, metrics)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
