"""CAUSE training: bank, EMA, Step 3 freezing, probe isolation, determinism, resume, end to end
(docs/methods/cause.md §8.6-8.8, §8.11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import unsupseg.methods.cause.trainer as trainer
from unsupseg import api
from unsupseg.config import load_preset
from unsupseg.engine import Dist, run_stage
from unsupseg.features.cache import open_or_build
from unsupseg.methods.cause.bank import ConceptBank
from unsupseg.methods.cause.heads import MLPHead, ema_update, make_teacher
from unsupseg.methods.cause.params import Params
from unsupseg.methods.cause.trainer import (
    StoreSource,
    WindowSource,
    cluster_stage,
    front_door_stage,
    mediator_stage,
    run_cause,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_store(path, n=8, dim=16, grid=(8, 8), labelled=True, classes=3, seed=0, scale=2):
    """A feature cache of random maps (and random labels at ``scale`` x the grid)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, *grid, generator=g)
    labels = torch.randint(-1, classes, (n, grid[0] * scale, grid[1] * scale), generator=g)

    def items():
        for i in range(n):
            yield str(i), feats[i], labels[i] if labelled else None

    return open_or_build(path / "cache", {"seed": seed, "n": n, "grid": grid, "labelled": labelled}, items)


def tiny(**kw) -> Params:
    base = dict(concepts=8, reduced_dim=6, projection_dim=8, bank_size=4, batch_size=4, ref_world_size=1,
                tr_ffn_dim=16, mediator_epochs=1, head_epochs=2, cluster_epochs=2, cluster_lr_step_epochs=1,
                checkpoint_every=1, pos_threshold=0.0, neg_threshold=-0.2)
    return Params(**{**base, **kw})


def run(variant, store, params, checkpoint_dir=None, num_classes=3, seed=0):
    torch.manual_seed(seed)
    return run_cause(variant, StoreSource(store, False), StoreSource(store, params.linear_probe), 3, num_classes,
                     params, Dist(), seed, "cpu", checkpoint_dir, lambda msg: None)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- sources


def test_window_source_crops_features_and_labels_alike(tmp_path):
    grid, scale = (6, 9), 2
    rows = torch.arange(grid[0]).view(1, -1, 1).expand(1, *grid)
    cols = torch.arange(grid[1]).view(1, 1, -1).expand(1, *grid)
    coords = torch.cat([rows, cols]).float()  # a 2 x h x w map holding its own coordinates
    label = (rows[0] * 100 + cols[0]).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    store = open_or_build(tmp_path / "cache", {"coords": 1}, lambda: ((str(i), coords, label) for i in range(4)))
    source = WindowSource(StoreSource(store, True), 4, torch.Generator().manual_seed(0))
    assert source.grid == (4, 4)
    feats, labels = source.load(torch.arange(4), slice(None))
    assert feats.shape == (4, 2, 4, 4) and labels.shape == (4, 8, 8)
    for f, lab in zip(feats, labels):
        top, left = int(f[0, 0, 0]), int(f[1, 0, 0])
        assert torch.equal(f[0], torch.arange(top, top + 4).view(-1, 1).expand(4, 4).float())
        assert torch.equal(f[1], torch.arange(left, left + 4).view(1, -1).expand(4, 4).float())
        token_of_pixel = (f[0] * 100 + f[1]).long().repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        assert torch.equal(lab, token_of_pixel)
    # offsets drawn for the whole global batch: a shard sees the same windows as the full batch
    again = WindowSource(StoreSource(store, True), 4, torch.Generator().manual_seed(0))
    half, _ = again.load(torch.arange(4), slice(2, 4))
    assert torch.equal(half, feats[2:])


# ----------------------------------------------------------------------------- 6. bank


