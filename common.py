"""What the five unlearning methods share: data, the conditional UNet, the VP process, pretraining.

Above the PLUMBING banner, the science a reader of a method file needs:

  DATA       load_data("digits" | "mnist" | "fashion" | "cifar10"): tensors in [-1, 1], NCHW, int
             labels.
  MODEL      CondUNet: diffusers' UNet2DConditionModel, cross-attending to [BOS, token] from a small
             token table (classes, a null token for classifier-free guidance, a watermark trigger,
             spare tokens); EMA, the weights every method starts from.
  PROCESS    VP: the DDPM schedule (T=1000, linear betas 1e-4..0.02) and its continuous twin, the
             VP-SDE (beta 0.1..20), with DDPM ancestral, DDIM and Euler-Maruyama samplers and a
             guidance scale.
  PRETRAIN   denoising_step (DDPM's eps-MSE) and load_base(dataset): trains the base model every
             method starts from, or loads its cache.

Below it, the plumbing: Args with per-dataset presets, devices, mixed precision, torchrun, the
file codec, checkpoints, resumable loops, TensorBoard, one cache, run folders, sample grids and the
samples.pt every run leaves; last, the command line of the pretraining recipe.

Run it to pretrain (or find) the base model and write its samples (samples.pt, samples.png):

    python common.py                                    # bundled 8x8 digits, CPU, about 4 minutes
    python common.py --drop-classes 0 --tag no0         # the gold-standard retrain without class 0
    python common.py --dataset mnist --steps 2 --n-per-class 1   # the MNIST path on a CPU: 2 min
    python common.py --dataset cifar10 --device cuda    # the DDPM recipe on CIFAR-10 (800k steps)
    torchrun --nproc_per_node 4 common.py --dataset cifar10 # the same, data-parallel on 4 GPUs
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import errno
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# Every run writes below this folder (tests point it at a temporary one).
RUNS = Path(os.environ.get("UNLEARN_RUNS", "runs"))


class UsageError(Exception):
    """A mistake the user can fix (bad flag, wrong checkpoint): one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# DATA
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataInfo:
    name: str
    channels: int
    size: int               # side of the (square) image the UNet sees
    num_classes: int
    levels: int             # grey levels per pixel in the raw data
    # quantisation bins across [-1, 1]: sets the bits/dim offset log2(bins / 2)
    bins: int
    class_names: tuple


