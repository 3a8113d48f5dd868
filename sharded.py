"""
Models too big to replicate: FSDP2 (torch.distributed.fsdp.fully_shard) over every Block and the
rest of the model, sharded checkpoints through torch.distributed.checkpoint (DCP), and a Hugging
Face model's weights read shard by shard, so that no process ever holds the whole model.

A sharded checkpoint is out_dir/ckpt.dcp, a symbolic link to a folder out_dir/ckpt.dcp.<step> that
holds DCP's files (each rank's shards of the model and of AdamW's state) and run.json (the run's
settings, step, best validation loss and tokenizer). A save writes a new folder, then repoints the
link in one rename, then removes the old folder: a kill -9 at any moment leaves a whole checkpoint.
DCP reshards what it loads, so a run saved by 2 processes resumes on 1, 2 or 4. DCP's .metadata is
a pickle; it is read with an unpickler that takes DCP's own classes and nothing else, so a
stranger's checkpoint cannot run code (tensors come through torch.load with weights_only=True).

    python sharded.py out-fsdp     # writes out-fsdp/ckpt.pt, the same run as one file (model and optimizer)
"""

import json
import os
import pickle
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from run_dir import save_checkpoint

LINK = 'ckpt.dcp'


def mixed_precision(dtype):
    """FSDP's policy for a run's dtype: bf16 (or fp16) parameters and compute with float32 gradient
    reduction on GPUs; float32 throughout on CPUs. Replaces autocast under FSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if dtype == 'float32':
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)


def shard(model, policy):
    """fully_shard each Block, then the rest (embeddings, final norm, head) as the root: a Block's
    weights are gathered just before it runs and freed after."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(path):
    """Whether path names a sharded checkpoint: a run folder holding ckpt.dcp, or ckpt.dcp itself."""
    return os.path.isfile(os.path.join(path, LINK, 'run.json')) or os.path.isfile(os.path.join(path, 'run.json'))


def folder_of(path):
    """The checkpoint folder itself (the link resolved) for a run folder or a ckpt.dcp."""
    folder = os.path.join(path, LINK) if os.path.isdir(os.path.join(path, LINK)) else path
    return os.path.realpath(folder)


def read_run(path):
    """run.json of a sharded checkpoint: model_args, config, meta, iter_num, best_val_loss."""
    with open(os.path.join(folder_of(path), 'run.json')) as f:
        return json.load(f)


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, but its metadata pickle may build only DCP's own classes (no code can run)."""

    ALLOWED = {'torch.distributed.checkpoint.metadata': None, 'torch.distributed.checkpoint.filesystem': {'_StorageInfo'},
               'torch': {'Size', *(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))},
               'torch.serialization': {'_get_layout'}, 'pathlib': {'PosixPath', 'PurePosixPath'},
               'collections': {'OrderedDict'}}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = SafeReader.ALLOWED.get(module, set())
            if allowed is None or name in allowed:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")

    def read_metadata(self, *args, **kwargs):
        metadata = safe_metadata(self.path)
        if getattr(metadata, 'storage_meta', None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if metadata.planner_data is None:
            metadata.planner_data = {}
        return metadata


def safe_metadata(folder):
    """DCP's .metadata of a checkpoint folder, through SafeReader's unpickler. Raises ValueError, one
    line, for a damaged or foreign one."""
    path = os.path.join(folder, '.metadata')
    try:
        with open(path, 'rb') as f:
            return SafeReader.Unpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is damaged, or holds Python objects other than DCP's metadata ({e}), "
                         "refused because loading them could run code") from None


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
        with open(os.path.join(target, 'run.json.tmp'), 'w') as f:
            json.dump(run, f)
        os.replace(os.path.join(target, 'run.json.tmp'), os.path.join(target, 'run.json'))
        tmp_link = f"{link}.link{os.getpid()}"
        os.symlink(os.path.basename(target), tmp_link)
        os.replace(tmp_link, link)  # the commit: from here the new checkpoint is the run's
        if previous and previous != os.path.realpath(target):
            shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def load(model, optimizer, path):
    """Every rank reads its shards of the model (and of the optimizer's state, if optimizer) from
    the sharded checkpoint at path, whatever the number of processes that wrote it."""
    model_state, optimizer_state = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    state = {'model': model_state, **({'optimizer': optimizer_state} if optimizer is not None else {})}
    dcp.load(state, storage_reader=SafeReader(folder_of(path)))
    set_state_dict(model, optimizer or [], model_state_dict=state['model'], optim_state_dict=state.get('optimizer', {}))


def full_model_state(path, model):
    """The model's tensors from a sharded checkpoint, whole, in this one process (no process group):
    for sample.py and fine-tuning from it. model gives the names and shapes."""
    state = {'model': {k: torch.empty_like(v, device='cpu') for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "torch.distributed is disabled ...": one process, as meant
        dcp.load(state, storage_reader=SafeReader(folder_of(path)), no_dist=True)
    return state['model']


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
                with safe_open(files[hf_name], framework='pt') as f:  # closed at once: the file's pages leave this process
                    piece = f.get_slice(hf_name)
                    length = piece.get_shape()[0]
                    lo, hi = max(start, offset), min(start + local.size(0), offset + length)
                    step = max(1, (1 << 22) // max(1, local[0].numel()))  # rows of at most 4M elements at a time
                    for row in range(lo, hi, step):
                        end = min(row + step, hi)
                        local[row - start:end - start].copy_(piece[row - offset:end - offset])
                offset += length
            assert offset == param.size(0), (name, offset, param.size(0))


def consolidate(out_dir):
    """out_dir/ckpt.pt from out_dir's sharded checkpoint: the model and AdamW's state whole, and the
    run's settings, in the single-file form train.py and sample.py read (AdamW's state keyed by
    parameter number, in the order of its groups, as torch.optim keeps it)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner  # as DCP's own dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # reads everything there is
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "torch.distributed is disabled ...": one process, as meant
        _load_state_dict(state, storage_reader=SafeReader(folder_of(out_dir)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    groups = state['optimizer']['param_groups']
    number = {name: i for i, name in enumerate(name for group in groups for name in group['params'])}
    optimizer = dict(state={number[name]: s for name, s in state['optimizer']['state'].items()},
                     param_groups=[{**group, 'params': [number[name] for name in group['params']]} for group in groups])
    path = os.path.join(out_dir, 'ckpt.pt')
    run = read_run(out_dir)
    run['config'] = {**run['config'], 'fsdp': False}  # one file is a run that DDP (or one process) resumes
    save_checkpoint(dict(model=state['model'], optimizer=optimizer, scaler={}, **run), path)
    return path


if __name__ == '__main__':
    if len(sys.argv) != 2 or sys.argv[1] in ('-h', '--help'):
        sys.exit(__doc__.strip().splitlines()[-1].strip() if len(sys.argv) == 2 else "usage: python sharded.py OUT_DIR")
    if not is_sharded(sys.argv[1]):
        sys.exit(f"sharded.py: error: no sharded checkpoint in {sys.argv[1]} (no {LINK}/run.json)")
    print(f"wrote {consolidate(sys.argv[1])}")
