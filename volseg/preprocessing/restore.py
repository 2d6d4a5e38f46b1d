"""The inverse of preprocessing: class probabilities on the preprocessed grid streamed back onto
the scan's own grid."""

from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..data.plan import PreprocessingPlan
from .geometry import Grid, canonical_geometry, canonical_view, grid_coordinates, resample_linear, target_grid

__all__ = ["ScanRestorer", "restore_labels"]


class ScanRestorer:
    """Streams class probabilities from the preprocessed grid onto the scan's own grid.

    Call :meth:`add` with consecutive slabs ``[z0, z1)`` of the preprocessed grid's z axis;
    ``channel(c)`` returns class ``c`` on that slab as a tensor ``(X, Y, z1 - z0)``. Both grids
    are axis-aligned in the canonical orientation, so a slab plus the last slice of the one
    before determines every scan slice that lies in it: each class is resampled (separable
    linear, :func:`resample_linear`, nearest-edge extrapolation) and a running maximum/argmax is
    kept. Memory holds one class of one scan slab at a time (never classes x volume), and
    results go straight into reference-ordered arrays through :func:`canonical_view`.
    ``probabilities=True`` also keeps ``(K, z, y, x)`` uint8 (probability x 255) on the scan
    grid: K bytes per scan voxel.
    """

    def __init__(self, plan: PreprocessingPlan, reference: sitk.Image, probabilities: bool = False, device="cpu"):
        canon, perm, sign = canonical_geometry(reference, plan.orientation)
        size, origin, spacing = target_grid(canon, plan.spacing)
        self.pre_size = tuple(size)
        self._coords = grid_coordinates(Grid(tuple(size), origin, spacing, canon.direction), canon)
        self.plan, self.device = plan, device
        values = np.asarray(plan.label_values)
        self._values = values.astype(np.uint8 if values.max() <= 255 else np.uint16)
        shape = tuple(reference.GetSize())[::-1]
        self._labels = np.zeros(shape, self._values.dtype)
        self._label_view = canonical_view(self._labels, perm, sign)
        self.probabilities: Optional[np.ndarray] = np.zeros((plan.out_channels,) + shape, np.uint8) if probabilities else None
        self._prob_view = canonical_view(self.probabilities, perm, sign) if self.probabilities is not None else None
        self._z, self._next = 0, 0
        self._carry: Optional[list] = None

    def add(self, z0: int, z1: int, channel) -> None:
        import torch

        if z0 != self._z or not z0 < z1 <= self.pre_size[2]:
            raise ValueError(f"slab [{z0}, {z1}) does not continue at z={self._z} of the preprocessed grid {list(self.pre_size)}.")
        uz = self._coords[2]
        k1 = len(uz) if z1 == self.pre_size[2] else int(np.searchsorted(uz, z1 - 1, side="right"))
        k0, lo = self._next, z0 - (self._carry is not None)
        coords = [self._coords[0], self._coords[1], uz[k0:k1] - lo]
        best = index = None
        carry = []
        k = self.plan.out_channels
        for c in range(k):
            p = torch.as_tensor(channel(c)).to(self.device, torch.float32)
            if tuple(p.shape) != (*self.pre_size[:2], z1 - z0):
                raise ValueError(f"class {c} slab has shape {tuple(p.shape)}, expected {(*self.pre_size[:2], z1 - z0)}.")
            src = p if self._carry is None else torch.cat([self._carry[c], p], -1)
            carry.append(p[..., -1:].clone())
            # interpolation is a convex combination and the K probabilities sum to 1, so the winner
            # has at least 1/K: a class below that everywhere in the slab cannot win (exact skip)
            if k1 == k0 or (self._prob_view is None and not self.plan.sigmoid and k > 2 and float(src.max()) < (1 - 1e-3) / k):
                continue
            q = resample_linear(src, coords)
            best, index = self._vote(c, q, best, index)
            if self._prob_view is not None:
                self._prob_view[c, ..., k0:k1] = (q.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        if k1 > k0 and self.plan.has_regions:
            assert isinstance(best, list)  # region mode: every region's probabilities, none skipped
            index = self._region_index(best)
        if k1 > k0:
            assert index is not None  # class 0's probabilities are never skipped
            self._label_view[..., k0:k1] = self._values[index.cpu().numpy()]
        self._z, self._next, self._carry = z1, k1, carry

    def _vote(self, c: int, q, best, index):
        import torch

        if self.plan.has_regions:  # the region probabilities are kept, painted by _region_index
            return (best or []) + [q], None
        if self.plan.binary:
            return None, (q > 0.5).to(torch.uint8)
        if best is None:
            return q.clone(), torch.full(q.shape, c, dtype=torch.uint8, device=q.device)
        index.masked_fill_(q > best, c)  # (boolean-index assignment is several times slower)
        return torch.maximum(best, q, out=best), index

    def _region_index(self, probs: list):
        """Class indices of region probabilities ``[(X', Y', k)] * R`` resampled to the scan:
        the regions over 0.5 painted in ``regions_class_order`` (:func:`regions_to_labels`)."""
        import torch

        from ..data.regions import regions_to_labels

        order = [self.plan.label_values.index(v) for v in self.plan.regions_class_order]
        return regions_to_labels(torch.stack(probs), order).to(torch.uint8)

    def labels(self) -> np.ndarray:
        """``[z, y, x]`` label values on the reference grid (uint8 when they fit)."""
        if self._z != self.pre_size[2]:
            raise RuntimeError(f"only {self._z} of {self.pre_size[2]} preprocessed slices were added.")
        return self._labels


def _restore(probs: np.ndarray, plan: PreprocessingPlan, reference: sitk.Image, probabilities: bool) -> ScanRestorer:
    import torch

    restorer = ScanRestorer(plan, reference, probabilities=probabilities)
    if tuple(probs.shape) != (plan.out_channels, *restorer.pre_size):
        raise ValueError(f"probabilities of shape {probs.shape} do not match ({plan.out_channels} classes, preprocessed grid {list(restorer.pre_size)}).")
    restorer.add(0, probs.shape[-1], lambda c: torch.from_numpy(np.asarray(probs[c], np.float32)))
    return restorer


def restore_labels(probs: np.ndarray, plan: PreprocessingPlan, reference: sitk.Image) -> np.ndarray:
    """Map class probabilities on the preprocessed grid back onto ``reference``'s own grid.

    ``probs``: ``(K, X, Y, Z)`` (K = ``plan.out_channels``; float16 is fine) for the
    preprocessed version of ``reference``. One slab of :class:`ScanRestorer`: each class
    channel is resampled (linear) onto the original grid with a running maximum/argmax, so
    memory peaks at a few single-channel volumes rather than ``K x volume x float32``. Returns
    ``[z, y, x]`` label *values* on ``reference``'s voxel grid (uint8 when they fit).
    """
    return _restore(probs, plan, reference, False).labels()

