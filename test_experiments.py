"""experiments.py: its statistics on numbers worked by hand, paired arms, repeatable runs, results files
that are never replaced unasked, the README's tables equal to those files, and small runs of every
experiment giving sane numbers (not a test of the paper's claims)."""

import glob
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import experiments
from conftest import REPO, run_script

QUICK = ['--steps=3', '--seeds=2', '--eval_batches=1', '--plot=False']


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    monkeypatch.setattr(experiments, 'device', 'cpu')  # the script resolves its 'auto'; an import keeps it


def table_rows(out):
    """The body rows of the markdown tables in out, as lists of cells."""
    return [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines()
            if line.startswith('|') and '---' not in line]


def results_of(folder, name):
    """The JSON record of a results file, after checking that its markdown shows the same tables."""
    record = json.loads((folder / 'results' / f'{name}.json').read_text())
    assert (folder / 'results' / f'{name}.md').read_text() == experiments.record_markdown(record)
    return record


def test_statistics_on_numbers_worked_by_hand():
    """Sample SD with ddof=1; the paired difference's 95% t-interval; the verdict's words."""
    mean, sd = experiments.mean_sd([1.0, 2.0, 3.0, 4.0])
    # squares about the mean: 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    assert mean == 2.5 and sd == pytest.approx(math.sqrt(5 / 3))
    assert experiments.mean_sd([1.0, 2.0])[1] == pytest.approx(math.sqrt(0.5))  # numpy's std gives 0.5
    # differences 1.0, 0.5, 1.0: mean 5/6, SD sqrt(1/12), standard error 1/6; t(2 df) = 4.303
    diff, low, high = experiments.paired_difference([2.0, 2.5, 3.0], [1.0, 2.0, 2.0])
    assert diff == pytest.approx(5 / 6)
    assert (low, high) == pytest.approx((5 / 6 - 4.303 / 6, 5 / 6 + 4.303 / 6))
    # differences -0.1, +0.3: mean 0.1, SD 0.2 sqrt(2), standard error 0.2; t(1 df) = 12.706
    diff, low, high = experiments.paired_difference([1.9, 2.3], [2.0, 2.0])
    assert (diff, low, high) == pytest.approx((0.1, 0.1 - 2.5412, 0.1 + 2.5412))
    assert experiments.T_975[-1] == 2.042 and len(experiments.T_975) == 30
    assert experiments.verdict(-0.3, -0.1) == 'ahead' and experiments.verdict(0.1, 0.3) == 'behind'
    assert experiments.verdict(-0.1, 0.3) == experiments.verdict(0.0, 0.3) == 'level within noise'
    assert experiments.verdict(0.1, 0.3, below='less', above='more') == 'more'
    with pytest.raises(ValueError, match='two seeds'):
        experiments.paired_difference([1.0], [2.0])


def arms():
    """Every (arm's settings, its baseline's settings) the experiments compare."""
    lm = [(settings, dict(attn_mask='causal')) for _, settings, _ in experiments.LM_VARIANTS]
    sinks = [(settings, dict(attn_mask='causal')) for settings in experiments.SINK_VARIANTS.values()]
    extrapolation = [(settings, experiments.EXTRAPOLATION_ARMS[base][0])
                     for settings, base in experiments.EXTRAPOLATION_ARMS.values() if base]
    position = [(dict(pos_enc=p), dict(pos_enc=p, attn_mask='causal')) for p in experiments.ENCODINGS]
    return lm + sinks + extrapolation + position


@pytest.mark.parametrize('seed', [0, 3])
def test_arms_of_a_seed_share_their_initial_weights(seed):
    """Paired arms: whatever an arm adds (a sink token, sink logits, gates), every parameter it shares
    with its baseline starts at the same value, for any seed; and the seed changes them."""
    config = dict(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32)
    for settings, base_settings in arms():
        arm = dict(experiments.new_model(seed, **config, **settings).named_parameters())
        base = dict(experiments.new_model(seed, **config, **base_settings).named_parameters())
        assert set(base) <= set(arm), settings
        assert all(torch.equal(arm[name], p) for name, p in base.items()), settings
    other = dict(experiments.new_model(seed + 1, **config).named_parameters())
    assert not torch.equal(other['lm_head.weight'], base['lm_head.weight'])


