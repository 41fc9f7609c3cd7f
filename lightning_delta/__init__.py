"""lightning_delta: edit the delta parameters of post-trained models and measure the loss change (Riemann view)."""

__version__ = "0.1.0"
