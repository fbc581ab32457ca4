"""uae_gen: latent diffusion on the UAE ("Prism Hypothesis") latent.

Importing the package imports every component module, so that ``UAEDiTPipeline.from_pretrained(dir)`` can
resolve the classes recorded in ``model_index.json`` (diffusers looks them up in ``sys.modules`` only).
"""

from .flow import BandSchedule, FlowMatchBandScheduler, flow_matching_loss, sample_ode
from .models.autoencoder_uae import AutoencoderUAE
from .models.bands import BandProjector
from .models.dit import UAEDiT
from .pipelines.pipeline_uae_dit import UAEDiTPipeline, UAEDiTPipelineOutput

__all__ = [
    "AutoencoderUAE",
    "BandProjector",
    "BandSchedule",
    "FlowMatchBandScheduler",
    "UAEDiT",
    "UAEDiTPipeline",
    "UAEDiTPipelineOutput",
    "flow_matching_loss",
    "sample_ode",
]