def test_batches_depend_on_the_seed_and_step_only():
    """Paired arms see the same data: a seed's batch at a step is the same whoever asks, and whatever
    the global generator (which model building and dropout draw from) has done."""
    data = torch.arange(1000)
    first = experiments.lm_batches(data, 4, 8, seed=2)(5)
    torch.manual_seed(123)
    torch.rand(10)
    again = experiments.lm_batches(data, 4, 8, seed=2)(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], experiments.lm_batches(data, 4, 8, seed=3)(5)[0])
    assert not torch.equal(first[0], experiments.lm_batches(data, 4, 8, seed=2)(6)[0])


@pytest.mark.slow
def test_position(tmp_path):
    out = run_script('experiments.py', 'position', *QUICK, cwd=tmp_path).stdout
    record = results_of(tmp_path, 'position')
    assert record['seeds'] == [0, 1] and record['steps'] == 3 and record['threads'] == 1
    assert record['wall_s'] > 0 and record['torch'] == torch.__version__
    assert record['command'] == 'python experiments.py position ' + ' '.join(QUICK)
    assert record['commit'] is None or len(record['commit']) == 40
    accuracy, gains = record['tables'][0]['rows'], record['tables'][1]['rows']
    assert len(accuracy) == 8 and {r[0] for r in accuracy} == {'rope', 'alibi', 'none', 'learned'}
    assert all(0 <= float(c.split(' ± ')[0]) <= 100 for r in accuracy for c in r[2:])
    words = ('ahead', 'behind', 'level within noise')
    assert len(gains) == 4 and all(c.endswith(words) for r in gains for c in r[1:])
    assert table_rows(out)[1:9] == accuracy


@pytest.mark.slow
def test_sinks(tmp_path):
    run_script('experiments.py', 'sinks', *QUICK, cwd=tmp_path)
    record = results_of(tmp_path, 'sinks')
    shares = {name: values for name, values in record['values'].items()}
    assert list(shares) == list(experiments.SINK_VARIANTS)
    for name, v in shares.items():
        assert (min(v['sink']) > 0) == ('token' in name)  # only a sink token takes a sink token's share
        # causal attention, and the sink token's and the gate's, have no virtual key (but roundings)
        virtual = name in ('stablemask', 'learned sink logit', 'softmax off by one')
        assert min(v['virtual']) > 0.1 if virtual else max(v['virtual']) < 1e-4
        assert all(0 < x < 100 for x in v['first'] + v['punct']) and all(0 < x < 10 for x in v['loss'])
    by_layer = record['tables'][1]['rows']
    assert [r[0] for r in by_layer] == ['0', '1', '2', '3'] and all(0 < float(r[-1]) < 100 for r in by_layer)
    assert (tmp_path / 'out-experiments' / 'data' / 'pydoc_char' / 'meta.json').exists()


@pytest.mark.slow
def test_extrapolation(tmp_path):
    run_script('experiments.py', 'extrapolation', *QUICK, cwd=tmp_path)
    record = results_of(tmp_path, 'extrapolation')
    rows, diffs = record['tables'][0]['rows'], record['tables'][1]['rows']
    assert [r[0] for r in rows] == list(experiments.EXTRAPOLATION_ARMS)
    for name, full1, full2, full4, window1, window2, window4 in rows:
        # at the training length the window holds everything: the model's own attention
        assert full1 == window1
        assert all(0 < float(x.split(' ± ')[0]) < 10 for x in (full1, full2, full4, window2, window4))
    assert [r[0] for r in diffs] == [f"{arm} - {arm.split(',')[0]}, causal" for arm in
                                     ('rope, StableMask', 'rope, gated attention', 'alibi, StableMask')]


