"""The preprocessing plan: what a run records (``plan.json``) so that every scan is preprocessed
the way its training data were. Pure data; :mod:`volseg.planning` makes it and
:mod:`volseg.preprocessing` replays it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

__all__ = ["ChannelNorm", "PreprocessingPlan", "IGNORE_INDEX"]

#: the class index of ignored (unannotated) voxels in preprocessed label maps; never a class
IGNORE_INDEX = 255

#: keys a plan records only when set (older plans have none of them; a plain run's plan.json,
#: and so its cache folder, stays what it was)
_OPTIONAL = {"regions": (), "region_names": (), "regions_class_order": (), "ignore_label": None}


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
    #: region mode (nnU-Net's region labels): the label values of each region, one sigmoid
    #: output per region, painted back into labels in ``regions_class_order``
    regions: Tuple[Tuple[int, ...], ...] = ()
    region_names: Tuple[str, ...] = ()
    regions_class_order: Tuple[int, ...] = ()
    #: the label value of unannotated voxels: no loss, no sampling, no metrics; never predicted
    ignore_label: Optional[int] = None

    @property
    def num_classes(self) -> int:
        """Class indices of the preprocessed label maps (label values, background first)."""
        return len(self.label_values)

    @property
    def has_regions(self) -> bool:
        return bool(self.regions)

    @property
    def binary(self) -> bool:
        """A single foreground label: the network has one sigmoid output."""
        return self.num_classes == 2 and not self.has_regions

    @property
    def sigmoid(self) -> bool:
        """Independent sigmoid outputs (a binary plan's one, or one per region), whose
        background is 0 where no window reaches; else one softmax over the classes."""
        return self.binary or self.has_regions

    @property
    def out_channels(self) -> int:
        return len(self.regions) if self.has_regions else 1 if self.binary else self.num_classes

    @property
    def output_names(self) -> Tuple[str, ...]:
        """The name of each output channel: regions, or classes (a binary plan: its foreground)."""
        return self.region_names if self.has_regions else self.label_names[1:] if self.binary else self.label_names

    def region_indices(self) -> Tuple[Tuple[int, ...], ...]:
        """The regions as class indices (positions in ``label_values``)."""
        return tuple(tuple(self.label_values.index(v) for v in r) for r in self.regions)

    def to_json(self) -> str:
        d = asdict(self)
        for k, default in _OPTIONAL.items():
            if d[k] == default:
                del d[k]
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PreprocessingPlan:
        """The plan of a ``plan.json`` text, checked as strictly as a config: unknown or missing
        keys, non-finite or non-positive numbers, duplicate labels, a patch of the wrong length
        and the like raise ``ValueError`` naming the key and the bad value (a damaged plan
        would otherwise give a plausible-looking wrong mask)."""
        try:
            d = json.loads(text)
        except RecursionError:
            raise ValueError("JSON nested thousands of levels deep; a plan nests 2") from None
        if not isinstance(d, dict):
            raise ValueError("not a mapping of plan keys")
        keys = [f.name for f in fields(cls)]
        unknown, missing = sorted(set(d) - set(keys)), [k for k in keys if k not in d and k not in _OPTIONAL]
        if unknown or missing:
            raise ValueError(f"unknown keys {unknown}, missing keys {missing}; a plan has {keys}")
        norm_keys = [f.name for f in fields(ChannelNorm)]
        for n in d["norms"]:
            if not isinstance(n, dict) or set(n) - set(norm_keys):
                raise ValueError(f"norms entry {str(n)[:80]} must be a mapping of {norm_keys}")
        d["norms"] = tuple(ChannelNorm(**n) for n in d["norms"])
        for k in ("spacing", "channels", "label_values", "label_names", "patch_size", "region_names", "regions_class_order"):
            if k in d:
                d[k] = tuple(d[k])
        if "regions" in d:
            if not isinstance(d["regions"], list) or not all(isinstance(r, list) for r in d["regions"]):
                raise ValueError(f"regions={str(d['regions'])[:80]} is not valid: expected a list of lists of label values")
            d["regions"] = tuple(tuple(r) for r in d["regions"])
        plan = cls(**d)
        plan.check()
        return plan

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent value."""
        _require(len(self.spacing) == 3 and all(_finite(s) and s > 0 for s in self.spacing), "spacing", self.spacing, "3 finite mm > 0")
        code = str(self.orientation).upper()
        _require(len(code) == 3 and sorted(code.replace("L", "R").replace("P", "A").replace("I", "S")) == ["A", "R", "S"],
                 "orientation", self.orientation, "a 3-letter axis code such as RAS")
        _require(len(self.channels) >= 1 and len(self.norms) == len(self.channels), "norms", len(self.norms),
                 f"one per channel ({len(self.channels)})")
        for c, n in enumerate(self.norms):
            _require(n.scheme in SCHEMES, f"norms[{c}].scheme", n.scheme, f"one of {list(SCHEMES)}")
            _require(all(_finite(v) for v in (n.lo, n.hi, n.mean, n.std)) and n.std > 0, f"norms[{c}]", n, "finite numbers, std > 0")
            _require(n.scheme != "ct" or n.lo < n.hi, f"norms[{c}].lo/hi", (n.lo, n.hi), "lo < hi")
        values = list(self.label_values)
        _require(all(isinstance(v, int) and not isinstance(v, bool) for v in values) and values == sorted(set(values)) and values[:1] == [0]
                 and len(values) >= 2, "label_values", values, "distinct integers in increasing order, 0 (background) first, at least 2")
        _require(len(self.label_names) == len(values), "label_names", list(self.label_names), f"one name per label value ({len(values)})")
        _require(self.spatial_dims in (2, 3), "spatial_dims", self.spatial_dims, "2 or 3")
        _require(len(self.patch_size) == self.spatial_dims and all(isinstance(p, int) and p > 0 for p in self.patch_size),
                 "patch_size", list(self.patch_size), f"{self.spatial_dims} integers > 0")
        _require(self.slice_axis in (0, 1, 2), "slice_axis", self.slice_axis, "0, 1 or 2")
        if self.regions:
            _require(all(len(r) > 0 and set(r) <= set(values[1:]) for r in self.regions), "regions", [list(r) for r in self.regions],
                     f"non-empty lists of foreground label values {values[1:]}")
            _require(len(self.region_names) == len(self.regions), "region_names", list(self.region_names), f"one per region ({len(self.regions)})")
            _require(len(self.regions_class_order) == len(self.regions) and all(v in r for v, r in zip(self.regions_class_order, self.regions)),
                     "regions_class_order", list(self.regions_class_order), "one value per region, each a value of its region")
        else:
            _require(not self.region_names and not self.regions_class_order, "regions_class_order", list(self.regions_class_order),
                     "empty without regions")
        _require(self.ignore_label is None or (isinstance(self.ignore_label, int) and not isinstance(self.ignore_label, bool)
                                               and self.ignore_label > max(values) and len(values) < IGNORE_INDEX + 1),
                 "ignore_label", self.ignore_label, f"null, or an integer above every label value {values} (at most {IGNORE_INDEX} classes)")


#: normalisation schemes a plan may record
SCHEMES = ("ct", "zscore", "none")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={str(value)[:120]} is not valid: expected {allowed}")
