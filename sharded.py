"""
Models too big to replicate: FSDP2 (torch.distributed.fsdp.fully_shard) over every Block and the
rest of the model, each Block's activations recomputed in the backward if asked, sharded checkpoints
written through torch.distributed.checkpoint (DCP), and a Hugging Face model's weights read shard by
shard, so that no process ever holds the whole model. checkpoint.py reads what this file writes.

A sharded checkpoint is out_dir/ckpt.dcp, a symbolic link to a folder out_dir/ckpt.dcp.<step> that
holds DCP's files (each rank's shards of the model and of AdamW's state) and run.json (the run's
settings, step, best validation loss and tokenizer). A save writes a new folder, then repoints the
link in one rename, then removes the old folder: a kill -9 at any moment leaves a whole checkpoint.
DCP reshards what it loads, so a run saved by 2 processes resumes on 1, 2 or 4, and
checkpoint.read_whole and load_whole_optimizer move a run between this form and the single file.

    python sharded.py out-fsdp     # writes out-fsdp/ckpt.pt, the same run as one file (model and optimizer)
"""

import json
import os
import shutil
import sys
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.utils.checkpoint import checkpoint

from checkpoint import (LINK, SafePlanner, SafeReader, check_shapes, folder_of, is_sharded, read_run,
                        read_whole, safe_metadata)
from run_dir import atomic_file, save_checkpoint


def mixed_precision(dtype):
    """FSDP's policy for a run's dtype: bf16 (or fp16) parameters and compute with float32 gradient
    reduction on GPUs; float32 throughout on CPUs. Replaces autocast under FSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if dtype == 'float32':
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)


def checkpoint_activations(model):
    """Each Block's activations recomputed in the backward instead of kept (long sequences), applied
    to the built model from outside, as torchtitan does, before it is sharded or compiled."""
    for block in model.transformer.h:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def shard(model, policy):
    """fully_shard each Block, then the rest (embeddings, final norm, head) as the root: a Block's
    weights are gathered just before it runs and freed after."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def save(model, optimizer, run, out_dir, master):
    """Write the sharded checkpoint of step run['iter_num'] (every rank its shards), then make it
    out_dir/ckpt.dcp in one rename and remove the one it replaces."""
    target = os.path.join(out_dir, f"{LINK}.{run['iter_num']}")
    link = os.path.join(out_dir, LINK)
    previous = os.path.realpath(link) if os.path.islink(link) else None
    if master and os.path.isdir(target) and os.path.realpath(target) != previous:
        shutil.rmtree(target)  # a save of this step that was killed half-way
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({'model': model_state, 'optimizer': optimizer_state}, checkpoint_id=target)
    if master:
        with atomic_file(os.path.join(target, 'run.json'), 'w') as f:
            json.dump(run, f)
        tmp_link = f"{link}.link{os.getpid()}"
        os.symlink(os.path.basename(target), tmp_link)
        os.replace(tmp_link, link)  # the commit: from here the new checkpoint is the run's
        if previous and previous != os.path.realpath(target):
            shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def load(model, optimizer, path):
    """Every rank reads its shards of the model (and of the optimizer's state, if optimizer) from
    the sharded checkpoint at path, whatever the number of processes that wrote it."""
    check_shapes(path, model)
    model_state, optimizer_state = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    state = {'model': model_state, **({'optimizer': optimizer_state} if optimizer is not None else {})}
    dcp.load(state, storage_reader=SafeReader(folder_of(path)), planner=SafePlanner())
    set_state_dict(model, optimizer or [], model_state_dict=state['model'],
                   optim_state_dict=state.get('optimizer', {}))


def remove_stale(out_dir):
    """Remove ckpt.dcp.<step> folders the link does not name (saves killed half-way), and temporary links."""
    link = os.path.join(out_dir, LINK)
    current = os.path.realpath(link) if os.path.islink(link) else None
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith(f"{LINK}.link"):
            os.remove(path)
        elif name.startswith(f"{LINK}.") and os.path.isdir(path) and os.path.realpath(path) != current:
            shutil.rmtree(path)


def remove(out_dir):
    """Remove a run's sharded checkpoint (overwrite=True)."""
    link = os.path.join(out_dir, LINK)
    if os.path.islink(link):
        shutil.rmtree(os.path.realpath(link), ignore_errors=True)
        os.remove(link)
    remove_stale(out_dir)


def load_pretrained(model, folder):
    """Fill a sharded model's parameters from a Hugging Face folder's safetensors: each rank reads,
    memory-mapped, only the rows of each tensor it keeps (FSDP2 shards every parameter along its
    first dimension), so no process holds the whole model."""
    from safetensors import safe_open
    from pretrained import model_args, read_json, source_map, weight_files
    args = model_args(read_json(folder, 'config.json'), folder)
    files = weight_files(folder)  # {hf name: file}
    sources = source_map(list(files), args, folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, 'to_local') else param
            rows = -(-param.size(0) // max(1, dist.get_world_size())) if hasattr(param, 'to_local') else 0
            start = rows * dist.get_rank() if hasattr(param, 'to_local') else 0
            offset = 0
            for hf_name in sources[name]:
                # closed at once: the file's pages leave this process
                with safe_open(files[hf_name], framework='pt') as f:
                    piece = f.get_slice(hf_name)
                    length = piece.get_shape()[0]
                    lo, hi = max(start, offset), min(start + local.size(0), offset + length)
                    # rows of at most 4M elements at a time
                    step = max(1, (1 << 22) // max(1, local[0].numel()))
                    for row in range(lo, hi, step):
                        end = min(row + step, hi)
                        local[row - start:end - start].copy_(piece[row - offset:end - offset])
                offset += length
            assert offset == param.size(0), (name, offset, param.size(0))


def load_whole_optimizer(model, optimizer, state):
    """AdamW's state of a single-file checkpoint (parameters numbered, as read_whole gives it) into the
    optimizer of a sharded model: every rank holds it whole, and keeps its shards of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group['params']]
    named = dict(state={names[i]: s for i, s in state['state'].items()},
                 param_groups=[{**group, 'params': [names[i] for i in group['params']]}
                               for group in state['param_groups']])
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def consolidate(out_dir):
    """out_dir/ckpt.pt from out_dir's sharded checkpoint: the model, AdamW's state and the run's
    settings, whole, in one file (read_whole)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    run = read_run(out_dir)
    run['config'] = {**run['config'], 'fsdp': False}  # one file is a run that DDP (or one process) resumes
    save_checkpoint(dict(read_whole(out_dir), **run), path)
    return path


def main(argv):
    usage = "usage: python sharded.py OUT_DIR   (writes OUT_DIR/ckpt.pt from its sharded checkpoint)"
    if len(argv) == 1 and argv[0] in ('-h', '--help'):
        print(f"{__doc__.strip()}\n\n{usage}")
        return
    if len(argv) != 1:
        sys.exit(usage)
    if not is_sharded(argv[0]):
        sys.exit(f"sharded.py: error: no sharded checkpoint in {argv[0]} (no {LINK}/run.json)")
    try:
        safe_metadata(folder_of(argv[0]))  # refused before anything else reads it
        print(f"wrote {consolidate(argv[0])}")
    except (ValueError, OSError) as e:
        sys.exit(f"sharded.py: error: {e}")


if __name__ == '__main__':
    main(sys.argv[1:])
