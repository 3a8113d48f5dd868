"""
A checkpoint as a Hugging Face model folder, for transformers, lm-evaluation-harness and the Hub
(pip install transformers):

    python export_hf.py --init_from=out-pydoc-char --out_dir=hf-pydoc-char

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained('hf-pydoc-char', trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained('hf-pydoc-char', trust_remote_code=True)

The folder holds config.json, generation_config.json, model.safetensors (in shards past max_shard_size),
a tokenizer that AutoTokenizer loads and that tokenizes every text as ours does (GPT-2's BPE written
from tiktoken's ranks, the character table, or the Hugging Face tokenizer a model was fine-tuned with),
a README.md, and for StableMask the modeling code: stablemask_hf.py with model.py, kv_cache.py and
stablemask_sdpa.py as they are here, their imports made relative, so that the folder runs this
repository's own code and needs nothing else (transformers runs it only with trust_remote_code=True,
and refuses it otherwise: such a model never loads as a causal one). A causal RoPE model with none of
our sinks or gates is a plain LlamaForCausalLM folder (Qwen2ForCausalLM with q, k, v biases), no code.
The folder is written aside and renamed into place; an existing one is replaced only with
--overwrite=True, and only when it is an earlier export (never a run's folder, a file, or the folder
the command runs in). --init_from=<the folder> reads it back.
"""

import ast
import dataclasses
import json
import os
import re
import shutil
import signal
import sys

import torch

from checkpoint import checkpoint_file, load_checkpoint, missing_tokenizer, model_from_checkpoint
from configurator import configure_script, fail
from run_dir import process_alive
from tokenizer import GPT2_EOT, check_tokenizer_folder, file_sha256, gpt2_encoding, read_json

# -----------------------------------------------------------------------------
init_from = 'out'  # a run's folder, a checkpoint file, a sharded checkpoint
out_dir = ''  # the folder to write
tokenizer = ''  # where a fine-tuned model's Hugging Face tokenizer is now, if it has moved
dtype = 'float32'  # of the weights written: 'float32', 'bfloat16', 'float16'
max_shard_size = '5GB'  # model.safetensors in shards of at most this size past it
overwrite = False  # replace an earlier export in out_dir
# -----------------------------------------------------------------------------
RULES = dict(dtype=('float32', 'bfloat16', 'float16'))

REPO = os.path.dirname(os.path.abspath(__file__))
# a Hugging Face tokenizer's files, copied where the model's folder has them
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json')
# what the folder's code may import: transformers runs it only where these are installed
ALLOWED_IMPORTS = {'torch', 'transformers', *sys.stdlib_module_names}
# a module of this repository that the folder's code imports but cannot carry becomes this
STUB = '''"""Not part of an exported model ({name}.py needs {needs}): the model runs on PyTorch's
fused attention, attn_impl='sdpa'."""

raise ImportError("an exported StableMask model has no {name}.py: it runs with attn_impl='sdpa'")
'''


class ExportError(ValueError):
    """What cannot be exported, in one line."""

# -----------------------------------------------------------------------------
# the model: a plain Llama (or Qwen2) folder where that is the same model, else ours with its code


def plain_architecture(config):
    """The transformers architecture that computes this model (a GPTConfig) exactly with no code of
    ours: a causal RoPE model with no sink, gate or bias but Qwen2's on q, k, v. None for any other."""
    extras = (config.sink_logit, config.sink_token, config.attn_gate)
    if (config.attn_mask, config.pos_enc, config.bias, extras) != ('causal', 'rope', False, ('none',) * 3):
        return None
    return 'Qwen2ForCausalLM' if config.qkv_bias else 'LlamaForCausalLM'


def plain_model(model, arch, tokens):
    """transformers' own model of our causal RoPE GPT, holding its weights (pretrained.py's table of
    names, read backwards: c_attn split into q, k, v)."""
    import transformers
    from pretrained import source_map
    cfg = model.config
    attn = model.transformer.h[0].attn
    rope = {'rope_type': 'default', **(cfg.rope_scaling or {}), 'rope_theta': cfg.rope_base}
    config = getattr(transformers, arch.replace('ForCausalLM', 'Config'))(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        intermediate_size=model.transformer.h[0].mlp.c_fc.out_features, num_attention_heads=cfg.n_head,
        num_key_value_heads=attn.n_kv_head, head_dim=attn.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope, max_position_embeddings=cfg.block_size, tie_word_embeddings=cfg.tie_embeddings,
        **tokens)
    with torch.device('meta'):  # no memory until it holds our tensors
        hf = getattr(transformers, arch)(config)
    ours, state = model.state_dict(), {}
    for name, sources in source_map(list(hf.state_dict()), vars(cfg), arch).items():
        state.update(zip(sources, ours[name].split([hf.get_parameter(n).size(0) for n in sources])))
    # a tied head is not among them: tie_weights makes it the embedding
    hf.load_state_dict(state, assign=True, strict=False)
    hf.tie_weights()
    return hf


