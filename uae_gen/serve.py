"""`uae-gen serve`: a local Gradio playground for a saved UAEDiTPipeline.

    uae-gen serve --pipeline uae_gen_demo/pipeline          # then open http://127.0.0.1:7860

One pipeline is loaded once and shared by every request; Gradio's queue runs one generation at a time and turns
requests away with its "busy" message when ``max_queue`` are already waiting. While a request samples, the page
shows the decode of the first image's latent after every solver step (the pipeline's ``callback_on_step_end``),
so a band-progressive model is seen fixing the low frequencies first; at the end it shows the images, the
cumulative band previews of the first one (band 0, bands 0..1, ...) and offers the grid as a PNG whose text
chunks hold every setting, including the `uae-gen generate` command that writes the same pixels.

Gradio is the optional ``app`` extra: ``pip install -e ".[app]"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import queue
import re
import shlex
import socket
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from uae_gen.flow import SOLVERS
from uae_gen.pipelines.pipeline_uae_dit import GUIDANCE_MODES, UAEDiTPipeline
from uae_gen.training.image_grid import save_image_grid

MAX_STEPS = 1000  # one request must not hold the one shared model for hours


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines a request's pixels; written into the PNG download."""

    pipeline: str
    class_id: int
    class_name: str
    num_images: int
    steps: int
    guidance_scale: float
    guidance_interval: tuple[float, float]
    guidance: str
    solver: str
    seed: int
    device: str

    def generate_command(self, out: str) -> str:
        """The `uae-gen generate` line that writes the same grid (floats as repr, which reads back exactly)."""
        args = [
            "uae-gen", "generate", "--pipeline", self.pipeline,
            "--class-labels", *[str(self.class_id)] * self.num_images,
            "--steps", str(self.steps), "--guidance-scale", repr(self.guidance_scale),
            "--guidance-interval", *map(repr, self.guidance_interval), "--guidance", self.guidance,
            "--solver", self.solver, "--seed", str(self.seed), "--device", self.device, "--out", out,
        ]
        return shlex.join(args)

    def png_text(self, out: str) -> dict[str, str]:
        text = {key: " ".join(map(repr, value)) if isinstance(value, tuple) else str(value)
                for key, value in asdict(self).items()}
        return {**text, "command": self.generate_command(out), "Software": "uae-gen serve"}


def save_download(images: torch.Tensor, path: Path, text: dict[str, str]) -> None:
    """The grid `uae-gen generate` writes for ``images`` (N, 3, H, W) in [0, 1], plus ``text`` as PNG text chunks.

    Written to a temporary name and renamed (atomic for a reader), with open() rather than mkstemp, so the file
    is readable like any new file (0644 under the usual umask), not 0600."""
    grid_path, temp_path = path.with_name(f".grid-{path.name}"), path.with_name(f".tmp-{path.name}")
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    try:
        save_image_grid(images, str(grid_path), nrow=len(images), value_range=(0, 1))
        with Image.open(grid_path) as grid:
            grid.save(temp_path, format="PNG", pnginfo=info)
        os.replace(temp_path, path)
    finally:
        for leftover in (grid_path, temp_path):
            leftover.unlink(missing_ok=True)


@dataclass
class GenerationResult:
    images: list  # PIL images, as UAEDiTPipeline(...).images with output_type="pil"
    band_previews: list  # PIL images: bands 0..k of the first image, k = 0..K-1
    download: Path
    command: str


