"""eval.py: the perplexity of a whole split by sliding windows, against a plain loop over the same
windows; bits per byte; and the lm-evaluation-harness adapter against the harness's own Hugging Face
adapter on the same folder (skipped without lm_eval: a test-only dependency)."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from eval import windows
from checkpoint import load_checkpoint, model_from_checkpoint
from tokenizer import tokenizer_from_meta

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=32', '--batch_size=16', '--eval_iters=2',
        '--log_interval=100', '--warmup_iters=20', '--learning_rate=1e-2', '--min_lr=1e-3', '--device=cpu']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny character model, StableMask, trained 400 steps on pydoc's text (the offline default):
    enough that its first positions, with little context, are its worst."""
    folder = tmp_path_factory.mktemp('work')
    run_script('prepare_data.py', '--tokenizer=char', cwd=folder)
    run_script('train.py', *TINY, '--max_iters=400', '--eval_interval=1000', '--out_dir=out', cwd=folder)
    return folder


def evaluate(folder, *args, expect_ok=True):
    result = run_script('eval.py', '--init_from=out', '--json=True', '--device=cpu', *args,
                        cwd=folder, expect_ok=expect_ok)
    return json.loads(result.stdout.strip().splitlines()[-1]) if expect_ok else result


@pytest.mark.parametrize('n,block,stride', [(1, 8, 4), (7, 8, 4), (8, 8, 8), (9, 8, 8), (100, 8, 3),
                                            (100, 8, 1), (33, 32, 16)])
def test_windows_score_every_token_once_with_context(n, block, stride):
    """Each of n predictions is scored by exactly one window; a window is min(block, n) inputs long;
    past the first window every scored prediction sees at least block - stride tokens before it."""
    spans, length = windows(n, block, stride)
    assert length == min(block, n)
    scored = []
    for k, (start, count) in enumerate(spans):
        assert 0 <= start and start + length <= n and 1 <= count <= (length if k == 0 else stride)
        targets = range(start + length - count, start + length)  # prediction p reads inputs [start, p]
        scored += targets
        if k:
            assert all(p - start >= block - stride for p in targets)
    assert scored == list(range(n))


def plain_loss(model, ids, block, stride, pseudo_len):
    """The summed loss of every prediction, a window at a time, each window found by its own rule: the
    first block tokens; then the window that ends at the first of block + k * stride (the last: the
    split's end) at or past the prediction."""
    n = len(ids) - 1
    L = min(block, n)
    by_end = {}
    for p in range(n):  # p predicts ids[p + 1] from ids[:p + 1]
        end = L if p < L else min(n, L + math.ceil((p + 1 - L) / stride) * stride)
        by_end.setdefault(end, []).append(p)
    total = 0.0
    with torch.no_grad():
        for end, predictions in by_end.items():
            x = torch.from_numpy(ids[end - L:end].astype(np.int64))[None]
            y = torch.from_numpy(ids[end - L + 1:end + 1].astype(np.int64))[None]
            logits, _ = model(x, y, pseudo_len=pseudo_len)
            losses = F.cross_entropy(logits[0].double(), y[0], reduction='none')
            total += losses[[p - (end - L) for p in predictions]].sum().item()
    return total, n


