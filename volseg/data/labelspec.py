"""The ``labels`` of a dataset.json in both conventions, checked: Decathlon (MSD) and nnU-Net v2.

* MSD: ``{"0": "background", "1": "liver", ...}``, value -> name (unchanged behaviour).
* nnU-Net v2: ``{"background": 0, "liver": 1, ...}``, name -> value. A value may be a list of
  values: a *region* (``"whole tumor": [1, 2, 3]``); then every foreground entry is a region, the
  network has one sigmoid output per region, and ``regions_class_order`` (one label value per
  region, in the order the regions are painted back into a label map, later ones winning) is
  required, as in nnU-Net.
* In both, a label named ``ignore`` marks unannotated voxels (sparse annotation): it must be the
  highest value, a plain integer, and takes part in no region; those voxels contribute nothing
  to the loss, the sampling or the metrics (nnU-Net's rule).

Rules beyond nnU-Net's (which trusts the file): two regions are either nested or disjoint (a
partial overlap such as ``[1, 2]`` and ``[2, 3]`` cannot be painted back into one label map),
each ``regions_class_order`` value is a value of its own region, and every label value in a
region is painted back as itself (else evaluation on labels would score a value the prediction
can never hold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .regions import labels_to_regions, regions_to_labels

__all__ = ["LabelSpec", "IGNORE_NAME", "parse_labels"]

#: the label name that marks unannotated voxels (nnU-Net's reserved name)
IGNORE_NAME = "ignore"


@dataclass(frozen=True)
class LabelSpec:
    """What a manifest's ``labels`` declare. ``labels``: value -> name of the label values
    (background 0 included, the ignore value excluded); ``regions``: (name, values) per region
    (empty: label mode); ``regions_class_order``: one label value per region; ``ignore``: the
    ignore value or None."""

    labels: Dict[int, str]
    regions: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
    regions_class_order: Tuple[int, ...] = ()
    ignore: Optional[int] = None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_labels(raw_labels: object, raw_order: object, problems: List[str]) -> Optional[LabelSpec]:
    """The :class:`LabelSpec` of a manifest's ``labels`` and ``regions_class_order``; each
    problem is appended to ``problems`` as one line (None when the labels cannot be read)."""
    if not isinstance(raw_labels, dict) or not raw_labels:
        problems.append(f"'labels' must be a non-empty mapping, got {str(raw_labels)[:80]}")
        return None
    keys_are_values = all(isinstance(k, str) and k.strip().lstrip("-").isdigit() for k in raw_labels)
    if keys_are_values:  # MSD: value -> name
        by_value = {int(k): str(v) for k, v in raw_labels.items()}
        ignores = [v for v, n in by_value.items() if n == IGNORE_NAME]
        if raw_order is not None:
            problems.append(f"'regions_class_order' {raw_order} is given but no label is a region (a list of values); remove it")
        labels = {v: n for v, n in by_value.items() if n != IGNORE_NAME}
        _check_ignore(ignores[0] if ignores else None, set(labels), problems)
        return LabelSpec(labels=dict(sorted(labels.items())), ignore=ignores[0] if ignores else None)
    else:
        named = dict(raw_labels)
        bad = {k: v for k, v in named.items() if not (_is_int(v) or (isinstance(v, list) and v and all(_is_int(x) for x in v)))}
        if bad:
            problems.append(f"'labels' {bad}: nnU-Net style maps each name to a label value or a list of values (a region)")
            return None
    ignore = named.pop(IGNORE_NAME, None)
    if ignore is not None and not _is_int(ignore):
        problems.append(f"'labels' ignore={ignore}: the ignore label is one integer value, not a region")
        return None
    flat = {k: (v if isinstance(v, list) else [v]) for k, v in named.items()}
    is_regions = any(len(v) > 1 for v in flat.values())
    if is_regions:
        return _region_spec(flat, raw_order, ignore, problems)
    if raw_order is not None:
        problems.append(f"'regions_class_order' {raw_order} is given but no label is a region (a list of values); remove it")
    labels = {int(v[0]): str(k) for k, v in flat.items()}
    if len(labels) != len(flat):
        problems.append(f"'labels' {named}: two names share one value")
    _check_ignore(ignore, set(labels), problems)
    return LabelSpec(labels=dict(sorted(labels.items())), ignore=ignore)


def _check_ignore(ignore: Optional[int], values: set, problems: List[str]) -> None:
    if ignore is not None and ignore <= max(values, default=0):
        problems.append(f"'labels' ignore={ignore} must be the highest label value (the others go up to {max(values)}), as nnU-Net requires")


def _region_spec(flat: Dict[str, list], raw_order: object, ignore: Optional[int], problems: List[str]) -> Optional[LabelSpec]:
    background = [k for k, v in flat.items() if v == [0]]
    if not background:
        problems.append(f"'labels' {flat} must name background 0")
        return None
    regions = tuple((str(k), tuple(sorted(set(int(x) for x in v)))) for k, v in flat.items() if k not in background)
    n_before = len(problems)
    for name, values in regions:
        if 0 in values:
            problems.append(f"region {name!r} {list(values)} contains background 0")
    if not isinstance(raw_order, list) or not all(_is_int(v) for v in raw_order):
        problems.append(f"'regions_class_order' {raw_order}: region labels need a list of one label value per region "
                        f"({[n for n, _ in regions]}), in painting order")
        return None
    order = tuple(int(v) for v in raw_order)
    values = sorted(set(v for _, vs in regions for v in vs))
    if len(order) != len(regions):
        problems.append(f"'regions_class_order' {list(order)} has {len(order)} entries for {len(regions)} regions {[n for n, _ in regions]}")
    unknown = sorted(set(order) - set(values))
    if unknown:
        problems.append(f"'regions_class_order' values {unknown} are in no region; the regions hold {values}")
    for (name, vs), v in zip(regions, order):
        if v in values and v not in vs:
            problems.append(f"'regions_class_order' paints region {name!r} {list(vs)} with {v}, which is not one of its values")
    problems.extend(_overlaps(regions))
    _check_ignore(ignore, set(values) | {0}, problems)
    if ignore is not None and ignore in values:
        problems.append(f"'labels' ignore={ignore} is a value of a region; the ignore label takes part in no region")
    if len(problems) > n_before:
        return None
    problems.extend(_round_trip(regions, order, values))
    labels = {0: background[0]}
    for (name, _), v in zip(regions, order):
        labels.setdefault(v, name)
    for v in values:
        labels.setdefault(v, f"label_{v}")
    return LabelSpec(labels=dict(sorted(labels.items())), regions=regions, regions_class_order=order, ignore=ignore)


def _overlaps(regions: Sequence[Tuple[str, Tuple[int, ...]]]) -> List[str]:
    out = []
    for i, (a, va) in enumerate(regions):
        for b, vb in regions[i + 1 :]:
            sa, sb = set(va), set(vb)
            if sa & sb and not (sa <= sb or sb <= sa):
                out.append(f"regions {a!r} {list(va)} and {b!r} {list(vb)} overlap without one containing the other; "
                           "regions must be nested or disjoint")
    return out


def _round_trip(regions, order: Sequence[int], values: Sequence[int]) -> List[str]:
    """Each label value, turned into regions and painted back in ``order``, must come back as itself."""
    import numpy as np

    arr = np.asarray(values, np.int64)
    back = regions_to_labels(labels_to_regions(arr, [vs for _, vs in regions]).astype(np.float32), order)
    lost = {int(v): int(b) for v, b in zip(arr, back) if int(v) != int(b)}
    if lost:
        return [f"'regions_class_order' {list(order)} paints label values back as {lost} (value: painted); order the regions so "
                "that a region inside another comes after it"]
    return []