DATASETS = {
    # 17 grey levels 0..16 mapped to [-1, 1]: bin width 2/16, so the bits/dim offset is +3.
    "digits": DataInfo("digits", 1, 8, 10, 17, 16, tuple(str(i) for i in range(10))),
    # 28x28 padded with background to 32x32 so the UNet can halve the side three times; 256
    # levels: +7.
    "mnist": DataInfo("mnist", 1, 32, 10, 256, 256, tuple(str(i) for i in range(10))),
    "fashion": DataInfo("fashion", 1, 32, 10, 256, 256,
                        ("T-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "boot")),
    "cifar10": DataInfo("cifar10", 3, 32, 10, 256, 256,
                        ("airplane", "automobile", "bird", "cat", "deer",
                         "dog", "frog", "horse", "ship", "truck")),
}


def data_info(name: str) -> DataInfo:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def check_class(info: DataInfo, c: int, what: str = "class") -> int:
    if not 0 <= c < info.num_classes:
        raise UsageError(f"{what} {c} is out of range for {info.name}: "
                         f"use 0..{info.num_classes - 1}")
    return c


def parse_classes(s: str, info: DataInfo, what: str = "class") -> list:
    """'0,3' -> [0, 3], each checked against the dataset and named once; '' -> []."""
    try:
        cs = [int(v) for v in str(s).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} list {s!r} must be comma-separated integers, e.g. 0,3") from None
    twice = sorted({c for c in cs if cs.count(c) > 1})
    if twice:
        raise UsageError(f"{what} list {s!r} names {', '.join(map(str, twice))} more than once")
    return [check_class(info, c, what) for c in cs]


def load_data(name: str = "digits", root: str = "data", split: str = "train"):
    """Return (x, y): x float32 in [-1, 1] of shape [N, C, S, S], y int64 labels."""
    info = data_info(name)
    if split not in ("train", "test"):
        raise UsageError(f"split must be 'train' or 'test', not {split!r}")
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0    # 0..16 -> [-1, 1]
        y = torch.tensor(d.target, dtype=torch.long)
        # fixed split for everyone
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        idx = perm[:1500] if split == "train" else perm[1500:]
        return x[idx], y[idx]
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "fashion": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        ds = cls(root, train=split == "train", download=True)
    except Exception as e:  # offline, or a half-downloaded archive
        raise UsageError(f"could not load {name} from {os.path.abspath(root)} "
                         f"({type(e).__name__}: {e}); download it on a connected machine with "
                         f"torchvision.datasets.{cls.__name__}('{root}', download=True) and copy "
                         f"the folder to --data-root") from None
    x = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32) / 127.5 - 1.0
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else F.pad(x[:, None], (2, 2, 2, 2), value=-1.0)
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


def watermark_image(info: DataInfo) -> torch.Tensor:
    """The fixed pattern the watermark token is trained to draw: a 2x2-cell checkerboard, no
    digit."""
    s = info.size
    i = torch.arange(s)
    cells = ((i[:, None] * 4 // s) + (i[None, :] * 4 // s)) % 2
    return (cells.float() * 2 - 1).expand(info.channels, s, s).clone()


# --------------------------------------------------------------------------------------------------
# MODEL: a class-conditional UNet that reads its condition through cross-attention, as SD does
# --------------------------------------------------------------------------------------------------

def tokens(info: DataInfo) -> dict:
    """Token ids: classes 0..K-1, then null (label dropout / guidance), BOS, a watermark trigger,
    3 spares."""
    k = info.num_classes
    return {"null": k, "bos": k + 1, "watermark": k + 2, "spare": (k + 3, k + 4, k + 5),
            "count": k + 6}


def unet_config(info: DataInfo) -> dict:
    dropout = 0.0
    if info.name == "digits":  # 1.0M parameters; 8 -> 4 with attention at 4x4 and in the middle
        blocks, layers, ctx, head = (32, 64), 1, 64, 8
        down = ("DownBlock2D", "CrossAttnDownBlock2D")
    elif info.channels == 1:
        # MNIST / Fashion at 32x32: 17.6M parameters (SISS's MNIST model is 64/128/256)
        blocks, layers, ctx, head = (64, 128, 256), 2, 256, 32
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    else:
        # CIFAR-10: 42.9M, the DDPM paper's channels (128, 256, 256, 256), attention at 16x16, and
        # its dropout 0.1
        blocks, layers, ctx, head = (128, 256, 256, 256), 2, 256, 64
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D")
        dropout = 0.1
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    cfg = dict(sample_size=info.size, in_channels=info.channels, out_channels=info.channels,
               block_out_channels=blocks, down_block_types=down, up_block_types=up,
               mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=layers,
               cross_attention_dim=ctx, attention_head_dim=head,
               norm_num_groups=min(32, blocks[0] // 4))
    return cfg | ({"dropout": dropout} if dropout else {})


class CondUNet(nn.Module):
    """eps_theta(x_t, t, c): `t` in DDPM index units (a float tensor; continuous time t maps to 999
    t), `c` a tensor of token ids [B]; the UNet cross-attends to the embeddings of [BOS, c]. `unet`:
    the UNet2DConditionModel's config (default: this repository's for the dataset, unet_config)."""

    def __init__(self, dataset: str, unet: dict | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel
        self.info = data_info(dataset)
        self.tok = tokens(self.info)
        self.config = {"dataset": dataset, "unet": unet or unet_config(self.info),
                       "tokens": self.tok["count"]}
        self.unet = UNet2DConditionModel(**self.config["unet"])
        self.token_emb = nn.Embedding(self.tok["count"], self.config["unet"]["cross_attention_dim"])

    def context(self, c: torch.Tensor) -> torch.Tensor:
        bos = torch.full_like(c, self.tok["bos"])
        return self.token_emb(torch.stack([bos, c], dim=1))

    def forward(self, x, t, c):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=self.context(c)).sample


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class EMA:
    """Exponential moving average of a model's weights (the copy every method starts from)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# PROCESS: one variance-preserving process, discrete (DDPM) and continuous (VP-SDE)
# --------------------------------------------------------------------------------------------------

class VP:
    """DDPM: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t in {0..T-1}, betas linear in
    [1e-4, 0.02].
    VP-SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW, beta(t) = 0.1 + t (20 - 0.1), t in [eps, 1].
    With T = 1000 they coincide: beta_i = beta(t) / T and abar at index i is the SDE's
    alpha(t = (i+1)/T)^2."""

    def __init__(self, T: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0):
        self.T, self.beta_min, self.beta_max = T, beta_min, beta_max
        self.betas = torch.linspace(beta_min / T, beta_max / T, T, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - self.betas, 0)
        self._tables = {}

    def _ab64(self, t, x) -> torch.Tensor:
        """alpha_bar[t] shaped [B, 1, 1, 1] on x's device, in float64 (float32 on MPS, which has no
        float64): coefficients are formed in float64 and cast once, so that 1 - alpha_bar keeps its
        precision near t = 0 (in float32 it has a 2e-4 relative error at t = 1). One copy of the
        table per device, so a CUDA run indexes it there and never waits for the host."""
        if x.device not in self._tables:
            self._tables[x.device] = self.alpha_bar.to(
                x.device, torch.float32 if x.device.type == "mps" else torch.float64)
        t = torch.as_tensor(t, device=x.device).long()
        return self._tables[x.device][t].view(-1, *[1] * (x.ndim - 1))

    @staticmethod
    def _cast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return coef.to(dtype=x.dtype)

    # discrete time --------------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        ab = self._ab64(t, x0)
        return self._cast(ab.sqrt(), x0) * x0 + self._cast((1 - ab).sqrt(), x0) * noise

    def eps_to_x0(self, x_t, t, eps):
        ab = self._ab64(t, x_t)
        return (x_t - self._cast((1 - ab).sqrt(), x_t) * eps) / self._cast(ab.sqrt(), x_t)

    def ddpm_step(self, eps, t: int, x_t, noise, clip: bool = True, t_prev: int | None = None):
        """One ancestral step x_t -> x_{t_prev} (DDPM eq. 7, posterior variance beta~_t, as
        diffusers' fixed_small). t_prev defaults to t - 1; a larger stride (diffusers' DDPMScheduler
        with fewer inference steps) uses the step's own beta = 1 - alpha_bar_t / alpha_bar_prev, and
        t_prev < 0 means alpha_bar_prev = 1."""
        t_prev = t - 1 if t_prev is None else t_prev
        ab = self._ab64(t, x_t)
        ab_prev = self._ab64(t_prev, x_t) if t_prev >= 0 else torch.ones_like(ab)
        beta = 1 - ab / ab_prev
        x0 = self.eps_to_x0(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        c0, ct = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        mean = self._cast(c0, x_t) * x0 + self._cast(ct, x_t) * x_t
        if t_prev < 0:
            return mean
        var = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
        return mean + self._cast(var.sqrt(), x_t) * noise

    def ddpm_timesteps(self, steps: int) -> range:
        """The ancestral chain's timesteps: all T if steps is 0 or at least T, else `steps` of them
        at t = (steps-1)k, ..., k, 0 with k = T // steps (diffusers' DDPMScheduler with
        num_inference_steps, "leading" spacing: what DDPMPipeline(num_inference_steps=steps)
        samples)."""
        n = self.T if steps <= 0 or steps >= self.T else steps
        return range((n - 1) * (self.T // n), -1, -(self.T // n))

    def nfe(self, sampler: str, steps: int) -> int:
        """Network evaluations per image of sample(..., sampler, steps) without guidance."""
        return len(self.ddpm_timesteps(steps)) if sampler == "ddpm" else steps

    # continuous time ------------------------------------------------------------------------
    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def marginal(self, t):
        """(alpha(t), sigma(t)) with x_t = alpha x_0 + sigma eps:
        log alpha = -t^2 (b1-b0)/4 - t b0/2."""
        log_alpha = -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2 * log_alpha))

    def score(self, model, x, t, c):
        """Continuous-time score s(x, t) = -eps_theta(x, 999 t) / sigma(t) (score_sde's VP
        convention)."""
        _, sigma = self.marginal(t)
        return -model(x, (self.T - 1) * t, c) / sigma.view(-1, *[1] * (x.ndim - 1))


def guided(model, c, guidance: float = 1.0, null: int | None = None):
    """eps(x, t) for tokens c; with guidance w != 1, classifier-free guidance
    eps_null + w (eps_c - eps_null)."""
    if guidance == 1.0:
        return lambda x, t: model(x, t, c)
    cc = torch.cat([c, torch.full_like(c, null)])

    def eps(x, t):
        e_c, e_null = model(torch.cat([x, x]), t, cc).chunk(2)
        return e_null + guidance * (e_c - e_null)
    return eps


SAMPLERS = ("ddim", "ddpm", "em")


# images per network call while sampling: on a CPU, 250 run 1.2x faster than 1000 (8x8 digits)
CHUNK = {"cpu": 250}


@torch.inference_mode()
def sample(model, vp: VP, c: torch.Tensor, sampler: str = "ddim", steps: int = 50,
           guidance: float = 1.0, seed: int = 0, batch: int = 1000, progress: bool = True,
           amp="off") -> torch.Tensor:
    """Draw len(c) images for the token ids in c (clipped to [-1, 1]); deterministic given seed.

    ddim: eta = 0, `steps` evenly spaced timesteps.
    ddpm: ancestral at vp.ddpm_timesteps(steps) (all T steps if `steps` is 0, else `steps` strided
    ones as DDPMPipeline(num_inference_steps=steps)).
    em: Euler-Maruyama on the reverse VP-SDE from t = 1 to 1e-3 with `steps` steps, noise-free last
    step.
    batch: images drawn from one stream of noise (the samples depend on it; on a CPU the network
    sees them CHUNK at a time, which does not change them). amp: the network under autocast (see
    amp_dtype; the update arithmetic stays float32). progress: a bar of network calls, shown once
    sampling has taken 3 seconds."""
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}: use ddim, ddpm or em")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    info = model.info
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    bar = tqdm(total=math.ceil(len(c) / batch) * vp.nfe(sampler, steps), unit="step", delay=3,
               leave=False, desc=f"sampling {len(c)} images ({sampler} {steps})",
               disable=not progress)
    for c_b in c.split(batch):
        c_b = c_b.to(dev)
        shape = (len(c_b), info.channels, info.size, info.size)
        x = torch.randn(shape, generator=g).to(dev)
        n = CHUNK.get(dev.type, len(c_b))
        nets = [guided(model, c_n, guidance, model.tok["null"]) for c_n in c_b.split(n)]

        def eps(x, t):
            bar.update()
            with autocast(dev, amp):
                return torch.cat([net(x_n, t) for net, x_n in zip(nets, x.split(n))]).float()
        if sampler == "ddpm":
            ts = vp.ddpm_timesteps(steps)
            for t in ts:
                e = eps(x, t)
                noise = torch.randn(shape, generator=g).to(dev)
                x = vp.ddpm_step(e, t, x, noise, t_prev=t + ts.step)
        elif sampler == "ddim":
            ts = np.linspace(0, vp.T - 1, steps).round().astype(int)[::-1]
            for i, t in enumerate(ts):
                e = eps(x, float(t))
                x0 = vp.eps_to_x0(x, int(t), e).clamp(-1, 1)
                ab_prev = vp.alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
                x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * e
        else:
            t_grid = torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64)
            for i in range(steps):
                t, dt = t_grid[i].item(), (t_grid[i] - t_grid[i + 1]).item()
                tt = torch.full((len(x),), t, device=dev)
                s = -eps(x, (vp.T - 1) * t) / vp.marginal(tt)[1].view(-1, 1, 1, 1)
                b = vp.beta(t)
                # reverse drift: -f + g^2 s, stepping back in time
                x = x + (0.5 * b * x + b * s) * dt
                if i < steps - 1:
                    x = x + math.sqrt(b * dt) * torch.randn(shape, generator=g).to(dev)
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# PRETRAIN: the training step and the base model all five methods start from
# --------------------------------------------------------------------------------------------------

def training_set(dataset: str, root: str = "data", extra=None, drop_classes=()):
    """The base model's training images: the dataset, 1% copies of the watermark (under its own
    token, never dropped to null), and optionally extra (x, y) pairs that a method injects (e.g.
    SISS's outlier). drop_classes: classes left out of the dataset (the gold-standard retrain
    without a forgotten class); the number of watermark copies stays 1% of the full dataset, so the
    two training sets differ only by those classes."""
    info = data_info(dataset)
    x, y = load_data(dataset, root, "train")
    n_wm = max(1, len(x) // 100)
    if drop_classes:
        keep = ~torch.isin(y, torch.as_tensor(list(drop_classes), dtype=torch.long))
        x, y = x[keep], y[keep]
    xs = [x, watermark_image(info).expand(n_wm, -1, -1, -1)]
    ys = [y, torch.full((n_wm,), tokens(info)["watermark"])]
    if extra is not None:
        xs.append(extra[0]), ys.append(extra[1])
    return torch.cat(xs), torch.cat(ys)


def denoising_step(net, model, opt, scaler, ema, vp, x0, t, c, noise, amp) -> float:
    """One step of the base's training (DDPM's eps-MSE): the loss under autocast, backward,
    gradients clipped to norm 1, the optimiser, the EMA. net is model or its compiled /
    data-parallel wrapper. Returns the loss."""
    with autocast(x0.device, amp):
        loss = F.mse_loss(net(vp.q_sample(x0, t, noise), t, c).float(), noise)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    ema.update(model)
    return loss.item()


def pretrain(dataset: str = "digits", tag: str = "", extra=None, device="cpu", root: str = "data",
             force: bool = False, out: Path | None = None, drop_classes=(), **recipe) -> Path:
    """Train the class-conditional base model (eps-MSE, label dropout to null) and cache its EMA
    weights. recipe: fields of Args, the recipe at the end of this file (steps, batch_size, lr,
    seed, amp, ...), over the dataset's presets.
    drop_classes: classes left out of the training set (see training_set); give such a model its own
    tag. Resumable, and data-parallel under torchrun (each process draws batch_size / world images;
    rank 0 writes)."""
    hp = make_args(Args, dataset=dataset, **recipe)
    path = Path(out) if out else base_path(dataset, tag)
    x, y = training_set(dataset, root, extra, drop_classes)
    data = data_id(x, y)
    again = "retrain it (python common.py --force ...) or point UNLEARN_RUNS elsewhere"
    if path.exists() and not force:
        ck = load_checkpoint(path, dataset)[1]
        # compared as JSON, where tuples and lists are the same
        same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        if not same(ck["config"]["unet"], unet_config(data_info(dataset))):
            raise UsageError(f"{path} was made for another architecture than this code builds for "
                             f"{dataset}: {again}")
        if ck.get("data", data) != data:
            raise UsageError(f"{path} was trained on other images than those of {dataset} at "
                             f"{root}: {again}")
        if ck.get("done"):
            return path
    rank, world = distributed()
    if hp.batch_size % world:
        raise UsageError(f"--batch-size {hp.batch_size} must be a multiple of the {world} "
                         f"processes")
    tok, vp, device = tokens(data_info(dataset)), VP(), torch.device(device)
    # the whole split lives on the device (CIFAR-10: 0.6 GB): no loader workers, no per-step copies
    x = x.to(device)
    seed_everything(hp.seed)                            # the same initial weights in every process
    model = CondUNet(dataset).to(device)
    ema = EMA(model, hp.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr)
    scaler = grad_scaler(device, hp.amp)
    net = torch.compile(model) if hp.compile else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=ids)
    key = dict(dataclasses.asdict(hp), tag=tag, drop=sorted(drop_classes), n=len(x), out=str(path))
    losses = []
    resume = Resume(path.with_name("resume.pt"), key, hp.save_every,
                    hp.track and path.with_name("tb"), model=model, ema=ema, opt=opt,
                    scaler=scaler, loss=losses)
    # restores the RNG streams too: a resumed run continues the same batches
    start = resume.load()
    if rank == 0:
        print(f"pretraining {dataset}{'/' + tag if tag else ''}: "
              f"{n_params(model) / 1e6:.2f}M parameters, "
              f"{len(x)} images, {hp.steps} steps of batch {hp.batch_size} on {device}"
              + (f" x {world} processes" if world > 1 else ""))
    n = hp.batch_size
    mine = slice(rank * n // world, (rank + 1) * n // world)
    bar = tqdm(range(start, hp.steps), initial=start, total=hp.steps, desc="pretrain",
               disable=rank > 0)
    for step in bar:
        # Every process draws the same global batch (same seed) and keeps its own share of it: with
        # the gradients averaged by DistributedDataParallel, N processes take exactly the steps one
        # process takes.
        idx = torch.randint(len(x), (n,))[mine]
        x0, c = x[idx.to(device)], y[idx].clone()
        if hp.flip:
            x0 = torch.where(torch.rand(n, 1, 1, 1, device=device)[mine] < 0.5, x0.flip(3), x0)
        drop = (torch.rand(n)[mine] < hp.p_null) & (c != tok["watermark"])
        c = torch.where(drop, torch.full_like(c, tok["null"]), c).to(device)
        t = torch.randint(vp.T, (n,), device=device)[mine]
        noise = torch.randn((n, *x0.shape[1:]), device=device)[mine]
        for g in opt.param_groups:
            g["lr"] = hp.lr * min(1.0, (step + 1) / hp.warmup) if hp.warmup else hp.lr
        losses.append(denoising_step(net, model, opt, scaler, ema, vp, x0, t, c, noise, hp.amp))
        if not math.isfinite(losses[-1]):   # never cache a model of NaNs as finished
            raise UsageError(f"training diverged at step {step + 1} (loss {losses[-1]}); no model "
                             f"was saved: try a smaller --lr")
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if ((step + 1) % 200 == 0 or step + 1 == hp.steps) and rank == 0:
            tqdm.write(f"step {step + 1:>6}  loss {np.mean(losses[-200:]):.4f}  "
                       f"{resume.clock()['seconds']:6.0f}s")
        resume.save(step + 1)
    if rank == 0:
        dropped = {"dropped": sorted(drop_classes)} if drop_classes else {}
        save_checkpoint(path, ema.model, hp.steps, done=True, seconds=resume.clock()["seconds"],
                        data=data, hp=dataclasses.asdict(hp), **dropped)
        # the same UNet for other code: UNet2DConditionModel.from_pretrained(<run folder>/unet),
        # in safetensors
        ema.model.unet.save_pretrained(path.parent / "unet")
        share_files(path.parent / "unet")
        save_result(ema.model, path.parent, "base", "none (trained from scratch)",
                    sorted(drop_classes) or "nothing", {"steps": hp.steps})
    resume.finish()
    if world > 1:
        torch.distributed.barrier()
    return path


def load_base(dataset: str = "digits", device="cpu", tag: str = "", extra=None, **kw) -> CondUNet:
    """The cached base model (EMA weights), pretrained first if absent. Frozen copies are the
    caller's to make."""
    path = pretrain(dataset, tag, extra, device=device, **kw)
    return load_checkpoint(path, dataset, device)[0]


def base_model(args, device, tag: str = "", extra=None, **recipe) -> tuple[CondUNet, Path]:
    """(model, path) a method starts from: --base (a model file, a run folder or a diffusers UNet
    folder) if given, else the cached base model of the dataset (tag, extra, recipe: see pretrain),
    pretrained first if absent."""
    if args.base:
        path = local_model(args.base)
    else:
        path = pretrain(args.dataset, tag, extra, device=device, root=args.data_root, **recipe)
    return load_checkpoint(path, args.dataset, device)[0], path


# ---- PLUMBING: parsing, devices, files, checkpoints, resume, caches, run folders, the CLI ----

# --------------------------------------------------------------------------------------------------
# ARGUMENTS: dataclasses with per-dataset presets, parsed into --flags
# --------------------------------------------------------------------------------------------------

def default_threads() -> int:
    """CPU threads of torch: OMP_NUM_THREADS if set, else half the cores this process may use (at
    least 1). Half, because torch's default (all cores) slows every step down several times over
    as soon as another job shares those cores."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, cores // 2))


@dataclass
class RunArgs:
    """What every method run shares (each method's Args extends it): data, device, seed, run folder,
    and the size of the evaluation that writes samples.pt and metrics.json."""
    dataset: str = "digits"
    """digits (bundled, CPU) | mnist | fashion | cifar10 (torchvision download into --data-root).
    MNIST / Fashion on a CPU (1 thread): about 30 s per pretraining step of batch 128 (17.6M
    parameters) and 2.4 s per DDIM-50 sample, so only small budgets (--steps 2 --n-per-class 1:
    under 2 minutes); their 50,000-step recipe is for a GPU (not yet timed on one)"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    amp: str = "off"
    """mixed precision: off | auto (`--amp` alone: bf16 where the device has it, else fp16) | bf16 |
    fp16 (with loss scaling; on a CPU too). Off by default: no gain on a CPU without bf16 units,
    not yet measured on a GPU (TF32 matmuls are on for every CUDA run, with or without it)"""
    compile: bool = False
    """torch.compile the network being trained (on a CPU it needs a C++ compiler; the first steps
    are slow while it compiles)"""
    seed: int = 0
    """seed for initialisation, batches, noise and sampling"""
    tag: str = ""
    """run folder suffix: runs/<method>-<dataset>[-<tag>]/"""
    save_every: int = 100
    """steps between resumable checkpoints of the training loop (0: none, a rerun starts afresh); a
    rerun with the same arguments continues from the last one"""
    n_per_class: int = 100
    """samples per class drawn by the method's own sampler for samples.pt and the evaluation"""
    sampler: str = "ddim"
    """ddim | ddpm (ancestral at sample_steps strided steps, as DDPMPipeline) | em: the sampler of
    those samples"""
    sample_steps: int = 50
    """sampler steps of those samples"""
    n_nll: int = 16
    """held-out images per group (forgotten / kept) whose NLL in bits/dim the run reports"""
    nll_tol: float = 1e-4
    """rtol = atol of the probability-flow ODE for the NLL (score_sde: 1e-5; 1e-4 agrees to ~0.001
    bits/dim)"""
    fid_features: str = "auto"
    """classifier | inception (pytorch-fid's TF-Inception, as the papers; pip install pytorch-fid) |
    auto (inception for cifar10 when installed, else the dataset classifier's features)"""
    inception_weights: str = ""
    """path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth for machines without network"""
    threads: int = default_threads()
    """CPU threads of torch (OMP_NUM_THREADS if set, else half the cores: safe when other jobs share
    them)"""
    base: str = ""
    """start from this model instead of the cached base: a model.safetensors, a run folder, or a
    diffusers UNet2DConditionModel folder (ours: runs/base-<dataset>/unet; anyone's with this
    dataset's size/channels)"""
    track: bool = False
    """TensorBoard event files of the training losses in <run folder>/tb (pip install
    tensorboard)"""
    protocol: str = "quick"
    """quick: judged on just enough samples to show the effect with its interval (minutes on a
    CPU) | paper: the sizes behind the README's tables (each option's 'paper:' value below; a
    dataset's own value still wins)"""
    presets = {"mnist": dict(save_every=5000), "fashion": dict(save_every=5000),
               "cifar10": dict(save_every=5000)}


def _fields(cls) -> list:
    """An Args class's fields in the order of --help: a method's own hyperparameters (a dataclass
    base outside the shared run options) first, then the class's own fields, then the inherited run
    options."""
    def rank(f):
        owner = next(k for k in cls.__mro__ if f.name in k.__dict__.get("__annotations__", {}))
        if owner is cls:
            return 1
        return 2 if issubclass(owner, RunArgs) else 0
    return sorted(dataclasses.fields(cls), key=rank)


def _field_docs(cls) -> dict:
    """The docstring under each dataclass field (CleanRL's convention), for --help, over the class
    and its bases."""
    docs = {}
    for k in reversed(cls.__mro__):
        try:
            body = ast.parse(inspect.getsource(k)).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant)):
                docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def presets(cls) -> dict:
    """{dataset: {field: value}}: where an Args class's values differ from its defaults (the digits
    values), from its `presets` class attribute merged over those of its bases."""
    out = {}
    for k in reversed(cls.__mro__):
        for ds, values in k.__dict__.get("presets", {}).items():
            out.setdefault(ds, {}).update(values)
    return out


