"""FSDP2 and sharded checkpoints (sharded.py) with 2 CPU processes over gloo: the loss curve of one
process, resume across world sizes, a kill -9 during a save, every attention path sharded, sample.py
and consolidation, and a pretrained folder loaded with each rank reading only its shards."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script
import checkpoint
from checkpoint import load_checkpoint
# workdir: the data/pydoc_char fixture
from test_train import TINY, assert_same_rows, rows_of, worker_pids, workdir  # noqa: F401

FSDP = [*TINY, '--dropout=0.1', '--gradient_accumulation_steps=4', '--lr_decay_iters=40',
        '--eval_interval=10']


@pytest.fixture(scope='module')
def alone(workdir):
    """The reference: 40 steps in one process, no sharding."""
    run_script('train.py', *FSDP, '--max_iters=40', '--out_dir=out-alone', cwd=workdir)
    return rows_of(workdir / 'out-alone')


@pytest.mark.slow
def test_fsdp_follows_one_process_and_resumes_on_any_number(workdir, alone):
    """FSDP on 2 processes for 20 steps, resumed on 1 (a world of one) to 30, then on 4 to 40: the log
    of one unsharded process, step for step (dropout on), and each save a sharded checkpoint."""
    run_script('train.py', *FSDP, '--fsdp=True', '--max_iters=20', '--out_dir=out-fsdp',
               cwd=workdir, torchrun=2)
    out = workdir / 'out-fsdp'
    assert (os.path.islink(out / 'ckpt.dcp') and os.readlink(out / 'ckpt.dcp') == 'ckpt.dcp.20'
            and not (out / 'ckpt.pt').exists())
    # the one before is gone
    assert sorted(p.name for p in out.iterdir()) == ['ckpt.dcp', 'ckpt.dcp.20', 'log.jsonl', 'train.lock']
    one = run_script('train.py', '--init_from=resume', '--out_dir=out-fsdp', '--max_iters=30', cwd=workdir)
    assert 'on 1 process(es)' in one.stdout
    four = run_script('train.py', '--init_from=resume', '--out_dir=out-fsdp', '--max_iters=40',
                      cwd=workdir, torchrun=4)
    assert 'on 4 process(es)' in four.stdout
    assert_same_rows(rows_of(out), alone)


@pytest.mark.slow
def test_a_run_changes_between_ddp_and_fsdp_when_it_resumes(workdir, alone):
    """A single-file run resumed with --fsdp=True (each rank keeps its part of the model and of AdamW's
    state), then resumed again with --fsdp=False (the sharded checkpoint read whole): the log of one
    unsharded process, and each save leaves only its own form of checkpoint behind."""
    out = workdir / 'out-both'
    run_script('train.py', *FSDP, '--max_iters=20', f'--out_dir={out.name}', cwd=workdir)
    run_script('train.py', '--init_from=resume', f'--out_dir={out.name}', '--max_iters=30', '--fsdp=True',
               cwd=workdir, torchrun=2)
    assert (out / 'ckpt.dcp').exists() and not (out / 'ckpt.pt').exists()
    run_script('train.py', '--init_from=resume', f'--out_dir={out.name}', '--max_iters=40', '--fsdp=False',
               cwd=workdir, torchrun=2)
    assert (out / 'ckpt.pt').exists() and not (out / 'ckpt.dcp').exists()
    assert not [p for p in out.iterdir() if p.name.startswith('ckpt.dcp')]
    assert_same_rows(rows_of(out), alone)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the ranks in /proc (Linux)')
def test_kill_9_during_a_sharded_save_loses_nothing(workdir):
    """kill -9 of every process while they save (every step here): what ckpt.dcp names is whole, the
    half-written folder is removed by the next run, which resumes."""
    out = workdir / 'out-killed-fsdp'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(REPO, 'train.py'), *FSDP, '--fsdp=True', '--eval_interval=1', '--eval_iters=1',
               '--max_iters=100000', f'--out_dir={out.name}']
    proc = subprocess.Popen(command, cwd=workdir, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saving = lambda: ((out / 'ckpt.dcp').exists()
                      and len([p for p in out.iterdir() if p.name.startswith('ckpt.dcp.')]) >= 2)
    deadline = time.time() + 120
    while len(worker_pids(proc.pid)) < 2:
        assert proc.poll() is None and time.time() < deadline, 'the ranks did not start'
        time.sleep(0.05)
    pids = [proc.pid, *worker_pids(proc.pid).values()]
    signal_all = lambda sig: [os.kill(pid, sig) for pid in pids]
    while True:
        assert proc.poll() is None and time.time() < deadline, 'no save in progress to kill'
        if saving():
            signal_all(signal.SIGSTOP)  # the launcher and both ranks, frozen where they are
            if saving():
                break
            signal_all(signal.SIGCONT)  # the save had just ended: another
        time.sleep(0.005)
    signal_all(signal.SIGKILL)  # mid-save
    proc.wait()
    saved = load_checkpoint(str(out))['iter_num']
    assert any(p.name != os.readlink(out / 'ckpt.dcp') and p.name.startswith('ckpt.dcp.')
               for p in out.iterdir())
    run_script('train.py', '--init_from=resume', f'--out_dir={out.name}', f'--max_iters={saved + 2}',
               cwd=workdir, torchrun=2)
    assert load_checkpoint(str(out))['iter_num'] == saved + 2
    assert (sorted(p.name for p in out.iterdir() if p.name.startswith('ckpt.dcp'))
            == ['ckpt.dcp', f'ckpt.dcp.{saved + 2}'])


@pytest.mark.slow
def test_sample_reads_a_sharded_checkpoint_and_one_command_consolidates_it(workdir, alone):
    out = workdir / 'out-fsdp'
    if not (out / 'ckpt.dcp').exists():
        run_script('train.py', *FSDP, '--fsdp=True', '--max_iters=40', '--out_dir=out-fsdp',
                   cwd=workdir, torchrun=2)
    greedy = ['--start=The ', '--num_samples=1', '--max_new_tokens=40', '--temperature=0', '--device=cpu']
    reference = run_script('sample.py', '--init_from=out-alone', *greedy, cwd=workdir).stdout
    assert run_script('sample.py', '--init_from=out-fsdp', *greedy, cwd=workdir).stdout == reference
    result = run_script('sharded.py', 'out-fsdp', cwd=workdir)
    assert result.stdout.strip() == 'wrote out-fsdp/ckpt.pt'
    assert run_script('sample.py', '--init_from=out-fsdp/ckpt.pt', *greedy, cwd=workdir).stdout == reference
    single, whole = (torch.load(out / 'ckpt.pt', weights_only=True),
                     torch.load(workdir / 'out-alone' / 'ckpt.pt', weights_only=True))
    for name, tensor in whole['model'].items():
        torch.testing.assert_close(single['model'][name], tensor, rtol=1e-5, atol=1e-6)
    assert (single['optimizer']['param_groups'][0]['params']
            == whole['optimizer']['param_groups'][0]['params'])
    for i, state in whole['optimizer']['state'].items():
        torch.testing.assert_close(single['optimizer']['state'][i]['exp_avg'],
                                   state['exp_avg'], rtol=1e-4, atol=1e-7)
    # the single file resumes without sharding
    folder = workdir / 'out-consolidated'
    folder.mkdir()
    os.replace(out / 'ckpt.pt', folder / 'ckpt.pt')
    run_script('train.py', '--init_from=resume', f'--out_dir={folder.name}', '--max_iters=45', cwd=workdir)
    assert load_checkpoint(str(folder))['iter_num'] == 45


def _text(s):
    """A pickle SHORT_BINUNICODE opcode."""
    return b'\x8c' + bytes([len(s.encode())]) + s.encode()


def _call(module, name, *args):
    """Pickle opcodes that look up module.name (STACK_GLOBAL, which walks a dotted name through
    attributes) and call it with string arguments."""
    return _text(module) + _text(name) + b'\x93' + b'(' + b''.join(map(_text, args)) + b't' + b'R'


def metadata_exploits(marker):
    """Pickles that would run `touch marker` if unpickled by pickle itself: through a dotted name
    inside an allowed module, builtins, a __reduce__ to os.system, and allowed names misused."""
    command = f'touch {marker}'
    ops = {
        'dotted name via an allowed module':
            _call('torch.distributed.checkpoint.metadata', 'os.system', command),
        'dotted name via torch': _call('torch', 'serialization.os.system', command),
        'a module of an allowed module': _call('torch.distributed.checkpoint.metadata', 'os', ''),
        'builtins.eval': _call('builtins', 'eval', f"__import__('os').system({command!r})"),
        'builtins.__import__': _call('builtins', '__import__', 'os'),
        'builtins.getattr': _text('builtins') + _text('getattr') + b'\x93('
        + _call('builtins', '__import__', 'os') + _text('system') + b'tR(' + _text(command) + b'tR',
        'torch.load': _call('torch', 'load', str(marker)),
    }
    exploits = {name: b'\x80\x04' + body + b'.' for name, body in ops.items()}

    class Reduce:
        def __reduce__(self):
            return (os.system, (command,))
    exploits['__reduce__ to os.system'] = pickle.dumps(Reduce())
    return exploits


@pytest.mark.slow
def test_a_strangers_sharded_checkpoint_cannot_run_code(workdir, tmp_path):
    """DCP's .metadata is a pickle: ours is read by an unpickler that builds exact (module, name) pairs
    of DCP's classes only, so metadata that would run code is refused, in one line naming the file,
    before anything is built, by every script that reads a checkpoint."""
    run_script('train.py', *TINY, '--fsdp=True', '--max_iters=2', '--eval_interval=2',
               f'--out_dir={tmp_path / "mine"}', cwd=workdir)
    metadata = tmp_path / 'mine' / 'ckpt.dcp' / '.metadata'
    good = metadata.read_bytes()
    marker = tmp_path / 'pwned'
    for name, payload in metadata_exploits(marker).items():
        metadata.write_bytes(payload)
        with pytest.raises(ValueError, match='refused because loading them could run code'):
            checkpoint.safe_metadata(str(metadata.parent))
        assert not marker.exists(), name
    # the exploit that got through before
    metadata.write_bytes(metadata_exploits(marker)['dotted name via an allowed module'])
    for script, args in (('sample.py', [f'--init_from={tmp_path / "mine"}']),
                         ('sharded.py', [tmp_path / 'mine']),
                         ('eval.py', [f'--init_from={tmp_path / "mine"}', '--dataset=pydoc_char']),
                         ('train.py', ['--init_from=resume', f'--out_dir={tmp_path / "mine"}',
                                       '--fsdp=True'])):
        result = run_script(script, *args, *(['--device=cpu'] if script != 'sharded.py' else []),
                            cwd=workdir, expect_ok=False)
        assert result.returncode == 1 and 'refused because loading them could run code' in result.stderr, \
            (script, result.stderr)
        assert (result.stderr.strip().count('\n') == 0 and os.path.realpath(metadata) in result.stderr
                and not marker.exists()), script
    metadata.write_bytes(good)
    assert checkpoint.safe_metadata(str(metadata.parent)).state_dict_metadata
    # a run.json edited to another model: one line from every script, before a byte of it is allocated
    run_json = metadata.parent / 'run.json'
    run = json.loads(run_json.read_text())
    scripts = {'sample.py': [f'--init_from={tmp_path / "mine"}', '--device=cpu'],
               'sharded.py': [tmp_path / 'mine'],
               'train.py': ['--init_from=resume', f'--out_dir={tmp_path / "mine"}', '--max_iters=4',
                            '--fsdp=True', '--device=cpu']}
    for change, message in ((dict(n_embd=64), 'its tensors do not fit its model_args'),
                            (dict(n_embd=100_000), 'its tensors do not fit its model_args'),
                            (dict(n_layer='2'), "n_layer='2': expected a positive whole number")):
        run_json.write_text(json.dumps({**run, 'model_args': {**run['model_args'], **change}}))
        # train.py refuses a model of terabytes sooner: its checkpoints would not fit on the disk
        for script, args in scripts.items() if change != dict(n_embd=100_000) else list(scripts.items())[:2]:
            result = run_script(script, *args, cwd=workdir, expect_ok=False)
            assert result.returncode == 1 and message in result.stderr, (script, result.stderr)
            assert result.stderr.strip().count('\n') == 0, (script, result.stderr)
    assert not (tmp_path / 'mine' / 'ckpt.pt').exists()


def test_a_strangers_sharded_values_cannot_run_code(workdir, tmp_path):
    """DCP stores what is not a tensor (AdamW's learning rate, betas, ...) as pickles in its data files
    and reads them with torch.load(weights_only=False). A checkpoint whose values would run code is
    refused in one line before anything is built, and DCP's loading itself goes through
    torch.load(weights_only=True)."""
    import torch.distributed.checkpoint as dcp
    run_script('train.py', *TINY, '--fsdp=True', '--max_iters=2', '--eval_interval=2',
               f'--out_dir={tmp_path / "mine"}', cwd=workdir)
    folder = os.path.realpath(tmp_path / 'mine' / 'ckpt.dcp')
    state = {}
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    _load_state_dict(state, storage_reader=checkpoint.SafeReader(folder),
                     planner=checkpoint.SafeEverythingPlanner(), no_dist=True)
    marker = tmp_path / 'pwned'

    class Reduce:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    state['optimizer']['param_groups'][0]['lr'] = Reduce()
    os.remove(os.path.join(folder, '.metadata'))
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    for script, args in (('sharded.py', [tmp_path / 'mine']),
                         ('train.py', ['--init_from=resume', f'--out_dir={tmp_path / "mine"}', '--fsdp=True',
                                       '--device=cpu'])):
        result = run_script(script, *args, cwd=workdir, expect_ok=False)
        assert result.returncode == 1 and 'optimizer.param_groups.0.lr' in result.stderr, \
            (script, result.stderr)
        assert result.stderr.strip().count('\n') == 0 and not marker.exists(), script
    planner = checkpoint.SafePlanner()
    read = torch.load  # DCP's own planner would load the value with weights_only=False
    with pytest.raises(pickle.UnpicklingError):
        buffer = io.BytesIO()
        torch.save(Reduce(), buffer)
        buffer.seek(0)
        checkpoint._load_bytes(planner, None, buffer)
    assert read is torch.load and not marker.exists()


EVERY_PATH = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ['REPO'])
from model import GPT, GPTConfig
import sharded
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
VARIANTS = [dict(), dict(attn_mask='causal'), dict(n_kv_head=1), dict(sink_logit='learned'),
            dict(sink_token='learned'), dict(pos_enc='alibi', attn_impl='reference'),
            dict(pos_enc='learned'), dict(pos_enc='none', sm_gamma=0.0, sm_offset=-1.0),
            dict(attn_mask='causal', sink_logit='zero', attn_impl='triton'), dict(attn_gate='elementwise')]
for variant in VARIANTS:
    config = GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=50), **variant})
    torch.manual_seed(0)
    whole = GPT(config)
    torch.manual_seed(0)
    parts = GPT(config)
    sharded.checkpoint_activations(parts)  # before sharding, as train.py applies it
    parts = sharded.shard(parts, sharded.mixed_precision('float32'))
    x = torch.randint(0, 50, (4, 24), generator=torch.Generator().manual_seed(1))
    whole(x, x)[1].backward()
    parts(x[rank * 2:(rank + 1) * 2], x[rank * 2:(rank + 1) * 2])[1].backward()  # each rank half the batch
    for (name, p), q in zip(whole.named_parameters(), parts.parameters()):
        grad = q.grad.full_tensor()
        assert torch.allclose(grad, p.grad, rtol=1e-4, atol=1e-6), \
            (variant, name, (grad - p.grad).abs().max().item())
if rank == 0:
    print('ok', len(VARIANTS))
dist.destroy_process_group()
'''


def test_every_attention_path_under_fsdp(tmp_path):
    """StableMask (sdpa, reference, Triton), causal, grouped-query attention, sink logits and sink
    tokens, every position encoding, with activation checkpointing: each rank's half of the batch
    sharded gives the gradients of the whole batch unsharded."""
    script = tmp_path / 'every_path.py'
    script.write_text(EVERY_PATH)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             '--nproc_per_node=2', str(script)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'REPO': REPO, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0 and 'ok 10' in result.stdout, result.stderr[-3000:]


LOAD_SHARDS = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ['REPO'])
from checkpoint import from_pretrained, load_checkpoint
from model import GPT, GPTConfig
import sharded
folder, sharded_load = sys.argv[1], sys.argv[2] == 'sharded'
if sharded_load:
    dist.init_process_group('gloo')
checkpoint = load_checkpoint(folder, weights=False)
with torch.device('meta'):
    model = GPT(GPTConfig(**checkpoint['model_args']))
def memory(field):  # bytes, from Linux's /proc: VmRSS now, VmHWM the peak so far
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(field))
before = memory('VmRSS')
if sharded_load:
    model = sharded.shard(model, sharded.mixed_precision('float32'))
    model.to_empty(device='cpu')
    sharded.load_pretrained(model, folder)
else:
    model = from_pretrained(folder)
grown = memory('VmHWM') - before
print(f'grown {grown}\n', end='', flush=True)  # one write: two ranks' lines do not interleave
if sharded_load:
    reference = from_pretrained(folder).state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), reference[name]), name
    dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads memory from /proc (Linux)')
def test_a_pretrained_folder_is_read_shard_by_shard(tmp_path):
    """Under FSDP each rank reads from the safetensors (memory-mapped) only the rows it keeps: its
    peak memory grows by about its half of the model's float32 size, where loading it whole grows
    by more than all of it (here a random Llama of 88M parameters, saved in bf16 in 50 MB files)."""
    transformers = pytest.importorskip('transformers')
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                      num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / 'llama', max_shard_size='50MB')
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    script = tmp_path / 'load.py'
    script.write_text(LOAD_SHARDS)
    env = {**os.environ, 'REPO': REPO, 'OMP_NUM_THREADS': '1'}
    whole = subprocess.run([sys.executable, str(script), str(tmp_path / 'llama'), 'whole'],
                           capture_output=True, text=True, env=env)
    parts = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                            '--nproc_per_node=2', str(script), str(tmp_path / 'llama'), 'sharded'],
                           capture_output=True, text=True, env=env, timeout=600)
    assert whole.returncode == 0 and parts.returncode == 0, whole.stderr[-2000:] + parts.stderr[-2000:]
    grown_whole = int(whole.stdout.split()[1])
    grown_ranks = [int(line.split()[1]) for line in parts.stdout.splitlines() if line.startswith('grown')]
    assert len(grown_ranks) == 2 and grown_whole > fp32
    assert all(g < 0.65 * fp32 for g in grown_ranks), (grown_ranks, fp32)
    print(f"float32 model {fp32 / 2**20:.0f} MiB: loaded whole +{grown_whole / 2**20:.0f} MiB, "
          f"each of 2 ranks +{max(grown_ranks) / 2**20:.0f} MiB")


@pytest.mark.slow
def test_fsdp_fine_tunes_a_pretrained_folder(tmp_path):
    """train.py --fsdp=True --init_from=<Hugging Face folder> on 2 processes: the model is built on the
    meta device and each rank reads its shards; its first evaluation is the whole model's, and it
    trains from there into a sharded checkpoint that sample.py reads."""
    from test_pretrained import save_model, train_tokenizer
    folder = tmp_path / 'llama'
    folder.mkdir()
    tokenizer = train_tokenizer(folder, 300)
    save_model(folder, 'Llama', vocab_size=tokenizer.get_vocab_size(), num_attention_heads=4,
               num_key_value_heads=2, eos_token_id=tokenizer.token_to_id('<|endoftext|>'),
               dtype=torch.bfloat16, shard='100KB')
    run_script('prepare_data.py', f'--tokenizer={folder}', cwd=tmp_path)
    common = [f'--init_from={folder}', '--dataset=pydoc_llama', '--block_size=32', '--batch_size=4',
              '--eval_iters=2', '--gradient_accumulation_steps=2', '--attn_mask=stablemask', '--device=cpu']
    step0 = lambda out: float(out.split('val loss ')[1].split()[0])
    whole = step0(run_script('train.py', *common, '--eval_only=True', cwd=tmp_path).stdout)
    run_script('train.py', *common, '--fsdp=True', '--max_iters=4', '--eval_interval=4', '--out_dir=out-ft',
               cwd=tmp_path, torchrun=2)
    rows = [json.loads(line) for line in (tmp_path / 'out-ft' / 'log.jsonl').read_text().splitlines()]
    assert rows[0]['iter'] == 0 and abs(rows[0]['val_loss'] - whole) < 1e-4, (rows[0], whole)
    assert load_checkpoint(str(tmp_path / 'out-ft'))['iter_num'] == 4
    out = run_script('sample.py', '--init_from=out-ft', '--start=The ', '--num_samples=1',
                     '--max_new_tokens=8', '--device=cpu', cwd=tmp_path).stdout
    assert out.startswith('The ') and out.endswith('\n---------------\n')
