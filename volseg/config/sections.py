"""The config sections: one frozen dataclass per section, checked on construction.

The dataclass defaults below are the only defaults. They are what a run gets for every key that
neither its config file nor the planner sets: a network, patch and batch that train on a laptop
CPU as well as on any GPU (the network the planner picks on a CPU for a typical CT) and a short
schedule (2,500 steps) that gives a first result in about an hour on a CPU. Bigger, longer
recipes are shipped configs named for their purpose (:func:`shipped_configs`; ``gpu_fullres``
for a GPU at full resolution), which set only the keys they change; ``configs/default.yaml``
lists every key with its default (a test keeps it equal to ``Config()``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .checks import ConfigError, _positive, _prob, check_choice, excerpt

VARIANTS = ("unet", "residual", "attention", "dense", "nested")
NORMS = ("none", "batch", "instance", "group")
ACTS = ("relu", "leakyrelu", "prelu")


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture. ``in_channels``/``out_channels`` of ``None`` are filled from the
    manifest at training time (channels = modalities; out = 1 for a single binary label, else
    number of labels including background).

    ``pooling``: the down-sampling factor per spatial axis at each of the ``len(features) - 1``
    poolings, 1 or 2 (e.g. ``[[2, 2, 1], [2, 2, 2], ...]`` keeps 5 mm slices unpooled while the
    in-plane grid halves, nnU-Net's treatment of thick-slice data); ``None``: 2 on every axis.
    """

    variant: str = "unet"  # Network architecture: plain U-Net or its residual, attention, dense or nested variant.
    spatial_dims: int = 3  # 3 = volumes; 2 = slice mode (``data.patch_size`` then has 2 entries).
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    features: Tuple[int, ...] = (16, 32, 64, 128)  # Channels per level, top level first; one entry per level, at least 2.
    norm: str = "instance"  # Normalisation layer; ``batch`` only for thin scans of the training sources' kind (README, Training).
    act: str = "leakyrelu"  # Activation function.
    dropout: float = 0.0  # Spatial dropout after each block's second conv, in [0, 1); 0 = off.
    deep_supervision: bool = False  # When true, the loss is taken at every decoder level.
    groups: int = 8  # Groups for ``norm: group``; every ``features`` entry must be divisible by it.
    pooling: Optional[Tuple[Tuple[int, ...], ...]] = None

    @property
    def strides(self) -> Tuple[Tuple[int, ...], ...]:
        """``pooling`` resolved: one down-sampling factor per spatial axis per pooling."""
        return self.pooling or ((2,) * self.spatial_dims,) * (len(self.features) - 1)

    @property
    def scales(self) -> Tuple[Tuple[int, ...], ...]:
        """Per level, its down-sampling per spatial axis against the input: the product of the
        pooling factors above it (``(1, 1, 1)`` at level 0, ``(8, 8, 8)`` at level 3 by default)."""
        s = self.strides
        return tuple(tuple(math.prod(st[a] for st in s[:i]) for a in range(self.spatial_dims)) for i in range(len(s) + 1))

    @property
    def input_multiple(self) -> Tuple[int, ...]:
        """Per spatial axis, the multiple an input size needs for no padding: the bottleneck's
        scale (16 for 4 poolings by 2)."""
        return self.scales[-1]

    def __post_init__(self) -> None:
        check_choice("model.variant", self.variant, VARIANTS)
        check_choice("model.spatial_dims", self.spatial_dims, (2, 3))
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.act", self.act, ACTS)
        for key in ("in_channels", "out_channels"):
            v = getattr(self, key)
            if v is not None:
                _positive(f"model.{key}", v)
        if len(self.features) < 2:
            raise ConfigError(f"model.features={list(self.features)} needs at least 2 levels.")
        for f in self.features:
            _positive("model.features entry", f)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} must be in [0, 1).")
        _positive("model.groups", self.groups)
        if self.pooling is not None:
            n = len(self.features)
            if len(self.pooling) != n - 1 or any(len(s) != self.spatial_dims for s in self.pooling):
                raise ConfigError(f"model.pooling={[list(s) for s in self.pooling]} must have {n - 1} entries (one per pooling of "
                                  f"the {n} levels in model.features), each of {self.spatial_dims} factors 1 or 2; or null for 2 on every axis.")
            bad = [f for s in self.pooling for f in s if f not in (1, 2)]
            if bad:
                raise ConfigError(f"model.pooling has factors {bad}; allowed: 1 (keep the axis) or 2 (halve it).")
        if self.norm == "group":
            bad = [f for f in self.features if f % self.groups]
            if bad:
                raise ConfigError(
                    f"model.norm='group' with model.groups={self.groups} needs every feature count "
                    f"divisible by {self.groups}; not divisible: {bad}."
                )


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing and patch sampling.

    ``spacing`` is the target voxel spacing in mm in canonical (RAS) axis order; ``None`` takes
    the training set's median. ``patch_size`` has one entry per network spatial dim.
    ``normalization``: ``auto`` picks ``ct`` when the manifest modality says CT, else ``zscore``.
    ``folds``/``fold``: k-fold cross-validation (``fold`` of ``folds`` held out); 0 folds holds
    out ``val_fraction`` instead (at least one case, but never leaving fewer than three to
    train: 2-3 scans all train). A manifest's explicit ``validation`` list wins over both.
    ``slice_axis``: the axis that 2D slice mode slices along and that ``augment.slab_prob``
    thins (2 = axial in RAS; the planner sets the thick axis of thick-slice data).
    ``class_ratios``: relative sampling frequency of patch centres per label value (background
    first); ``None`` means background 1 and every foreground class 1.
    ``cache``: ``memory`` | ``disk`` | ``none`` (see :mod:`volseg.training.data`); ``cache_dir``:
    where ``disk`` caches live (``None``: ``volseg_cache/`` beside the run folder), one subfolder
    per preprocessing plan, shared by runs with the same plan.
    """

    patch_size: Tuple[int, ...] = (64, 64, 64)
    spacing: Optional[Tuple[float, float, float]] = None
    orientation: str = "RAS"  # 3-letter axis code (e.g. RAS, LPS) every case is reoriented to before training/inference.
    normalization: str = "auto"
    slice_axis: int = 2
    class_ratios: Optional[Tuple[float, ...]] = None
    samples_per_volume: int = 4  # Patches drawn from each loaded volume.
    val_fraction: float = 0.2  # Fraction of cases held out when ``folds`` is 0 and the manifest has no 'validation' list, in [0, 1).
    folds: int = 0
    fold: int = 0
    min_cases: int = 2  # Minimum number of labelled training cases; fewer is an error.
    cache: str = "memory"
    cache_dir: Optional[str] = None
    num_workers: int = 0  # DataLoader worker processes; 0 = augment in the training process.

    def __post_init__(self) -> None:
        if len(self.patch_size) not in (2, 3):
            raise ConfigError(f"data.patch_size={list(self.patch_size)} needs 2 or 3 entries.")
        for p in self.patch_size:
            _positive("data.patch_size entry", p)
        if self.spacing is not None:
            if len(self.spacing) != 3:
                raise ConfigError(f"data.spacing={list(self.spacing)} needs 3 entries (mm).")
            for s in self.spacing:
                _positive("data.spacing entry", s)
        if len(self.orientation) != 3 or sorted(self.orientation.upper().replace("L", "R").replace("P", "A").replace("I", "S")) != ["A", "R", "S"]:
            raise ConfigError(f"data.orientation={excerpt(self.orientation)} must be a 3-letter axis code such as 'RAS' or 'LPS'.")
        check_choice("data.normalization", self.normalization, ("auto", "ct", "zscore", "none"))
        check_choice("data.slice_axis", self.slice_axis, (0, 1, 2))
        check_choice("data.cache", self.cache, ("memory", "disk", "none"))
        if self.class_ratios is not None:
            for r in self.class_ratios:
                _positive("data.class_ratios entry", r, allow_zero=True)
            if sum(self.class_ratios) <= 0:
                raise ConfigError("data.class_ratios must contain at least one positive value.")
        _positive("data.samples_per_volume", self.samples_per_volume)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction!r} must be in [0, 1).")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"data.folds={self.folds!r} must be 0 (use data.val_fraction) or >= 2.")
        if self.folds and not 0 <= self.fold < self.folds:
            raise ConfigError(f"data.fold={self.fold!r} must be in 0..{self.folds - 1} for data.folds={self.folds}.")
        _positive("data.min_cases", self.min_cases)
        _positive("data.num_workers", self.num_workers, allow_zero=True)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation probabilities (each applied independently per sample) and ranges.

    Besides geometry, the intensity set targets scanner/site shift: scale/shift, gamma contrast,
    per-structure offsets (contrast phases: an organ brighter or darker than in
    training, its surroundings not), Gaussian noise and blur, a smooth multiplicative bias field
    (MRI inhomogeneity) and simulated low resolution (thick slices, other spacings).

    ``label_intensity_prob`` is off by default: it hides what only contrast defines (a lesion
    inside an organ; the demo's lesion Dice went to 0 with it at 0.3), and helps where
    structures keep their shape but change brightness between sources (contrast phases; the
    spleen of benchmarks/README.md's organ split, 0 -> 0.14).

    ``slab_prob`` (3D only): the patch is cut to its central slab along ``data.slice_axis``, of
    a random depth of 1/6 of the patch's or more, and padded back with repeated edge slices, which is what inference
    does with a scan thinner than the window (a 20-slice series, a limited field of view). Off
    by default: at 0.3 the demo gives 0.793 against 0.856 without (one run each; with the slab
    drawn anywhere in the patch its small lesion was never learned); on thin slabs of a training
    scan it raised an organ model from 0.33 to 0.64 (benchmarks/README.md). Turn it on for thin
    test scans."""

    elastic_prob: float = 0.2  # Chance per sample of an elastic deformation.
    elastic_sigma: Tuple[float, float] = (5.0, 8.0)  # [min, max] smoothness of the elastic field, voxels.
    elastic_magnitude: Tuple[float, float] = (50.0, 150.0)  # [min, max] elastic displacement magnitude (MONAI Rand3DElasticd).
    rotate_prob: float = 0.3  # Chance per sample of a rotation of up to ``rotate_range_deg``.
    rotate_range_deg: float = 20.0  # Rotation range: +- this many degrees about each axis.
    scale_prob: float = 0.3  # Chance per sample of a zoom by 1 +- ``scale_range``.
    scale_range: float = 0.15  # Zoom factor range: 1 +- this.
    flip_prob: float = 0.5  # Chance of mirroring, per axis (never left-right when labels are lateral).
    intensity_scale_prob: float = 0.3  # Chance per sample of intensities x (1 +- 0.25).
    intensity_shift_prob: float = 0.3  # Chance per sample of intensities + (+- 0.25), normalised units.
    noise_prob: float = 0.15  # Chance per sample of Gaussian noise of std ``noise_std``.
    noise_std: float = 0.1  # Standard deviation of the Gaussian noise, normalised intensity units.
    contrast_prob: float = 0.2  # Chance per sample of a gamma contrast change.
    label_intensity_prob: float = 0.0
    label_intensity_range: float = 1.5  # The per-structure offset of ``label_intensity_prob``: +- this, normalised units.
    blur_prob: float = 0.1  # Chance per sample of Gaussian blur.
    bias_field_prob: float = 0.1  # Chance per sample of a smooth multiplicative bias field (MRI inhomogeneity).
    lowres_prob: float = 0.1  # Chance per sample of simulated low resolution (other scanners' spacing).
    slab_prob: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("_prob"):
                _prob(f"augment.{f.name}", getattr(self, f.name))
        _positive("augment.rotate_range_deg", self.rotate_range_deg, allow_zero=True)
        _positive("augment.scale_range", self.scale_range, allow_zero=True)
        _positive("augment.noise_std", self.noise_std, allow_zero=True)
        _positive("augment.label_intensity_range", self.label_intensity_range, allow_zero=True)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. One epoch is ``steps_per_epoch`` batches of ``batch_size`` patches.

    ``amp``: mixed precision for the network: float16 autocast with loss scaling on CUDA,
    bfloat16 autocast on CPUs with native bf16 (AMX or AVX512-BF16), float32 elsewhere
    (:func:`volseg.runtime.amp_dtype`)."""

    epochs: int = 50  # Number of epochs; total steps = ``epochs`` x ``steps_per_epoch``.
    steps_per_epoch: int = 50  # Batches per epoch.
    batch_size: int = 2  # Patches per batch.
    lr: float = 3e-3  # Initial learning rate, decayed by the poly schedule (``poly_power``).
    weight_decay: float = 1e-5  # Decoupled weight decay (adamw) or L2 penalty (sgd).
    optimizer: str = "adamw"  # ``adamw``, or ``sgd`` with Nesterov momentum ``momentum``.
    momentum: float = 0.99  # SGD momentum; used only with ``optimizer: sgd``.
    poly_power: float = 0.9  # Exponent of the poly schedule: lr = lr0 * (1 - step/steps) ** poly_power.
    seed: int = 0  # Random seed; the same seed and data give bit-identical weights on the CPU.
    val_every: int = 5  # Epochs between validations.
    amp: bool = True
    class_weights: Optional[Tuple[float, ...]] = None  # Cross-entropy weight per output channel; null = unweighted.
    lambda_dice: float = 1.0  # Weight of the Dice loss.
    lambda_ce: float = 1.0  # Weight of the cross-entropy loss.
    grad_clip: float = 12.0  # Gradient norm clip; 0 = off.

    def __post_init__(self) -> None:
        for key in ("epochs", "steps_per_epoch", "batch_size", "lr", "val_every"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        check_choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _positive("train.poly_power", self.poly_power, allow_zero=True)
        _positive("train.lambda_dice", self.lambda_dice, allow_zero=True)
        _positive("train.lambda_ce", self.lambda_ce, allow_zero=True)
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        if self.class_weights is not None:
            for w in self.class_weights:
                _positive("train.class_weights entry", w, allow_zero=True)


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window inference. ``largest_component``: label values to keep only the largest
    connected component of (empty = none).

    ``crop``: the body's bounding box (CT: > -500 HU on the raw scan, other modalities:
    nonzero), widened by ``crop_margin`` mm, is all that is segmented; background outside.
    ``windows`` skips the windows that miss it, so inside it the result equals MONAI's
    ``sliding_window_inference`` on the whole volume (exact); ``box`` tiles only the box
    (fewer windows, placed differently: approximate); ``none`` segments everything.
    Approximate speed levers, measured in benchmarks/README.md: ``crop: box``,
    ``window_scale`` (the inference window is the training patch times this: fewer windows,
    but instance normalisation sees more context) and a lower ``overlap``.
    ``threads``: torch intra-op threads (0 = torch's default).
    ``amp``: the windows under autocast, as ``train.amp`` (float16 on CUDA, bfloat16 on CPUs with
    native bf16); probabilities are blended in float32 either way. ``false``: float32 throughout."""

    overlap: float = 0.5  # Sliding-window overlap, fraction of the window in [0, 1).
    batch_size: int = 4  # Windows per forward pass.
    blend: str = "gaussian"  # Weighting of overlapping window predictions: ``gaussian`` (centre-weighted) or ``constant``.
    tta: bool = False  # Mirroring test-time augmentation.
    largest_component: Tuple[int, ...] = ()
    crop: str = "windows"
    crop_margin: float = 10.0  # Margin added around the body box, mm (see ``crop``).
    window_scale: float = 1.0  # Inference window = training patch x this, in [0.25, 4] (> 1: fewer windows, approximate).
    threads: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"infer.overlap={self.overlap!r} must be in [0, 1).")
        _positive("infer.batch_size", self.batch_size)
        check_choice("infer.blend", self.blend, ("gaussian", "constant"))
        check_choice("infer.crop", self.crop, ("none", "windows", "box"))
        _positive("infer.crop_margin", self.crop_margin, allow_zero=True)
        if not 0.25 <= self.window_scale <= 4.0:
            raise ConfigError(f"infer.window_scale={self.window_scale!r} must be in [0.25, 4] (times the training patch).")
        _positive("infer.threads", self.threads, allow_zero=True)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def __post_init__(self) -> None:
        if len(self.data.patch_size) != self.model.spatial_dims:
            raise ConfigError(
                f"data.patch_size={list(self.data.patch_size)} has {len(self.data.patch_size)} entries "
                f"but model.spatial_dims={self.model.spatial_dims}; give one entry per spatial dim."
            )
