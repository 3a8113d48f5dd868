"""
StableMask inside Hugging Face transformers (pip install transformers), two ways:

1) register(): a 'stablemask' attention for any LLaMA-family model transformers has (Llama, Qwen2,
   Mistral, SmolLM, ...), switched on by name:

    import stablemask_hf
    stablemask_hf.register()
    model = AutoModelForCausalLM.from_pretrained('SmolLM2-135M/', attn_implementation='stablemask')
    model.config.stablemask_pseudo_len = 512

   Each head's pseudo-score decay is its ALiBi slope (or config.stablemask_gamma, one float for every
   head), and every row has the pseudo mass of the training length N (SM-I: config.stablemask_pseudo_len,
   else max_position_embeddings) at its own position, position_ids, which generate derives from the
   attention mask: a left-padded row is computed as it would be alone. The model's own causal, padding
   and sliding-window mask is transformers' sdpa mask, registered under the same name (an attention
   without a registered mask gets no mask at all: it would read the future).

2) StableMaskConfig and StableMaskForCausalLM: the model of a folder export_hf.py writes, our GPT
   (model.py) behind transformers' interface. The folder carries this file with model.py, kv_cache.py
   and stablemask_sdpa.py, their imports made relative, so AutoModelForCausalLM.from_pretrained(folder,
   trust_remote_code=True) runs the same code as this repository (on PyTorch's fused attention; the
   Triton kernel stays here).
"""

import functools
import math

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import AttentionInterface

from model import GPT, CausalSelfAttention, GPTConfig, Pass, alibi_slopes, rope_cos_sin
from stablemask_sdpa import aligned, log_pseudo_mass, sdpa_attention

# -----------------------------------------------------------------------------
# 1) the 'stablemask' attention for transformers' own models


def register():
    """Register the 'stablemask' attention and its mask with transformers. Calling it again changes
    nothing."""
    AttentionInterface.register('stablemask', stablemask_attention)
    AttentionMaskInterface.register('stablemask', sdpa_mask)


def stablemask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         position_ids=None, **kwargs):
    """transformers' attention function: query (B, H, Tq, D) after RoPE, key and value (B, H_kv, T, D)
    with what the cache holds, attention_mask the registered mask (bool (B, 1, Tq, T), True where a key
    is seen; or None: causal), position_ids (B or 1, Tq) each query's position in its own row.
    Returns (output (B, Tq, H, D), None): no attention weights are made."""
    if dropout:
        raise ValueError(f"the stablemask attention has no attention dropout (attention_dropout={dropout})")
    if scaling is not None and not math.isclose(scaling, query.size(-1) ** -0.5, rel_tol=1e-6):
        raise ValueError(f"the stablemask attention scales by 1/sqrt(head_dim), not {scaling}")
    config, (H, Tq) = module.config, query.shape[1:3]
    if position_ids is None:
        # the queries are the last Tq of the T positions
        position_ids = torch.arange(key.size(2) - Tq, key.size(2), device=query.device)[None]
    gamma = decays(H, getattr(config, 'stablemask_gamma', None), str(query.device))
    N = getattr(config, 'stablemask_pseudo_len', None) or config.max_position_embeddings
    bias = attention_mask
    if bias is not None and bias.dtype == torch.bool:
        # additive, as the fused kernels take it
        hidden = torch.full(bias.shape, -math.inf, dtype=query.dtype, device=bias.device)
        bias = aligned(hidden.masked_fill_(bias, 0.0))
    out = sdpa_attention(query, key, value, row_log_mass(gamma, position_ids, N), bias)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def decays(n_head, gamma, device):
    """The pseudo-score decay of each head, (n_head,): ALiBi's slopes (the paper's), or gamma for all."""
    return (alibi_slopes(n_head) if gamma is None else torch.full((n_head,), float(gamma))).to(device)


def row_log_mass(gamma, positions, pseudo_len):
    """log S_i of every query row at its own position, positions (B or 1, Tq): (H, Tq) where every row
    of the batch has the same positions, else (B, H, Tq). None without StableMask (gamma None)."""
    if gamma is None:
        return None
    if positions.size(0) > 1 and bool((positions == positions[:1]).all()):
        positions = positions[:1]
    mass = log_pseudo_mass(gamma, positions.reshape(-1), pseudo_len).view(gamma.size(0), *positions.shape)
    return mass[:, 0] if positions.size(0) == 1 else mass.transpose(0, 1)


# -----------------------------------------------------------------------------
# 2) an exported model: our GPT behind transformers' interface


def gpt_field(name):
    """A config attribute that transformers reads under its own name, read from GPTConfig's field."""
    return property(lambda config: getattr(config.gpt_config(), name))


class StableMaskConfig(PretrainedConfig):
    """config.json of an exported model: GPTConfig's fields in `stablemask`, by their own names (not
    beside transformers' own: it has a rope_scaling of its own), read by transformers under its names."""
    model_type = 'stablemask'
    vocab_size = gpt_field('vocab_size')
    hidden_size = gpt_field('n_embd')
    num_hidden_layers = gpt_field('n_layer')
    num_attention_heads = gpt_field('n_head')
    max_position_embeddings = gpt_field('block_size')
    tie_word_embeddings = gpt_field('tie_embeddings')

    def gpt_config(self):
        """The GPTConfig of `stablemask`, on PyTorch's fused attention (attn_impl='sdpa')."""
        return GPTConfig(**{**getattr(self, 'stablemask', {}), 'attn_impl': 'sdpa'})


