from .pipeline_uae_dit import UAEDiTPipeline, UAEDiTPipelineOutput

__all__ = ["UAEDiTPipeline", "UAEDiTPipelineOutput"]
