"""The preprocessing plan: what a run records (``plan.json``) so that every scan is preprocessed
the way its training data were. Pure data; :mod:`volseg.planning` makes it and
:mod:`volseg.preprocessing` replays it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Tuple

__all__ = ["ChannelNorm", "PreprocessingPlan"]


@dataclass(frozen=True)
class ChannelNorm:
    scheme: str  # "ct" | "zscore" | "none"
    lo: float = 0.0
    hi: float = 0.0
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class PreprocessingPlan:
    """Everything needed to replay preprocessing on a new scan; stored as ``plan.json``."""

    spacing: Tuple[float, float, float]  # target mm, canonical (x, y, z) axis order
    orientation: str
    channels: Tuple[str, ...]  # modality name per input channel
    norms: Tuple[ChannelNorm, ...]
    label_values: Tuple[int, ...]  # class index -> label value written in outputs; [0] = background
    label_names: Tuple[str, ...]
    spatial_dims: int
    patch_size: Tuple[int, ...]
    slice_axis: int

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def binary(self) -> bool:
        """A single foreground label: the network has one sigmoid output."""
        return self.num_classes == 2

    @property
    def out_channels(self) -> int:
        return 1 if self.binary else self.num_classes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PreprocessingPlan:
        d = json.loads(text)
        d["norms"] = tuple(ChannelNorm(**n) for n in d["norms"])
        for k in ("spacing", "channels", "label_values", "label_names", "patch_size"):
            d[k] = tuple(d[k])
        return cls(**d)
