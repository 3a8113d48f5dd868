"""
The Triton kernels' configurations, and how the autotuner chooses among them.

stablemask_kernel.py imports this file before triton: where no GPU is, this file chooses Triton's
interpreter. Here are the tiles each kernel may run with, per dtype and head dim; a model of the
shared memory each takes, so that configurations the GPU cannot hold are dropped before anything
compiles; the length bucket the autotuner keys on; and three switches read from the environment:

    STABLEMASK_AUTOTUNE=full|first      time every configuration (the default), or take the first that fits
    STABLEMASK_DQ=auto|atomic|separate  how the backward sums dQ (atomic_dq)
    STABLEMASK_TMA=auto|on|off          whether the kernels read through tensor descriptors (use_tma)
"""

import os

import torch

if not torch.cuda.is_available():
    # without a GPU the kernels run in Triton's interpreter, which triton reads when it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor  # Triton 3.4 on
except ImportError:
    TensorDescriptor = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and type(tl.zeros).__name__ == "JITFunction":
    raise ImportError("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot "
                      "run these kernels: set TRITON_INTERPRET=1 in the environment, or import "
                      "stablemask_kernel first")
AUTOTUNE = os.environ.get("STABLEMASK_AUTOTUNE", "full")
DQ = os.environ.get("STABLEMASK_DQ", "auto")
TMA = os.environ.get("STABLEMASK_TMA", "auto")

# (BLOCK_M, BLOCK_N, warps, stages) per kernel, 16-bit or float32 inputs, and head dim (64: any up to
# 64), in order of preference (STABLEMASK_AUTOTUNE=first takes the first). Every one must compile for
# sm_90 under Triton 3.6 and 3.9 with no register spills, grouped-query attention included, and fit
# Hopper's shared memory: test_kernel.py compiles each ahead of time to hold them to that. The forward
# and dQ walk keys in BLOCK_N steps and need BLOCK_M a multiple of BLOCK_N; dK/dV walk queries and
# need the reverse. float32 is a test path: tf32x3 holds every operand twice, so only small tiles fit
# in registers.
CONFIGS = {
    ('fwd', 16, 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
    ('fwd', 16, 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
    ('fwd', 32, 128): [(16, 16, 4, 2)],
    ('fwd', 32, 64): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ('dkdv', 16, 128): [(32, 128, 8, 3), (16, 128, 8, 3), (16, 64, 8, 4)],
    ('dkdv', 16, 64): [(32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3)],
    ('dkdv', 32, 128): [(16, 16, 8, 2)],
    ('dkdv', 32, 64): [(16, 32, 4, 2)],
    ('dq', 16, 128): [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    ('dq', 16, 64): [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    ('dq', 32, 128): [(16, 16, 4, 2)],
    ('dq', 32, 64): [(64, 16, 4, 2), (32, 16, 4, 2)],
}
# The interpreter's (BLOCK_M, BLOCK_N): small, so that even short tests reach every code path.
INTERPRETER_BLOCKS = dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16))
# The block each kernel streams through shared memory, the one it keeps, and how many tiles it keeps.
TILES = dict(fwd=('BLOCK_N', 'BLOCK_M', 1), dkdv=('BLOCK_M', 'BLOCK_N', 2), dq=('BLOCK_N', 'BLOCK_M', 2))
# Shared memory per block on an H100 / H200; the GPU at hand says its own.
SHARED_MEMORY = 227 * 1024
# What each autotuner keys on, besides the tensors' dtypes.
TUNE_KEYS = dict(fwd=('T_BUCKET', 'HEAD_DIM', 'HAS_ALIBI', 'GROUP', 'HAS_PSEUDO', 'HAS_SINK', 'TMA'),
                 dkdv=('T_BUCKET', 'HEAD_DIM', 'HAS_ALIBI', 'GROUP', 'ATOMIC_DQ'),
                 dq=('T_BUCKET', 'HEAD_DIM', 'HAS_ALIBI', 'GROUP', 'TMA'))
# What a timed run writes into that the next must find zeroed: the dK/dV kernel adds dQ's sums.
RESET_TO_ZERO = dict(dkdv=['DQ_ACC'])


def atomic_dq():
    """Whether the backward adds dQ by atomics from the dK/dV kernel, or in a kernel of its own.
    Atomics are FlashAttention-2's way: 5 matrix products a tile pair. dQ's own kernel recomputes S
    and dP (7 products), but gives the same bits every run. STABLEMASK_DQ=atomic or separate forces
    either; by default atomics, unless torch.use_deterministic_algorithms(True) asks for the same bits."""
    if DQ == 'auto':
        return not torch.are_deterministic_algorithms_enabled()
    return DQ == 'atomic'


def use_tma(*tensors):
    """Whether the kernels read these tensors through tensor descriptors (Hopper's TMA copy engine).
    By default yes on sm_90 and newer for 16-bit inputs (float32 is a test path). STABLEMASK_TMA=on
    forces it where the layout allows (the interpreter too), off never. TMA needs 16-byte aligned
    rows and strides; other layouts take pointers."""
    if TMA == 'off' or TensorDescriptor is None:
        return False
    first = tensors[0]
    if TMA == 'auto' and (INTERPRET or not first.is_cuda or first.dtype == torch.float32
                          or torch.cuda.get_device_capability(first.device)[0] < 9):
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(x * t.element_size() % 16 == 0 for x in t.stride()[:-1]) for t in tensors)


def length_bucket(T):
    """The autotuner's key for a sequence length: the next power of two, at least 64. Tuning once
    per bucket, not per length, spares generation and varied-length training a re-tune at every T."""
    return max(64, triton.next_power_of_2(T))


def configs_for(name, dtype, head_dim):
    """The triton.Configs kernel `name` may run with, for inputs of `dtype` and a (padded) head dim."""
    return triton_configs(CONFIGS[name, 32 if dtype == torch.float32 else 16, 128 if head_dim > 64 else 64])


def triton_configs(choices):
    """triton.Configs of (BLOCK_M, BLOCK_N, warps, stages) tuples; each gives the descriptors its tiles."""
    return [triton.Config({'BLOCK_M': m, 'BLOCK_N': n}, num_warps=w, num_stages=s, pre_hook=set_tiles)
            for m, n, w, s in choices]


def set_tiles(nargs):
    """A config's tiles into its kernel's descriptors: Q's and dO's rows in BLOCK_M, K's and V's in
    BLOCK_N. nargs: the launch's arguments by name, the config's blocks among them."""
    for name, block in (('Q', 'BLOCK_M'), ('DO', 'BLOCK_M'), ('K', 'BLOCK_N'), ('V', 'BLOCK_N')):
        if TensorDescriptor is not None and isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs[block], nargs['HEAD_DIM']]


