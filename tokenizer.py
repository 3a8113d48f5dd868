"""
Text as token ids, and back: the tokenizers a dataset or a checkpoint names in its description (a
meta.json, or a checkpoint's 'meta'), built from that description wherever it is read.
- 'gpt2': GPT-2's BPE through tiktoken ('r50k_base', the same vocabulary in one cacheable file, so
  an offline machine loads it from TIKTOKEN_CACHE_DIR), <|endoftext|> after every document;
- 'char': one token per character, from the description's character table;
- 'hf': a Hugging Face model folder's tokenizer.json (pip install tokenizers), found by the path and
  checked against the hash the description recorded; and its chat template, rendered in jinja2's
  sandbox within a time and a size limit (pip install jinja2).
Whatever is wrong is a TokenizerError (a ValueError), one line naming the file.
"""

import hashlib
import json
import os
import signal
import threading

GPT2_EOT = 50256  # <|endoftext|>, placed after every document
RENDER_SECONDS = 10  # a chat template's rendering is stopped past this (a real one takes milliseconds)...
RENDER_CHARS = 1 << 20  # ...or past this many characters, far beyond any model's context


class TokenizerError(ValueError):
    """A tokenizer that cannot be had, or text it cannot take: reported as one line."""


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('r50k_base')  # GPT-2's BPE vocabulary, from one cacheable file
    except Exception as e:  # tiktoken raises whatever its download raised
        raise TokenizerError(f"cannot load the GPT-2 BPE (tiktoken r50k_base: {type(e).__name__}); offline, "
                             "set TIKTOKEN_CACHE_DIR to a folder that holds it") from None


def hf_tokenizer(folder, expected_sha256=None):
    """A Hugging Face tokenizer.json, as the tokenizers library loads it; checked against the hash a
    dataset or checkpoint recorded for it, if any."""
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
        raise TokenizerError(f"no tokenizer.json in {folder}")
    if expected_sha256 and file_sha256(path) != expected_sha256:
        raise TokenizerError(f"{path} is another tokenizer than the one recorded "
                             f"(sha256 {expected_sha256[:12]}...)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("a Hugging Face tokenizer needs the tokenizers package: "
                             "pip install tokenizers") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot read
        raise TokenizerError(f"{path} is not a tokenizer the tokenizers library reads: {e}") from None


def hf_tokenizer_meta(folder):
    """meta.json's description of a Hugging Face model folder's tokenizer: where it is, its hash, its
    vocabulary and its end-of-sequence token (config.json's, or tokenizer_config.json's)."""
    tokenizer = hf_tokenizer(folder)
    meta = tokenizer_meta(folder)
    if meta['eot_token'] is None:
        raise TokenizerError(f"{folder} names no end-of-sequence token "
                             f"(eos_token_id in config.json, eos_token in tokenizer_config.json)")
    # an id past their count (a gap in the numbering) still needs a row of the embedding
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    return dict(meta, vocab_size=max(tokenizer.get_vocab_size(with_added_tokens=True), largest + 1))


def check_tokenizer_folder(meta, folder):
    """A folder given (--tokenizer) for a model that never had a Hugging Face tokenizer is a mistake,
    not a hint: refused rather than ignored."""
    if folder and meta['tokenizer'] != 'hf':
        raise TokenizerError(f"--tokenizer={folder}: this model's tokenizer is {meta['tokenizer']}, which "
                             "needs no folder; --tokenizer names where a Hugging Face tokenizer has moved")


def tokenizer_from_meta(meta, folder=None, show_special=None):
    """(encode: str -> list of ids, decode: list of ids -> str) for the tokenizer a meta.json (or a
    checkpoint's meta) names. folder: where a Hugging Face tokenizer is now, if it has moved.
    show_special: whether decode writes special tokens (<|endoftext|>, <|im_start|>, ...); None:
    each tokenizer's own way (GPT-2's does, a Hugging Face tokenizer's does not)."""
    check_tokenizer_folder(meta, folder)
    if meta['tokenizer'] == 'gpt2':
        enc = gpt2_encoding()
        hidden = set() if show_special in (None, True) else {GPT2_EOT}
        return enc.encode_ordinary, lambda ids: enc.decode([i for i in ids if i not in hidden])
    if meta['tokenizer'] == 'hf':
        folder = folder or meta['tokenizer_path']
        if not os.path.isdir(folder):
            raise TokenizerError(f"the tokenizer was at {folder}, which is not there now: "
                                 f"pass --tokenizer=<the folder holding its tokenizer.json>")
        tokenizer = hf_tokenizer(folder, meta['tokenizer_sha256'])
        # encode: the special tokens written in text still count
        return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                lambda ids: tokenizer.decode(ids, skip_special_tokens=not show_special))
    chars = meta['chars']
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - stoi.keys())
        if unknown:
            raise TokenizerError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [stoi[c] for c in text]
    return encode, lambda ids: ''.join(chars[i] for i in ids)


