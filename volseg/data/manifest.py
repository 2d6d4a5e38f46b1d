"""Dataset manifests: the Medical Segmentation Decathlon ``dataset.json``, accepted as is.

Keys: ``name``, ``modality`` (channel index -> name, e.g. ``{"0": "CT"}``), ``labels`` (value ->
name, 0 = background; or nnU-Net v2's name -> value or list of values, with
``regions_class_order`` and an ``ignore`` label: :mod:`volseg.data.labelspec`), ``training`` (``[{"image": path | [paths per channel], "label": path}]``;
a 4D image file holds as many channels as its 4th axis is long, as in the Decathlon's
multi-modal tasks),
optional ``validation`` (same form) and ``test`` (paths, or dicts with ``image`` and optional
``label``). Relative paths resolve against the manifest's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .io import ImageReadError, case_name, file_identity, itk_error_text, read_header, read_label, same_geometry
from .labelspec import parse_labels

log = logging.getLogger(__name__)

MAX_CLASSES = 256  # class indices are uint8 everywhere (training labels, stitched masks)
MAX_LABEL_VALUE = 65535  # masks are written as uint16 when a value exceeds 255

__all__ = ["Case", "Manifest", "CT_WORDS", "is_ct_modality", "ManifestError", "load_manifest", "check_case_count", "validate_cases", "split_cases"]


class ManifestError(ValueError):
    """A manifest is malformed or its data is inconsistent; the message lists every problem."""


@dataclass(frozen=True)
class Case:
    name: str
    images: Tuple[Path, ...]  # one path per channel
    label: Optional[Path] = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    modalities: Tuple[str, ...]  # channel order
    labels: Dict[int, str]  # value -> name, includes 0
    training: Tuple[Case, ...]
    validation: Tuple[Case, ...] = ()
    test: Tuple[Case, ...] = ()
    #: (name, label values) per region (nnU-Net v2 region labels; empty: one class per label)
    regions: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
    regions_class_order: Tuple[int, ...] = ()
    ignore_label: Optional[int] = None  # the value of the label named "ignore" (unannotated voxels)

    @property
    def foreground(self) -> List[int]:
        return sorted(v for v in self.labels if v != 0)

    @property
    def is_ct(self) -> bool:
        return any(is_ct_modality(m) for m in self.modalities)


#: words that name a CT acquisition (contrast-enhanced, non-contrast, angiography, ...); a
#: whole-word match, so "SPECT" or "ACT" are not CT
CT_WORDS = frozenset({"CT", "CECT", "NCCT", "NECT", "CTA", "CTP", "HRCT", "LDCT", "MDCT"})


def is_ct_modality(name: str) -> bool:
    """A channel whose name holds a CT word (any case), e.g. ``CT``, ``ct``, ``CECT``,
    ``"CT arterial"``, ``"venous-phase CT"``, or says "computed tomography", gets CT
    (Hounsfield-unit) normalisation; ``MRI``, ``T2``, ``SPECT`` and ``PET`` do not."""
    words = re.findall(r"[A-Z]+", name.upper())
    return any(w in CT_WORDS for w in words) or "COMPUTED TOMOGRAPHY" in " ".join(words)


def _as_case(entry: object, root: Path, where: str, problems: List[str], need_label: bool) -> Optional[Case]:
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        problems.append(f"{where}: expected {{'image': ..., 'label': ...}}, got {entry!r}")
        return None
    imgs = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    if not imgs or not all(isinstance(i, str) for i in imgs):
        problems.append(f"{where}: 'image' must be a path or a list of paths, got {entry['image']!r}")
        return None
    label = entry.get("label")
    if need_label and not isinstance(label, str):
        problems.append(f"{where}: missing 'label' path")
        return None
    resolve = lambda s: (root / s).resolve() if not Path(s).is_absolute() else Path(s)  # noqa: E731
    images = tuple(resolve(i) for i in imgs)
    return Case(case_name(images[0]), images, resolve(label) if isinstance(label, str) else None)


def _leaks(training: Sequence[Case], validation: Sequence[Case]) -> List[str]:
    """A problem per validation case whose image is also a training case's (same file by path
    or inode): validating on a training case reports a Dice the model has not earned."""
    seen = {file_identity(img): c.name for c in training for img in c.images}
    out = []
    for c in validation:
        hit = next((seen[file_identity(img)] for img in c.images if file_identity(img) in seen), None)
        if hit is not None:
            out.append(f"validation case {c.name!r} is training case {hit!r} (same image file): validation on a training case "
                       "measures nothing; remove it from one of the lists")
    return out


def load_manifest(path: Union[str, Path]) -> Manifest:
    """Parse a dataset.json; every schema problem is reported at once in one ManifestError."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise ManifestError(f"manifest {str(path)!r} does not exist.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {path}: not valid JSON ({exc}).") from None
    except RecursionError:
        raise ManifestError(f"manifest {path}: JSON nested thousands of levels deep; a dataset.json nests 3.") from None
    problems: List[str] = []
    for key in ("modality", "labels", "training"):
        if key not in raw:
            problems.append(f"missing key {key!r} (a Decathlon dataset.json has name, modality, labels, training, test)")
    if problems:
        raise ManifestError(f"manifest {path}:\n  " + "\n  ".join(problems))
    try:
        modality = {int(k): str(v) for k, v in raw["modality"].items()}
    except (AttributeError, ValueError):
        raise ManifestError(f"manifest {path}: 'modality' and 'labels' must map integer strings to names.") from None
    spec = parse_labels(raw["labels"], raw.get("regions_class_order"), problems)
    if spec is None:
        raise ManifestError(f"manifest {path}:\n  " + "\n  ".join(problems))
    labels = spec.labels
    if sorted(modality) != list(range(len(modality))) or not modality:
        problems.append(f"'modality' keys must be 0..N-1, got {sorted(modality)}")
    if 0 not in labels:
        problems.append(f"'labels' must declare 0 (background), got {labels}")
    unnamed = {k: n for k, n in raw["labels"].items() if n is None or not str(n).strip()}
    if unnamed:  # the names travel into outputs (DICOM SegmentLabel/ROIName, statistics, reports): a value alone says nothing
        problems.append(f"'labels' {unnamed} have no name; give each label a name, e.g. \"1\": \"liver\"")
    dup_names = sorted({n for n in labels.values() if list(labels.values()).count(n) > 1})
    if dup_names:
        problems.append(f"'labels' names {dup_names} are given to several values; each label needs its own name (statistics and DICOM segments are keyed by it)")
    if len(labels) < 2:
        problems.append(f"'labels' must declare at least one foreground class, got {labels}")
    if len(labels) > MAX_CLASSES:
        problems.append(f"'labels' declares {len(labels)} classes; volseg handles at most {MAX_CLASSES} (background included: class indices are 8-bit)")
    if spec.ignore is not None and len(labels) >= MAX_CLASSES:
        problems.append(f"'labels' declares {len(labels)} classes and an ignore label; with one volseg handles at most {MAX_CLASSES - 1} "
                        "(class index 255 marks ignored voxels)")
    odd = sorted(v for v in list(labels) + ([spec.ignore] if spec.ignore is not None else []) if not 0 <= v <= MAX_LABEL_VALUE)
    if odd:
        problems.append(f"'labels' values {odd[:5]} are outside 0..{MAX_LABEL_VALUE} (label files hold them as 16-bit unsigned integers)")
    root = path.parent
    sections = {}
    for key, need_label in (("training", True), ("validation", True), ("test", False)):
        entries = raw.get(key) or []
        if not isinstance(entries, list):
            problems.append(f"{key!r} must be a list")
            entries = []
        cases = [_as_case(e, root, f"{key}[{i}]", problems, need_label) for i, e in enumerate(entries)]
        sections[key] = tuple(c for c in cases if c is not None)
        names = [c.name for c in sections[key]]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"{key}: duplicate case names {dup}")
    problems += _leaks(sections["training"], sections["validation"])
    if problems:
        raise ManifestError(f"manifest {path}:\n  " + "\n  ".join(problems))
    return Manifest(
        path=path,
        name=str(raw.get("name", path.parent.name)),
        modalities=tuple(modality[i] for i in range(len(modality))),
        labels=dict(sorted(labels.items())),
        training=sections["training"],
        validation=sections["validation"],
        test=sections["test"],
        regions=spec.regions,
        regions_class_order=spec.regions_class_order,
        ignore_label=spec.ignore,
    )


