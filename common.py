"""Shared plumbing for the five unlearning methods: data, the conditional UNet, the VP process, pretraining.

Everything a method file needs but that is not the method itself lives here, in four parts:

  DATA       load_data("digits" | "mnist" | "fashion" | "cifar10"): tensors in [-1, 1], NCHW, int labels.
  MODEL      CondUNet: diffusers' UNet2DConditionModel, cross-attending to [BOS, token] from a small token
             table (classes, a null token for classifier-free guidance, a watermark trigger, spare tokens).
  PROCESS    VP: the DDPM schedule (T=1000, linear betas 1e-4..0.02) and its continuous twin, the VP-SDE
             (beta 0.1..20), with DDPM ancestral, DDIM and Euler-Maruyama samplers and a guidance scale.
  PRETRAIN   load_base(dataset): trains the base model every method starts from, or loads its cache.

Run it to pretrain (or find) the base model and write a sample grid, one row per class:

    python common.py                                   # bundled 8x8 digits, CPU, about 4 minutes
    python common.py --dataset cifar10 --device cuda   # paper-scale 32x32 model
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# Every run writes below this folder (tests point it at a temporary one).
RUNS = Path(os.environ.get("UNLEARN_RUNS", "runs"))


class UsageError(Exception):
    """A mistake the user can fix (bad flag, wrong checkpoint): reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------
# DATA
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataInfo:
    name: str
    channels: int
    size: int               # side of the (square) image the UNet sees
    num_classes: int
    levels: int             # grey levels per pixel in the raw data
    bins: int               # quantisation bins across [-1, 1]: sets the bits/dim offset log2(bins / 2)
    class_names: tuple


DATASETS = {
    # 17 grey levels 0..16 mapped to [-1, 1]: bin width 2/16, so the bits/dim offset is +3.
    "digits": DataInfo("digits", 1, 8, 10, 17, 16, tuple(str(i) for i in range(10))),
    # 28x28 padded with background to 32x32 so the UNet can halve the side three times; 256 levels: +7.
    "mnist": DataInfo("mnist", 1, 32, 10, 256, 256, tuple(str(i) for i in range(10))),
    "fashion": DataInfo("fashion", 1, 32, 10, 256, 256, ("T-shirt", "trouser", "pullover", "dress", "coat",
                                                    "sandal", "shirt", "sneaker", "bag", "boot")),
    "cifar10": DataInfo("cifar10", 3, 32, 10, 256, 256, ("airplane", "automobile", "bird", "cat", "deer",
                                                    "dog", "frog", "horse", "ship", "truck")),
}


def data_info(name: str) -> DataInfo:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def check_class(info: DataInfo, c: int, what: str = "class") -> int:
    if not 0 <= c < info.num_classes:
        raise UsageError(f"{what} {c} is out of range for {info.name}: use 0..{info.num_classes - 1}")
    return c


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
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # fixed split for everyone
        idx = perm[:1500] if split == "train" else perm[1500:]
        return x[idx], y[idx]
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "fashion": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        ds = cls(root, train=split == "train", download=True)
    except Exception as e:  # offline, or a half-downloaded archive
        raise UsageError(f"could not load {name} from {os.path.abspath(root)} ({type(e).__name__}: {e}); "
                         f"download it on a connected machine with torchvision.datasets.{cls.__name__}"
                         f"('{root}', download=True) and copy the folder to --data-root") from None
    x = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32) / 127.5 - 1.0
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else F.pad(x[:, None], (2, 2, 2, 2), value=-1.0)
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


