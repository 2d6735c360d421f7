"""EDM-interface stand-ins for tests and benchmarks: networks called as NVlabs' samplers call theirs, and the
scripts' per-seed generators.

NVlabs' EDM (``generate.py``, ``edm_sampler``) and EDM2 (``generate_images.py``, ``edm_sampler``) call a
preconditioned network ``net(x, sigma, class_labels)`` that returns the denoised image D(x; sigma) in float32,
and draw all randomness from one ``torch.Generator`` per seed. docs/edm-reading.md records what they read of
the network and of the generators; this module provides the same interface in our own code (their licence,
CC BY-NC-SA 4.0, keeps theirs out of the project):

- ``EDMNet``: EDM's ``EDMPrecond`` interface: ``sigma_min``, ``sigma_max``, ``round_sigma(sigma)``,
  ``img_channels``, ``img_resolution``, ``label_dim``, ``use_fp16``, and ``forward(x, sigma,
  class_labels=None, force_fp32=False, **model_kwargs)`` with the preconditioning of Karras et al. (2022),
  Table 1 (c_skip, c_out, c_in, c_noise = ln(sigma) / 4) around an inner model ``F(x_in, c_noise,
  class_labels=...)``. ``GridEDMNet`` rounds sigma to a fixed grid in ``round_sigma`` (as EDM's iDDPM
  preconditioner does): a net for which dropping ``round_sigma`` changes the result.
- ``EDM2Net``: EDM2's ``Precond`` interface: no sigma range and no ``round_sigma``; ``forward(x, sigma,
  class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs)`` returns float32 D (and a
  log-variance with ``return_logvar``); ``use_fp16`` defaults to True, as there.
- ``TinyInner``: a small conv net as the inner model (any channel count, class labels); it computes in its
  input's dtype, so ``use_fp16`` really runs it in float16.
- Builders: ``tiny_edm_net``, ``narrow_edm_net`` (a sigma range narrower than the samplers' defaults),
  ``tiny_edm2_net``, and ``cifar_standin(unet)``, the bench's stand-in for EDM's CIFAR-10 networks: a
  diffusers UNet (the bench passes the NCSN++-like 32x32 UNet of ../shared/notes/gpu-baseline.md, 61.9 M
  parameters; tests pass ``kve_fast.testing.ncsnpp_unet``) behind a float32 ``EDMNet`` preconditioner.
- ``SeedGenerators``: both scripts' per-seed generator (their ``StackedRandomGenerator``): one
  ``torch.Generator(device)`` per seed (seeded with ``seed % 2**32``), sample b of every ``randn``,
  ``randn_like`` and ``randint`` drawn from generator b alone, the samples stacked. ``script_inputs`` draws
  the latents and class labels as both scripts do before they call the sampler.
- ``RecordingNet``: a net that logs each call (what the sampler passed), for tests of what a sampler calls.

EDM's ``EDMPrecond`` runs its inner model in float16 only on CUDA (``use_fp16`` and ``x.device.type ==
'cuda'``); ``fp16_devices`` widens that to the CPU so the CPU tests run a net that is float16 inside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["TinyInner", "DiffusersInner", "EDMNet", "GridEDMNet", "EDM2Net", "tiny_edm_net", "narrow_edm_net",
           "tiny_edm2_net", "cifar_standin", "SeedGenerators", "script_inputs", "RecordingNet"]


# -- the inner models ----------------------------------------------------------------------------------------


class TinyInner(torch.nn.Module):
    """``F(x_in, noise_labels, class_labels=None)``: conv, plus a Fourier embedding of the noise label and a
    linear one of the class label, SiLU, conv. The weights are float32 and cast to the input's dtype in each
    call (EDM's own layers do the same), so the preconditioner's ``use_fp16`` runs it in float16."""

    def __init__(self, channels: int, label_dim: int = 0, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape, fan_in):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) / math.sqrt(fan_in))

        self.conv_in = weight(hidden, channels, 3, 3, fan_in=9 * channels)
        self.bias_in = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=g))
        self.register_buffer("frequencies", torch.randn(hidden // 2, generator=g))
        self.noise_proj = weight(hidden, 2 * (hidden // 2), fan_in=hidden)
        self.label_proj = weight(hidden, label_dim, fan_in=max(label_dim, 1)) if label_dim else None
        self.conv_out = weight(channels, hidden, 3, 3, fan_in=9 * hidden)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        dtype = x.dtype
        h = F.conv2d(x, self.conv_in.to(dtype), self.bias_in.to(dtype), padding=1)
        phase = noise_labels.to(torch.float32).reshape(-1, 1) * self.frequencies * (2 * math.pi)
        emb = torch.cat([phase.cos(), phase.sin()], dim=1) @ self.noise_proj.t()
        if self.label_proj is not None and class_labels is not None:
            emb = emb + class_labels.to(torch.float32) @ self.label_proj.t()
        h = F.silu(h + emb.to(dtype)[:, :, None, None])
        return F.conv2d(h, self.conv_out.to(dtype), padding=1)


class DiffusersInner(torch.nn.Module):
    """A diffusers ``UNet2DModel`` as an inner model: called at sigma itself (``exp(4 c_noise)``: the NCSN++
    UNets take sigma as their timestep and take its log inside); no class labels."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        if class_labels is not None:
            raise ValueError("a diffusers UNet stand-in takes no class labels (label_dim must be 0)")
        return self.unet(x, (noise_labels * 4).exp()).sample


# -- the preconditioners -------------------------------------------------------------------------------------


class _Preconditioned(torch.nn.Module):
    """What EDM's and EDM2's preconditioners share: the attributes the scripts read, and D(x; sigma) =
    c_skip x + c_out F(c_in x; c_noise) with Karras et al. (2022), Table 1's weights, in float32."""

    def __init__(self, model, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool,
                 sigma_data: float, fp16_devices):
        super().__init__()
        self.model = model
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data, self.fp16_devices = use_fp16, sigma_data, tuple(fp16_devices)

    def _inputs(self, x, sigma, class_labels, force_fp32: bool):
        """(x in float32, sigma as float32 (-1, 1, 1, 1), the class labels as the inner model takes them, the
        inner model's dtype)."""
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type in self.fp16_devices
        return x, sigma, labels, torch.float16 if fp16 else torch.float32

    def _weights(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (float32, (-1, 1, 1, 1))."""
        data = self.sigma_data
        total = sigma**2 + data**2
        return data**2 / total, sigma * data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4

    def _denoise(self, x, sigma, class_labels, force_fp32: bool, call):
        """D(x; sigma) in float32, with ``call(x_in, c_noise, labels)`` running the inner model."""
        x, sigma, labels, dtype = self._inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self._weights(sigma)
        out = call((c_in * x).to(dtype), c_noise.flatten(), labels)
        if out.dtype != dtype:
            raise TypeError(f"the inner model returned {out.dtype}, expected {dtype}")
        return c_skip * x + c_out * out.to(torch.float32), c_noise


class EDMNet(_Preconditioned):
    """EDM's ``EDMPrecond`` interface around ``model`` (see the module docstring). ``sigma_min`` and
    ``sigma_max``: the range the net supports (EDM's sampler clamps its own range to it)."""

    def __init__(self, model, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 fp16_devices=("cuda",)):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16, sigma_data, fp16_devices)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        def call(x_in, c_noise, labels):
            return self.model(x_in, c_noise, class_labels=labels, **model_kwargs)

        return self._denoise(x, sigma, class_labels, force_fp32, call)[0]

    def round_sigma(self, sigma):
        """The sigma the net supports nearest to ``sigma``: any (EDM's preconditioner returns it as a tensor)."""
        return torch.as_tensor(sigma)


class GridEDMNet(EDMNet):
    """An ``EDMNet`` whose ``round_sigma`` moves sigma to the nearest of ``grid`` levels (compared in float32,
    returned in sigma's dtype and on its device, as EDM's iDDPM preconditioner rounds to its levels)."""

    def __init__(self, *args, grid: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("grid", torch.as_tensor(grid, dtype=torch.float64))

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        flat = sigma.to(self.grid.device, torch.float32).reshape(-1, 1)
        index = (flat - self.grid.to(torch.float32)).abs().argmin(dim=1)
        return self.grid[index].to(sigma.dtype).reshape(sigma.shape).to(sigma.device)


class EDM2Net(_Preconditioned):
    """EDM2's ``Precond`` interface around ``model`` (see the module docstring); ``model`` is called
    ``model(x_in, c_noise, class_labels, **unet_kwargs)``, positionally, as EDM2 calls its UNet."""

    def __init__(self, model, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = True,
                 sigma_data: float = 0.5, fp16_devices=("cuda",), logvar_channels: int = 8, seed: int = 0):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16, sigma_data, fp16_devices)
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("logvar_frequencies", torch.randn(logvar_channels, generator=g))
        self.logvar_weight = torch.nn.Parameter(torch.randn(2 * logvar_channels, generator=g) / logvar_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        def call(x_in, c_noise, labels):
            return self.model(x_in, c_noise, labels, **unet_kwargs)

        denoised, c_noise = self._denoise(x, sigma, class_labels, force_fp32, call)
        if not return_logvar:
            return denoised
        phase = c_noise.flatten().reshape(-1, 1) * self.logvar_frequencies * (2 * math.pi)
        logvar = torch.cat([phase.cos(), phase.sin()], dim=1) @ self.logvar_weight
        return denoised, logvar.reshape(-1, 1, 1, 1)


# -- builders ------------------------------------------------------------------------------------------------


def _as_published(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` as the scripts load theirs (the pickles' EMA copy): in eval mode, no parameter requiring grad (the
    samplers run without ``torch.no_grad``: with such a net they record no autograd tape either)."""
    return net.eval().requires_grad_(False)


def tiny_edm_net(channels: int = 3, resolution: int = 8, label_dim: int = 0, *, use_fp16: bool = False,
                 fp16_devices=("cuda",), sigma_min: float = 0, sigma_max: float = float("inf"), grid=None,
                 seed: int = 0) -> EDMNet:
    """A small EDM-interface net (``TinyInner`` inside, about 1 k parameters); ``grid``: a ``GridEDMNet``
    rounding sigma to those levels."""
    inner = TinyInner(channels, label_dim, seed=seed)
    args = (inner, resolution, channels, label_dim, use_fp16, sigma_min, sigma_max)
    net = EDMNet(*args, fp16_devices=fp16_devices) if grid is None else GridEDMNet(*args, fp16_devices=fp16_devices,
                                                                                   grid=grid)
    return _as_published(net)


NARROW_RANGE = (0.05, 20.0)  # inside both samplers' default range, 0.002 to 80


def narrow_edm_net(channels: int = 3, resolution: int = 8, label_dim: int = 0, **kwargs) -> EDMNet:
    """``tiny_edm_net`` supporting sigma in ``NARROW_RANGE`` only: EDM's sampler then runs from 20 down to 0.05."""
    return tiny_edm_net(channels, resolution, label_dim, sigma_min=NARROW_RANGE[0], sigma_max=NARROW_RANGE[1],
                        **kwargs)


def tiny_edm2_net(channels: int = 4, resolution: int = 8, label_dim: int = 0, *, use_fp16: bool = True,
                  fp16_devices=("cuda",), seed: int = 0) -> EDM2Net:
    """A small EDM2-interface net (4 channels by default, as EDM2's 512 px models sample 4-channel latents)."""
    return _as_published(EDM2Net(TinyInner(channels, label_dim, seed=seed), resolution, channels, label_dim, use_fp16,
                                 fp16_devices=fp16_devices, seed=seed))


def cifar_standin(unet: torch.nn.Module) -> EDMNet:
    """The bench's stand-in for EDM's CIFAR-10 networks: ``unet`` (a diffusers ``UNet2DModel``; the bench
    passes bench/graph_bench.py's ``ncsnpp_unet``, 32x32 and 61.9 M parameters, EDM's own being about 56 M)
    behind a float32 ``EDMNet`` preconditioner, unconditional, with the full sigma range."""
    cfg = unet.config
    return _as_published(EDMNet(DiffusersInner(unet), cfg.sample_size, cfg.in_channels))


# -- the scripts' generators ---------------------------------------------------------------------------------


class SeedGenerators:
    """One ``torch.Generator(device)`` per seed, seeded with ``int(seed) % 2**32``: sample b of every draw
    comes from generator b alone, and the samples are stacked (so a sample's values depend on its seed only,
    not on the batch it is in), as both scripts' ``StackedRandomGenerator`` draws them."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check(self, size) -> tuple:
        size = tuple(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f"`size` must start with the batch, {len(self.generators)} (one per seed), got {size}")
        return size

    def randn(self, size, **kwargs) -> torch.Tensor:
        size = self._check(size)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        """``randn`` in ``input``'s shape, dtype, layout and device (a contiguous result, whatever its strides)."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        size = self._check(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])

    def get_state(self) -> list:
        """Each generator's state (new tensors)."""
        return [g.get_state() for g in self.generators]


def script_inputs(net, seeds, device="cpu", class_idx: int | None = None):
    """``(generators, latents, class labels)`` as both scripts make them before calling the sampler: a
    ``SeedGenerators`` for ``seeds``; float32 latents ``(len(seeds), img_channels, img_resolution,
    img_resolution)`` drawn from it; then, for a net with ``label_dim``, one-hot float32 labels of classes
    drawn from it (``randint``), or all ``class_idx`` when given; None without labels."""
    rnd = SeedGenerators(device, seeds)
    size = net.img_resolution
    latents = rnd.randn([len(seeds), net.img_channels, size, size], device=device)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            labels[:, :] = 0
            labels[:, class_idx] = 1
    return rnd, latents, labels


# -- recording calls -----------------------------------------------------------------------------------------


class RecordingNet(torch.nn.Module):
    """``net``, logging each call into ``log`` (a list shared between nets, so their order shows) as a dict:
    ``name``, ``x`` and ``sigma`` (the tensors passed, cloned), ``x_id`` and ``sigma_id`` (their ``id``),
    ``args`` (the other positional arguments, as passed) and ``kwargs``. Every other attribute is ``net``'s
    (a net without ``round_sigma`` has none here either)."""

    def __init__(self, net, name: str, log: list):
        super().__init__()
        self.net, self.name, self.log = net, name, log

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self._modules["net"], item)

    def forward(self, x, sigma, *args, **kwargs):
        self.log.append({"name": self.name, "x": x.clone(), "sigma": torch.as_tensor(sigma).clone(), "x_id": id(x),
                         "sigma_id": id(sigma), "args": args, "kwargs": kwargs})
        return self.net(x, sigma, *args, **kwargs)
