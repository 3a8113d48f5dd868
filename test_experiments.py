"""Small versions of the paper's experiments run and give sane numbers (not a test of the paper's claims)."""

import re

import pytest

from conftest import run_script


def table_rows(out):
    """The body rows of the markdown tables in out, as lists of cells."""
    return [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines()
            if line.startswith('|') and not line.startswith('| ---') and '---' not in line]


def test_position(tmp_path):
    out = run_script('experiments.py', 'position', '--steps=5', cwd=tmp_path).stdout
    rows = table_rows(out)[1:]
    assert len(rows) == 8 and {r[0] for r in rows} == {'rope', 'alibi', 'none', 'learned'}
    assert all(0 <= float(c) <= 100 for r in rows for c in r[2:])


def test_sinks(tmp_path):
    out = run_script('experiments.py', 'sinks', '--steps=5', '--plot=False', cwd=tmp_path).stdout
    by_layer = [r for r in table_rows(out) if r[0].isdigit()]
    assert len(by_layer) == 4
    for layer, first_c, first_s, punct_c, punct_s, pseudo_c, pseudo_s in by_layer:
        assert float(pseudo_c) == 0.0 < float(pseudo_s) < 100  # causal attention has no pseudo mass
        assert all(0 <= float(x) <= 100 for x in (first_c, first_s, punct_c, punct_s))
    names = ['causal', 'stablemask', 'learnable sink token', 'fixed sink token', 'learned sink logit', 'softmax off by one']
    by_model = {r[0]: [float(c) for c in r[1:]] for r in table_rows(out) if r[0] in names}
    assert list(by_model) == names
    for name, (first, sink_token, virtual, punct) in by_model.items():
        assert (sink_token > 0) == ('token' in name) and (virtual > 0) == (name in ('stablemask', 'learned sink logit', 'softmax off by one'))
        assert 0 < first < 100 and 0 < punct < 100
    assert (tmp_path / 'out-experiments' / 'data' / 'pydoc_char' / 'meta.json').exists()


def test_extrapolation(tmp_path):
    out = run_script('experiments.py', 'extrapolation', '--steps=5', '--seeds=1', '--plot=False', cwd=tmp_path).stdout
    rows = [r for r in table_rows(out) if ',' in r[0]]
    assert [r[0] for r in rows] == ['rope, causal', 'rope, stablemask', 'alibi, causal', 'alibi, stablemask']
    for name, full1, full2, full4, window1, window2, window4 in rows:
        assert full1 == window1  # at the training length the window holds everything: the model's own attention
        assert all(0 < float(x) < 10 for x in (full1, full2, full4, window2, window4))


def test_lm(tmp_path, shakespeare_txt):
    out = run_script('experiments.py', 'lm', '--steps=5', '--seeds=2', '--tokenizers=char', '--plot=False',
                     f'--shakespeare={shakespeare_txt}', cwd=tmp_path).stdout
    rows = [r for r in table_rows(out) if r[0] == 'char']
    assert len(rows) == 11 and [r[6] for r in rows[:6]] == ['22.5', '21.6', '22.4', '21.5', '22.2', '21.1']  # the paper's Table 3
    for tokenizer, positions, attention, loss, delta, ppl, paper in rows:
        mean, spread = map(float, re.match(r'([\d.]+) ± ([\d.]+)', loss).groups())
        assert 0 < mean < 5 and spread >= 0  # a loss near log(58) = 4.1 or below
        assert (delta == '+0.000') == (attention == 'causal (pseudo value -inf)')


def test_figures(tmp_path):
    pytest.importorskip('matplotlib')
    run_script('experiments.py', 'sinks', '--steps=2', cwd=tmp_path)
    assert (tmp_path / 'out-experiments' / 'sinks_heads.png').stat().st_size > 10_000


def test_unknown_experiment(tmp_path):
    result = run_script('experiments.py', 'magic', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and 'name an experiment' in result.stderr