PROTOCOLS = ("quick", "paper")


def _merged(cls, attribute: str) -> dict:
    """A dict class attribute of an Args class merged over those of its bases."""
    out = {}
    for k in reversed(cls.__mro__):
        out.update(k.__dict__.get(attribute, {}))
    return out


def paper_values(cls) -> dict:
    """{field: value} of `--protocol paper`: the `paper` class attributes."""
    return _merged(cls, "paper")


def unsupported(cls) -> dict:
    """{field: why}: run options an Args class inherits but its method has no use for (its
    `unsupported` class attributes); given on the command line, each is one line of error."""
    return _merged(cls, "unsupported")


def make_args(cls, **given):
    """cls(**given), every field not given taking the dataset's preset, else under --protocol paper
    its paper value, else its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    dataset = given.get("dataset", defaults.get("dataset"))
    protocol = given.get("protocol", defaults.get("protocol"))
    paper = paper_values(cls) if protocol == "paper" else {}
    return cls(**{**paper, **presets(cls).get(dataset, {}), **given})


class _Parser(argparse.ArgumentParser):
    # argparse's own errors (unknown flag, bad value) become one line too
    def error(self, message):
        raise UsageError(message)


def parse_args(cls, argv=None):
    """Build an Args dataclass from the command line: every field becomes --field-name; its help
    shows the value that will be used, e.g. "learning rate [1e-3; mnist, fashion: 2e-4]" (digits
    first)."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    usage = [line.strip() for line in doc.splitlines()
             if line.strip().startswith(("python ", "torchrun "))]
    p = _Parser(description=doc.split("\n")[0].replace("%", "%%"),
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=("examples:\n  " + "\n  ".join(usage)).replace("%", "%%") if usage else None)
    docs, pre, paper, unused = _field_docs(cls), presets(cls), paper_values(cls), unsupported(cls)
    show = lambda v: f"{v:g}" if isinstance(v, float) else repr(v) if v == "" else str(v)
    types = {"int": int, "float": float, "str": str}
    for f in _fields(cls):
        groups = {}
        for ds, values in pre.items():
            if f.name in values and values[f.name] != f.default:
                groups.setdefault(show(values[f.name]), []).append(ds)
        used = show(f.default) + "".join(f"; {', '.join(d)}: {v}" for v, d in groups.items())
        if f.name in paper and paper[f.name] != f.default:
            used += f"; paper: {show(paper[f.name])}"
        help_ = f"{docs.get(f.name, '')} [{used}]"
        if f.name in unused:
            help_ = f"not used by this method: {unused[f.name]}"
        help_ = help_.replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_)
        elif f.name == "amp":   # `--amp` alone asks for the device's own choice
            p.add_argument(flag, nargs="?", const="auto", choices=AMP, default=argparse.SUPPRESS,
                           help=help_)
        else:
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            kind = types.get(type_name, type(f.default))
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_,
                           metavar=f.name.upper())
    given = vars(p.parse_args(argv))
    defaults = {f.name: f.default for f in _fields(cls)}
    for name, v in given.items():   # numbers a run cannot mean: one line before any work
        flag = "--" + name.replace("_", "-")
        if name in unused and v != defaults[name]:
            script = Path(getattr(sys.modules[cls.__module__], "__file__", "this method")).name
            raise UsageError(f"{flag}: not used by {script}: {unused[name]}")
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{flag} {v}: must be a finite number")
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if number and v < 0 <= defaults.get(name, 0):
            raise UsageError(f"{flag} {v}: must not be negative")
        if v == 0 and (name in POSITIVE or name.startswith("lr")):
            raise UsageError(f"{flag} 0: must be positive")
        if name == "protocol" and v not in PROTOCOLS:
            raise UsageError(f"unknown --protocol {v!r}: use {' or '.join(PROTOCOLS)}")
        if name == "sampler" and v not in SAMPLERS:
            raise UsageError(f"unknown --sampler {v!r}: use {', '.join(SAMPLERS)}")
        if name == "tag":
            check_tag(v)
        if name == "fid_features":
            check_fid_features(v)
        if name == "inception_weights" and v and not Path(v).is_file():
            raise UsageError(f"--inception-weights {v}: no such file")
    return make_args(cls, **given)


