"""
Models too big to replicate: FSDP2 (torch.distributed.fsdp.fully_shard) over every Block and the
rest of the model, sharded checkpoints through torch.distributed.checkpoint (DCP), and a Hugging
Face model's weights read shard by shard, so that no process ever holds the whole model.

A sharded checkpoint is out_dir/ckpt.dcp, a symbolic link to a folder out_dir/ckpt.dcp.<step> that
holds DCP's files (each rank's shards of the model and of AdamW's state) and run.json (the run's
settings, step, best validation loss and tokenizer). A save writes a new folder, then repoints the
link in one rename, then removes the old folder: a kill -9 at any moment leaves a whole checkpoint.
DCP reshards what it loads, so a run saved by 2 processes resumes on 1, 2 or 4, and read_whole and
load_whole_optimizer move a run between this form and the single file. A stranger's checkpoint
cannot run code: DCP's .metadata is a pickle, read by an unpickler that builds exact (module, name)
pairs of DCP's classes and nothing else, and the values DCP pickles beside the tensors are read with
torch.load(weights_only=True), as the tensors are (DCP's own planners read those values with
weights_only=False).

    python sharded.py out-fsdp     # writes out-fsdp/ckpt.pt, the same run as one file (model and optimizer)
"""

import io
import json
import os
import pickle
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
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


# What DCP's .metadata pickle really holds, as exact (module, name) pairs: nothing else is built, no
# dotted name is resolved (pickle would walk it through the module's attributes: `os.system` via a
# module that imports os), and no other module is looked at.
METADATA_CLASSES = {
    *(('torch.distributed.checkpoint.metadata', name) for name in (
        'Metadata', 'MetadataIndex', 'StorageMeta', 'TensorProperties', 'TensorStorageMetadata',
        'ChunkStorageMetadata', 'BytesStorageMetadata', '_MEM_FORMAT_ENCODING')),
    ('torch.distributed.checkpoint.filesystem', '_StorageInfo'),
    ('torch', 'Size'), ('torch.serialization', '_get_layout'),
    ('pathlib', 'PosixPath'), ('pathlib', 'PurePosixPath'), ('collections', 'OrderedDict'),
    *(('torch', name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)),
}


class MetadataUnpickler(pickle.Unpickler):
    """Builds METADATA_CLASSES and nothing else."""

    def find_class(self, module, name):
        if (module, name) in METADATA_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, with its metadata read by MetadataUnpickler (no code can run)."""

    def read_metadata(self, *args, **kwargs):
        metadata = safe_metadata(self.path)
        if getattr(metadata, 'storage_meta', None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if metadata.planner_data is None:
            metadata.planner_data = {}
        return metadata


def _load_bytes(planner, read_item, value):
    """A value that is not a tensor (AdamW's learning rate, betas, ...): DCP's planners read it with
    torch.load(weights_only=False), which runs whatever a stranger's file holds. Read it here with
    weights_only=True, then hand DCP our own re-serialisation of what that allowed."""
    safe = io.BytesIO()
    torch.save(torch.load(value, weights_only=True), safe)
    safe.seek(0)
    DefaultLoadPlanner.load_bytes(planner, read_item, safe)


class SafePlanner(DefaultLoadPlanner):
    load_bytes = _load_bytes


class SafeEverythingPlanner(_EmptyStateDictLoadPlanner):  # as DCP's own dcp_to_torch_save: every entry there is
    load_bytes = _load_bytes


def safe_metadata(folder):
    """DCP's .metadata of a checkpoint folder, through MetadataUnpickler, after which every value in
    the folder that is not a tensor is read once with torch.load(weights_only=True). Raises
    ValueError, one line naming the file, for a damaged or foreign one, before anything is built."""
    path = os.path.join(folder, '.metadata')
    try:
        with open(path, 'rb') as f:
            metadata = MetadataUnpickler(f).load()
    except Exception as e:  # any failure to build it: damaged, foreign, or refused
        raise ValueError(f"{path} is damaged, or holds Python objects other than DCP's metadata "
                         f"({type(e).__name__}: {e}), refused because loading them could run code") from None
    try:
        for index, info in metadata.storage_data.items():
            _check_value(folder, metadata, index, info)
    except AttributeError as e:  # a pickle of allowed classes that is not DCP's metadata
        raise ValueError(f"{path} is not DCP's metadata ({e})") from None
    return metadata


def _check_value(folder, metadata, index, info):
    """One entry of the folder's data files, if it is not a tensor: readable by torch.load(weights_only=True)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    name = getattr(info, 'relative_path', None)
    if not isinstance(name, str) or os.path.basename(name) != name:
        raise ValueError(f"{folder}/.metadata names a data file outside its folder ({name!r}): refused")
    if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
        return  # a tensor: DCP reads it with weights_only=True itself
    path = os.path.join(folder, name)
    try:
        with open(path, 'rb') as f:
            f.seek(info.offset)
            torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its entry {index.fqn} is damaged, or holds Python objects other than plain "
                         f"values ({reason}), refused because loading them could run code") from None


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
    dcp.load(state, storage_reader=SafeReader(folder_of(path)), planner=SafePlanner())
    set_state_dict(model, optimizer or [], model_state_dict=state['model'], optim_state_dict=state.get('optimizer', {}))


def full_model_state(path, model):
    """The model's tensors from a sharded checkpoint, whole, in this one process (no process group):
    for sample.py and fine-tuning from it. model gives the names and shapes."""
    state = {'model': {k: torch.empty_like(v, device='cpu') for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "torch.distributed is disabled ...": one process, as meant
        dcp.load(state, storage_reader=SafeReader(folder_of(path)), planner=SafePlanner(), no_dist=True)
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


def read_whole(path):
    """A sharded checkpoint whole, in this one process, in the single-file form train.py and
    sample.py read: {'model', 'optimizer', 'scaler'} with AdamW's state keyed by parameter number,
    in the order of its groups, as torch.optim keeps it (DCP keys it by parameter name)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # reads everything there is
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "torch.distributed is disabled ...": one process, as meant
        _load_state_dict(state, storage_reader=SafeReader(folder_of(path)), planner=SafeEverythingPlanner(), no_dist=True)
    groups = state['optimizer']['param_groups']
    number = {name: i for i, name in enumerate(name for group in groups for name in group['params'])}
    optimizer = dict(state={number[name]: s for name, s in state['optimizer']['state'].items()},
                     param_groups=[{**group, 'params': [number[name] for name in group['params']]} for group in groups])
    return dict(model=state['model'], optimizer=optimizer, scaler={})


def load_whole_optimizer(model, optimizer, state):
    """AdamW's state of a single-file checkpoint (parameters numbered, as read_whole gives it) into the
    optimizer of a sharded model: every rank holds it whole, and keeps its shards of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group['params']]
    named = dict(state={names[i]: s for i, s in state['state'].items()},
                 param_groups=[{**group, 'params': [names[i] for i in group['params']]} for group in state['param_groups']])
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
