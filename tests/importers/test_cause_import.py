"""Importing the published CAUSE files: a run whose predictions follow the reference's test path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unsupseg import api
from unsupseg.backbones import build_backbone
from unsupseg.errors import CheckpointError
from unsupseg.importers.cause import import_cause

D, R_DIM, P_DIM, K, C, FFN = 384, 6, 10, 12, 4, 32   # dino_vits16: D = 384, patch 16
SIDE = 4                                            # TR query table 4 x 4 -> test resolution 64


pytestmark = pytest.mark.usefixtures("one_thread")


def conv(out, inp, g):
    return torch.randn(out, inp, 1, 1, generator=g) / math.sqrt(inp)


def mlp_head(prefix, g):
    return {
        f"{prefix}.f1.weight": conv(R_DIM, D, g), f"{prefix}.f1.bias": torch.randn(R_DIM, generator=g),
        f"{prefix}.f2.0.weight": conv(D, D, g), f"{prefix}.f2.0.bias": torch.randn(D, generator=g),
        f"{prefix}.f2.2.weight": conv(R_DIM, D, g), f"{prefix}.f2.2.bias": torch.randn(R_DIM, generator=g),
    }


def tr_head(prefix, g):
    sd = {f"{prefix}.query_pos": torch.randn(SIDE * SIDE, D, generator=g)}
    for attn in ("self_attn", "multihead_attn"):
        sd[f"{prefix}.tr.{attn}.in_proj_weight"] = torch.randn(3 * D, D, generator=g) / math.sqrt(D)
        sd[f"{prefix}.tr.{attn}.in_proj_bias"] = torch.randn(3 * D, generator=g) * 0.1
        sd[f"{prefix}.tr.{attn}.out_proj.weight"] = torch.randn(D, D, generator=g) / math.sqrt(D)
        sd[f"{prefix}.tr.{attn}.out_proj.bias"] = torch.randn(D, generator=g) * 0.1
    sd[f"{prefix}.tr.linear1.weight"] = torch.randn(FFN, D, generator=g) / math.sqrt(D)
    sd[f"{prefix}.tr.linear1.bias"] = torch.randn(FFN, generator=g) * 0.1
    sd[f"{prefix}.tr.linear2.weight"] = torch.randn(D, FFN, generator=g) / math.sqrt(FFN)
    sd[f"{prefix}.tr.linear2.bias"] = torch.randn(D, generator=g) * 0.1
    for i in (1, 2, 3):
        sd[f"{prefix}.tr.norm{i}.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        sd[f"{prefix}.tr.norm{i}.bias"] = 0.1 * torch.randn(D, generator=g)
    sd.update({k.replace(f"{prefix}.", f"{prefix}.tr.", 1): v for k, v in mlp_head(prefix, g).items()})
    return sd


def published(tmp_path, variant, seed=0):
    """Files in the published layout (docs/checkpoints.md), random tensors of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    make = tr_head if variant == "tr" else mlp_head
    segment = {**make("head", g), **make("head_ema", g)}
    for prefix in ("projection_head", "projection_head_ema"):
        segment[f"{prefix}.f.weight"] = conv(P_DIM, R_DIM, g)
        segment[f"{prefix}.f.bias"] = torch.randn(P_DIM, generator=g)
    segment["linear.f.weight"], segment["linear.f.bias"] = conv(C, R_DIM, g), torch.randn(C, generator=g)
    codebook = torch.randn(K, D, generator=g)
    cluster = {"codebook": codebook, "cluster_probe": torch.randn(C, R_DIM, generator=g)}
    paths = tmp_path / f"segment_{variant}.pth", tmp_path / f"cluster_{variant}.pth", tmp_path / "modular.npy"
    torch.save(segment, paths[0])
    torch.save(cluster, paths[1])
    np.save(paths[2], codebook.numpy())
    return segment, cluster, paths


# ----------------------------------------------------------------------------- the reference's test path, by hand


def ref_head_mlp(x, sd, prefix="head_ema"):
    """HeadSegment on B x D x h x w: f1(x) + f2.2(relu(f2.0(x))) with 1x1 convolutions."""
    def w(name):
        return sd[f"{prefix}.{name}"]

    return F.conv2d(x, w("f1.weight"), w("f1.bias")) + F.conv2d(
        F.relu(F.conv2d(x, w("f2.0.weight"), w("f2.0.bias"))), w("f2.2.weight"), w("f2.2.bias"))