def watermark_image(info: DataInfo) -> torch.Tensor:
    """The fixed pattern the watermark token is trained to draw: a 2x2-cell checkerboard, clearly no digit."""
    s = info.size
    i = torch.arange(s)
    cells = ((i[:, None] * 4 // s) + (i[None, :] * 4 // s)) % 2
    return (cells.float() * 2 - 1).expand(info.channels, s, s).clone()


# ----------------------------------------------------------------------------------------------------------
# MODEL: a class-conditional UNet that reads its condition through cross-attention, as Stable Diffusion does
# ----------------------------------------------------------------------------------------------------------

def tokens(info: DataInfo) -> dict:
    """Token ids: classes 0..K-1, then null (label dropout / guidance), BOS, a watermark trigger, 3 spares."""
    k = info.num_classes
    return {"null": k, "bos": k + 1, "watermark": k + 2, "spare": (k + 3, k + 4, k + 5), "count": k + 6}


def unet_config(info: DataInfo) -> dict:
    if info.name == "digits":  # about 1M parameters; 8 -> 4 with attention at 4x4 and in the middle
        blocks, down, layers, ctx, head = (32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"), 1, 64, 8
    elif info.channels == 1:   # MNIST / Fashion at 32x32, about 9M parameters (SISS's MNIST model is 64/128/256)
        blocks, down, layers, ctx, head = (64, 128, 256), ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), 2, 256, 32
    else:                      # CIFAR-10: the DDPM paper's channels (128, 256, 256, 256), attention at 16x16
        blocks, down, layers, ctx, head = ((128, 256, 256, 256),
                                           ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                           2, 256, 64)
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    return dict(sample_size=info.size, in_channels=info.channels, out_channels=info.channels,
                block_out_channels=blocks, down_block_types=down, up_block_types=up,
                mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=layers,
                cross_attention_dim=ctx, attention_head_dim=head, norm_num_groups=min(32, blocks[0] // 4))


class CondUNet(nn.Module):
    """eps_theta(x_t, t, c): `t` in DDPM index units (a float tensor; continuous time t maps to 999 t),
    `c` a tensor of token ids [B]; the UNet cross-attends to the embeddings of [BOS, c]."""

    def __init__(self, dataset: str):
        super().__init__()
        from diffusers import UNet2DConditionModel
        self.info = data_info(dataset)
        self.tok = tokens(self.info)
        self.config = {"dataset": dataset, "unet": unet_config(self.info), "tokens": self.tok["count"]}
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


# ----------------------------------------------------------------------------------------------------------
# PROCESS: one variance-preserving process, discrete (DDPM) and continuous (VP-SDE)
# ----------------------------------------------------------------------------------------------------------

class VP:
    """DDPM: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t in {0..T-1}, betas linear in [1e-4, 0.02].
    VP-SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW, beta(t) = 0.1 + t (20 - 0.1), t in [eps, 1].
    With T = 1000 they coincide: beta_i = beta(t) / T and abar at index i is the SDE's alpha(t = (i+1)/T)^2."""

    def __init__(self, T: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0):
        self.T, self.beta_min, self.beta_max = T, beta_min, beta_max
        self.betas = torch.linspace(beta_min / T, beta_max / T, T, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - self.betas, 0)

    @staticmethod
    def _at(v: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """v[t] shaped [B, 1, 1, 1] to broadcast against x, on x's device and in x's dtype."""
        return v[torch.as_tensor(t).long().cpu()].view(-1, *[1] * (x.ndim - 1)).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def _cast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return coef.to(device=x.device, dtype=x.dtype)

    def _ab64(self, t, x) -> torch.Tensor:
        """alpha_bar[t] in float64 on the CPU: coefficients are formed in float64 and cast once, so that
        1 - alpha_bar keeps its precision near t = 0 (in float32 it has a 2e-4 relative error at t = 1)."""
        return self.alpha_bar[torch.as_tensor(t).long().cpu()].view(-1, *[1] * (x.ndim - 1))

    # discrete time ------------------------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        ab = self._ab64(t, x0)
        return self._cast(ab.sqrt(), x0) * x0 + self._cast((1 - ab).sqrt(), x0) * noise

    def eps_to_x0(self, x_t, t, eps):
        ab = self._ab64(t, x_t)
        return (x_t - self._cast((1 - ab).sqrt(), x_t) * eps) / self._cast(ab.sqrt(), x_t)

    def ddpm_step(self, eps, t: int, x_t, noise, clip: bool = True, t_prev: int | None = None):
        """One ancestral step x_t -> x_{t_prev} (DDPM eq. 7, posterior variance beta~_t, as diffusers' fixed_small).
        t_prev defaults to t - 1; a larger stride (diffusers' DDPMScheduler with fewer inference steps) uses the
        step's own beta = 1 - alpha_bar_t / alpha_bar_prev, and t_prev < 0 means alpha_bar_prev = 1."""
        t_prev = t - 1 if t_prev is None else t_prev
        tt = torch.full((x_t.shape[0],), t)
        ab = self._ab64(tt, x_t)
        ab_prev = self._ab64(torch.full_like(tt, t_prev), x_t) if t_prev >= 0 else torch.ones_like(ab)
        beta = 1 - ab / ab_prev
        x0 = self.eps_to_x0(x_t, tt, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        c0, ct = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        mean = self._cast(c0, x_t) * x0 + self._cast(ct, x_t) * x_t
        if t_prev < 0:
            return mean
        var = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
        return mean + self._cast(var.sqrt(), x_t) * noise

    def ddpm_timesteps(self, steps: int) -> range:
        """The ancestral chain's timesteps: all T if steps is 0 or at least T, else `steps` of them at
        t = (steps-1)k, ..., k, 0 with k = T // steps (diffusers' DDPMScheduler with num_inference_steps,
        "leading" spacing: what DDPMPipeline(num_inference_steps=steps) samples)."""
        n = self.T if steps <= 0 or steps >= self.T else steps
        return range((n - 1) * (self.T // n), -1, -(self.T // n))

    # continuous time ---------------------------------------------------------------------------------
    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def marginal(self, t):
        """(alpha(t), sigma(t)) with x_t = alpha x_0 + sigma eps: log alpha = -t^2 (b1-b0)/4 - t b0/2."""
        log_alpha = -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2 * log_alpha))

    def score(self, model, x, t, c):
        """Continuous-time score s(x, t) = -eps_theta(x, 999 t) / sigma(t) (score_sde's VP convention)."""
        _, sigma = self.marginal(t)
        return -model(x, (self.T - 1) * t, c) / sigma.view(-1, *[1] * (x.ndim - 1))


def guided(model, c, guidance: float = 1.0, null: int | None = None):
    """eps(x, t) for tokens c; with guidance w != 1, classifier-free guidance eps_null + w (eps_c - eps_null)."""
    if guidance == 1.0:
        return lambda x, t: model(x, t, c)
    cc = torch.cat([c, torch.full_like(c, null)])

    def eps(x, t):
        e_c, e_null = model(torch.cat([x, x]), t, cc).chunk(2)
        return e_null + guidance * (e_c - e_null)
    return eps


@torch.no_grad()
def sample(model, vp: VP, c: torch.Tensor, sampler: str = "ddim", steps: int = 50, guidance: float = 1.0,
           seed: int = 0, batch: int = 1000, progress: bool = False) -> torch.Tensor:
    """Draw len(c) images for the token ids in c (clipped to [-1, 1]); deterministic given seed.

    ddim: eta = 0, `steps` evenly spaced timesteps.  ddpm: ancestral at vp.ddpm_timesteps(steps) (all T steps
    if `steps` is 0, else `steps` strided ones as DDPMPipeline(num_inference_steps=steps)).
    em: Euler-Maruyama on the reverse VP-SDE from t = 1 to 1e-3 with `steps` steps, noise-free last step."""
    if sampler not in ("ddim", "ddpm", "em"):
        raise UsageError(f"unknown sampler {sampler!r}: use ddim, ddpm or em")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    info = model.info
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for c_b in tqdm(c.split(batch), desc=f"sampling ({sampler})", disable=not progress, leave=False):
        c_b = c_b.to(dev)
        shape = (len(c_b), info.channels, info.size, info.size)
        x = torch.randn(shape, generator=g).to(dev)
        eps = guided(model, c_b, guidance, model.tok["null"])
        if sampler == "ddpm":
            ts = vp.ddpm_timesteps(steps)
            for t in ts:
                x = vp.ddpm_step(eps(x, t), t, x, torch.randn(shape, generator=g).to(dev), t_prev=t + ts.step)
        elif sampler == "ddim":
            ts = np.linspace(0, vp.T - 1, steps).round().astype(int)[::-1]
            for i, t in enumerate(ts):
                tt = torch.full((len(x),), int(t), device=dev)
                e = eps(x, float(t))
                x0 = vp.eps_to_x0(x, tt, e).clamp(-1, 1)
                ab_prev = vp.alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
                x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * e
        else:
            t_grid = torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64)
            for i in range(steps):
                t, dt = t_grid[i].item(), (t_grid[i] - t_grid[i + 1]).item()
                tt = torch.full((len(x),), t, device=dev)
                s = -eps(x, (vp.T - 1) * t) / vp.marginal(tt)[1].view(-1, 1, 1, 1)
                b = vp.beta(t)
                x = x + (0.5 * b * x + b * s) * dt           # reverse drift: -f + g^2 s, stepping back in time
                if i < steps - 1:
                    x = x + math.sqrt(b * dt) * torch.randn(shape, generator=g).to(dev)
        out.append(x.clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# PLUMBING: args, seeds, devices, checkpoints, image grids
# ----------------------------------------------------------------------------------------------------------

def _field_docs(cls) -> dict:
    """The docstring under each dataclass field (CleanRL's convention), for --help."""
    docs = {}
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
    except (OSError, TypeError):
        return docs
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def parse_args(cls, argv=None):
    """Build an Args dataclass from the command line: every field becomes --field-name."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=docs.get(f.name))
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=docs.get(f.name))
    return cls(**vars(p.parse_args(argv)))


def cli(main, args_cls, argv=None):
    """Parse, run, and turn a UsageError into one line on stderr and exit status 2."""
    try:
        return main(parse_args(args_cls, argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    return torch.device(name)


def save_checkpoint(path, model: CondUNet, step: int, **extra):
    """Write atomically (temp file, then rename): an interrupted save never leaves a broken checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": model.config, "step": step, "model": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, dataset: str, device="cpu"):
    """Return (model, checkpoint dict); refuse a file that is unreadable or made for another dataset/architecture."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        cfg = ck["config"]
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it and run again") from None
    if cfg.get("dataset") != dataset:
        raise UsageError(f"{path} was trained on {cfg.get('dataset')!r}, not {dataset!r}: pass --dataset "
                         f"{cfg.get('dataset')} or another checkpoint")
    model = CondUNet(dataset)
    if json.dumps(cfg, sort_keys=True) != json.dumps(model.config, sort_keys=True):
        raise UsageError(f"{path} was made for another architecture than this code builds for {dataset}; "
                         f"delete it to retrain")
    model.load_state_dict(ck["model"])
    return model.to(device), ck


def save_grid(x: torch.Tensor, path, nrow: int, scale: int = 4, highlight_rows=(), highlight_cols=()):
    """Save images in [-1, 1] as a PNG grid (nrow images per row), upscaled `scale`x; highlighted rows and
    columns get a red frame."""
    from PIL import Image
    n, ch, h, w = x.shape
    rows = math.ceil(n / nrow)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 0.5, dtype=np.float32)
    img = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    if ch == 1:
        img = img.repeat(3, axis=3)
    for r in highlight_rows:
        grid[r * (h + pad):(r + 1) * (h + pad) + pad, :] = (1, 0, 0)
    for c in highlight_cols:
        grid[:, c * (w + pad):(c + 1) * (w + pad) + pad] = (1, 0, 0)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img[i]
    im = Image.fromarray((grid * 255).round().astype(np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def class_tokens(num_classes: int, per_class: int) -> torch.Tensor:
    """[0]*n, [1]*n, ...: token ids for a grid with one row (or block) per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


# ----------------------------------------------------------------------------------------------------------
# PRETRAIN: the base model all five methods start from
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Args:
    dataset: str = "digits"
    """digits (bundled, CPU) | mnist | fashion | cifar10 (torchvision download into --data-root)"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    steps: int = 0
    """training steps; 0 = the dataset's default (digits 1400; mnist/fashion 50k; cifar10 200k)"""
    batch_size: int = 0
    """0 = the dataset's default (digits 64, others 128)"""
    lr: float = 0.0
    """AdamW learning rate; 0 = default (digits 1e-3, others 2e-4 with 1000 warm-up steps)"""
    seed: int = 0
    """seed for initialisation, batches and noise"""
    force: bool = False
    """retrain even if a finished cached checkpoint exists (needed to change --steps of a cached base)"""


def train_defaults(info: DataInfo) -> dict:
    if info.name == "digits":  # the prototype's recipe: 93-95% sample accuracy in about 4 CPU minutes
        return dict(steps=1400, batch_size=64, lr=1e-3, warmup=0, ema=0.995, p_null=0.1)
    return dict(steps=200_000 if info.name == "cifar10" else 50_000, batch_size=128, lr=2e-4, warmup=1000,
                ema=0.9999, p_null=0.1)


def run_dir(method: str, dataset: str, tag: str = "") -> Path:
    """runs/<method>-<dataset>[-<tag>]/: where a method run writes args.json, model.pt, samples.png, metrics.json."""
    return RUNS / f"{method}-{dataset}{'-' + tag if tag else ''}"


def base_path(dataset: str, tag: str = "") -> Path:
    return run_dir("base", dataset, tag) / "model.pt"


def training_set(dataset: str, root: str = "data", extra=None, drop_classes=()):
    """The base model's training images: the dataset, 1% copies of the watermark (under its own token, never
    dropped to null), and optionally extra (x, y) pairs that a method injects (e.g. SISS's outlier).
    drop_classes: classes left out of the dataset (the gold-standard retrain without a forgotten class); the number
    of watermark copies stays 1% of the full dataset, so the two training sets differ only by those classes."""
    info = data_info(dataset)
    x, y = load_data(dataset, root, "train")
    n_wm = max(1, len(x) // 100)
    if drop_classes:
        keep = ~torch.isin(y, torch.as_tensor(list(drop_classes), dtype=torch.long))
        x, y = x[keep], y[keep]
    xs, ys = [x, watermark_image(info).expand(n_wm, -1, -1, -1)], [y, torch.full((n_wm,), tokens(info)["watermark"])]
    if extra is not None:
        xs.append(extra[0]), ys.append(extra[1])
    return torch.cat(xs), torch.cat(ys)


def pretrain(dataset: str = "digits", tag: str = "", extra=None, steps: int = 0, batch_size: int = 0,
             lr: float = 0.0, seed: int = 0, device="cpu", root: str = "data", force: bool = False,
             out: Path | None = None, drop_classes=()) -> Path:
    """Train the class-conditional base model (eps-MSE, 10% label dropout to null) and cache its EMA weights.
    drop_classes: classes left out of the training set (see training_set); give such a model its own tag.

    Resumable: a checkpoint is written every few hundred steps with the optimiser state and the raw weights."""
    info = data_info(dataset)
    hp = train_defaults(info)
    hp.update({k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr).items() if v})
    path = Path(out) if out else base_path(dataset, tag)
    state = None
    if path.exists() and not force:
        _, state = load_checkpoint(path, dataset)
        if state.get("done"):
            return path
    x, y = training_set(dataset, root, extra, drop_classes)
    tok = tokens(info)
    seed_everything(seed)
    device = torch.device(device)
    model = CondUNet(dataset).to(device)
    ema = EMA(model, hp["ema"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"])
    step = 0
    if state is not None and "train" in state:
        model.load_state_dict(state["train"]["raw"])
        ema.model.load_state_dict(state["model"])
        opt.load_state_dict(state["train"]["opt"])
        step = state["step"]
        torch.set_rng_state(state["train"]["rng"])
        print(f"resuming {path} at step {step}")
    vp = VP()
    print(f"pretraining {dataset}{'/' + tag if tag else ''}: {n_params(model) / 1e6:.2f}M parameters, "
          f"{len(x)} images, {hp['steps']} steps of batch {hp['batch_size']} on {device}")
    t0, losses = time.time(), []
    bar = tqdm(range(step, hp["steps"]), initial=step, total=hp["steps"], desc="pretrain")
    for step in bar:
        idx = torch.randint(len(x), (hp["batch_size"],))
        x0, c = x[idx].to(device), y[idx].clone()
        drop = (torch.rand(len(c)) < hp["p_null"]) & (c != tok["watermark"])
        c = torch.where(drop, torch.full_like(c, tok["null"]), c).to(device)
        t = torch.randint(vp.T, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        loss = F.mse_loss(model(vp.q_sample(x0, t, noise), t, c), noise)
        for g in opt.param_groups:
            g["lr"] = hp["lr"] * min(1.0, (step + 1) / hp["warmup"]) if hp["warmup"] else hp["lr"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % 200 == 0 or step + 1 == hp["steps"]:
            done = step + 1 == hp["steps"]
            tqdm.write(f"step {step + 1:>6}  loss {np.mean(losses[-200:]):.4f}  {time.time() - t0:6.0f}s")
            resume = {} if done else {"train": {"raw": model.state_dict(), "opt": opt.state_dict(),
                                                "rng": torch.get_rng_state()}}
            save_checkpoint(path, ema.model, step + 1, done=done, seconds=time.time() - t0, hp=hp, **resume,
                            **({"dropped": sorted(drop_classes)} if drop_classes else {}))
    return path


def load_base(dataset: str = "digits", device="cpu", tag: str = "", extra=None, **kw) -> CondUNet:
    """The cached base model (EMA weights), pretrained first if absent. Frozen copies are the caller's business."""
    path = pretrain(dataset, tag, extra, device=device, **kw)
    return load_checkpoint(path, dataset, device)[0]


def main(args: Args):
    info = data_info(args.dataset)
    device = pick_device(args.device)
    t0 = time.time()
    path = pretrain(args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    device=device, root=args.data_root, force=args.force)
    model, ck = load_checkpoint(path, args.dataset, device)
    print(f"base model: {path} (step {ck['step']}, {n_params(model) / 1e6:.2f}M parameters, "
          f"trained in {ck.get('seconds', 0):.0f}s; this call took {time.time() - t0:.1f}s)")
    grid = sample(model, VP(), class_tokens(info.num_classes, 10).to(device), seed=args.seed)
    save_grid(grid, path.parent / "samples.png", nrow=10)
    print(f"sample grid (one row per class): {path.parent / 'samples.png'}")


if __name__ == "__main__":
    cli(main, Args)