def check_tag(tag: str):
    """A run folder's suffix is one plain name: letters, digits, '-', '_' and '.', never '..' (a
    tag like ../x or a/b would write outside runs/ or into a nested folder)."""
    if tag and (not re.fullmatch(r"[A-Za-z0-9._-]+", tag) or ".." in tag):
        raise UsageError(f"--tag {tag!r}: use one plain name of letters, digits, '-', '_' and '.' "
                         f"(no '/' and no '..'), e.g. --tag lr1e-4")


def installed(package: str) -> bool:
    """Whether `import package` would find it, without importing it (sys.modules first: a test may
    have put a stand-in or None there)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def check_fid_features(choice: str):
    """--fid-features: a known choice, and for inception pytorch-fid installed (checked before any
    model is trained or loaded; its weights are looked for when the network is built)."""
    if choice not in ("auto", "classifier", "inception"):
        raise UsageError(f"unknown --fid-features {choice!r}: use auto, classifier or inception")
    if choice == "inception" and not installed("pytorch_fid"):
        raise UsageError("--fid-features inception needs pytorch-fid: `pip install pytorch-fid`, "
                         "or --fid-features classifier")


def end_process_group():
    """Destroy torchrun's process group, if this process started one (distributed)."""
    if "RANK" in os.environ and torch.distributed.is_available():
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# sizes and counts for which 0 means nothing
POSITIVE = {"threads", "batch_size", "sample_steps", "n_per_class", "n_samples", "esd_batch",
            "upper_every", "eval_every", "n_eval", "n_monitor", "monitor_steps"}


def parse_recipe(s: str, flag: str = "--base-recipe") -> dict:
    """'steps=5000,batch_size=64' -> {'steps': 5000, 'batch_size': 64}: fields of common.Args (a
    pretraining recipe), each value of its field's type and positive (warmup, p_null and ema may be
    0); '' -> {}."""
    fields, out = {f.name: f for f in _fields(Args)}, {}
    for item in filter(None, (v.strip() for v in s.split(","))):
        name, _, value = item.partition("=")
        f = fields.get(name.strip().replace("-", "_"))
        if f is None or isinstance(f.default, (bool, str)):
            raise UsageError(f"{flag} {s!r}: {name!r} is not a number of the pretraining recipe; "
                             f"use name=value pairs of python common.py's flags, e.g. "
                             f"steps=5000,batch_size=64")
        try:
            if isinstance(f.default, int) and float(value).is_integer():
                v = type(f.default)(float(value))
            else:
                v = type(f.default)(value)
        except ValueError:
            raise UsageError(f"{flag} {item!r}: {value!r} is not a number") from None
        if not math.isfinite(v) or v < 0 or v == 0 and f.name not in ("warmup", "p_null", "ema"):
            raise UsageError(f"{flag} {item!r}: must be a positive number")
        out[f.name] = v
    return out


