"""STEGO on a few real CamVid frames with the real efficientnet_lite0 weights."""

import pytest
import torch

import unsupseg.api as api


@pytest.mark.slow
def test_knn_partners_of_real_frames_come_from_the_same_video(tmp_path, camvid_root):
    # four consecutive frames from each of two videos (CamVid is sampled from driving videos)
    frames = (
        sorted((camvid_root / "train").glob("0001TP_*.png"))[:4]
        + sorted((camvid_root / "train").glob("0016E5_*.png"))[:4]
    )
    folder = tmp_path / "frames"
    folder.mkdir()
    for frame in frames:
        (folder / frame.name).symlink_to(frame)
    seg = api.fit(
        "stego", out=tmp_path / "run", images=folder, backbone="efficientnet_lite0", clusters=4, log=lambda _: None,
        overrides=["data.resolution=96", "test.crf=false", "params.steps=3", "params.batch_size=4", "params.knn_k=3",
                   "params.dim=8", "params.feature_samples=5"],
    )
    knn = api.rundir.load(tmp_path / "run").state["knn"]
    video = torch.tensor([0] * 4 + [1] * 4)
    assert torch.equal(knn[:, 0], torch.arange(8))                  # each frame is its own best match
    assert torch.equal(video[knn[:, 1:4]], video[:, None].expand(8, 3))
    labels = seg.predict(frames[0])
    assert labels.shape == (360, 480) and 0 <= labels.min() and labels.max() < 4