def _info_image(h) -> sitk.Image:
    """A 1-voxel image carrying a header's spacing, origin and direction (sizes are compared
    separately), so :func:`same_geometry` can compare headers without reading voxels."""
    img = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    img.SetSpacing(h.GetSpacing()[:3])
    img.SetOrigin(h.GetOrigin()[:3])
    d = np.array(h.GetDirection()).reshape(h.GetDimension(), h.GetDimension())[:3, :3]
    img.SetDirection(d.ravel().tolist())
    return img


def _channels(h) -> int:
    """Channels in a file: the length of a 4th axis (MSD multi-modal tasks), else 1."""
    return int(h.GetSize()[3]) if h.GetDimension() == 4 else 1


def _check_files(case: Case, paths: List[Path], heads: list, problems: List[str], tol: float) -> None:
    """Dimensions, sizes and geometry of a case's files against its first file."""
    ref = heads[0]
    ref_size = list(ref.GetSize())[:3]
    for p, h in zip(paths, heads):
        dim, size = h.GetDimension(), list(h.GetSize())
        if dim not in (3, 4):
            problems.append(f"{case.name}: {p.name} has {dim} dimensions (size {size}); expected 3D (or 3D + channels)")
            continue
        if p == case.label and dim == 4 and size[3] != 1:
            problems.append(f"{case.name}: label {p.name} is 4D (size {size}); a label map is one 3D volume")
            continue
        if size[:3] != ref_size:
            problems.append(f"{case.name}: {p.name} size {size[:3]} differs from {paths[0].name} size {ref_size}")
            continue
        diff = same_geometry(_info_image(ref), _info_image(h), tol=tol)
        if diff:
            problems.append(f"{case.name}: {p.name} geometry differs from {paths[0].name}: {diff}")


