"""
Checkpoints, in every form this project reads, loaded so that a stranger's cannot run code:
- ckpt.pt, one file (train.py under DDP or one process): a plain dict of tensors and Python values,
  read with torch.load(weights_only=True); a torch.compile'd model's `_orig_mod.` prefix dropped,
  and a model saved before the small-width MLP rule keeps its own width;
- ckpt.dcp, sharded (train.py --fsdp=True; sharded.py writes it): a link to a folder of
  torch.distributed.checkpoint's files and run.json. DCP's .metadata is a pickle, read by an
  unpickler that builds exact (module, name) pairs of DCP's classes and nothing else; the values DCP
  pickles beside the tensors (AdamW's learning rate, betas) are read with torch.load(weights_only=True),
  where DCP's own planners read them with weights_only=False;
- a Hugging Face LLaMA-family folder (pretrained.py): safetensors and JSON only.
"""

import io
import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

from model import GPT, GPTConfig
from pretrained import is_pretrained_folder, pretrained_args, pretrained_checkpoint
from tokenizer import read_json

LINK = 'ckpt.dcp'  # in a run's folder: the link to its sharded checkpoint

# -----------------------------------------------------------------------------
# every form: which file a path names, loading it, and the model it holds


def checkpoint_file(path):
    """A checkpoint names a file, a folder holding ckpt.pt (or a sharded ckpt.dcp), or a Hugging Face
    model's folder."""
    if os.path.isdir(path) and is_sharded(path):
        return os.path.join(path, LINK) if os.path.isdir(os.path.join(path, LINK)) else path
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) and not is_pretrained_folder(path) else path


def load_checkpoint(path, device='cpu', weights=True):
    """Load a checkpoint file, or the ckpt.pt in a folder, or a Hugging Face LLaMA-family model's
    folder (pretrained.py) as a checkpoint with its tokenizer's description. A sharded checkpoint
    (sharded.py), and a Hugging Face folder with weights=False, come without their tensors: then
    'sharded' or 'pretrained' says where they are, and model_from_checkpoint or sharded.py reads them.
    Raises ValueError, one line saying what is wrong, for a missing, corrupt, truncated or foreign
    file."""
    if is_pretrained_folder(path):
        return pretrained_checkpoint(path) if weights else pretrained_args(path)
    if os.path.isdir(path) and is_sharded(path):
        safe_metadata(folder_of(path))  # before anything reads it
        return dict(read_run(path), sharded=folder_of(path))
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        # torch warns before some of the failures below; the error says it all
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is damaged, or holds Python objects other than tensors and plain values, "
                         "which are refused because loading them could run code") from None
    except Exception as e:  # RuntimeError, EOFError, ... by the kind of damage
        reason = str(e).strip().splitlines()[0].split('. ')[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or truncated?): {reason}") from None
    if not isinstance(checkpoint, dict) or not {'model', 'model_args'} <= checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint of this project (no model and model_args)")
    # checkpoints of a torch.compile'd model (nanoGPT's, say) prefix every key with _orig_mod.
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    return checkpoint


def missing_tokenizer(path):
    """The line for a checkpoint that holds no tokenizer description (meta), by what path is."""
    if is_pretrained_folder(path):
        return f"{path} has no tokenizer.json beside its config.json: copy the model's tokenizer files there"
    return f"{path} holds no tokenizer description (meta); was it written by train.py?"


def load_model(path, device='cpu', **overrides):
    """(the GPT, its checkpoint) of load_checkpoint(path), GPTConfig fields overridden. Raises
    ValueError, one line (naming the file where its tensors are what is wrong)."""
    checkpoint = load_checkpoint(path, device)
    try:
        return model_from_checkpoint(checkpoint, **overrides), checkpoint
    except ValueError as e:
        raise ValueError(f"{checkpoint_file(path)}: {e}") from None


def model_from_checkpoint(checkpoint, **overrides):
    """The GPT a checkpoint holds, with GPTConfig fields overridden (attn_impl, attn_mask, ...).
    Raises ValueError, one line, when its model_args or its tensors do not describe a model of ours."""
    args = {**checkpoint['model_args'], **overrides}
    fc = checkpoint.get('model', {}).get('transformer.h.0.mlp.c_fc.weight')
    if args.get('n_hidden') is None and fc is not None:
        args['n_hidden'] = fc.size(0)  # saved before swiglu_hidden's rule for small models: its own width
    unknown = sorted(args.keys() - GPTConfig.__dataclass_fields__.keys())
    if unknown:
        raise ValueError(f"its model_args hold settings this version does not know: {', '.join(unknown)}")
    config = GPTConfig(**args)
    if 'sharded' in checkpoint and 'model' not in checkpoint:
        with torch.device('meta'):  # before memory goes to a model that the folder's tensors do not fit
            check_shapes(checkpoint['sharded'], GPT(config))
    model = GPT(config)
    if 'model' not in checkpoint:  # sharded, or weights=False: read whole into this process now
        state = full_model_state(checkpoint['sharded'], model) if 'sharded' in checkpoint else \
            pretrained_checkpoint(checkpoint['pretrained'])['model']
        checkpoint = {**checkpoint, 'model': state}
    state = checkpoint['model']
    # a shorter block_size keeps the first positions
    if config.pos_enc == 'learned' and 'transformer.wpe.weight' in state:
        wpe, positions = state['transformer.wpe.weight'], config.block_size + model.n_sink
        if positions > wpe.size(0):
            raise ValueError(f"block_size {config.block_size} is past the checkpoint's "
                             f"{wpe.size(0) - model.n_sink} learned positions")
        state = {**state, 'transformer.wpe.weight': wpe[:positions]}
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        problems = [f"{what} {', '.join(names[:3])}"
                    for what, names in (('missing', missing), ('unexpected', unexpected)) if names]
        raise ValueError(f"its tensors do not fit its model_args: {'; '.join(problems)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"its tensors do not fit its model_args: {name} is {tuple(tensor.shape)}, "
                             f"the model needs {tuple(expected[name].shape)}")
    model.load_state_dict(state)
    return model


