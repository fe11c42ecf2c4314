"""Leopart's fully unsupervised pipeline: clustering, saliency, CBFE, co-occurrence graph, communities,
and a tiny fit through the public API."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import unsupseg
from unsupseg.errors import ConfigError
from unsupseg.features.clustering import assign, fit_pca, kmeans
from unsupseg.methods.leopart import merge
from unsupseg.methods.leopart.saliency import (
    distinctiveness,
    gaussian_blur,
    mass_foreground,
    remove_small_components,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- clustering


def test_pca_standardises_and_orders_components():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=gen) * torch.tensor([5.0, 1, 1, 1, 1, 1]) + 3
    x[:, 1] = x[:, 0] * 0.1 + 0.01 * x[:, 1]          # dims 0 and 1 share one direction after scaling
    pca = fit_pca(lambda: x.split(300), 3)
    torch.testing.assert_close(pca.mean, x.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(pca.std, x.std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(3), atol=1e-5, rtol=0)
    z = pca.transform(x)
    var = z.var(0)
    assert var[0] > 1.8 and (var[:-1] >= var[1:]).all()   # the shared direction first: 2 standardised units
    maps = x[:12].T.reshape(1, 6, 3, 4)
    torch.testing.assert_close(pca.transform_maps(maps)[0].flatten(1).T, z[:12], atol=1e-5, rtol=0)


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_finds_separated_blobs(spherical):
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(200, 3, generator=gen) for c in centres])
    cent = kmeans(x, 3, spherical=spherical, generator=torch.Generator().manual_seed(0), iterations=50, restarts=3)
    labels = assign(x, cent, spherical)[0]
    for block in labels.split(200):
        assert len(block.unique()) == 1
    assert len(labels.unique()) == 3
    if spherical:
        torch.testing.assert_close(cent.norm(dim=1), torch.ones(3))


def test_kmeans_subsamples_like_faiss_and_is_seeded():
    x = torch.randn(5000, 4, generator=torch.Generator().manual_seed(2))
    a = kmeans(x, 5, spherical=False, generator=torch.Generator().manual_seed(7), points_per_centroid=20)
    b = kmeans(x, 5, spherical=False, generator=torch.Generator().manual_seed(7), points_per_centroid=20)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        kmeans(x[:3], 5, spherical=False, generator=torch.Generator())


# ----------------------------------------------------------------------------- saliency


def test_blur_matches_torchvision():
    maps = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0))
    expected = TF.gaussian_blur(maps[:, None], kernel_size=[7, 7], sigma=[0.6, 0.6])[:, 0]
    torch.testing.assert_close(gaussian_blur(maps), expected, atol=1e-6, rtol=1e-5)


def test_mass_foreground_properties():
    gen = torch.Generator().manual_seed(3)
    sal = torch.rand(3, 12, 14, generator=gen) ** 4
    sal[:, 3:8, 4:9] += 2.0
    mask = mass_foreground(sal, 0.6)
    assert mask.dtype == torch.bool and mask.shape == sal.shape
    from scipy import ndimage

    for m in mask:
        labels, count = ndimage.label(m.numpy(), structure=np.ones((3, 3)))
        assert all((labels == i).sum() > 2 for i in range(1, count + 1))
        assert m[5, 6]                      # the salient square is foreground
    # on a smooth map nothing is cleaned up: the kept tokens are the fewest highest ones that hold at
    # least `mass` of the blurred saliency
    yy, xx = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    smooth = torch.exp(-((yy - 4) ** 2 + (xx - 6) ** 2) / 20)[None]
    for mass in (0.3, 0.6, 0.9):
        kept = mass_foreground(smooth, mass)[0]
        blurred = gaussian_blur(smooth)[0]
        share = blurred[kept].sum() / blurred.sum()
        assert share >= mass - 1e-6
        assert share - blurred[kept].min() / blurred.sum() < mass
        assert blurred[kept].min() >= blurred[~kept].max()


def test_small_components_removed():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[0, 1] = True            # a 2-pixel component: removed
    mask[3:5, 3:5] = True                     # 4 pixels: kept
    mask[5, 0] = True                         # 1 pixel: removed
    out = remove_small_components(mask)
    assert out.sum() == 4 and out[3:5, 3:5].all()


def test_distinctiveness_scores_the_odd_region():
    feats = torch.zeros(1, 4, 6, 6)
    feats[:, 0] = 1.0
    feats[:, 1, 2:4, 2:4] = 3.0               # a distinct square on a uniform background
    sal = distinctiveness(feats)[0]
    assert sal[2:4, 2:4].min() > sal[0, 0] + 0.5 and (sal >= 0).all()


# ----------------------------------------------------------------------------- CBFE


def test_cbfe_candidate_cuts_and_reference_tau():
    assert list(merge.candidate_cuts(200)) == list(range(110, 150))
    scores = torch.linspace(0.0, 1.0, 20)
    gen = torch.Generator().manual_seed(4)
    maps = [torch.randint(0, 20, (10, 10), generator=gen) for _ in range(5)]
    gt = [m >= 13 for m in maps]              # the 7 highest-scoring clusters are the true foreground
    tau, cut = merge.reference_threshold(scores, maps, gt)
    assert cut == 13 and cut in merge.candidate_cuts(20)
    assert abs(tau / 0.05 - round(tau / 0.05)) < 1e-9 and 0 <= tau <= 0.95
    assert tau == 0.7                          # sorted score 13/19 = 0.684 rounded to the 0.05 grid


def test_cluster_scores_are_mean_precision():
    maps = [torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 2, 2, 2]])]
    fg = [torch.tensor([[True, False, True, True]]), torch.tensor([[True, True, False, False]])]
    scores = merge.cluster_precision_scores(maps, fg, 4)
    torch.testing.assert_close(scores, torch.tensor([0.75, 1.0, 1 / 3, 0.0]))


def test_otsu_and_foreground_monotone():
    scores = torch.tensor([0.1, 0.12, 0.15, 0.11, 0.8, 0.85, 0.9])
    tau = merge.otsu_threshold(scores)
    assert tau == pytest.approx(0.8)
    sets = [(scores >= t).sum() for t in np.arange(0, 1, 0.05)]
    assert all(a >= b for a, b in zip(sets, sets[1:]))


# ----------------------------------------------------------------------------- co-occurrence and graph


def test_cooccurrence_two_labels():
    a = merge.cooccurrence([torch.tensor([[0, 1]])], 2)
    torch.testing.assert_close(a, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))


def test_cooccurrence_properties():
    gen = torch.Generator().manual_seed(5)
    maps = [torch.randint(0, 5, (9, 7), generator=gen) for _ in range(4)] + [torch.full((4, 4), 6)]
    a = merge.cooccurrence(maps, 8)
    assert torch.all(a.diagonal() == 0) and a.min() >= 0 and a.max() <= 1
    rows = a.sum(1)
    torch.testing.assert_close(rows[:5], torch.ones(5, dtype=torch.float64))
    assert rows[5] == 0 and rows[6] == 0 and rows[7] == 0    # absent, or only next to itself


def test_similarity_weighted_graph():
    a = torch.tensor([[0.0, 0.5, 0.2], [0.4, 0.0, 0.3], [0.1, 0.6, 0.0]], dtype=torch.float64)
    # parts 0 and 1 at 45 degrees (cosine 1/sqrt 2); label 2 (background) has no centroid
    weighted = merge.similarity_weighted(a, torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    c = 0.5 ** 0.5
    torch.testing.assert_close(weighted, torch.tensor([[0.0, 0.5 * c, 0.2], [0.4 * c, 0.0, 0.3], [0.1, 0.6, 0.0]],
                                                      dtype=torch.float64))
    opposite = merge.similarity_weighted(a, torch.tensor([[1.0, 0.0], [-3.0, 0.0]]))   # cosine -1 counts as 0
    assert opposite[0, 1] == 0 and opposite[1, 0] == 0 and opposite[0, 2] == 0.2


def test_cooccurrence_offsets_are_the_reference_list():
    # a single pair at distance 2 along a row is seen by (0, 2) and (0, -2) only; a knight's move by
    # the reference's (-2, -1) offset and not by its mirror (2, 1), which the list lacks
    line = torch.tensor([[0, 2, 1]])
    a = merge.cooccurrence([line], 3)
    assert a[0, 1] > 0 and a[1, 0] > 0
    counts = {}
    knight = torch.full((3, 2), 2)
    knight[0, 0], knight[2, 1] = 0, 1
    for dr, dc in merge.OFFSETS:
        counts[(dr, dc)] = counts.get((dr, dc), 0) + 1
    assert counts[(1, 1)] == 2 and counts[(1, -1)] == 2 and counts[(-1, 1)] == 2 and (2, 1) not in counts
    a = merge.cooccurrence([knight], 3)
    assert a[1, 0] > 0 and a[0, 1] == 0


def test_graph_edges():
    a = torch.tensor([[0.0, 0.5, 0.05, 0.2], [0.3, 0.0, 0.4, 0.0], [0.9, 0.6, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]])
    edges = merge.build_graph(a, 0.1)
    assert edges == [(0, 1, pytest.approx(0.3)), (0, 3, pytest.approx(0.2)), (1, 2, pytest.approx(0.4))]
    for i, j, w in edges:
        assert i < j and w == pytest.approx(min(a[i, j], a[j, i])) and w >= 0.1


def _two_cliques():
    edges = [(i, j, 1.0) for i in range(5) for j in range(i + 1, 5)]
    edges += [(i, j, 1.0) for i in range(5, 10) for j in range(i + 1, 10)]
    return edges + [(4, 5, 0.05)]


@pytest.mark.skipif(importlib.util.find_spec("infomap") is None, reason="infomap not installed")
def test_infomap_finds_the_cliques():
    modules = merge.detect_communities(_two_cliques(), 2, backend="infomap", markov_time=1.0, seed=1)
    assert set(modules.values()) == {1, 2}
    assert len({modules[i] for i in range(5)}) == 1 and modules[0] != modules[9]
    with pytest.raises(ConfigError, match="start at 1"):
        merge.detect_communities(_two_cliques(), 2, backend="infomap", seed=0)


def test_louvain_fallback_and_missing_backends(monkeypatch):
    modules = merge.detect_communities(_two_cliques(), 2, backend="louvain", seed=0)
    assert len({modules[i] for i in range(5)}) == 1 and modules[0] != modules[9]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "infomap" else real(name, *a))
    assert merge.community_backend("auto") == "louvain"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install"):
        merge.community_backend("auto")


def test_limit_communities_merges_the_weakest():
    edges = _two_cliques() + [(10, 11, 1.0), (9, 10, 0.5), (0, 11, 0.1)]
    modules = {**{i: 1 for i in range(5)}, **{i: 2 for i in range(5, 10)}, 10: 3, 11: 3}
    limited = merge.limit_communities(modules, edges, 2)
    assert limited[10] == limited[11] == limited[9] and limited[0] != limited[9]
    table = merge.community_table(13, limited)
    assert table[12] == 0 and set(table[:12].tolist()) == {1, 2}


# ----------------------------------------------------------------------------- end to end


def _image_folder(root, count=6, size=(72, 96)):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(count):
        img = np.zeros((*size, 3), np.uint8)
        img[: size[0] // 2] = (40, 90, 200)                  # "sky"
        img[size[0] // 2 :] = (90, 90, 90)                   # "road"
        y, x = rng.integers(20, 40), rng.integers(10, 60)
        img[y : y + 16, x : x + 24] = (200, 30, 30)          # an object
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("backbone", ["dino_vits16", "efficientnet_lite0"])
def test_fit_through_the_api(tmp_path, backbone):
    images = _image_folder(tmp_path / "images")
    overrides = [f"cache_dir={tmp_path / 'cache'}", "data.resolution=64", "params.k_fg=8", "params.k_cd=6",
                 "params.weight_threshold=0.01", "params.kmeans_restarts=2", "params.map_size=16",
                 "test.flip=true"]
    seg = unsupseg.fit("leopart", out=tmp_path / "run", images=images, backbone=backbone,
                       backbone_weights="random", clusters=3, overrides=overrides, log=lambda msg: None)
    predictor = unsupseg.load(tmp_path / "run").predictor
    assert predictor.cd_centroids.shape == (6, 50) and predictor.fg_centroids.shape == (8, 50)
    assert predictor.communities.shape == (7,) and int(predictor.communities.max()) < 3
    labels = seg.predict(Image.open(images / "0.png"))
    assert labels.shape == (72, 96) and labels.min() >= 0 and labels.max() < 3
    feats = seg.backbone(torch.rand(1, 3, 64, 64))
    scores = seg.predictor.classify(seg.predictor.embed(feats))
    assert scores.shape == (1, 3, *feats.shape[-2:]) and torch.all(scores.sum(1) == 1)


def test_predictor_follows_the_pipeline():
    from unsupseg.methods.leopart import LeopartPredictor

    state = {
        "pca_mean": torch.zeros(2), "pca_std": torch.ones(2), "pca_components": torch.eye(2),
        "fg_centroids": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),        # spherical: direction decides
        "fg_clusters": torch.tensor([True, False]),                      # the +x direction is foreground
        "cd_centroids": torch.tensor([[1.0, 0.0], [5.0, 0.0]]),         # L2: near or far along x
        "communities": torch.tensor([2, 1, 0]),                          # cd 0 -> 2, cd 1 -> 1, background -> 0
    }
    predictor = LeopartPredictor(state, 3)
    tokens = torch.tensor([[1.2, 0.1], [4.0, -0.5], [0.1, 3.0], [6.0, 0.0]]).T.reshape(1, 2, 2, 2)
    ids = predictor.classify(predictor.embed(tokens)).argmax(1)[0]
    assert ids.tolist() == [[2, 1], [0, 1]]
    with pytest.raises(ConfigError):
        LeopartPredictor(state, 2)


def test_reference_threshold_needs_labels(tmp_path):
    images = _image_folder(tmp_path / "images", count=3)
    overrides = [f"cache_dir={tmp_path / 'cache'}", "data.resolution=64", "params.k_fg=4", "params.k_cd=3",
                 "params.reference_threshold=true", "params.kmeans_restarts=1"]
    with pytest.raises(ConfigError, match="labelled"):
        unsupseg.fit("leopart", out=tmp_path / "run", images=images, backbone="efficientnet_lite0",
                     backbone_weights="random", clusters=3, overrides=overrides, log=lambda msg: None)


# ----------------------------------------------------------------------------- protocol: reference


def _camvid_tree(root, counts=(("train", 6), ("val", 4)), size=(72, 96)):
    """A CamVid-layout dataset: sky (class 0) above road (3), a car (8) somewhere on the road."""
    rng = np.random.default_rng(1)
    for split, count in counts:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            img = np.zeros((*size, 3), np.uint8)
            label = np.zeros(size, np.uint8)
            img[size[0] // 2 :] = (90, 90, 90)
            label[size[0] // 2 :] = 3
            img[: size[0] // 2] = (40, 90, 200)
            y, x = rng.integers(40, 50), rng.integers(10, 60)
            img[y : y + 16, x : x + 24] = (200, 30, 30)
            label[y : y + 16, x : x + 24] = 8
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / split / f"{split}{i}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"{split}{i}.png")
    return root


def _reference_fit(tmp_path, *extra):
    root = _camvid_tree(tmp_path / "camvid")
    overrides = [
        f"cache_dir={tmp_path / 'cache'}",
        "data.resolution=64",
        "params.k_fg=8",
        "params.k_cd=6",
        "params.weight_threshold=0.01",
        "params.kmeans_restarts=2",
        "params.map_size=16",
        "params.protocol=reference",
        "params.runs=3",
        "params.foreground=cbfe",
        "params.saliency=distinctiveness",
        "params.cbfe_threshold=0.3",
        *extra,
    ]
    unsupseg.fit("leopart", out=tmp_path / "run", dataset="camvid", root=root, backbone="efficientnet_lite0",
                 backbone_weights="random", clusters=3, overrides=overrides, log=lambda msg: None)
    return root, unsupseg.load(tmp_path / "run")


def test_reference_protocol_is_transductive_and_scores_every_seed(tmp_path):
    from unsupseg.data import Preprocess, build_dataset
    from unsupseg.features.extract import extract_features

    root, seg = _reference_fit(tmp_path)
    predictor = seg.predictor
    # PCA standardised over the tokens of train AND val (the reference pools both splits)
    prep = build_dataset("camvid", root, "val").eval_preprocess(64, multiple=seg.backbone.stride)
    stores = [extract_features(seg.backbone, build_dataset("camvid", root, split), prep if split == "val" else
                               Preprocess(64, "short", "bilinear", seg.backbone.stride), cache_dir=tmp_path / "cache")
              for split in ("train", "val")]
    tokens = torch.cat([s[i].flatten(1).T for s in stores for i in range(len(s))]).double()
    torch.testing.assert_close(predictor.pca_mean.double(), tokens.mean(0), rtol=1e-5, atol=1e-5)
    # one community table per Infomap seed: 20 + 1 convention, ids 0 .. clusters-1
    assert predictor.community_runs.shape == (3, 7) and int(predictor.community_runs.max()) <= 2
    assert predictor.fg_clusters_eval.shape == (8,)

    report = unsupseg.evaluate(seg, dataset="camvid", root=root, split="val")
    assert report["protocol"] == "leopart-reference" and report["seeds"] == [1, 2, 3] and report["map_size"] == 16
    mious = [r["miou"] for r in report["per_seed"]]
    assert report["miou"] == pytest.approx(np.mean(mious)) and report["miou_std"] == pytest.approx(np.std(mious))
    assert all(0 <= m <= 100 for m in mious)
    with pytest.raises(ConfigError, match="--split val"):
        unsupseg.evaluate(seg, dataset="camvid", root=root, split="train")
    # the run still segments new images (first seed's communities), scored like any run on request
    plain = unsupseg.evaluate(seg, dataset="camvid", root=root, split="val", run_protocol=False, flip=False)
    assert plain["matching"] == "dataset" and len(plain["mapping"]) == 3


def test_reference_label_map_uses_each_split_foreground_at_map_size():
    from unsupseg.features.clustering import PCA
    from unsupseg.methods.leopart import reference_label_map

    pca = PCA(torch.zeros(2), torch.ones(2), torch.eye(2))
    fg_centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cd_centroids = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    # 1 x 3 tokens: +x near (fg, cd 0), +x far (fg, cd 1), +y (cluster 1)
    features = torch.tensor([[1.0, 5.0, 0.0], [0.0, 0.0, 3.0]]).reshape(2, 1, 3)
    # at 4 x 4 the columns replicate tokens 0, 0, 1, 2 (cd 0, 0, 1, 0); the foreground mask is made at
    # 4 x 4 too, as the reference builds and uses it (no round trip through the 2 x 6 input)
    only_x = reference_label_map(pca, fg_centroids, torch.tensor([True, False]), cd_centroids, features, 4)
    assert only_x.tolist() == [[0, 0, 1, 2]] * 4        # token 2 is background (label k_cd = 2)
    only_y = reference_label_map(pca, fg_centroids, torch.tensor([False, True]), cd_centroids, features, 4)
    assert only_y.tolist() == [[2, 2, 2, 0]] * 4
    no_cbfe = torch.zeros(0, 2), torch.zeros(0, dtype=torch.bool)
    everything = reference_label_map(pca, *no_cbfe, cd_centroids, features, 4)
    assert everything.tolist() == [[0, 0, 1, 0]] * 4


def test_reference_protocol_alone_takes_tau_from_ground_truth_and_says_so(tmp_path):
    from unsupseg.methods.leopart.params import Params, resolve_protocol

    resolved, notes = resolve_protocol(Params(protocol="reference", saliency_dir=str(tmp_path)))
    assert resolved.reference_threshold is True and resolved.saliency == "precomputed"
    assert f"noisy foreground from the masks in {tmp_path}" in notes
    label_free, notes = resolve_protocol(Params())
    assert label_free.reference_threshold is False and label_free.saliency == "auto" and notes == []
    fixed, _ = resolve_protocol(Params(protocol="reference", cbfe_threshold=0.3))
    assert fixed.reference_threshold is False and fixed.cbfe_threshold == 0.3
    graph, notes = resolve_protocol(Params(protocol="reference", graph="cooccurrence-similarity"))
    assert graph.graph == "cooccurrence" and "co-occurrence graph" in notes

    root = _camvid_tree(tmp_path / "camvid")
    lines = []
    unsupseg.fit("leopart", out=tmp_path / "run", dataset="camvid", root=root, backbone="efficientnet_lite0",
                 backbone_weights="random", clusters=3, log=lines.append,
                 overrides=[f"cache_dir={tmp_path / 'cache'}", "data.resolution=64", "params.k_fg=8", "params.k_cd=6",
                            "params.weight_threshold=0.01", "params.kmeans_restarts=1", "params.map_size=16",
                            "params.protocol=reference", "params.runs=1", "params.foreground=cbfe",
                            "params.saliency=distinctiveness"])
    said = [line for line in lines if line.startswith("leopart: protocol reference: ")]
    assert len(said) == 1 and "CBFE threshold from training ground truth" in said[0]
    assert any(" from ground truth (cut " in line for line in lines)


def test_precomputed_saliency_files(tmp_path):
    from unsupseg.errors import DataError
    from unsupseg.methods.leopart import precomputed_foreground

    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, :4] = 1
    torch.save(masks, tmp_path / "attn_dino_val.pt")
    loaded = precomputed_foreground(tmp_path, "val", 2)
    assert len(loaded) == 2 and loaded[0].dtype == torch.bool and int(loaded[0].sum()) == 32 and not loaded[1].any()
    with pytest.raises(DataError, match="3 images"):
        precomputed_foreground(tmp_path, "val", 3)
    with pytest.raises(DataError, match="attn_dino_train.pt"):
        precomputed_foreground(tmp_path, "train", 2)


def test_vitb8_preset_has_the_reference_values():
    # docs/methods/leopart.md §2.10 / the reference README: Leopart ViT-B/8 uses K_cd 109, markov time 0.4, wt 0.07
    config = unsupseg.resolve_config("leopart", preset="voc21-vitb8")
    assert config.backbone.name == "dino_vitb8" and config.clusters == 21 and config.test.interpolation == "bilinear"
    assert (config.params["k_cd"], config.params["markov_time"], config.params["weight_threshold"]) == (109, 0.4, 0.07)
    assert config.params["protocol"] == "label-free"


# ----------------------------------------------------------------------------- community backend, CLI


def _console(tmp_path, *args, hide_infomap: bool):
    """The installed console script, in a subprocess; ``hide_infomap`` makes ``import infomap`` fail
    (a sitecustomize that marks it missing), as on an install without the leopart extra."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['infomap'] = None\n" if hide_infomap else "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "UNSUPSEG_PROGRESS": "0", "COLUMNS": "200"}
    script = Path(sys.executable).parent / "unsupseg"
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env)


