"""ringlab.hf: the transformers attention backends against float64 references.

The attention functions as transformers calls them (GQA, scaling, causal or not, a KV cache)
against ringlab.reference with K/V repeated; a tiny float64 Llama's logits and gradients with
"ringlab" against "sdpa" and with "ringlab_dilated" against the dense dilated reference
registered as an attention function, on a batch and on packed documents (against each document
alone); the masks they cannot apply raise; and the worked example (examples/hf_llama_ring.py):
2-rank training equal to one process, packed documents too."""

import math
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import workers
from conftest import assert_close, rand_qkv, run_and_grad
from transformers import AttentionInterface, DataCollatorWithFlattening, masking_utils

import ringlab.hf
from ringlab.engine.launch import launch
from ringlab.reference import dense_attention, dense_dilated_attention

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import hf_llama_ring as example  # noqa: E402  (the worked example; spawned ranks inherit sys.path)

SEGMENTS, RATES = [8, 16, 32], [1, 2, 4]


@pytest.fixture(autouse=True)
def no_packed_mask_from_another_test():
    """Tests call the attention functions directly, without the model forward that runs the
    mask hook first: none may inherit another test's packed mask."""
    ringlab.hf._PACKED_MASK.set(False)
# kv_heads 4 is plain multi-head attention; 2 is the worked example's grouped-query layout.
KV_HEADS = [4, 2]
EXAMPLE_KV_HEADS = 2
# Ragged packed documents of the example's 32 tokens: one shorter than the smallest segment.
PACKED = [11, 5, 16]
# The ring's packed cases: (attn, layout, document lengths); doc_zigzag needs multiples of 2P.
RING_PACKED = [("ringlab", "zigzag", PACKED), ("ringlab_dilated", "doc_zigzag", [12, 4, 16])]


def reference_forward(query, key, value, *, causal, scale, segments=None, rates=None, head_offsets="interleaved"):
    """The float64 reference on transformers' layout, (B, H, N, D) in, (B, N, H, D) out: each K/V
    head repeated for its H / H_kv query heads. Causal with fewer queries than keys: the queries
    are the last positions (a KV cache holds the first keys)."""
    rep = query.shape[1] // key.shape[1]
    q, k, v = query.transpose(1, 2), *(x.repeat_interleave(rep, 1).transpose(1, 2) for x in (key, value))
    if segments is not None:
        return dense_dilated_attention(q, k, v, segments, rates, causal=causal, scale=scale,
                                       head_offsets=head_offsets)[0]
    n_q, n_k = q.shape[1], k.shape[1]
    future = torch.arange(n_k)[None, :] > torch.arange(n_k - n_q, n_k)[:, None]
    bias = torch.zeros(n_q, n_k, dtype=torch.float64).masked_fill(future, -math.inf) if causal else None
    return dense_attention(q, k, v, scale=scale, bias=bias)[0]


def dense_dilated_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention function for transformers: the dense dilated reference with the config's branches."""
    assert attention_mask is None and not dropout
    cfg = module.config
    out = reference_forward(query, key, value, causal=module.is_causal, scale=scaling,
                            segments=cfg.ringlab_segment_lengths, rates=cfg.ringlab_dilation_rates,
                            head_offsets=getattr(cfg, "ringlab_head_offsets", "interleaved"))
    return out, None


AttentionInterface.register("dense_dilated_reference", dense_dilated_reference)


def stub_module(causal, **config):
    """What the attention functions read from transformers' attention module."""
    return types.SimpleNamespace(is_causal=causal, config=types.SimpleNamespace(**config))