def tokenizer_meta(folder):
    """How a dataset tokenized with this folder's tokenizer.json is described: where it is, its hash,
    and the token that ends a document. prepare_data.py writes it into meta.json; a checkpoint of the
    folder carries it. The end token is config.json's eos_token_id, else tokenizer_config.json's
    eos_token (None if neither names one). None without a tokenizer.json."""
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
        return None
    eos = read_json(folder, 'config.json').get('eos_token_id')
    eos = eos[0] if isinstance(eos, list) and eos else eos
    name = read_json(folder, 'tokenizer_config.json').get('eos_token')
    name = name.get('content') if isinstance(name, dict) else name
    if eos is None and isinstance(name, str):
        try:
            from tokenizers import Tokenizer
            eos = Tokenizer.from_file(path).token_to_id(name)
        except ImportError:
            pass  # a checkpoint loads without it; tokenizing says what to install
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot read
            raise TokenizerError(f"{path} is not a tokenizer the tokenizers library reads: {e}") from None
    if eos is not None and (type(eos) is not int or eos < 0):
        raise TokenizerError(f"{folder}/config.json: eos_token_id={eos!r}, expected a token id")
    return dict(tokenizer='hf', tokenizer_path=os.path.abspath(folder),
                tokenizer_sha256=file_sha256(path), eot_token=eos)


def chat_prompt(folder, message):
    """message as the one user turn of the folder's chat template (chat_template.jinja, or
    tokenizer_config.json's chat_template), ending where the assistant's answer begins. Rendered in
    jinja2's sandbox, so a stranger's template cannot run code (pip install jinja2), within
    RENDER_SECONDS and RENDER_CHARS, so it cannot hang or fill the memory. Raises ValueError, one line
    naming the template's file, for a folder without a template or a template that fails."""
    config = read_json(folder, 'tokenizer_config.json')
    template, source = config.get('chat_template'), os.path.join(folder, 'tokenizer_config.json')
    path = os.path.join(folder, 'chat_template.jinja')
    if os.path.isfile(path):
        with open(path, encoding='utf-8', errors='replace') as f:
            template, source = f.read(), path
    if not isinstance(template, str):
        raise TokenizerError(f"{folder} has no chat template "
                             f"(chat_template.jinja, or chat_template in tokenizer_config.json)")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError("a chat template needs the jinja2 package: pip install jinja2") from None
    token = lambda name: ((config.get(name) or {}).get('content', '')
                          if isinstance(config.get(name), dict) else config.get(name) or '')

    def raise_exception(text):  # what templates call on a conversation they do not take
        raise TemplateError(text)
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=['jinja2.ext.loopcontrols'])
    return rendered(environment, template, source, messages=[{'role': 'user', 'content': message}],
                    add_generation_prompt=True, bos_token=token('bos_token'), eos_token=token('eos_token'),
                    raise_exception=raise_exception)


def rendered(environment, template, source, **context):
    """The template's text, stopped past RENDER_CHARS, or past RENDER_SECONDS where a timer can
    interrupt it (a signal: in the main thread). Raises ValueError, one line naming source, for a
    template that fails (whatever its expressions raise: ZeroDivisionError, TypeError, ...) or is
    stopped."""
    def too_long(signum, frame):
        raise TimeoutError
    timed = hasattr(signal, 'setitimer') and threading.current_thread() is threading.main_thread()
    if timed:
        previous = signal.signal(signal.SIGALRM, too_long)
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        text, size = [], 0
        for piece in environment.from_string(template).generate(**context):
            text.append(piece)
            size += len(piece)
            if size > RENDER_CHARS:
                problem = f"wrote more than {RENDER_CHARS:,} characters: stopped"
                break
        else:
            return ''.join(text)
    except TimeoutError:
        problem = f"ran for more than {RENDER_SECONDS} s: stopped"
    except Exception as e:
        problem = f"failed: {type(e).__name__}: {e}"
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
    raise TokenizerError(f"{source}: the chat template {problem}")


def tokenizer_mismatch(model_meta, data_meta, source, data_dir):
    """Why a model (the tokenizer description in its checkpoint, `source`) cannot read a dataset
    prepared as data_meta, in one line, or None when it can: its ids would mean other text."""
    trained, prepared = model_meta['tokenizer'], data_meta['tokenizer']
    if trained != prepared or model_meta.get('tokenizer_sha256') != data_meta.get('tokenizer_sha256'):
        return (f"{source} was trained on the {trained} tokenizer but {data_dir} is tokenized with "
                f"{prepared}{' (another tokenizer.json)' * (trained == prepared)}: prepare it with "
                f"--tokenizer={model_meta.get('tokenizer_path') or trained}")
    if model_meta.get('chars') != data_meta.get('chars'):
        chars, other = model_meta.get('chars') or (), data_meta.get('chars') or ()
        only = sorted(set(chars) ^ set(other))
        return (f"the character tables of {source} ({len(chars)} characters) and {data_dir} "
                f"({len(other)}) differ ({''.join(only[:10])!r} in one only): "
                f"a character model reads only its own")
    return None


def read_json(folder, name):
    """A JSON file of the folder as a dict; {} if the folder has none of that name. Raises ValueError,
    one line naming the file, when it is not a JSON object."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def file_sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()
