"""
Pretrain or fine-tune a StableMask GPT: one process on a CPU or a GPU, or many under torchrun.

    python train.py config/train_shakespeare_char.py             # one process
    torchrun --standalone --nproc_per_node=8 train.py config/wikitext103_160m.py      # one node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 \\
        --master_port=29500 train.py config/pile_1.4b.py         # node 0 of 2 (node 1: --node_rank=1)

The settings below are overridden by config files, then by --key=value (configurator.py); --help
lists them. init_from='resume' continues the run in out_dir exactly where it stopped, with the
settings it was started with (only what this command line gives changes, and is printed).
init_from=<checkpoint> fine-tunes that model on `dataset` with a fresh optimizer: the architecture
is the checkpoint's; block_size, dropout and the attention settings are too unless given here (so a
causal model can become a StableMask one). A run never replaces another in out_dir unless
overwrite=True. Ctrl-C or SIGTERM finishes the current step, saves out_dir/ckpt.pt and exits with
status 130 or 143 (stopped, not finished).
"""

import atexit
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import run_dir
import sharded
from checkpoint import checkpoint_file, is_sharded, load_checkpoint, model_from_checkpoint, read_whole
import configurator
from configurator import autocast_for, check_rules, configure_script, gpu_peak_flops, resolve_device
from corpus import CorpusError, dataset_folder, random_windows, read_dataset
from model import CONFIG_CHOICES, GPT, GPTConfig
from tokenizer import tokenizer_mismatch

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
overwrite = False  # start afresh (or fine-tune) where out_dir holds a run, replacing its checkpoint and log
eval_interval = 250  # evaluate, and save out_dir/ckpt.pt, every this many steps
log_interval = 10
eval_iters = 50  # batches per evaluation
eval_only = False
init_from = 'scratch'  # 'scratch', 'resume' (out_dir's run), a checkpoint file or folder, a HF LLaMA folder
auto_resume = False  # continue out_dir's run if there is one, else do as init_from says (scheduler requeues)
# data
dataset = 'pydoc_char'  # a folder made by prepare_data.py: a name under data/, or a path
gradient_accumulation_steps = 1  # micro-batches per step over all processes: a multiple of the process count
batch_size = 32  # sequences per micro-batch
block_size = 256
# model (when resuming or fine-tuning, the architecture is the checkpoint's)
n_layer = 4
n_head = 4
n_kv_head = None  # key/value heads (grouped-query), each for n_head // n_kv_head query heads; None: n_head
n_embd = 128
dropout = 0.0
bias = False
attn_mask = 'stablemask'  # 'stablemask' or 'causal'
sm_gamma = None  # None: per-head ALiBi slopes (the paper's); a float: one decay for every head
sm_offset = 0.0  # added to every pseudo score (with sm_gamma=0.0: the paper's 'constant' pseudo value)
sink_logit = 'none'  # 'learned' (gpt-oss) or 'zero' (softmax off by one): logit of a virtual key of value 0
sink_token = 'none'  # 'learned' or 'fixed': an embedding prepended to each sequence (paper's sink baselines)
attn_gate = 'none'  # 'elementwise': a sigmoid gate per head and channel on attention's output (Qwen3-Next)
pos_enc = 'rope'  # 'rope', 'alibi', 'learned', 'none'
attn_impl = 'auto'  # 'auto', 'triton', 'sdpa', 'reference'
# AdamW
learning_rate = 1e-3
max_iters = 2000  # raise it when resuming to extend a run
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.98
grad_clip = 1.0  # 0 turns clipping off
# learning rate: linear warmup, then decay to min_lr by lr_decay_iters
lr_schedule = 'cosine'  # 'cosine', 'linear' or 'constant'
warmup_iters = 100
lr_decay_iters = 0  # 0: max_iters
min_lr = 1e-4
# turning a causal model into a StableMask one
mask_warmup_iters = 0  # steps to grow the pseudo mass linearly from 0 (the causal model) to StableMask's
# many processes (torchrun): DDP replicates the model, FSDP shards it (one process: a world of one)
fsdp = False  # shard weights, gradients, AdamW's state over processes (FSDP2; checkpoints too, in ckpt.dcp)
activation_checkpointing = False  # recompute each block's activations in the backward (long sequences)
backend = 'auto'  # 'nccl' on GPUs, 'gloo' on CPUs
ddp_timeout = 900  # seconds a process waits for the others (rank 0's eval, a first compile) before giving up
# system
device = 'auto'  # 'cuda', 'cuda:1', 'cpu', ...; auto: this process's GPU, or the CPU
dtype = 'auto'  # float32, bfloat16 or float16 (autocast; float16 adds a GradScaler); auto: bf16 on GPUs
compile = False  # torch.compile the model
peak_flops = 0.0  # the hardware's peak FLOP/s for MFU; 0: looked up for A100 / H100 / H200, none on CPUs
seed = 1337
# -----------------------------------------------------------------------------
# what each setting allows; configurator.check_rules applies them, to config files and --key=value alike
RULES = dict(
    eval_interval='>0', log_interval='>0', eval_iters='>0', gradient_accumulation_steps='>0',
    batch_size='>0', block_size='>0', n_layer='>0', n_head='>0', n_kv_head='>0', n_embd='>0',
    dropout='>=0, <1', sm_gamma='>=0', learning_rate='>=0', max_iters='>=0', weight_decay='>=0',
    beta1='>=0, <1', beta2='>=0, <1', grad_clip='>=0', warmup_iters='>=0', lr_decay_iters='>=0',
    min_lr='>=0', mask_warmup_iters='>=0', ddp_timeout='>0', peak_flops='>=0', **CONFIG_CHOICES,
    lr_schedule=('cosine', 'linear', 'constant'), backend=('auto', 'nccl', 'gloo'),
    dtype=('auto', 'float32', 'bfloat16', 'float16'))
