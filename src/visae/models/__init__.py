"""Backbone registry and activation recording: one interface over open_clip, timm and visae's own ViTs."""

from visae.models.backbone import Backbone, TokenLayout
from visae.models.registry import SOURCES, load_backbone, parse_model_arg

__all__ = ["Backbone", "TokenLayout", "SOURCES", "load_backbone", "parse_model_arg"]
