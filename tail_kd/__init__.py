"""tail-kd: distil decoder language models with the tail-aware divergence (TAD) in one DeepSpeed job."""

__version__ = "0.1.0"