class Playground:
    """The loaded pipeline and what the page may ask of it."""

    def __init__(self, pipeline_dir: str, device: str = "cpu", max_images: int = 8):
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.pipeline_dir = str(Path(pipeline_dir).resolve())
        self.device = device
        self.max_images = max_images
        self.pipe = UAEDiTPipeline.from_pretrained(self.pipeline_dir).to(device)
        self.pipe.set_progress_bar_config(disable=True)  # the page has its own progress bar
        self.num_classes = self.pipe.transformer.config.num_classes
        self.download_dir = Path(tempfile.mkdtemp(prefix="uae-gen-serve-"))
        # The pipeline's scheduler keeps per-call state (grid, step index, solver): one call at a time, even when
        # a cancelled request's sampling thread is still finishing.
        self._lock = threading.Lock()

    # ---- what the loaded model supports -----------------------------------------------------------------------
    @property
    def supports_cfg(self) -> bool:
        return self.pipe.transformer.config.class_dropout_prob > 0

    @property
    def guidance_modes(self) -> list[str]:
        return [mode for mode in GUIDANCE_MODES if mode == "cfg" or self.pipe.guide_transformer is not None]

    def class_choices(self) -> list[tuple[str, str]]:
        """(shown text, value) per class: "golden retriever (207)" -> "207"; ids alone without names."""
        return [(f"{self.pipe.id2label[i]} ({i})" if i in self.pipe.id2label else str(i), str(i))
                for i in range(self.num_classes)]

    def guidance_windows(self) -> dict[str, tuple[float, float]]:
        """Guidance intervals from the band schedule: the whole run and the window in which each band moves."""
        schedule = self.pipe.scheduler.band_schedule
        windows = {"whole run": (0.0, schedule.horizon)}
        for k in range(schedule.num_bands):
            lo, hi = schedule.band_window(k)
            if (lo, hi) != (0.0, schedule.horizon):
                windows[f"band {k} moving ({lo:.3g} to {hi:.3g})"] = (lo, hi)
        return windows

    def describe(self) -> str:
        config, schedule = self.pipe.scheduler.config, self.pipe.scheduler.band_schedule
        height, width = self.pipe.vae.latent_size
        transformer = self.pipe.transformer.config
        tokens = ""
        if transformer.frequency_tokens:  # the DiT generates DCT coefficients, lowest frequencies first
            tokens = (f", {transformer.frequency_tokens // transformer.coefficients_per_token} frequency tokens "
                      f"({transformer.frequency_tokens} DCT coefficients per channel)")
        return (f"`{self.pipeline_dir}` on {self.device}: {self.num_classes} classes, latent "
                f"{self.pipe.vae.latent_channels}x{height}x{width}{tokens}, {schedule.num_bands} band(s), "
                f"{config.band_clock} band clocks, stagger {schedule.stagger:g}")

    # ---- page inputs -> settings ------------------------------------------------------------------------------
    def class_id(self, text) -> int:
        text = "" if text is None else str(text).strip()
        if not text:
            raise ValueError("choose a class: a name from the list or a class id")
        if text.isdigit():
            return int(text)  # the range is checked with the other inputs
        if text.lower() not in self.pipe.labels:
            raise ValueError(f"unknown class name {text!r}: choose a name from the list or type a class id "
                             f"(0 to {self.num_classes - 1})")
        return self.pipe.labels[text.lower()]

    def settings(self, class_text, num_images, steps, guidance_scale, guidance, guidance_lo, guidance_hi, solver,
                 seed) -> GenerationSettings:
        """Checked page inputs; a ValueError names the first bad one."""
        class_id = self.class_id(class_text)
        if not _is_whole(num_images) or not 1 <= num_images <= self.max_images:
            raise ValueError(f"number of images must be a whole number from 1 to {self.max_images}, "
                             f"got {num_images!r}")
        if not _is_whole(steps) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
        for name, value in [("guidance scale", guidance_scale), ("guidance interval start", guidance_lo),
                            ("guidance interval end", guidance_hi)]:
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not _is_whole(seed) or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        settings = GenerationSettings(
            pipeline=self.pipeline_dir, class_id=class_id, class_name=self.pipe.id2label.get(class_id, ""),
            num_images=int(num_images), steps=int(steps), guidance_scale=float(guidance_scale),
            guidance_interval=(float(guidance_lo), float(guidance_hi)), guidance=guidance, solver=solver,
            seed=int(seed), device=self.device,
        )
        # The rest (class id range, interval order, CFG on a model trained without class dropout, ...): the
        # pipeline's own checks, with its messages.
        self.pipe.check_inputs([class_id] * settings.num_images, settings.guidance_scale, settings.guidance_interval,
                               guidance, settings.steps, None, "pt", ("latents",), True)
        return settings

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(self, settings: GenerationSettings, on_step=None) -> GenerationResult:
        """Sample as `UAEDiTPipeline.__call__` does; ``on_step(step, image)`` gets the first image's decode after
        each solver step."""

        def decode_step(pipe, step, timestep, tensors):
            preview, _ = pipe.decode_latents(tensors["latents"][:1], "pil", False)
            on_step(step, preview[0])
            return {}  # the latents continue unchanged

        with self._lock:
            self.pipe.scheduler.register_to_config(solver=settings.solver)
            output = self.pipe(
                class_labels=[settings.class_id] * settings.num_images, guidance_scale=settings.guidance_scale,
                guidance_interval=settings.guidance_interval, guidance=settings.guidance,
                num_inference_steps=settings.steps, generator=torch.Generator().manual_seed(settings.seed),
                output_type="pt", return_band_previews=True,
                callback_on_step_end=decode_step if on_step is not None else None,
            )
        images = output.images.cpu()
        name = re.sub(r"[^a-z0-9]+", "-", settings.class_name.split(",")[0].lower()).strip("-") or "class"
        # Equal settings give equal pixels, so they may share one file name.
        digest = hashlib.sha256(settings.generate_command("").encode()).hexdigest()[:10]
        download = self.download_dir / f"{name}-{settings.class_id}-seed{settings.seed}-{digest}.png"
        command = settings.generate_command(download.name)
        save_download(images, download, settings.png_text(download.name))
        return GenerationResult(images=_to_pil(images), band_previews=[_to_pil(p[:1])[0] for p in output.band_previews],
                                download=download, command=command)


def _is_whole(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and value == int(value)


def _to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) in [0, 1] -> PIL images, the conversion of the pipeline's output_type="pil"."""
    return UAEDiTPipeline.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())


