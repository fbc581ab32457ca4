"""UAEDiTPipeline: class-conditional image generation on the UAE latent.

    pipe = UAEDiTPipeline.from_pretrained("path/to/pipeline")
    image = pipe(class_labels=[207], num_inference_steps=50).images[0]      # or class_labels=["golden retriever"]

Noise (B, C, h, w) -> the UAEDiT velocity integrated from t=1 (noise) to t~0 (data) by the scheduler's solver
(Euler, Heun or RK4), with classifier-free guidance (one forward on the doubled batch, inside a guidance interval)
or AutoGuidance against an optional weaker ``guide_transformer`` -> ``vae.decode`` -> images. A model trained
with the band-progressive schedule fixes the low frequencies first; ``return_band_previews=True`` also decodes
the cumulative bands (band 0, bands 0..1, ...) of the final latent, and the clean latent the sampler predicts at a
few steps along the way, which shows the low bands settling before the high ones.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from uae_gen.flow import FlowMatchBandScheduler, guided_velocity_fn
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import UAEDiT

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_MODES = ("cfg", "autoguidance")
NUM_STEP_PREVIEWS = 5  # evenly spaced steps, the last one included


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names shipped with the package (index -> name)."""
    text = resources.files("uae_gen.data").joinpath("imagenet_classes.json").read_text()
    return {int(k): v for k, v in json.loads(text).items()}


@dataclass
class UAEDiTPipelineOutput(ImagePipelineOutput):
    """images as in ``ImagePipelineOutput``; band_previews[k] holds the decode of bands 0..k of the final latent,
    step_previews[j] the decode of the clean latent predicted at the step ending at time step_preview_times[j]
    (same type)."""

    band_previews: Optional[list] = None
    step_previews: Optional[list] = None
    step_preview_times: Optional[list] = None


