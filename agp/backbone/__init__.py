"""Load models (embedded default + any mlx-lm path), segmented forward, hidden capture."""
from agp.backbone.backbone import Backbone, BackboneArgs, load

__all__ = ["Backbone", "BackboneArgs", "load"]