def ref_attention(q, k, v, sd, name):
    """torch MultiheadAttention with one head, written out (batch-first here)."""
    wq, wk, wv = sd[f"{name}.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[f"{name}.in_proj_bias"].chunk(3)
    qq, kk, vv = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    attn = torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
    return (attn @ vv) @ sd[f"{name}.out_proj.weight"].T + sd[f"{name}.out_proj.bias"]


def ref_head_tr(x, sd, codebook, prefix="head_ema"):
    """Decoder.forward + TRDecoder.forward of the reference (eval: no dropout)."""
    b, d, h, w = x.shape
    memory = x.flatten(2).transpose(1, 2)
    index = (F.normalize(memory, dim=-1) @ F.normalize(codebook, dim=1).T).argmax(-1)
    tgt = codebook[index]
    pos = sd[f"{prefix}.query_pos"].unsqueeze(0)
    def ln(t, i):
        return F.layer_norm(t, (d,), sd[f"{prefix}.tr.norm{i}.weight"], sd[f"{prefix}.tr.norm{i}.bias"])

    tgt = ln(tgt + ref_attention(tgt + pos, tgt + pos, tgt, sd, f"{prefix}.tr.self_attn"), 1)
    tgt = ln(tgt + ref_attention(tgt + pos, memory, memory, sd, f"{prefix}.tr.multihead_attn"), 2)
    ffn = F.relu(tgt @ sd[f"{prefix}.tr.linear1.weight"].T + sd[f"{prefix}.tr.linear1.bias"])
    tgt = tgt + ffn @ sd[f"{prefix}.tr.linear2.weight"].T + sd[f"{prefix}.tr.linear2.bias"]
    tgt = memory + ln(tgt, 3)
    z = tgt.transpose(1, 2).reshape(b, d, h, w)
    return ref_head_mlp(z, sd, f"{prefix}.tr")


def reference_scores(variant, feats, feats_flip, size, segment, cluster):
    head = (
        (lambda x: ref_head_tr(x, segment, cluster["codebook"]))
        if variant == "tr"
        else (lambda x: ref_head_mlp(x, segment))
    )
    seg = (head(feats) + head(feats_flip).flip(-1)) / 2
    seg = F.interpolate(seg, size, mode="bilinear", align_corners=False)
    return torch.einsum("bchw,nc->bnhw", F.normalize(seg, dim=1), F.normalize(cluster["cluster_probe"], dim=1))


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_imported_run_reproduces_the_reference_test_path(tmp_path, variant):
    segment, cluster, (seg_file, clu_file, modular) = published(tmp_path, variant)
    run = import_cause(f"cause-{variant}", seg_file, clu_file, "dino_vits16", tmp_path / "run",
                       backbone_weights="random", modular=modular)
    seg = api.load(run)
    assert seg.num_clusters == C and seg.config.method == f"cause-{variant}"
    assert seg.config.test.flip and seg.config.test.alpha == 3.0
    if variant == "tr":
        assert seg.resolution == SIDE * 16 and seg.predictor.fixed_grid == (SIDE, SIDE)
    backbone = build_backbone("dino_vits16", "random")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    feats, feats_flip = backbone(image), backbone(image.flip(-1))
    with torch.no_grad():
        expected = reference_scores(variant, feats, feats_flip, (64, 64), segment, cluster)
    ours = seg.scores(feats, feats_flip, (64, 64))
    assert torch.allclose(ours, expected, atol=1e-4)
    prediction = seg.predict_tensor(image[0], crf=False)
    assert np.array_equal(prediction.labels, expected.argmax(1)[0].numpy())


def test_imported_tr_run_segments_other_shapes_by_tiling(tmp_path):
    _, _, (seg_file, clu_file, _) = published(tmp_path, "tr")
    seg = api.load(
        import_cause("cause-tr", seg_file, clu_file, "dino_vits16", tmp_path / "run", backbone_weights="random")
    )
    labels = seg.predict_tensor(torch.rand(3, 64, 112), crf=False).labels
    assert labels.shape == (64, 112) and labels.max() < C


def test_malformed_files_are_refused_with_the_file_and_key(tmp_path):
    segment, cluster, (seg_file, clu_file, modular) = published(tmp_path, "mlp")
    out = tmp_path / "run"
    broken = dict(segment)
    del broken["head_ema.f2.2.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken\.pth.*f2\.2\.bias|f2\.2\.bias.*broken\.pth"):
        import_cause("cause-mlp", tmp_path / "broken.pth", clu_file, "dino_vits16", out, backbone_weights="random")
    torch.save({"codebook": cluster["codebook"]}, tmp_path / "nocluster.pth")
    with pytest.raises(CheckpointError, match=r"nocluster\.pth.*cluster_probe"):
        import_cause("cause-mlp", seg_file, tmp_path / "nocluster.pth", "dino_vits16", out, backbone_weights="random")
    with pytest.raises(CheckpointError, match="query_pos"):
        import_cause("cause-tr", seg_file, clu_file, "dino_vits16", out, backbone_weights="random")
    with pytest.raises(CheckpointError, match="384"):  # ViT-B gives 768-d tokens
        import_cause("cause-mlp", seg_file, clu_file, "dino_vitb16", out, backbone_weights="random")
    np.save(tmp_path / "bad.npy", np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"bad\.npy"):
        import_cause(
            "cause-mlp", seg_file, clu_file, "dino_vits16", out, backbone_weights="random", modular=tmp_path / "bad.npy"
        )


class Payload:
    """Not a tensor: a weights-only load must refuse to build it."""


def test_pickled_objects_are_not_loaded(tmp_path):
    _, _, (seg_file, clu_file, _) = published(tmp_path, "mlp")
    torch.save({"head_ema.f1.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        import_cause(
            "cause-mlp", tmp_path / "evil.pth", clu_file, "dino_vits16", tmp_path / "run", backbone_weights="random"
        )
    assert not (tmp_path / "run").exists()
