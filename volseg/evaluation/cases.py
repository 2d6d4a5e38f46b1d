"""Which files to evaluate: predictions and references collected from files, folders or a
manifest, matched by case name, and the class labels to score."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..data.io import case_name, is_image_path
from ..data.manifest import load_manifest
from ..metrics import EvaluationError

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
LabelsArg = Union[None, Mapping[int, str], PathLike]


def _strip(name: str, suffixes: Sequence[str]) -> str:
    for s in suffixes:
        if name.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return name


def _collect(path: Path, what: str, strip: Sequence[str] = ()) -> Dict[str, Path]:
    """Case name -> image file, for a file or a folder of image files."""
    if not path.exists():
        raise EvaluationError(f"{what} {path}: no such file or folder.")
    if path.is_file():
        return {_strip(case_name(path), strip): path}
    found: Dict[str, Path] = {}
    for p in sorted(path.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not is_image_path(p):
            continue
        name = _strip(case_name(p), strip)
        if name in found:
            raise EvaluationError(f"{what} folder {path}: {found[name].name} and {p.name} both name case {name!r}.")
        found[name] = p
    if not found:
        raise EvaluationError(f"{what} folder {path} holds no image files (.nii, .nii.gz, .nrrd, .mha, ...).")
    return found


def _labels_from(arg: LabelsArg) -> Optional[Dict[int, str]]:
    if arg is None:
        return None
    if isinstance(arg, Mapping):
        try:
            return {int(k): str(v) for k, v in arg.items()}
        except (TypeError, ValueError):
            raise EvaluationError(f"labels must map integer values to names, got {dict(arg)!r}.") from None
    return dict(load_manifest(arg).labels)


class Regions(dict):
    """``regions_class_order`` value -> the region's label values, with the regions' ``names``."""

    names: List[str] = []


def _regions_from(manifest: Optional[PathLike]) -> Tuple[Regions, Optional[int]]:
    """(the regions a manifest defines, its ignore value); nothing without a manifest."""
    out = Regions()
    if manifest is None:
        return out, None
    man = load_manifest(manifest)
    out.update({v: list(vs) for v, (_, vs) in zip(man.regions_class_order, man.regions)})
    out.names = [n for n, _ in man.regions]
    return out, man.ignore_label


def _is_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def _fmt_names(names: Sequence[str], limit: int = 10) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _references(truth: Path) -> Tuple[Dict[str, Path], Dict[str, Path], bool, Optional[Dict[int, str]]]:
    """(case -> reference file, case -> scan, restrict to predicted cases?, manifest labels)."""
    if not _is_manifest(truth):
        return _collect(truth, "reference"), {}, False, None
    man = load_manifest(truth)
    cases = [c for c in man.test if c.label is not None]
    restrict = not cases
    if restrict:
        cases = list(man.training)
        log.info("%s: no labelled test cases; evaluating against its training labels.", truth)
    return {c.name: c.label for c in cases}, {c.name: c.images[0] for c in cases}, restrict, dict(man.labels)


def _image_paths(images: Union[Mapping[str, PathLike], PathLike]) -> Dict[str, Path]:
    if isinstance(images, Mapping):
        return {str(k): Path(v) for k, v in images.items()}
    if _is_manifest(Path(images)):
        m = load_manifest(images)
        return {c.name: c.images[0] for c in m.training + m.validation + m.test}
    return _collect(Path(images), "image", strip=("_0000",))


def _match(pred: Path, truth: Path, pred_cases: Dict[str, Path], truth_cases: Dict[str, Path], restrict_to_pred: bool, allow_missing: bool) -> List[str]:
    """The case names to evaluate; see :func:`evaluate` for the rules."""
    common = sorted(set(pred_cases) & set(truth_cases))
    if not common:
        raise EvaluationError(
            f"no prediction in {pred} matches a reference case in {truth}.\n"
            f"  predictions: {_fmt_names(list(pred_cases))}\n  references: {_fmt_names(list(truth_cases))}"
        )
    extra = set(pred_cases) - set(truth_cases)
    if extra:
        log.warning("%d prediction(s) without a reference, skipped: %s", len(extra), _fmt_names(list(extra)))
    missing = set(truth_cases) - set(pred_cases)
    if missing and not restrict_to_pred:
        msg = f"{len(missing)} reference case(s) in {truth} have no prediction in {pred}: {_fmt_names(list(missing))}"
        if not allow_missing:
            raise EvaluationError(msg + " (pass allow_missing=True to evaluate the others).")
        log.warning("%s; evaluating the other %d.", msg, len(common))
    return common
