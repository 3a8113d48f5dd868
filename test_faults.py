"""Faults across the scripts (issue 25): a broken Hugging Face folder, a dataset whose meta.json and
token files disagree, a log cut short by a kill, a chat template that fails or never ends, and Ctrl-C
while sampling. Each is one line naming the file and what is wrong, never a traceback."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, run_script

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=2',
        '--log_interval=5', '--device=cpu']
# 10^10 steps that write nothing: only the time limit stops them
NESTED_LOOPS = '{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}'


def one_line(result, script):
    """The error line a failed script ends with (exit 1, no traceback); warnings may stand above it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith(f'{script}: error: '), result.stderr[-3000:]
    assert result.stderr.count(f'{script}: error: ') == 1, result.stderr[-3000:]
    return lines[-1]

# ---------------------------------------------------------------------------------------------------
# broken Hugging Face folders: sample.py, train.py (one process and FSDP), eval.py


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """A small random Llama with its own tokenizer.json, as a Hugging Face folder."""
    pytest.importorskip('transformers')
    pytest.importorskip('tokenizers')
    from test_pretrained import save_model, train_tokenizer
    folder = tmp_path_factory.mktemp('hf') / 'tiny-llama'
    folder.mkdir()
    tokenizer = train_tokenizer(folder, 300)
    save_model(folder, 'Llama', vocab_size=tokenizer.get_vocab_size(), num_attention_heads=2,
               eos_token_id=tokenizer.token_to_id('<|endoftext|>'))
    return folder