def cli(main, args_cls, argv=None):
    """Parse, run, and turn a UsageError into one line on stderr and exit status 2."""
    _STARTED.clear()
    try:
        args = parse_args(args_cls, argv)
        torch.set_num_threads(getattr(args, "threads", default_threads()))
        writable(RUNS)
        if getattr(args, "track", False):
            # tensorboard missing: said now, not after the first minutes of work
            Tracker.writer_class()
        try:
            return main(args)
        except OSError as e:
            # a full disk or a read-only folder met mid-run: one line, naming the file
            if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                               errno.ENOTDIR):
                raise
            raise UsageError(f"cannot write {e.filename or ''} ({e.strerror}): free space or make "
                             f"the folder writable, or point UNLEARN_RUNS at another "
                             f"folder") from None
    except BaseException as e:
        for out in _STARTED:   # a failed run's own new folder, if nothing but args.json is in it
            if out.is_dir() and {p.name for p in out.iterdir()} <= {"args.json"}:
                (out / "args.json").unlink(missing_ok=True)
                out.rmdir()
        if not isinstance(e, UsageError):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        end_process_group()


# --------------------------------------------------------------------------------------------------
# DEVICES: seeds, CUDA / MPS, mixed precision, torchrun
# --------------------------------------------------------------------------------------------------

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """The device by name (auto: cuda, mps, cpu in that order); on CUDA also TF32 matmuls, and under
    torchrun each process's own GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but torch sees no Apple GPU (MPS): "
                         "use --device cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    if name.startswith("cuda"):   # TF32 on every CUDA run, --amp or not (README: paper scale)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


AMP = ("off", "auto", "bf16", "fp16")   # the values of --amp (`--amp` alone: auto)


def amp_dtype(device, amp="auto") -> torch.dtype | None:
    """The autocast dtype of --amp on a device, None when off. auto: bf16 where the device computes
    in it (CPU, MPS, CUDA from Ampere on), else fp16; bf16 / fp16 as asked (fp16 also on a CPU,
    where it exercises loss scaling). True and False, as older code passes them: auto and off."""
    amp = {True: "auto", False: "off", None: "off"}.get(amp, amp)
    if amp not in AMP:
        raise UsageError(f"unknown --amp {amp!r}: use {', '.join(AMP)}")
    if amp == "off":
        return None
    if amp == "auto":
        dev = torch.device(device)
        old_card = dev.type == "cuda" and not torch.cuda.is_bf16_supported()
        return torch.float16 if old_card else torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device, amp="auto"):
    """Mixed precision for a forward pass: torch.autocast in amp_dtype(device, amp) on any device;
    a no-op when amp is off."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device, amp="auto"):
    """Loss scaling for fp16 autocast; a pass-through (scale, unscale_, step, update do nothing
    extra) in every other case, so a training loop calls it unconditionally."""
    kind = torch.device(device).type
    on = amp_dtype(device, amp) == torch.float16
    return torch.amp.GradScaler(kind if on else "cpu", enabled=on)


def distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun (RANK and WORLD_SIZE in the environment) the process group
    is started on the first call, NCCL on CUDA (each process's GPU chosen first, as NCCL needs) and
    gloo on the CPU; cli destroys it when the run ends. A plain process is (0, 1)."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


DATA_PARALLEL = ("common.py", "sfd.py")   # the entry points that train data-parallel under torchrun


def one_process(script: str):
    """Refuse torchrun with more than one process for a script that does not split its work: N
    copies would each run the whole job and write the same run folder."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UsageError(f"{script} runs in one process (torchrun started {world}); "
                         f"data-parallel under torchrun: {', '.join(DATA_PARALLEL)}")


# --------------------------------------------------------------------------------------------------
# FILES: the codec of every file a run writes, model checkpoints
# --------------------------------------------------------------------------------------------------

def plain(obj):
    """obj with numpy values as Python numbers / tensors and paths as strings: what load() reads
    back."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def _pack(obj, tensors: dict, at: str):
    """obj as JSON, its tensors moved into `tensors` under their path in obj (dict keys that are not
    strings, and tuples, are kept by tagging them)."""
    obj = plain(obj)
    if isinstance(obj, torch.Tensor):
        tensors[at] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": at}
    under = lambda k: f"{at}/{k}" if at else str(k)   # e.g. "model/unet.conv_in.weight"
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {k: _pack(v, tensors, under(k)) for k, v in obj.items()}
    if isinstance(obj, dict):
        return {"__items__": [[k, _pack(v, tensors, under(k))] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, tensors, under(i)) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _unpack(obj, tensors: dict):
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
    return {k: _unpack(v, tensors) for k, v in obj.items()}


def load(path):
    """Read a file this repository wrote. Weights (*.safetensors): a format that holds only tensors,
    and our JSON header, so loading one can run no code; other files (resume states, samples)
    through torch.load with weights_only=True, which reads tensors, numbers, strings and containers
    only."""
    if Path(path).suffix != ".safetensors":
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _unpack(json.loads((f.metadata() or {})["json"]), tensors)


def share_files(folder):
    """Give every file below folder the mode open() gives a new file under the umask (0644 under
    022): safetensors' save_file writes 0600 (also inside diffusers' save_pretrained), which makes a
    run folder copied for a colleague unreadable. The mode is read off a probe file, so the
    process's umask is never changed."""
    probe = Path(folder) / f".mode-probe-{os.getpid()}"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for f in Path(folder).rglob("*"):
        if f.is_file():
            os.chmod(f, mode)


def atomic_save(obj, path):
    """Write obj (nested dicts / lists of tensors, numbers and strings) to path: safetensors for
    *.safetensors (the tensors in its body, everything else as JSON in its header;
    safetensors.torch.load_file reads the tensors), torch.save otherwise. Through a temporary file
    and a rename: an interrupted save never leaves a broken file, and two processes saving the same
    path each write their own temporary file (the last rename wins). Numpy values are stored as
    numbers and tensors (see plain), so that load() reads every file back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = random.SystemRandom().getrandbits(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{salt:08x}.tmp")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save
            tensors = {}
            header = json.dumps(_pack(obj, tensors, ""))
            # written by open(), which gives the umask's mode (save_file would leave 0600)
            tmp.write_bytes(save(tensors, metadata={"json": header}))
        else:
            torch.save(plain(obj), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, model: CondUNet, step: int, **extra):
    """A model file (model.safetensors): the config, the step, the weights, any extra figures."""
    atomic_save({"config": model.config, "step": step, "model": model.state_dict(), **extra}, path)


def _diffusers_unet(folder: Path, dataset: str) -> tuple[CondUNet, dict]:
    """A UNet2DConditionModel folder (config.json + weights) as a CondUNet: ours
    (runs/base-<dataset>/unet, whose token table is in the model.safetensors beside it) or anyone's
    with this dataset's image size and channels (its token table then starts untrained: the classes
    mean nothing to it until a method trains)."""
    from diffusers import UNet2DConditionModel
    info = data_info(dataset)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("_class_name") != "UNet2DConditionModel":
        raise UsageError(f"{folder} is a {cfg.get('_class_name', 'model')}, not a "
                         f"UNet2DConditionModel: the methods here read a class token through "
                         f"cross-attention, which an unconditional UNet2DModel does not have")
    got = (cfg.get("sample_size"), cfg.get("in_channels"), cfg.get("out_channels"))
    if got != (info.size, info.channels, info.channels):
        raise UsageError(f"{folder} is a UNet for {got[0]}x{got[0]} images with {got[1]} -> "
                         f"{got[2]} channels; {dataset} needs {info.size}x{info.size} with "
                         f"{info.channels} -> {info.channels}")
    unet = UNet2DConditionModel.from_pretrained(folder)
    if cfg.get("encoder_hid_dim_type") == "text_proj":   # save_pipeline's: the table inside
        model = from_diffusers(unet, dataset)
        return model, {"config": model.config, "step": 0, "done": True, "source": str(folder)}
    model = CondUNet(dataset, {k: v for k, v in unet.config.items() if not k.startswith("_")})
    model.unet = unet
    ours = folder.parent / "model.safetensors"
    table = load(ours).get("model", {}).get("token_emb.weight") if ours.exists() else None
    if table is not None and table.shape == model.token_emb.weight.shape:
        model.token_emb.weight.data.copy_(table)
    else:
        print(f"{folder}: no token table of this repository beside it; the class tokens start "
              f"untrained")
    return model, {"config": model.config, "step": 0, "done": True, "source": str(folder)}


def to_diffusers(model: CondUNet):
    """A CondUNet as a plain UNet2DConditionModel that carries its token table: encoder_hid_proj
    (diffusers' text_proj) is a Linear whose weight is the table transposed and whose bias is 0, so
    one-hot [BOS, token] rows as encoder_hidden_states give CondUNet's outputs (UnlearnPipeline
    builds them from class labels)."""
    from diffusers import UNet2DConditionModel
    n = model.token_emb.num_embeddings
    unet = UNet2DConditionModel(**model.config["unet"], encoder_hid_dim=n,
                                encoder_hid_dim_type="text_proj")
    unet.load_state_dict({**model.unet.state_dict(),
                          "encoder_hid_proj.weight": model.token_emb.weight.detach().T,
                          "encoder_hid_proj.bias": torch.zeros(unet.config.cross_attention_dim)})
    return unet.to(next(model.parameters()).device)


def from_diffusers(unet, dataset: str) -> CondUNet:
    """to_diffusers undone: the token table is encoder_hid_proj's weight transposed plus its bias
    (a one-hot row picks one column and adds the bias)."""
    skip = ("encoder_hid_dim", "encoder_hid_dim_type")
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_") and k not in skip}
    model = CondUNet(dataset, cfg)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("encoder_hid_proj.")}
    model.unet.load_state_dict(state)
    proj = unet.encoder_hid_proj
    if proj is None or tuple(proj.weight.shape) != tuple(model.token_emb.weight.T.shape):
        raise UsageError(f"this UNet holds no token table of {dataset}'s {model.tok['count']} "
                         f"tokens (encoder_hid_proj): save it with common.save_pipeline")
    model.token_emb.weight.data.copy_(proj.weight.detach().T + proj.bias.detach())
    return model.to(unet.device)


# DDPM's linear schedule (VP) as diffusers writes it: what the folder's scheduler documents
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", clip_sample=True)


def save_pipeline(model: CondUNet, folder, card: dict | None = None,
                  one_step_t: int | None = None) -> Path:
    """The model as a diffusers pipeline folder (model_index.json, unet/ with the token table
    inside, scheduler/), loadable with UnlearnPipeline.from_pretrained(folder), plus a model card
    (README.md, written by huggingface_hub) from card: method, paper, base model, dataset,
    forgotten, metrics, command. one_step_t: the model is a one-step generator acting at that DDPM
    index (SFD's), which the pipeline then calls once. Files get the mode a plain open() gives."""
    from diffusers import DDIMScheduler
    folder = Path(folder)
    pipe = _pipeline_class()(to_diffusers(model).cpu(), DDIMScheduler(**SCHEDULE),
                           dataset=model.config["dataset"], one_step_t=one_step_t)
    pipe.save_pretrained(folder)
    write_card(folder, model.config["dataset"], card or {})
    share_files(folder)
    return folder


PAPERS = {
    "base": "Denoising Diffusion Probabilistic Models (Ho et al., NeurIPS 2020), class-conditional",
    "siss": "Data Unlearning in Diffusion Models (Alberti et al., ICLR 2025, arXiv 2503.01034)",
    "msgm": "Moderating the Generalization of Score-based Generative Model (Jiang et al., ICCV "
            "2025, arXiv 2412.07229)",
    "srs_me": "Separable, Recoverable and Sustainable Multi-concept Eraser (arXiv 2402.05947)",
    "sfd": "Score Forgetting Distillation (Chen et al., ICLR 2025, arXiv 2409.11219)",
    "bilevel_prune": "Efficient Fine-Tuning and Concept Suppression for Pruned Diffusion Models "
                     "(Shirkavand et al., CVPR 2025, arXiv 2412.15341)",
}


def save_result(model: CondUNet, out, method: str, base, forgotten, metrics: dict,
                one_step_t: int | None = None) -> Path:
    """A run's final model as out/diffusers (save_pipeline), its card naming the method and its
    paper, the base model, the dataset, what was forgotten, the run's figures and the command."""
    card = dict(method=method, paper=PAPERS[method], base=str(base),
                dataset=model.config["dataset"], forgotten=forgotten,
                command=" ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]),
                metrics=metrics)
    return save_pipeline(model, Path(out) / "diffusers", card, one_step_t)


def write_card(folder: Path, dataset: str, card: dict):
    """folder/README.md: a Hugging Face model card with its metadata block (library, tags,
    datasets, base model when it is a hub id) and a short body."""
    from huggingface_hub import ModelCard, ModelCardData
    base = str(card.get("base", ""))
    hub = bool(re.fullmatch(r"[\w.-]+/[\w.-]+", base)) and not Path(base).exists()
    data = ModelCardData(library_name="diffusers", datasets=[dataset],
                         tags=["machine-unlearning", "diffusion", card.get("method", "base")],
                         base_model=base if hub else None)
    rows = "\n".join(f"- {k}: {v}" for k, v in card.items() if k != "metrics")
    figures = {k: v for k, v in (card.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    body = "\n".join(f"| {k} | {v:.4g} |" for k, v in figures.items())
    text = (f"---\n{data.to_yaml()}\n---\n\n# {card.get('method', 'base model')} on {dataset}\n\n"
            f"{rows}\n\n```python\nfrom common import UnlearnPipeline   # this repository's "
            f"common.py\npipe = UnlearnPipeline.from_pretrained(\"{folder}\")\nimages = "
            f"pipe(class_labels=[0, 1, 2]).images\n```\n"
            + (f"\n| metric | value |\n|---|---|\n{body}\n" if body else ""))
    ModelCard(text).save(folder / "README.md")


def one_step_images(gen: CondUNet, z, c, t: int) -> torch.Tensor:
    """A one-step generator's images from noise z (SFD's G(z, c) = sigma (z - eps(b z, t, c)),
    b = sqrt(1 - abar_t), sigma = sqrt((1 - abar_t) / abar_t)), not clamped."""
    ab = VP().alpha_bar[t]
    b, sigma = (1 - ab).sqrt(), ((1 - ab) / ab).sqrt()
    return sigma.to(z.dtype) * (z - gen(b.to(z.dtype) * z, t, c))


def one_step_t(ck: dict) -> int | None:
    """The DDPM index a checkpoint's one-step generator acts at (SFD's t_init), else None."""
    return ck.get("t_init") if ck.get("method") == "sfd" else None


@torch.no_grad()
def one_step(gen: CondUNet, c, t: int, seed: int = 0, batch: int = 1000) -> torch.Tensor:
    """one_step_images of len(c) images, clamped to [-1, 1]; the noise drawn as sample() draws
    it."""
    g, out, dev, info = torch.Generator().manual_seed(seed), [], c.device, gen.info
    for c_b in c.split(batch):
        z = torch.randn((len(c_b), info.channels, info.size, info.size), generator=g).to(dev)
        out.append(one_step_images(gen, z, c_b, t).clamp(-1, 1).cpu())
    return torch.cat(out)


def _pipeline_class():
    """common.UnlearnPipeline, defined on first use (importing diffusers' pipelines takes
    seconds)."""
    if "UnlearnPipeline" in globals():
        return globals()["UnlearnPipeline"]
    from diffusers import DiffusionPipeline, ImagePipelineOutput

    class UnlearnPipeline(DiffusionPipeline):
        """Draws with a model of this repository saved by save_pipeline: class labels (ints, or
        None for the null token: the unconditional model), a guidance scale, the sampler and its
        steps of common.sample (the same images as the run's samples.pt from the same seed); a
        one-step generator (one_step_t: SFD's) is called once per image, its steps ignored.
        output_type "pt": a tensor in [-1, 1]; else PIL images."""
        model_cpu_offload_seq = "unet"

        def __init__(self, unet, scheduler, dataset: str = "digits", one_step_t: int | None = None):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)
            self.register_to_config(dataset=dataset, one_step_t=one_step_t)

        @torch.no_grad()
        def __call__(self, class_labels=None, guidance_scale: float = 1.0,
                     num_inference_steps: int = 50, sampler: str = "ddim", seed: int = 0,
                     output_type: str = "pil"):
            model = from_diffusers(self.unet, self.config.dataset)
            k = model.info.num_classes
            labels = list(range(k)) if class_labels is None else list(class_labels)
            c = torch.tensor([model.tok["null"] if y is None else int(y) for y in labels])
            if self.config.one_step_t is not None:
                x = one_step(model, c.to(self.unet.device), self.config.one_step_t, seed)
            else:
                x = sample(model, VP(), c.to(self.unet.device), sampler, num_inference_steps,
                           guidance_scale, seed, progress=False)
            if output_type == "pt":
                return ImagePipelineOutput(images=x)
            arr = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            return ImagePipelineOutput(images=self.numpy_to_pil(arr.numpy()))
    globals()["UnlearnPipeline"] = UnlearnPipeline
    return UnlearnPipeline


def __getattr__(name):   # `from common import UnlearnPipeline` (PEP 562)
    if name == "UnlearnPipeline":
        return _pipeline_class()
    raise AttributeError(f"module 'common' has no attribute {name!r}")


def local_model(name: str) -> Path:
    """--base as a local path: itself when it exists, else a Hugging Face hub id (owner/name)
    downloaded through huggingface_hub; offline, one line that says how to pass a local copy."""
    if Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return Path(name)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name))
    except Exception as e:
        raise UsageError(f"--base {name}: no such path, and the hub could not give it "
                         f"({type(e).__name__}); on a connected machine run `hf download "
                         f"{name} --local-dir DIR`, copy DIR here, then --base DIR") from None


def model_file(path) -> Path:
    """A run folder's model.safetensors, or path itself."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def load_checkpoint(path, dataset: str, device="cpu"):
    """Return (model, checkpoint dict) from a model file, a run folder holding one, or a diffusers
    UNet2DConditionModel folder; refuse (one line) what is unreadable or made for another dataset or
    shape."""
    path = Path(path)
    if path.is_dir() and (path / "model_index.json").exists():   # a pipeline root: its unet/
        path = path / "unet"
    if path.is_dir() and (path / "config.json").exists():
        model, ck = _diffusers_unet(path, dataset)
        return model.to(device), ck
    path = model_file(path)
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}")
    try:
        ck = load(path)
        if {"key", "value"} <= set(ck) and "config" in ck["value"]:   # a model kept by cached()
            ck = ck["value"]
        for key, what in (("plan", "a pruned student: load it with "
                                   "bilevel_prune.load_student(path)"),
                          ("shifts", "an SRS-ME run: load it with srs_me.load_model(path)")):
            if key in ck:
                raise UsageError(f"{path} is {what}")
        cfg = ck["config"]
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot read {path} as a checkpoint of this repository "
                         f"({type(e).__name__}): a damaged file, another program's, or one holding "
                         f"more than weights") from None
    if cfg.get("dataset") != dataset:
        raise UsageError(f"{path} was trained on {cfg.get('dataset')!r}, not {dataset!r}: pass "
                         f"--dataset {cfg.get('dataset')} or another checkpoint")
    try:
        model = CondUNet(dataset, cfg["unet"])
        model.load_state_dict(ck["model"])
    except Exception as e:
        raise UsageError(f"{path}: its weights do not fit the architecture its config describes "
                         f"({type(e).__name__})") from None
    return model.to(device), ck


# --------------------------------------------------------------------------------------------------
# RESUME AND TRACKING: resumable training loops, TensorBoard
# --------------------------------------------------------------------------------------------------

def _state(obj):
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, (list, dict)):
        return copy.deepcopy(obj)
    return obj.state_dict()


def _restore(obj, state):
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, list):
        obj[:] = state
    elif isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    else:
        obj.load_state_dict(state)


class Clock:
    """Wall-clock seconds of a run's phases for its summary line: `with clock("judging"): ...`."""

    def __init__(self):
        self.start, self.phases, self.inner = time.time(), {}, []

    @contextlib.contextmanager
    def __call__(self, phase: str):
        """Time spent in a phase nested in another (judging inside training's callbacks) counts
        for the inner one only."""
        t0 = time.time()
        self.inner.append(0.0)
        self.phases.setdefault(phase, 0.0)    # the line lists phases in the order they began
        try:
            yield
        finally:
            spent = time.time() - t0
            self.phases[phase] += spent - self.inner.pop()
            if self.inner:
                self.inner[-1] += spent

    def timed(self, phase: str, fn):
        """fn, each call counted as `phase` (a training loop's judging callback)."""
        def call(*args, **kw):
            with self(phase):
                return fn(*args, **kw)
        return call

    def seconds(self) -> dict:
        """{phase: seconds, ..., 'other': the rest, 'total': all since the clock started}."""
        total = time.time() - self.start
        out = {k: round(v, 1) for k, v in self.phases.items()}
        return {**out, "other": round(total - sum(self.phases.values()), 1),
                "total": round(total, 1)}

    def line(self) -> str:
        """'312s in all: training 140s, judging 150s, other 22s'."""
        s = self.seconds()
        total = s.pop("total")
        return f"{total:.0f}s in all: " + ", ".join(f"{k} {v:.0f}s" for k, v in s.items())


class Tracker:
    """TensorBoard event files (`tensorboard --logdir runs`) fed by a training loop's own logs:
    lists of numbers (one per step), lists of dicts (one per evaluation, stepped by their "step" or
    "iter"), dicts of such lists. write() adds what is new since its last call."""

    def __init__(self, folder, logs: dict):
        self.writer, self.logs, self.done = self.writer_class()(str(folder)), logs, {}

    @staticmethod
    def writer_class():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--track writes TensorBoard files and needs tensorboard: pip install "
                             "tensorboard, or leave out --track") from None
        return SummaryWriter

    @staticmethod
    def series(name, log):
        if isinstance(log, dict):
            for k, v in log.items():
                if isinstance(v, list):
                    yield from Tracker.series(f"{name}/{k}", v)
        elif isinstance(log, list) and log and all(isinstance(v, dict) for v in log):
            for k in dict.fromkeys(k for d in log for k in d if k not in ("step", "iter")):
                points = [(d.get("step", d.get("iter", i + 1)), d[k])
                          for i, d in enumerate(log) if k in d]
                yield f"{name}/{k}", points
        elif isinstance(log, list):
            yield name, list(enumerate(log, 1))

    def write(self, skip: bool = False):
        """Write the new points (skip: only mark them written, after a resume restored them)."""
        for name, log in self.logs.items():
            for tag, points in self.series(name, log):
                for step, v in points[self.done.get(tag, 0):]:
                    number = isinstance(v, (int, float)) and not isinstance(v, bool)
                    if not skip and number and math.isfinite(v):
                        self.writer.add_scalar(tag, v, step)
                self.done[tag] = len(points)
        self.writer.flush()