def _check_label(case: Case, allowed: set, problems: List[str]) -> set:
    """The values of ``case``'s label map (a problem when one is not ``allowed``)."""
    try:
        lab = sitk.GetArrayFromImage(read_label(case.label))
    except ImageReadError as exc:
        problems.append(f"{case.name}: {exc}")
        return set()
    found = set(np.unique(lab).astype(int).tolist())
    bad = sorted(found - allowed)
    if bad:
        problems.append(f"{case.name}: label {case.label.name} has values {bad} not declared in 'labels' {sorted(allowed)}")
    return found


def _absent_region_values(manifest: Manifest, found: set) -> List[str]:
    """A problem per region value that no checked label map holds: its region would be trained
    on a value the data never show (usually a typo in the region list)."""
    missing = sorted({v for _, vs in manifest.regions for v in vs} - found)
    if not missing:
        return []
    names = [n for n, vs in manifest.regions if set(vs) & set(missing)]
    return [f"regions {names} name label values {missing} that no label map holds (values found: {sorted(found)})"]


def _too_few(n: int, min_cases: int) -> str:
    return f"{n} labelled case(s), need at least {min_cases} (data.min_cases; set it lower to train on fewer, e.g. with data.val_fraction=0)"


def check_case_count(manifest: Manifest, min_cases: int) -> None:
    """Raise ManifestError when the manifest's training and validation cases are fewer than
    ``min_cases``: the count alone, no file is read."""
    n = len(manifest.training) + len(manifest.validation)
    if n < min_cases:
        raise ManifestError(f"manifest {manifest.path}: 1 problem(s):\n  {_too_few(n, min_cases)}")


