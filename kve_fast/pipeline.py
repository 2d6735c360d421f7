"""``KarrasVePipeline``: a drop-in for diffusers' deprecated pipeline, driving ``kve_fast.sampler``."""

from __future__ import annotations

import os
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ._checks import check_int
from .images import uint8_to_pil
from .options import CALLBACK_TENSOR_INPUTS, OUTPUT_TYPES
from .sampler import sample_karras_ve
from .karras_ve_scheduler import KarrasVeScheduler, diffusers_class, schedule_source


def _as_kve_scheduler(scheduler):
    """The scheduler a run plans from: ours as it is; diffusers' own class as ours with its settings; a subclass of
    diffusers' as it is, its settings checked as ours are (a subclass's schedule is honoured, its step arithmetic
    refused: ``kve_fast.karras_ve_scheduler.schedule_source``)."""
    if isinstance(scheduler, KarrasVeScheduler):
        schedule_source(scheduler)
        return scheduler
    reference = diffusers_class()
    if reference is None or not isinstance(scheduler, reference):
        raise TypeError(f"`scheduler` must be a KarrasVeScheduler (kve_fast's or diffusers'), got "
                        f"{type(scheduler).__module__}.{type(scheduler).__qualname__}")
    source = schedule_source(scheduler)
    ours = KarrasVeScheduler.from_config(scheduler.config)
    return ours if type(scheduler) is reference and source == "config" else scheduler


def _pipeline_output(image: torch.Tensor, output_type: str, return_dict: bool):
    """The sampled images as the reference hands them out: PIL images, a BHWC array or the tensor."""
    if output_type == "pil":
        image = uint8_to_pil(image)
    elif output_type in ("np", "numpy"):
        image = image.cpu().permute(0, 2, 3, 1).numpy()
    return ImagePipelineOutput(images=image) if return_dict else (image,)


