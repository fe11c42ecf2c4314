"""Leopart fine-tuning: crop boxes, Sinkhorn, RoI alignment, loss, schedules, queue, a few real steps
of a small random ViT, and the written backbone file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unsupseg.backbones import build_backbone
from unsupseg.engine import Dist
from unsupseg.errors import ConfigError, Interrupted, RunDirError
from unsupseg.methods.leopart import finetune as lf
from unsupseg.methods.leopart import views as lv

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- crops


@pytest.mark.parametrize("seed", range(5))
def test_crop_boxes_map_back_to_the_same_rectangle(seed):
    p = lf.FinetuneParams()
    rng = np.random.default_rng(seed)
    width, height = 500, 375
    boxes = lv.sample_crop_boxes(width, height, p, rng)
    sizes = [p.global_size] * 2 + [p.local_size] * 4
    gc, al = lv.overlap_boxes(boxes, sizes, 2)
    assert gc.shape == (2, 6, 4) and al.shape == (6, 2, 4)
    for g in range(2):
        torch.testing.assert_close(gc[g, g], torch.tensor([0.0, 0.0, p.global_size, p.global_size]))
        assert lv._intersection(boxes[g], boxes[1 - g]) > int(0.02 * width * height)
    for v in range(2, 6):
        assert all(lv._intersection(boxes[v], boxes[g]) > int(0.01 * width * height) for g in range(2))

    def back(box_in_frame, crop, size):
        x1, y1, x2, y2 = crop
        sx, sy = (x2 - x1) / size, (y2 - y1) / size
        return torch.stack([box_in_frame[0] * sx + x1, box_in_frame[1] * sy + y1,
                            box_in_frame[2] * sx + x1, box_in_frame[3] * sy + y1])

    for g in range(2):
        for v in range(6):
            a = back(gc[g, v].double(), boxes[g], sizes[g])
            b = back(al[v, g].double(), boxes[v], sizes[v])
            torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
            inter = [max(boxes[g][0], boxes[v][0]), max(boxes[g][1], boxes[v][1]),
                     min(boxes[g][2], boxes[v][2]), min(boxes[g][3], boxes[v][3])]
            torch.testing.assert_close(a, torch.tensor(inter, dtype=torch.float64), atol=1e-3, rtol=0)
            assert gc[g, v].min() >= 0 and gc[g, v].max() <= sizes[g] + 1e-4
            assert al[v, g].min() >= 0 and al[v, g].max() <= sizes[v] + 1e-4


def test_overlap_constraints_always_hold():
    p = lf.FinetuneParams()
    for seed in range(300):
        boxes = lv.sample_crop_boxes(320, 240, p, np.random.default_rng(seed))
        assert lv._intersection(boxes[0], boxes[1]) > int(0.02 * 320 * 240)
        for v in range(2, 6):
            assert min(lv._intersection(boxes[v], boxes[g]) for g in range(2)) > int(0.01 * 320 * 240)


def test_rrc_box_inside_the_image_and_in_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, y1, x2, y2 = lv.sample_rrc_box(640, 480, (0.25, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
        assert (x2 - x1) * (y2 - y1) >= 0.2 * 640 * 480


def test_views_are_deterministic_per_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    p = lf.FinetuneParams(global_size=64, local_size=32)
    a = lv.make_views(image, p, np.random.default_rng([1, 2, 3]))
    b = lv.make_views(image, p, np.random.default_rng([1, 2, 3]))
    assert a["globals"].shape == (2, 3, 64, 64) and a["locals"].shape == (4, 3, 32, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert 0 <= a["globals"].min() and a["globals"].max() <= 1
    batch = lv.collate([a, b])
    assert batch["globals"].shape == (2, 2, 3, 64, 64) and batch["gc"].shape == (2, 2, 6, 4)


# ----------------------------------------------------------------------------- Sinkhorn, alignment, loss


def test_sinkhorn_marginals():
    gen = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(600, 8, generator=gen), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1).T
    q = lf.sinkhorn(scores, epsilon=0.05, iterations=3)
    assert q.shape == (600, 30) and q.min() >= 0
    torch.testing.assert_close(q.sum(1), torch.ones(600), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((30,), 600 / 30), atol=0, rtol=0.5)
    # more iterations converge to the exact equipartition
    q = lf.sinkhorn(scores, epsilon=0.05, iterations=100)
    torch.testing.assert_close(q.sum(0), torch.full((30,), 600 / 30), atol=0, rtol=0.01)


def test_roi_align_of_constant_maps():
    maps = torch.full((2, 3, 6, 6), 0.7)
    boxes = torch.tensor([[[0.0, 0, 6, 6], [1.5, 0.5, 4.2, 5.9]], [[2.0, 2, 3, 3], [0.3, 0.0, 6.0, 2.0]]])
    out = lf.align(maps, boxes, 7)
    assert out.shape == (2, 2, 3, 7, 7)
    torch.testing.assert_close(out, torch.full_like(out, 0.7))
    ones = lf.align(torch.ones(2, 1, 6, 6), boxes, 7)
    assert torch.all(ones[:, :, 0] >= 1 - 1e-6)
    # aligned=True: token i covers [i, i + 1), so a ramp equal to i at token i reads x - 0.5 at x
    ramp = torch.arange(6.0).expand(1, 1, 6, 6)
    out = lf.align(ramp, torch.tensor([[[1.0, 1.0, 5.0, 5.0]]]), 7)[0, 0, 0, 0]
    torch.testing.assert_close(out, 1 + (torch.arange(7) + 0.5) * 4 / 7 - 0.5)


def _loss_inputs(views=3, bs=2, k=5, h=4):
    gen = torch.Generator().manual_seed(1)
    student = [torch.randn(bs, k, h, h, generator=gen) for _ in range(views)]
    targets = [torch.softmax(torch.randn(bs, k, h, h, generator=gen), 1) for _ in range(2)]
    size = h * 16
    gc = torch.tensor([0.0, 0, size, size]).expand(bs, 2, views, 4).clone()
    al = torch.tensor([0.0, 0, size, size]).expand(bs, views, 2, 4).clone()
    return student, targets, gc, al


def test_loss_is_non_negative_and_all_equals_fg_with_full_mask():
    student, targets, gc, al = _loss_inputs()
    full = [torch.ones(2, 4, 4, dtype=torch.bool)] * 2
    loss_all = lf.leopart_loss(student, targets, [None, None], gc, al, 16, 0.1)
    loss_fg = lf.leopart_loss(student, targets, full, gc, al, 16, 0.1)
    assert loss_all >= 0
    torch.testing.assert_close(loss_all, loss_fg)
    empty = [torch.zeros(2, 4, 4, dtype=torch.bool)] * 2
    assert lf.leopart_loss(student, targets, empty, gc, al, 16, 0.1) == 0


def test_loss_equals_entropy_when_prediction_equals_target():
    bs, k = 3, 6
    q = torch.softmax(torch.randn(bs, k, 7, 7, generator=torch.Generator().manual_seed(2)), 1)
    entropy = -(q * q.log()).sum(1).mean()
    torch.testing.assert_close(lf.masked_cross_entropy(q, q.log(), None), entropy)
    torch.testing.assert_close(lf.masked_cross_entropy(q, q.log(), torch.ones(bs, 7, 7, dtype=torch.bool)), entropy)


def test_foreground_mask_modes():
    attn = torch.zeros(1, 6, 6)
    attn[0, 1:4, 1:4] = 1.0
    fg = lf.foreground_masks(attn, "fg", 0.6)
    assert fg[0, 2, 2] and not fg[0, 5, 5]
    assert torch.equal(lf.foreground_masks(attn, "bg", 0.6), ~fg)
    assert lf.foreground_masks(attn, "all", 0.6) is None


def test_schedules():
    total = 100
    momentum = [lf.cosine_schedule(0.9995, 1.0, t, total) for t in range(total + 1)]
    assert momentum[0] == pytest.approx(0.9995) and momentum[-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-15 for a, b in zip(momentum, momentum[1:]))
    assert lf.cosine_schedule(0.04, 0.5, 0, total) == pytest.approx(0.04)
    assert lf.cosine_schedule(0.04, 0.5, total, total) == pytest.approx(0.5)
    assert lf.cosine_schedule(1e-5, 0.0, total // 2, total) == pytest.approx(0.5e-5)
    assert lf.cosine_schedule(1e-5, 0.0, total, total) == pytest.approx(0.0, abs=1e-20)


def test_queue_is_a_fifo():
    queue = lf.Queue(1, 5, 2)
    assert not queue.full(0)
    gen = torch.Generator().manual_seed(0)
    queue.push(0, torch.ones(3, 2), 3, gen)
    assert not queue.full(0) and torch.all(queue.items[0, :3] == 1)
    queue.push(0, torch.full((4, 2), 2.0), 2, gen)
    assert queue.full(0)
    assert torch.all(queue.items[0, :2] == 2) and torch.all(queue.items[0, 2:] == 1)


def test_sinkhorn_prefers_distinct_prototypes_under_the_queue():
    # the queue rows join the Sinkhorn problem: with queue rows all on prototype 0, the current tokens
    # are pushed towards the other prototypes (equipartition over the whole set)
    k = 4
    current = torch.zeros(8, k)
    queue_scores = torch.zeros(24, k)
    queue_scores[:, 0] = 1.0
    q = lf.sinkhorn(torch.cat([queue_scores, current]), 0.05, 3)[-8:]
    assert q[:, 0].mean() < 0.25 / 2


# ----------------------------------------------------------------------------- training


def _tiny_params(**changes):
    base = dict(global_size=64, local_size=32, num_prototypes=16, hidden_dim=32, projection_dim=16,
                queue_length=0, workers=1, checkpoint_every=1)
    return lf.FinetuneParams(**{**base, **changes})


def _images(folder, count=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        img = np.full((72, 90, 3), rng.integers(0, 255, 3), np.uint8)
        img[20:50, 30:70] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def test_a_few_steps_lower_the_loss(tmp_path):
    # a frozen teacher (momentum 1) and no queue: the targets stay fixed, only training moves the loss
    p = _tiny_params(lr_backbone=1e-4, lr_head=3e-3, drop_path=0.0, momentum_start=1.0)
    trainer = lf.Trainer("dino_vits16", "random", p, total_steps=1000, dist=Dist())
    _images(tmp_path / "img", 2)
    views = [
        lv.make_views(Image.open(tmp_path / "img" / f"{i}.png").convert("RGB"), p, np.random.default_rng(i))
        for i in range(2)
    ]
    batch = lv.collate(views)
    losses = [trainer.step(step, batch)["loss"] for step in range(6)]
    assert all(math.isfinite(x) and x >= 0 for x in losses)
    assert losses[-1] < losses[0]
    groups = {(g["base_lr"], g["decay"]) for g in trainer.optimizer.param_groups}
    assert groups == {(1e-4, True), (1e-4, False), (3e-3, True), (3e-3, False)}
    decayed = [g for g in trainer.optimizer.param_groups if g["decay"]][0]
    assert decayed["weight_decay"] == pytest.approx(lf.cosine_schedule(0.04, 0.5, 5, 1000))
    assert decayed["lr"] == pytest.approx(lf.cosine_schedule(1e-4, 0.0, 5, 1000))
    torch.testing.assert_close(trainer.student.prototypes.weight.norm(dim=1), torch.ones(16), atol=1e-2, rtol=0)
    trainer.student.normalize_prototypes()
    with torch.no_grad():
        z = trainer.student.embed(trainer.student.encoder(batch["globals"][0]))
        scores = trainer.student.score(z)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 4, 4))
    assert scores.shape == (2, 16, 4, 4) and scores.abs().max() <= 1 + 1e-5
    # EMA: teacher <- m teacher + (1 - m) student, over every parameter (heads included)
    trainer.p.momentum_start = 0.5
    before = [t.clone() for t in trainer.teacher.parameters()]
    trainer.step(6, batch)
    m = lf.cosine_schedule(0.5, 1.0, 6, 1000)
    for old, teacher, student in zip(before, trainer.teacher.parameters(), trainer.student.parameters()):
        torch.testing.assert_close(teacher, m * old + (1 - m) * student, atol=1e-6, rtol=1e-5)


def test_student_as_its_own_teacher_without_mask_or_local_crops(tmp_path):
    p = _tiny_params(use_teacher=False, loss_mask="all", num_local=0, queue_length=16)
    trainer = lf.Trainer("dino_vits16", "random", p, total_steps=10, dist=Dist())
    assert trainer.teacher is None and "teacher" not in trainer.state()
    _images(tmp_path / "img", 2)
    views = [
        lv.make_views(Image.open(tmp_path / "img" / f"{i}.png").convert("RGB"), p, np.random.default_rng(i))
        for i in range(2)
    ]
    logs = trainer.step(0, lv.collate(views))
    assert math.isfinite(logs["loss"]) and logs["images"] == 2
    assert trainer.queue.items.abs().sum() > 0           # every token enters the queue without a mask


def test_finetune_writes_a_loadable_backbone_and_resumes_exactly(tmp_path, monkeypatch):
    images = _images(tmp_path / "img")
    kwargs = dict(weights="random", epochs=1, batch_size=2, steps=4, device="cpu", log=lambda msg: None,
                  **{k: v for k, v in vars(_tiny_params(queue_length=8)).items()})
    straight = lf.finetune("dino_vits16", images, tmp_path / "a", **kwargs)
    assert straight.name == "dino_vits16-leopart.safetensors"
    state = load_file(str(straight))
    assert "blocks.0.attn.qkv.weight" in state and not any(k.startswith(("model.", "head")) for k in state)

    backbone = build_backbone("dino_vits16", weights=str(straight))
    random = build_backbone("dino_vits16", weights="random")
    x = torch.rand(1, 3, 48, 64)
    assert backbone(x).shape == (1, 384, 3, 4) and not torch.allclose(backbone(x), random(x))

    # the published Leopart layout (student under "model.", teacher and heads beside) loads the student
    leopart = {f"model.{k}": v for k, v in state.items()}
    leopart.update({f"teacher.{k}": v + 1 for k, v in state.items()})
    leopart.update({"projection_head.0.weight": torch.zeros(2048, 384), "prototypes.weight": torch.zeros(300, 256)})
    torch.save({"state_dict": leopart, "epoch": 50}, tmp_path / "leopart.ckpt")
    from_ckpt = build_backbone("dino_vits16", weights=str(tmp_path / "leopart.ckpt"))
    torch.testing.assert_close(from_ckpt(x), backbone(x))

    with pytest.raises(RunDirError, match="finished"):
        lf.finetune("dino_vits16", images, tmp_path / "a", **kwargs)

    real_step = lf.Trainer.step

    def interrupted(self, step, batch):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step, batch)

    monkeypatch.setattr(lf.Trainer, "step", interrupted)
    with pytest.raises(Interrupted, match="resume from step 2/"):
        lf.finetune("dino_vits16", images, tmp_path / "b", **kwargs)
    monkeypatch.setattr(lf.Trainer, "step", real_step)
    resumed = lf.finetune("dino_vits16", images, tmp_path / "b", **kwargs)
    for key, value in load_file(str(resumed)).items():
        assert torch.equal(value, state[key]), key


def test_finetune_rejects_bad_settings(tmp_path):
    images = _images(tmp_path / "img", 2)
    with pytest.raises(ConfigError, match="CNN"):
        lf.finetune("efficientnet_lite0", images, tmp_path / "o")
    with pytest.raises(ConfigError, match="local_size"):
        lf.finetune("dino_vits16", images, tmp_path / "o", weights="random", batch_size=2, local_size=40, device="cpu")
    with pytest.raises(ConfigError, match="larger than"):
        lf.finetune("dino_vits16", images, tmp_path / "o", weights="random", batch_size=4, device="cpu")
    with pytest.raises(ConfigError, match="unknown config key"):
        lf.finetune("dino_vits16", images, tmp_path / "o", weights="random", batch_size=2, prototypes=3)


def test_default_batch_is_the_reference_effective_batch(tmp_path):
    # the reference trains on 2 GPUs: 32 images each for ViT-S/16 (train_coco_config), 16 for ViT-B/8
    assert lf.reference_batch_size("dino_vits16") == 64
    assert lf.reference_batch_size("dino_vitb8") == 32
    images = _images(tmp_path / "img", 2)
    with pytest.raises(ConfigError, match="batch_size 64 is larger"):
        lf.finetune("dino_vits16", images, tmp_path / "o", weights="random", device="cpu")