# a checkpoint's own; never changed by resuming or fine-tuning
ARCHITECTURE = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'bias', 'pos_enc', 'sink_logit', 'sink_token',
                'attn_gate')
# the same model with another mask: a fine-tune, not a resumed run
ATTENTION = ('attn_mask', 'sm_gamma', 'sm_offset')
ADJUSTABLE = ('block_size', 'dropout') + ATTENTION  # a fine-tune keeps the checkpoint's unless given
MODEL_DEFAULTS = vars(GPTConfig())  # for checkpoints older than a setting
# what this command does with a run, not the run: never restored
WHERE = ('out_dir', 'init_from', 'auto_resume', 'overwrite', 'eval_only')

config, given = configure_script(globals(), sys.argv[1:], rules=RULES)
# the process's place among torchrun's, set after the settings are read so that they never become a
# run's setting: a run saved by 2 processes resumes on any number
rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
ddp, master = 'RANK' in os.environ, rank == 0
bar = None  # the progress bar, while training


def fail(message):
    """One line on rank 0 (every process of a torchrun meets the same bad input), exit 1."""
    if master and bar is not None:
        bar.close()  # the progress bar's line ends before the error's
    configurator.fail(message, quiet=not master)


def say(message):
    if master:
        print(message)


def resumed_config(checkpoint):
    """The settings the run in out_dir was started with, and over them what this command line gives."""
    if given.get('overwrite'):
        fail("overwrite=True starts a new run: it does not go with init_from=resume")
    saved = {k: v for k, v in checkpoint.get('config', {}).items() if k in config and k not in WHERE}
    merged = {**config, **saved, **given}
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in given.items()
               if k in saved and saved[k] != v and k != 'init_from']
    if not (type(checkpoint.get('iter_num')) is int and checkpoint['iter_num'] >= 0):
        fail(f"{out_dir}: its checkpoint's step is {checkpoint.get('iter_num')!r}, not a whole number")
    say(f"resuming {out_dir} at step {checkpoint['iter_num']}"
        + (f"; changed: {', '.join(changed)}" if changed else ''))
    if merged['max_iters'] <= checkpoint['iter_num'] and not merged['eval_only']:
        say(f"max_iters={merged['max_iters']} is not past the checkpoint's step: nothing to train "
            f"(raise it to extend the run)")
    try:
        check_rules(merged, RULES)
    except ValueError as e:
        fail(e)
    return merged