def test_bank_adds_half_of_each_concept_keeps_capacity_and_newest():
    g = torch.Generator().manual_seed(0)
    bank = ConceptBank(3, 5, 4)
    z = torch.randn(7, 4, requires_grad=True)
    concepts = torch.tensor([0, 0, 0, 1, 1, 1, 1])  # 3 of concept 0 -> 1 entry, 4 of concept 1 -> 2
    bank.update(concepts, z, g)
    assert bank.length.tolist() == [1, 2, 0]
    assert not bank.values.requires_grad
    unit = torch.nn.functional.normalize(z.detach(), dim=1)
    stored = bank.values[0, :1]
    assert any(torch.allclose(stored[0], unit[i]) for i in range(3))
    for _ in range(20):
        bank.update(torch.randint(3, (30,), generator=g), torch.randn(30, 4, generator=g), g)
        assert int(bank.length.max()) <= 5
    # FIFO: 12 tokens of concept 2 with distinguishable values -> the 6 appended, only the newest 5 kept
    bank = ConceptBank(3, 5, 2)
    values = torch.stack([torch.tensor([1.0, float(i)]) for i in range(12)])
    bank.update(torch.full((12,), 2), values, g)
    first = {round(float(v[1] / v[0]), 3) for v in bank.values[2]}
    assert bank.length[2] == 5 and len(first) == 5
    newer = torch.stack([torch.tensor([1.0, 100.0 + i]) for i in range(4)])
    bank.update(torch.full((4,), 2), newer, g)  # appends 2: the two oldest go
    kept = {round(float(v[1] / v[0]), 3) for v in bank.values[2]}
    assert len(kept & {100.0, 101.0, 102.0, 103.0}) == 2
    assert len(kept & first) == 3
    entries, owners = bank.entries()
    assert entries.shape == (5, 2) and owners.tolist() == [2] * 5


def test_bank_state_round_trip():
    g = torch.Generator().manual_seed(1)
    bank = ConceptBank(4, 3, 2)
    bank.update(torch.randint(4, (20,), generator=g), torch.randn(20, 2, generator=g), g)
    other = ConceptBank(4, 3, 2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.values, bank.values) and torch.equal(other.length, bank.length)
    assert torch.equal(other.pointer, bank.pointer)


# ----------------------------------------------------------------------------- 7. EMA


