"""
Hugging Face checkpoints of the LLaMA family as this repository's GPT: LlamaForCausalLM (Llama 2 and
3.x, TinyLlama, SmolLM and SmolLM2), Qwen2ForCausalLM and MistralForCausalLM without a sliding
window. Our model is already LLaMA's (RMSNorm, SwiGLU, rotate-half RoPE), so this is one table of
names and one loop; q, k and v are fused into c_attn, as gpt-fast's converter does.

    checkpoint = pretrained_checkpoint('SmolLM2-135M/')   # what model.load_checkpoint returns for such a folder

The weights come from model.safetensors or a sharded model.safetensors.index.json (pip install
safetensors); a pickled pytorch_model.bin is refused, as loading it could run code.
"""

import hashlib
import json
import os
import re

import torch

SUPPORTED = ('LlamaForCausalLM', 'Qwen2ForCausalLM', 'MistralForCausalLM')
RENAMES = [  # Hugging Face name -> ours; q, k and v go into c_attn (below)
    (r'model\.embed_tokens\.weight', 'transformer.wte.weight'),
    (r'model\.norm\.weight', 'transformer.ln_f.weight'),
    (r'lm_head\.weight', 'lm_head.weight'),
    (r'model\.layers\.(\d+)\.input_layernorm\.weight', r'transformer.h.\1.ln_1.weight'),
    (r'model\.layers\.(\d+)\.post_attention_layernorm\.weight', r'transformer.h.\1.ln_2.weight'),
    (r'model\.layers\.(\d+)\.self_attn\.o_proj\.weight', r'transformer.h.\1.attn.c_proj.weight'),
    (r'model\.layers\.(\d+)\.mlp\.gate_proj\.weight', r'transformer.h.\1.mlp.c_gate.weight'),
    (r'model\.layers\.(\d+)\.mlp\.up_proj\.weight', r'transformer.h.\1.mlp.c_fc.weight'),
    (r'model\.layers\.(\d+)\.mlp\.down_proj\.weight', r'transformer.h.\1.mlp.c_proj.weight'),
]
QKV = re.compile(r'model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)')


def is_pretrained_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')) and not os.path.isfile(os.path.join(path, 'ckpt.pt'))


def model_args(config, where):
    """GPTConfig fields for a Hugging Face config.json (as a dict), in the Hub's older form
    (rope_theta, rope_scaling) or transformers 5's (rope_parameters). Raises ValueError, one line,
    naming what is unsupported."""
    arch = (config.get('architectures') or ['(none)'])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"{where}: {arch} is not supported (only {', '.join(SUPPORTED)})")
    window = config.get('sliding_window')
    if window and (arch == 'MistralForCausalLM' or config.get('use_sliding_window')) and window < config['max_position_embeddings']:
        raise ValueError(f"{where}: a sliding window of {window} is not supported")
    for key in ('attention_bias', 'mlp_bias'):
        if config.get(key):
            raise ValueError(f"{where}: {key}=True is not supported")
    if config.get('hidden_act', 'silu') != 'silu':
        raise ValueError(f"{where}: hidden_act={config['hidden_act']} is not supported (only silu)")
    rope = dict(config.get('rope_parameters') or config.get('rope_scaling') or {})
    theta = rope.pop('rope_theta', None) or config.get('rope_theta', 10000.0)
    kind = rope.get('rope_type', rope.get('type', 'default'))
    if kind not in ('default', 'linear', 'llama3'):
        raise ValueError(f"{where}: rope_type={kind} is not supported (default, linear, llama3)")
    heads = config['num_attention_heads']
    return dict(
        vocab_size=config['vocab_size'], n_layer=config['num_hidden_layers'], n_head=heads,
        n_kv_head=config.get('num_key_value_heads') or heads, n_embd=config['hidden_size'],
        head_dim=config.get('head_dim') or config['hidden_size'] // heads, n_hidden=config['intermediate_size'],
        norm_eps=config.get('rms_norm_eps', 1e-6), rope_base=float(theta),
        rope_scaling=None if kind == 'default' else {'rope_type': kind, **{k: v for k, v in rope.items() if k not in ('rope_type', 'type')}},
        qkv_bias=arch == 'Qwen2ForCausalLM', tie_embeddings=bool(config.get('tie_word_embeddings', False)),
        block_size=config['max_position_embeddings'], bias=False, pos_enc='rope', attn_mask='causal', dropout=0.0)


