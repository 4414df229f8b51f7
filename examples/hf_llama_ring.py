"""A tiny Llama trained with ring attention on 2 gloo ranks equals one process with SDPA.

    python examples/hf_llama_ring.py        # needs pip install "ringlab[hf]"; no downloads

The model is a randomly initialised Llama with grouped-query attention (hidden 64, 4 heads,
2 K/V heads, 2 layers), in float64 so that the two runs can be compared to rounding error.
Each rank feeds its zigzag shard of the token sequence with the global position ids of that
shard, the "ringlab" attention runs as a ring over the process group, and the parameter
gradients are summed over the ranks. The reference is one process on the whole sequence with
attn_implementation="sdpa" ("eager" would not do: Llama's eager softmax runs in float32).
``train(..., lengths=...)`` packs documents into one row instead (position ids restarting at
0 in each, ``sequence_parallel(..., cu_seqlens=)``). tests/test_hf.py runs these functions and
holds losses and gradients to 1e-10.
"""

import contextlib
import copy
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import ringlab
import ringlab.hf
from ringlab.engine.launch import launch
from ringlab.engine.nn import all_reduce_grads

BATCH, SEQ, VOCAB = 2, 32, 64


def tiny_llama_config(kv_heads: int = 2, **extra) -> LlamaConfig:
    """hidden 64, 4 query heads, ``kv_heads`` K/V heads, 2 layers; ``extra`` goes to the config."""
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=SEQ, **extra)


def build(config: LlamaConfig, attn: str, seed: int = 0):
    """A float64 model, randomly initialised from ``seed``. It gets its own copy of ``config``:
    from_config writes ``attn`` into the config object it is given."""
    ringlab.hf.register()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn, dtype=torch.float64)


def batch(seed: int = 0):
    """(input_ids, targets, position_ids): a fixed random batch of BATCH x SEQ tokens."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ)[None]


def packed_batch(lengths, seed: int = 0):
    """(input_ids, targets, position_ids, cu_seqlens): the first row of ``batch`` as packed
    documents of ``lengths`` tokens (summing to SEQ), the position ids restarting at 0 in each."""
    ids, targets, _ = batch(seed)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids[:1], targets[:1], positions, torch.tensor([0, *itertools.accumulate(lengths)])


def train(config: LlamaConfig, attn: str, steps: int = 3, seed: int = 0, layout: str = "zigzag",
          parallel: dict | None = None, lengths=None):
    """``steps`` SGD steps on one batch (``lengths``: on one row of packed documents); returns
    (losses, gradients of each step by parameter name).

    Run by ``launch``, each rank trains on its ``layout`` shard of the sequence inside
    ``ringlab.hf.sequence_parallel`` (``parallel``: its further arguments) and the returned losses
    and gradients are those of the whole sequence (summed over the ranks)."""
    model = build(config, attn, seed)
    ids, targets, positions, cu = (*batch(seed), None) if lengths is None else packed_batch(lengths, seed)
    tokens = targets.numel()
    group, context = None, contextlib.nullcontext()
    if dist.is_initialized():
        group, rank, p = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
        ids, targets, positions = (ringlab.shard(x, rank, p, layout=layout, cu_seqlens=cu)
                                   for x in (ids, targets, positions))
        context = ringlab.hf.sequence_parallel(group, layout=layout, cu_seqlens=cu, **(parallel or {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], []
    with context:  # the backward too: the ring runs again there
        for _ in range(steps):
            opt.zero_grad()
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            # This rank's summed cross-entropy over all tokens: the ranks' losses add up to the mean.
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / tokens
            loss.backward()
            loss = loss.detach()
            if group is not None:
                all_reduce_grads(model, group)
                dist.all_reduce(loss, group=group)
            losses.append(loss.item())
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
            opt.step()
    return losses, grads


def max_difference(run, reference) -> float:
    """Largest absolute difference of losses and gradients between two ``train`` results."""
    (losses, grads), (ref_losses, ref_grads) = run, reference
    diffs = [abs(a - b) for a, b in zip(losses, ref_losses)]
    diffs += [(g[name] - r[name]).abs().max().item() for g, r in zip(grads, ref_grads) for name in r]
    return max(diffs)


def main():
    config = tiny_llama_config(kv_heads=2)
    reference = train(config, "sdpa")
    print("single process, sdpa:  losses", " ".join(f"{x:.6f}" for x in reference[0]))
    for rank, run in enumerate(launch(train, 2, args=(config, "ringlab"), timeout=300)):
        print(f"rank {rank} of 2, ringlab: losses", " ".join(f"{x:.6f}" for x in run[0]),
              f"| max difference of losses and gradients {max_difference(run, reference):.1e}")


if __name__ == "__main__":
    main()
