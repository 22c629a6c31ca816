"""visae: sparse autoencoders on vision models, reproducibly."""

__version__ = "0.1.0"