def has_checkpoint(folder):
    return os.path.exists(os.path.join(folder, 'ckpt.pt')) or is_sharded(folder)


def check_against_checkpoint(model_args, source):
    """The architecture comes from the checkpoint: a different one given here is refused, not ignored."""
    for key in ARCHITECTURE + (ATTENTION if init_from == 'resume' else ()):
        theirs = model_args.get(key, MODEL_DEFAULTS[key])
        if key in given and given[key] != theirs:
            hint = ('fine-tune it into another out_dir instead' if key in ATTENTION
                    else 'the architecture is the checkpoint\'s')
            fail(f"{key}={given[key]!r}, but {source} has {key}={theirs!r}: {hint}")


def read_checkpoint(source):
    """load_checkpoint(source), or one line and exit 1."""
    try:
        # under FSDP each rank reads its shards later
        return load_checkpoint(source, 'cpu', weights=not fsdp)
    except ValueError as e:
        if (init_from == 'resume' and not has_checkpoint(out_dir)
                and os.path.exists(os.path.join(out_dir, 'log.jsonl'))):
            fail(f"{e}: the run there stopped before its first save; "
                 f"the same command without --init_from=resume starts it again")
        fail(e)


def torchrun_job():
    """What the attempts of one torchrun job share and no other job does. That is its rendezvous id,
    or where it has none ('none' unless --rdzv_id is given) the torchrun process that starts this
    node's attempts, our parent. None outside torchrun."""
    if 'TORCHELASTIC_RESTART_COUNT' not in os.environ:
        return None
    run_id = os.environ.get('TORCHELASTIC_RUN_ID', 'none')
    return run_id if run_id != 'none' else f"{socket.gethostname()}:{os.getppid()}"


# A run that continues by itself: torchrun --max-restarts starts the same command again after a failure
# (TORCHELASTIC_RESTART_COUNT says which restart), and with auto_resume so does a scheduler's requeue.
# Either continues the run in out_dir; a restart, only the run this job started (it is saved with it).
JOB, restart = torchrun_job(), int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))
checkpoint = None
if init_from != 'resume' and (auto_resume or restart) and has_checkpoint(out_dir):
    held = read_checkpoint(out_dir)
    if auto_resume or held.get('job') == JOB:
        say(f"{out_dir}: continuing its run "
            f"({'auto_resume' if auto_resume else f'restart {restart} of this torchrun job'})")
        checkpoint, init_from = held, 'resume'
        for key in ('init_from', 'overwrite'):  # the command line that started the run: not a change to it
            given.pop(key, None)
        config.update(init_from='resume', overwrite=False)

# a run to resume brings its settings, before anything else is decided
if init_from != 'scratch':
    source = out_dir if init_from == 'resume' else init_from
    checkpoint = checkpoint or read_checkpoint(source)
    check_against_checkpoint(checkpoint['model_args'], checkpoint_file(source))
    if init_from == 'resume':
        config = resumed_config(checkpoint)
    else:
        kept = ARCHITECTURE + tuple(k for k in ADJUSTABLE if k not in given)
        config.update({k: checkpoint['model_args'].get(k, MODEL_DEFAULTS[k]) for k in kept})
    globals().update(config)

# the rest of the settings, checked together before any process group, folder or file is made
try:
    # the model's own checks, before any data is read
    GPTConfig(**{k: v for k, v in config.items() if k in MODEL_DEFAULTS})
    device = resolve_device(device)
except ValueError as e:
    fail(e)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
# a sharded run continued unsharded: read it whole
if init_from == 'resume' and not fsdp and 'sharded' in checkpoint:
    checkpoint = {**checkpoint, **read_whole(checkpoint['sharded'])}