def weight_files(folder):
    """{Hugging Face tensor name: the safetensors file that holds it}, of model.safetensors or of every
    shard a model.safetensors.index.json names; nothing is read but the files' headers."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ValueError("loading a Hugging Face checkpoint needs the safetensors package: pip install safetensors") from None
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(folder, shard) for name, shard in json.load(f)['weight_map'].items()}
    path = os.path.join(folder, 'model.safetensors')
    if not os.path.isfile(path):
        found = 'only a pickled pytorch_model.bin, refused as loading it could run code' if os.path.exists(
            os.path.join(folder, 'pytorch_model.bin')) else 'none'
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json ({found})")
    with safe_open(path, framework='pt') as f:
        return {name: path for name in f.keys()}


def read_weights(folder):
    """{name: tensor} of every tensor weight_files names."""
    from safetensors.torch import load_file
    weights = {}
    for path in sorted(set(weight_files(folder).values())):
        weights.update(load_file(path))
    return weights


def source_map(names, args, where):
    """{our tensor's name: the Hugging Face tensors whose concatenation along the first dimension it
    is}: renamed, q, k and v fused into c_attn (weights, and biases), the head tied to the embedding."""
    sources, qkv = {}, {}
    for name in names:
        if name.endswith('rotary_emb.inv_freq'):
            continue  # a buffer older checkpoints kept; ours is computed
        fused = QKV.fullmatch(name)
        if fused:
            layer, which, kind = fused.groups()
            qkv.setdefault((layer, kind), {})[which] = name
            continue
        for pattern, ours in RENAMES:
            if re.fullmatch(pattern, name):
                sources[re.sub(pattern, ours, name)] = [name]
                break
        else:
            raise ValueError(f"{where}: an unexpected tensor {name}")
    for (layer, kind), parts in qkv.items():
        sources[f"transformer.h.{layer}.attn.c_attn.{kind}"] = [parts['q'], parts['k'], parts['v']]
    if args['tie_embeddings']:
        sources['lm_head.weight'] = sources['transformer.wte.weight']
    return sources


def state_dict(weights, args, where):
    """Our GPT's state dict from Hugging Face weights (source_map's names and fusions)."""
    return {ours: torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
            for ours, names in source_map(weights, args, where).items()}


def tokenizer_meta(folder):
    """How a dataset tokenized with this folder's tokenizer.json is described (prepare_data.py writes
    it into meta.json; a checkpoint of the folder carries it): where it is, its hash, and the token
    that ends a document, config.json's eos_token_id or else tokenizer_config.json's eos_token
    (None if neither names one). None without a tokenizer.json."""
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
        return None
    eos = read_json(folder, 'config.json').get('eos_token_id')
    eos = eos[0] if isinstance(eos, list) else eos
    name = read_json(folder, 'tokenizer_config.json').get('eos_token')
    if eos is None and name:
        try:
            from tokenizers import Tokenizer
            eos = Tokenizer.from_file(path).token_to_id(name['content'] if isinstance(name, dict) else name)
        except ImportError:
            pass  # a checkpoint loads without it; tokenizing says what to install
    return dict(tokenizer='hf', tokenizer_path=os.path.abspath(folder), tokenizer_sha256=file_sha256(path), eot_token=eos)


def chat_prompt(folder, message):
    """message as the one user turn of the folder's chat template (chat_template.jinja, or
    tokenizer_config.json's chat_template), ending where the assistant's answer begins. Rendered in
    jinja2's sandbox, so a stranger's template cannot run code (pip install jinja2). Raises
    ValueError, one line, for a folder without a template or a template that fails."""
    template = read_json(folder, 'tokenizer_config.json').get('chat_template')
    path = os.path.join(folder, 'chat_template.jinja')
    if os.path.isfile(path):
        with open(path) as f:
            template = f.read()
    if not isinstance(template, str):
        raise ValueError(f"{folder} has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("a chat template needs the jinja2 package: pip install jinja2") from None
    config = read_json(folder, 'tokenizer_config.json')
    token = lambda name: (config.get(name) or {}).get('content', '') if isinstance(config.get(name), dict) else config.get(name) or ''

    def raise_exception(text):  # what templates call on a conversation they do not take
        raise TemplateError(text)
    try:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols'])
        return environment.from_string(template).render(
            messages=[{'role': 'user', 'content': message}], add_generation_prompt=True, bos_token=token('bos_token'),
            eos_token=token('eos_token'), raise_exception=raise_exception)
    except TemplateError as e:
        raise ValueError(f"{folder}'s chat template failed: {e}") from None


def read_json(folder, name):
    """A JSON file of the folder as a dict; {} if the folder has none of that name."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def file_sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def pretrained_checkpoint(folder):
    """A Hugging Face folder as a checkpoint of ours: {'model', 'model_args', 'meta'}, float32 weights."""
    checkpoint = pretrained_args(folder)
    weights = {k: v.float() for k, v in read_weights(folder).items()}
    return dict(checkpoint, model=state_dict(weights, checkpoint['model_args'], folder))


def pretrained_args(folder):
    """The same without its weights: {'model_args', 'meta', 'pretrained': folder} (sharded.py reads
    each rank's part of the weights itself)."""
    return dict(model_args=model_args(read_json(folder, 'config.json'), folder), meta=tokenizer_meta(folder), pretrained=folder)