def test_perplexity_equals_a_plain_loop(trained):
    """eval.py's loss, perplexity and token count equal a loop over the windows one at a time; under
    SM-I every window has the training length's pseudo mass, even a shorter window (which a pseudo mass
    of its own length would change); bits per byte count the text's UTF-8 bytes."""
    checkpoint = load_checkpoint(str(trained / 'out'))
    model = model_from_checkpoint(checkpoint).eval()
    # meta.json's dtype for 100 characters
    ids = np.fromfile(trained / 'data' / 'pydoc_char' / 'val.bin', dtype='uint16')[:3001]
    for block, stride in ((32, 16), (32, 32), (20, 7)):
        report = evaluate(trained, f'--block_size={block}', f'--stride={stride}', '--max_tokens=3001',
                          '--batch_size=5')['perplexity']
        total, n = plain_loss(model, ids, block, stride, pseudo_len=32)
        assert report['tokens'] == n == 3000 and (report['block_size'], report['stride']) == (block, stride)
        assert report['loss'] == pytest.approx(total / n, rel=1e-5)
        assert report['perplexity'] == pytest.approx(math.exp(total / n), rel=1e-5)
        text = tokenizer_from_meta(checkpoint['meta'])[1](ids[1:].tolist())
        assert report['bytes'] == len(text.encode('utf-8'))
        assert report['bits_per_byte'] == pytest.approx(total / math.log(2) / report['bytes'], rel=1e-5)
    own, _ = plain_loss(model, ids, 20, 7, pseudo_len=20)
    # the pseudo mass of the window's own length is another model
    assert abs(own / n - report['loss']) > 1e-3


def test_stride_trades_speed_for_context(trained):
    """stride = block_size is the non-overlapping number (the mean loss of consecutive windows);
    smaller strides give each token more context (no token is scored from the first two positions of
    a window, this model's worst) and a lower perplexity."""
    checkpoint = load_checkpoint(str(trained / 'out'))
    model = model_from_checkpoint(checkpoint).eval()
    ids = np.fromfile(trained / 'data' / 'pydoc_char' / 'val.bin', dtype='uint16')[:3201]
    chunks = torch.from_numpy(ids[:3200].astype(np.int64)).view(100, 32)
    targets = torch.from_numpy(ids[1:3201].astype(np.int64)).view(100, 32)
    with torch.no_grad():
        logits, _ = model(chunks, targets, pseudo_len=32)
    separate = F.cross_entropy(logits.double().transpose(1, 2), targets).item()
    numbers = {stride: evaluate(trained, f'--stride={stride}', '--max_tokens=3201')['perplexity']['loss']
               for stride in (32, 16, 4)}
    assert numbers[32] == pytest.approx(separate, rel=1e-5)
    assert numbers[4] < numbers[32] and numbers[16] < numbers[32]


@pytest.mark.slow
def test_the_dataset_it_trained_on_by_default_and_bad_input(trained, tmp_path):
    """Without --dataset, the checkpoint's own (its val split), in sentences without --json; bad input
    is one line and exit 1."""
    out = run_script('eval.py', '--init_from=out', '--max_tokens=500', '--device=cpu', cwd=trained).stdout
    assert ('val of data/pydoc_char: 499 tokens scored, windows of 32 moving by 16: loss' in out
            and 'bits per byte' in out)
    for args, message in ((['--stride=33'], 'longer than the window'),
                          (['--dataset=nowhere'], 'no dataset at data/nowhere'),
                          (['--init_from=missing'], 'no checkpoint at missing'),
                          (['--split=test'], 'split')):
        result = evaluate(trained, *args, expect_ok=False)
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, \
            result.stderr
    (trained / 'data' / 'wrong').mkdir(exist_ok=True)
    meta = json.loads((trained / 'data' / 'pydoc_char' / 'meta.json').read_text())
    other = meta['chars'][:-1] + ['\u2603']  # a table of the same size, one character another
    (trained / 'data' / 'wrong' / 'meta.json').write_text(json.dumps({**meta, 'chars': other}))
    for split in ('train', 'val'):
        os.link(trained / 'data' / 'pydoc_char' / f'{split}.bin',
                trained / 'data' / 'wrong' / f'{split}.bin')
    result = evaluate(trained, '--dataset=wrong', expect_ok=False)
    # the same check as train.py's (tokenizer.tokenizer_mismatch)
    assert (result.returncode == 1 and result.stderr.count('error:') == 1
            and 'the character tables of out' in result.stderr
            and 'and data/wrong' in result.stderr), result.stderr


