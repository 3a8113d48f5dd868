"""The GPT around the attention: sizes, the three attention paths in a whole model, configuration checks."""

import pytest
import torch
from torch.nn import functional as F

from checkpoint import model_from_checkpoint
from configurator import peak_flops_of
from model import (GPT, PRESETS, FixedKVCache, GPTConfig, KVCache, RMSNorm, alibi_slopes, apply_rope,
                   left_padded, rope_cos_sin, sample_next, stablemask_reference, stablemask_sdpa,
                   swiglu_hidden)

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def tiny(**overrides):
    cfg = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=64, attn_impl='reference')
    cfg.update(overrides)
    return GPTConfig(**cfg)


@pytest.mark.parametrize('preset,expected', [('71M', 71.9e6), ('160M', 162.1e6), ('1.4B', 1.44e9)])
def test_preset_sizes(preset, expected):
    with torch.device('meta'):  # counts the parameters without allocating them
        n = GPT(GPTConfig(**PRESETS[preset])).get_num_params()
    assert abs(n - expected) / expected < 0.005, f"{preset}: {n / 1e6:.1f}M parameters"


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def poisoned(numel):
    """Fill, then free, memory of numel float32s: the next tensor of that size is likely to take it,
    so that an element a function forgets to write shows as NaN."""
    torch.full((numel,), float('nan'))


@pytest.mark.parametrize('shape', [(2, 7, 3, 16), (3, 5, 4, 32)])
def test_rope_and_rms_norm_written_out(shape):
    """RoPE's rotation written in place and its backward (the opposite rotation), and RMSNorm's CPU
    backward written out: the outputs are the plain formulas' bit for bit (transformers' roundings),
    the gradients those of float64 autograd through the plain formulas."""
    g = torch.Generator().manual_seed(0)
    B, T, heads, D = shape
    x = torch.randn(shape, generator=g, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(3, 3 + T), D, 10000.0)
    dy = torch.randn(shape, generator=g)

    def plain_rope(x, cos, sin):  # transformers' q * cos + rotate_half(q) * sin
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    poisoned(x.numel())
    with torch.no_grad():
        assert torch.equal(apply_rope(x, cos, sin), plain_rope(x, cos, sin))
    poisoned(x.numel())
    y = apply_rope(x, cos, sin)
    assert torch.equal(y, plain_rope(x, cos, sin).detach())
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    plain_rope(x64, cos.double(), sin.double()).backward(dy.double())
    assert relative_error(x.grad, x64.grad) < 1e-6

    norm = RMSNorm(D, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    dh = torch.randn(B, T, D, generator=g)
    poisoned(h.numel())
    out = norm(h)
    assert torch.equal(out, F.rms_norm(h, (D,), norm.weight, 1e-6).detach())
    out.backward(dh)
    h64, w64 = h.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64).backward(dh.double())
    assert relative_error(h.grad, h64.grad) < 1e-6 and relative_error(norm.weight.grad, w64.grad) < 1e-6


def test_swiglu_width():
    """LLaMA's width for the paper's models; for small ones a finer multiple, so that the MLP keeps
    about 8/3 of n_embd instead of 4 (341 would round to 512 at n_embd 128)."""
    assert [swiglu_hidden(d) for d in (512, 768, 1024, 2048)] == [1536, 2048, 2816, 5632]
    assert [swiglu_hidden(d) for d in (32, 64, 128, 256, 384)] == [96, 192, 384, 768, 1024]


def test_a_checkpoint_saved_before_the_small_width_rule_loads():
    """A small model saved when its SwiGLU width was 512 (model_args without n_hidden) keeps that width."""
    torch.manual_seed(0)
    old = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=128, n_hidden=512))
    args = {k: v for k, v in vars(old.config).items() if k != 'n_hidden'}
    loaded = model_from_checkpoint(dict(model=old.state_dict(), model_args=args))
    assert loaded.config.n_hidden == 512 and swiglu_hidden(128) == 384
    idx = torch.randint(0, 40, (1, 16))
    torch.testing.assert_close(loaded(idx, idx)[0], old(idx, idx)[0])


def every_path_agrees(model, idx):
    """Logits and parameter gradients of one batch with each attention implementation, checked to
    agree; returns {impl: (logits, {name: gradient})}."""
    results = {}
    for impl in ('reference', 'sdpa', 'triton'):
        for block in model.transformer.h:
            block.attn.impl = impl
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        results[impl] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for impl in ('sdpa', 'triton'):
        torch.testing.assert_close(results[impl][0], results['reference'][0], rtol=1e-4, atol=1e-5)
        for name, g in results[impl][1].items():
            torch.testing.assert_close(g, results['reference'][1][name], rtol=1e-3, atol=1e-6)
    return results


