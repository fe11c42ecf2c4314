import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unsupseg.errors import ConfigError
from unsupseg.features.cache import open_or_build
from unsupseg.features.knn import knn_indices, knn_table, pooled_descriptors, sample_neighbours


def _store(folder, n=12, dim=6, shapes=((3, 4), (2, 5)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(dim, *shapes[i % len(shapes)], generator=gen) for i in range(n)]

    def items():
        for i, m in enumerate(maps):
            yield f"im{i}", m, None

    return open_or_build(folder, {"test": "knn", "seed": seed, "n": n}, items), maps


def _brute_force(desc, k):
    sims = desc @ desc.T
    return sims.argsort(dim=1, descending=True)[:, :k]


def test_descriptors_are_normalised_spatial_means(tmp_path):
    store, maps = _store(tmp_path)
    desc = pooled_descriptors(store)
    expected = F.normalize(torch.stack([m.half().float().mean(dim=(1, 2)) for m in maps]), dim=1)
    assert torch.allclose(desc, expected, atol=1e-6)
    assert torch.allclose(desc.norm(dim=1), torch.ones(len(maps)))


def test_knn_matches_brute_force_and_does_not_depend_on_chunking():
    desc = F.normalize(torch.randn(53, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    expected = _brute_force(desc, 10)
    for chunk in (1, 7, 16, 53, 4096):
        assert torch.equal(knn_indices(desc, 10, chunk=chunk), expected), chunk
    # each image is its own best match (cosine 1)
    assert torch.equal(expected[:, 0], torch.arange(53))


def test_knn_needs_enough_images():
    desc = F.normalize(torch.randn(5, 3), dim=1)
    with pytest.raises(ConfigError, match="5 images"):
        knn_indices(desc, 6)


def test_table_is_cached_beside_the_features_and_rebuilt_when_damaged(tmp_path):
    store, _ = _store(tmp_path)
    first, hit = knn_table(store, 5)
    assert not hit and first.dtype == torch.int64 and first.shape == (12, 5)
    path = store.path / "knn_top5.npy"
    assert path.exists()
    assert torch.equal(first, _brute_force(pooled_descriptors(store), 5))
    second, hit = knn_table(store, 5)
    assert hit and torch.equal(first, second)
    # a table of another size is another file; a damaged one is recomputed
    np.save(path, np.full((12, 5), 99, dtype=np.int64))
    third, hit = knn_table(store, 5)
    assert not hit and torch.equal(first, third)


def test_partners_exclude_rank_zero_and_cover_ranks_one_to_k():
    table = torch.arange(30).repeat(4, 1) + 100 * torch.arange(4)[:, None]   # entry = 100 * row + rank
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 1, 2, 3] * 250)
    drawn = sample_neighbours(table, idx, 7, gen)
    ranks = drawn % 100
    assert torch.equal(drawn // 100, idx)
    assert set(ranks.tolist()) == set(range(1, 8))
    with pytest.raises(ConfigError, match="k=30"):
        sample_neighbours(table, idx, 30, gen)
