"""Train the bundled 8x8 digits VE score model (NCSN-style denoising score matching).

    python -m kve_fast.models.train_digits --out kve_fast/models/digits

Data: scikit-learn's handwritten digits (``load_digits``: 1,797 images, 8x8, values 0..16), scaled to
[0, 1] image space, 1 channel, no padding or resizing.

The model convention is the one diffusers' ``KarrasVePipeline`` expects of a VE model: it calls
``unet((x + 1) / 2, sigma / 2).sample`` and uses it as the score of the data in [0, 1] space at noise
std ``sigma_y = sigma / 2``. A ``UNet2DModel`` with ``time_embedding_type="fourier"`` embeds
``log(sigma_y)`` and divides its last layer by ``sigma_y``, so with ``y_noisy = y + sigma_y * z`` we
train the undivided output ``net = sigma_y * unet(y_noisy, sigma_y).sample`` towards ``-z``
(loss ``|| sigma_y * F + z ||^2``, i.e. the sigma^2-weighted score matching loss of NCSN/NCSN++).

One detail fits the model to its size: diffusers draws the fixed Gaussian Fourier frequencies of the
noise embedding with std 16 (NCSN++'s choice), which for a model this small makes the embedding of
``log sigma`` a near-random code; we redraw them (seeded) with std ``--fourier-scale`` (default 1), so
the conditioning is a smooth function of ``log sigma``. They are a non-trainable parameter
(``time_proj.weight``) saved with the weights, so ``from_pretrained`` restores them.

The reference schedule starts at sigma = sigma_max**2 = 1e4 with an initial sample of std
sigma_max = 100 only, so above the churn range the sample carries ~1/100 of the noise its sigma
claims. No special training is needed for that: the churn steps (sigma <= s_max = 50) re-noise the
sample to its nominal level and the model, trained on matched noise only, gives clean digits (see
TRAINING.md; training on deliberately mismatched noise was tried and made the model worse).

Everything is seeded (torch + numpy); with the same torch version, thread count and CPU the run is
reproducible bit for bit. scikit-learn is imported inside functions only, never at package import time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

SCHEDULER_CONFIG = {
    "_class_name": "KarrasVeScheduler",
    "sigma_min": 0.02,
    "sigma_max": 100,
    "s_noise": 1.007,
    "s_churn": 80,
    "s_min": 0.05,
    "s_max": 50,
}


def load_digits_01() -> tuple[torch.Tensor, np.ndarray]:
    """sklearn's 8x8 digits as a float32 tensor (N, 1, 8, 8) in [0, 1], and the labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return x.contiguous(), d.target.copy()


def build_unet(channels=(32, 64), layers_per_block: int = 1, attention: bool = False, norm_num_groups: int = 8):
    """The bundled architecture: a small NCSN-style diffusers ``UNet2DModel`` for 8x8x1 images."""
    from diffusers import UNet2DModel

    n = len(channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        time_embedding_type="fourier",
        flip_sin_to_cos=True,
        norm_eps=1e-6,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_num_groups,
        attention_head_dim=channels[-1] if attention else 8,
        add_attention=attention,
    )


def sample_sigmas(n: int, g: torch.Generator, args) -> torch.Tensor:
    """sigma_y per example: a mixture of log-uniform over [sigma_lo, sigma_hi] and a log-normal bump."""
    lo, hi = math.log(args.sigma_lo), math.log(args.sigma_hi)
    u = torch.rand(n, generator=g)
    log_uniform = lo + (hi - lo) * torch.rand(n, generator=g)
    log_normal = (args.p_mean + args.p_std * torch.randn(n, generator=g)).clamp(lo, hi)
    return torch.where(u < args.p_uniform, log_uniform, log_normal).exp()


def make_batch(data: torch.Tensor, g: torch.Generator, args, batch_size: int):
    """(y_noisy, sigma_y, z) for one training batch: y_noisy = y + sigma_y * z."""
    idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
    y = data[idx]
    sigma = sample_sigmas(batch_size, g, args)
    z = torch.randn(y.shape, generator=g)
    y_noisy = y + sigma.view(-1, 1, 1, 1) * z
    return y_noisy, sigma, z


def dsm_loss(unet, y_noisy, sigma, z) -> torch.Tensor:
    """Per-example || sigma * unet(y_noisy, sigma) + z ||^2 (mean over pixels): sigma^2-weighted DSM."""
    net = unet(y_noisy, sigma).sample * sigma.view(-1, 1, 1, 1)
    return ((net + z) ** 2).mean(dim=(1, 2, 3))


