"""The pipeline as a user runs it: prepare_data.py, train.py (one process and torchrun), sample.py."""

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from configurator import configure
from checkpoint import load_checkpoint, model_from_checkpoint
from model import PRESETS
from tokenizer import tokenizer_from_meta

# on the CPU wherever runs are compared number for number (on a GPU, autotuning and bf16 may differ
# between two processes); test_gpu.py trains on the GPU
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_iters=4',
        '--log_interval=5', '--warmup_iters=5', '--learning_rate=3e-3', '--min_lr=3e-4', '--device=cpu']


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def decode(meta, ids):
    return tokenizer_from_meta(meta)[1]([int(i) for i in ids])


def load_tokens(folder):
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    splits = [np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=meta['dtype']) for s in ('train', 'val')]
    return meta, np.concatenate(splits)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A scratch folder holding the offline default dataset, data/pydoc_char."""
    folder = tmp_path_factory.mktemp('work')
    run_script('prepare_data.py', '--tokenizer=char', cwd=folder)
    return folder

@pytest.fixture(scope='module')
def trained(workdir):
    """out-a: a tiny model trained for 80 steps on the offline default."""
    run_script('train.py', *TINY, '--max_iters=80', '--eval_interval=40', '--out_dir=out-a', cwd=workdir)
    return workdir / 'out-a'

# ---------------------------------------------------------------------------------------------------
# train.py and sample.py


@pytest.mark.slow
def test_train_loss_falls_then_sample(workdir, trained):
    log = read_log(trained)
    val = [r['val_loss'] for r in log if 'val_loss' in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val
    steps = [r for r in log if 'loss' in r]
    # no MFU on a CPU
    assert steps[-1]['iter'] == 80 and steps[-1]['tokens_per_sec'] > 0 and steps[-1]['mfu'] is None
    ckpt = load_checkpoint(str(workdir / 'out-a'))
    assert ckpt['iter_num'] == 80 and ckpt['meta']['tokenizer'] == 'char'

    out = run_script('sample.py', '--init_from=out-a', '--start=The ', '--num_samples=2',
                     '--max_new_tokens=40', cwd=workdir).stdout
    samples = out.split('---------------\n')
    assert len(samples) == 3 and all(s.startswith('The ') and len(s) > 40 for s in samples[:2])
    greedy = ['--init_from=out-a/ckpt.pt', '--start=The ', '--num_samples=1', '--max_new_tokens=60',
              '--temperature=0', '--device=cpu']
    cached = run_script('sample.py', *greedy, cwd=workdir).stdout
    assert cached == run_script('sample.py', *greedy, '--use_cache=False', cwd=workdir).stdout
    # the fixed-shape cache, compiled
    assert cached == run_script('sample.py', *greedy, '--compile=True', cwd=workdir).stdout


def test_prompt_from_file_and_bad_prompts(workdir, trained):
    (workdir / 'prompt.txt').write_text('def ')
    out = run_script('sample.py', '--init_from=out-a', '--start=FILE:prompt.txt', '--num_samples=1',
                     '--max_new_tokens=5', cwd=workdir).stdout
    assert out.startswith('def ')
    for start, message in (('FILE:nope.txt', 'cannot read the prompt'), ('\u4e2d', 'not in the vocabulary'),
                           ('', 'empty')):
        result = run_script('sample.py', '--init_from=out-a', f'--start={start}',
                            cwd=workdir, expect_ok=False)
        assert result.returncode == 1 and message in result.stderr


@pytest.mark.slow
def test_prompts_of_any_length_sample_as_one_batch(workdir, trained, tmp_path):
    """--prompts=FILE: one prompt a line (empty lines skipped), all decoded as one batch, left-padded;
    each sample is written after its own prompt, and greedy it is what its prompt gives alone, past
    block_size too. The weights are random: the tiny trained model's greedy text is spaces only, where
    random weights tell the prompts and their positions apart. A file that cannot be read, that holds
    no prompt, or a line the tokenizer cannot take is one line."""
    checkpoint = torch.load(trained / 'ckpt.pt', weights_only=True)
    g = torch.Generator().manual_seed(0)
    checkpoint['model'] = {name: torch.randn(t.shape, generator=g) * (0.3 if t.dim() > 1 else 1.0)
                           for name, t in checkpoint['model'].items()}
    out = tmp_path / 'out-random'
    out.mkdir()
    torch.save(checkpoint, out / 'ckpt.pt')
    lines = ['The ', 'def f(x):', 'class Point:']
    (tmp_path / 'prompts.txt').write_text(f'{lines[0]}\n\n{lines[1]}\n{lines[2]}\n')
    greedy = [f'--init_from={out}', '--temperature=0', '--max_new_tokens=40', '--device=cpu']
    batch = run_script('sample.py', *greedy, f'--prompts={tmp_path / "prompts.txt"}', '--num_samples=2',
                       cwd=workdir).stdout
    alone = [run_script('sample.py', *greedy, f'--start={line}', '--num_samples=1', cwd=workdir).stdout
             for line in lines]
    assert batch == ''.join(text for text in alone for _ in range(2))
    assert all(text.startswith(line) and len(text) > len(line) + 40 for text, line in zip(alone, lines))
    assert len({text[len(line):] for text, line in zip(alone, lines)}) == 3
    (tmp_path / 'empty.txt').write_text('\n\n')
    (tmp_path / 'foreign.txt').write_text('The \n\u4e2d\n')
    for name, message in (('nope.txt', 'cannot read the prompts file'), ('empty.txt', 'holds no prompt'),
                          ('foreign.txt', f'line 2 of {tmp_path / "foreign.txt"}: ')):
        result = run_script('sample.py', f'--init_from={out}', f'--prompts={tmp_path / name}', cwd=workdir,
                            expect_ok=False)
        assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
        assert message in result.stderr and result.stdout == ''


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(workdir):
    """A run stopped by SIGTERM and resumed ends exactly where an uninterrupted one does (dropout on:
    the RNG state travels in the checkpoint; batches depend only on the step)."""
    args = [*TINY, '--dropout=0.1', '--max_iters=300', '--eval_interval=100']
    run_script('train.py', *args, '--out_dir=out-full', cwd=workdir)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *args, '--out_dir=out-part'],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = workdir / 'out-part' / 'log.jsonl'
    deadline = time.time() + 120
    while not (log_path.exists() and any(json.loads(line).get('iter', 0) >= 20
                                         for line in log_path.read_text().splitlines())):
        assert proc.poll() is None and time.time() < deadline, 'the run ended before it could be stopped'
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # stopped, not finished
    assert 'stopped by a signal' in stdout
    stopped_at = load_checkpoint(str(workdir / 'out-part'))['iter_num']
    assert 20 <= stopped_at < 300
    run_script('train.py', *args, '--out_dir=out-part', '--init_from=resume', cwd=workdir)
    full, part = read_log(workdir / 'out-full'), read_log(workdir / 'out-part')
    after_stop = lambda log: [(r['iter'], r.get('loss'), r.get('val_loss'))
                              for r in log if r['iter'] > stopped_at]
    assert after_stop(full) == after_stop(part) and after_stop(full)[-1][0] == 300


@pytest.mark.slow
def test_torchrun_two_processes_follow_one(workdir):
    """Two processes with gloo, each accumulating half, see the same batches as one process doing all of
    it, so the loss curves agree (to float summation order)."""
    args = [*TINY, '--max_iters=30', '--eval_interval=15', '--gradient_accumulation_steps=4']
    run_script('train.py', *args, '--out_dir=out-one', cwd=workdir)
    result = run_script('train.py', *args, '--out_dir=out-ddp', cwd=workdir, torchrun=2)
    assert '2 process(es)' in result.stdout
    one, two = read_log(workdir / 'out-one'), read_log(workdir / 'out-ddp')
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for key in ('loss', 'val_loss', 'train_loss'):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a, b)


@pytest.mark.slow
def test_finetune_causal_model_as_stablemask(workdir, tmp_path):
    run_script('train.py', *TINY, '--attn_mask=causal', '--max_iters=30', '--eval_interval=30',
               '--out_dir=out-causal', cwd=workdir)
    result = run_script('train.py', '--init_from=out-causal', '--attn_mask=stablemask', '--max_iters=20',
                        '--eval_interval=10', '--eval_iters=4', '--batch_size=8',
                        '--out_dir=out-ft', cwd=workdir)
    # the model loaded, not the defaults
    assert 'fine-tuning out-causal' in result.stdout and '2 layers' in result.stdout
    ckpt = load_checkpoint(str(workdir / 'out-ft'))
    # the mask given here, the layers the checkpoint's
    assert ckpt['model_args']['attn_mask'] == 'stablemask' and ckpt['model_args']['n_layer'] == 2
    # not given: the checkpoint's, not 256
    assert ckpt['model_args']['block_size'] == 32 == ckpt['config']['block_size']
    assert ckpt['iter_num'] == 20  # a fresh schedule
    # an architecture given that is not the checkpoint's is refused, not ignored
    result = run_script('train.py', '--init_from=out-causal', '--n_layer=7', '--out_dir=out-ft7',
                        cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and "n_layer=7, but out-causal/ckpt.pt has n_layer=2" in result.stderr
    assert not (workdir / 'out-ft7').exists()
    # another character table cannot continue this model
    (workdir / 'other.txt').write_text('xyz' * 500)
    run_script('prepare_data.py', '--input', 'other.txt', '--val_input', 'other.txt',
               '--tokenizer=char', cwd=workdir)
    result = run_script('train.py', '--init_from=out-causal', '--dataset=other_char', *TINY,
                        cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and result.stderr.count('\n') == 1
    assert ('the character tables of out-causal/ckpt.pt (103 characters) and data/other_char (4) differ'
            in result.stderr)


@pytest.mark.slow
def test_mask_warmup_starts_from_the_causal_model(workdir):
    """A causal model fine-tuned into StableMask with mask_warmup_iters starts at the causal model's
    loss (its pseudo mass starts at none); switched at once, the loss jumps."""
    run_script('train.py', *TINY, '--attn_mask=causal', '--max_iters=60', '--eval_interval=60',
               '--out_dir=out-warm-src', cwd=workdir)
    first_val = lambda out: next(r['val_loss'] for r in read_log(workdir / out) if 'val_loss' in r)
    losses = {}
    for name, extra in (('causal', ['--attn_mask=causal']), ('warm', ['--mask_warmup_iters=20']),
                        ('abrupt', [])):
        run_script('train.py', '--init_from=out-warm-src',
                   '--attn_mask=stablemask' if name != 'causal' else '--attn_mask=causal',
                   *extra, '--max_iters=20', '--eval_interval=20', '--eval_iters=4', '--batch_size=8',
                   '--learning_rate=1e-3', f'--out_dir=out-warm-{name}', cwd=workdir)
        losses[name] = first_val(f'out-warm-{name}')
    assert abs(losses['warm'] - losses['causal']) < 1e-4, losses
    assert abs(losses['abrupt'] - losses['causal']) > 1e-3, losses
    # the warm-up is the run's, not the model's
    assert load_checkpoint(str(workdir / 'out-warm-warm'))['model_args']['sm_offset'] == 0.0


@pytest.mark.parametrize('args,message', [
    (['--bogus=1'], "unknown config key 'bogus'"),
    (['--mask_warmup_iters=10', '--attn_mask=causal'],
     "mask_warmup_iters=10 grows StableMask's pseudo mass"),
    (['--batch_size=1.5'], 'batch_size=1.5: expected an integer'),
    (['--batch_size=0'], 'batch_size=0: must be >0'),
    (['--dropout=1'], 'dropout=1.0: must be >=0 and <1'),
    (['--compile=yes'], 'expected True or False'),
    (['--lr_schedule=step'], 'lr_schedule'),
    (['--attn_mask=sink'], 'attn_mask'),
    (['--device=cuda:99'], "device='cuda:99' is not usable here"),
    # refused before the data is read
    (['--n_head=4', '--n_kv_head=3', '--dataset=nothing'], 'n_head=4 is not a multiple of n_kv_head=3'),
    (['--dataset=nothing'], 'no dataset at data/nothing'),
    (['--block_size=100000'], 'too few for block_size'),
    (['bad_config.py'], "unknown config key 'learning_rat' (in bad_config.py)"),
    (['syntax_config.py'], "config file syntax_config.py, line 2: '(' was never closed"),
    (['raising_config.py'], 'config file raising_config.py, line 1: ZeroDivisionError: division by zero'),
    (['zero_config.py'], 'eval_iters=0: must be >0'),
    (['missing_config.py'], 'cannot read config file'),
    (['--init_from=resume', '--out_dir=nowhere'], 'no checkpoint at nowhere'),
])
def test_train_bad_input(tmp_path, args, message):
    (tmp_path / 'bad_config.py').write_text('learning_rat = 1e-3\n')
    (tmp_path / 'syntax_config.py').write_text('batch_size = 4\nn_layer = (\n')
    (tmp_path / 'raising_config.py').write_text('batch_size = 1 / 0\n')
    (tmp_path / 'zero_config.py').write_text('eval_iters = 0\n')
    data = tmp_path / 'data' / 'pydoc_char'
    data.mkdir(parents=True)
    (data / 'meta.json').write_text(json.dumps(dict(tokenizer='char', chars=['a', 'b'], vocab_size=2,
                                                    dtype='uint16', train_tokens=200, val_tokens=200)))
    for split in ('train', 'val'):
        np.zeros(200, np.uint16).tofile(data / f'{split}.bin')
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_script('train.py', *args, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
    assert message in result.stderr
    if 'known keys: ' in result.stderr:  # the settings only, not the process's own values
        assert not ({'rank', 'world_size', 'ddp', 'master'}
                    & set(result.stderr.split('known keys: ')[1].strip().split(', ')))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'eval.py', 'export_hf.py', 'bench.py'])
def test_constants_are_not_settings(tmp_path, script):
    """A script's UPPER_CASE names (its own constants, or imported ones such as GPT2_EOT) are neither
    settable nor listed among the known keys."""
    result = run_script(script, '--bogus=1', cwd=tmp_path, expect_ok=False)
    keys = result.stderr.split('known keys: ')[1].strip().split(', ')
    assert result.returncode == 1 and ('init_from' in keys or 'quick' in keys), result.stderr
    assert not [k for k in keys if k.isupper()], keys


@pytest.mark.parametrize('args,message', [
    (['--top_k=0'], 'top_k=0: must be >0'),
    (['--temperature=-1'], 'temperature=-1.0: must be >=0'),
    (['--max_new_tokens=-5'], 'max_new_tokens=-5: must be >=0'),
    (['--top_p=1.5'], 'top_p=1.5: must be >0 and <=1'),
    (['--num_samples=0'], 'num_samples=0: must be >0'),
    (['--device=cuda:99'], "device='cuda:99' is not usable here"),
    (['--chat=True'], "--chat=True formats the prompt with a Hugging Face model's chat template; "
                      "this model's tokenizer is char"),
])
def test_sample_bad_input(workdir, trained, args, message):
    result = run_script('sample.py', '--init_from=out-a', *args, cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
    assert message in result.stderr and result.stdout == ''


@pytest.mark.parametrize('damage,message', [
    ('unknown key', 'its model_args hold settings this version does not know: n_expert'),
    ('wrong shape', 'its tensors do not fit its model_args: transformer.wte.weight is (103, 32), '
                    'the model needs (50, 32)'),
    ('missing tensor', 'its tensors do not fit its model_args: missing lm_head.weight'),
])
def test_checkpoint_that_does_not_fit_is_refused(workdir, trained, tmp_path, damage, message):
    ckpt = torch.load(trained / 'ckpt.pt', weights_only=True)
    if damage == 'unknown key':
        ckpt['model_args']['n_expert'] = 8
    elif damage == 'wrong shape':
        ckpt['model_args']['vocab_size'] = 50
    else:
        del ckpt['model']['lm_head.weight']
    out = tmp_path / 'out-damaged'
    out.mkdir()
    torch.save(ckpt, out / 'ckpt.pt')
    for script, args in (('train.py', ['--init_from=resume', f'--out_dir={out}']),
                         ('sample.py', [f'--init_from={out}'])):
        result = run_script(script, *args, cwd=workdir, expect_ok=False)
        assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
        assert f'{out}/ckpt.pt: {message}' in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ['ckpt.pt']


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'bench.py', 'experiments.py',
                                    'prepare_data.py', 'gpu_check.py', 'eval.py'])
def test_help_lists_every_setting(tmp_path, script):
    """-h and --help print the settings block at the top of the script: each default and its comment."""
    for flag in ('--help', '-h'):
        result = run_script(script, flag, cwd=tmp_path)
        assert result.returncode == 0 and not list(tmp_path.iterdir())
    # a reader that stops early is no error
    head = subprocess.run(f"{sys.executable} {os.path.join(REPO, script)} --help | head -1", shell=True,
                          cwd=tmp_path, capture_output=True, text=True)
    assert head.returncode == 0 and 'Traceback' not in head.stderr and head.stdout.strip()
    if script == 'prepare_data.py':  # argparse's own help
        assert '--tokenizer' in result.stdout and '--val_fraction' in result.stdout
        return
    source = open(os.path.join(REPO, script)).read().split('# ' + '-' * 77)[1]
    settings = [line for line in source.splitlines() if line and not line.startswith('#')]
    assert len(settings) >= 5
    for line in settings:
        key, _, rest = line.partition(' = ')
        value, _, comment = rest.partition('  # ')
        assert f"--{key}={value}" in result.stdout, key
        assert comment.strip() in result.stdout


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'foreign', 'malicious'])
def test_damaged_checkpoint_is_refused_and_kept(workdir, trained, damage):
    out = workdir / f'out-{damage}'
    out.mkdir()
    good = (trained / 'ckpt.pt').read_bytes()
    path = out / 'ckpt.pt'
    if damage == 'truncated':
        path.write_bytes(good[:len(good) // 2])
    elif damage == 'garbage':
        path.write_bytes(os.urandom(5000))
    elif damage == 'foreign':
        torch.save({'weights': torch.zeros(3)}, path)
    else:  # a pickle that would run code when loaded without weights_only
        path.write_bytes(pickle.dumps(Exploit()))
    before = path.read_bytes()
    for script, args in (('train.py', ['--init_from=resume', f'--out_dir={out.name}']),
                         ('sample.py', [f'--init_from={out.name}'])):
        result = run_script(script, *args, cwd=workdir, expect_ok=False)
        assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
        assert 'ckpt.pt is ' in result.stderr
    assert path.read_bytes() == before  # nothing lost
    assert not (workdir / 'pwned').exists()


class Exploit:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_checkpoint_of_a_compiled_model_loads(workdir, trained, tmp_path):
    ckpt = torch.load(trained / 'ckpt.pt', weights_only=True)
    ckpt['model'] = {f'_orig_mod.{k}': v for k, v in ckpt['model'].items()}  # how torch.compile names them
    torch.save(ckpt, tmp_path / 'compiled.pt')
    out = run_script('sample.py', f'--init_from={tmp_path / "compiled.pt"}', '--num_samples=1',
                     '--max_new_tokens=5', cwd=workdir)
    assert out.stdout.endswith('---------------\n')


def train_defaults():
    """train.py's settings, read from its source (running it would start training)."""
    tree = ast.parse(open(os.path.join(REPO, 'train.py')).read())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)}


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(REPO, 'config'))))
def test_config_files(name):
    config = configure(train_defaults(), [os.path.join(REPO, 'config', name)])
    sizes = {k: config[k] for k in ('n_layer', 'n_head', 'n_embd')}
    preset = (open(os.path.join(REPO, 'config', name)).read()
              .partition("model.PRESETS['")[2].partition("'")[0])
    if preset:
        assert sizes == PRESETS[preset]


