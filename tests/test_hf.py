"""ringlab.hf: the transformers attention backends against float64 references.

The attention functions as transformers calls them (GQA, scaling, causal or not, a KV cache)
against ringlab.reference with K/V repeated; a tiny float64 Llama's logits and gradients with
"ringlab" against "sdpa" and with "ringlab_dilated" against the dense dilated reference
registered as an attention function; the masks they cannot apply raise; and the worked example
(examples/hf_llama_ring.py): 2-rank training equal to one process."""

import math
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import workers
from conftest import assert_close, rand_qkv, run_and_grad
from transformers import AttentionInterface

import ringlab.hf
from ringlab.engine.launch import launch
from ringlab.reference import dense_attention, dense_dilated_attention

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import hf_llama_ring as example  # noqa: E402  (the worked example; spawned ranks inherit sys.path)

SEGMENTS, RATES = [8, 16, 32], [1, 2, 4]
# kv_heads 4 is plain multi-head attention; 2 is the worked example's grouped-query layout.
KV_HEADS = [4, 2]
EXAMPLE_KV_HEADS = 2


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


def model_pair(config, attn, reference):
    """Logits and parameter gradients of the float64 example model with ``attn`` and with
    ``reference``, each on its own copy of the config, from the same initialisation."""
    ids, targets, _ = example.batch()
    results = []
    for name in (attn, reference):
        model = example.build(config, name)
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
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


def unhonourable_calls():
    """(name, the call, words the error must hold) for inputs the backends must refuse."""
    ids, _, _ = example.batch()
    n = ids.shape[1]
    padding = torch.ones_like(ids).index_fill(1, torch.tensor([n - 1]), 0)
    packed = torch.arange(n // 2).repeat(2)[None]
    almost_causal = torch.ones(n, n, dtype=torch.bool).tril().index_put((torch.tensor([5]), torch.tensor([2])),
                                                                        torch.tensor(False))[None, None]
    future = ~torch.ones(n, n, dtype=torch.bool).tril()
    bias = torch.zeros(n, n, dtype=torch.float64).index_fill(1, torch.tensor([2]), -0.5).masked_fill(future, -math.inf)
    model = lambda attn="ringlab", **cfg: example.build(example.tiny_llama_config(4, **cfg), attn)  # noqa: E731
    dilated = lambda: model("ringlab_dilated", ringlab_segment_lengths=[8], ringlab_dilation_rates=[1])  # noqa: E731
    return [
        ("padding", lambda: model()(input_ids=ids, attention_mask=padding), "padding"),
        ("padding, dilated", lambda: dilated()(input_ids=ids, attention_mask=padding), "padding"),
        ("packed sequences", lambda: model()(input_ids=ids, position_ids=packed), "packed"),
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
    dilated reference; losses and every gradient of 3 (2) SGD steps. Then the ring's refusals."""
    config = example.tiny_llama_config(EXAMPLE_KV_HEADS)
    reference = example.train(config, "sdpa")
    dilated_config = example.tiny_llama_config(EXAMPLE_KV_HEADS, ringlab_segment_lengths=SEGMENTS,
                                               ringlab_dilation_rates=RATES)
    dilated_reference = example.train(dilated_config, "dense_dilated_reference", steps=2)
    assert reference[0][-1] < reference[0][0]
    for ring, dilated, errors in launch(workers.hf_ring, 2, args=(config, SEGMENTS, RATES), timeout=300):
        for (losses, grads), (ref_losses, ref_grads) in ((ring, reference), (dilated, dilated_reference)):
            assert losses == pytest.approx(ref_losses, abs=1e-10, rel=0)
            for step, ref in zip(grads, ref_grads):
                for name, grad in ref.items():
                    assert_close(step[name], grad, torch.float64, grad=True, name=name)
        assert "padding (zeros) inside a ring" in errors["padding"]
        assert "not the global positions" in errors["positions"]
        assert "inside a ring" in errors["4D mask"]
