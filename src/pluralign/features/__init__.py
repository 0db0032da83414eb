"""Feature maps: from (context, response) to the vectors reward models are linear in."""

from pluralign.features.rtv import RTVMap, rtv_features

__all__ = ["RTVMap", "rtv_features"]
