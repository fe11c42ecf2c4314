"""clusters auto: the modularity criterion on synthetic maps with a known number of categories."""

import numpy as np
import pytest
import torch

from unsupseg.features.cluster_count import estimate_clusters, greedy_modularity_curve, neighbour_counts


def synthetic_maps(groups: int, images: int = 16, side: int = 16, dim: int = 16, seed: int = 0):
    """Maps whose four quadrants each show one of ``groups`` categories (orthogonal directions + noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:groups]
    maps = []
    for i in range(images):
        layout = torch.randint(groups, (2, 2), generator=g)
        layout.view(-1)[0] = i % groups          # every category appears
        ids = layout.repeat_interleave(side // 2, 0).repeat_interleave(side // 2, 1)
        feats = centres[ids].permute(2, 0, 1) + 0.15 * torch.randn(dim, side, side, generator=g)
        maps.append(feats)
    return maps


@pytest.mark.parametrize("groups", [3, 5, 7])
def test_recovers_the_number_of_well_separated_categories(groups):
    maps = synthetic_maps(groups)
    result = estimate_clusters(maps, (2, 12), torch.Generator().manual_seed(0), prototypes=24, images=16,
                               tokens=2000, resamples=3)
    assert result.chosen == groups
    assert result.ks == list(range(2, 13)) and len(result.scores) == len(result.score_se) == 11


def test_neighbour_counts_hand_computed():
    labels = np.array([[0, 0, 1],
                       [2, 2, 1]])
    # horizontal pairs: (0,0) (0,1) (2,2) (2,1); vertical: (0,2) (0,2) (1,1); each counted both ways
    expected = np.array([[2, 1, 2],
                         [1, 2, 1],
                         [2, 1, 2]])
    assert neighbour_counts([labels], 3).tolist() == expected.tolist()


def test_greedy_modularity_two_cliques():
    # two triangles joined by one edge: the best split is the two triangles, Q = 5/14
    a = np.zeros((6, 6))
    for i, j in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]:
        a[i, j] = a[j, i] = 1
    curve = greedy_modularity_curve(a)
    assert curve[2] == pytest.approx(5 / 14)
    assert curve[1] == pytest.approx(0.0)
    assert max(curve, key=curve.get) == 2