def hf_inputs(b, n, h, h_kv, d, n_k=None):
    """float64 query (B, H, N, D), key and value (B, H_kv, N_k, D)."""
    q, = rand_qkv(b, n, h, d, count=1)
    k, v = rand_qkv(b, n_k or n, h_kv, d, seed=1, count=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def check_function(fn, ref, inputs):
    """Outputs and the gradients of query, key and value against the float64 reference."""
    no_lse = torch.zeros(())  # run_and_grad expects (out, lse); these functions give no lse
    out, _, grads = run_and_grad(lambda *x: (fn(*x)[0], no_lse), inputs, torch.float64)
    rout, _, rgrads = run_and_grad(lambda *x: (ref(*x), no_lse), inputs, torch.float64)
    assert out.shape == rout.shape
    assert_close(out, rout, torch.float64, name="out")
    for name, a, e in zip(("query", "key", "value"), grads, rgrads):
        assert_close(a, e, torch.float64, grad=True, name=f"d{name}")


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=lambda h: f"kv{h}")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cached", [0, 5], ids=lambda c: f"cached{c}")
def test_attention_function_against_reference(kv_heads, causal, cached):
    """"ringlab" as transformers calls it: GQA heads, a scaling, causal or not, and ``cached``
    keys before the queries (generation with a KV cache)."""
    module = stub_module(causal)
    inputs = hf_inputs(2, 12, 4, kv_heads, 8, n_k=12 + cached)
    check_function(lambda q, k, v: ringlab.hf.attention_forward(module, q, k, v, None, scaling=0.3),
                   lambda q, k, v: reference_forward(q, k, v, causal=causal, scale=0.3), inputs)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=lambda h: f"kv{h}")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_offsets", ["interleaved", "grouped"])
def test_dilated_function_against_reference(kv_heads, causal, head_offsets):
    module = stub_module(causal, ringlab_segment_lengths=SEGMENTS, ringlab_dilation_rates=RATES,
                         ringlab_head_offsets=head_offsets)
    check_function(lambda q, k, v: ringlab.hf.dilated_attention_forward(module, q, k, v, None, scaling=0.3),
                   lambda q, k, v: reference_forward(q, k, v, causal=causal, scale=0.3, segments=SEGMENTS,
                                                     rates=RATES, head_offsets=head_offsets),
                   hf_inputs(1, 40, 4, kv_heads, 8))


def model_pair(config, attn, reference, lengths=None):
    """Logits and parameter gradients (summed cross-entropy) of the float64 example model with
    ``attn`` and with ``reference``, each on its own copy of the config, from the same
    initialisation. With document ``lengths``: ``attn`` on one row packing them (position ids
    restarting at 0 in each), ``reference`` on every document alone."""
    ids, targets, positions = example.batch()
    runs = {attn: [(ids, targets, positions)], reference: [(ids, targets, positions)]}
    if lengths is not None:
        ids, targets, positions, _ = example.packed_batch(lengths)
        runs = {attn: [(ids, targets, positions)],
                reference: list(zip(*(x.split(lengths, 1) for x in (ids, targets, positions))))}
    results = []
    for name, calls in runs.items():
        model, logits = example.build(config, name), []
        for x, y, pos in calls:
            logits.append(model(input_ids=x, position_ids=pos, use_cache=False).logits)
            F.cross_entropy(logits[-1].flatten(0, 1), y.flatten(), reduction="sum").backward()
        results.append((torch.cat(logits, 1).detach(), {n: p.grad for n, p in model.named_parameters()}))
    return results


def assert_models_equal(got, want):
    assert_close(got[0], want[0], torch.float64, name="logits")
    for name, grad in want[1].items():
        assert_close(got[1][name], grad, torch.float64, grad=True, name=name)


@pytest.mark.parametrize("kv_heads", KV_HEADS, ids=lambda h: f"kv{h}")
def test_llama_ringlab_equals_sdpa(kv_heads):
    config = example.tiny_llama_config(kv_heads)
    assert_models_equal(*model_pair(config, "ringlab", "sdpa"))
    assert config._attn_implementation is None  # each model built from its own copy


@pytest.mark.parametrize("head_offsets, kv_heads", [("interleaved", 4), ("grouped", 2)])
def test_llama_ringlab_dilated_equals_dense_reference(head_offsets, kv_heads):
    config = example.tiny_llama_config(kv_heads, ringlab_segment_lengths=SEGMENTS, ringlab_dilation_rates=RATES,
                                       ringlab_head_offsets=head_offsets)
    assert_models_equal(*model_pair(config, "ringlab_dilated", "dense_dilated_reference"))


def test_llama_packed_documents_equal_each_document_alone():
    """One row of 3 ragged documents, position ids restarting: what transformers marks as packed."""
    config = example.tiny_llama_config(EXAMPLE_KV_HEADS)
    assert_models_equal(*model_pair(config, "ringlab", "sdpa", PACKED))


