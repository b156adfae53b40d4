"""Open implementation of INFP: audio-driven interactive head generation for dyadic conversations."""

from pipeline_infp.hub import export_for_hub
from pipeline_infp.models import (
    AppearanceEncoder,
    AudioEncoder,
    FaceDecoder,
    FlowEstimator,
    MotionEncoder,
    MotionGuider,
    MotionTransformer,
)
from pipeline_infp.pipeline_infp import INFPPipeline, INFPPipelineOutput
from pipeline_infp.presets import build_pipeline

__all__ = [
    "AppearanceEncoder",
    "AudioEncoder",
    "FaceDecoder",
    "FlowEstimator",
    "INFPPipeline",
    "INFPPipelineOutput",
    "MotionEncoder",
    "MotionGuider",
    "MotionTransformer",
    "build_pipeline",
    "export_for_hub",
]
