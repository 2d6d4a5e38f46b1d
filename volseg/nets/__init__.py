"""Networks: one builder and one registry for the U-Net family.

``build_network(cfg)`` maps ``(B, in_channels, *spatial)`` to logits ``(B, out_channels, *spatial)``
for ``cfg.spatial_dims`` 2 or 3; see :class:`volseg.nets.unet.UNetFamily` for deep supervision.
"""

from volseg.nets.unet import (
    NETWORKS,
    UNetFamily,
    build_network,
    count_parameters,
    receptive_field,
    summarize,
)

__all__ = ["NETWORKS", "UNetFamily", "build_network", "count_parameters", "receptive_field", "summarize"]