if fsdp and dtype == 'float16':
    fail("fsdp=True takes bfloat16 or float32 (float16's loss scaling is not sharded here)")
if mask_warmup_iters and attn_mask != 'stablemask':
    fail(f"mask_warmup_iters={mask_warmup_iters} grows StableMask's pseudo mass, "
         f"but attn_mask={attn_mask!r}: pass --attn_mask=stablemask")
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not a multiple of the "
         f"{world_size} processes: pass --gradient_accumulation_steps="
         f"{world_size * max(1, gradient_accumulation_steps // world_size)} (each process then runs "
         f"{max(1, gradient_accumulation_steps // world_size)} micro-batch(es) of {batch_size} a step)")

# data
data_dir = dataset_folder(dataset)


def read_meta(data_dir):
    """meta.json, after checking that the token files are whole and long enough for block_size."""
    try:
        meta = read_dataset(data_dir)
    except CorpusError as e:
        fail(e)
    for split in ('train', 'val'):
        if meta[f"{split}_tokens"] <= block_size:
            fail(f"the {split} split of {data_dir} has {meta[f'{split}_tokens']} tokens, "
                 f"too few for block_size {block_size}")
    return meta


def check_tokenizer(old, source):
    """A checkpoint continues only on data tokenized its way, or its ids would mean other text."""
    if old is None:
        return say(f"warning: {source} does not say which tokenizer it was trained with; "
                   f"{data_dir}'s is assumed")
    problem = tokenizer_mismatch(old, meta, source, data_dir)
    if problem:
        fail(problem)


meta = read_meta(data_dir)
if checkpoint is not None:
    check_tokenizer(checkpoint.get('meta'), checkpoint_file(source))


def key_seed(*key):
    """A random seed that depends only on (seed, *key)."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0])


def batch_generator(*key):
    """Random numbers that depend only on (seed, *key). A micro-batch is fixed by its step and its
    index among all processes, so a resumed run, or the same run on any number of processes, sees
    the same data."""
    return torch.Generator().manual_seed(key_seed(*key))


def get_batch(split, generator):
    path = os.path.join(data_dir, f"{split}.bin")
    # the ids read are checked against the vocabulary: a mixed or edited dataset is one line
    try:
        x, y = random_windows(path, meta['dtype'], meta[f"{split}_tokens"], block_size, batch_size,
                              generator, meta['vocab_size'])
    except CorpusError as e:
        if not master:  # each process reads its own batches: the one that meets it says so
            print(f"train.py: error: rank {rank}: {e}", file=sys.stderr)
        fail(e)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# processes: DDP or FSDP when torchrun set RANK; FSDP in one process is a world of one
if backend == 'auto':
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
if device_type == 'cuda':
    torch.cuda.set_device(device)
if ddp:
    # torchrun's restarts share one store, where a worker may read the addresses the last attempt's
    # workers left there (and fail to connect): this attempt's keys go under a prefix of their own
    store, _, _ = next(dist.rendezvous('env://', timeout=timedelta(seconds=ddp_timeout)))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt {restart}", store), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=ddp_timeout))
elif fsdp:
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
gradient_accumulation_steps //= world_size  # now per process
CHECKPOINT = sharded.LINK if fsdp else 'ckpt.pt'  # what this run saves in out_dir
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
dtype, autocast = autocast_for(device, dtype)
if fsdp:
    # FSDP's mixed-precision policy casts the weights instead (sharded.mixed_precision)
    autocast = nullcontext()
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
model_args = dict(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                  block_size=block_size, bias=bias, vocab_size=meta['vocab_size'], dropout=dropout,
                  attn_mask=attn_mask, sm_gamma=sm_gamma, sm_offset=sm_offset, sink_logit=sink_logit,
                  sink_token=sink_token, attn_gate=attn_gate, pos_enc=pos_enc, attn_impl=attn_impl)
adjusted = {k: model_args[k] for k in ADJUSTABLE + ('attn_impl',)}
if checkpoint is not None:
    model_args = {**checkpoint['model_args'], **adjusted}


def checkpoint_bytes():
    """About what ckpt.pt will take: float32 weights and AdamW's two moments, 12 bytes a parameter.
    Counted on the meta device, so nothing is allocated."""
    try:
        with torch.device('meta'):
            return 12 * GPT(GPTConfig(
                **{k: v for k, v in model_args.items() if k in MODEL_DEFAULTS})).get_num_params()
    except ValueError:
        return 0  # model_from_checkpoint below says what does not fit


def out_dir_problem():
    """Why this run cannot be written to out_dir (one line), or None once rank 0 holds it (run_dir.py)."""
    global out_dir_lock
    try:
        out_dir_lock, made, note = run_dir.claim(out_dir, checkpoint_bytes())
    except ValueError as e:
        return str(e)
    problem = None
    if init_from != 'resume' and not overwrite and has_checkpoint(out_dir):
        problem = (f"{out_dir} holds a run already: continue it with --init_from=resume, "
                   f"choose another --out_dir, or replace it with --overwrite=True")
    elif (init_from not in ('scratch', 'resume') and os.path.abspath(checkpoint_file(init_from))
          == os.path.abspath(os.path.join(out_dir, 'ckpt.pt'))):
        problem = f"init_from={init_from} is the checkpoint this run would write: choose another --out_dir"
    if problem:
        run_dir.release(out_dir_lock, made)
        return problem
    # a run that never started leaves nothing
    atexit.register(lambda: run_dir.release(out_dir_lock, () if started else made))
    if note:
        say(note)
    if init_from != 'resume' and os.path.exists(os.path.join(out_dir, 'log.jsonl')) and not overwrite:
        say(f"{out_dir} has a log.jsonl but no checkpoint (a run stopped before its first save): "
            f"starting there afresh")
    return None


def agree(problem):
    """Rank 0's verdict, for every process: one line from rank 0 and exit 1 everywhere, or go on."""
    if ddp:
        flag = torch.tensor([float(problem is not None)], device=device)
        dist.broadcast(flag, 0)
        problem = problem if master else '' if flag.item() else None
    if problem is not None:
        fail(problem)


