"""Region <-> label conversion (volseg.data.regions) on hand-made maps."""

import numpy as np
import pytest
import torch

from volseg.data.regions import labels_to_regions, regions_to_labels

REGIONS = [(1, 2, 3), (2, 3), (3,)]  # whole tumour, tumour core, enhancing
ORDER = [1, 2, 3]


def test_labels_to_regions_nests():
    lab = np.array([0, 1, 2, 3, 4])
    out = labels_to_regions(lab, REGIONS)
    assert out.dtype == bool and out.shape == (3, 5)
    assert out.tolist() == [[False, True, True, True, False], [False, False, True, True, False], [False, False, False, True, False]]
    t = labels_to_regions(torch.from_numpy(lab), REGIONS)
    assert torch.equal(t, torch.from_numpy(out))


def test_regions_to_labels_follows_order_exactly():
    p = np.zeros((3, 6), np.float32)
    p[0] = [0.9, 0.9, 0.9, 0.9, 0.2, 0.5]  # 0.5 is not > 0.5
    p[1] = [0.1, 0.8, 0.8, 0.1, 0.9, 0.0]
    p[2] = [0.0, 0.0, 0.7, 0.0, 0.0, 0.0]
    assert regions_to_labels(p, ORDER).tolist() == [1, 2, 3, 1, 2, 0]
    # the order decides: painting enhancing first lets the whole tumour overwrite it
    assert regions_to_labels(p[::-1].copy(), [3, 2, 1]).tolist() == [1, 1, 1, 1, 2, 0]
    t = regions_to_labels(torch.from_numpy(p), ORDER)
    assert t.dtype == torch.uint8 and t.tolist() == [1, 2, 3, 1, 2, 0]
    assert regions_to_labels(p, [1, 2, 300]).dtype == np.uint16


def test_round_trip_and_bad_input():
    lab = np.random.default_rng(0).integers(0, 4, (4, 5, 6))
    assert np.array_equal(regions_to_labels(labels_to_regions(lab, REGIONS).astype(np.float32), ORDER), lab)
    with pytest.raises(ValueError, match="2 region outputs"):
        regions_to_labels(np.zeros((2, 3)), ORDER)
    with pytest.raises(ValueError, match="at least one label value"):
        labels_to_regions(lab, [(1,), ()])