def test_llama_dilated_packed_documents_equal_each_document_alone():
    """Each document is its own LongNet sequence: its segments start at its first token."""
    config = example.tiny_llama_config(4, ringlab_segment_lengths=SEGMENTS, ringlab_dilation_rates=RATES)
    assert_models_equal(*model_pair(config, "ringlab_dilated", "dense_dilated_reference", PACKED))


def test_flattening_collator_batch_equals_each_document_alone():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True): position ids and cu_seq_lens_q/k."""
    ids, _, _, cu = example.packed_batch(PACKED)
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    packed = collator([{"input_ids": d} for d in ids[0].split(PACKED)])
    assert packed["cu_seq_lens_q"].tolist() == cu.tolist()
    model = example.build(example.tiny_llama_config(EXAMPLE_KV_HEADS), "ringlab")
    got = model(**packed, use_cache=False).logits
    want = torch.cat([model(input_ids=d, use_cache=False).logits for d in ids.split(PACKED, 1)], 1)
    assert_close(got, want, torch.float64, name="logits")


@pytest.mark.parametrize("dilated", [False, True], ids=["ringlab", "ringlab_dilated"])
def test_functions_take_documents_from_cu_seq_lens(dilated):
    """The cu_seq_lens_q/k keywords alone (int32, no position ids) mark the packed documents."""
    cu = example.packed_batch(PACKED)[3].int()
    module = stub_module(True, ringlab_segment_lengths=SEGMENTS, ringlab_dilation_rates=RATES)
    fn = ringlab.hf.dilated_attention_forward if dilated else ringlab.hf.attention_forward
    branches = dict(segments=SEGMENTS, rates=RATES) if dilated else {}

    def each_alone(q, k, v):
        return torch.cat([reference_forward(*(x[:, :, a:b] for x in (q, k, v)), causal=True, scale=0.3, **branches)
                          for a, b in zip(cu, cu[1:])], 1)

    check_function(lambda q, k, v: fn(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu),
                   each_alone, hf_inputs(1, 32, 4, 2, 8))


def test_llama_generation_with_cache_equals_sdpa():
    """Prefill, a chunk of 4 tokens and one token, each on the KV cache of the calls before."""
    ids, _, _ = example.batch()
    logits = {}
    for attn in ("ringlab", "sdpa"):
        model, cache, logits[attn] = example.build(example.tiny_llama_config(4), attn), None, []
        for start, stop in ((0, 24), (24, 28), (28, 29)):
            out = model(input_ids=ids[:, start:stop], cache=cache, use_cache=True)
            cache = out.cache
            logits[attn].append(out.logits.detach())
    for got, want in zip(logits["ringlab"], logits["sdpa"]):
        assert_close(got, want, torch.float64, name="logits")


@pytest.mark.parametrize("dtype", [torch.bool, torch.float64])
@pytest.mark.parametrize("pattern", ["causal", "full"])
def test_exact_4d_masks_are_honoured(dtype, pattern):
    """A 4D mask that is exactly causal or exactly full gives what "sdpa" gives with it."""
    ids, _, _ = example.batch()
    n = ids.shape[1]
    visible = torch.ones(n, n, dtype=torch.bool)
    if pattern == "causal":
        visible = visible.tril()
    mask = visible
    if dtype != torch.bool:  # transformers' float masks: 0 where visible, the dtype's minimum where hidden
        mask = torch.zeros(n, n, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    mask = mask[None, None].expand(ids.shape[0], 1, n, n)
    got, want = (example.build(example.tiny_llama_config(4), attn)(input_ids=ids, attention_mask=mask).logits
                 for attn in ("ringlab", "sdpa"))
    assert_close(got, want, torch.float64, name="logits")
    if pattern == "full":  # the mask is applied: the result is not the causal one
        causal = example.build(example.tiny_llama_config(4), "ringlab")(input_ids=ids).logits
        assert (got - causal).abs().max() > 1e-3


def ringlab_mask(create, position_ids, config=None, **kwargs):
    """The mask transformers' ``create`` (a masking_utils function; ``kwargs`` passed on) makes
    for "ringlab" for one row of ``position_ids``, the example's config with ``config`` added."""
    ringlab.hf.register()
    cfg = example.tiny_llama_config(4, **(config or {}))
    cfg._attn_implementation = "ringlab"
    return create(cfg, torch.zeros(1, position_ids.shape[1], 64, dtype=torch.float64), None, None,
                  position_ids=position_ids, **kwargs)