@pytest.mark.slow
def test_quickstart(tmp_path):
    """The README's quickstart as a user runs it, each mask on paired seeds: train.py, then eval.py's
    perplexity at three strides; every cell a mean ± SD, the last row StableMask's paired difference."""
    run_script('experiments.py', 'quickstart', *QUICK, cwd=tmp_path)
    record = results_of(tmp_path, 'quickstart')
    header, rows = record['tables'][0]['header'], record['tables'][0]['rows']
    assert header[1:] == ['loss, stride 128', 'loss, stride 64', 'loss, stride 16',
                          'bits per byte, stride 16']
    assert [r[0] for r in rows] == ['causal', 'stablemask', 'StableMask - causal']
    for row in rows[:2]:
        assert all(0 < float(cell.split(' ± ')[0]) < 10 for cell in row[1:])
    assert all(cell.endswith(('ahead', 'behind', 'level within noise')) for cell in rows[2][1:])
    assert len(record['values']['causal, loss, stride 16']) == 2


@pytest.mark.slow
def test_lm(tmp_path, shakespeare_txt):
    for positions in ('rope', 'alibi'):
        run_script('experiments.py', 'lm', *QUICK, f'--positions={positions}',
                   f'--shakespeare={shakespeare_txt}', cwd=tmp_path)
    rope, alibi = results_of(tmp_path, 'lm_char_rope'), results_of(tmp_path, 'lm_char_alibi')
    rows = rope['tables'][0]['rows']
    # the paper's Table 3 beside its rows
    assert len(rows) == 10 and [r[-1] for r in rows[:6]] == ['22.5', '21.6', '22.4', '21.5', '22.2', '21.1']
    assert len(alibi['tables'][0]['rows'][0]) == len(rows[0]) - 1  # the paper's numbers are RoPE models'
    for attention, loss, ppl, delta, word, paper in rows:
        mean, sd = map(float, loss.split(' ± '))
        assert 0 < mean < 5 and sd >= 0  # a loss near log(58) = 4.1 or below
        assert (delta == '') == (attention == 'causal (pseudo value -inf)')
        assert word in ('', 'ahead', 'behind', 'level within noise')
    keys = {c['key'] for c in rope['comparisons']}
    assert {'StableMask (positional decay) - causal', 'StableMask - learnable sink token'} <= keys


@pytest.mark.slow
def test_a_tiny_experiment_gives_the_same_numbers_twice(tmp_path):
    """Determinism as stated: on one machine, at one thread count, a run's every number comes back."""
    records = []
    for folder in ('a', 'b'):
        (tmp_path / folder).mkdir()
        run_script('experiments.py', 'extrapolation', '--steps=4', '--seeds=2', '--eval_batches=1',
                   '--plot=False', cwd=tmp_path / folder)
        records.append(results_of(tmp_path / folder, 'extrapolation'))
    assert records[0]['values'] == records[1]['values'] and records[0]['tables'] == records[1]['tables']


