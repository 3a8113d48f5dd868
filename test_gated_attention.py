"""Gated attention (Qiu et al., NeurIPS 2025; Qwen3-Next): the layer against its formula in float64 on
every attention path, its gradients, its documented start, and the model around it (paths, cache)."""

import pytest
import torch

from checkpoint import model_from_checkpoint
from model import (GPT, CausalSelfAttention, FixedKVCache, GPTConfig, KVCache, Pass, rope_cos_sin,
                   stablemask_reference)
from test_model import every_path_agrees, tiny

# masks, position encodings and sinks the gate is combined with in the layer tests
LAYER_VARIANTS = [dict(pos_enc='rope'), dict(pos_enc='alibi', attn_mask='causal'),
                  dict(pos_enc='none', sink_logit='learned', n_kv_head=2),
                  dict(pos_enc='alibi', sm_gamma=0.0, sm_offset=-2.0, bias=True)]


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gated_layer(impl, seed=0, **variant):
    """A gated attention layer (n_embd 64, 4 heads of 16) whose parameters are all random and far
    from their start (the gate's weights included: zeros would hide a gate read from the wrong x)."""
    layer = CausalSelfAttention(tiny(attn_gate='elementwise', attn_impl=impl, **variant), 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


def gated_attention_formula(x, params, layer, rope):
    """The layer written plainly in float64 from its parameters {name: tensor}: q, k, v = x W_attn^T
    (+ b), RoPE's rotate-half on q and k, O = W V (Eq. 11, stablemask_reference), then
    c_proj(O * sigmoid(x W_gate^T + b_gate)), O's heads side by side."""
    B, T, _ = x.shape
    H, H_kv, D = layer.n_head, layer.n_kv_head, layer.head_dim
    linear = lambda t, weight, bias: t @ params[weight].T + (params[bias] if bias in params else 0)
    q, k, v = linear(x, 'c_attn.weight', 'c_attn.bias').split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
    if rope is not None:
        cos, sin = (torch.cat((t, t), -1).double() for t in rope)
        rotate_half = lambda t: torch.cat((-t[..., D // 2:], t[..., :D // 2]), -1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    double = lambda t: None if t is None else t.double()
    sink = params['sink'] if 'sink' in params else double(layer.sink)
    out = stablemask_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), double(layer.gamma),
                               double(layer.alibi), offset=layer.offset, sink=sink)
    out = out.transpose(1, 2).reshape(B, T, H * D)
    gate = torch.sigmoid(linear(x, 'gate_weight', 'gate_bias'))
    return linear(out * gate, 'c_proj.weight', 'c_proj.bias')


@pytest.mark.parametrize('variant', LAYER_VARIANTS)
@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'triton'])
def test_gated_layer_equals_its_formula_in_float64(poisoned, impl, variant):
    """Output, and the gradients of x and of every parameter (the gate's included), of the float32
    layer on each attention path against float64 autograd through the plain formula."""
    layer = gated_layer(impl, **variant)
    g = torch.Generator().manual_seed(1)
    x, dy = (torch.randn(2, 37, 64, generator=g) for _ in range(2))
    rope = rope_cos_sin(torch.arange(37), 16, 10000.0) if variant['pos_enc'] == 'rope' else None
    x = x.requires_grad_()
    out = layer(x, Pass(rope=rope))
    grads = torch.autograd.grad(out, [x, *layer.parameters()], dy)
    x64 = x.detach().double().requires_grad_()
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    expected = gated_attention_formula(x64, params, layer, rope)
    expected_grads = torch.autograd.grad(expected, [x64, *params.values()], dy.double())
    assert relative_error(out, expected) < 1e-5
    for name, grad, ref in zip(['x', *params], grads, expected_grads):
        assert torch.isfinite(grad).all() and relative_error(grad, ref) < 1e-5, name
    assert 'gate_weight' in params


@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'triton'])
def test_a_gate_at_its_start_halves_the_ungated_layer_exactly(impl):
    """As documented (CausalSelfAttention): the gate's weights start at zero, so every gate is
    sigmoid(0) = 0.5 and the layer's output is exactly half its ungated twin's; the twin, built from
    the same seed, has every common parameter's initial value (the gate draws nothing)."""
    torch.manual_seed(0)
    gated = CausalSelfAttention(tiny(attn_gate='elementwise', attn_impl=impl), 0)
    torch.manual_seed(0)
    plain = CausalSelfAttention(tiny(attn_impl=impl), 0)
    common = dict(plain.named_parameters())
    assert set(dict(gated.named_parameters())) - set(common) == {'gate_weight'}
    assert all(torch.equal(p, common[n]) for n, p in gated.named_parameters() if n in common)
    assert not gated.gate_weight.any()
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    rope = rope_cos_sin(torch.arange(37), 16, 10000.0)
    with torch.no_grad():
        assert torch.equal(gated(x, Pass(rope=rope)), 0.5 * plain(x, Pass(rope=rope)))