def break_folder(hf_folder, folder, fault):
    """A copy of the folder with one fault; returns what the error line must say."""
    from test_pretrained import save_model
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / 'config.json').read_text())
    if fault == 'a missing field':
        del config['num_hidden_layers']
        (folder / 'config.json').write_text(json.dumps(config))
        return f'{folder}/config.json has no num_hidden_layers'
    if fault == 'invalid JSON':
        (folder / 'config.json').write_text(json.dumps(config)[:-20])
        return f'{folder}/config.json is not valid JSON: '
    if fault == 'a truncated safetensors file':
        weights = (folder / 'model.safetensors').read_bytes()
        (folder / 'model.safetensors').write_bytes(weights[:len(weights) // 2])
        return f'{folder}/model.safetensors is not a whole safetensors file (cut short, or damaged)'
    (folder / 'model.safetensors').unlink()  # an index naming a missing shard
    save_model(folder, 'Llama', vocab_size=config['vocab_size'], num_attention_heads=2, shard='40KB')
    shards = sorted(p.name for p in folder.glob('model-*.safetensors'))
    (folder / shards[1]).unlink()
    return f'{folder}/model.safetensors.index.json names {shards[1]}, which is not in {folder}'


FAULTS = ['a missing field', 'invalid JSON', 'a truncated safetensors file',
          'an index naming a missing shard']
SCRIPTS = {'sample.py': ['sample.py'], 'train.py': ['train.py', '--dataset=anything', '--out_dir=out'],
           'train.py --fsdp=True': ['train.py', '--dataset=anything', '--out_dir=out', '--fsdp=True'],
           'eval.py': ['eval.py', '--dataset=anything']}


@pytest.mark.parametrize('fault', FAULTS)
def test_a_broken_hugging_face_folder_is_one_line_in_every_script(hf_folder, tmp_path, fault):
    """Each script reads the folder through pretrained.pretrained_args, which checks it whole before
    any model is built (under FSDP too, where each process then reads its rows of the weights)."""
    folder = tmp_path / 'broken'
    message = break_folder(hf_folder, folder, fault)
    for name, (script, *args) in SCRIPTS.items():
        result = run_script(script, f'--init_from={folder}', *args, '--device=cpu', cwd=tmp_path,
                            expect_ok=False)
        assert message in one_line(result, script), (name, result.stderr[-2000:])
        assert not (tmp_path / 'out').exists(), name  # refused before the run's folder is made


def test_a_hugging_face_folder_without_its_tokenizer_says_so(hf_folder, tmp_path):
    folder = tmp_path / 'no-tokenizer'
    shutil.copytree(hf_folder, folder)
    (folder / 'tokenizer.json').unlink()
    scripts = [['sample.py', '--device=cpu']]
    if importlib.util.find_spec('transformers'):  # export_hf.py's own requirement
        scripts.append(['export_hf.py', '--out_dir=hf-out'])
    for script, *args in scripts:
        result = run_script(script, f'--init_from={folder}', *args, cwd=tmp_path, expect_ok=False)
        assert f'{folder} has no tokenizer.json beside its config.json' in one_line(result, script)
    assert not (tmp_path / 'hf-out').exists()

# ---------------------------------------------------------------------------------------------------
# datasets: a meta.json of one tokenizer with the tokens of another, a meta.json edited


@pytest.fixture(scope='module')
def char_run(tmp_path_factory):
    """data/pydoc_char, and out: a tiny character model of 10 steps."""
    folder = tmp_path_factory.mktemp('work')
    run_script('prepare_data.py', '--tokenizer=char', cwd=folder)
    run_script('train.py', *TINY, '--max_iters=10', '--eval_interval=5', '--out_dir=out', cwd=folder)
    return folder


def dataset_like(folder, name, meta_of, tokens_of, **changes):
    """data/<name>: the meta.json of data/<meta_of>, changed (None: a key left out), with the token
    files of data/<tokens_of>."""
    meta = json.loads((folder / 'data' / meta_of / 'meta.json').read_text())
    tokens = json.loads((folder / 'data' / tokens_of / 'meta.json').read_text())
    meta.update({k: tokens[k] for k in ('train_tokens', 'val_tokens', 'dtype')}, **changes)
    (folder / 'data' / name).mkdir()
    for split in ('train', 'val'):
        shutil.copy(folder / 'data' / tokens_of / f'{split}.bin', folder / 'data' / name / f'{split}.bin')
    meta = {k: v for k, v in meta.items() if v is not None}
    (folder / 'data' / name / 'meta.json').write_text(json.dumps(meta))


def train_and_evaluate(folder, name):
    """train.py from scratch, and eval.py with the model `out`, on data/<name>: their error lines."""
    train = run_script('train.py', *TINY, f'--dataset={name}', '--max_iters=2', f'--out_dir=out-{name}',
                       cwd=folder, expect_ok=False)
    evaluate = run_script('eval.py', '--init_from=out', f'--dataset={name}', '--device=cpu', cwd=folder,
                          expect_ok=False)
    return one_line(train, 'train.py'), one_line(evaluate, 'eval.py')


@pytest.mark.parametrize('recorded', ['its own largest id', 'no largest id (an older dataset)'])
def test_a_dataset_mixed_from_two_tokenizers_is_one_line(char_run, gpt2_offline, recorded):
    """The fault of issue 25: meta.json says 'char, vocabulary 76' while the token files hold GPT-2's
    ids. Whatever its meta.json records, train.py and eval.py find the ids past the vocabulary in what
    they read, and say so in one line naming the file (not an IndexError in F.embedding)."""
    name = f"mixed-{recorded.split()[0]}"
    if not (char_run / 'data' / 'pydoc' / 'meta.json').exists():  # GPT-2's BPE: offline only from a cache
        run_script('prepare_data.py', cwd=char_run)
    older = {'max_token_id': None} if recorded.startswith('no') else {}
    dataset_like(char_run, name, 'pydoc_char', 'pydoc', **older)
    train, evaluate = train_and_evaluate(char_run, name)
    assert re.search(rf'data/{name}/train\.bin holds token id \d+, past the vocabulary of \d+ in', train)
    assert re.search(rf'data/{name}/val\.bin holds token id \d+, past the vocabulary of \d+', evaluate)


@pytest.mark.parametrize('change,message', [
    (dict(vocab_size='76'), "vocab_size is '76', not a positive whole number"),
    (dict(vocab_size=10), 'vocab_size is 10, but its character table has'),
    ('ten characters', 'its token ids reach'),
    (dict(tokenizer='gpt2', vocab_size=100), "vocab_size is 100, but GPT-2's BPE has 50,257 tokens"),
])
def test_a_meta_json_with_a_wrong_vocab_size_is_one_line(char_run, change, message):
    """A vocab_size too small for the ids, or not a number, or not its tokenizer's: one line from train.py
    and eval.py."""
    meta = json.loads((char_run / 'data' / 'pydoc_char' / 'meta.json').read_text())
    change = dict(vocab_size=10, chars=meta['chars'][:10]) if change == 'ten characters' else change
    name = 'edited-' + re.sub(r'\W+', '-', message)[:24]
    dataset_like(char_run, name, 'pydoc_char', 'pydoc_char', **change)
    for line in train_and_evaluate(char_run, name):
        assert f'data/{name}/meta.json: {message}' in line


def test_a_tokenizer_folder_for_a_character_model_is_one_line(char_run, hf_folder):
    """--tokenizer names where a Hugging Face tokenizer has moved; a character or GPT-2 model has none,
    so a folder given for it is refused, not silently ignored."""
    from tokenizer import TokenizerError, tokenizer_from_meta
    message = (f"--tokenizer={hf_folder}: this model's tokenizer is char, which needs no folder; "
               "--tokenizer names where a Hugging Face tokenizer has moved")
    with pytest.raises(TokenizerError, match="this model's tokenizer is gpt2, which needs no folder"):
        tokenizer_from_meta(dict(tokenizer='gpt2'), str(hf_folder))
    scripts = [['sample.py', '--max_new_tokens=2', '--device=cpu'],
               ['eval.py', '--dataset=pydoc_char', '--device=cpu']]
    if importlib.util.find_spec('transformers'):  # export_hf.py's own requirement
        scripts.append(['export_hf.py', '--out_dir=hf-out'])
    for script, *args in scripts:
        result = run_script(script, '--init_from=out', f'--tokenizer={hf_folder}', *args,
                            cwd=char_run, expect_ok=False)
        assert message in one_line(result, script)
    assert not (char_run / 'hf-out').exists()

# ---------------------------------------------------------------------------------------------------
# a log cut short: run_dir.trim_log


def test_trim_log_drops_a_torn_row_and_says_so(tmp_path):
    import run_dir
    path = tmp_path / 'log.jsonl'
    rows = [dict(iter=0, val_loss=4.0), dict(iter=5, loss=3.0), dict(iter=10, loss=2.5), dict(iter=15)]
    whole = ''.join(json.dumps(r) + '\n' for r in rows)
    path.write_text(whole)
    assert run_dir.trim_log(str(path), 10) is None
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    path.write_text(whole + '{"iter": 20, "loss": 1.')
    note = run_dir.trim_log(str(path), 15)
    assert note == f'{path}: dropped its last row, cut short while it was written ' \
                   f'(a kill or a full disk): \'{{"iter": 20, "loss": 1.\''
    assert path.read_text() == whole
    path.write_text(whole[:-1])  # a last row whole but for its newline is kept
    assert run_dir.trim_log(str(path), 15) is None and path.read_text() == whole
    path.write_text('{"iter": 0}\nnot json\n[1, 2]\n{"iter": "5"}\n{"iter": 5}\n')
    assert run_dir.trim_log(str(path), 15) == f'{path}: dropped 3 rows that are not JSON (lines 2, 3, 4)'
    assert path.read_text() == '{"iter": 0}\n{"iter": 5}\n'


def test_resume_after_a_torn_log_row(char_run):
    """A kill or a full disk during an append leaves the last row of log.jsonl cut short: the resumed
    run drops it, says so, and continues (no JSONDecodeError)."""
    out = char_run / 'out-torn'
    shutil.copytree(char_run / 'out', out)
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"iter": 15, "loss": 2.3')
    result = run_script('train.py', '--init_from=resume', '--out_dir=out-torn', '--max_iters=15',
                        cwd=char_run)
    note = 'out-torn/log.jsonl: dropped its last row, cut short while it was written (a kill or a full disk)'
    assert note in result.stdout
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in rows if 'loss' in r] == [5, 10, 15]
    assert [r['iter'] for r in rows if 'val_loss' in r] == [0, 5, 10, 15]

# ---------------------------------------------------------------------------------------------------
# sample.py: a chat template that fails or never ends, and Ctrl-C


@pytest.mark.parametrize('template,message', [
    ('{{ 1/0 }}', 'the chat template failed: ZeroDivisionError: division by zero'),
    ('{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}',
     'the chat template wrote more than 1,048,576 characters: stopped'),
    (NESTED_LOOPS, 'the chat template ran for more than 1 s: stopped'),
])
def test_a_chat_template_that_fails_or_never_ends(hf_folder, tmp_path, monkeypatch, template, message):
    """chat_prompt renders within a time limit (a timer in the main thread) and a size limit; what a
    template raises is a ValueError naming its file; the timer's signal handler is put back."""
    pytest.importorskip('jinja2')
    import tokenizer
    folder = tmp_path / 'chat'
    shutil.copytree(hf_folder, folder)
    (folder / 'chat_template.jinja').write_text(template)
    monkeypatch.setattr(tokenizer, 'RENDER_SECONDS', 1)
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(ValueError) as e:
        tokenizer.chat_prompt(str(folder), 'hello')
    assert str(e.value) == f'{folder}/chat_template.jinja: {message}'
    assert signal.getsignal(signal.SIGALRM) == before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    template = '{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>'
    (folder / 'chat_template.jinja').write_text(template)
    assert tokenizer.chat_prompt(str(folder), 'hello') == '<user>hello<assistant>'


@pytest.mark.slow
@pytest.mark.parametrize('template,message', [
    ('{{ 1/0 }}', 'the chat template failed: ZeroDivisionError'),
    (NESTED_LOOPS, 'the chat template ran for more than 10 s'),
])
def test_sample_with_a_chat_template_that_fails_or_never_ends(hf_folder, tmp_path, template, message):
    pytest.importorskip('jinja2')
    folder = tmp_path / 'chat'
    shutil.copytree(hf_folder, folder)
    (folder / 'chat_template.jinja').write_text(template)
    result = run_script('sample.py', f'--init_from={folder}', '--chat=True', '--start=hi', '--device=cpu',
                        cwd=tmp_path, expect_ok=False)
    assert f'{folder}/chat_template.jinja: {message}' in one_line(result, 'sample.py')


def test_ctrl_c_while_sampling_keeps_the_text(hf_folder, tmp_path):
    """Ctrl-C while a sample streams: the text written stays, the sample's end is written, then one
    line on stderr, and exit 130 (no KeyboardInterrupt traceback)."""
    command = [sys.executable, os.path.join(REPO, 'sample.py'), f'--init_from={hf_folder}', '--start=The ',
               '--num_samples=1', '--max_new_tokens=1000000', '--device=cpu']
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    streamed = b''
    while len(streamed) < 200:  # read from the pipe itself, as communicate does below
        piece = os.read(proc.stdout.fileno(), 4096)
        assert piece, proc.communicate()[1][-3000:]
        streamed += piece
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=120)
    stderr = stderr.decode()
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r'sample\.py: interrupted after \d+ new tokens', last), stderr
    text = (streamed + rest).decode()  # whole characters: nothing written twice or cut
    assert text.startswith('The ') and len(streamed + rest) > 200 and text.endswith('\n---------------\n')

# ---------------------------------------------------------------------------------------------------
# the README's Reliability table names its tests


def test_every_reliability_row_names_tests_that_exist():
    """Each row's last cell names tests (`file::test`, or `::test` in the file named before it); a test
    renamed or removed would leave a row that promises what nothing checks."""
    readme = open(os.path.join(REPO, 'README.md')).read()
    section = readme.split('\n## Reliability\n')[1].split('\n## ')[0]
    rows = [line for line in section.splitlines() if line.startswith('| ') and '::' in line]
    assert len(rows) > 20
    for row in rows:
        file = None
        names = re.findall(r'`([^`]*::[^`]*)`', row.rsplit(' | ', 1)[1])
        assert names and all(re.fullmatch(r'[\w.]*::\w+', name) for name in names), row
        for name in names:
            file, test = (name.split('::') if not name.startswith('::') else (file, name[2:]))
            assert file, row
            source = open(os.path.join(REPO, file)).read()
            assert re.search(rf'^def {test}\(', source, re.M), (file, test)