class KarrasVePipeline(DiffusionPipeline):
    """Unconditional image generation with the stochastic sampler of Karras et al. (2022), Algorithm 2.

    The same call and, in float32, the same outputs bit for bit as
    ``diffusers.pipelines.deprecated.stochastic_karras_ve.KarrasVePipeline`` (with either backend, in
    the default ``noise="exact"`` mode, on the same device).

    Args:
        unet: a diffusers ``UNet2DModel`` or any module called as ``model(x, sigma)`` returning a tensor
            (or an object with ``.sample``) shaped like ``x``. The channel count comes from
            ``unet.config.in_channels`` when there is one (the reference hard-codes 3), else 3.
        scheduler: a ``KarrasVeScheduler`` (ours or diffusers'; ``from_pipe`` converts the latter).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(self, unet: torch.nn.Module, scheduler: KarrasVeScheduler):
        if not isinstance(unet, torch.nn.Module):
            raise TypeError(f"`unet` must be a torch.nn.Module (a diffusers UNet2DModel or any score model), got {type(unet).__name__}")
        _as_kve_scheduler(scheduler)  # a TypeError now, not at the first call
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._interrupt = False

    @classmethod
    def from_pipe(cls, pipeline, **kwargs) -> "KarrasVePipeline":
        """Build a kve_fast pipeline from an existing diffusers one, sharing its UNet (no copies)."""
        unet = kwargs.pop("unet", None) or getattr(pipeline, "unet", None)
        scheduler = kwargs.pop("scheduler", None) or getattr(pipeline, "scheduler", None)
        if kwargs:
            raise TypeError(f"from_pipe() got unexpected arguments: {sorted(kwargs)}")
        if unet is None or scheduler is None:
            raise ValueError("`pipeline` must have a `unet` and a `scheduler`")
        return cls(unet=unet, scheduler=_as_kve_scheduler(scheduler))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, device=None, download: bool = False,
                        **scheduler_settings) -> "KarrasVePipeline":
        """Load a pipeline saved by ``save_pretrained`` (ours or diffusers'), a UNet folder, a bundled model's
        name, or a Hugging Face Hub id (``ORG/NAME``) from the local cache, offline; ``download=True`` fetches a
        Hub model that is not cached (see ``kve_fast.load_model``). ``device``: where the UNet goes.
        ``scheduler_settings`` (``s_churn=40``, ``sigma_schedule="edm"``, ...) replace the folder's."""
        import inspect

        from .loading import load_model

        allowed = set(inspect.signature(KarrasVeScheduler.__init__).parameters) - {"self"}
        unknown = sorted(set(scheduler_settings) - allowed)
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected arguments: {unknown} (besides `device` and `download`, "
                            f"it takes the scheduler's settings: {sorted(allowed)})")
        if not isinstance(download, bool):
            raise TypeError(f"`download` must be a bool, got {type(download).__name__}")
        try:
            unet, scheduler = load_model(pretrained_model_name_or_path, device, download=download)
            if scheduler_settings:
                scheduler = KarrasVeScheduler.from_config(scheduler.config, **scheduler_settings)
        except ValueError as exc:
            raise ValueError(str(exc).replace("`name_or_path`", "`pretrained_model_name_or_path`")) from None
        return cls(unet=unet, scheduler=scheduler)

    def to(self, *args, **kwargs):
        """``DiffusionPipeline.to``; also frees the UNet's CUDA-graph captures (they hold its old device memory)."""
        from .graphs import clear_graphs

        clear_graphs(self.unet)
        return super().to(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (the CPU for a model without any)."""
        for tensor in list(self.unet.parameters()) + list(self.unet.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _image_shape(self, batch_size: int) -> tuple[int, ...]:
        """``(batch_size, channels, height, width)`` from ``unet.config``, each field checked and named."""
        config = getattr(self.unet, "config", None)
        size = getattr(config, "sample_size", None) if config is not None else None
        if size is None:
            raise ValueError("`unet` needs a `config.sample_size` (the image size) to generate images")

        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if positive_int(size):
            height, width = size, size
        elif isinstance(size, (list, tuple)) and len(size) == 2 and all(map(positive_int, size)):
            height, width = size
        else:
            raise ValueError(f"`unet.config.sample_size` must be a positive int or a (height, width) pair of them, "
                             f"got {size!r}")
        channels = getattr(config, "in_channels", 3)
        out_channels = getattr(config, "out_channels", channels)
        for name, value in (("in_channels", channels), ("out_channels", out_channels)):
            if not positive_int(value):
                raise ValueError(f"`unet.config.{name}` must be a positive int, got {value!r}")
        if out_channels != channels:
            raise ValueError(
                f"`unet` maps {channels} channels to {out_channels}: a score model's output must match its input"
            )
        return (batch_size, channels, height, width)

    def _step_callback(self, callback_on_step_end, tensor_inputs):
        """The sampler's per-step callback for diffusers' ``callback_on_step_end`` convention (or None)."""
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}")
        if tensor_inputs is None:
            tensor_inputs = ()
        if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, (list, tuple)):
            raise TypeError("`callback_on_step_end_tensor_inputs` must be a list of names from "
                            f"{CALLBACK_TENSOR_INPUTS}, got {type(tensor_inputs).__name__}")
        unknown = [k for k in tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {CALLBACK_TENSOR_INPUTS}, got {unknown}"
            )
        if callback_on_step_end is None:
            return None
        names = list(tensor_inputs)
        self._interrupt = False

        def callback(state):
            out = callback_on_step_end(self, state["i"], state["timestep"], {k: state[k] for k in names})
            if out is None:
                out = {}
            if not isinstance(out, dict):
                raise TypeError(f"`callback_on_step_end` must return None or a dict, got {type(out).__name__}")
            return {"sample": out.get("sample", state["sample"]), "stop": self._interrupt}

        return callback

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("sample",),
        backend: str = "auto",
        noise: str = "exact",
        solver: str = "heun",
        cuda_graph: bool | str | None = None,
        unet_dtype: torch.dtype | None = None,
        tf32: bool = False,
        channels_last: bool = False,
        **kwargs,
    ):
        """Generate ``batch_size`` images with ``num_inference_steps`` Heun steps (2N - 1 model calls).

        Args:
            generator: a ``torch.Generator`` or a list of ``batch_size`` of them (one per image).
            output_type: ``"pil"``, ``"np"``/``"numpy"`` (BHWC float32 in [0, 1]), ``"pt"`` (BCHW
                tensor in [0, 1]) or ``"latent"`` (the final sample before ``(x / 2 + 0.5).clamp(0, 1)``).
            callback_on_step_end: ``f(pipe, step_index, timestep, callback_kwargs) -> dict`` after each
                step; ``callback_kwargs`` holds the tensors named in
                ``callback_on_step_end_tensor_inputs`` (``"sample"``, ``"pred_original_sample"``); a
                returned ``"sample"`` replaces the sample, and setting ``pipe._interrupt = True`` stops.
            backend: ``"auto"`` (Triton on CUDA when it imports, else torch), ``"torch"`` (the
                reference's ops), ``"triton"`` (fused kernels) or ``"cuda"`` (the same kernels as a CUDA C++
                extension); bit-identical in exact mode.
            noise: ``"exact"`` (the reference's noise stream, bit-identical results) or ``"fast"``
                (generated on the device, keyed per sample from ``generator``: with a generator list an
                image's noise depends only on its own generator; reproducible, but not the reference's
                stream).
            solver: ``"heun"`` (Algorithm 2, 2N - 1 model calls) or ``"euler"`` (N model calls).
            cuda_graph: ``"auto"`` (on CUDA with the Triton or CUDA backend, each step's model calls and
                kernels are captured once and replayed: same bits, far fewer launches; falls back to eager
                with one warning where the model cannot be captured), True (raise instead), False, or None
                (the default: ``kve_fast.graphs.DEFAULT_MODE``, which is "auto").
            unet_dtype: None (the UNet's own parameter dtype: ``pipe.unet.to(torch.bfloat16)`` runs it in
                bf16), or ``torch.float32`` / ``torch.bfloat16`` / ``torch.float16``; the sampler's state stays
                float32. A float32 UNet asked to run in bf16/fp16 runs under ``torch.autocast``. Not
                bit-exact with the reference (which cannot run a half-precision UNet at all).
            tf32: TF32 matmuls and convolutions for a float32 UNet on CUDA, for this call only.
            channels_last: keep the sampler's state and the UNet's input in channels_last memory (the
                Triton and CUDA backends; for a UNet converted with ``.to(memory_format=torch.channels_last)``,
                which then gives the same values as without it: convolutions pick their algorithm by layout).

        Returns:
            ``ImagePipelineOutput`` with ``.images``, or ``(images,)`` when ``return_dict`` is False.
        """
        if kwargs:
            raise TypeError(f"KarrasVePipeline got unexpected keyword arguments: {sorted(kwargs)}")
        # Only the pipeline's own arguments are checked here; the sampler checks the rest (steps,
        # generator, backend, noise, solver), all before any work.
        batch_size = check_int("batch_size", batch_size, 1)
        output_type = "np" if output_type is None else output_type
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        callback = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = self._image_shape(batch_size)
        if output_type == "pil" and not 1 <= shape[1] <= 4:
            raise ValueError(f"`output_type`='pil' needs images of 1 to 4 channels (L, LA, RGB, RGBA); the model's have "
                             f"{shape[1]} (`unet.config.in_channels`): use 'np', 'pt' or 'latent'")
        scheduler = _as_kve_scheduler(self.scheduler)

        output = {"latent": "latent", "pil": "uint8"}.get(output_type, "float")
        image = sample_karras_ve(
            self.unet, scheduler, shape, num_inference_steps, generator, self.device,
            backend=backend, noise=noise, callback=callback, progress=self.progress_bar, output=output,
            solver=solver, cuda_graph=cuda_graph, unet_dtype=unet_dtype, tf32=tf32, channels_last=channels_last,
        )
        # Leave the scheduler as the reference does after a call.
        self.scheduler.set_timesteps(num_inference_steps)
        return _pipeline_output(image, output_type, return_dict)