class UAEDiTPipeline(DiffusionPipeline):
    r"""Class-conditional generation with a UAEDiT on the latent of an AutoencoderUAE.

    Args:
        transformer: the velocity model.
        vae: the UAE tokenizer; its ``decode`` takes the normalised latent the transformer generates.
        scheduler: a ``FlowMatchBandScheduler`` (time grid, shift, solver).
        guide_transformer: optional weaker model for AutoGuidance (``guidance="autoguidance"``).
        id2label: class index -> name; names may hold comma-separated synonyms. Defaults to ImageNet's names
            when the transformer has 1000 classes.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["guide_transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: UAEDiT,
        vae: AutoencoderUAE,
        scheduler: FlowMatchBandScheduler,
        guide_transformer: Optional[UAEDiT] = None,
        id2label: Optional[dict] = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler,
                              guide_transformer=guide_transformer)
        if id2label is None and transformer.config.num_classes == 1000:
            id2label = imagenet_id2label()
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        # JSON keys are strings; register_to_config makes id2label travel with save_pretrained.
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()})
        self.id2label = id2label
        self.labels = {
            name.strip().lower(): index for index, names in id2label.items() for name in names.split(",")
        }

    def set_attention_backend(self, backend: str) -> None:
        """Attention backend of the transformer (and the AutoGuidance guide): "sdpa", "xformers" or "auto"; see
        `UAEDiT.set_attention_backend`. Fails at once when xformers is asked for and not installed."""
        for transformer in (self.transformer, self.guide_transformer):
            if transformer is not None:
                transformer.set_attention_backend(backend)

    # ---- labels ---------------------------------------------------------------------------------------------
    def get_label_ids(self, label: Union[str, Sequence[str]]) -> list[int]:
        """Class names (case-insensitive, any synonym) -> ids."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n.strip().lower() not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; known names are in pipe.id2label")
        return [self.labels[n.strip().lower()] for n in names]

    @staticmethod
    def _label_list(class_labels) -> list:
        """One id or name, a sequence of them, or an integer tensor / array -> a flat list."""
        if isinstance(class_labels, (torch.Tensor, np.ndarray, np.generic)):
            return class_labels.reshape(-1).tolist()
        if isinstance(class_labels, str) or not isinstance(class_labels, Iterable):
            return [class_labels]
        return list(class_labels)

    # ---- the steps of __call__ ------------------------------------------------------------------------------
    def check_inputs(
        self,
        class_labels,
        guidance_scale,
        guidance_interval,
        guidance,
        num_inference_steps,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
        return_band_previews,
    ):
        """Every argument of ``__call__`` is checked here, once; nothing later validates (or syncs to validate)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if return_band_previews and output_type == "latent":
            raise ValueError("band previews are decoded images: use an image output_type")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
        if guidance == "autoguidance" and self.guide_transformer is None:
            raise ValueError("guidance='autoguidance' needs a guide_transformer in the pipeline")
        if not _is_finite_number(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        interval = tuple(guidance_interval) if isinstance(guidance_interval, Iterable) else (guidance_interval,)
        if len(interval) != 2 or not all(map(_is_finite_number, interval)) or interval[0] > interval[1]:
            raise ValueError(f"guidance_interval must be (lo, hi), finite numbers with lo <= hi, "
                             f"got {guidance_interval!r}")
        if guidance_scale != 1.0 and guidance == "cfg" and self.transformer.config.class_dropout_prob <= 0:
            raise ValueError("classifier-free guidance needs a transformer trained with class_dropout_prob > 0")
        unknown_inputs = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                             f"got {unknown_inputs}")

        labels, num_classes = self._label_list(class_labels), self.transformer.config.num_classes
        if not labels:
            raise ValueError("class_labels is empty: give at least one class id or name")
        for position, label in enumerate(labels):
            if isinstance(label, str):
                self.get_label_ids(label)
            elif isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise ValueError(f"class_labels[{position}] = {label!r} is neither an integer class id nor a name")
            elif not 0 <= label < num_classes:
                raise ValueError(f"class label {label} out of range: this model has classes 0..{num_classes - 1}")
        model_times = self.transformer.config.num_time_embeddings
        schedule_times = self.scheduler.band_schedule.num_model_times
        if model_times != schedule_times:
            raise ValueError(f"the transformer takes num_time_embeddings={model_times} times but the scheduler's band "
                             f"schedule gives {schedule_times} (band_clock={self.scheduler.config.band_clock!r})")
        lowpass, tokens = self.vae.config.dct_lowpass_coefficients, self.transformer.config.frequency_tokens
        if tokens is not None and tokens != lowpass:
            raise ValueError(f"the transformer runs on frequency_tokens={tokens} DCT coefficients but the autoencoder's "
                             f"latent keeps dct_lowpass_coefficients={lowpass}: they must be equal")
        shape = self._latent_shape(len(labels))
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {len(labels)} labels, got {tuple(latents.shape)}")

    def prepare_class_labels(self, class_labels, device) -> torch.Tensor:
        """Checked class ids or names -> (B,) long tensor on ``device``."""
        ids = [self.labels[c.strip().lower()] if isinstance(c, str) else int(c) for c in self._label_list(class_labels)]
        return torch.tensor(ids, device=device, dtype=torch.long)

    def prepare_latents(self, batch_size, device, generator=None, latents=None) -> torch.Tensor:
        """Initial noise (B, C, h, w) in float32: drawn from ``generator``, or the given ``latents`` moved over.
        A frequency-token transformer sees and moves only the low-pass part, so its noise is low-passed up front
        (a spatial model on a frequency-limited latent starts from full-band noise, as it was trained)."""
        if latents is None:
            latents = randn_tensor(self._latent_shape(batch_size), generator=generator, device=device,
                                   dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        return self._lowpass(latents) if self.transformer.config.frequency_tokens else latents

    def prepare_velocity_fns(self, class_labels, guidance_scale, guidance_interval, guidance) -> list[Callable]:
        """One ``(x, t) -> v`` callable per step of the scheduler's grid (call after ``set_timesteps``).

        A step whose times [t_next, t] all lie outside ``guidance_interval`` runs the transformer alone; the other
        steps run guidance, applied (as a mask on t) at the evaluation times inside the interval. The grid is read
        to the host once, here, so the loop never reads a device value to decide.
        """
        model = self._model_fn(self.transformer)
        unguided = guided_velocity_fn(model, class_labels)
        if guidance_scale == 1.0:
            return [unguided] * self.scheduler.num_inference_steps
        guide = self._model_fn(self.guide_transformer) if guidance == "autoguidance" else None
        lo, hi = guidance_interval
        guided = guided_velocity_fn(model, class_labels, guidance_scale, (lo, hi),
                                    null_class_id=self.transformer.config.num_classes, guide_fn=guide)
        grid = self.scheduler.time_grid
        # The same float comparison as the guidance mask, so host and device agree on every time.
        steps_guided = ((grid[:-1] >= lo) & (grid[1:] <= hi)).tolist()
        return [guided if step_guided else unguided for step_guided in steps_guided]

    def clean_prediction_coefficients(self, steps) -> dict[int, tuple]:
        """Step index -> (c (K,), the time the step ends at) for each of `steps`. The clean latent the step from x
        (band times t_k) to x' (t'_k) points at is x + sum_k c_k band_k(x' - x) with c_k = t_k / (t_k - t'_k): the
        step's velocity extrapolated to t_k = 0 (c_k = 0 for a band that does not move in that step; exact for one
        clock and for shifted clocks, whose drift the sampler masks). Computed on the host before the loop."""
        grid = self.scheduler.time_grid.cpu().double()
        times = self.scheduler.band_schedule.band_times(grid)  # (steps + 1, K)
        coefficients = {}
        for i in steps:
            moved = times[i] - times[i + 1]
            c = torch.where(moved != 0, times[i] / moved.where(moved != 0, 1.0), 0.0)
            coefficients[i] = (c.float(), float(grid[i + 1]))
        return coefficients

    def predict_clean(self, before, after, coefficients) -> torch.Tensor:
        """The clean latent one step points at (see ``clean_prediction_coefficients``)."""
        bands = self.vae.split_bands(after - before)  # (B, K, ...): the bands the schedule runs on
        weights = coefficients.to(bands.device, bands.dtype).reshape(1, -1, *([1] * (bands.ndim - 2)))
        return before + (weights * bands).sum(1)

    def decode_latents(self, latents, output_type, return_band_previews):
        """Final latent -> (images, band previews or None) of ``output_type``."""
        latents = self._lowpass(latents)  # a spatial model's velocity may leave the frequency-limited subspace
        images, previews = latents, None
        if output_type != "latent":
            images = self._to_output(self.vae.decode(latents.to(self.vae.dtype)).sample, output_type)
        if return_band_previews:
            # Bands of the raw (un-normalised) latent: band 0 alone is the semantic layout the decoder sees.
            bands = self.vae.split_bands(self.vae.denormalize_latents(latents.to(self.vae.dtype)))
            previews = [
                self._to_output(self.vae.decode_raw(bands[:, : k + 1].sum(1))[0], output_type)
                for k in range(bands.shape[1])
            ]
        return images, previews

    # ---- helpers --------------------------------------------------------------------------------------------
    def _lowpass(self, latents: torch.Tensor) -> torch.Tensor:
        count = self.vae.config.dct_lowpass_coefficients
        return latents if count is None else self.vae.lowpass(latents, count)

    def _model_fn(self, transformer: UAEDiT) -> Callable:
        # Shifted band clocks: the model sees the K band times and each band's drift stops outside its window.
        schedule = self.scheduler.band_schedule

        def velocity(x, t, labels):
            v = transformer(x.to(transformer.dtype), schedule.model_times(t), labels).sample.to(x.dtype)
            return schedule.mask_drift(v, t, self.vae.split_bands)

        return velocity

    def _latent_shape(self, batch_size: int) -> tuple:
        return (batch_size, self.vae.latent_channels, *self.vae.latent_size)

    @staticmethod
    def _to_output(images: torch.Tensor, output_type: str):
        """Decoded images in [-1, 1] -> the requested output type, values in [0, 1]."""
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        return DiffusionPipeline.numpy_to_pil(images) if output_type == "pil" else images

    # ---- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, str, Sequence[Union[int, str]], torch.Tensor],
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        guidance: str = "cfg",
        num_inference_steps: int = 50,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_band_previews: bool = False,
    ):
        r"""Generate images of the given classes.

        Check -> prepare -> denoising loop -> decode. The loop reads nothing from the device: the scheduler
        counts its steps and which steps are guided is decided before it (``prepare_velocity_fns``).

        Args:
            class_labels: class ids or names (``"golden retriever"``), one image each.
            guidance_scale: CFG scale s in v = v_u + s (v_c - v_u) (1 = no guidance), or the AutoGuidance weight.
            guidance_interval: (t_lo, t_hi) in the scheduler's (shifted) time where guidance applies.
            guidance: "cfg" or "autoguidance" (needs ``guide_transformer``).
            num_inference_steps: solver steps from t=1 to the end of the grid.
            generator: torch generator(s) for the initial noise.
            latents: initial noise (B, C, h, w) instead of sampling it.
            output_type: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent" (normalised latent).
            return_dict: return a ``UAEDiTPipelineOutput`` rather than a tuple.
            callback_on_step_end: ``fn(pipe, step_index, timestep, callback_kwargs) -> dict`` called after each
                step (or a diffusers ``PipelineCallback``); a ``"latents"`` entry in the returned dict replaces
                the latents the loop continues from.
            callback_on_step_end_tensor_inputs: the tensors put in ``callback_kwargs``; ``_callback_tensor_inputs``
                lists the allowed ones.
            return_band_previews: also decode cumulative bands of the final latent and the clean latent predicted
                at NUM_STEP_PREVIEWS evenly spaced steps.
        Returns:
            ``UAEDiTPipelineOutput`` (an ``ImagePipelineOutput``), or a tuple when ``return_dict=False``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(class_labels, guidance_scale, guidance_interval, guidance, num_inference_steps, latents,
                          output_type, callback_on_step_end_tensor_inputs, return_band_previews)
        device = self._execution_device
        labels = self.prepare_class_labels(class_labels, device)
        latents = self.prepare_latents(len(labels), device, generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        velocity_fns = self.prepare_velocity_fns(labels, guidance_scale, guidance_interval, guidance)

        last = self.scheduler.num_inference_steps - 1
        shown = {round(j * last / max(NUM_STEP_PREVIEWS - 1, 1)) for j in range(NUM_STEP_PREVIEWS)}
        preview_steps = self.clean_prediction_coefficients(sorted(shown)) if return_band_previews else {}
        predicted = []

        self.scheduler.set_begin_index(0)  # count the steps: no per-step timestep lookup on the host
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            before = latents
            latents = self.scheduler.solver_step(velocity_fns[i], t, latents).prev_sample
            if i in preview_steps:
                predicted.append(self.predict_clean(before, latents, preview_steps[i][0]))
            if callback_on_step_end is not None:
                step_tensors = {"latents": latents}
                callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, callback_kwargs).pop("latents", latents)

        images, previews = self.decode_latents(latents, output_type, return_band_previews)
        step_previews = [self.decode_latents(x, output_type, False)[0] for x in predicted] or None
        step_times = [time for _, time in preview_steps.values()] or None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, previews, step_previews, step_times) if return_band_previews else (images,)
        return UAEDiTPipelineOutput(images=images, band_previews=previews, step_previews=step_previews,
                                    step_preview_times=step_times)


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