def test_configurator():
    defaults = dict(a=1, b=0.5, c='x', d=True, e=None)
    assert (configure(defaults, ['--a=2', '--b=3', '--c=y', '--d=False', '--e=0.1'])
            == dict(a=2, b=3.0, c='y', d=False, e=0.1))
    assert configure(defaults, ['--a=None'], nullable=('a',))['a'] is None
    assert configure(dict(quick=False), ['--quick'])['quick'] is True
    for bad in ('--a=x', '--a=True', '--b=x', '--d=1', '--e=x', '--f=1', '--a'):
        with pytest.raises(ValueError):
            configure(defaults, [bad])

# ---------------------------------------------------------------------------------------------------
# a newcomer's first hour: resume, overwrite, kill -9, torchrun, samples past block_size


def log_rows(out_dir):
    """The log without its timings, which differ between runs."""
    return [{k: v for k, v in r.items() if k not in ('tokens_per_sec', 'mfu')} for r in read_log(out_dir)]


@pytest.mark.slow
def test_resume_restores_the_run_and_extends_it(workdir):
    """--init_from=resume with nothing but out_dir and a longer max_iters continues the run with the
    settings it was started with (here a learned-position model of block_size 32 and a constant
    schedule): the same log as one run of the longer length."""
    args = [*TINY, '--pos_enc=learned', '--lr_schedule=constant', '--eval_interval=20', '--dropout=0.1']
    run_script('train.py', *args, '--max_iters=60', '--out_dir=out-long', cwd=workdir)
    run_script('train.py', *args, '--max_iters=40', '--out_dir=out-short', cwd=workdir)
    result = run_script('train.py', '--init_from=resume', '--out_dir=out-short',
                        '--max_iters=60', cwd=workdir)
    assert 'resuming out-short at step 40; changed: max_iters 40 -> 60' in result.stdout
    # the start-up line describes the model loaded
    assert 'learned positions, block_size 32' in result.stdout
    assert log_rows(workdir / 'out-short') == log_rows(workdir / 'out-long')
    config = load_checkpoint(str(workdir / 'out-short'))['config']
    assert ({**config, 'out_dir': 'out-long', 'init_from': 'scratch'}
            == load_checkpoint(str(workdir / 'out-long'))['config'])

    # data of another vocabulary is refused, naming both, and the run is left as it was
    before = (workdir / 'out-short' / 'ckpt.pt').read_bytes()
    (workdir / 'abc.txt').write_text('abc ' * 500)
    run_script('prepare_data.py', '--input', 'abc.txt', '--val_input', 'abc.txt',
               '--tokenizer=char', cwd=workdir)
    result = run_script('train.py', '--init_from=resume', '--out_dir=out-short', '--dataset=abc_char',
                        '--max_iters=70', cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
    assert ('the character tables of out-short/ckpt.pt (103 characters) and data/abc_char (5) differ'
            in result.stderr)
    assert (workdir / 'out-short' / 'ckpt.pt').read_bytes() == before
    # the architecture cannot change on resume
    result = run_script('train.py', '--init_from=resume', '--out_dir=out-short', '--n_embd=64',
                        cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and 'n_embd=64, but out-short/ckpt.pt has n_embd=32' in result.stderr


@pytest.mark.slow
def test_a_new_run_does_not_replace_an_old_one(workdir, trained, tmp_path):
    out = tmp_path / 'out-old'
    out.mkdir()
    for name in ('ckpt.pt', 'log.jsonl'):
        (out / name).write_bytes((trained / name).read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for start in ([], [f'--init_from={trained}']):  # from scratch, and a fine-tune
        result = run_script('train.py', *TINY, *start, f'--out_dir={out}', '--max_iters=5',
                            cwd=workdir, expect_ok=False)
        assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
        assert (f'{out} holds a run already: continue it with --init_from=resume' in result.stderr
                and '--overwrite=True' in result.stderr)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = run_script('train.py', f'--init_from={trained}', f'--out_dir={trained}', '--overwrite=True',
                        cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and 'is the checkpoint this run would write' in result.stderr
    # asked for, it replaces the run and starts a fresh log
    run_script('train.py', *TINY, f'--out_dir={out}', '--max_iters=5', '--eval_interval=5',
               '--overwrite=True', cwd=workdir)
    assert [r['iter'] for r in read_log(out)] == [0, 5, 5]
    assert load_checkpoint(str(out))['iter_num'] == 5
    result = run_script('train.py', '--init_from=resume', f'--out_dir={out}', '--overwrite=True',
                        cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and 'does not go with init_from=resume' in result.stderr


def test_kill_9_then_resume_leaves_nothing_stale(workdir):
    """kill -9 loses the steps since the last checkpoint, nothing more: the next run in out_dir removes
    temporary checkpoints of processes that are gone, and drops the log rows it is about to redo."""
    # killed at step 105 or later, well before the save at 200: a loaded machine's late poll still kills
    # between two saves (with saves 20 steps apart, a kill at 55 once came after the save at 60)
    args = [*TINY, '--max_iters=400', '--eval_interval=100', '--out_dir=out-killed']
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *args], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = workdir / 'out-killed' / 'log.jsonl'
    deadline = time.time() + 120
    while not (log_path.exists() and any(json.loads(line).get('iter', 0) >= 105
                                         for line in log_path.read_text().splitlines())):
        assert proc.poll() is None and time.time() < deadline, 'the run ended before it could be killed'
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    saved = load_checkpoint(str(workdir / 'out-killed'))['iter_num']
    assert saved < max(r['iter'] for r in read_log(workdir / 'out-killed'))  # rows past the checkpoint
    gone = subprocess.run(['true']).args and subprocess.Popen(['true'])
    gone.wait()
    stale, live = (workdir / 'out-killed' / f'ckpt.pt.tmp{gone.pid}',
                   workdir / 'out-killed' / f'ckpt.pt.tmp{os.getpid()}')
    stale.write_bytes(b'half a checkpoint')
    live.write_bytes(b'another process is saving this one')
    run_script('train.py', '--init_from=resume', '--out_dir=out-killed', '--max_iters=200', cwd=workdir)
    assert not stale.exists() and live.exists()
    live.unlink()
    rows = read_log(workdir / 'out-killed')
    for kind in ('loss', 'val_loss'):
        steps = [r['iter'] for r in rows if kind in r]
        assert steps == sorted(set(steps)) and steps[-1] == 200, steps  # no step twice


@pytest.mark.slow
def test_past_block_size_the_model_predicts_as_well_as_within_it(workdir):
    """Past block_size, generation attends to the last block_size tokens (a KV cache that drops its
    oldest entry, which equals a forward pass with window=block_size: test_model.py). Measured on
    validation text: with that window the loss past block_size is the loss within it, so samples
    keep reading like the training text; with the whole context, lengths this RoPE model never saw,
    it is far worse (the quickstart's samples collapse into runs of spaces and '|')."""
    run_script('train.py', '--n_layer=4', '--n_head=4', '--n_embd=128', '--block_size=32', '--batch_size=16',
               '--max_iters=300', '--eval_interval=1000', '--eval_iters=4', '--warmup_iters=30',
               '--learning_rate=3e-3',
               '--min_lr=3e-4', '--out_dir=out-window', '--device=cpu', cwd=workdir, timeout=600)
    model = model_from_checkpoint(load_checkpoint(str(workdir / 'out-window'))).eval()
    val = np.fromfile(workdir / 'data' / 'pydoc_char' / 'val.bin', dtype=np.uint16)
    starts = torch.randint(len(val) - 129, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.from_numpy(np.stack([val[i:i + 128] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([val[i + 1:i + 129] for i in starts]).astype(np.int64))
    losses = {}
    with torch.no_grad():
        for window in (32, None):
            logits = model(x, y, pseudo_len=32, window=window)[0]
            losses[window] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction='none')
    within = losses[32][:, :32].mean().item()
    assert losses[32][:, 32:].mean().item() <= 1.02 * within  # the default, a sliding window
    assert losses[None][:, 32:].mean().item() > 1.1 * within  # the whole context, still a setting

    # sample.py: the window by default
    sample = ['--init_from=out-window', '--num_samples=1', '--max_new_tokens=200', '--device=cpu']
    window, whole = (run_script('sample.py', *sample, *args, cwd=workdir).stdout
                     for args in ([], ['--sliding_window=False']))
    assert window[:33] == whole[:33] and window != whole


@pytest.mark.slow
def test_torchrun_with_a_cpu_config(workdir):
    """The CPU config under torchrun says, once, what to pass; the README's command then runs."""
    config = os.path.join(REPO, 'config', 'train_pydoc_char.py')
    result = run_script('train.py', config, '--device=cpu', '--out_dir=out-cpu-ddp', cwd=workdir,
                        torchrun=2, expect_ok=False)
    assert result.returncode != 0 and result.stderr.count('train.py: error:') == 1, result.stderr
    assert ('gradient_accumulation_steps=1 is not a multiple of the 2 processes: '
            'pass --gradient_accumulation_steps=2' in result.stderr)
    assert not (workdir / 'out-cpu-ddp').exists()
    result = run_script('train.py', config, '--gradient_accumulation_steps=2', '--device=cpu',
                        '--out_dir=out-cpu-ddp', '--max_iters=4', '--eval_interval=4', '--eval_iters=2',
                        cwd=workdir, torchrun=2)
    assert load_checkpoint(str(workdir / 'out-cpu-ddp'))['iter_num'] == 4


def worker_pids(launcher_pid):
    """{RANK: pid} of the processes torchrun started (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                parent = int(f.read().rpartition(')')[2].split()[1])
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        except OSError:
            continue
        if parent == launcher_pid and b'RANK' in env:
            found[int(env[b'RANK'])] = int(pid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker processes in /proc (Linux)')
@pytest.mark.parametrize('fault', ['frozen', 'killed'])
def test_a_lost_peer_ends_the_run_with_one_line(workdir, fault):
    """SIGSTOP one of two processes: the other gives up after ddp_timeout with one line, instead of
    torch's default of 30 minutes. kill -9 it: the other says so at once, in one line of its own."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(REPO, 'train.py'), *TINY, '--gradient_accumulation_steps=2',
               '--max_iters=100000', '--eval_interval=100000', '--log_interval=1', '--ddp_timeout=5',
               f'--out_dir=out-peer-{fault}']
    proc = subprocess.Popen(command, cwd=workdir, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = {}
    try:
        log_path = workdir / f'out-peer-{fault}' / 'log.jsonl'
        deadline = time.time() + 120
        while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.time() < deadline, 'the run ended before the fault'
            time.sleep(0.05)
        workers = worker_pids(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP if fault == 'frozen' else signal.SIGKILL)
        struck_at = time.time()
        while (os.path.exists(f'/proc/{workers[0]}')
               and open(f'/proc/{workers[0]}/stat').read().rpartition(')')[2].split()[0] != 'Z'):
            assert time.time() - struck_at < 60, 'rank 0 still waits for its lost peer'
            time.sleep(0.1)
        if fault == 'frozen':
            assert time.time() - struck_at >= 4  # it waited ddp_timeout, not less
    finally:
        for pid in workers.values():
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        proc.kill()
    stderr = proc.communicate()[1].replace('\r', '\n')
    lines = [line for line in stderr.splitlines()
             if 'train.py: error: rank 0: lost the other processes' in line]
    # its own line, below the bar
    assert len(lines) == 1 and lines[0].startswith('train.py: error:'), stderr[-3000:]

# ---------------------------------------------------------------------------------------------------
# faults: resume on another number of processes, two runs in one folder, full disks, signals


def rows_of(out_dir):
    """(step, kind, loss) of each log row: a training step's loss, or an evaluation's validation loss."""
    return [(r['iter'], 'val', r['val_loss']) if 'val_loss' in r else (r['iter'], 'step', r['loss'])
            for r in read_log(out_dir)]


def assert_same_rows(a, b):
    assert [r[:2] for r in a] == [r[:2] for r in b], (a, b)
    for x, y in zip(a, b):
        assert x[2] == pytest.approx(y[2], rel=1e-4), (x, y)


@pytest.mark.slow
def test_resume_on_any_number_of_processes(workdir):
    """A run started on 2 processes (dropout on), resumed on 1, then on 2 again, each time with a
    higher max_iters, logs what one uninterrupted 2-process run logs: one row per step, the same
    losses; and the checkpoint holds the run's settings, not the process's (rank, world size)."""
    args = [*TINY, '--dropout=0.1', '--gradient_accumulation_steps=2', '--lr_decay_iters=40',
            '--eval_interval=10']
    run_script('train.py', *args, '--max_iters=40', '--out_dir=out-whole', cwd=workdir, torchrun=2)
    run_script('train.py', *args, '--max_iters=20', '--out_dir=out-pieces', cwd=workdir, torchrun=2)
    config = load_checkpoint(str(workdir / 'out-pieces'))['config']
    assert not {'rank', 'world_size', 'ddp', 'master'} & config.keys()
    one = run_script('train.py', '--init_from=resume', '--out_dir=out-pieces', '--max_iters=30', cwd=workdir)
    assert 'on 1 process(es)' in one.stdout
    two = run_script('train.py', '--init_from=resume', '--out_dir=out-pieces', '--max_iters=40',
                     cwd=workdir, torchrun=2)
    assert 'on 2 process(es)' in two.stdout and two.stdout.count('resuming out-pieces at step 30') == 1
    assert_same_rows(rows_of(workdir / 'out-pieces'), rows_of(workdir / 'out-whole'))
    # and the same as one process all along: the batches and the dropout are the micro-batch's, not
    # the process's
    run_script('train.py', *args, '--max_iters=40', '--out_dir=out-alone', cwd=workdir)
    assert_same_rows(rows_of(workdir / 'out-alone'), rows_of(workdir / 'out-whole'))


def start_training(workdir, out_dir, *args):
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *TINY, f'--out_dir={out_dir}',
                             *args], cwd=workdir, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, condition, what):
    deadline = time.time() + 120
    while not condition():
        assert proc.poll() is None, f'the run ended before {what}: {proc.communicate()[1][-2000:]}'
        assert time.time() < deadline, f'no {what} after 120 s'
        time.sleep(0.05)


def logged_step(out_dir, step):
    path = out_dir / 'log.jsonl'
    return lambda: path.exists() and any(json.loads(line).get('iter', 0) >= step
                                         for line in path.read_text().splitlines())


@pytest.mark.slow
def test_one_run_at_a_time_in_a_folder(workdir):
    """A second run in a folder a run is using is refused, resumed or not; after a kill -9 of the
    first, the next run takes over its lock and says so."""
    out = workdir / 'out-busy'
    first = start_training(workdir, out.name, '--max_iters=100000', '--eval_interval=20')
    try:
        wait_for(first, lambda: (out / 'ckpt.pt').exists(), 'the first checkpoint')
        for args in (['--overwrite=True'], ['--init_from=resume']):
            result = run_script('train.py', *TINY, f'--out_dir={out.name}', '--max_iters=5', *args,
                                cwd=workdir, expect_ok=False)
            assert result.returncode == 1, result.stderr
            assert (f'train.py: error: {out.name} is in use by another run (pid {first.pid} on '
                    in result.stderr)
    finally:
        first.kill()
        first.communicate()
    end = load_checkpoint(str(out))['iter_num'] + 10
    result = run_script('train.py', '--init_from=resume', f'--out_dir={out.name}',
                        f'--max_iters={end}', cwd=workdir)
    assert (f'{out.name}: taking over from a run that ended without letting go of it (pid {first.pid} on '
            in result.stdout)
    assert (out / 'train.lock').read_text() == ''  # let go at the end
    steps = [r['iter'] for r in read_log(out) if 'loss' in r]
    assert steps == sorted(set(steps)) and steps[-1] == end


def test_a_run_killed_before_its_first_checkpoint_starts_again(workdir):
    """A log and no checkpoint is no run to protect: the same command starts there afresh and says
    so; --init_from=resume says why there is nothing to resume."""
    out = workdir / 'out-early'
    args = ['--max_iters=100000', '--eval_interval=100000']
    first = start_training(workdir, out.name, *args)
    wait_for(first, logged_step(out, 10), 'a few steps')
    first.kill()
    first.communicate()
    assert not (out / 'ckpt.pt').exists() and read_log(out)
    result = run_script('train.py', *TINY, f'--out_dir={out.name}', '--init_from=resume',
                        cwd=workdir, expect_ok=False)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
    assert ('the run there stopped before its first save; '
            'the same command without --init_from=resume starts it again' in result.stderr)
    result = run_script('train.py', *TINY, f'--out_dir={out.name}', '--max_iters=10',
                        '--eval_interval=100000', cwd=workdir)
    assert (f'{out.name} has a log.jsonl but no checkpoint (a run stopped before its first save): '
            f'starting there afresh' in result.stdout)
    assert [r['iter'] for r in read_log(out)] == [0, 5, 10] and load_checkpoint(str(out))['iter_num'] == 10


# root writes through file modes; sysfs refuses even root
UNWRITABLE = '/sys/kernel' if os.geteuid() == 0 else None


@pytest.mark.parametrize('problem', ['a file', 'unwritable', 'no space', 'no such device'])
def test_out_dir_and_device_problems_are_one_line_before_the_model(workdir, tmp_path, problem):
    (tmp_path / 'a-file').write_text('not a folder')
    folder = tmp_path / 'read-only'
    folder.mkdir()
    folder.chmod(0o555)
    args = {'a file': [f'--out_dir={tmp_path / "a-file"}'],
            'unwritable': [f'--out_dir={UNWRITABLE or folder}'],
            'no space': [f'--out_dir={tmp_path / "roomless"}'],
            'no such device': ['--device=mps']}[problem]
    message = {'a file': 'is a file, not a folder',
               'unwritable': f'cannot write to {UNWRITABLE or folder}: ',
               'no space': 'MiB free, and a checkpoint of this run needs about',
               'no such device': "device='mps' is not usable here"}[problem]
    # a disk with 1 MiB free, as shutil sees it
    launcher = ("import os, runpy, shutil, sys, types; "
                "shutil.disk_usage = lambda path: types.SimpleNamespace(total=2**40, "
                "used=2**40 - 2**20, free=2**20); sys.argv = sys.argv[1:]; "
                "sys.path.insert(0, os.path.dirname(sys.argv[0])); "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    command = [sys.executable, '-c', launcher] if problem == 'no space' else [sys.executable]
    result = subprocess.run([*command, os.path.join(REPO, 'train.py'), *TINY, *args], cwd=workdir,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
    assert (result.stderr.startswith('train.py: error: ') and message in result.stderr
            and len(result.stderr) < 300)
    assert result.stdout == ''  # before the model is built: no start-up line
    assert not (tmp_path / 'roomless').exists() and list(folder.iterdir()) == []


def test_a_save_the_disk_refuses_keeps_the_last_checkpoint(workdir):
    """A save that fails for space (here a file-size limit, ulimit -f: the same refusal as a full
    disk, without one) ends the run in one line; the last checkpoint stays whole, no temporary file."""
    import resource
    out = workdir / 'out-full-disk'
    run_script('train.py', *TINY, '--max_iters=20', '--eval_interval=20',
               f'--out_dir={out.name}', cwd=workdir)
    before = (out / 'ckpt.pt').read_bytes()
    limit = len(before) // 2
    result = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), '--init_from=resume',
                             f'--out_dir={out.name}', '--max_iters=40'],
                            cwd=workdir, capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    last = result.stderr.replace('\r', '\n').strip().splitlines()[-1]
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert (last.startswith(f'train.py: error: cannot save {out.name}/ckpt.pt at step 40: File too large')
            and last.endswith('the checkpoint of step 20 is kept'))
    assert ((out / 'ckpt.pt').read_bytes() == before
            and sorted(p.name for p in out.iterdir()) == ['ckpt.pt', 'log.jsonl', 'train.lock'])


@pytest.mark.slow
@pytest.mark.parametrize('processes', [1, 2])
def test_a_signal_during_an_evaluation_stops_within_seconds(workdir, processes):
    """SIGTERM while rank 0 evaluates (100,000 batches: minutes): the evaluation is abandoned, the
    step's checkpoint is saved, and the run (torchrun with it) ends within seconds."""
    out = workdir / f'out-eval-stop-{processes}'
    ddp = ['--gradient_accumulation_steps=2'] * (processes == 2)
    run_script('train.py', *TINY, *ddp, '--max_iters=20', '--eval_interval=20', f'--out_dir={out.name}',
               cwd=workdir, torchrun=processes if processes > 1 else 0)
    launcher = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
                                   * (processes == 2))
    proc = subprocess.Popen([*launcher, os.path.join(REPO, 'train.py'), '--init_from=resume',
                             f'--out_dir={out.name}', '--max_iters=100', '--eval_iters=100000'],
                            cwd=workdir, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(proc, logged_step(out, 40), 'step 40')  # the step's row comes just before its evaluation
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - signalled < 15, 'the evaluation was not abandoned'
    assert 'stopped by a signal at step 40' in stdout, stderr[-2000:]
    assert load_checkpoint(str(out))['iter_num'] == 40
    # abandoned: no validation row, and the checkpoint says so
    assert not [r for r in read_log(out) if r['iter'] == 40 and 'val_loss' in r]
    assert load_checkpoint(str(out))['evaluated'] is False
    if processes == 1:
        assert proc.returncode == 128 + signal.SIGTERM
        # so the resumed run does that evaluation, as an uninterrupted run would have
        run_script('train.py', '--init_from=resume', f'--out_dir={out.name}', '--max_iters=41',
                   '--eval_iters=2', cwd=workdir)
        assert [r for r in read_log(out) if r['iter'] == 40 and 'val_loss' in r]


def test_a_second_signal_stops_at_once(workdir):
    """The first SIGTERM waits for the step to end (about two seconds at this batch size); a second
    one ends the process there and then (what stays is the last checkpoint, whole)."""
    out = workdir / 'out-twice'
    proc = start_training(workdir, out.name, '--max_iters=100000', '--eval_iters=1', '--batch_size=8192')
    wait_for(proc, logged_step(out, 0), 'the first evaluation')
    time.sleep(0.3)  # in the first step
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert not [p for p in out.iterdir() if 'ckpt' in p.name]


def test_eval_only_changes_nothing(workdir, trained):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    result = run_script('train.py', '--init_from=resume', f'--out_dir={trained.name}',
                        '--eval_only=True', cwd=workdir)
    assert 'step 80: train loss' in result.stderr + result.stdout
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def strict_rows(out_dir):
    """log.jsonl's rows, read as strict JSON (NaN and Infinity refused)."""
    def refuse(constant):
        raise ValueError(f"{constant} in log.jsonl")
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize('processes', [1, 2])
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(workdir, processes):
    """A run resumed with a learning rate that makes it diverge stops at the step its loss or gradient
    norm stops being finite, every process together, with one line naming the step and what to try;
    the good checkpoint stays byte for byte, and the log holds strict JSON only."""
    out = workdir / f'out-diverge-{processes}'
    args = [*TINY, '--gradient_accumulation_steps=2', '--eval_interval=10', f'--out_dir={out.name}']
    run_script('train.py', *args, '--max_iters=10', cwd=workdir, torchrun=processes if processes > 1 else 0)
    good = (out / 'ckpt.pt').read_bytes()
    result = run_script('train.py', '--init_from=resume', f'--out_dir={out.name}', '--max_iters=40',
                        '--learning_rate=1e4', cwd=workdir, expect_ok=False,
                        torchrun=processes if processes > 1 else 0)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith('train.py: error:')]
    assert (len(lines) == 1 and 'the run diverged' in lines[0]
            and 'a lower --learning_rate (now 10000)' in lines[0]), result.stderr
    assert f'{out.name}/ckpt.pt still holds step 10' in lines[0]
    step = int(lines[0].split('step ')[1].split(':')[0])
    assert 10 < step < 40 and (out / 'ckpt.pt').read_bytes() == good
    assert all(r['iter'] <= step for r in strict_rows(out))


def test_a_run_diverging_from_the_start_saves_nothing(workdir):
    out = workdir / 'out-diverge-new'
    result = run_script('train.py', *TINY, '--max_iters=40', '--eval_interval=20', '--learning_rate=1e4',
                        '--warmup_iters=0', f'--out_dir={out.name}', cwd=workdir, expect_ok=False)
    lines = [line for line in result.stderr.splitlines() if 'error' in line]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert 'the run diverged' in lines[0] and 'no checkpoint was saved' in lines[0]
    assert not (out / 'ckpt.pt').exists()
    strict_rows(out)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the ranks in /proc (Linux)')
def test_torchrun_restarts_continue_the_run(workdir):
    """torchrun --max-restarts=1: a worker killed mid-run (kill -9), torchrun starts the same command
    again, which continues from the last checkpoint: the job succeeds and its log is an uninterrupted
    run's, row for row."""
    args = [*TINY, '--gradient_accumulation_steps=2', '--eval_interval=10', '--max_iters=60']
    run_script('train.py', *args, '--out_dir=out-uninterrupted', cwd=workdir, torchrun=2)
    out = workdir / 'out-restarted'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               '--max-restarts=1', os.path.join(REPO, 'train.py'), *args, f'--out_dir={out.name}']
    proc = subprocess.Popen(command, cwd=workdir, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(proc, lambda: (out / 'ckpt.pt').exists() and logged_step(out, 25)(),
             'a checkpoint and a few steps after it')
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=3600)
    assert proc.returncode == 0, stderr[-3000:]
    assert 'continuing its run (restart 1 of this torchrun job)' in stdout, stdout[-3000:]
    assert_same_rows(rows_of(out), rows_of(workdir / 'out-uninterrupted'))


@pytest.mark.slow
def test_a_restart_does_not_continue_another_jobs_run(workdir):
    """A job whose first attempt was refused (the folder holds an earlier run) is refused again on its
    restart: a restart continues only the run its own job started."""
    out = workdir / 'out-other-job'
    run_script('train.py', *TINY, '--max_iters=10', '--eval_interval=10',
               f'--out_dir={out.name}', cwd=workdir)
    before = (out / 'ckpt.pt').read_bytes()
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
               '--max-restarts=1', os.path.join(REPO, 'train.py'), *TINY, '--max_iters=20',
               f'--out_dir={out.name}']
    result = subprocess.run(command, cwd=workdir, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode != 0 and result.stderr.count('holds a run already') == 2, result.stderr[-3000:]
    assert (out / 'ckpt.pt').read_bytes() == before


def test_auto_resume_starts_a_run_then_continues_it(workdir):
    """auto_resume=True, for a scheduler's requeue: the same command starts the run where there is none,
    and continues it after a stop (here SIGTERM) to the log of an uninterrupted run."""
    args = [*TINY, '--max_iters=40', '--eval_interval=10', '--auto_resume=True']
    run_script('train.py', *args, '--out_dir=out-auto-whole', cwd=workdir)
    out = workdir / 'out-auto'
    first = start_training(workdir, out.name, *args[len(TINY):])
    wait_for(first, logged_step(out, 15), 'a few steps')
    first.send_signal(signal.SIGTERM)
    first.communicate()
    result = run_script('train.py', *args, f'--out_dir={out.name}', cwd=workdir)
    assert f'{out.name}: continuing its run (auto_resume)' in result.stdout
    assert_same_rows(rows_of(out), rows_of(workdir / 'out-auto-whole'))
