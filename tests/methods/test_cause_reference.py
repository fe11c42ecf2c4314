"""CAUSE against numbers the reference code computed (../shared/reference/cause_*.npz, README there):
the modularity loss of Steps 1 and 3 with its gradient, W, e and Γ, the grid sampling, the Step 3
prediction, the front-door loss and its terms with a filled and an empty bank, and the bank's kept
entries, FIFO and capacity limit. Computed in float64; tolerances are the README's float32 ones
(discrete outputs: exact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unsupseg.methods.cause.bank import ConceptBank
from unsupseg.methods.cause.losses import (
    affinity,
    concept_index,
    concept_similarity,
    draw_grid_order,
    front_door_loss,
    front_door_terms,
    modularity_loss,
    modularity_matrix,
    sample_grid,
)
from unsupseg.methods.cause.predictor import CausePredictor
from unsupseg.methods.cause.trainer import to_map

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"  # ../shared beside the repository


def load(name):
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    data = np.load(path)
    return {k: torch.from_numpy(data[k]) if data[k].dtype != np.dtype("<U40") else str(data[k]) for k in data.files}


@pytest.fixture(scope="module")
def mod():
    return load("cause_modularity.npz")


@pytest.fixture(scope="module")
def fd():
    return load("cause_front_door.npz")


def close(ours, ref, rel):
    """|ours - ref| <= rel * max|ref| (the README's "relative to the largest entry")."""
    ours = ours.detach().double()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= rel * ref.abs().max(), float((ours - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------- modularity


def loss_and_grad(x, centroids, temperature):
    c = centroids.clone().requires_grad_(True)
    loss = modularity_loss(x, c, float(temperature))
    loss.backward()
    return loss, c.grad


def test_step1_modularity_matrices_loss_and_gradient(mod):
    x = mod["s1_x"]
    w, e = modularity_matrix(affinity(x))
    close(w, mod["s1_W"], 3e-7)
    close(e.flatten(), mod["s1_e"], 3e-7)
    close(concept_similarity(x, mod["s1_codebook"]).clamp_min(0), mod["s1_C"], 3e-7)
    loss, grad = loss_and_grad(x, mod["s1_codebook"], mod["temp"])
    close(loss, mod["s1_loss"], 3e-7)
    close(grad, mod["s1_grad_codebook"], 5e-7)


def test_grid_sampling_replays_the_reference_draw_and_picks_its_tokens(mod):
    k = int(mod["s1g_k"])
    # the reference draws torch.randint(16, (windows,)) right after torch.manual_seed(7)
    order = draw_grid_order(2, (16, 16), torch.Generator().manual_seed(int(mod["s1g_seed"])), k)
    assert torch.equal(order.flatten(), mod["s1g_order"])
    sampled = sample_grid(mod["s1g_x"], order, (16, 16), k)
    assert torch.equal(sampled, mod["s1g_x_sampled"])
    loss, grad = loss_and_grad(sampled, mod["s1_codebook"], mod["temp"])
    close(loss, mod["s1g_loss"], 3e-7)
    close(grad, mod["s1g_grad_codebook"], 5e-7)


def test_step3_modularity_and_prediction(mod):
    x, centroids = mod["s3_x"], mod["s3_centroids"]
    loss, grad = loss_and_grad(x, centroids, mod["temp"])
    close(loss, mod["s3_loss"], 3e-7)
    close(grad, mod["s3_grad_centroids"], 5e-7)
    predictor = CausePredictor(torch.nn.Identity(), centroids, None)  # float32, as at test time
    scores = predictor.classify(to_map(x.float(), (8, 8)))
    assert torch.equal(scores.argmax(1), mod["s3_pred"])
    close(torch.log_softmax(float(mod["s3_alpha"]) * scores, 1), mod["s3_crf_logp"], 3e-7)


# ----------------------------------------------------------------------------- front door


def front_door(fd, bank):
    codebook = fd["codebook"]
    unit = F.normalize(codebook, dim=1)
    concepts = concept_index(fd["feat"], codebook)
    z_s = fd["proj"].clone().requires_grad_(True)
    terms, valid = front_door_terms(
        z_s, fd["proj_ema"].flatten(0, 1), concepts, concepts.flatten(), unit @ unit.T,
        torch.arange(concepts.numel()).view_as(concepts), bank,
        float(fd["temp"]), float(fd["pos_thresh"]), float(fd["neg_thresh"]))
    loss = front_door_loss(terms, valid)
    loss.backward()
    return concepts, terms, valid, loss, z_s.grad


def test_front_door_loss_terms_and_gradient_with_a_filled_bank(fd):
    bank = (F.normalize(fd["bank"], dim=1), fd["bank_slot"])
    concepts, terms, valid, loss, grad = front_door(fd, bank)
    assert torch.equal(concepts, fd["concept"])
    assert valid.all()
    close(terms, fd["terms"], 1.2e-7)
    close(loss, fd["loss"], 1.6e-8)
    close(grad, fd["grad_proj"], 3.5e-7)


def test_front_door_loss_with_an_empty_bank(fd):
    _, terms, valid, loss, grad = front_door(fd, None)
    assert terms.shape == (2,) and valid.all()
    close(terms, fd["e_terms"], 1.2e-7)
    close(loss, fd["e_loss"], 1.6e-8)
    close(grad, fd["e_grad_proj"], 3.5e-7)


def queues(bank: ConceptBank) -> list[torch.Tensor]:
    """Each concept's entries, oldest first (the ring buffer read from its write pointer)."""
    out = []
    for k in range(len(bank.values)):
        n, start = int(bank.length[k]), int(bank.pointer[k]) - int(bank.length[k])
        out.append(bank.values[k, [(start + i) % bank.capacity for i in range(n)]])
    return out


class TaggedBank:
    """A ConceptBank of projections and a twin whose entries tag each token as (1, 100·t + i)
    (update t, flat index i), fed the same concepts and draws: the twin tells which tokens were kept."""

    def __init__(self, concepts, capacity, dim):
        self.bank, self.tags = ConceptBank(concepts, capacity, dim), ConceptBank(concepts, capacity, 2)
        self.t = 0

    def update(self, feat, codebook, proj, seed):
        """Returns, per concept, the flat token indices of this update still in the queue (oldest first)."""
        concepts = concept_index(feat, codebook).flatten()
        self.bank.update(concepts, proj.flatten(0, 1), torch.Generator().manual_seed(seed))
        tag = 100.0 * self.t + torch.arange(len(concepts), dtype=torch.float64)
        self.tags.update(concepts, torch.stack([torch.ones_like(tag), tag], 1), torch.Generator().manual_seed(seed))
        kept = {}
        for k, q in enumerate(queues(self.tags)):
            ids = (q[:, 1] / q[:, 0]).round().long()
            kept[k] = (ids[ids // 100 == self.t] % 100).tolist()
        self.t += 1
        return kept


def reference_kept(concepts, index, capacity):
    """The reference's appended (concept, index) list -> per concept, the entries that survive its
    FIFO cut right after the update (the newest ``capacity``)."""
    out = {}
    for k in concepts.unique().tolist():
        out[k] = index[concepts == k].tolist()[-capacity:]
    return out


def assert_kept(ours, concepts, index, capacity):
    expected = reference_kept(concepts, index, capacity)
    assert {k: v for k, v in ours.items() if v} == expected


def assert_bank(bank, ref_values, ref_slots, ref_len):
    assert bank.length.tolist() == ref_len.tolist()
    ours = torch.cat(queues(bank))
    assert torch.equal(torch.repeat_interleave(torch.arange(len(ref_len)), bank.length), ref_slots)
    close(ours, F.normalize(ref_values, dim=1), 1e-6)  # the bank stores float32 unit vectors


def test_bank_replays_the_reference_updates_then_updates_after_the_loss(fd):
    codebook = fd["codebook"]
    capacity = int(fd["max_num"])
    tagged = TaggedBank(len(codebook), capacity, fd["proj"].shape[-1])
    for t in range(3):  # the three batches that filled the reference's bank, seeds 1000 + t
        kept = tagged.update(fd[f"prev{t}_feat"], codebook, fd[f"prev{t}_proj_ema"], 1000 + t)
        assert_kept(kept, fd[f"prev{t}_kept_concept"], fd[f"prev{t}_kept_index"], capacity)
    assert_bank(tagged.bank, fd["bank"], fd["bank_slot"], fd["bank_len"])
    # the loss on our bank's entries is the reference's
    entries, owners = tagged.bank.entries()
    _, terms, _, loss, _ = front_door(fd, (entries.double(), owners))
    close(terms, fd["terms"], 1.2e-7)
    close(loss, fd["loss"], 1e-7)
    # the post-step update, seed 2024
    kept = tagged.update(fd["feat"], codebook, fd["proj_ema"], int(fd["upd_seed"]))
    assert_kept(kept, fd["upd_kept_concept"], fd["upd_kept_index"], capacity)
    assert_bank(tagged.bank, fd["bank_after"], fd["bank_after_slot"], fd["bank_after_len"])


def test_bank_capacity_limit_keeps_the_reference_newest_entries(fd):
    codebook, capacity = fd["codebook"], int(fd["cap_max_num"])
    tagged = TaggedBank(len(codebook), capacity, fd["proj"].shape[-1])
    for t in range(4):
        kept = tagged.update(fd[f"cap{t}_feat"], codebook, fd[f"cap{t}_proj_ema"], 3000 + t)
        assert_kept(kept, fd[f"cap{t}_kept_concept"], fd[f"cap{t}_kept_index"], capacity)
        assert_bank(tagged.bank, fd[f"cap{t}_bank"], fd[f"cap{t}_bank_slot"], fd[f"cap{t}_bank_len"])
    assert tagged.bank.length.max() == capacity