@pytest.mark.parametrize('pos_enc,attn_mask,sm_gamma', [
    ('rope', 'stablemask', None), ('alibi', 'stablemask', 0.0), ('learned', 'causal', None),
    ('none', 'stablemask', None)])
def test_attention_paths_agree_in_the_model(pos_enc, attn_mask, sm_gamma):
    """The same tiny GPT gives the same logits and parameter gradients with each attention
    implementation: what the kernel tests (test_kernel.py, every mask and decay against float64) leave
    to the model is the layout of q, k, v as views of one projection, the rotary tables and the
    dispatch, so each position encoding and each kind of mask is here once."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_enc=pos_enc, attn_mask=attn_mask, sm_gamma=sm_gamma)).to(DEVICE)
    every_path_agrees(model, torch.randint(0, 97, (2, 37), device=DEVICE))


def test_stablemask_changes_the_model_and_adds_no_parameters():
    torch.manual_seed(0)
    causal = GPT(tiny(attn_mask='causal', n_layer=1))
    stable = GPT(tiny(n_layer=1))
    stable.load_state_dict(causal.state_dict())  # parameter-free: the same weights fit both
    idx = torch.randint(0, 97, (1, 20))
    a, _ = causal(idx, targets=idx)
    b, _ = stable(idx, targets=idx)
    assert not torch.allclose(a, b)
    # in one layer the last row has no pseudo mass: plain causal attention
    torch.testing.assert_close(a[:, -1], b[:, -1])


def test_inference_returns_only_the_last_position():
    model = GPT(tiny())
    idx = torch.randint(0, 97, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 97) and loss is None
    full, _ = model(idx, targets=idx)
    torch.testing.assert_close(logits[:, 0], full[:, -1])


@pytest.mark.parametrize('bad,match', [
    (dict(attn_mask='sink'), 'attn_mask'), (dict(pos_enc='sinusoid'), 'pos_enc'),
    (dict(attn_impl='flash'), 'attn_impl'), (dict(sm_gamma=-0.1), 'sm_gamma'), (dict(n_embd=30), 'multiple'),
])
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


# ---------------------------------------------------------------------------------------------------
# generation: the KV cache under SM-I


def full_logits(model, idx):
    """Logits of every position in one forward pass, with SM-I's pseudo_len = block_size."""
    return model(idx, targets=idx, pseudo_len=model.config.block_size)[0]


def cache_and_impl(impl):
    """'fixed': the fixed-shape cache (it reads its ring through the sdpa path's bias); else the
    growing one."""
    return (FixedKVCache, 'sdpa') if impl == 'fixed' else (KVCache, impl)


@pytest.mark.parametrize('pos_enc', ['rope', 'alibi', 'learned', 'none'])
@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'fixed'])
def test_cached_steps_equal_a_full_forward(pos_enc, impl):
    """Prefill a prompt, then feed one token at a time through the cache: each step's logits are the
    same row of one forward pass over the whole sequence. RoPE, ALiBi and no-position models go on
    past block_size (rows there have no pseudo mass, in both)."""
    torch.manual_seed(0)
    Cache, impl = cache_and_impl(impl)
    model = GPT(tiny(pos_enc=pos_enc, block_size=32, attn_impl=impl)).eval()
    length = 32 if pos_enc == 'learned' else 45
    idx = torch.randint(0, 97, (2, length))
    cache = Cache(model.config.n_layer, length)
    with torch.no_grad():
        steps = [model(idx[:, :10], pseudo_len=32, kv_cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], pseudo_len=32, kv_cache=cache)[0] for t in range(10, length)]
        full = full_logits(model, idx)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-4, atol=1e-5)