@pytest.mark.slow
def test_results_are_kept_unless_overwrite(tmp_path, shakespeare_txt):
    """A second run refuses, in one line and before any training, to replace the first's results."""
    (tmp_path / 'results').mkdir()
    (tmp_path / 'results' / 'position.md').write_text('earlier')
    result = run_script('experiments.py', 'position', *QUICK, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and result.stderr.count('\n') == 1 and '--overwrite=True' in result.stderr
    assert (tmp_path / 'results' / 'position.md').read_text() == 'earlier'
    run_script('experiments.py', 'position', *QUICK, '--overwrite=True', cwd=tmp_path)
    assert results_of(tmp_path, 'position')['steps'] == 3


@pytest.mark.parametrize('args,message', [
    (['lm', '--seeds=1'], 'seeds=1: a paired comparison needs two seeds'),
    (['lm', '--threads=0'], 'threads=0: must be >0'), (['lm', '--positions=learned'], 'positions'),
    (['magic'], 'name an experiment')])
def test_bad_settings_get_one_line(tmp_path, args, message):
    result = run_script('experiments.py', *args, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and message in result.stderr and result.stderr.count('\n') == 1


@pytest.mark.slow
def test_readme_command_copies_each_results_table_under_its_marker(tmp_path):
    """`python experiments.py readme`: the verdict from the results' JSON, then each marked block of the
    README made its file's table (a stale one replaced), or the pending line while there is no file."""
    run_script('experiments.py', 'position', *QUICK, cwd=tmp_path)
    stale = '| positions | mask |\n| --- | --- |\n| rope | STALE |'
    readme = (f"# x\n\n<!-- results/position.md#2 -->\n{stale}\n\ntext\n<!-- results/verdict.md -->\n"
              f"{experiments.PENDING}\n\n<!-- results/lm_char_rope.md -->\n{experiments.PENDING}\nend\n")
    (tmp_path / 'README.md').write_text(readme)
    run_script('experiments.py', 'readme', cwd=tmp_path)
    text = (tmp_path / 'README.md').read_text()
    position = (tmp_path / 'results' / 'position.md').read_text()
    gains = experiments.markdown_tables(position)[1]
    assert '\n'.join(gains) in text and 'STALE' not in text
    assert text.endswith(f"{experiments.PENDING}\nend\n")
    verdict = results_of_verdict(tmp_path)
    rows = verdict['tables'][0]['rows']
    assert len(rows) == len(experiments.CLAIMS)
    assert rows[0][3] in ('supported', 'contradicted', 'not seen at this scale')
    assert rows[6][2].startswith('pending') and '\n'.join(experiments.markdown_tables(
        (tmp_path / 'results' / 'verdict.md').read_text())[0]) in text
    run_script('experiments.py', 'readme', cwd=tmp_path)
    assert (tmp_path / 'README.md').read_text() == text  # a second run changes nothing
    (tmp_path / 'README.md').write_text(text.replace('position.md#2', 'position.md#3'))
    result = run_script('experiments.py', 'readme', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and 'marks table 3 of results/position.md, which has 2' in result.stderr
    # a mistyped folder, or a damaged file: one line, and the README's tables stay
    before = (tmp_path / 'README.md').read_text()
    result = run_script('experiments.py', 'readme', '--results_dir=typo', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and 'results_dir=typo is no folder' in result.stderr
    (tmp_path / 'results' / 'position.json').write_text('{"torn')
    result = run_script('experiments.py', 'readme', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and 'results/position.json is not valid JSON' in result.stderr
    assert result.stderr.count('\n') == 1 and (tmp_path / 'README.md').read_text() == before
    assert not (tmp_path / 'typo').exists()


def results_of_verdict(folder):
    record = json.loads((folder / 'results' / 'verdict.json').read_text())
    tables = experiments.markdown_tables((folder / 'results' / 'verdict.md').read_text())
    assert [experiments.table(t['header'], t['rows']).split('\n') for t in record['tables']] == tables
    return record


def test_readme_tables_are_the_results_tables(monkeypatch):
    """Every table of results/ is in README.md under its marker, exactly (the README is what
    `python experiments.py readme` would make of it), and each results file's markdown is its JSON's."""
    monkeypatch.setattr(experiments, 'results_dir', os.path.join(REPO, 'results'))
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    assert experiments.refreshed_readme(readme) == readme, 'a README table differs from its results file: ' \
        'run python experiments.py readme'
    marked = {(name, int(k or 1)) for name, k in experiments.MARKER.findall(readme)}
    names = (r'verdict|position|sinks|sinks_pretrained|extrapolation|quickstart'
             r'|lm_[\w.-]+_(rope|alibi)')
    assert all(re.fullmatch(names, name) for name, _ in marked), \
        'a marker names no results experiments.py writes'
    for path in glob.glob(os.path.join(REPO, 'results', '*.md')):
        name = os.path.basename(path)[:-3]
        with open(path) as f:
            n_tables = len(experiments.markdown_tables(f.read()))
        lacking = {(name, k) for k in range(1, n_tables + 1)} - marked
        assert not lacking, f"results/{name}.md has tables the README lacks: {sorted(lacking)}"
        if name == 'verdict':
            results_of_verdict(Path(REPO))
        else:
            with open(path[:-3] + '.json') as f:
                assert experiments.record_markdown(json.load(f)) == open(path).read()
    assert ('verdict', 1) in marked



@pytest.mark.slow
def test_figures(tmp_path):
    pytest.importorskip('matplotlib')
    run_script('experiments.py', 'sinks', '--steps=2', '--seeds=2', '--eval_batches=1', cwd=tmp_path)
    assert (tmp_path / 'out-experiments' / 'sinks_heads.png').stat().st_size > 10_000
