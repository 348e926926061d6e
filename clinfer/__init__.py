"""clinfer: clinical ML inference on Triton Inference Server with Ray workers."""

__version__ = "0.1.0"