def test_pseudo_len_matters_without_sm_i():
    """Why SM-I exists: with pseudo_len = T (training) a row's output depends on the sequence length."""
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        short, _ = model(idx[:, :20], targets=idx[:, :20])
        long, _ = model(idx, targets=idx)
        short_sm_i, _ = model(idx[:, :20], targets=idx[:, :20], pseudo_len=64)
        long_sm_i, _ = model(idx, targets=idx, pseudo_len=64)
    assert not torch.allclose(short, long[:, :20], atol=1e-4)
    torch.testing.assert_close(short_sm_i, long_sm_i[:, :20], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('sliding_window', [True, False])
@pytest.mark.parametrize('pos_enc,sinks', [('rope', {}), ('alibi', {}), ('learned', {}), ('none', {}),
                                           ('rope', dict(sink_token='learned', sink_logit='learned'))])
def test_generate_same_greedy_tokens_with_and_without_cache(pos_enc, sinks, sliding_window):
    """Both caches give the tokens of generation without one (the fixed one falls back to the growing
    one where generation recomputes: learned positions, a sink token with the window)."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_enc=pos_enc, block_size=24, attn_impl='sdpa', **sinks)).eval()
    for prompt in (5, 60):  # a prompt shorter, and one longer, than the window (twice block_size)
        idx = torch.randint(0, 97, (2, prompt))
        # well past block_size
        uncached = model.generate(idx, 70, temperature=0, use_cache=False, sliding_window=sliding_window)
        for cache in (True, 'fixed'):
            cached = model.generate(idx, 70, temperature=0, use_cache=cache, sliding_window=sliding_window)
            assert cached.shape == (2, prompt + 70)
            assert torch.equal(cached, uncached)
            assert torch.equal(cached[:, :prompt], idx)


def test_sliding_window_is_a_setting_that_matters():
    torch.manual_seed(0)
    model = GPT(tiny(block_size=16, attn_impl='sdpa')).eval()
    idx = torch.randint(0, 97, (2, 5))
    window, whole = (model.generate(idx, 40, temperature=0, sliding_window=s) for s in (True, False))
    # the same until block_size
    assert torch.equal(window[:, :16], whole[:, :16]) and not torch.equal(window, whole)


@pytest.mark.parametrize('impl', [stablemask_reference, stablemask_sdpa])
@pytest.mark.parametrize('gamma,alibi', [(None, None), ('slopes', None), ('slopes', 'slopes'), (0.0, None)])
def test_sliding_window_attention(impl, gamma, alibi):
    """With a window each query sees its last `window` keys as a sequence of its own, of which it is
    the last row (with the pseudo mass of that row at the training length, SM-I)."""
    H, T, window = 3, 20, 6
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, T, 16, generator=g, dtype=torch.float64) for _ in range(3))
    if gamma is not None:
        slopes = alibi_slopes(H).double()
        gamma = slopes if gamma == 'slopes' else torch.full((H,), gamma, dtype=torch.float64)
    alibi = alibi_slopes(H).double() if alibi else None
    if impl is stablemask_sdpa:  # the fused ops run in float32
        q, k, v, gamma, alibi = (None if t is None else t.float() for t in (q, k, v, gamma, alibi))
    out = impl(q, k, v, gamma, alibi, pseudo_len=window, window=window)
    for t in range(T):
        s = max(0, t - window + 1)
        expected = stablemask_reference(q[:, :, t:t + 1], k[:, :, s:t + 1], v[:, :, s:t + 1], gamma, alibi,
                                        pseudo_len=window)
        torch.testing.assert_close(out[:, :, t:t + 1], expected, rtol=1e-5, atol=1e-6)
    wide = impl(q, k, v, gamma, alibi, window=T)  # a window as long as the sequence: no window at all
    torch.testing.assert_close(wide, stablemask_reference(q, k, v, gamma, alibi), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('pos_enc', ['rope', 'alibi', 'none'])
@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'fixed'])
def test_windowed_cache_equals_a_windowed_forward(pos_enc, impl):
    """Past block_size the cache drops its oldest entries (the growing one moves the rest to its
    front when its buffer of twice the window fills; the fixed one overwrites the oldest slot of its
    ring); each step still equals the same row of one windowed forward."""
    torch.manual_seed(0)
    Cache, impl = cache_and_impl(impl)
    model = GPT(tiny(pos_enc=pos_enc, block_size=16, attn_impl=impl)).eval()
    length = 90
    idx = torch.randint(0, 97, (2, length))
    for prefill in (10, 40):  # a prompt shorter, and one longer, than the window
        cache = Cache(model.config.n_layer, length, window=16)
        with torch.no_grad():
            steps = [model(idx[:, :prefill], pseudo_len=16, kv_cache=cache)[0]]
            steps += [model(idx[:, t:t + 1], pseudo_len=16, kv_cache=cache)[0]
                      for t in range(prefill, length)]
            full = model(idx, targets=idx, pseudo_len=16, window=16)[0]
        torch.testing.assert_close(torch.cat(steps, dim=1), full[:, prefill - 1:], rtol=1e-4, atol=1e-5)
        if Cache is KVCache:
            # memory of twice the window, however long the text
            assert cache.k[0].size(2) == 32 and cache.held <= 32
        else:
            assert cache.k[0].size(2) == 16 and cache.position.item() == length  # the window's memory


def test_sample_next():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(500, 1)
    assert sample_next(logits, temperature=0).eq(1).all()
    torch.manual_seed(0)
    assert set(sample_next(logits, top_k=2).flatten().tolist()) == {1, 3}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, 0.03 over tokens 1, 3, 2, 0
    assert set(sample_next(logits, top_p=0.5).flatten().tolist()) == {1}
    assert set(sample_next(logits, top_p=float(probs[1] + 0.01)).flatten().tolist()) == {1, 3}
    assert set(sample_next(logits).flatten().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize('pos_enc,attn_mask', [('rope', 'stablemask'), ('alibi', 'stablemask'),
                                               ('rope', 'causal')])
def test_grouped_query_attention_in_the_model(pos_enc, attn_mask):
    """n_kv_head < n_head: every attention path gives the same logits and gradients, and the KV cache
    keeps only the K/V heads while its steps equal a full forward."""
    torch.manual_seed(0)
    model = GPT(tiny(n_head=4, n_kv_head=2, pos_enc=pos_enc, attn_mask=attn_mask)).to(DEVICE)
    assert model.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 16, 64)
    idx = torch.randint(0, 97, (2, 37), device=DEVICE)
    every_path_agrees(model, idx)
    model.eval()
    for Cache in (KVCache, FixedKVCache):  # the fixed one on the sdpa path, which reads its ring's mask
        for block in model.transformer.h:
            block.attn.impl = 'sdpa' if Cache is FixedKVCache else 'triton'
        cache = Cache(model.config.n_layer, 37)
        with torch.no_grad():
            steps = [model(idx[:, :10], pseudo_len=64, kv_cache=cache)[0]]
            steps += [model(idx[:, t:t + 1], pseudo_len=64, kv_cache=cache)[0] for t in range(10, 37)]
            full = model(idx, targets=idx, pseudo_len=64)[0]
        torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-4, atol=1e-5)
        assert cache.k[0].size(1) == 2


def test_config_refuses_kv_heads_that_do_not_divide():
    with pytest.raises(ValueError, match='not a multiple of n_kv_head'):
        tiny(n_head=4, n_kv_head=3)


SINK_VARIANTS = [dict(sink_token='learned'), dict(sink_token='fixed', attn_mask='causal'),
                 dict(sink_logit='learned'), dict(sink_logit='zero', attn_mask='causal'),
                 dict(sink_logit='learned', sink_token='learned'),
                 dict(sm_gamma=0.0, sm_offset=-2.0)]


@pytest.mark.parametrize('pos_enc', ['rope', 'learned'])
@pytest.mark.parametrize('variant', SINK_VARIANTS)
def test_sinks_in_the_model(pos_enc, variant):
    """The paper's Table 3 settings and today's sinks: every attention path agrees, the learned ones
    get gradients, a checkpoint of them loads back to the same logits."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_enc=pos_enc, **{'attn_mask': 'stablemask', **variant})).to(DEVICE)
    idx = torch.randint(0, 97, (2, 37), device=DEVICE)
    results = every_path_agrees(model, idx)
    assert results['triton'][0].shape == (2, 37, 97)  # the sink token's position is not among the outputs
    grads = results['reference'][1]
    learned = [n for n in grads if n.endswith('attn.sink') or n == 'sink_token']
    expected = (variant.get('sink_logit') == 'learned') * 2 + (variant.get('sink_token') == 'learned')
    assert len(learned) == expected
    assert all(grads[n].abs().sum() > 0 for n in learned)
    reloaded = model_from_checkpoint(dict(model=model.state_dict(), model_args=vars(model.config)))
    reloaded = reloaded.to(DEVICE)
    torch.testing.assert_close(reloaded(idx, targets=idx)[0], results['triton'][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('pos_enc', ['rope', 'alibi', 'learned'])
def test_generation_keeps_the_sink_token_first(pos_enc):
    """Cached and uncached generation agree; past block_size a sink-token model attends to its sink
    and the last block_size tokens (StreamingLLM's layout), computed anew at each step."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_enc=pos_enc, block_size=16, sink_token='learned', attn_impl='sdpa')).eval()
    idx = torch.randint(0, 97, (2, 5))
    cached = model.generate(idx, 40, temperature=0)
    assert torch.equal(cached, model.generate(idx, 40, temperature=0, use_cache=False))
    with torch.no_grad():  # the last step, by hand: the sink (prepended by forward) and the last 16 tokens
        last = model(cached[:, -17:-1], pseudo_len=16)[0][:, -1].argmax(-1)
    assert torch.equal(last, cached[:, -1])


@pytest.mark.parametrize('name,flops', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 NVL', 835e12), ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA L4', None)])
def test_peak_flops_by_gpu_name(name, flops):
    """MFU's denominator: each GPU's dense bf16 peak, the H100 variants told apart."""
    assert peak_flops_of(name) == flops


@pytest.mark.slow
@pytest.mark.parametrize('pos_enc', ['rope', 'alibi'])
def test_fixed_cache_compiles_the_decode_step_once(pos_enc):
    """sample.py --compile=True: with the fixed cache, the compiled forward gives eager's tokens
    (the growing cache's), past block_size too where its ring wraps, in two graphs: the prompt's
    pass and one decode step for every token; a second generation compiles nothing new."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, pos_enc=pos_enc)
    model = GPT(config).eval()
    idx = torch.randint(0, 50, (2, 5))
    eager = model.generate(idx, 40, temperature=0)
    torch._dynamo.reset()
    counters.clear()
    model.forward = torch.compile(model.forward)
    assert torch.equal(model.generate(idx, 40, temperature=0, use_cache='fixed'), eager)
    assert counters['stats']['unique_graphs'] == 2, counters['stats']
    assert torch.equal(model.generate(idx.flip(0), 40, temperature=0, use_cache='fixed'), eager.flip(0))
    assert counters['stats']['unique_graphs'] == 2, counters['stats']


# ---------------------------------------------------------------------------------------------------
# prompts of different lengths in one batch: left padding, each row with positions of its own

PADDED_VARIANTS = [('rope', {}), ('alibi', {}), ('learned', {}), ('none', {}),
                   ('rope', dict(sink_token='learned', sink_logit='learned', n_kv_head=2)),
                   ('alibi', dict(sink_token='fixed', attn_mask='causal'))]


@pytest.mark.parametrize('pos_enc,variant', PADDED_VARIANTS)
def test_a_left_padded_batch_equals_each_row_alone(poisoned, pos_enc, variant):
    """model(idx, pad=...) on prompts of different lengths, left-padded into one batch: each row's
    logits are those of the row alone in float64 (its first token at position 0: RoPE's angles,
    ALiBi's distances, learned positions and SM-I's pseudo mass by the row's own positions; the
    padding never attended), on every attention path; nothing unwritten (poisoned)."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_enc=pos_enc, block_size=24, **variant)).to(DEVICE).eval()
    prompts = [torch.randint(0, 97, (n,), device=DEVICE) for n in (3, 17, 24, 9)]
    idx, counts = left_padded(prompts, DEVICE)
    assert idx.shape == (4, 24) and counts == [21, 7, 0, 15]
    exact = GPT(model.config).to(DEVICE).double().eval()
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        alone = [full_logits(exact, prompt[None])[0] for prompt in prompts]
        for impl in ('reference', 'sdpa', 'triton'):
            for block in model.transformer.h:
                block.attn.impl = impl
            batch = model(idx, targets=idx, pseudo_len=24, pad=torch.tensor(counts, device=DEVICE))[0]
            for row, (n, want) in enumerate(zip(counts, alone)):
                assert relative_error(batch[row, n:], want) < 1e-5, (impl, row)
            assert not batch.isnan().any()


@pytest.mark.parametrize('pos_enc,variant', PADDED_VARIANTS)
def test_prompts_of_any_length_decode_as_one_batch(pos_enc, variant):
    """model.generate on a list of prompts of different lengths: greedy, each row's tokens are the
    tokens of that prompt decoded alone, with either KV cache or none, with the sliding window and
    without, well past block_size (the growing cache moves its window, the fixed one's ring wraps;
    learned positions and a sink token recompute their last block_size tokens)."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_enc=pos_enc, block_size=16, attn_impl='sdpa', **variant)).eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 20, 9, 1)]
    for sliding_window in (True, False):
        for cache in (False, True, 'fixed'):
            batch = model.generate(prompts, 30, temperature=0, use_cache=cache,
                                   sliding_window=sliding_window)
            for prompt, row in zip(prompts, batch):
                alone = model.generate(prompt[None], 30, temperature=0, use_cache=cache,
                                       sliding_window=sliding_window)[0]
                assert torch.equal(row, alone), (sliding_window, cache, len(prompt))


def test_generate_takes_lists_of_any_length_and_ends_each_row():
    """The API: a list of prompts (lists of ids or 1-D tensors) gives a list of 1-D tensors, each its
    prompt continued; end_token ends a row (kept) and generation once every row has ended; prompts of
    one length give what the (B, T) tensor gives; an empty prompt is refused."""
    torch.manual_seed(0)
    model = GPT(tiny(block_size=16, attn_impl='sdpa')).eval()
    prompts = [[5, 6, 7], torch.tensor([8]), [9, 10, 11, 12, 13]]
    free = model.generate(prompts, 12, temperature=0)
    assert [len(row) for row in free] == [15, 13, 17]
    assert all(row[:len(p)].tolist() == list(map(int, p)) for row, p in zip(free, prompts))
    # the end token: one the second row generates; each row ends at its first
    end = int(free[1][4])
    first = [row[len(p):].tolist().index(end) if end in row[len(p):].tolist() else None
             for row, p in zip(free, prompts)]
    ended = model.generate(prompts, 12, temperature=0, end_token=end)
    for row, p, whole, at in zip(ended, prompts, free, first):
        stop = len(whole) if at is None else len(p) + at + 1
        assert torch.equal(row, whole[:stop])
    same = torch.randint(0, 97, (3, 6))
    as_list = model.generate(list(same), 20, temperature=0)
    assert torch.equal(torch.stack(as_list), model.generate(same, 20, temperature=0))
    # in a tensor, a row that has ended goes on with end_token; the batch stops once every row has
    end = int(as_list[0][8])
    cut = model.generate(same, 20, temperature=0, end_token=end)
    for row, whole in zip(cut, as_list):
        new = whole[6:].tolist()
        stop = new.index(end) + 1 if end in new else len(new)
        assert row[6:].tolist() == (new[:stop] + [end] * 20)[:cut.size(1) - 6]
    alone = model.generate(same[:1], 20, temperature=0, end_token=end)
    assert alone.size(1) == 6 + as_list[0][6:].tolist().index(end) + 1
    with pytest.raises(ValueError, match='each of one token or more'):
        model.generate([[1, 2], []], 5)


@pytest.mark.slow
def test_padded_prompts_compile_the_decode_step_once():
    """sample.py --compile=True with prompts of different lengths: the fixed cache's ring is shared,
    its mask hides each row's padding; the compiled forward gives eager's tokens past block_size, in
    two graphs (the prompts' pass, one decode step), and the same prompts in another order add none."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, pos_enc='alibi')
    model = GPT(config).eval()
    prompts = [torch.randint(0, 50, (n,)) for n in (5, 2, 9)]
    eager = model.generate(prompts, 30, temperature=0)
    torch._dynamo.reset()
    counters.clear()
    model.forward = torch.compile(model.forward)
    compiled = model.generate(prompts, 30, temperature=0, use_cache='fixed')
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    assert counters['stats']['unique_graphs'] == 2, counters['stats']
    compiled = model.generate(prompts[::-1], 30, temperature=0, use_cache='fixed')
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager[::-1]))
    assert counters['stats']['unique_graphs'] == 2, counters['stats']


@pytest.mark.slow
def test_a_real_model_decodes_prompts_of_any_length_as_one_batch(smollm2):
    """SmolLM2-135M-Instruct (RoPE, 9 query heads over 3 key/value heads) made StableMask at a training
    length of 64, so that SM-I's pseudo mass differs from row to row and decoding passes block_size:
    three prompts of different lengths decode greedily as one batch to the tokens each gives alone."""
    import tokenizers
    from checkpoint import from_pretrained
    model = from_pretrained(smollm2, attn_mask='stablemask', block_size=64).eval()
    tokenizer = tokenizers.Tokenizer.from_file(f'{smollm2}/tokenizer.json')
    texts = ['The capital of France is', 'def fibonacci(n):',
             'Once upon a time, in a small village by the sea, there lived']
    prompts = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    assert len({len(prompt) for prompt in prompts}) == 3
    batch = model.generate(prompts, 60, temperature=0)
    for prompt, row in zip(prompts, batch):
        assert torch.equal(row, model.generate(torch.tensor([prompt]), 60, temperature=0)[0])
    assert 'Paris' in tokenizer.decode(batch[0].tolist())
