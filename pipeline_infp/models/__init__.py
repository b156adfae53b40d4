from pipeline_infp.models.appearance_encoder import AppearanceEncoder
from pipeline_infp.models.audio_encoder import AudioEncoder
from pipeline_infp.models.face_decoder import FaceDecoder
from pipeline_infp.models.flow_estimator import FlowEstimator
from pipeline_infp.models.motion_encoder import MotionEncoder
from pipeline_infp.models.motion_guider import MotionGuider
from pipeline_infp.models.motion_transformer import MotionTransformer

__all__ = [
    "AppearanceEncoder",
    "AudioEncoder",
    "FaceDecoder",
    "FlowEstimator",
    "MotionEncoder",
    "MotionGuider",
    "MotionTransformer",
]
