"""
Command-line configuration for the scripts, as in nanoGPT: a script keeps its defaults as plain
module-level variables, then

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

runs the config file (Python assignments) and then applies each --key=value, in order (a bare --key
sets a True/False setting to True). Unlike
nanoGPT's exec, a key the script does not have, or a value of the wrong type, is refused.
"""

import ast
import os
import sys
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


def configure_script(namespace, argv, nullable=(), choices=None):
    """Apply argv to a script's settings: the plain values (numbers, strings, True/False, None) among
    its globals() so far. Bad input ends the script with one line. Returns the settings as a dict."""
    settings = {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
    try:
        config = configure(settings, argv, nullable)
        for key, allowed in (choices or {}).items():
            if config[key] not in allowed:
                raise ValueError(f"{key}={config[key]!r}: expected one of {', '.join(allowed)}")
    except ValueError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")
    namespace.update(config)
    return config


def configure(defaults, argv, nullable=()):
    """defaults: {key: value} of the script's settings. argv: config files and --key=value overrides.
    nullable: keys that also accept None. Returns a new dict with the overrides applied; raises
    ValueError with a one-line message on bad input."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq and not isinstance(defaults.get(key), bool):
                raise ValueError(f"{arg}: write overrides as --key=value (a bare --key sets a True/False key)")
            config[key] = _checked(key, _parse(text) if eq else True, defaults, nullable, '')
        else:
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ValueError(f"cannot read config file {arg}: {e.strerror}") from None
            namespace = {}
            exec(compile(source, arg, 'exec'), namespace)
            for key, value in namespace.items():
                if not key.startswith('_') and not isinstance(value, types.ModuleType):  # `import math` is fine
                    config[key] = _checked(key, value, defaults, nullable, f" (in {arg})")
    return config
