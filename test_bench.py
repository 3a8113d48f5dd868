"""bench.py runs (on a CPU: the sdpa path, the reference and causal SDPA), and its FlexAttention
StableMask, a comparison on GPUs, computes StableMask."""

import re

import pytest
import torch

from bench import flex_stablemask
from conftest import run_script
from model import alibi_slopes, stablemask_reference


def test_quick_bench_prints_both_tables(tmp_path):
    out = run_script('bench.py', '--quick', cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if re.match(r'\| \d+ \|', line)]
    attention = [r for r in rows if r.count('|') == 9]
    model = [r for r in rows if r.count('|') == 7]
    expected = ['SDPA causal', 'sdpa StableMask (ours)', 'reference StableMask'] if not torch.cuda.is_available() else []
    assert len(attention) >= 6 and len(model) >= 3, out
    for name in expected:
        assert any(name in r for r in attention)
    for row in attention + model:
        cells = [c.strip() for c in row.strip('|').split('|')]
        assert all(cells[i] and cells[i] != 'nan' for i in range(len(cells) - 1)), row
    assert all(r.split('|')[7].strip() == '1.00' for r in attention if 'SDPA causal' in r)  # the baseline against itself


@pytest.mark.filterwarnings('ignore:.*flex_attention called without torch.compile')
def test_flex_stablemask_forward_matches_the_reference(monkeypatch):
    """FlexAttention's backward needs a GPU; its forward runs (eagerly) here. Its block mask is built
    once per length, not inside every timed call."""
    import torch.nn.attention.flex_attention as flex
    built = []
    make = flex.create_block_mask
    monkeypatch.setattr(flex, 'create_block_mask', lambda *a, **kw: built.append(a[3]) or make(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    gamma = alibi_slopes(3)
    attend = flex_stablemask(gamma)
    out = attend(q, k, v)
    ref = stablemask_reference(q.double(), k.double(), v.double(), gamma.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    torch.testing.assert_close(attend(q, k, v), out)
    assert built == [37]
