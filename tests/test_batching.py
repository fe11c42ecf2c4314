"""Batched inference: predict_batch / predict_stream, segment and evaluate give exactly what one
image at a time gives, hold at most a batch of photos, and really run several photos per forward."""

import numpy as np
import pytest
import torch
from PIL import Image

import unsupseg
from tests.conftest import write_images
from unsupseg.api import Segmenter, same_shape_chunks
from unsupseg.backbones import build_backbone
from unsupseg.config import RunConfig
from unsupseg.methods.base import PredictorInfo
from unsupseg.methods.cause import Params, build_predictor
from unsupseg.methods.cause.heads import MLPHead, TRHead

pytestmark = pytest.mark.usefixtures("one_thread")

# (width, height): 64x48 and 50x37 share a preprocessed size at 32 px (43 x 32), 96x80 and 48x64 do not
SIZES = [(64, 48), (48, 64), (50, 37), (64, 48), (96, 80), (50, 37), (48, 64), (64, 48)]


def photos(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 2] = rng.integers(0, 256, 3)
        img[:, w // 2 :] = rng.integers(0, 256, 3)
        img[h // 2 :] = (img[h // 2 :] + rng.integers(0, 60, (h - h // 2, w, 3))).clip(0, 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    return out


def cause_segmenter(backbone_name: str, variant: str, clusters: int = 4, flip: bool = True) -> Segmenter:
    backbone = build_backbone(backbone_name, "random")
    torch.manual_seed(0)
    dim, r = backbone.dim, 6
    codebook = torch.randn(5, dim)
    head = MLPHead(dim, r) if variant == "mlp" else TRHead(dim, r, codebook, 4, ffn_dim=16)
    state = {f"head_ema.{k}": v for k, v in head.state_dict().items()}
    state.update(codebook=codebook, cluster_probe=torch.randn(clusters, r))
    if variant == "tr":
        state["grid"] = torch.tensor([2, 2])   # smaller than the maps: the segmenter tiles
    predictor = build_predictor(Params(), state, PredictorInfo(clusters, dim, backbone.stride))
    config = RunConfig(method=f"cause-{variant}", clusters=clusters)
    config.data.resolution = 32
    config.test.flip = flip
    return Segmenter(config, backbone, predictor, torch.device("cpu"))


def batch_sizes_seen(seg: Segmenter) -> list[int]:
    sizes: list[int] = []
    seg.backbone.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    return sizes


@pytest.mark.parametrize("backbone, variant", [("efficientnet_lite0", "mlp"), ("dino_vits16", "mlp"),
                                               ("dino_vits16", "tr")])
def test_predict_batch_equals_one_image_at_a_time(backbone, variant):
    seg = cause_segmenter(backbone, variant)
    images = photos()
    alone = [seg.predict(im) for im in images]
    sizes = batch_sizes_seen(seg)
    together = seg.predict_batch(images, batch_size=3)
    for a, b, im in zip(alone, together, images):
        assert b.shape == (im.height, im.width)
        assert np.array_equal(a, b)
    # photos of one size did share forward passes, never more than 3 (at most 3 are held, so mixed
    # sizes make smaller groups); same-size photos run in full batches (flip on: two passes each)
    assert 2 <= max(sizes) <= 3 and len(sizes) < 2 * len(images)
    sizes.clear()
    seg.predict_batch(photos([(64, 48)] * 5 + [(50, 37)]), batch_size=3)
    assert sizes == [3, 3, 3, 3]


def test_cpu_default_is_one_photo_per_forward():
    # CPU results stay exactly those of one at a time; a GPU batches the run's batch_size by default
    seg = cause_segmenter("efficientnet_lite0", "mlp", flip=False)
    assert seg.config.batch_size == 8 and seg.batch_size == 1
    sizes = batch_sizes_seen(seg)
    seg.predict_batch(photos([(64, 48)] * 3))
    assert sizes == [1, 1, 1]


@pytest.mark.parametrize("crf", [False, True])
def test_batched_probabilities_match_single_ones(crf):
    seg = cause_segmenter("efficientnet_lite0", "mlp")
    prep = seg.preprocess()
    tensors = [prep.apply(im)[0] for im in photos([(64, 48)] * 3)]
    batch = seg.predict_tensors(torch.stack(tensors), crf=crf)
    for i, t in enumerate(tensors):
        one = seg.predict_tensor(t, crf=crf)
        assert np.array_equal(batch.labels[i], one.labels)
        # batched convolutions round differently in the last bits (3e-7 here); ten mean-field
        # iterations of the CRF carry that to 7e-5
        assert torch.allclose(batch.probabilities[i], one.probabilities, atol=1e-3 if crf else 1e-6)


def test_predict_stream_holds_at_most_a_batch_and_returns_every_photo_once():
    seg = cause_segmenter("efficientnet_lite0", "mlp", flip=False)
    images = photos()
    consumed = []

    def items():
        for i, im in enumerate(images):
            consumed.append(i)
            yield i, im

    produced = []
    for key, pil, labels in seg.predict_stream(items(), batch_size=3):
        produced.append(key)
        assert len(consumed) - len(produced) <= 2   # at most 3 held, one of them just handed out
        assert labels.shape == (pil.height, pil.width)
    assert sorted(produced) == list(range(len(images)))


def test_same_shape_chunks_cut_runs_at_shape_changes_and_batch_size():
    class Store:
        shapes = [(4, 2, 3)] * 3 + [(4, 3, 2)] + [(4, 2, 3)] * 3
        label_shapes = [(16, 24)] * 3 + [(24, 16)] + [(16, 24), (16, 24), (16, 25)]

        def __len__(self):
            return len(self.shapes)

    assert same_shape_chunks(Store(), 2) == [[0, 1], [2], [3], [4, 5], [6]]
    assert same_shape_chunks(Store(), 8) == [[0, 1, 2], [3], [4, 5], [6]]


@pytest.fixture(scope="module")
def kmeans_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    write_images(tmp / "fit", 4)
    unsupseg.fit("kmeans", images=tmp / "fit", out=tmp / "run", backbone="efficientnet_lite0", clusters=3,
                 overrides=["data.resolution=32", "params.restarts=1", f"cache_dir={tmp / 'cache'}"],
                 log=lambda m: None)
    return tmp


def test_segment_in_batches_writes_the_same_files_as_one_by_one(kmeans_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, im in enumerate(photos()):
        im.save(folder / f"p{i}.png")
    one = unsupseg.segment(kmeans_run / "run", [folder], tmp_path / "one", batch_size=1)
    many = unsupseg.segment(kmeans_run / "run", [folder], tmp_path / "many", batch_size=3)
    assert sorted(p.name for p in one) == sorted(p.name for p in many) == [f"p{i}.png" for i in range(8)]
    for i in range(8):
        for name in (f"p{i}.png", f"p{i}_overlay.jpg"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name
    assert Image.open(tmp_path / "many" / "p4.png").size == (96, 80)


def test_evaluate_in_batches_gives_the_one_by_one_scores(kmeans_run, tmp_path):
    root = tmp_path / "camvid"
    paths = write_images(root / "val", 3, size=(64, 48), seed=1) + [
        p.rename(root / "val" / f"z{p.name}") for p in write_images(tmp_path / "tall", 2, size=(48, 64), seed=2)]
    (root / "valannot").mkdir()
    for p in paths:
        w, h = Image.open(p).size
        label = np.tile(np.where(np.arange(w) < w // 2, 3, 0), (h, 1)).astype(np.uint8)
        label[:4] = 11
        Image.fromarray(label).save(root / "valannot" / p.name)
    seg = unsupseg.load(kmeans_run / "run")
    batches = []
    scores = seg.scores
    seg.scores = lambda feats, *args: batches.append(len(feats)) or scores(feats, *args)
    for crf in (False, True):
        one = unsupseg.evaluate(seg, dataset="camvid", root=root, split="val", crf=crf, batch_size=1)
        many = unsupseg.evaluate(seg, dataset="camvid", root=root, split="val", crf=crf, batch_size=4)
        assert one["confusion"] == many["confusion"] and one["miou"] == many["miou"]
        assert sum(map(sum, many["confusion"])) > 0
        # sorted ids: three 64x48 images, then two 48x64 ones
        assert batches == [1, 1, 1, 1, 1, 3, 2]
        batches.clear()