out_dir_lock, started = None, False
if not eval_only:  # an evaluation only reads the run
    agree(out_dir_problem() if master else None)

# model
iter_num, best_val_loss = 0, math.inf
# sharded, or a Hugging Face folder: each rank reads its part
lazy = fsdp and checkpoint is not None and 'model' not in checkpoint
try:
    if init_from == 'scratch':
        # every rank alike (the seed); under FSDP each then keeps its shards
        model = GPT(GPTConfig(**model_args))
    elif lazy:
        with torch.device('meta'):  # no memory until sharded
            model = GPT(GPTConfig(**model_args))
    else:
        model = model_from_checkpoint(checkpoint, **adjusted)
except ValueError as e:
    fail(f"{checkpoint_file(source)}: {e}" if init_from != 'scratch' else e)
if init_from != 'scratch':
    if model.config.vocab_size < meta['vocab_size']:
        fail(f"{data_dir} has a vocabulary of {meta['vocab_size']}, "
             f"the model's is {model.config.vocab_size}")
    if init_from == 'resume':
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    else:  # fine-tuning starts a fresh optimizer and schedule
        say(f"fine-tuning {init_from}: {', '.join(f'{k}={model_args[k]}' for k in ADJUSTABLE)}")
if activation_checkpointing:
    sharded.checkpoint_activations(model)
if fsdp:
    model = sharded.shard(model if lazy else model.to(device), sharded.mixed_precision(dtype))
    if lazy:
        model.to_empty(device=device)
        model.set_constants(device)
else:
    model.to(device)
raw_model = model
cfg = raw_model.config  # what was actually built or loaded, for the start-up line

optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if lazy and 'sharded' in checkpoint:
    try:
        sharded.load(model, optimizer if init_from == 'resume' else None, checkpoint['sharded'])
    except ValueError as e:  # a folder edited or damaged since it was saved
        fail(e)