def build_app(playground: Playground) -> gr.Blocks:
    windows = playground.guidance_windows()
    whole_run = windows["whole run"]
    with gr.Blocks(title="uae-gen playground", analytics_enabled=False) as app:
        gr.Markdown(f"## uae-gen playground\n{playground.describe()}")
        with gr.Row():
            with gr.Column(scale=1):
                choices = playground.class_choices()
                class_box = gr.Dropdown(choices, value=choices[0][1], label="class", allow_custom_value=True,
                                        info="type to search names, or type a class id", elem_id="class")
                num_images = gr.Number(min(4, playground.max_images), precision=0, label="number of images",
                                       info=f"1 to {playground.max_images}", elem_id="num-images")
                steps = gr.Number(25, precision=0, label="steps", elem_id="steps")
                guidance_scale = gr.Number(4.0 if playground.supports_cfg else 1.0, label="guidance scale",
                                           info=None if playground.supports_cfg
                                           else "1 only: this model was trained without class dropout",
                                           interactive=playground.supports_cfg, elem_id="guidance-scale")
                guidance = gr.Dropdown(playground.guidance_modes, value="cfg", label="guidance",
                                       visible=len(playground.guidance_modes) > 1)
                window = gr.Dropdown(list(windows), value="whole run", label="guidance window (band schedule)",
                                     visible=len(windows) > 1)
                with gr.Row():
                    guidance_lo = gr.Number(whole_run[0], label="guidance from t", elem_id="guidance-lo")
                    guidance_hi = gr.Number(whole_run[1], label="guidance to t", elem_id="guidance-hi")
                solver = gr.Dropdown(list(SOLVERS), value=playground.pipe.scheduler.config.solver, label="solver")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed", scale=3)
                    random_seed = gr.Button("random", elem_id="random-seed", scale=1)
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                images = gr.Gallery(label="images", format="png", columns=4, elem_id="images")
                strip = gr.Gallery(label="sampling: the first image's latent decoded after each step", format="png",
                                   columns=7, height=200, elem_id="live-strip")
                band_previews = gr.Gallery(label="cumulative bands of the first image (band 0, 0..1, ...)",
                                           format="png", columns=7, fit_columns=False, height=120,
                                           elem_id="band-previews")
                download = gr.DownloadButton("Download PNG (settings in its text chunks)", visible=False,
                                             elem_id="download")
                command = gr.Textbox(label="the same image from the shell", interactive=False, elem_id="command")

        # In the browser, so that a Generate clicked right after sees the new values (a server round trip could
        # lose that race).
        window.change(None, window, [guidance_lo, guidance_hi], js=f"(name) => ({json.dumps(windows)})[name]",
                      api_name=False)
        random_seed.click(None, None, seed, js="() => Math.floor(Math.random() * 2 ** 31)", api_name=False)

        def run(class_text, num_images, steps, guidance_scale, guidance, guidance_lo, guidance_hi, solver, seed,
                progress=gr.Progress()):
            try:
                settings = playground.settings(class_text, num_images, steps, guidance_scale, guidance, guidance_lo,
                                               guidance_hi, solver, seed)
            except ValueError as error:
                raise gr.Error(str(error)) from error
            # The pipeline runs in a thread so that this generator can stream its per-step decodes to the page.
            updates, outcome = queue.SimpleQueue(), {}

            def sample():
                try:
                    outcome["result"] = playground.generate(settings, lambda step, image: updates.put((step, image)))
                except Exception as error:  # reported in the page below
                    outcome["error"] = error
                finally:
                    updates.put(None)

            threading.Thread(target=sample, daemon=True).start()
            decoded = []
            while (update := updates.get()) is not None:
                step, image = update
                decoded.append((image, f"step {step + 1}"))
                progress((step + 1, settings.steps), desc="sampling")
                yield gr.skip(), decoded, gr.skip(), gr.skip(), gr.skip()
            if "error" in outcome:
                raise gr.Error(f"generation failed: {outcome['error']}")
            result = outcome["result"]
            name = f"{settings.class_name} ({settings.class_id})" if settings.class_name else str(settings.class_id)
            captions = [f"{name}, seed {settings.seed}, #{i + 1}" for i in range(settings.num_images)]
            bands = [(image, f"bands 0..{k}" if k else "band 0") for k, image in enumerate(result.band_previews)]
            yield (list(zip(result.images, captions)), decoded, bands,
                   gr.DownloadButton(value=str(result.download), visible=True), result.command)

        generate.click(run, [class_box, num_images, steps, guidance_scale, guidance, guidance_lo, guidance_hi, solver,
                             seed], [images, strip, band_previews, download, command], api_name="generate",
                       concurrency_limit=1)
    return app


def check_port_free(host: str, port: int) -> None:
    """Raise ValueError naming host and port when this process cannot listen there (in use, or not an address
    of this machine)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"cannot serve on {host}:{port} ({error.strerror}): choose another --port or --host") \
                from None


def serve(pipeline_dir: str, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", max_images: int = 8,
          max_queue: int = 16) -> None:
    """Load the pipeline once and serve the playground until interrupted."""
    check_port_free(host, port)  # before the model loads, and with one message instead of a server traceback
    playground = Playground(pipeline_dir, device, max_images)
    app = build_app(playground)
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, allowed_paths=[str(playground.download_dir)], ssr_mode=False,
               footer_links=["api"])
