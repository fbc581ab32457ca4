"""UAEDiTPipeline: class-conditional image generation on the UAE latent.

    pipe = UAEDiTPipeline.from_pretrained("path/to/pipeline")
    image = pipe(class_labels=[207], num_inference_steps=50).images[0]      # or class_labels=["golden retriever"]

Noise (B, C, h, w) -> the UAEDiT velocity integrated from t=1 (noise) to t~0 (data) by the scheduler's solver
(Euler, Heun or RK4), with classifier-free guidance (one forward on the doubled batch, inside a guidance interval)
or AutoGuidance against an optional weaker ``guide_transformer`` -> ``vae.decode`` -> images. A model trained
with the band-progressive schedule fixes the low frequencies first; ``return_band_previews=True`` also decodes
the cumulative bands (band 0, bands 0..1, ...) of the final latent to show that structure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional, Sequence, Union

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from uae_gen.flow import FlowMatchBandScheduler, guided_velocity_fn
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import UAEDiT

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_MODES = ("cfg", "autoguidance")


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names shipped with the package (index -> name)."""
    text = resources.files("uae_gen.data").joinpath("imagenet_classes.json").read_text()
    return {int(k): v for k, v in json.loads(text).items()}


@dataclass
class UAEDiTPipelineOutput(ImagePipelineOutput):
    """images as in ``ImagePipelineOutput``; band_previews[k] holds the decode of bands 0..k (same type)."""

    band_previews: Optional[list] = None


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

    # ---- labels ---------------------------------------------------------------------------------------------
    def get_label_ids(self, label: Union[str, Sequence[str]]) -> list[int]:
        """Class names (case-insensitive, any synonym) -> ids."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n.strip().lower() not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; known names are in pipe.id2label")
        return [self.labels[n.strip().lower()] for n in names]

    def _class_label_tensor(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        class_labels = list(class_labels)
        if not class_labels:
            raise ValueError("class_labels is empty: give at least one class id or name")
        ids = [self.get_label_ids(c)[0] if isinstance(c, str) else int(c) for c in class_labels]
        num_classes = self.transformer.config.num_classes
        bad = [i for i in ids if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"class label(s) {bad} out of range: this model has classes 0..{num_classes - 1}")
        return torch.tensor(ids, device=self._execution_device, dtype=torch.long)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _model_fn(self, transformer: UAEDiT) -> Callable:
        def velocity(x, t, labels):
            return transformer(x.to(transformer.dtype), t, labels).sample.to(x.dtype)

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
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_band_previews: bool = False,
    ):
        r"""Generate images of the given classes.

        Args:
            class_labels: class ids or names (``"golden retriever"``), one image each.
            guidance_scale: CFG scale s in v = v_u + s (v_c - v_u) (1 = no guidance), or the AutoGuidance weight.
            guidance_interval: (t_lo, t_hi) in the scheduler's (shifted) time where guidance applies.
            guidance: "cfg" or "autoguidance" (needs ``guide_transformer``).
            num_inference_steps: solver steps from t=1 to the end of the grid.
            generator: torch generator(s) for the initial noise.
            latents: initial noise (B, C, h, w) instead of sampling it.
            output_type: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent" (normalised latent).
            callback_on_step_end: ``fn(pipe, step, t, callback_kwargs) -> dict``, may replace ``latents``.
            return_band_previews: also decode cumulative bands of the final latent.
        Returns:
            ``UAEDiTPipelineOutput`` (an ``ImagePipelineOutput``), or a tuple when ``return_dict=False``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
        if guidance == "autoguidance" and self.guide_transformer is None:
            raise ValueError("guidance='autoguidance' needs a guide_transformer in the pipeline")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if return_band_previews and output_type == "latent":
            raise ValueError("band previews are decoded images: use an image output_type")
        labels = self._class_label_tensor(class_labels)
        device, shape = self._execution_device, self._latent_shape(len(labels))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {len(labels)} labels, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        if guidance_scale != 1.0 and guidance == "cfg" and self.transformer.config.class_dropout_prob <= 0:
            raise ValueError("classifier-free guidance needs a transformer trained with class_dropout_prob > 0")
        guide = self._model_fn(self.guide_transformer) if guidance == "autoguidance" else None
        velocity_fn = guided_velocity_fn(
            self._model_fn(self.transformer), labels, guidance_scale, tuple(guidance_interval),
            null_class_id=self.transformer.config.num_classes, guide_fn=guide,
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for step, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            latents = self.scheduler.solver_step(velocity_fn, t, latents).prev_sample
            if callback_on_step_end is not None:
                local_vars = {"latents": latents}
                outputs = callback_on_step_end(self, step, t, {k: local_vars[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.get("latents", latents)

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
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, previews) if return_band_previews else (images,)
        return UAEDiTPipelineOutput(images=images, band_previews=previews)