def base_tensor(x):
    """The tensor a descriptor describes; anything else as it is."""
    return x.base if TensorDescriptor is not None and isinstance(x, TensorDescriptor) else x


def shared_memory(config, streamed, kept, kept_tiles, head_dim, itemsize, dq_sums=False):
    """Bytes of shared memory a config's kernel uses, as the compiler lays it out for sm_90's MMA
    (test_kernel.py checks this against the compiler). The streamed block's two tiles (K and V, or Q
    and dO) take num_stages buffers; the kept block takes kept_tiles tiles, which float32's tf32x3
    holds twice (high and low halves). dK/dV adding dQ's sums holds K once more, as that product's
    other operand, and dS transposed (at most 9 KiB). For float32's small tiles, on Ampere-style MMA,
    an upper bound."""
    copies = kept_tiles * (2 if itemsize == 4 else 1) + (1 if dq_sums else 0)
    rows = config.num_stages * 2 * config.kwargs[streamed] + copies * config.kwargs[kept]
    return rows * head_dim * itemsize + (9 * 1024 if dq_sums else 0)


def shared_memory_limit(device):
    """Shared memory per block on `device`. A CUDA device without an index is the current GPU; the
    interpreter and other devices take an H100's."""
    if INTERPRET or device.type != 'cuda':
        return SHARED_MEMORY
    index = torch.cuda.current_device() if device.index is None else device.index
    return triton.runtime.driver.active.utils.get_device_properties(index)['max_shared_mem']


def candidates(name, q, head_dim, dq_sums=False):
    """The configs the autotuner times for these inputs, chosen before anything compiles: those of
    configs_for that fit the GPU's shared memory (on a GPU smaller than Hopper, at least the
    smallest). Under STABLEMASK_AUTOTUNE=first, only the first of them."""
    size = lambda c: shared_memory(c, *TILES[name], head_dim, q.element_size(), dq_sums)
    configs = configs_for(name, q.dtype, head_dim)
    limit = shared_memory_limit(q.device)
    fitting = [c for c in configs if size(c) <= limit] or [min(configs, key=size)]
    return fitting[:1] if AUTOTUNE == 'first' else fitting


def config_tuple(config):
    """(BLOCK_M, BLOCK_N, warps, stages) of a triton.Config."""
    return config.kwargs['BLOCK_M'], config.kwargs['BLOCK_N'], config.num_warps, config.num_stages


def autotuned(kernel, name, do_bench=None):
    """Kernel `name` under Triton's autotuner. It is given every configuration of every list, and
    keeps those candidates() picks for each launch."""
    def prune(configs, named_args, **kwargs):
        q = base_tensor(named_args['Q'])
        return candidates(name, q, kwargs['HEAD_DIM'], kwargs.get('ATOMIC_DQ', False))
    every = sorted({c for key, choices in CONFIGS.items() if key[0] == name for c in choices})
    return triton.autotune(triton_configs(every), key=list(TUNE_KEYS[name]),
                           reset_to_zero=RESET_TO_ZERO.get(name), do_bench=do_bench,
                           prune_configs_by={'early_config_prune': prune})(kernel)