def from_pretrained(path, **overrides):
    """The GPT of a local Hugging Face LLaMA-family folder (pretrained.py), or of a checkpoint of
    ours, with GPTConfig fields overridden: attn_mask='stablemask', block_size, attn_impl, ...
    A pretrained model keeps its own causal mask unless attn_mask says otherwise."""
    return model_from_checkpoint(load_checkpoint(path), **overrides)


# -----------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint), read safely


def is_sharded(path):
    """Whether path names a sharded checkpoint: a run folder holding ckpt.dcp, or ckpt.dcp itself."""
    return (os.path.isfile(os.path.join(path, LINK, 'run.json'))
            or os.path.isfile(os.path.join(path, 'run.json')))


def folder_of(path):
    """The checkpoint folder itself (the link resolved) for a run folder or a ckpt.dcp."""
    folder = os.path.join(path, LINK) if os.path.isdir(os.path.join(path, LINK)) else path
    return os.path.realpath(folder)


def read_run(path):
    """run.json of a sharded checkpoint: model_args, config, meta, iter_num, best_val_loss."""
    folder = folder_of(path)
    run = read_json(folder, 'run.json')
    if not isinstance(run.get('model_args'), dict):
        raise ValueError(f"{folder}/run.json holds no model_args: not a run of train.py")
    return run


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


# reads every entry there is, as DCP's own dcp_to_torch_save does
class SafeEverythingPlanner(_EmptyStateDictLoadPlanner):
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
    """Check one entry of the folder's data files: one that is not a tensor must be readable by
    torch.load(weights_only=True)."""
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
        raise ValueError(f"{path}: its entry {index.fqn} is damaged, or holds Python objects other than "
                         f"plain values ({reason}), refused because loading them could run code") from None


def full_model_state(path, model):
    """The model's tensors from a sharded checkpoint, whole, in this one process (no process group):
    for sample.py and fine-tuning from it. model gives the names and shapes."""
    state = {'model': {k: torch.empty_like(v, device='cpu') for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "torch.distributed is disabled ...": one process, as meant
        dcp.load(state, storage_reader=SafeReader(folder_of(path)), planner=SafePlanner(), no_dist=True)
    return state['model']


def check_shapes(path, model):
    """The model's tensors in a sharded checkpoint have the shapes of the model its run.json describes:
    an edited or foreign folder is one line (ValueError), not DCP's traceback or a vast allocation."""
    folder = folder_of(path)
    sizes = {name: tuple(info.size) for name, info in safe_metadata(folder).state_dict_metadata.items()
             if hasattr(info, 'size')}
    for name, tensor in model.state_dict().items():
        size = sizes.get(f'model.{name}')
        if size != tuple(tensor.shape):
            raise ValueError(f"{folder}: its tensors do not fit its model_args: {name} is "
                             f"{'missing' if size is None else size}, the model needs {tuple(tensor.shape)}")


def read_whole(path):
    """A sharded checkpoint whole, in this one process, in the single-file form train.py and
    sample.py read: {'model', 'optimizer', 'scaler'} with AdamW's state keyed by parameter number,
    in the order of its groups, as torch.optim keeps it (DCP keys it by parameter name)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # reads everything there is
    with torch.device('meta'):  # shapes only
        check_shapes(path, GPT(GPTConfig(**read_run(path)['model_args'])))
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "torch.distributed is disabled ...": one process, as meant
        _load_state_dict(state, storage_reader=SafeReader(folder_of(path)),
                         planner=SafeEverythingPlanner(), no_dist=True)
    groups = state['optimizer']['param_groups']
    number = {name: i for i, name in enumerate(name for group in groups for name in group['params'])}
    optimizer = dict(state={number[name]: s for name, s in state['optimizer']['state'].items()},
                     param_groups=[{**group, 'params': [number[name] for name in group['params']]}
                                   for group in groups])
    return dict(model=state['model'], optimizer=optimizer, scaler={})
