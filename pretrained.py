"""
Hugging Face checkpoints of the LLaMA family as this repository's GPT: LlamaForCausalLM (Llama 2 and
3.x, TinyLlama, SmolLM and SmolLM2), Qwen2ForCausalLM and MistralForCausalLM without a sliding
window. Our model is already LLaMA's (RMSNorm, SwiGLU, rotate-half RoPE), so this is one table of
names and one loop; q, k and v are fused into c_attn, as gpt-fast's converter does. The folders
export_hf.py writes for our other models (StableMaskForCausalLM) are read too: their config.json holds
GPTConfig's fields, their weights keep our names.

    checkpoint = pretrained_checkpoint('SmolLM2-135M/')   # load_checkpoint's result for such a folder

The weights come from model.safetensors or a sharded model.safetensors.index.json (pip install
safetensors); a pickled pytorch_model.bin is refused, as loading it could run code. A folder is
checked whole before any model is built (pretrained_args): its JSON files, config.json's fields, and
every tensor the model needs, in its shape, from the safetensors files' headers; what is wrong is a
ValueError, one line naming the file. A chat template renders in jinja2's sandbox, within a time and a
size limit.
"""

import os
import re

import torch

from model import GPT, GPTConfig
from tokenizer import read_json, tokenizer_meta

SUPPORTED = ('LlamaForCausalLM', 'Qwen2ForCausalLM', 'MistralForCausalLM')
EXPORTED = 'StableMaskForCausalLM'  # a folder export_hf.py wrote: our GPT, any of its settings
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
    (r'model\.(transformer\..+|lm_head\.weight|sink_token)', r'\1'),  # ours, in a folder export_hf.py wrote
]
QKV = re.compile(r'model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)')
REQUIRED = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
            'max_position_embeddings')  # config.json's fields that have no default


def is_pretrained_folder(path):
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json'))
            and not os.path.isfile(os.path.join(path, 'ckpt.pt')))


def model_args(config, where):
    """GPTConfig fields for a Hugging Face config.json (as a dict), in the Hub's older form
    (rope_theta, rope_scaling) or transformers 5's (rope_parameters). Raises ValueError, one line,
    naming what is unsupported or missing."""
    arch = (config.get('architectures') or ['(none)'])[0]
    if arch == EXPORTED:
        return exported_args(config, where)
    if arch not in SUPPORTED:
        raise ValueError(f"{where}: {arch} is not supported (only {', '.join(SUPPORTED)})")
    for key in REQUIRED + ('num_key_value_heads', 'head_dim'):
        value = config.get(key)
        if key in REQUIRED and value is None:
            raise ValueError(f"{where}/config.json has no {key}, a field {arch} needs")
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{where}/config.json: {key}={value!r}, expected a positive whole number")
    window = config.get('sliding_window')
    if (window and (arch == 'MistralForCausalLM' or config.get('use_sliding_window'))
            and window < config['max_position_embeddings']):
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
        head_dim=config.get('head_dim') or config['hidden_size'] // heads,
        n_hidden=config['intermediate_size'], norm_eps=config.get('rms_norm_eps', 1e-6),
        rope_base=float(theta),
        rope_scaling=None if kind == 'default' else {
            'rope_type': kind, **{k: v for k, v in rope.items() if k not in ('rope_type', 'type')}},
        qkv_bias=arch == 'Qwen2ForCausalLM',
        tie_embeddings=bool(config.get('tie_word_embeddings', False)),
        block_size=config['max_position_embeddings'], bias=False, pos_enc='rope',
        attn_mask='causal', dropout=0.0)


def exported_args(config, where):
    """GPTConfig fields of a folder export_hf.py wrote: its config.json holds them in `stablemask`."""
    fields = config.get('stablemask')
    if not isinstance(fields, dict):
        raise ValueError(f"{where}/config.json has no stablemask settings, which {EXPORTED} needs")
    args = {k: fields[k] for k in GPTConfig.__dataclass_fields__ if k in fields and k != 'attn_impl'}
    for key in ('vocab_size', 'n_layer', 'n_head', 'n_embd', 'block_size'):
        if type(args.get(key)) is not int or args[key] < 1:
            raise ValueError(f"{where}/config.json: stablemask's {key}={args.get(key)!r}, "
                             f"expected a positive whole number")
    return args


def exported_tokenizer(config, where):
    """The tokenizer description export_hf.py keeps in config.json for GPT-2's BPE and character tables,
    so that our scripts tokenize with them as before (the folder's tokenizer.json is for transformers);
    None for a Hugging Face tokenizer, which the folder's own tokenizer.json is."""
    meta = config.get('stablemask_tokenizer')
    if meta is None:
        return None
    chars = meta.get('chars') if isinstance(meta, dict) else None
    if not (isinstance(meta, dict) and (meta.get('tokenizer') == 'gpt2' or meta.get('tokenizer') == 'char'
            and isinstance(chars, list) and all(isinstance(c, str) and len(c) == 1 for c in chars))):
        raise ValueError(f"{where}/config.json: stablemask_tokenizer is not a description of GPT-2's BPE "
                         f"or of a character table")
    return meta