def test_ema_formula():
    torch.manual_seed(0)
    student = MLPHead(5, 3)
    teacher = make_teacher(student)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    assert not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema_update(teacher, student, 0.99)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.99 * t0 + 0.01 * s, atol=1e-7)


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_teacher_never_gets_gradients_nor_optimizer_steps(tmp_path, variant):
    store = make_store(tmp_path)
    params = tiny()
    source = StoreSource(store, True)
    torch.manual_seed(0)
    codebook = torch.randn(params.concepts, 16)
    stage, front = front_door_stage(source, codebook, variant, 3, params, Dist(), 0, "cpu")
    optimizer = stage.state["optimizer"]
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    teacher = list(front.head_teacher.parameters()) + list(front.projection_teacher.parameters())
    assert not stepped & {id(p) for p in teacher}
    student = [p.clone() for p in front.student.head.parameters()]
    teacher0 = [p.clone() for p in front.head_teacher.parameters()]
    run_stage(stage, None, Dist())
    assert all(p.grad is None for p in teacher)
    # the student moved, and the teacher followed by EMA only
    assert any(not torch.equal(a, b) for a, b in zip(student, front.student.head.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(teacher0, front.head_teacher.parameters()))
    assert int(front.bank.length.sum()) > 0


def clipped_head_gradients(tmp_path, reference_clip, probe_factor, monkeypatch):
    """Gradients of the student head as the optimizer's first step receives them, with the probe's
    loss (hence its gradient, which only the probe receives) multiplied by ``probe_factor``."""
    real_probe_loss = trainer.probe_loss
    monkeypatch.setattr(trainer, "probe_loss", lambda *a: probe_factor * real_probe_loss(*a))
    params = tiny(grad_clip=0.01, reference_clip=reference_clip, head_epochs=1)
    torch.manual_seed(0)
    codebook = torch.randn(params.concepts, 16)
    stage, front = front_door_stage(
        StoreSource(make_store(tmp_path), True), codebook, "mlp", 3, params, Dist(), 0, "cpu"
    )
    seen = []

    def record(optimizer, args, kwargs):
        if not seen:
            unsupervised = list(front.student.head.parameters()) + list(front.student.projection.parameters())
            seen.append(([p.grad.clone() for p in front.student.head.parameters()],
                         torch.cat([p.grad.flatten() for p in unsupervised]).norm(),
                         torch.cat([p.grad.flatten() for p in front.student.parameters()]).norm()))

    stage.state["optimizer"].register_step_pre_hook(record)
    run_stage(stage, None, Dist())
    return seen[0]


def test_joint_clip_lets_the_probe_shrink_the_head_update_and_apart_does_not(tmp_path, monkeypatch):
    def norm(grads):
        return torch.cat([g.flatten() for g in grads]).norm()

    # default (apart): the head's clipped gradient does not depend on the probe's at all
    (apart1, head_proj, _), (apart100, *_) = (clipped_head_gradients(tmp_path / str(f), False, f, monkeypatch)
                                              for f in (1, 100))
    assert all(torch.equal(a, b) for a, b in zip(apart1, apart100))
    assert float(head_proj) == pytest.approx(0.01, rel=1e-4)  # head + projection clipped to the limit on their own
    # reference (joint): one norm over head, projection and probe equals the limit, so a 100x
    # larger probe gradient leaves the head a much smaller share
    (joint1, _, total1), (joint100, _, total100) = (clipped_head_gradients(tmp_path / f"j{f}", True, f, monkeypatch)
                                                   for f in (1, 100))
    assert float(total1) == pytest.approx(0.01, rel=1e-4) and float(total100) == pytest.approx(0.01, rel=1e-4)
    assert norm(joint100) < norm(joint1) / 10


def attention_rms_after_step2(tmp_path, **optimizer) -> tuple[float, float]:
    """RMS of the TR decoder's attention projections (self and cross) at init and after 120 Step 2
    steps on 16 maps of four patterned 32-d directions, scaled as efficientnet_lite0's features are."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 32, generator=g)
    pattern = torch.randint(4, (16, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    feats = 0.08 * (directions[pattern].permute(0, 3, 1, 2) + 0.5 * torch.randn(16, 32, 16, 16, generator=g))
    store = open_or_build(tmp_path / "cache", {"k": "patterns"}, lambda: ((str(i), feats[i], None) for i in range(16)))
    params = tiny(concepts=32, reduced_dim=16, projection_dim=32, bank_size=8, tr_ffn_dim=64, mediator_epochs=10,
                  head_epochs=30, checkpoint_every=1000, tr_grid_window=2, feature_scale=math.sqrt(32 / 3), **optimizer)
    source = StoreSource(store, False, scale=params.feature_scale)
    torch.manual_seed(0)
    stage, mediator = mediator_stage(source, params, Dist(), 0, "cpu")
    run_stage(stage, None, Dist())
    stage, front = front_door_stage(source, mediator.codebook.detach(), "tr", None, params, Dist(), 0, "cpu")
    decoder = front.student.head.tr
    def rms():
        return torch.cat([decoder.self_attn.in_proj_weight.flatten(),
                          decoder.multihead_attn.in_proj_weight.flatten()]).pow(2).mean().sqrt().item()

    before = rms()
    run_stage(stage, None, Dist())
    return before, rms()


def test_camvid_tr_preset_optimizer_keeps_the_decoder_attention(tmp_path):
    """Adam's coupled L2 (weight_decay 1e-4, the reference's) walks every weight whose loss gradient is
    below weight_decay x weight towards zero by about lr per step. At the camvid lr of 4e-3 that put
    the CamVid TR decoder's attention projections at the noise floor (RMS 0.001-0.002 from 0.033) and
    made both attentions uniform (docs/cause-tr-camvid.md). The camvid TR preset's optimizer settings
    keep them at their scale; the reference's weight decay, in the same run, loses over half of it."""
    preset = load_preset("cause-tr", "camvid")["params"]
    optimizer = {k: preset[k] for k in ("lr", "weight_decay", "grad_clip")}
    before, after = attention_rms_after_step2(tmp_path / "preset", **optimizer)
    assert after > 0.9 * before
    before, decayed = attention_rms_after_step2(tmp_path / "coupled", **{**optimizer, "weight_decay": 1e-4})
    assert decayed < 0.6 * before


@pytest.mark.parametrize("variant, anchors", [("tr", 9), ("mlp", 4)])
def test_tr_grid_window_samples_more_tokens_of_each_tr_window_only(tmp_path, monkeypatch, variant, anchors):
    """tr_grid_window 2 on 6 x 6 TR windows: (6 // 2)^2 = 9 anchors per image in Steps 2 and 3;
    the MLP keeps grid_window 4 on its 8 x 8 grid: 2 x 2 = 4."""
    seen = {"front": set(), "cluster": set()}
    front, cluster = trainer.front_door_terms, trainer.cosine_cluster_loss
    monkeypatch.setattr(trainer, "front_door_terms", lambda z, *a: seen["front"].add(z.shape[1]) or front(z, *a))
    monkeypatch.setattr(trainer, "cosine_cluster_loss", lambda x, c: seen["cluster"].add(x.shape[1]) or cluster(x, c))
    run(variant, make_store(tmp_path), tiny(tr_window=6, tr_grid_window=2, cluster_loss="cosine", linear_probe=False))
    assert seen == {"front": {anchors}, "cluster": {anchors}}


# ----------------------------------------------------------------------------- 8. Step 3