def test_a_bias_only_gate_scales_each_channel_by_a_constant():
    """With bias=True the gate has a bias, zero at the start; with the weights at zero it is a constant
    sigmoid(b) per head and channel, whatever the input: the ungated layer with c_proj's columns
    scaled by it (what Qiu et al. find weaker than a gate read from x)."""
    torch.manual_seed(0)
    gated = CausalSelfAttention(tiny(attn_gate='elementwise', bias=True, attn_impl='sdpa'), 0)
    assert not gated.gate_bias.any()
    b = torch.randn(64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gated.gate_bias.copy_(b)
    twin = CausalSelfAttention(tiny(bias=True, attn_impl='sdpa'), 0)
    twin.load_state_dict({n: t for n, t in gated.state_dict().items() if not n.startswith('gate_')})
    with torch.no_grad():
        twin.c_proj.weight.mul_(torch.sigmoid(b))
        x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(gated(x, Pass()), twin(x, Pass()), rtol=1e-5, atol=1e-6)


def random_gates(model, seed=0):
    """The model with random gate weights (from zero, a gate would be the constant 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.gate_weight.copy_(torch.randn(block.attn.gate_weight.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize('variant', [dict(pos_enc='rope'), dict(pos_enc='alibi', attn_mask='causal'),
                                     dict(pos_enc='learned', sink_token='learned', sink_logit='learned'),
                                     dict(pos_enc='none', n_kv_head=2)])
def test_gated_model_paths_agree_and_its_checkpoint_loads(variant):
    """A gated GPT gives the same logits and gradients on every attention path, every gate gets a
    gradient, and a checkpoint of it loads back to the same logits."""
    torch.manual_seed(0)
    model = random_gates(GPT(tiny(attn_gate='elementwise', **variant)))
    idx = torch.randint(0, 97, (2, 37))
    results = every_path_agrees(model, idx)
    gates = [g for n, g in results['reference'][1].items() if n.endswith('gate_weight')]
    assert len(gates) == 2 and all(g.abs().sum() > 0 for g in gates)
    reloaded = model_from_checkpoint(dict(model=model.state_dict(), model_args=vars(model.config)))
    torch.testing.assert_close(reloaded(idx, targets=idx)[0], results['sdpa'][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('pos_enc', ['rope', 'alibi'])
@pytest.mark.parametrize('impl', ['reference', 'sdpa', 'fixed'])
def test_gated_cached_steps_equal_a_full_forward(pos_enc, impl):
    """Each decode step gates its new token from that token's own x: the cached steps' logits are the
    rows of one forward pass over the whole sequence, past block_size too."""
    torch.manual_seed(0)
    Cache, impl = (FixedKVCache, 'sdpa') if impl == 'fixed' else (KVCache, impl)
    config = tiny(pos_enc=pos_enc, block_size=32, attn_impl=impl, attn_gate='elementwise')
    model = random_gates(GPT(config)).eval()
    idx = torch.randint(0, 97, (2, 45))
    cache = Cache(model.config.n_layer, 45)
    with torch.no_grad():
        steps = [model(idx[:, :10], pseudo_len=32, kv_cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], pseudo_len=32, kv_cache=cache)[0] for t in range(10, 45)]
        full = model(idx, targets=idx, pseudo_len=32)[0]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('sliding_window', [True, False])
@pytest.mark.parametrize('variant', [dict(pos_enc='rope'), dict(pos_enc='alibi', attn_mask='causal'),
                                     dict(pos_enc='rope', sink_token='learned')])
def test_gated_generation_is_the_same_with_and_without_a_cache(variant, sliding_window):
    """Greedy tokens past block_size: both caches give the tokens of generation without one."""
    torch.manual_seed(0)
    model = random_gates(GPT(tiny(block_size=24, attn_impl='sdpa', attn_gate='elementwise', **variant)))
    model.eval()
    idx = torch.randint(0, 97, (2, 5))
    generate = lambda cache: model.generate(idx, 60, temperature=0, use_cache=cache,
                                            sliding_window=sliding_window)
    uncached = generate(False)
    assert torch.equal(generate(True), uncached) and torch.equal(generate('fixed'), uncached)


def test_config_refuses_an_unknown_gate():
    with pytest.raises(ValueError, match='attn_gate'):
        GPTConfig(attn_gate='headwise')