def unhonourable_calls():
    """(name, the call, words the error must hold) for inputs the backends must refuse."""
    ids, _, _ = example.batch()
    n = ids.shape[1]
    padding = torch.ones_like(ids).index_fill(1, torch.tensor([n - 1]), 0)
    one, _, packed, cu = example.packed_batch(PACKED)
    not_from_0 = torch.cat([torch.arange(PACKED[0]), torch.arange(3, n - PACKED[0] + 3)])[None]  # then 3, 4, ...
    almost_causal = torch.ones(n, n, dtype=torch.bool).tril().index_put((torch.tensor([5]), torch.tensor([2])),
                                                                        torch.tensor(False))[None, None]
    future = ~torch.ones(n, n, dtype=torch.bool).tril()
    bias = torch.zeros(n, n, dtype=torch.float64).index_fill(1, torch.tensor([2]), -0.5).masked_fill(future, -math.inf)
    model = lambda attn="ringlab", **cfg: example.build(example.tiny_llama_config(4, **cfg), attn)  # noqa: E731
    dilated = lambda: model("ringlab_dilated", ringlab_segment_lengths=[8], ringlab_dilation_rates=[1])  # noqa: E731
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    sliding, chunked = masking_utils.create_sliding_window_causal_mask, masking_utils.create_chunked_causal_mask

    def function(**kwargs):  # "ringlab" as the model calls it
        return ringlab.hf.attention_forward(stub_module(True), *hf_inputs(1, n, 4, 4, 8), None, **kwargs)

    return [
        ("padding", lambda: model()(input_ids=ids, attention_mask=padding), "padding"),
        ("padding, dilated", lambda: dilated()(input_ids=ids, attention_mask=padding), "padding"),
        ("packed, batch 2", lambda: model()(input_ids=ids, position_ids=packed, use_cache=False), "batch 1"),
        ("packed, a KV cache", lambda: model()(input_ids=one, position_ids=packed, use_cache=True), "KV cache"),
        ("packed, a document not from 0", lambda: model()(input_ids=one, position_ids=not_from_0, use_cache=False),
         "restart at 0"),
        ("packed, a 4D mask", lambda: model()(input_ids=one, position_ids=packed, attention_mask=causal,
                                             use_cache=False), "with packed documents"),
        ("packed, cu_seq_lens q and k differ", lambda: function(cu_seq_lens_q=cu,
                                                                cu_seq_lens_k=torch.tensor([0, 16, 21, n])), "differ"),
        ("packed, cu_seq_lens against positions", lambda: function(cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                                   position_ids=torch.arange(n)[None]), "disagrees"),
        ("packed mask, no documents reach the attention",
         lambda: (ringlab_mask(masking_utils.create_causal_mask, packed, {}), function()), "received neither"),
        ("sliding window", lambda: ringlab_mask(sliding, torch.arange(n)[None], dict(sliding_window=8)),
         "other than causal or full"),
        ("sliding window, packed", lambda: ringlab_mask(sliding, packed, dict(sliding_window=8)),
         "other than causal or full"),
        ("chunked, packed", lambda: ringlab_mask(chunked, packed, dict(attention_chunk_size=8)),
         "other than causal or full"),
        ("another overlay, packed", lambda: ringlab_mask(masking_utils.create_causal_mask, packed,
                                                         and_mask_function=lambda b, h, q, k: k <= q),
         "other than causal or full"),
        ("4D mask, not causal", lambda: model()(input_ids=ids, attention_mask=almost_causal),
         "neither causal nor full"),
        ("4D mask with a bias", lambda: model()(input_ids=ids, attention_mask=bias[None, None]), "bias"),
        ("dropout", lambda: model(attention_dropout=0.1).train()(input_ids=ids), "dropout"),
        ("dilated without branches", lambda: model("ringlab_dilated")(input_ids=ids), "ringlab_segment_lengths"),
        ("dilated with a cache", lambda: dilated()(input_ids=ids[:, -1:], cache=model()(
            input_ids=ids[:, :-1], use_cache=True).cache), "cache"),
    ]