elif lazy:
    sharded.load_pretrained(model, checkpoint['pretrained'])
elif init_from == 'resume' and fsdp:  # a single-file run continued sharded: each rank keeps its part
    sharded.load_whole_optimizer(model, optimizer, checkpoint['optimizer'])
elif init_from == 'resume':
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
saved_at = iter_num if init_from == 'resume' else None
# the step whose evaluation a resumed run does not repeat
resumed_at = saved_at if init_from == 'resume' and checkpoint.get('evaluated', True) else None
checkpoint = None  # free the memory
if compile:
    model = torch.compile(model)
if ddp and not fsdp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)


def save(evaluated=True):
    """Save out_dir/ckpt.pt atomically. A disk that refuses it ends the run in one line, and the last
    checkpoint stays whole. evaluated=False: this step's evaluation is due but a stop came first, so
    a resumed run does it."""
    global saved_at
    run = dict(model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss,
               config=config, meta=meta, job=JOB, evaluated=evaluated)
    path = os.path.join(out_dir, CHECKPOINT)
    try:
        if fsdp:  # every rank writes its shards
            sharded.save(model, optimizer, run, out_dir, master)
        else:
            state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                         scaler=scaler.state_dict())
            run_dir.save_checkpoint(dict(**state, **run), path)
        # a run resumed in the other form leaves no older checkpoint of the first behind
        if master and fsdp and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
            os.remove(os.path.join(out_dir, 'ckpt.pt'))
        elif master and not fsdp:
            sharded.remove(out_dir)
    except OSError as e:
        free = shutil.disk_usage(out_dir).free / 2**20
        kept = (f"the checkpoint of step {saved_at} is kept" if saved_at is not None
                else "no checkpoint was saved")
        fail(f"cannot save {path} at step {iter_num}: {e.strerror or e} ({free:,.0f} MiB free there, "
             f"a checkpoint takes about {checkpoint_bytes() / 2**20:,.0f} MiB); {kept}")
    saved_at = iter_num


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches of each split, the same batches at every evaluation.
    None when a stop is asked for meanwhile: the evaluation is abandoned, not waited for."""
    raw_model.eval()
    losses = {}
    try:
        for s, split in enumerate(('train', 'val')):
            total = 0.0
            for k in range(eval_iters):
                # FSDP: every rank evaluates, so all decide
                if stop_signal is not None if not fsdp else stop_requested():
                    return None
                x, y = get_batch(split, batch_generator(1 + s, k))
                with autocast:
                    total += raw_model(x, y)[1].item()
            losses[split] = total / eval_iters
    finally:
        raw_model.train()
    return losses


def pseudo_scale(it):
    """The share of StableMask's pseudo mass at step it. It is 0 at the first step of a mask warm-up
    (the causal model's loss, exactly), then grows linearly to 1. It is linear in the mass, not in
    its log: while the mass is small, what a row gives the virtual key (about mass / real mass), and
    so the change to every output, grows in proportion, a step at a time. A ramp of the log would
    spend most steps at no mass and switch at the end."""
    return 1.0 if it >= mask_warmup_iters else it / mask_warmup_iters


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == 'constant':
        return learning_rate
    decay_iters = lr_decay_iters or max_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    coeff = 0.5 * (1 + math.cos(math.pi * ratio)) if lr_schedule == 'cosine' else 1 - ratio
    return min_lr + coeff * (learning_rate - min_lr)


def log(record):
    # strict JSON: a number that is not finite is null (json.dumps would write NaN, JSON readers refuse)
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record, allow_nan=False) + '\n')


def check_divergence(loss_sum, norm):
    """End the run, on every process at once, when this step's loss or gradient norm is not finite.
    This comes before the optimizer takes the step: no weights are made from it, and no checkpoint.
    Under float16 a gradient that overflowed is the GradScaler's to handle: it skips the step and
    halves its scale. Returns whether this step will be skipped. Such a run diverges when the loss
    is not finite, or when the scale falls below 1 (train)."""
    # under FSDP a DTensor, the same on every rank
    norm = norm.full_tensor() if hasattr(norm, 'full_tensor') else norm
    bad = torch.stack([~torch.isfinite(loss_sum), ~torch.isfinite(norm)]).float()
    if ddp:
        dist.all_reduce(bad)  # the loss is each process's own
    loss_bad, norm_bad = bad.tolist()
    if loss_bad or (norm_bad and not scaler.is_enabled()):
        diverged(f"the loss is {loss_sum.item():.4g}" if loss_bad
                 else f"the gradient norm is {norm.item():.4g}")
    return norm_bad > 0


def diverged(what):
    """One line on rank 0 naming the step and what to try, then every process exits 1.
    The last checkpoint stays."""
    kept = (f"{out_dir}/{CHECKPOINT} still holds step {saved_at}" if saved_at is not None
            else "no checkpoint was saved")
    tips = [f"a lower --learning_rate (now {learning_rate:g})", f"more --warmup_iters (now {warmup_iters})"]
    tips += ["--grad_clip=1.0"] if not 0 < grad_clip <= 1 else []
    tips += ["--dtype=bfloat16 or float32"] if dtype == 'float16' else []
    fail(f"step {iter_num}: the run diverged ({what}); nothing from this step on is saved, {kept}. Try "
         f"{', '.join(tips[:-1])} or {tips[-1]}")


def prepare_out_dir():
    """Make out_dir ready for this run: no temporary checkpoint left by a killed save, a fresh log
    for a new run, and for a resumed one no rows past its checkpoint's step."""
    run_dir.remove_stale_temporaries(out_dir)
    sharded.remove_stale(out_dir)
    if init_from == 'resume':
        note = run_dir.trim_log(os.path.join(out_dir, 'log.jsonl'), iter_num)
        if note:
            say(note)
        return
    for name in ('ckpt.pt', 'log.jsonl'):  # a log without a checkpoint, or overwrite=True (checked above)
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    sharded.remove(out_dir)


stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum
    signal.signal(signum, signal.SIG_DFL)  # a second one stops at once (the last checkpoint stays whole)


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def stop_requested():
    """Whether any process was asked to stop; under torchrun all decide together, at the same step."""
    flag = torch.tensor(float(stop_signal is not None), device=device)
    if ddp:
        dist.all_reduce(flag)
    return flag.item() > 0


def train():
    global iter_num, best_val_loss, bar
    # float32 runs at a lower peak
    peak = peak_flops or (gpu_peak_flops(device) if dtype != 'float32' else None)
    bar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, unit='step')
    t_last, iter_last = time.time(), iter_num
    stopping = False  # with DDP, decided by all processes together at an evaluation or a log step
    while True:
        raw_model.scale_pseudo_mass(pseudo_scale(iter_num))
        if not stopping and (eval_only or iter_num % eval_interval == 0 and iter_num != resumed_at):
            # under DDP the others wait in stop_requested
            losses = estimate_loss() if master or fsdp else None
            if losses is not None:
                best_val_loss = min(best_val_loss, losses['val'])
                if master:
                    bar.write(f"step {iter_num}: train loss {losses['train']:.4f}, "
                              f"val loss {losses['val']:.4f}")
                if master and not eval_only:
                    log(dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val']))
            if (master or fsdp) and iter_num > 0 and not eval_only:
                save(evaluated=losses is not None)  # even when a stop abandoned the evaluation
            stopping = stop_requested()
            t_last = time.time()  # evaluation is not training time
        if eval_only or iter_num >= max_iters or stopping:
            break

        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(gradient_accumulation_steps):
            # among all processes' micro-batches of the step
            index = rank * gradient_accumulation_steps + micro_step
            x, y = get_batch('train', batch_generator(0, iter_num, index))
            # dropout too is the micro-batch's, on any number of processes
            torch.manual_seed(key_seed(3, iter_num, index))
            last = micro_step == gradient_accumulation_steps - 1
            if fsdp:
                model.set_requires_gradient_sync(last)  # reduce-scatter gradients once per step
            # all-reduce gradients once per step
            with model.no_sync() if ddp and not fsdp and not last else nullcontext():
                with autocast:
                    loss = model(x, y)[1] / gradient_accumulation_steps
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        # the norm tells a diverging run, so it is taken without clipping too (a max of inf scales by 1)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or math.inf)
        skipped = check_divergence(loss_sum, norm)
        # float16: a step whose gradients overflowed is skipped (and the scale halved)
        scaler.step(optimizer)
        scaler.update()
        if skipped and scaler.get_scale() < 1:
            diverged(f"the gradients overflow float16 even unscaled (loss scale {scaler.get_scale():.3g})")
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        bar.update(1)

        if not ddp:
            stopping = stop_signal is not None
        if iter_num % log_interval == 0 or iter_num == max_iters:
            stats = torch.stack([loss_sum, torch.tensor(float(stop_signal is not None), device=device)])
            if ddp:  # the mean loss over all processes, and whether any of them was asked to stop
                dist.all_reduce(stats)
                stats[0] /= world_size
                stopping = stats[1].item() > 0
            if master:
                now = time.time()
                tokens_per_sec = (iter_num - iter_last) * tokens_per_iter / (now - t_last)
                mfu = raw_model.estimate_mfu(tokens_per_sec, block_size, peak * world_size) if peak else None
                t_last, iter_last = now, iter_num
                bar.set_postfix(loss=f"{stats[0].item():.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_sec:,.0f}",
                                **({'mfu': f"{100 * mfu:.1f}%"} if mfu else {}))
                log(dict(iter=iter_num, loss=stats[0].item(), lr=lr, tokens_per_sec=tokens_per_sec, mfu=mfu))
    bar.close()
    if (master or fsdp) and not eval_only and iter_num != saved_at:
        # a stop can come at a step whose evaluation is due and not yet done
        save(evaluated=iter_num % eval_interval != 0)
    if master and stopping:
        print(f"stopped by a signal at step {iter_num}; saved {out_dir}/{CHECKPOINT} "
              f"(continue with --init_from=resume)")
    if ddp or fsdp:
        dist.barrier()  # the others wait for rank 0's last save; gloo can abort on a peer's early exit
        dist.destroy_process_group()


if master and not eval_only:
    prepare_out_dir()
    started = True
kv_heads = f" ({cfg.n_kv_head} key/value)" if cfg.n_kv_head not in (None, cfg.n_head) else ''
say(f"{raw_model.get_num_params() / 1e6:.2f}M parameters: {cfg.n_layer} layers, "
    f"{cfg.n_head} heads{kv_heads}, d {cfg.n_embd}, {cfg.attn_mask} attention, {cfg.pos_enc} positions, "
    f"block_size {cfg.block_size}; {tokens_per_iter:,} tokens per step on {world_size} process(es), "
    f"{device}, {dtype}")
try:
    train()
except RuntimeError as e:  # gloo reports a peer that froze (ddp_timeout) or died as a RuntimeError
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not ddp or not (isinstance(e, dist.DistError)
                       or any(w in reason for w in ('gloo', 'Timed out', 'Connection'))):
        raise
    # gloo's source line off, its first sentence kept
    reason = re.sub(r'^\[[^\]]*\]\s*', '', reason).split('. ')[0]
    if bar is not None:
        bar.close()
    # every survivor says so: rank 0 may be the one lost
    print(f"train.py: error: rank {rank}: lost the other processes ({reason[:200]}); "
          f"the last checkpoint is {out_dir}/{CHECKPOINT}", file=sys.stderr, flush=True)
    # the process group cannot be shut down cleanly without the lost peer (and os._exit flushes nothing)
    os._exit(1)
if stop_signal is not None:
    # stopped, not finished: 130 after Ctrl-C, 143 after SIGTERM, so that `train.py && ...` stops too
    sys.exit(128 + stop_signal)