_TINY = ["--backbone", "efficientnet_lite0", "--backbone-weights", "random", "--clusters", "3",
         "--set", "data.resolution=64", "--set", "params.k_fg=8", "--set", "params.k_cd=6",
         "--set", "params.weight_threshold=0.01", "--set", "params.kmeans_restarts=1", "--set", "params.map_size=16",
         "--set", "params.foreground=all"]


def test_the_community_backend_is_recorded_and_printed_and_the_reference_protocol_needs_infomap(tmp_path):
    import json

    root = _camvid_tree(tmp_path / "camvid")
    data = ["--dataset", "camvid", "--root", str(root)]
    fit = _console(tmp_path, "fit", "--method", "leopart", *data, *_TINY, "--out", str(tmp_path / "run"),
                   hide_infomap=True)
    assert fit.returncode == 0, fit.stderr
    networkx = importlib.metadata.version("networkx")
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["fit_record"] == {
        "community_detection": f"louvain (networkx {networkx})"}
    score = _console(tmp_path, "evaluate", str(tmp_path / "run"), *data, "--split", "val", "--no-crf",
                     hide_infomap=False)
    assert score.returncode == 0, score.stderr
    assert score.stdout.splitlines()[-1] == f"community detection: louvain (networkx {networkx})"
    report = _console(tmp_path, "report", str(tmp_path / "run"), "--images", str(root / "val"), "--max-images", "1",
                      "--out", str(tmp_path / "report.html"), hide_infomap=False)
    assert report.returncode == 0, report.stderr
    assert f"louvain (networkx {networkx})" in (tmp_path / "report.html").read_text()

    refused = _console(tmp_path, "fit", "--method", "leopart", *data, *_TINY, "--set", "params.protocol=reference",
                       "--out", str(tmp_path / "ref"), hide_infomap=True)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == ['error: params.protocol=reference needs Infomap, which is not installed: '
                                           'pip install -e ".[leopart]"']
    assert not (tmp_path / "ref" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- same result on every machine


def test_pca_tokens_do_not_depend_on_how_the_sums_are_ordered():
    # another CPU, BLAS build or thread count orders the sums of the PCA's products differently; the
    # tokens k-means sees must not change (float32 products moved them by ~1e-7 here)
    from unsupseg.methods.leopart.tokens import GRID, fit_stable_pca, pca_tokens

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3000, 40, generator=gen) @ torch.randn(40, 40, generator=gen)).half().float() + 2
    torch.set_num_threads(1)
    one = fit_stable_pca(lambda: [x], 10)
    torch.set_num_threads(3)
    # rows in another order and other chunks: the same rows, other sums
    order = torch.randperm(len(x), generator=gen)
    other = fit_stable_pca(lambda: x[order].split(7), 10)
    a, b = pca_tokens(one, x), pca_tokens(other, x)
    assert a.dtype == torch.float64 and torch.equal(a * GRID, (a * GRID).round())
    assert torch.equal(a, b)


def test_a_fit_gives_the_same_clusters_with_other_thread_counts(tmp_path):
    images = _image_folder(tmp_path / "images", count=8)
    overrides = ["data.resolution=64", "params.k_fg=8", "params.k_cd=6",
                 "params.weight_threshold=0.01", "params.kmeans_restarts=2", "params.map_size=16"]
    states = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        # a cache of its own: the backbone's features are computed with this thread count too
        unsupseg.fit("leopart", out=tmp_path / f"run{threads}", images=images, backbone="efficientnet_lite0",
                     backbone_weights="random", clusters=3, log=lambda msg: None,
                     overrides=[f"cache_dir={tmp_path / f'cache{threads}'}", *overrides])
        states.append(unsupseg.load(tmp_path / f"run{threads}").predictor.state_dict())
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