@pytest.mark.parametrize("index", range(len(unhonourable_calls())), ids=[c[0] for c in unhonourable_calls()])
def test_what_cannot_be_honoured_raises(index):
    _, call, words = unhonourable_calls()[index]
    with pytest.raises(ValueError, match=words):
        call()


def test_unsupported_keywords_raise():
    q, k, v = hf_inputs(1, 16, 4, 4, 8)
    module = stub_module(True)
    for kwargs, words in ((dict(sliding_window=8), "sliding_window"), (dict(softcap=30.0), "soft-capped"),
                          (dict(s_aux=torch.zeros(4)), "sinks")):
        with pytest.raises(ValueError, match=words):
            ringlab.hf.attention_forward(module, q, k, v, None, **kwargs)
    # A window as long as the sequence changes nothing.
    out, _ = ringlab.hf.attention_forward(module, q, k, v, None, sliding_window=16)
    assert_close(out, reference_forward(q, k, v, causal=True, scale=None), torch.float64)


def test_sequence_parallel_checks_its_arguments():
    with pytest.raises(TypeError, match="ProcessGroup"):
        ringlab.hf.sequence_parallel(None).__enter__()
    with pytest.raises(ValueError, match="layout"):
        ringlab.hf.sequence_parallel(None, layout="diagonal").__enter__()
    with pytest.raises(ValueError, match="together"):
        ringlab.hf.sequence_parallel(None, segment_lengths=[8]).__enter__()
    with pytest.raises(ValueError, match="layout"):
        ringlab.hf.sequence_parallel(None, layout="striped", segment_lengths=[8], dilation_rates=[1]).__enter__()


def test_ringlab_imports_no_transformers_and_hf_names_the_extra():
    code = ("import sys\nimport ringlab\nassert 'transformers' not in sys.modules\n"
            "sys.modules['transformers'] = None\n"
            "try:\n    import ringlab.hf\nexcept ModuleNotFoundError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "ringlab[hf]"' in out


@pytest.mark.distributed
def test_two_rank_training_equals_one_process():
    """The worked example (GQA) on 2 gloo ranks with zigzag shards: "ringlab" against one process
    with "sdpa", and "ringlab_dilated" with its branches from sequence_parallel against the dense
    dilated reference; losses and every gradient of 3 (2) SGD steps. A step on packed documents
    (sequence_parallel's cu_seqlens) against one process: "sdpa" with transformers' packed mask,
    and "ringlab_dilated" (each document alone as tested above). Then the ring's refusals."""
    config = example.tiny_llama_config(EXAMPLE_KV_HEADS)
    reference = example.train(config, "sdpa")
    dilated_config = example.tiny_llama_config(EXAMPLE_KV_HEADS, ringlab_segment_lengths=SEGMENTS,
                                               ringlab_dilation_rates=RATES)
    dilated_reference = example.train(dilated_config, "dense_dilated_reference", steps=2)
    packed_references = [example.train(*((config, "sdpa") if attn == "ringlab" else (dilated_config, attn)),
                                       steps=1, lengths=lengths) for attn, _, lengths in RING_PACKED]
    assert reference[0][-1] < reference[0][0]
    for ring, dilated, packed, errors in launch(workers.hf_ring, 2, args=(config, SEGMENTS, RATES, RING_PACKED),
                                                timeout=300):
        for (losses, grads), (ref_losses, ref_grads) in ((ring, reference), (dilated, dilated_reference),
                                                         *zip(packed, packed_references)):
            assert losses == pytest.approx(ref_losses, abs=1e-10, rel=0)
            for step, ref in zip(grads, ref_grads):
                for name, grad in ref.items():
                    assert_close(step[name], grad, torch.float64, grad=True, name=name)
        assert "padding (zeros) inside a ring" in errors["padding"]
        assert "not the global positions" in errors["positions"]
        assert "inside a ring" in errors["4D mask"]
        assert "not the per-document positions" in errors["packed, global positions"]
