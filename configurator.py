"""
Command-line configuration for the scripts, as in nanoGPT: a script keeps its defaults as plain
module-level variables between two `# ----` lines, then

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

runs the config file (Python assignments) and then applies each --key=value, in order (a bare --key
sets a True/False setting to True). Unlike nanoGPT's exec, a key the script does not have, a value of
the wrong type, or one outside what the script allows (its `rules`) is refused with one line.
-h / --help prints the script's settings block: each default and the comment beside it.
"""

import ast
import contextlib
import io
import operator
import os
import re
import sys
import tokenize
import traceback
import types


def _checked(key, value, defaults, nullable, where):
    if key not in defaults:
        raise ValueError(f"unknown config key {key!r}{where}; known keys: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if value is None and key in nullable:
        return value
    if default is None:  # the optional numbers (sm_gamma, top_k, ...): None or a number
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        want = 'a number or None'
    elif isinstance(default, bool):
        ok, want = isinstance(value, bool), 'True or False'
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), 'a number'
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), 'an integer'
    else:
        ok, want = isinstance(value, type(default)), type(default).__name__
    if not ok:
        raise ValueError(f"{key}={value!r}{where}: expected {want}")
    return value


def _parse(text):
    """A Python literal if it is one (3, 1e-3, True, None, 'x'), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


COMPARISONS = {'>': operator.gt, '>=': operator.ge, '<': operator.lt, '<=': operator.le}


def check_rules(config, rules):
    """rules: {key: allowed}, allowed a tuple of choices or bounds such as '>0' or '>=0, <1'.
    None passes every bound (it means 'off' or 'default'). Raises ValueError naming the first key
    that breaks its rule."""
    for key, allowed in rules.items():
        value = config[key]
        if isinstance(allowed, tuple):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")
            continue
        for bound in allowed.split(','):
            op, limit = re.fullmatch(r'\s*(>=|<=|>|<)\s*(\S+)\s*', bound).groups()
            if value is not None and not COMPARISONS[op](value, float(limit)):
                raise ValueError(f"{key}={value!r}: must be "
                                 f"{' and '.join(b.strip() for b in allowed.split(','))}")


def _run_config_file(path):
    """The settings a config file assigns, or ValueError with the file, line and reason."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    namespace = {}
    try:
        exec(compile(source, path, 'exec'), namespace)
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:
        # the file is Python: whatever it raises is reported, not shown as a traceback
        line = next((frame.lineno for frame in traceback.extract_tb(e.__traceback__)
                     if frame.filename == path), '?')
        raise ValueError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType)}


def read_overrides(defaults, argv, nullable=()):
    """The settings that config files and --key=value arguments in argv give, in order, each checked
    against its default's type. Returns {key: value}; raises ValueError with a one-line message."""
    given = {}
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq and not isinstance(defaults.get(key), bool):
                raise ValueError(f"{arg}: write overrides as --key=value "
                                 f"(a bare --key sets a True/False key)")
            given[key] = _checked(key, _parse(text) if eq else True, defaults, nullable, '')
        else:
            for key, value in _run_config_file(arg).items():
                given[key] = _checked(key, value, defaults, nullable, f" (in {arg})")
    return given


def configure(defaults, argv, nullable=(), rules=None):
    """defaults: {key: value} of the script's settings. argv: config files and --key=value overrides.
    nullable: keys that also accept None. Returns a new dict with the overrides applied; raises
    ValueError with a one-line message on bad input."""
    config = {**defaults, **read_overrides(defaults, argv, nullable)}
    check_rules(config, rules or {})
    return config


def configure_script(namespace, argv, nullable=(), rules=None):
    """Apply argv to a script's settings: the plain values (numbers, strings, True/False, None) among
    its globals() so far. -h / --help prints them and exits. Bad input ends the script with one line
    (under torchrun, printed by rank 0 alone). Returns (the settings as a dict, the ones argv gave)."""
    if '-h' in argv or '--help' in argv:
        try:
            print(script_help(namespace.get('__file__', sys.argv[0]), namespace.get('__doc__')), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    # constants (UPPER_CASE, imported or the script's own) are not settings
    settings = {k: v for k, v in namespace.items() if not k.startswith('_') and not k.isupper()
                and isinstance(v, (int, float, bool, str, type(None)))}
    try:
        given = read_overrides(settings, argv, nullable)
        config = {**settings, **given}
        check_rules(config, rules or {})
    except ValueError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}" if os.environ.get('RANK', '0') == '0' else 1)
    namespace.update(config)
    return config, given