def test_tasks_without_lm_eval_say_what_to_install(trained, tmp_path):
    """--tasks without the harness installed: one line naming the package, exit 1."""
    import subprocess
    import sys
    from conftest import REPO
    (tmp_path / 'lm_eval').mkdir()
    (tmp_path / 'lm_eval' / '__init__.py').write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, 'eval.py'), '--init_from=out',
                             '--tasks=piqa', '--device=cpu'],
                            cwd=trained, capture_output=True, text=True,
                            env={**os.environ, 'PYTHONPATH': str(tmp_path)})
    assert (result.returncode == 1 and 'pip install lm_eval' in result.stderr
            and result.stderr.count('\n') == 1), result.stderr


# ---------------------------------------------------------------------------------------------------
# lm-evaluation-harness


@pytest.fixture(scope='module')
def llama_folder(tmp_path_factory):
    """A small random Llama with its own tokenizer (GPT-2's kind, trained on pydoc's text) and a
    tokenizer_config.json naming its end-of-text token, as transformers and lm_eval's hf read it."""
    pytest.importorskip('lm_eval', reason='lm-evaluation-harness: pip install lm_eval (test-only here)')
    transformers = pytest.importorskip('transformers')
    from test_pretrained import save_model, train_tokenizer
    folder = tmp_path_factory.mktemp('work') / 'tiny-llama'
    folder.mkdir()
    tokenizer = train_tokenizer(folder, 400)
    (folder / 'tokenizer_config.json').write_text(json.dumps(dict(
        eos_token='<|endoftext|>', model_max_length=64, tokenizer_class='PreTrainedTokenizerFast')))
    save_model(folder, 'Llama', vocab_size=tokenizer.get_vocab_size(), num_attention_heads=4,
               num_key_value_heads=2, eos_token_id=tokenizer.token_to_id('<|endoftext|>'))
    assert (transformers.AutoTokenizer.from_pretrained(folder).eos_token_id
            == tokenizer.token_to_id('<|endoftext|>'))
    return folder


def both_adapters(folder, batch_size=3):
    """lm_eval's hf adapter and ours on the same folder, causal mask, float32, 64 tokens of context."""
    from lm_eval.models.huggingface import HFLM
    from harness import StableMaskLM
    hf = HFLM(pretrained=str(folder), device='cpu', batch_size=batch_size, dtype='float32', max_length=64)
    checkpoint = load_checkpoint(str(folder))
    ours = StableMaskLM(model_from_checkpoint(checkpoint, block_size=64).eval(), checkpoint['meta'], 'cpu',
                        torch.autocast('cpu', enabled=False), batch_size)
    return hf, ours


def requests(kind, arguments):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_harness_adapter_equals_its_hf_adapter(llama_folder):
    """Our adapter's log-likelihoods, greedy flags, rolling log-likelihoods (texts longer than the
    context: several windows) and greedy generations equal lm_eval's own Hugging Face adapter's on
    the same Llama folder: the same tokens scored the same way."""
    from pydoc_data.topics import topics
    hf, ours = both_adapters(llama_folder)
    pairs = [('The function', ' returns a value'), ('x = ', '1'), ('', 'Lists are sequences'),
             ('A', ' B C D E F G H'),
             ('For loops iterate over the items of any sequence, ' * 6, 'in order.'),
             ('Raise an', ' exception ')]
    want, got = (lm.loglikelihood(requests('loglikelihood', pairs), disable_tqdm=True) for lm in (hf, ours))
    assert [flag for _, flag in got] == [flag for _, flag in want]
    assert np.allclose([v for v, _ in got], [v for v, _ in want], rtol=1e-4, atol=1e-4), (got, want)
    assert all(v < 0 for v, _ in got)
    texts = [(topics['for'][:700],), (topics['if'][:300],), ('short',)]
    want, got = (lm.loglikelihood_rolling(requests('loglikelihood_rolling', texts), disable_tqdm=True)
                 for lm in (hf, ours))
    assert np.allclose(got, want, rtol=1e-4), (got, want)
    prompts = [('def f(x):', dict(until=['\n\n'], max_gen_toks=12, do_sample=False)),
               ('The', dict(until=['.'], max_gen_toks=10, do_sample=False)),
               ('def g(y):', dict(until=['\n\n'], max_gen_toks=12, do_sample=False))]
    want, got = (lm.generate_until(requests('generate_until', prompts), disable_tqdm=True)
                 for lm in (hf, ours))
    assert got == want and any(got), (got, want)


