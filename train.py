"""
Pretrain or fine-tune a StableMask GPT: one process on a CPU or a GPU, or many under torchrun.

    python train.py config/train_shakespeare_char.py                     # one process
    torchrun --standalone --nproc_per_node=8 train.py config/wikitext103_160m.py      # one node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 \\
        --master_port=29500 train.py config/pile_1.4b.py                 # node 0 of 2 (node 1: --node_rank=1)

The defaults below are overridden by a config file, then by --key=value (configurator.py).
init_from='resume' continues the run in out_dir exactly where it stopped; init_from=<checkpoint>
fine-tunes that model on `dataset` with a fresh optimizer, taking the architecture from the
checkpoint and the attention settings from here (so a causal model can become a StableMask one).
Ctrl-C or SIGTERM finishes the current step, saves out_dir/ckpt.pt and exits.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import configure_script
from model import GPT, GPTConfig, autocast_for, gpu_peak_flops, load_checkpoint, model_from_checkpoint, save_checkpoint

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 250  # evaluate, and save out_dir/ckpt.pt, every this many steps
log_interval = 10
eval_iters = 50  # batches per evaluation
eval_only = False
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint (file or folder) to fine-tune
# data
dataset = 'pydoc_char'  # a folder made by prepare_data.py: a name under data/, or a path
gradient_accumulation_steps = 1  # micro-batches per step, all processes together
batch_size = 32  # sequences per micro-batch
block_size = 256
# model (the architecture is ignored when resuming or fine-tuning: the checkpoint has it)
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
attn_mask = 'stablemask'  # 'stablemask' or 'causal'
sm_gamma = None  # None: per-head ALiBi slopes (the paper's); a float: one decay for every head
pos_enc = 'rope'  # 'rope', 'alibi', 'learned', 'none'
attn_impl = 'auto'  # 'auto', 'triton', 'sdpa', 'reference'
# AdamW
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.98
grad_clip = 1.0  # 0 turns clipping off
# learning rate: linear warmup, then decay to min_lr by lr_decay_iters
lr_schedule = 'cosine'  # 'cosine', 'linear' or 'constant'
warmup_iters = 100
lr_decay_iters = 0  # 0: max_iters
min_lr = 1e-4
# DDP
backend = 'auto'  # 'nccl' on GPUs, 'gloo' on CPUs
# system
device = 'auto'  # 'cuda', 'cuda:1', 'cpu', ...
dtype = 'auto'  # 'float32', 'bfloat16' or 'float16' (autocast; float16 adds a GradScaler); auto: bf16 on GPUs that have it
compile = False  # torch.compile the model
peak_flops = 0.0  # the hardware's peak FLOP/s for MFU; 0: looked up for A100 / H100 / H200, none on CPUs
seed = 1337
# -----------------------------------------------------------------------------


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(1)


config = configure_script(globals(), sys.argv[1:], choices=dict(
    lr_schedule=('cosine', 'linear', 'constant'), dtype=('auto', 'float32', 'bfloat16', 'float16'), backend=('auto', 'nccl', 'gloo')))

# processes: DDP when torchrun set RANK
ddp = 'RANK' in os.environ
if device == 'auto':
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if ddp:
    if backend == 'auto':
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if device_type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not a multiple of the {world_size} processes")
    gradient_accumulation_steps //= world_size  # now per process
else:
    rank, world_size = 0, 1
master = rank == 0
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
dtype, autocast = autocast_for(device_type, dtype)
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# data
# a folder that holds a meta.json, or a name under data/ (not your raw text folder of the same name)
data_dir = dataset if os.path.isfile(os.path.join(dataset, 'meta.json')) else os.path.join('data', dataset)


def read_meta(data_dir):
    """meta.json, after checking that the token files are whole (prepare_data.py writes meta.json last)."""
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        fail(f"no dataset at {data_dir} (no readable meta.json): make one with prepare_data.py")
    if not {'train_tokens', 'val_tokens', 'dtype', 'vocab_size', 'tokenizer'} <= meta.keys():
        fail(f"{data_dir}/meta.json was not written by prepare_data.py: rerun it")
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f"{split}.bin")
        expected = meta[f"{split}_tokens"] * np.dtype(meta['dtype']).itemsize
        if not os.path.isfile(path) or os.path.getsize(path) != expected:
            fail(f"{path} does not match {data_dir}/meta.json: rerun prepare_data.py")
        if meta[f"{split}_tokens"] <= block_size:
            fail(f"the {split} split of {data_dir} has {meta[f'{split}_tokens']} tokens, too few for block_size {block_size}")
    return meta


meta = read_meta(data_dir)


def batch_generator(*key):
    """Random numbers that depend only on (seed, *key): a micro-batch is fixed by its step and its index
    among all processes, so a resumed run, or the same run on any number of processes, sees the same data."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1)[0]))