def script_help(path, doc):
    """The script's docstring, then its settings block (the lines between the first two `# ----`
    lines) as --key=default, each with its comment; comment lines there head groups of settings."""
    with open(path) as f:
        lines = f.read().splitlines()
    marks = [n for n, line in enumerate(lines) if line.startswith('# ----')]
    block = lines[marks[0] + 1:marks[1]] if len(marks) >= 2 else []
    out = [(doc or '').strip(), '', 'settings (config files, then --key=value, override them):']
    # the block's comments: {line: (column, text)}
    comments = {tok.start[0] - 1: (tok.start[1], tok.string.lstrip('#').strip())
                for tok in tokenize.generate_tokens(io.StringIO('\n'.join(block) + '\n').readline)
                if tok.type == tokenize.COMMENT}
    for n, line in enumerate(block):
        column, comment = comments.get(n, (len(line), ''))
        match = re.match(r'(\w+)\s*=', line)
        if column == 0:
            out.append(f"  {comment}:")
        elif match:
            out.append((f"    --{match.group(1)}={line[match.end():column].strip()}".ljust(36)
                        + f" {comment}").rstrip())
    return '\n'.join(out)


# -----------------------------------------------------------------------------
# what every script decides alike: where it runs, in which precision, and how it stops on bad input


def fail(message, quiet=False):
    """One line on stderr, `<script>: error: <message>`, and exit 1; quiet: exit 1 without the line
    (under torchrun every process meets the same bad input, and rank 0 says it)."""
    if not quiet:
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def resolve_device(device):
    """The device a script runs on: 'auto' is this process's GPU (LOCAL_RANK under torchrun) if
    CUDA is there, else the CPU. Raises ValueError, one line, for a device this machine lacks.
    Without CUDA the Triton kernel, if a model asks for it, runs in Triton's interpreter, which must
    be chosen before anything imports triton (some of torch does: the meta device, for one)."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault('TRITON_INTERPRET', '1')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device == 'auto':
        if not torch.cuda.is_available():
            return 'cpu'
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"device=auto: this is local process {local_rank} but the machine has "
                             f"{torch.cuda.device_count()} GPU(s): "
                             f"start at most that many per node, or pass --device=cpu")
        return f"cuda:{local_rank}"
    try:
        torch.empty(0, device=device)
    except NotImplementedError:  # the dispatcher's page-long account of a backend this build lacks
        raise ValueError(f"device={device!r} is not usable here: this build of PyTorch has no "
                         f"{torch.device(device).type} backend") from None
    except (RuntimeError, AssertionError) as e:  # a bad name, no CUDA, no such GPU, ...
        raise ValueError(f"device={device!r} is not usable here: "
                         f"{str(e).strip().splitlines()[0][:200]}") from None
    return device


def autocast_for(device, dtype):
    """The run's dtype name and its autocast context on `device`. dtype: 'float32', 'bfloat16',
    'float16', or 'auto': float32 on a CPU, bfloat16 on GPUs that have it, float16 on older ones."""
    import torch
    device_type = torch.device(device).type
    if dtype == 'auto':
        dtype = ('float32' if device_type == 'cpu'
                 else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
    if dtype == 'float32':
        return dtype, contextlib.nullcontext()
    return dtype, torch.amp.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# dense bf16/fp16 tensor-core peaks in FLOP/s; the first name found in the GPU's name wins
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'A100': 312e12}


def gpu_peak_flops(device):
    """The bf16 peak of the GPU `device`, for MFU; None for a CPU or a GPU not in the table."""
    import torch
    return peak_flops_of(torch.cuda.get_device_name(device)) if torch.device(device).type == 'cuda' else None


def peak_flops_of(name):
    """The bf16 peak of a GPU by the name CUDA gives it: the first key of GPU_PEAK_FLOPS in the name
    (so an 'H100 NVL' is not taken for an H100 SXM), or None."""
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)
