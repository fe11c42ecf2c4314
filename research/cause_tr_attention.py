"""Do a CAUSE-TR head's attentions depend on their input? Entropy of the decoder's self- and
cross-attention maps on training windows, and the RMS of its weights, for finished TR runs and for a
freshly initialised head of the same shape.

    python research/cause_tr_attention.py RUN [RUN ...] [--windows 32]

An entropy at log(N_q) (printed) is a uniform attention: every query then reads the mean of its
window, and the decoder adds one vector per window to every token. Runs are not modified.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from cause_runs import load_cause_run

from unsupseg.methods.cause.heads import TRHead
from unsupseg.methods.cause.predictor import head_from_state
from unsupseg.methods.cause.trainer import to_tokens, windowed

WEIGHTS = {
    "self-attn q/k/v": "tr.self_attn.in_proj_weight",
    "cross-attn q/k/v": "tr.multihead_attn.in_proj_weight",
    "feed-forward": "tr.linear1.weight",
    "norm3 gain": "tr.norm3.weight",
    "query_pos": "query_pos",
    "f1": "tr.f1.weight",
}


def attention_entropy(head: TRHead, tokens: torch.Tensor) -> dict[str, float]:
    """Mean entropy (nats) over the queries of each attention map, from the head's own forward pass:
    the hooks only ask nn.MultiheadAttention for the weights it otherwise skips."""
    found = {}
    hooks = []
    for name, module in (("self", head.tr.self_attn), ("cross", head.tr.multihead_attn)):
        hooks.append(
            module.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "need_weights": True}), with_kwargs=True)
        )
        hooks.append(module.register_forward_hook(lambda m, a, out, name=name: found.__setitem__(name, out[1])))
    with torch.no_grad():
        head(tokens)
    for hook in hooks:
        hook.remove()
    return {name: -(w * w.clamp_min(1e-12).log()).sum(-1).mean().item() for name, w in found.items()}


def windows(source, params, count: int) -> torch.Tensor:
    """``count`` training windows cut as Step 2 cuts them (random maps, random offsets), as tokens."""
    cut, _ = windowed(source, True, params, seed=0)
    index = torch.randint(len(source), (count,), generator=torch.Generator().manual_seed(0))
    return to_tokens(cut.load(index, slice(None))[0])


def report(label: str, head: TRHead, tokens: torch.Tensor) -> None:
    state = head.state_dict()
    rms = ", ".join(f"{k} {state[v].pow(2).mean().sqrt().item():.3f}" for k, v in WEIGHTS.items())
    entropy = attention_entropy(head, tokens)
    print(f"{label}: attention entropy self {entropy['self']:.3f}, cross {entropy['cross']:.3f}; weight RMS: {rms}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--windows", type=int, default=32, help="training windows to average over")
    args = parser.parse_args()
    if args.windows < 1:
        parser.error(f"--windows must be at least 1, got {args.windows}")
    for path in args.runs:
        try:
            run, params, source, _ = load_cause_run(path)
        except ValueError as err:
            parser.error(str(err))
        if "grid" not in run.state:
            parser.error(f"{path} is a CAUSE-MLP run: it has no attention")
        head = head_from_state(run.state, params)
        grid = tuple(int(v) for v in run.state["grid"])
        tokens = windows(source, params, args.windows)
        if path == args.runs[0]:
            print(f"uniform attention over {grid[0]} x {grid[1]} queries: entropy log({head.num_queries}) = "
                  f"{math.log(head.num_queries):.3f}")
            torch.manual_seed(0)
            fresh = TRHead(source.dim, params.reduced_dim, run.state["codebook"], head.num_queries,
                           params.tr_ffn_dim, params.tr_heads, params.dropout).eval()
            report("initialised, untrained", fresh, tokens)
        report(str(path), head, tokens)


if __name__ == "__main__":
    main()