def get_batch(split, generator):
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta['dtype'], mode='r')  # re-opened: avoids a memmap leak
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# model
iter_num, best_val_loss, checkpoint = 0, math.inf, None
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=meta['vocab_size'], dropout=dropout, attn_mask=attn_mask, sm_gamma=sm_gamma,
                  pos_enc=pos_enc, attn_impl=attn_impl)
try:
    if init_from == 'scratch':
        model = GPT(GPTConfig(**model_args))
    elif init_from == 'resume':
        checkpoint = load_checkpoint(out_dir, device)
        model_args = {**checkpoint['model_args'], 'attn_impl': attn_impl}  # the same model; any implementation
        model = model_from_checkpoint(checkpoint, attn_impl=attn_impl)
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    else:
        checkpoint = load_checkpoint(init_from, device)
        old = checkpoint.get('meta', {})
        if (old.get('tokenizer'), old.get('chars')) != (meta['tokenizer'], meta.get('chars')):
            fail(f"{init_from} was trained with another tokenizer ({old.get('tokenizer')}) than {data_dir} ({meta['tokenizer']})")
        changed = {k: model_args[k] for k in ('block_size', 'dropout', 'attn_mask', 'sm_gamma', 'attn_impl')}
        model_args = {**checkpoint['model_args'], **changed}
        model = model_from_checkpoint(checkpoint, **changed)
        checkpoint = None  # fine-tuning starts a fresh optimizer and schedule
        if master:
            print(f"fine-tuning {init_from}: {', '.join(f'{k}={v}' for k, v in changed.items())}")
except ValueError as e:
    fail(e)
model.to(device)
raw_model = model

optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    torch.set_rng_state(checkpoint['rng']['torch'])
    if device_type == 'cuda' and checkpoint['rng'].get('cuda') is not None:
        torch.cuda.set_rng_state(checkpoint['rng']['cuda'])
resumed_at = iter_num if checkpoint is not None else None
checkpoint = None  # free the memory
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)


def save():
    checkpoint = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                      model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss, config=config, meta=meta,
                      rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device_type == 'cuda' else None))
    save_checkpoint(checkpoint, os.path.join(out_dir, 'ckpt.pt'))


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches of each split (the same batches at every evaluation)."""
    raw_model.eval()
    losses = {}
    for s, split in enumerate(('train', 'val')):
        total = 0.0
        for k in range(eval_iters):
            x, y = get_batch(split, batch_generator(1 + s, k))
            with autocast:
                total += raw_model(x, y)[1].item()
        losses[split] = total / eval_iters
    raw_model.train()
    return losses


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
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum
    signal.signal(signum, signal.SIG_DFL)  # a second one stops at once (the last checkpoint stays whole)


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

# training
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, {attn_mask} attention, {pos_enc} positions; "
          f"{tokens_per_iter:,} tokens per step on {world_size} process(es), {device}, {dtype}")
peak = peak_flops or (gpu_peak_flops(device) if dtype != 'float32' else None)  # float32 runs at a lower peak
bar = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, unit='step')
t_last, iter_last, saved_at = time.time(), iter_num, resumed_at
stopping = False  # with DDP, decided by all processes together at a log step, so that they stop at the same step
while True:
    if master and not stopping and (eval_only or iter_num % eval_interval == 0 and iter_num != resumed_at):
        losses = estimate_loss()
        best_val_loss = min(best_val_loss, losses['val'])
        bar.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        log(dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val']))
        if iter_num > 0 and not eval_only:
            save()
            saved_at = iter_num
        t_last = time.time()  # evaluation is not training time
    if eval_only or iter_num >= max_iters or stopping:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        x, y = get_batch('train', batch_generator(0, iter_num, rank * gradient_accumulation_steps + micro_step))
        last = micro_step == gradient_accumulation_steps - 1
        with model.no_sync() if ddp and not last else nullcontext():  # all-reduce gradients once per step
            with autocast:
                loss = model(x, y)[1] / gradient_accumulation_steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
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
            bar.set_postfix(loss=f"{stats[0].item():.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}",
                            **({'mfu': f"{100 * mfu:.1f}%"} if mfu else {}))
            log(dict(iter=iter_num, loss=stats[0].item(), lr=lr, tokens_per_sec=tokens_per_sec, mfu=mfu))
bar.close()

if master and not eval_only and iter_num != saved_at:
    save()
if master and stopping:
    print(f"stopped by a signal at step {iter_num}; saved {out_dir}/ckpt.pt (continue with --init_from=resume)")
if ddp:
    dist.barrier()  # the others wait for rank 0's last evaluation and save; gloo can abort on a peer's early exit
    dist.destroy_process_group()
