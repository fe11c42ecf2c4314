"""The per-concept FIFO bank of teacher projections (docs/methods/cause.md §3.2), as one ring buffer.

The reference keeps a Python list per concept and concatenates them all every step (quadratic
copying). Here the bank is a preallocated K x capacity x P tensor with a write pointer and a length
per concept, updated with one scatter per step. Entries are stored L2-normalised: the loss only
ever reads normalised entries, so normalising once at insertion is the same computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ConceptBank:
    def __init__(self, concepts: int, capacity: int, dim: int, keep: float = 0.5, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.keep = keep
        self.values = torch.zeros(concepts, capacity, dim, device=device)
        self.pointer = torch.zeros(concepts, dtype=torch.long, device=device)
        self.length = torch.zeros(concepts, dtype=torch.long, device=device)

    @property
    def empty(self) -> bool:
        return not bool(self.length.any())

    def filled(self) -> Tensor:
        """K x capacity: which slots hold an entry (a queue fills from slot 0 before it wraps)."""
        return torch.arange(self.capacity, device=self.length.device) < self.length.unsqueeze(1)

    def entries(self) -> tuple[Tensor, Tensor] | None:
        """(stored entries E x P, the concept of each) for the loss, or None while the bank is empty.

        Only filled slots are gathered: early on, and whenever few concepts are in use, that is a
        small part of the K x capacity buffer.
        """
        if self.empty:
            return None
        filled = self.filled()
        concepts = torch.arange(len(self.values), device=filled.device).unsqueeze(1).expand_as(filled)
        return self.values[filled], concepts[filled]

    @torch.no_grad()
    def update(self, concepts: Tensor, projections: Tensor, generator: torch.Generator) -> None:
        """Append to queue k a uniformly random ⌊keep·c_k⌋ of the c_k projections assigned to k
        (in random order), keeping only the newest ``capacity`` entries of each queue.

        The draws are the reference's: for each present concept in ascending order, one
        randperm(c_k) over its tokens in flat order, the first ⌊keep·c_k⌋ appended in that order.
        """
        concepts = concepts.reshape(-1).to(self.values.device)
        values = F.normalize(projections.detach().reshape(len(concepts), -1).float(), dim=-1).to(self.values.device)
        k = len(self.values)
        counts = torch.bincount(concepts, minlength=k)
        keep = (counts.double() * self.keep).floor().long()
        # tokens grouped by concept (stable: flat order inside a group), each group then permuted
        grouped_tokens = torch.argsort(concepts, stable=True)
        sizes = counts[counts > 0].tolist()
        shuffle = torch.cat([torch.randperm(c, generator=generator) for c in sizes]).to(concepts.device)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        order = grouped_tokens[starts + shuffle]
        grouped = concepts[order]
        rank = torch.arange(len(order), device=order.device) - (torch.cumsum(counts, 0) - counts)[grouped]
        kept = keep[grouped]
        # of the ⌊keep·c⌋ appended, only the last `capacity` can survive the truncation
        write = (rank < kept) & (rank >= kept - self.capacity)
        slot = (self.pointer[grouped] + rank) % self.capacity
        self.values[grouped[write], slot[write]] = values[order[write]]
        self.pointer = (self.pointer + keep) % self.capacity
        self.length = (self.length + keep).clamp_max(self.capacity)

    def state_dict(self) -> dict:
        return {"values": self.values, "pointer": self.pointer, "length": self.length}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"].to(self.values.device)
        self.pointer = state["pointer"].to(self.pointer.device)
        self.length = state["length"].to(self.length.device)