@pytest.mark.parametrize("reference", [False, True])
def test_step3_teacher_frozen_unless_reference_mode(tmp_path, reference):
    store = make_store(tmp_path)
    params = tiny(reference_step3=reference)
    source = StoreSource(store, True)
    torch.manual_seed(0)
    head = make_teacher(MLPHead(16, params.reduced_dim))
    probe = trainer.make_probe(params.reduced_dim, 3, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    stage, cluster = cluster_stage(source, head, probe, 3, params, Dist(), 0, "cpu")
    centroids = cluster.centroids.detach().clone()
    run_stage(stage, None, Dist())
    same = all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert same is (not reference)
    assert not torch.equal(centroids, cluster.centroids)


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_step3_kmeanspp_seeds_and_cosine_loss(tmp_path, variant):
    store = make_store(tmp_path)
    params = tiny(cluster_init="kmeans++", cluster_loss="cosine", tr_window=6)
    source = StoreSource(store, False)
    torch.manual_seed(0)
    codebook = torch.randn(params.concepts, 16)
    head = trainer.build_head(variant, 16, params, codebook, (6, 6) if variant == "tr" else (8, 8))
    stage, cluster = cluster_stage(source, make_teacher(head), None, 3, params, Dist(), 0, "cpu")
    seeds = cluster.centroids.detach().clone()
    assert torch.allclose(seeds.norm(dim=1), torch.ones(3))
    again = cluster_stage(source, make_teacher(head), None, 3, params, Dist(), 0, "cpu")[1]
    assert torch.equal(again.centroids, seeds)
    history = run_stage(stage, None, Dist())
    assert all(-1 <= h["cluster"] <= 1 for h in history)  # the logged cluster loss: -mean max cos
    assert not torch.equal(cluster.centroids, seeds)


def test_step3_kmeans_init_is_a_converged_partition_that_does_not_depend_on_the_seeds(tmp_path):
    # three directions of unequal extent (top half, bottom left, bottom right of every map) plus noise
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(16, 8, 8)
    base[0, :4], base[1, 4:, :4], base[2, 4:, 4:] = 1.0, 1.0, 1.0
    feats = base + 0.05 * torch.randn(8, 16, 8, 8, generator=g)

    def items():
        for i in range(8):
            yield str(i), feats[i], None

    source = StoreSource(open_or_build(tmp_path / "cache", {"k": "groups"}, items), False)
    params = tiny(cluster_init="kmeans", cluster_init_restarts=3, grid_window=1)  # every token is sampled
    partitions = []
    for seed in range(4):
        centroids = trainer.seed_centroids(
            source, torch.nn.Identity(), 3, params, torch.Generator().manual_seed(seed), "cpu"
        )
        x = torch.nn.functional.normalize(feats.flatten(2).transpose(1, 2).reshape(-1, 16), dim=1)
        members = (x @ centroids.T).argmax(1)
        # a Lloyd fixed point: each centroid is the normalised mean of the tokens nearest to it
        for c in range(3):
            assert torch.allclose(
                centroids[c], torch.nn.functional.normalize(x[members == c].mean(0), dim=0), atol=1e-4
            )
        # the partition is the three groups, whatever the seeds drew
        groups = base[:3].flatten(1).argmax(0).repeat(8)
        assert torch.equal(
            torch.bincount(groups * 3 + members, minlength=9).reshape(3, 3).count_nonzero(1),
            torch.ones(3, dtype=torch.long),
        )
        partitions.append(members)
    assert all(
        torch.equal(
            p.unique(return_counts=True)[1].sort().values, partitions[0].unique(return_counts=True)[1].sort().values
        )
        for p in partitions
    )


def test_feature_scale_scales_the_training_batches_and_keeps_the_clusterbook(tmp_path):
    store = make_store(tmp_path)
    plain, scaled = StoreSource(store, True), StoreSource(store, True, scale=10.0)
    batch = torch.tensor([3, 1, 4])
    (f, labels), (g, scaled_labels) = plain.load(batch, slice(None)), scaled.load(batch, slice(None))
    assert torch.allclose(g, 10 * f) and torch.equal(labels, scaled_labels)
    # Step 1 sees only cosines: the same clusterbook from scaled tokens
    codebooks = []
    for source in (plain, scaled):
        stage, mediator = mediator_stage(source, tiny(), Dist(), 0, "cpu")
        run_stage(stage, None, Dist())
        codebooks.append(mediator.codebook.detach())
    assert torch.allclose(codebooks[0], codebooks[1], atol=1e-5)


def test_invalid_params_are_config_errors():
    from unsupseg.errors import ConfigError

    for bad in (
        {"cluster_loss": "kmeans"},
        {"cluster_init": "zeros"},
        {"cluster_init_restarts": 0},
        {"concepts": 0},
        {"bank_keep": 0.0},
        {"pos_threshold": 0.1, "neg_threshold": 0.3},
        {"tr_window": 2},
        {"feature_scale": 0.0},
        {"tr_grid_window": 0},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            tiny(**bad)


# ----------------------------------------------------------------------------- §7.2: the probe is monitoring only


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_linear_probe_never_changes_the_unsupervised_state(tmp_path, variant):
    store = make_store(tmp_path)
    with_probe = run(variant, store, tiny(linear_probe=True))
    without = run(variant, store, tiny(linear_probe=False))
    assert "linear.weight" in with_probe and "linear.weight" not in without
    assert_same_state({k: v for k, v in with_probe.items() if not k.startswith("linear.")}, without)


def test_unlabelled_data_trains_without_probe(tmp_path):
    store = make_store(tmp_path, labelled=False)
    state = run("mlp", store, tiny(), num_classes=None)
    assert "linear.weight" not in state
    assert state["cluster_probe"].shape == (3, 6) and state["codebook"].shape == (8, 16)


# ----------------------------------------------------------------------------- 11. determinism


def test_two_runs_give_identical_losses_and_state(tmp_path):
    store = make_store(tmp_path)
    params = tiny()
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        source = StoreSource(store, True)
        stage, mediator = mediator_stage(source, params, Dist(), 0, "cpu")
        h1 = run_stage(stage, None, Dist())
        stage, front = front_door_stage(source, mediator.codebook.detach(), "mlp", 3, params, Dist(), 0, "cpu")
        h2 = run_stage(stage, None, Dist())
        histories.append([h["loss"] for h in h1 + h2])
    assert histories[0] == histories[1]
    assert_same_state(run("tr", store, params), run("tr", store, params))


# ----------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("variant,stage_name,after", [
    ("mlp", "cause-step2-front-door", 3), ("tr", "cause-step2-front-door", 3), ("tr", "cause-step3-cluster", 3)])
