"""The GPT around the attention: sizes, the three attention paths in a whole model, configuration checks."""

import pytest
import torch

from model import GPT, PRESETS, GPTConfig, swiglu_hidden

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


def test_swiglu_width():
    assert [swiglu_hidden(d) for d in (512, 768, 1024, 2048)] == [1536, 2048, 2816, 5632]


@pytest.mark.parametrize('pos_enc', ['rope', 'alibi', 'learned', 'none'])
@pytest.mark.parametrize('attn_mask,sm_gamma', [('stablemask', None), ('stablemask', 0.0), ('causal', None)])
def test_attention_paths_agree_in_the_model(pos_enc, attn_mask, sm_gamma):
    """The same tiny GPT gives the same logits and gradients with each attention implementation."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_enc=pos_enc, attn_mask=attn_mask, sm_gamma=sm_gamma)).to(DEVICE)
    idx = torch.randint(0, 97, (2, 37), device=DEVICE)
    results = {}
    for impl in ('reference', 'sdpa', 'triton'):
        for block in model.transformer.h:
            block.attn.impl = impl
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        results[impl] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    ref_logits, ref_grads = results['reference']
    for impl in ('sdpa', 'triton'):
        logits, grads = results[impl]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-3, atol=1e-6)


def test_stablemask_changes_the_model_and_adds_no_parameters():
    torch.manual_seed(0)
    causal = GPT(tiny(attn_mask='causal', n_layer=1))
    stable = GPT(tiny(n_layer=1))
    stable.load_state_dict(causal.state_dict())  # parameter-free: the same weights fit both
    idx = torch.randint(0, 97, (1, 20))
    a, _ = causal(idx, targets=idx)
    b, _ = stable(idx, targets=idx)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a[:, -1], b[:, -1])  # in one layer the last row has no pseudo mass: plain causal


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