class LayerCache:
    """transformers' Cache as model.py's layers use a KV cache: update(layer, k, v) stores k and v and
    returns every key and value of the layer so far."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, layer, k, v):
        return self.cache.update(k, v, layer)


class StableMaskForCausalLM(PreTrainedModel, GenerationMixin):
    """A GPT of model.py as a transformers causal LM: generate, its KV cache, left padding, labels."""
    config_class = StableMaskConfig
    base_model_prefix = 'model'
    _no_split_modules = ['Block']
    _tied_weights_keys = {'model.lm_head.weight': 'model.transformer.wte.weight'}

    def __init__(self, config):
        super().__init__(config)
        self.model = GPT(config.gpt_config())
        self.post_init()

    def _init_weights(self, module):
        # what a folder does not hold, since it is not trained: the decays, ALiBi's slopes, a zero sink
        # logit (the weights themselves keep GPT's initialisation, or the folder's)
        if isinstance(module, CausalSelfAttention):
            module.set_constants(self.model.config, module.c_attn.weight.device)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        """input_ids (B, T), after the tokens a cache holds; attention_mask (B, held + T), 0 on padding;
        position_ids (B, T), each token's position in its own row (from attention_mask when not given, so
        a left-padded row starts at 0). Returns the logits (B, T, V) (the last logits_to_keep, if not 0),
        the mean loss on labels (B, T) (-100 ignored) and the cache."""
        gpt = self.model
        if input_ids is None:
            raise ValueError("StableMaskForCausalLM takes input_ids (inputs_embeds are not supported)")
        use_cache = getattr(self.config, 'use_cache', True) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        held = 0 if cache is None else cache.get_seq_length()  # the sink token's entry included
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and ((held and input_ids.size(1) > 1) or input_ids.device.type not in ('cpu', 'cuda')):
            raise ValueError("a padded batch runs on a CPU or a CUDA GPU, and continues a cache one token "
                             "at a time")
        if position_ids is None:
            start = held - gpt.n_sink if held else 0
            position_ids = positions_of(attention_mask)[:, -input_ids.size(1):] if padded else \
                torch.arange(start, start + input_ids.size(1), device=input_ids.device)[None]
        x, rows = self.embed(input_ids, position_ids, prepend=gpt.n_sink and not held)
        N = gpt.config.block_size + gpt.n_sink  # SM-I's length, in positions
        p = Pass(pseudo_len=N, kv_cache=None if cache is None else LayerCache(cache),
                 log_mass=row_log_mass(gpt.transformer.h[0].attn.gamma, rows, N),
                 bias=padded_bias(gpt, attention_mask, rows) if padded else None)
        if gpt.config.pos_enc == 'rope':
            p.rope = rope_tables(gpt, rows)
        for block in gpt.transformer.h:
            x = block(x, p)
        x = gpt.transformer.ln_f(x[:, gpt.n_sink:] if gpt.n_sink and not held else x)
        logits = gpt.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None if labels is None else \
            self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def embed(self, input_ids, position_ids, prepend):
        """The tokens' embeddings (B, T, C), after the sink token if prepend, with learned positions
        added, and every row's positions counted from the sink token (B or 1, T)."""
        gpt, config = self.model, self.model.config
        x = gpt.transformer.wte(input_ids)
        rows = position_ids + gpt.n_sink
        if prepend:
            x = torch.cat([gpt.sink_token.to(x.dtype).expand(x.size(0), 1, -1), x], dim=1)
            rows = torch.cat([torch.zeros_like(rows[:, :1]), rows], dim=1)
        if config.pos_enc == 'learned':
            if rows.max() >= config.block_size + gpt.n_sink:
                raise ValueError(f"position {int(rows.max()) - gpt.n_sink} is past the learned positions "
                                 f"(block_size {config.block_size})")
            x = x + gpt.transformer.wpe(rows)
        return gpt.transformer.drop(x), rows


def rope_tables(gpt, rows):
    """RoPE's (cos, sin) for rows (B or 1, T): (B, T, 1, D/2) each, or (T, 1, D/2) for one row."""
    config = gpt.config
    cos, sin = rope_cos_sin(rows.reshape(-1), gpt.transformer.h[0].attn.head_dim, config.rope_base,
                            config.rope_scaling)
    shape = (*rows.shape, 1, -1) if rows.size(0) > 1 else (rows.size(1), 1, -1)
    return cos.view(shape), sin.view(shape)


def positions_of(attention_mask):
    """Each token's position in its own row, (B, T), from a mask (B, T) that is 0 on left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_bias(gpt, attention_mask, rows):
    """The additive mask of a padded batch, (B, H or 1, Tq, T): -inf on the future and on padding, and
    ALiBi's bias from each row's own positions (where its padding would add to the distances)."""
    keys = positions_of(attention_mask) + gpt.n_sink
    seen = attention_mask.bool()
    if gpt.n_sink:  # the sink token: first, always seen
        keys = torch.cat([torch.zeros_like(keys[:, :1]), keys], dim=1)
        seen = torch.cat([torch.ones_like(seen[:, :1]), seen], dim=1)
    Tq, T = rows.size(1), keys.size(1)
    future = torch.arange(T - Tq, T, device=keys.device)[:, None] < torch.arange(T, device=keys.device)
    alibi = gpt.transformer.h[0].attn.alibi
    distance = (rows[:, :, None] - keys[:, None, :])[:, None].float()
    bias = torch.zeros(1, 1, 1, 1, device=keys.device) if alibi is None else \
        -alibi.view(1, -1, 1, 1) * distance
    return aligned(bias.masked_fill(future | ~seen[:, None, None, :], -math.inf))
