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
    None passes every bound (it means 'off' or 'default'). Raises ValueError naming the first key that breaks its rule."""
    for key, allowed in rules.items():
        value = config[key]
        if isinstance(allowed, tuple):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")
            continue
        for bound in allowed.split(','):
            op, limit = re.fullmatch(r'\s*(>=|<=|>|<)\s*(\S+)\s*', bound).groups()
            if value is not None and not COMPARISONS[op](value, float(limit)):
                raise ValueError(f"{key}={value!r}: must be {' and '.join(b.strip() for b in allowed.split(','))}")


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
    except Exception as e:  # the file is Python: whatever it raises is reported, not shown as a traceback
        line = next((frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path), '?')
        raise ValueError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}


def read_overrides(defaults, argv, nullable=()):
    """The settings that config files and --key=value arguments in argv give, in order, each checked
    against its default's type. Returns {key: value}; raises ValueError with a one-line message."""
    given = {}
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq and not isinstance(defaults.get(key), bool):
                raise ValueError(f"{arg}: write overrides as --key=value (a bare --key sets a True/False key)")
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
    settings = {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
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
    comments = {tok.start[0] - 1: (tok.start[1], tok.string.lstrip('#').strip())  # {line: (column, text)}
                for tok in tokenize.generate_tokens(io.StringIO('\n'.join(block) + '\n').readline) if tok.type == tokenize.COMMENT}
    for n, line in enumerate(block):
        column, comment = comments.get(n, (len(line), ''))
        match = re.match(r'(\w+)\s*=', line)
        if column == 0:
            out.append(f"  {comment}:")
        elif match:
            out.append((f"    --{match.group(1)}={line[match.end():column].strip()}".ljust(36) + f" {comment}").rstrip())
    return '\n'.join(out)
