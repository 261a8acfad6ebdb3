"""Vision backbones on longattn's attention: generated image data, training, parameter/multiply-add counts and
latency (``longattn vision ...``)."""

from .data import ImageData, pathfinder_images
from .measure import multiply_adds, paired_latency, parameters
from .train import VisionRunConfig, train_vision

__all__ = ["ImageData", "VisionRunConfig", "multiply_adds", "paired_latency", "parameters", "pathfinder_images",
           "train_vision"]
