"""Planning: dataset fingerprint -> an ordinary, commented config YAML.

:func:`~volseg.planning.fingerprint.fingerprint` reads every labelled training case once:
spacings and shapes (canonical axis order), per-channel foreground intensity statistics, class
voxel frequencies and the size of the smallest structure of each class. :func:`plan_config`
turns it into a
:class:`~volseg.config.Config` and one comment per decision (nnU-Net's rules, in readable form):

* target spacing: the median; thick-slice data (max/min spacing > :data:`ANISOTROPY`) gets the
  10th percentile along the thick axis, and the comment names 2D slice mode as the alternative;
* pooling and depth (:func:`_pooling`): each level halves the axes that keep >= 4 voxels at the
  bottleneck and are less than twice as coarse as the finest axis (so thick slices stay unpooled
  until the in-plane grid has caught up, nnU-Net's anisotropic pooling), until the receptive
  field covers the patch along every axis; features double per level from 32 (GPU) or 16 (CPU),
  capped;
* patch and batch: candidate patches shaped like the median case, smallest first, each measured
  with a dry forward/backward pass of that network at batch 2 (GPU: a real pass and its peak
  allocated memory; CPU: a pass on torch's ``meta`` device, which runs the same graph without
  compute, summing the tensors autograd saves), the largest that fits the memory budget wins;
  once the patch covers the median case, the batch grows while it fits (at most 5% of the
  dataset's voxels per batch, nnU-Net's cap);
* normalisation: ``auto`` (CT channels, see :func:`~volseg.data.manifest.is_ct_modality`, are
  clipped to the foreground percentiles and z-scored; others z-scored per image), logged per
  channel;
* class sampling ratios: rarer classes are drawn more often, ``(commonest / own) ** 0.25``
  voxel frequency, clipped to [1, 2]; background keeps its default share.

:func:`write_plan` writes the YAML (every line ``key: value  # why``) and the fingerprint JSON
beside it; the YAML loads with :func:`volseg.config.load_config` like any config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import Config, ModelConfig, apply_overrides, from_dict, load_config, to_dict
from ..data.io import write_text
from ..data.manifest import Manifest, validate_cases
from ..nets import receptive_field
from ..preprocessing.intensity import SOFT_TISSUE_HU, ct_window
from .fingerprint import fingerprint
from .memory import measure_step_memory, memory_budget

log = logging.getLogger(__name__)

__all__ = ["plan_config", "render_plan", "write_plan", "plan_manifest", "plan_from_fingerprint"]

ANISOTROPY = 3.0  # max/min target spacing above which data count as thick-slice (nnU-Net's value)
MAX_LEVELS = 6
PATCH_SIDES = (16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # longest patch axis, candidates
MAX_BATCH = 32

Comments = Dict[Tuple[str, str], str]

# ---------------------------------------------------------------------------------------------
# decisions


def _target_spacing(fp: dict) -> Tuple[Tuple[float, ...], Optional[int], str]:
    """(spacing mm, thick axis or None, comment)."""
    sp = np.array(fp["spacings_mm"])
    target = np.median(sp, axis=0)
    ratio = target.max() / target.min()
    if ratio <= ANISOTROPY:
        return tuple(round(float(s), 4) for s in target), None, f"median of the training cases (max/min {ratio:.1f} <= {ANISOTROPY:g}: not thick-slice)"
    thick = int(np.argmax(target))
    target[thick] = np.percentile(sp[:, thick], 10)
    axis = "xyz"[thick]
    return (tuple(round(float(s), 4) for s in target), thick,
            f"thick-slice data ({axis} {ratio:.1f}x the finest median spacing > {ANISOTROPY:g}): median in-plane, 10th percentile "
            f"along {axis} (nnU-Net's rule); the 3D U-Net pools {axis} only once the in-plane grid is as coarse "
            f"(model.pooling); 2D slice mode is the alternative (model.spatial_dims: 2, data.slice_axis: {thick}, "
            f"a 2-entry data.patch_size, model.pooling: null)")


def _pooling(patch: Sequence[float], spacing: Sequence[float], base: int) -> Tuple[Tuple[int, ...], ...]:
    """Per-level pooling factors for ``patch`` (voxels) at ``spacing`` (mm). A level halves
    every axis that is still >= 8 voxels (the bottleneck keeps >= 4) and less than twice as
    coarse as the finest of those axes at that level; levels are added until the receptive
    field covers the patch along every axis or no axis may pool (nnU-Net's rules). At least one
    pooling: the builder's minimum of two levels."""
    sizes, sp = np.array(patch, float), np.array(spacing, float)
    strides: List[Tuple[int, ...]] = []
    while len(strides) < MAX_LEVELS - 1:
        if strides:
            rf = receptive_field(ModelConfig(features=_features(len(strides) + 1, base), pooling=tuple(strides)))
            if all(r >= p for r, p in zip(rf, patch)):
                break
        room = sizes >= 8
        if not room.any():
            break
        finest = sp[room].min()  # among the axes that may still pool (nnU-Net's order of the two rules)
        step = tuple(2 if ok and mm / finest < 2 else 1 for ok, mm in zip(room, sp))
        strides.append(step)
        sizes, sp = sizes / step, sp * step
    return tuple(strides) or ((2,) * len(patch),)


def _features(levels: int, base: int) -> Tuple[int, ...]:
    cap = 320 if base >= 32 else 128
    return tuple(min(base * 2**i, cap) for i in range(levels))


def _candidate(median: np.ndarray, side: int, base: int, spacing: Sequence[float]) -> Tuple[Tuple[int, ...], ModelConfig]:
    """(patch, network): the median case's shape scaled so its longest axis is ``side``, rounded
    up to the network's input multiple, never beyond the median case (rounded up); the network
    pooled for it (:func:`_pooling`). Pooling 2 on every axis is written as ``None``."""
    raw = np.minimum(median * side / median.max(), median)
    pooling = _pooling(raw, spacing, base)
    model = ModelConfig(features=_features(len(pooling) + 1, base), pooling=None if set(sum(pooling, ())) == {2} else pooling)
    m = np.array(model.input_multiple)
    cap = np.ceil(median / m) * m
    return tuple(int(v) for v in np.minimum(np.maximum(m, np.ceil(raw / m) * m), cap)), model


def _patch_and_batch(fp: dict, spacing: Sequence[float], budget: float, device: str, n_in: int, n_out: int) -> Tuple[dict, str, str]:
    """Largest candidate patch whose step fits ``budget`` at batch 2, then the largest batch.
    Returns ({patch, model, batch, bytes}, patch comment, batch comment)."""
    base = 32 if device == "cuda" else 16
    extent = np.median(np.array(fp["shapes"]) * np.array(fp["spacings_mm"]), axis=0)
    median = extent / np.array(spacing)  # voxels at the target spacing, as make_plan computes it
    best: Optional[Dict[str, Any]] = None
    smallest: Optional[Dict[str, Any]] = None
    tried = set()
    for side in PATCH_SIDES:
        patch, model = _candidate(median, side, base, spacing)
        if patch in tried:
            continue
        tried.add(patch)
        need = measure_step_memory(model, n_in, n_out, patch, 2, device)
        log.debug("patch %s, pooling %s, batch 2: %.2f GB", patch, model.strides, need / 2**30)
        smallest = smallest or dict(patch=patch, model=model, batch=2, bytes=need)
        if need > budget:
            break
        best = dict(patch=patch, model=model, batch=2, bytes=need)
    if best is None:
        assert smallest is not None  # PATCH_SIDES is not empty
        log.warning("even the smallest patch %s needs %.2f GB at batch 2, over the budget of %.2f GB; planned it anyway",
                    smallest["patch"], smallest["bytes"] / 2**30, budget / 2**30)
        return smallest, f"smallest candidate; a step at batch 2 needs {smallest['bytes'] / 2**30:.2f} GB, OVER the budget", "2, the minimum"
    whole = best["patch"] == _candidate(median, 10**6, base, spacing)[0]  # no bigger candidate exists
    shape = np.round(median).astype(int).tolist()
    why = f"covers the median case ({shape} voxels)" if whole else f"largest candidate shaped like the median case ({shape} voxels) that fits"
    patch_comment = f"{why}; a step at batch 2 needs {best['bytes'] / 2**30:.2f} GB (measured, dry pass on {device})"
    batch_comment = "2: the patch is limited by memory, so the batch stays at the minimum"
    if whole:
        best, batch_comment = _grow_batch(best, fp, budget, device, n_in, n_out)
    return best, patch_comment, batch_comment


def _grow_batch(best: dict, fp: dict, budget: float, device: str, n_in: int, n_out: int) -> Tuple[dict, str]:
    """The patch covers the median case: spend the remaining memory on the batch, up to 5% of
    the dataset's voxels per batch (nnU-Net's cap; bigger batches only repeat the same cases)."""
    voxels = sum(float(np.prod(s)) for s in fp["shapes"])
    cap = int(min(MAX_BATCH, max(2, 0.05 * voxels / float(np.prod(best["patch"])))))
    while best["batch"] < cap:
        need = measure_step_memory(best["model"], n_in, n_out, best["patch"], best["batch"] + 1, device)
        if need > budget:
            break
        best = dict(best, batch=best["batch"] + 1, bytes=need)
    return best, (f"{best['batch']}: the patch covers the median case, the remaining memory goes to the batch "
                  f"(cap {cap}: 5% of the dataset's voxels per batch); needs {best['bytes'] / 2**30:.2f} GB")


def _class_ratios(fp: dict) -> Tuple[Optional[Tuple[float, ...]], str]:
    """Foreground class c: ``(commonest foreground fraction / own) ** 0.25`` in [1, 2], so rare
    classes are drawn more often; background: the foreground classes' mean, so it keeps the
    default's 1/K share of patch centres. Milder rules matter: the default (equal per class)
    already oversamples a 0.2% class 100-fold, and 4x for the phantoms' lesion cost the kidney
    its Dice in the short training of tests/test_learning.py (0.0 vs 0.9 with this rule)."""
    fg = [c for c in fp["classes"] if c["value"] != 0]
    common = max(c["voxel_fraction"] for c in fg)
    if common <= 0:
        log.warning("no training case has a foreground voxel; class sampling left equal")
        return None, "null: no foreground voxels in the training labels (check them)"
    ratios = [round(float(np.clip((common / c["voxel_fraction"]) ** 0.25, 1, 2)) if c["voxel_fraction"] > 0 else 1.0, 2) for c in fg]
    parts = []
    for c, r in zip(fg, ratios):
        small = f", smallest {c['smallest_mm3']:.0f} mm3" if c["smallest_mm3"] else ", never present"
        parts.append(f"{c['name']} {c['voxel_fraction']:.2%}{small} -> {r:g}")
    background = round(float(np.mean(ratios)), 2)
    return (background, *ratios), (f"background {background:g} (the mean: its default share), then (commonest/own voxel "
                                   "fraction)^0.25 in [1, 2]: " + "; ".join(parts))


def _normalisation(fp: dict) -> str:
    """The comment on ``data.normalization: auto``; each channel's scheme is logged."""
    parts = []
    for c, ch in enumerate(fp["channels"]):
        if ch["ct"]:
            rng = ""
            if "p00_5" in ch:
                lo, hi = ct_window(ch["p00_5"], ch["p99_5"])
                rng = f" ({ch['p00_5']:.0f}..{ch['p99_5']:.0f} HU here; window {lo:.0f}..{hi:.0f} HU)"
            text = (f"channel {c} {ch['name']!r} is CT: clip to the foreground 0.5-99.5 percentiles widened to at least "
                    f"{SOFT_TISSUE_HU[0]:.0f}..{SOFT_TISSUE_HU[1]:.0f} HU{rng}, z-score with the foreground's mean/std")
        else:
            text = f"channel {c} {ch['name']!r} is not CT: z-score per image over nonzero voxels"
        log.info("normalisation: %s", text)
        parts.append(text)
    return "auto; " + "; ".join(parts)


def plan_config(fp: dict, manifest: Manifest, memory_gb: Optional[float] = None, device: str = "cpu",
                spacing: Optional[Sequence[float]] = None) -> Tuple[Config, Comments]:
    """The planned :class:`Config` for fingerprint ``fp`` of ``manifest``'s cases and a
    one-line reason per planned key (``{(section, key): comment}``). ``device``: ``cpu`` or
    ``cuda`` (where the budget and the dry pass come from). ``spacing`` (mm, x y z): the
    user's target spacing instead of the planned one; patch, batch and depth are fitted to it."""
    n_in, n_out = len(manifest.modalities), (1 if len(manifest.labels) == 2 else len(manifest.labels))
    if manifest.regions:
        n_out = len(manifest.regions)
    if spacing is None:
        spacing, thick, spacing_why = _target_spacing(fp)
    else:
        spacing, thick, spacing_why = tuple(float(s) for s in spacing), None, "set by the user (data.spacing); the patch and depth below fit it"
    budget, budget_why = memory_budget(memory_gb, device)
    best, patch_why, batch_why = _patch_and_batch(fp, spacing, budget, device, n_in, n_out)
    ratios, ratios_why = _class_ratios(fp)
    if manifest.regions:  # the crop draws background and each region; the per-label rule does not apply
        ratios, ratios_why = None, f"null: equal shares for background and the {len(manifest.regions)} regions"
    model = best["model"]
    rf = receptive_field(model)
    bottleneck = [p // m for p, m in zip(best["patch"], model.input_multiple)]
    data: Dict[str, Dict[str, Any]] = {
        "model": {"variant": "unet", "spatial_dims": 3, "features": list(model.features),
                  "pooling": model.pooling and [list(st) for st in model.pooling]},
        "data": {"spacing": list(spacing), "patch_size": list(best["patch"]), "normalization": "auto", "class_ratios": ratios and list(ratios)},
        "train": {"batch_size": best["batch"]},
    }
    comments: Comments = {
        ("model", "variant"): "the plain U-Net: nnU-Net showed a well-configured plain U-Net is hard to beat",
        ("model", "spatial_dims"): "3D" + (" (see data.spacing for the 2D option)" if thick is not None else ""),
        ("model", "features"): (f"{len(model.features)} levels: receptive field {list(rf)} voxels vs patch {list(best['patch'])}, "
                                f"bottleneck {bottleneck} voxels; {model.features[0]} features doubling per level"
                                f"{', the GPU start' if device == 'cuda' else ', halved for the CPU'}, capped at {max(_features(8, model.features[0]))}"),
        ("model", "pooling"): ("null: every level halves every axis" if model.pooling is None else
                               "per level, the axes it halves: an axis stays (1) while it is twice as coarse as the finest axis or under 8 voxels"),
        ("data", "spacing"): f"mm, (x, y, z) in RAS order; {spacing_why}",
        ("data", "patch_size"): f"voxels at data.spacing; memory budget {budget_why}: {patch_why}",
        ("data", "normalization"): _normalisation(fp),
        ("data", "class_ratios"): ratios_why,
        ("train", "batch_size"): batch_why,
    }
    if thick is not None:
        data["data"]["slice_axis"] = thick
        comments[("data", "slice_axis")] = "the thick axis, ready for 2D slice mode (unused in 3D)"
    log.info("plan: spacing %s mm, patch %s, batch %d, features %s, pooling %s", spacing, best["patch"], best["batch"], model.features, model.strides)
    return from_dict(data), comments


# ---------------------------------------------------------------------------------------------
# writing


def render_plan(cfg: Config, comments: Comments, source: str) -> str:
    """The YAML text: a header, then ``key: value  # why`` for every planned key."""
    d = to_dict(cfg)
    lines = [
        f"# Planned by `volseg plan` from {source}.",
        "# Each value says why it was chosen; edit freely. Keys not listed take their defaults",
        "# (volseg/config/sections.py); unknown keys are errors. The fingerprint is in the JSON beside this file.",
    ]
    for section in ("model", "data", "augment", "train", "infer"):
        keys = [k for s, k in comments if s == section]
        if keys:
            lines.append(f"{section}:")
            lines += [f"  {k}: {json.dumps(d[section][k])}  # {comments[section, k]}" for k in keys]
    return "\n".join(lines) + "\n"


def write_plan(cfg: Config, comments: Comments, fp: dict, path: Union[str, Path], fingerprint_path: Union[str, Path, None] = None) -> Tuple[Path, Path]:
    """Write the commented config to ``path`` and ``fp`` to ``fingerprint_path`` (default:
    ``<path stem>.fingerprint.json`` beside it); return both paths. The written YAML is read back
    and must give ``cfg`` again."""
    path = Path(path)
    fp_path = Path(fingerprint_path) if fingerprint_path else path.with_name(path.stem + ".fingerprint.json")
    write_text(path, render_plan(cfg, comments, f"{fp['cases']} training cases of {fp.get('manifest', 'a manifest')}"))
    write_text(fp_path, json.dumps(fp, indent=2) + "\n")
    if load_config(path) != cfg:  # pragma: no cover - a rendering bug, never a user error
        raise RuntimeError(f"{path} does not read back as the planned config; please report this.")
    return path, fp_path


def plan_manifest(manifest: Manifest, output: Union[str, Path], memory_gb: Optional[float] = None, device: str = "cpu",
                  fingerprint_path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Validate and fingerprint ``manifest``'s training cases, then :func:`plan_from_fingerprint`."""
    if memory_gb is not None:
        memory_budget(memory_gb, device)  # a bad --memory fails before the data are read
    validate_cases(manifest, manifest.training, min_cases=1)
    log.info("fingerprinting %d training cases of %s", len(manifest.training), manifest.path)
    fp = fingerprint(manifest, manifest.training)
    return plan_from_fingerprint(fp, manifest, output, memory_gb, device, fingerprint_path, overrides)


def plan_from_fingerprint(fp: dict, manifest: Manifest, output: Union[str, Path], memory_gb: Optional[float] = None, device: str = "cpu",
                          fingerprint_path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Plan from fingerprint ``fp``, write the config YAML to ``output`` (and the fingerprint
    beside it) and return the planned config with ``overrides`` (``section.key=value``) applied
    on top."""
    fp = dict(manifest=str(manifest.path), **{k: v for k, v in fp.items() if k != "manifest"})
    # a spacing override is planned at: a patch and depth fitted to another spacing would cover
    # another field of view (a 160 x 160 x 8 patch planned at 1 x 1 x 2 mm is 720 x 720 x 36 mm at 4.5 mm)
    user = apply_overrides({}, overrides)
    # only the spacing is read before planning: other overrides may need the plan to be valid
    # (a model.pooling for the planned depth)
    spacing = from_dict({"data": {"spacing": user["data"]["spacing"]}}).data.spacing if "spacing" in user.get("data", {}) else None
    cfg, comments = plan_config(fp, manifest, memory_gb=memory_gb, device=device, spacing=spacing)
    write_plan(cfg, comments, fp, output, fingerprint_path)
    if not overrides:
        return cfg
    merged = apply_overrides(to_dict(cfg), overrides)
    model = user.get("model", {})
    if cfg.model.pooling and "features" in model and "pooling" not in model and isinstance(model["features"], list):
        # the planned pooling has one entry per level: fit it to the user's depth (its first
        # levels are the anisotropic ones; deeper levels halve every axis)
        n = len(model["features"]) - 1
        merged["model"]["pooling"] = ([list(st) for st in cfg.model.pooling] + [[2, 2, 2]] * n)[:n]
        log.info("model.features set to %d levels: planned pooling fitted to it: %s", n + 1, merged["model"]["pooling"])
    return from_dict(merged)