def weight_files(folder):
    """{Hugging Face tensor name: the safetensors file that holds it}, of model.safetensors or of every
    shard a model.safetensors.index.json names; nothing is read but the files' headers."""
    return {name: path for name, (path, _) in tensor_shapes(folder).items()}


def tensor_shapes(folder):
    """{Hugging Face tensor name: (the safetensors file that holds it, its shape)}, from the files'
    headers. Raises ValueError, one line naming the file, for an index that is not one, a shard it
    names that is missing or does not hold what it says, and a file cut short or damaged."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise ValueError("loading a Hugging Face checkpoint needs the safetensors package: "
                         "pip install safetensors") from None
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
        weight_map = read_json(folder, 'model.safetensors.index.json').get('weight_map')
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor names to files")
        placed = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    else:
        path = os.path.join(folder, 'model.safetensors')
        if not os.path.isfile(path):
            pickled = 'only a pickled pytorch_model.bin, refused as loading it could run code'
            there = pickled if os.path.exists(os.path.join(folder, 'pytorch_model.bin')) else 'none'
            raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json ({there})")
        placed = None
    found = {}
    for file in sorted(set(placed.values())) if placed is not None else [path]:
        if not os.path.isfile(file):
            raise ValueError(f"{index} names {os.path.relpath(file, folder)}, which is not in {folder}")
        try:
            with safe_open(file, framework='pt') as f:
                found.update({name: (file, tuple(f.get_slice(name).get_shape())) for name in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a whole safetensors file "
                             f"(cut short, or damaged): {e}") from None
    if placed is None:
        return found
    for name, file in placed.items():
        if found.get(name, (None,))[0] != file:
            shard = os.path.relpath(file, folder)
            raise ValueError(f"{index} puts {name} in {shard}, which does not hold it")
    return {name: found[name] for name in placed}


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
        missing = [f"{p}_proj" for p in 'qkv' if p not in parts]
        if missing:
            raise ValueError(f"{where}: layer {layer} has no self_attn.{missing[0]}.{kind} beside its "
                             f"{next(iter(parts.values()))}")
        sources[f"transformer.h.{layer}.attn.c_attn.{kind}"] = [parts['q'], parts['k'], parts['v']]
    if args['tie_embeddings'] and 'transformer.wte.weight' in sources:
        sources['lm_head.weight'] = sources['transformer.wte.weight']
    return sources


def check_weights(folder, args):
    """That the folder's safetensors files hold every tensor of the model config.json describes, in
    its shape, and no other: from the files' headers, before any model is built or tensor read (a
    process under FSDP then reads its rows of each). Raises ValueError, one line naming the file."""
    found = tensor_shapes(folder)
    sources = source_map(found, args, folder)
    try:
        with torch.device('meta'):  # shapes only: no memory
            expected = GPT(GPTConfig(**args)).state_dict()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder}/config.json: {e}") from None
    for name, tensor in expected.items():
        if name not in sources:
            raise ValueError(f"{folder}: no tensor in its safetensors files for {name} (our name), which "
                             f"the model of its config.json has")
        shapes = [found[n][1] for n in sources[name]]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if all(shapes) else ()
        if shape != tuple(tensor.shape) or any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"{found[sources[name][0]][0]}: {' + '.join(sources[name])} is "
                             f"{' + '.join(str(list(s)) for s in shapes)}, the model of config.json needs "
                             f"{list(tensor.shape)}")
    unexpected = sorted(sources.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"{folder}: tensors that the model of its config.json does not have: "
                         f"{', '.join(sources[name][0] for name in unexpected[:3])}")


def state_dict(weights, args, where):
    """Our GPT's state dict from Hugging Face weights (source_map's names and fusions)."""
    return {ours: torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
            for ours, names in source_map(weights, args, where).items()}


def pretrained_checkpoint(folder):
    """A Hugging Face folder as a checkpoint of ours: {'model', 'model_args', 'meta'}, float32 weights."""
    checkpoint = pretrained_args(folder)
    weights = {k: v.float() for k, v in read_weights(folder).items()}
    return dict(checkpoint, model=state_dict(weights, checkpoint['model_args'], folder))


def pretrained_args(folder):
    """The same without its weights: {'model_args', 'meta', 'pretrained': folder} (sharded.py reads
    each rank's part of the weights itself), once the folder is checked (check_weights)."""
    config = read_json(folder, 'config.json')
    args = model_args(config, folder)
    check_weights(folder, args)
    meta = exported_tokenizer(config, folder) or tokenizer_meta(folder)
    return dict(model_args=args, meta=meta, pretrained=folder)