@torch.no_grad()
def eval_loss(unet, data: torch.Tensor, seed: int = 1234, n: int = 4096) -> dict:
    """Deterministic loss on fixed (image, sigma, noise) triples, sigma_y log-spaced over [1e-3, 1e3], by band."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, data.shape[0], (n,), generator=g)
    y = data[idx]
    sigma = torch.exp(torch.linspace(math.log(1e-3), math.log(1e3), n))
    z = torch.randn(y.shape, generator=g)
    losses = []
    for i in range(0, n, 512):
        sl = slice(i, i + 512)
        yn = y[sl] + sigma[sl].view(-1, 1, 1, 1) * z[sl]
        losses.append(dsm_loss(unet, yn, sigma[sl], z[sl]))
    loss = torch.cat(losses)
    bands = {"1e-3..1e-1": (1e-3, 1e-1), "1e-1..1e1": (1e-1, 1e1), "1e1..1e3": (1e1, 1e3 + 1)}
    res = {"all": loss.mean().item()}
    for k, (a, b) in bands.items():
        m = (sigma >= a) & (sigma < b)
        res[k] = loss[m].mean().item()
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="kve_fast/models/digits", help="output folder (diffusers format)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (warmup, then cosine decay)")
    p.add_argument("--lr-min-frac", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (0: no EMA)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--channels", default="32,64", help="block_out_channels")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention", action="store_true", help="self-attention in the lowest-resolution blocks")
    p.add_argument("--norm-groups", type=int, default=8)
    p.add_argument("--fourier-scale", type=float, default=1.0, help="std of the Fourier frequencies on log(sigma); diffusers' default 16")
    p.add_argument("--sigma-lo", type=float, default=1e-4)
    p.add_argument("--sigma-hi", type=float, default=1e4)
    p.add_argument("--p-uniform", type=float, default=0.3, help="share of sigmas drawn log-uniform (rest log-normal)")
    p.add_argument("--p-mean", type=float, default=-1.5, help="mean of log(sigma_y) for the log-normal part")
    p.add_argument("--p-std", type=float, default=1.5, help="std of log(sigma_y) for the log-normal part")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to ``lr_min_frac`` of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.lr_min_frac + (1 - args.lr_min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(unet, ema, data, args, device) -> tuple:
    """Adam on the denoising loss for ``args.steps`` steps, the EMA updated after each: ``(losses, seconds)``."""
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    g = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.time()
    recent = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        y_noisy, sigma, z = (t.to(device) for t in make_batch(data, g, args, args.batch_size))
        loss = dsm_loss(unet, y_noisy, sigma, z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - args.ema)
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:6d}  loss {np.mean(recent[-args.log_every:]):.4f}  lr {lr_at(step, args):.2e}  "
                  f"{time.time() - t0:7.1f}s", flush=True)
    return recent, time.time() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)

    data, _ = load_digits_01()
    channels = tuple(int(c) for c in args.channels.split(","))
    unet = build_unet(channels, args.layers_per_block, args.attention, args.norm_groups)
    g_init = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        w = unet.time_proj.weight
        w.copy_(torch.randn(w.shape, generator=g_init) * args.fourier_scale)
    unet.to(device).train()
    n_params = sum(p.numel() for p in unet.parameters())
    n_trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    ema = copy.deepcopy(unet).eval().requires_grad_(False) if args.ema > 0 else None

    print(f"digits: {tuple(data.shape)}; UNet2DModel channels={channels} layers_per_block={args.layers_per_block} "
          f"attention={args.attention}; params {n_params} ({n_trainable} trainable); torch {torch.__version__}, "
          f"{args.threads} thread(s)", flush=True)
    recent, wall = train(unet, ema, data, args, device)
    final = ema if ema is not None else unet.eval()
    final = final.to("cpu").eval()
    tail = max(1, args.steps // 20)
    final_train_loss = float(np.mean(recent[-tail:]))
    ev = eval_loss(final, data)
    print(f"done in {wall:.1f}s; train loss (last {tail} steps) {final_train_loss:.4f}; "
          f"EMA eval loss {json.dumps({k: round(v, 4) for k, v in ev.items()})}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    final.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
        f.write("\n")
    info = {
        "command": "python -m kve_fast.models.train_digits " + " ".join(shlex.quote(a) for a in argv_used),
        "args": vars(args),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "wall_time_s": round(wall, 1),
        "params": n_params,
        "trainable_params": n_trainable,
        "final_train_loss": round(final_train_loss, 5),
        "ema_eval_loss": {k: round(v, 5) for k, v in ev.items()},
    }
    print("run record: " + json.dumps(info), flush=True)
    return info


if __name__ == "__main__":
    main()