def test_generate_until_decodes_contexts_of_any_length_as_one_batch(llama_folder):
    """generate_until: contexts of different lengths, with different stop strings and max_gen_toks,
    decode as one left-padded batch (one call of generate_tokens), each giving what it gives alone
    (batch_size 1), cut at its own stop string and its own length."""
    from pydoc_data.topics import topics
    from harness import StableMaskLM
    checkpoint = load_checkpoint(str(llama_folder))
    ours = StableMaskLM(model_from_checkpoint(checkpoint, block_size=64).eval(), checkpoint['meta'], 'cpu',
                        torch.autocast('cpu', enabled=False), batch_size=4)
    prompts = [('def f(x):', dict(until=['\n\n'], max_gen_toks=12)),
               ('The', dict(until='.', max_gen_toks=3)),
               (topics['for'][:120], dict(until=[], max_gen_toks=9)),
               (topics['if'][:40], dict(until=['\n'], max_gen_toks=7))]
    assert len({len(ours.tok_encode(context)) for context, _ in prompts}) == 4
    calls, generate_tokens = [], ours.model.generate_tokens

    def counted(*args, **kwargs):
        calls.append(args)
        return generate_tokens(*args, **kwargs)
    ours.model.generate_tokens = counted
    batched = ours.generate_until(requests('generate_until', prompts), disable_tqdm=True)
    assert len(calls) == 1
    ours.batch_size = 1
    assert batched == ours.generate_until(requests('generate_until', prompts), disable_tqdm=True)
    assert len(calls) == 5 and any(batched)
    assert len(ours.tok_encode(batched[1])) <= 3 and '.' not in batched[1]


TASK = """task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_a_local_task_through_eval_py(llama_folder, tmp_path):
    """A multiple-choice task defined here over a local file: eval.py --tasks on the folder gives the
    accuracy lm_eval's hf adapter gives (offline: the harness reads the file, downloads nothing)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from pydoc_data.topics import topics
    rng = np.random.default_rng(0)
    words = sorted({w for k in ('for', 'if', 'while') for w in topics[k].split() if w.isalpha()})
    docs = [dict(question=' '.join(rng.choice(words, 6)),
                 choices=[' ' + ' '.join(rng.choice(words, 3)) for _ in range(3)],
                 answer=int(rng.integers(3))) for _ in range(12)]
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'questions.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
    (tmp_path / 'tasks' / 'local_choice.yaml').write_text(TASK.format(path=tmp_path / 'questions.jsonl'))
    result = run_script('eval.py', f'--init_from={llama_folder}', '--tasks=local_choice',
                        f'--include_path={tmp_path / "tasks"}', '--device=cpu', '--json=True',
                        '--batch_size=4', cwd=tmp_path)
    ours = json.loads(result.stdout.strip().splitlines()[-1])['tasks']['local_choice']
    hf = lm_eval.simple_evaluate(
        model='hf', model_args=f'pretrained={llama_folder},dtype=float32,max_length=64', device='cpu',
        tasks=['local_choice'],
        task_manager=TaskManager(include_path=str(tmp_path / 'tasks'), include_defaults=False),
        batch_size=4, log_samples=False, bootstrap_iters=0)['results']['local_choice']
    assert (ours['acc'][0] == pytest.approx(hf['acc,none'])
            and ours['acc_norm'][0] == pytest.approx(hf['acc_norm,none']))
    assert 0 <= ours['acc'][0] <= 1
    result = run_script('eval.py', f'--init_from={llama_folder}', '--tasks=no_such_task', '--device=cpu',
                        cwd=tmp_path, expect_ok=False)
    assert (result.returncode == 1 and 'no task no_such_task' in result.stderr
            and 'Traceback' not in result.stderr)
