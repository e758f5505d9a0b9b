"""Capture: one attention function that measures readout rows and ablates heads while the model runs."""

from vheads.capture.ablation import MODES as ABLATION_MODES
from vheads.capture.ablation import ablate
from vheads.capture.fastv import fastv
from vheads.capture.pruned_cache import PrunedCache, cache_bytes
from vheads.capture.recorder import READOUTS, RECORDED, HeadFigures, HeadRecorder
from vheads.capture.session import CaptureError, CaptureSession, Observer
from vheads.capture.tokens import TokenAttention
from vheads.models.layers import attention_layer_indices, config_attention_layers, language_layers

__all__ = [
    "ABLATION_MODES",
    "READOUTS",
    "RECORDED",
    "CaptureError",
    "CaptureSession",
    "HeadFigures",
    "HeadRecorder",
    "PrunedCache",
    "Observer",
    "TokenAttention",
    "ablate",
    "fastv",
    "attention_layer_indices",
    "cache_bytes",
    "config_attention_layers",
    "language_layers",
]
