"""Feature maps: from (context, response) to the vectors reward models are linear in."""

from pluralign.features.rtv import RTVMap, rtv_features
from pluralign.features.text import TextEncoder

__all__ = ["RTVMap", "TextEncoder", "rtv_features"]
