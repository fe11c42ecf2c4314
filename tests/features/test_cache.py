import torch

from tests.conftest import write_images
from unsupseg.backbones import build_backbone
from unsupseg.data import ImageFolder, Preprocess
from unsupseg.features.extract import extract_features


class CountingBackbone(torch.nn.Module):
    """A real backbone that counts its forward calls (to prove a cache hit skips it)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.name, self.weights_id, self.stride, self.dim = inner.name, inner.weights_id, inner.stride, inner.dim

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _setup(tmp_path):
    write_images(tmp_path / "imgs", 3)
    net = CountingBackbone(build_backbone("efficientnet_lite0", weights="random"))
    return ImageFolder(tmp_path / "imgs"), net, Preprocess(32, mode="short", multiple=8)


def test_hit_skips_backbone_and_returns_same_features(tmp_path):
    data, net, prep = _setup(tmp_path)
    first = extract_features(net, data, prep, cache_dir=tmp_path / "c", batch_size=2)
    calls = net.calls
    assert not first.hit and calls > 0
    second = extract_features(net, data, prep, cache_dir=tmp_path / "c", batch_size=2)
    assert second.hit and net.calls == calls
    assert len(second) == 3 and second.ids == data.ids
    for i in range(3):
        assert torch.equal(first[i], second[i])
        assert second[i].shape == (net.dim, 32 // 8, 40 // 8)
    # features equal a direct forward, up to float16 storage
    image, _ = prep.apply(data[0].image)
    direct = net.inner(image[None])[0]
    assert torch.allclose(second[0].float(), direct, atol=2e-3, rtol=1e-2)


def test_key_change_reextracts(tmp_path):
    data, net, prep = _setup(tmp_path)
    a = extract_features(net, data, prep, cache_dir=tmp_path / "c")
    b = extract_features(net, data, Preprocess(48, mode="short", multiple=8), cache_dir=tmp_path / "c")
    c = extract_features(net, data, prep, cache_dir=tmp_path / "c", flip=True)
    assert not b.hit and not c.hit and len({a.path, b.path, c.path}) == 3
    assert not torch.equal(a[0], c[0])
    # other weights -> another key
    net.weights_id = "other"
    assert not extract_features(net, data, prep, cache_dir=tmp_path / "c").hit
    # a changed dataset (new file) -> another key
    write_images(tmp_path / "imgs", 4, seed=1)
    assert not extract_features(net, ImageFolder(tmp_path / "imgs"), prep, cache_dir=tmp_path / "c").hit


def test_truncated_cache_is_detected_and_rebuilt(tmp_path):
    data, net, prep = _setup(tmp_path)
    store = extract_features(net, data, prep, cache_dir=tmp_path / "c")
    reference = store[2].clone()
    feat_file = store.path / "features.f16"
    size = feat_file.stat().st_size
    with open(feat_file, "r+b") as fh:
        fh.truncate(size - 10)
    calls = net.calls
    rebuilt = extract_features(net, data, prep, cache_dir=tmp_path / "c")
    assert not rebuilt.hit and net.calls > calls
    assert torch.equal(rebuilt[2], reference)