def stablemask_model(model, tokens):
    """Our GPT as stablemask_hf.StableMaskForCausalLM, with its weights; its config.json names the
    folder's code (auto_map) and holds GPTConfig's fields."""
    from stablemask_hf import StableMaskConfig, StableMaskForCausalLM
    fields = {k: v for k, v in dataclasses.asdict(model.config).items() if k != 'attn_impl'}
    config = StableMaskConfig(stablemask=fields, **tokens, architectures=['StableMaskForCausalLM'],
                              auto_map={'AutoConfig': 'stablemask_hf.StableMaskConfig',
                                        'AutoModelForCausalLM': 'stablemask_hf.StableMaskForCausalLM'})
    with torch.device('meta'):
        hf = StableMaskForCausalLM(config)
    hf.model.load_state_dict(model.state_dict(), assign=True)
    hf.model.set_constants(next(model.parameters()).device)
    return hf


def write_code(folder):
    """stablemask_hf.py and the modules of this repository it imports, in turn, into folder, each with
    those imports made relative (transformers copies a folder's code with what it imports relatively);
    a module that needs more than torch (the Triton kernel) becomes a stub that refuses to load."""
    todo, done = ['stablemask_hf'], set()
    while todo:
        name = todo.pop()
        done.add(name)
        with open(os.path.join(REPO, f'{name}.py'), encoding='utf-8') as f:
            source = f.read()
        ours = repo_imports(source)
        needs = sorted(top_imports(source) - ours - ALLOWED_IMPORTS)
        if needs:
            source = STUB.format(name=name, needs=', '.join(needs))
        else:
            source = relative_imports(source, ours)
            todo += sorted(ours - done - set(todo))
        with open(os.path.join(folder, f'{name}.py'), 'w', encoding='utf-8') as f:
            f.write(f"# Written by export_hf.py from the stablemask repository's {name}.py.\n" + source)


def top_imports(source):
    """The top-level names of every module the source imports (relative imports aside)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names


def repo_imports(source):
    return {name for name in top_imports(source) if os.path.isfile(os.path.join(REPO, f'{name}.py'))}


def relative_imports(source, modules):
    """source with `from x import ...` made `from .x import ...` for each module x of modules."""
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and {a.name for a in node.names} & modules:
            raise ExportError(f"write `from x import y` for this repository's modules: line {node.lineno} "
                              f"imports {', '.join(a.name for a in node.names)}")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            line = lines[node.lineno - 1]
            lines[node.lineno - 1] = line.replace(f'from {node.module} ', f'from .{node.module} ', 1)
    return ''.join(lines)

# -----------------------------------------------------------------------------
# the tokenizer: files AutoTokenizer loads, tokenizing as ours


def write_tokenizer(folder, meta, block_size, tokenizer_folder=None):
    """The tokenizer of the checkpoint's meta into folder. Returns its special tokens' ids for
    config.json and generation_config.json (bos_token_id, eos_token_id, pad_token_id)."""
    settings = dict(tokenizer_class='PreTrainedTokenizerFast', model_max_length=block_size,
                    clean_up_tokenization_spaces=False)
    if meta['tokenizer'] == 'gpt2':
        gpt2_tokenizer().save(os.path.join(folder, 'tokenizer.json'))
        # tiktoken's encode_ordinary, which ours is: <|endoftext|> written in a text is text
        end = '<|endoftext|>'
        settings.update(bos_token=end, eos_token=end, unk_token=end, pad_token=end,
                        split_special_tokens=True)
        write_json(os.path.join(folder, 'tokenizer_config.json'), settings)
        return dict(bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, pad_token_id=GPT2_EOT)
    if meta['tokenizer'] == 'char':
        char_tokenizer(meta['chars']).save(os.path.join(folder, 'tokenizer.json'))
        write_json(os.path.join(folder, 'tokenizer_config.json'), settings)
        return dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    source = tokenizer_folder or meta['tokenizer_path']
    path = os.path.join(source, 'tokenizer.json')
    if not os.path.isfile(path):
        raise ExportError(f"the model's tokenizer was at {source}, which has no tokenizer.json now: pass "
                          f"--tokenizer=<the folder holding its tokenizer.json>")
    if file_sha256(path) != meta['tokenizer_sha256']:
        raise ExportError(f"{path} is another tokenizer than the one the model was trained with")
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    return hf_special_tokens(folder, meta)


def hf_special_tokens(folder, meta):
    """The ids of a Hugging Face tokenizer's bos and pad tokens (tokenizer_config.json's), and of the
    model's end token (the checkpoint's)."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
    config = read_json(folder, 'tokenizer_config.json')

    def token_id(key):
        token = config.get(key)
        token = token.get('content') if isinstance(token, dict) else token
        return tokenizer.token_to_id(token) if isinstance(token, str) else None
    return dict(bos_token_id=token_id('bos_token'), eos_token_id=meta.get('eot_token'),
                pad_token_id=token_id('pad_token'))