class Resume:
    """A training loop's resumable state. Every `every` steps the named objects (modules,
    optimisers, EMA, grad scalers, torch.Generators, lists or dicts of logs) and the RNG states of
    torch, numpy and random are written atomically to `path`; a rerun whose `key` (the run's
    arguments) is the same continues after the last save with the same RNG streams, so it ends with
    the weights an uninterrupted run ends with. With `track` (a folder), the lists and dicts of logs
    also go to TensorBoard at every save (see Tracker).

        resume = C.Resume(out / "resume.pt", asdict(args), args.save_every, model=model,
                          opt=opt, log=log)
        for step in range(resume.load(), steps):   # 0 on a fresh run
            ...
            resume.save(step + 1)                   # writes when (step + 1) % every == 0
        resume.finish()                             # the run is complete: the file goes
    """

    def __init__(self, path, key, every: int, track=None, **objects):
        self.path, self.every, self.objects = Path(path), every, objects
        if isinstance(key, dict):
            key = {k: v for k, v in key.items() if k not in ("threads", "track")}
        self.key = json.dumps(key, sort_keys=True, default=str)
        logs = {k: v for k, v in objects.items() if isinstance(v, (list, dict))}
        self.tracker = Tracker(track, logs) if track and distributed()[0] == 0 else None
        self.before, self.t0 = (0.0, 0.0), (time.time(), time.process_time())

    def clock(self) -> dict:
        """Wall-clock and CPU seconds of the loop so far, over every call that resumed it."""
        return {"seconds": self.before[0] + time.time() - self.t0[0],
                "cpu_seconds": self.before[1] + time.process_time() - self.t0[1]}

    def load(self) -> int:
        step = self._load()
        if self.tracker:
            # what the resumed logs hold went to TensorBoard before
            self.tracker.write(skip=step > 0)
        return step

    def _load(self) -> int:
        if not self.path.exists():
            return 0
        try:
            ck = load(self.path)
        except Exception:
            print(f"{self.path} is unreadable: starting afresh")
            return 0
        if ck.get("key") != self.key:
            print(f"{self.path} belongs to a run with other arguments: starting afresh")
            return 0
        for name, obj in self.objects.items():
            _restore(obj, ck["state"][name])
        torch.set_rng_state(ck["rng"]["torch"])
        kind, keys, *rest = ck["rng"]["numpy"]
        np.random.set_state((kind, keys.numpy(), *rest))
        random.setstate(ck["rng"]["random"])
        if "cuda" in ck["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.before = tuple(ck.get("clock", (0.0, 0.0)))
        self.t0 = (time.time(), time.process_time())
        print(f"resuming from {self.path} at step {ck['step']}")
        return ck["step"]

    def save(self, step: int, force: bool = False):
        if distributed()[0] != 0:
            return
        if self.tracker and (force or step % (self.every or 100) == 0):
            self.tracker.write()
        if not (force or (self.every > 0 and step % self.every == 0)):
            return
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "random": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {name: _state(obj) for name, obj in self.objects.items()}
        atomic_save({"key": self.key, "step": step, "rng": rng,
                     "clock": tuple(self.clock().values()), "state": state}, self.path)

    def finish(self):
        if self.tracker:
            self.tracker.write()
            self.tracker.writer.close()
        if distributed()[0] == 0:
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# CACHES AND RUN FOLDERS
# --------------------------------------------------------------------------------------------------

def file_id(path) -> str:
    """Identity of a file's contents, or a folder's (size and SHA-1), for cache keys: a rewritten
    model gets a new one."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode() + f.read_bytes())
    return f"{sum(f.stat().st_size for f in files)}-{h.hexdigest()[:16]}"


def cached(path, key, compute):
    """compute() once per key: the value is stored at `path` together with `key` (anything JSON can
    write: settings, file_id()s of the models involved) and read back while the key is the same. The
    one cache of the repository: base evaluations, retrained references and trained shifts all go
    through it."""
    path, key = Path(path), json.dumps(key, sort_keys=True, default=str)
    if path.exists():
        try:
            hit = load(path)
            if hit.get("key") == key:
                return hit["value"]
        except Exception:
            pass
    value = plain(compute())   # the same types on a hit and on a miss
    atomic_save({"key": key, "value": value}, path)
    return value


def data_id(x: torch.Tensor, y: torch.Tensor | None = None) -> str:
    """Identity of a set of images (their count and a hash of every k-th image and label): a model
    cached for the data at one --data-root is not taken for other data (a subset, another copy) at
    another."""
    k = max(1, len(x) // 512)
    labels = b"" if y is None else y[::k].numpy().tobytes()
    h = hashlib.sha1(x[::k].float().numpy().tobytes() + labels)
    return f"{len(x)}-{h.hexdigest()[:12]}"


def cache_beside(path, name: str) -> Path:
    """Where a cached figure about the model at `path` goes: beside it inside the runs folder; for a
    model elsewhere (--base of someone else's), in runs/cache/, never in the other folder."""
    path = Path(path).resolve()
    inside = path.is_relative_to(RUNS.resolve())
    return (path.parent if inside else RUNS / "cache") / name


def writable(folder) -> Path:
    """folder, created if need be; a one-line error now, not after the work, when nothing can
    be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"cannot write to {folder} ({e.strerror}): make it writable, or point "
                         f"UNLEARN_RUNS at a writable folder") from None
    return folder


def run_dir(method: str, dataset: str, tag: str = "") -> Path:
    """runs/<method>-<dataset>[-<tag>]/: a run's args.json, model.safetensors, samples.pt/png
    and metrics.json."""
    return RUNS / f"{method}-{dataset}{'-' + tag if tag else ''}"


def base_path(dataset: str, tag: str = "") -> Path:
    return run_dir("base", dataset, tag) / "model.safetensors"


# run folders this process created: a run that fails leaves no folder holding only args.json
_STARTED = []


def start_run(method: str, args) -> Path:
    """Create the run folder and write args.json (the resolved arguments, presets applied)."""
    out = run_dir(method, args.dataset, args.tag)
    if not out.exists():
        _STARTED.append(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")
    return out


def sample_record(x: torch.Tensor, c: torch.Tensor, sampler: str, steps: int, null: int) -> dict:
    """What samples.pt holds: images in [-1, 1], the token each was drawn for (a class, or `null`
    for an unconditional sample), the sampler's name with its steps ("ddim-50") and its network
    evaluations per image."""
    return {"x": x, "c": c, "sampler": f"{sampler}-{steps}", "nfe": VP().nfe(sampler, steps),
            "null": null}


def save_samples(folder, s: dict):
    """samples.pt (a sample_record), the one thing the comparison needs besides metrics.json."""
    record = dict(s, x=s["x"].detach().float().cpu(), c=s["c"].detach().long().cpu())
    atomic_save(record, Path(folder) / "samples.pt")


def save_grid(x: torch.Tensor, path, nrow: int, scale: int = 4, highlight_rows=(),
              highlight_cols=()):
    """Save images in [-1, 1] as a PNG grid (torchvision's make_grid, nrow per row, 1-pixel grey
    gaps), upscaled `scale`x; the gaps around highlighted rows and columns are red."""
    from torchvision.utils import make_grid, save_image
    images = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=0.5)
    blank = torch.zeros_like(x[:, :1]).cpu().float()
    gap = make_grid(blank, nrow=nrow, padding=1, pad_value=1.0)[0] > 0
    h, w = x.shape[2] + 1, x.shape[3] + 1
    frame = torch.zeros_like(gap)
    for r in highlight_rows:
        frame[r * h:(r + 1) * h + 1] = True
    for c in highlight_cols:
        frame[:, c * w:(c + 1) * w + 1] = True
    grid[:, gap & frame] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0], path)


def class_tokens(num_classes: int, per_class: int) -> torch.Tensor:
    """[0]*n, [1]*n, ...: token ids for a grid with one row (or block) per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


# --------------------------------------------------------------------------------------------------
# python common.py: the pretraining recipe (Args) and its command line
# --------------------------------------------------------------------------------------------------

@dataclass
class Args:
    dataset: str = "digits"
    """digits (bundled, CPU) | mnist | fashion | cifar10 (torchvision download into --data-root).
    MNIST / Fashion on a CPU (1 thread): about 30 s per pretraining step of batch 128 (17.6M
    parameters) and 2.4 s per DDIM-50 sample, so only small budgets (--steps 2 --n-per-class 1:
    under 2 minutes); their 50,000-step recipe is for a GPU (not yet timed on one)"""
    threads: int = default_threads()
    """CPU threads of torch (OMP_NUM_THREADS if set, else half the cores: safe when other jobs share
    them)"""
    steps: int = 1400
    """training steps (cifar10: DDPM's 800k steps; the DDPM paper took 10.6 hours on a TPU v3-8)"""
    batch_size: int = 64
    """global batch (split across the processes of torchrun)"""
    lr: float = 1e-3
    """AdamW learning rate"""
    warmup: int = 0
    """linear learning-rate warm-up steps"""
    ema: float = 0.995
    """decay of the EMA weights that are saved and sampled"""
    p_null: float = 0.1
    """label dropout to the null token (classifier-free guidance, the unconditional model)"""
    flip: bool = False
    """random horizontal flips (DDPM's CIFAR-10 augmentation; digits are not flip-invariant)"""
    drop_classes: str = ""
    """classes left out of the training set, e.g. 0 (the gold-standard retrain); give it its own
    --tag"""
    force: bool = False
    """retrain even if a finished cached checkpoint exists (needed to change --steps of a cached
    base)"""
    n_per_class: int = 10
    """samples per class in samples.pt / samples.png"""
    n_uncond: int = 0
    """null-token (unconditional) samples added to samples.pt"""
    sampler: str = "ddim"
    """ddim | ddpm | em: the sampler of those samples (see sample)"""
    sample_steps: int = 50
    """sampler steps of those samples"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    amp: str = "off"
    """mixed precision: off | auto (`--amp` alone: bf16 where the device has it, else fp16) | bf16 |
    fp16 (with loss scaling; on a CPU too). Off by default: no gain on a CPU without bf16 units,
    not yet measured on a GPU (TF32 matmuls are on for every CUDA run, with or without it)"""
    compile: bool = False
    """torch.compile the UNet (CUDA)"""
    save_every: int = 200
    """steps between resumable checkpoints (0: none, a rerun starts afresh)"""
    track: bool = False
    """TensorBoard event files of the loss in runs/base-<dataset>[-<tag>]/tb (pip install
    tensorboard)"""
    seed: int = 0
    """seed for initialisation, batches and noise"""
    tag: str = ""
    """run folder suffix: runs/base-<dataset>[-<tag>]/"""
    # 32x32 data: DDPM's recipe (Ho et al. 2020, Appendix B); MNIST / Fashion converge far sooner
    presets = {
        "mnist": dict(steps=50_000, batch_size=128, lr=2e-4, warmup=1000, ema=0.9999,
                      save_every=5000),
        "fashion": dict(steps=50_000, batch_size=128, lr=2e-4, warmup=1000, ema=0.9999,
                        save_every=5000),
        "cifar10": dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, ema=0.9999, flip=True,
                        save_every=5000),
    }


def main(args: Args):
    info = data_info(args.dataset)
    drop = parse_classes(args.drop_classes, info, "--drop-classes class")
    if drop and not args.tag:
        raise UsageError("--drop-classes trains another model than the base: give it a --tag, "
                         "e.g. no0")
    device, t0 = pick_device(args.device), time.time()
    recipe = {k: v for k, v in dataclasses.asdict(args).items()
              if k not in ("dataset", "tag", "drop_classes", "force", "data_root", "device",
                           "n_per_class", "n_uncond", "sampler", "sample_steps")}
    path = pretrain(args.dataset, args.tag, device=device, root=args.data_root, force=args.force,
                    drop_classes=drop, **recipe)
    if distributed()[0] != 0:
        return None
    model, ck = load_checkpoint(path, args.dataset, device)
    print(f"base model: {path} (step {ck['step']}, {n_params(model) / 1e6:.2f}M parameters, "
          f"trained in {ck.get('seconds', 0):.0f}s; this call took {time.time() - t0:.1f}s)")
    c = torch.cat([class_tokens(info.num_classes, args.n_per_class),
                   torch.full((args.n_uncond,), model.tok["null"])])
    x = sample(model, VP(), c.to(device), args.sampler, args.sample_steps, seed=args.seed,
               amp=args.amp)
    s = sample_record(x, c, args.sampler, args.sample_steps, model.tok["null"])
    save_samples(path.parent, s)
    save_grid(x[:info.num_classes * args.n_per_class], path.parent / "samples.png",
              nrow=args.n_per_class)
    metrics = {"seconds": ck.get("seconds", 0.0), "params": n_params(model), "nfe": s["nfe"],
               "step": ck["step"], "dropped": ck.get("dropped", [])}
    (path.parent / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"samples (one row per class): {path.parent / 'samples.png'}, samples.pt")
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    cli(main, Args)