def validate_cases(manifest: Manifest, cases: Sequence[Case], min_cases: int = 1, tol: float = 1e-3) -> None:
    """Check files, channels, geometry and label values of ``cases``; raise one ManifestError
    that lists every problem (naming the files), or return None.

    Channels are counted per file: a 3D file is one, a 4D file as many as its 4th axis (the
    Decathlon's multi-modal layout); the total must equal the manifest's ``modality`` count."""
    problems: List[str] = [] if len(cases) >= min_cases else [_too_few(len(cases), min_cases)]
    n_ch = len(manifest.modalities)
    allowed = set(manifest.labels) | ({manifest.ignore_label} if manifest.ignore_label is not None else set())
    seen: set = set()
    all_read = True
    for case in cases:
        n_before = len(problems)
        paths = list(case.images) + ([case.label] if case.label else [])
        missing = [p for p in paths if not p.exists()]
        if missing:
            problems.extend(f"{case.name}: file not found: {p}" for p in missing)
            continue
        try:
            heads = [read_header(p) for p in paths]
        except RuntimeError as exc:
            problems.append(f"{case.name}: unreadable file ({itk_error_text(exc)})")
            continue
        except ImageReadError as exc:
            problems.append(f"{case.name}: {exc}")
            continue
        found = sum(_channels(h) for h in heads[: len(case.images)])
        if found != n_ch:
            per_file = ", ".join(f"{p.name}: {_channels(h)}" for p, h in zip(case.images, heads))
            problems.append(f"{case.name}: {found} image channel(s) ({per_file}) but the manifest declares {n_ch} ({list(manifest.modalities)})")
        _check_files(case, paths, heads, problems, tol)
        if case.label is not None and len(problems) == n_before:
            seen |= _check_label(case, allowed, problems)
        else:
            all_read = False
    if manifest.regions and all_read and cases:
        problems += _absent_region_values(manifest, seen)
    if problems:
        raise ManifestError(f"manifest {manifest.path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


#: a fraction split never leaves fewer training cases than this: with two or three scans, each
#: one (often a source of its own) is worth more to training than a one-scan validation Dice
MIN_TRAIN_CASES = 3


def split_cases(manifest: Manifest, val_fraction: float, seed: int = 0, folds: int = 0, fold: int = 0) -> Tuple[Tuple[Case, ...], Tuple[Case, ...]]:
    """(train, validation). An explicit ``validation`` list wins; with ``folds`` >= 2 fold
    ``fold`` is held out; otherwise a fraction of ``training`` (at least one case, and none
    when fewer than :data:`MIN_TRAIN_CASES` would remain to train). Cases are ranked by a hash of
    their names (independent of the manifest's order), so splits are deterministic."""
    if manifest.validation:
        return manifest.training, manifest.validation
    cases = list(manifest.training)
    key = lambda c: hashlib.sha1(f"{seed}:{c.name}".encode()).hexdigest()  # noqa: E731
    ranked = sorted(cases, key=key)
    if folds >= 2:
        if len(cases) < folds:
            raise ManifestError(f"manifest {manifest.path}: {len(cases)} training cases cannot make {folds} folds.")
        val = {c.name for i, c in enumerate(ranked) if i % folds == fold}
        return tuple(c for c in cases if c.name not in val), tuple(c for c in cases if c.name in val)
    n_val = int(round(len(cases) * val_fraction))
    if val_fraction > 0:
        n_val = max(0, min(max(1, n_val), len(cases) - MIN_TRAIN_CASES))
        if n_val == 0:
            log.warning("%d training case(s): all of them train and none is held out for validation (data.val_fraction=%g "
                        "keeps at least %d cases training): no best.pt (inference uses last.pt), no validation Dice and no "
                        "learned postprocessing. Give the manifest a 'validation' list to validate anyway.",
                        len(cases), val_fraction, MIN_TRAIN_CASES)
    val = {c.name for c in ranked[:n_val]}
    return tuple(c for c in cases if c.name not in val), tuple(c for c in cases if c.name in val)