def gpt2_tokenizer():
    """GPT-2's BPE as a tokenizers ByteLevel BPE, built from tiktoken's r50k_base ranks (its cache:
    no download): the vocabulary in GPT-2's byte-to-character spelling, and for each token its merge,
    the two parts that BPE joins into it, in the order of the ranks."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    encoding = gpt2_encoding()
    ranks = {token: encoding.encode_single_token(token) for token in encoding.token_byte_values()}
    spelled = bytes_to_unicode()
    spell = lambda token: ''.join(spelled[byte] for byte in token)
    merges = [tuple(map(spell, last_merge(token, ranks)))
              for token in sorted(ranks, key=ranks.get) if len(token) > 1]
    vocab = {spell(token): rank for token, rank in ranks.items()}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # GPT-2's pattern (r50k_base's), then its bytes as characters
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens([AddedToken('<|endoftext|>', special=True, normalized=False)])
    return bpe


def last_merge(token, ranks):
    """The two parts BPE joins into token: tiktoken's BPE on its bytes (the adjacent pair of lowest
    rank merged first), stopped at two parts."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, len(ranks)) for a, b in zip(parts, parts[1:])]
        i = pair_ranks.index(min(pair_ranks))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def char_tokenizer(chars):
    """A character table as a tokenizers WordLevel tokenizer: every character a token of its own, a
    character not in the table refused (as ours refuses it), decoded by joining."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    table = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token='[UNK]'))
    table.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
    table.decoder = decoders.Fuse()
    return table

# -----------------------------------------------------------------------------
# the folder


def export(init_from, out_dir, tokenizer_folder=None, dtype='float32', max_shard_size='5GB',
           overwrite=False):
    """Write the checkpoint at init_from as a Hugging Face folder at out_dir (module docstring).
    Returns the architecture written. Raises ValueError, one line, for what cannot be exported."""
    try:
        import transformers  # noqa: F401 (the folder is written by transformers' own save)
    except ImportError:
        raise ExportError("exporting needs transformers: pip install transformers") from None
    checkpoint = load_checkpoint(init_from)
    meta = checkpoint.get('meta')
    if not meta or meta.get('tokenizer') not in ('gpt2', 'char', 'hf'):
        raise ExportError(missing_tokenizer(init_from))
    check_tokenizer_folder(meta, tokenizer_folder)
    out_dir = os.path.abspath(out_dir)
    tidy(out_dir)
    if os.path.realpath(checkpoint_file(init_from)).startswith(os.path.realpath(out_dir) + os.sep):
        raise ExportError(f"out_dir={out_dir} holds the checkpoint it would export: choose another")
    if os.path.exists(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists: pass --overwrite=True to replace it, "
                          f"or choose another --out_dir")
    if os.path.exists(out_dir):
        check_replaceable(out_dir)
    model = model_from_checkpoint(checkpoint, attn_impl='sdpa').to(getattr(torch, dtype))
    tmp = aside(out_dir)
    try:
        tokens = write_tokenizer(tmp, meta, model.config.block_size, tokenizer_folder)
        arch = plain_architecture(model.config)
        hf = plain_model(model, arch, tokens) if arch else stablemask_model(model, tokens)
        if meta['tokenizer'] != 'hf':
            # so that --init_from=<the folder> tokenizes with our own tokenizer again
            kept = ('tokenizer', 'chars', 'eot_token')
            hf.config.stablemask_tokenizer = {k: meta[k] for k in kept if k in meta}
        hf.generation_config = transformers.GenerationConfig(**tokens)
        hf.save_pretrained(tmp, max_shard_size=max_shard_size)
        if not arch:
            write_code(tmp)
        write_card(tmp, os.path.basename(out_dir), arch, model.config)
        usual_modes(tmp)
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch or 'StableMaskForCausalLM'


# what an export writes, and so what overwrite=True may remove
EXPORTED = re.compile(r'(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens'
                      r'|vocab)\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|merges\.txt'
                      r'|tokenizer\.model|chat_template\.(jinja|json)|README\.md|\w+\.py')


def check_replaceable(out_dir):
    """overwrite=True replaces an earlier export only: never a run's folder, a file, or the folder this
    command runs in."""
    if not os.path.isdir(out_dir):
        raise ExportError(f"out_dir={out_dir} is a file, not an earlier export: choose another --out_dir")
    inside = lambda path: os.path.join(os.path.realpath(path), '')
    if inside(os.getcwd()).startswith(inside(out_dir)):
        raise ExportError(f"out_dir={out_dir} holds the current folder: choose another --out_dir")
    foreign = sorted(e for e in os.listdir(out_dir)
                     if not (EXPORTED.fullmatch(e) and os.path.isfile(os.path.join(out_dir, e))))
    if foreign or not os.path.isfile(os.path.join(out_dir, 'config.json')):
        held = f"it holds {', '.join(foreign[:3])}" if foreign else "it has no config.json"
        raise ExportError(f"out_dir={out_dir} is not an earlier export ({held}), so --overwrite=True "
                          f"will not replace it: choose another --out_dir")


def tidy(out_dir):
    """What killed runs left beside out_dir (aside's folders, named by their process ids): the folders
    they were writing removed, and a folder that one had moved aside to replace, and had not replaced
    yet, moved back."""
    parent, name = os.path.split(out_dir)
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = re.fullmatch(rf'\.{re.escape(name)}\.export(\d+)(\.old)?', entry)
        if match and not process_alive(int(match.group(1))):
            if match.group(2) and not os.path.exists(out_dir):
                os.replace(os.path.join(parent, entry), out_dir)
            else:
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def aside(out_dir):
    """A fresh folder beside out_dir to write into, its name holding this process's id."""
    parent, name = os.path.split(out_dir)
    tmp = os.path.join(parent, f'.{name}.export{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def usual_modes(folder):
    """The folder's files readable as the user's umask allows, as any file they write: safetensors
    writes its own 0600, which would keep a model meant to be shared from everyone else."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, 0o666 & ~umask)


def replace_folder(tmp, out_dir):
    """tmp renamed to out_dir, an out_dir already there (overwrite) moved aside first and removed after.
    Ctrl-C and SIGTERM wait for the two renames; after a kill -9 between them, tidy moves it back."""
    old = f'{tmp}.old'
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if os.path.exists(out_dir):
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, value):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write('\n')


def write_card(folder, name, arch, config):
    """README.md: what the model is (arch None: ours), how to load it, what it needs."""
    what = (f"a causal {arch} model" if arch else
            f"a StableMask model (Yin et al., ICML 2024; attn_mask={config.attn_mask}, "
            f"pos_enc={config.pos_enc}, block_size {config.block_size})")
    text = f"""# {name}

This is {what}, trained with the stablemask repository and written by its export_hf.py.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained('{name}'{'' if arch else ', trust_remote_code=True'})
tokenizer = AutoTokenizer.from_pretrained('{name}')
```
"""
    if not arch:
        text += """
Its modeling code (stablemask_hf.py, with model.py, kv_cache.py and stablemask_sdpa.py) is the
repository's own; transformers runs it only with `trust_remote_code=True`, and without it refuses the
folder. Every row has the pseudo mass of the training length (the paper's SM-I), so a KV cache, left
padding and batching change no row. Serving engines (vLLM, llama.cpp) support one scalar sink logit per
head; StableMask's pseudo mass, which differs from row to row, is not expressible there yet.
"""
    with open(os.path.join(folder, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(text)


if __name__ == '__main__':
    configure_script(globals(), sys.argv[1:], rules=RULES)
    if not out_dir:
        fail("--out_dir=<folder> names the folder to write")
    # SIGTERM as Ctrl-C: the folder being written is removed on the way out
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        written = export(init_from, out_dir, tokenizer or None, dtype, max_shard_size, overwrite)
    except ValueError as e:
        fail(e)
    except KeyboardInterrupt:
        print(f"export_hf.py: interrupted: {out_dir} is whole, as it was or as written", file=sys.stderr)
        sys.exit(130)
    print(f"exported {checkpoint_file(init_from)} to {out_dir} as {written}")