def test_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, variant, stage_name, after):
    store = make_store(tmp_path)
    params = tiny(checkpoint_every=2, tr_window=6)
    straight = run(variant, store, params, tmp_path / "straight")

    real_run_stage = trainer.run_stage

    def interrupting(stage, *args, **kwargs):
        if stage.name == stage_name:
            step, calls = stage.step, []

            def failing(i, batch):
                if len(calls) == after:
                    raise Interrupted
                calls.append(i)
                return step(i, batch)

            stage.step = failing
        return real_run_stage(stage, *args, **kwargs)

    ckpt = tmp_path / "resumed"
    monkeypatch.setattr(trainer, "run_stage", interrupting)
    with pytest.raises(Interrupted):
        run(variant, store, params, ckpt)
    monkeypatch.setattr(trainer, "run_stage", real_run_stage)
    assert (ckpt / f"{stage_name}.pt").exists()
    assert_same_state(run(variant, store, params, ckpt), straight)


# ----------------------------------------------------------------------------- end to end through the public API


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("method", ["cause-mlp", "cause-tr"])
def test_fit_end_to_end_with_random_backbone(tmp_path, photos, method):
    overrides = [
        "params.concepts=8", "params.reduced_dim=6", "params.projection_dim=8", "params.bank_size=4",
        "params.batch_size=3", "params.ref_world_size=1", "params.tr_ffn_dim=16", "params.cluster_epochs=1",
        "params.train_resolution=null", "params.mediator_resolution=null",
        "data.resolution=64", "data.mode=short_crop", "test.crf=false", f"cache_dir={tmp_path / 'cache'}",
    ]
    seg = api.fit(method, out=tmp_path / "run", images=photos, backbone="dino_vits16", backbone_weights="random",
                  clusters=3, overrides=overrides, log=lambda msg: None)
    state = seg.predictor.state_dict()
    assert state["centroids"].shape == (3, 6)
    assert seg.predictor.fixed_grid == ((4, 4) if method == "cause-tr" else None)
    assert not (tmp_path / "run" / "checkpoints").exists()
    loaded = api.load(tmp_path / "run")
    labels = loaded.predict(photos / "0.png")  # 64 x 80: a 4 x 5 grid, tiled for TR
    assert labels.shape == (64, 80) and labels.max() < 3
    written = api.segment(loaded, [photos / "1.png"], tmp_path / "masks")
    assert written and written[0].exists()
