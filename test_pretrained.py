"""Hugging Face LLaMA-family checkpoints (pretrained.py): small random models that transformers builds
and saves here (no download), loaded by GPT.from_pretrained and compared with transformers' own
logits; then the scripts on such a folder, with a tokenizer.json trained here."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import run_script
from model import GPT

transformers = pytest.importorskip('transformers')  # test-only: requirements.txt
tokenizers = pytest.importorskip('tokenizers')

LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 32}
MODELS = {  # name: (architecture, config); each small, covering one thing the loader must map
    'llama-gqa-head-dim': ('Llama', dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5)),
    'llama3-rope-tied-mqa': ('Llama', dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                                           rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    'llama-linear-rope': ('Llama', dict(num_attention_heads=2, num_key_value_heads=2, rope_scaling={'rope_type': 'linear', 'factor': 4.0})),
    'qwen2-biases': ('Qwen2', dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    'mistral': ('Mistral', dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
}


def save_model(folder, arch, vocab_size=97, dtype=torch.float32, shard=None, **config):
    torch.manual_seed(0)
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    max_position_embeddings=128, attn_implementation='eager', **config)
    model = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**settings))
    for name, p in model.named_parameters():  # biases start at zero: give them values, so a lost bias shows
        if name.endswith('bias'):
            p.data.normal_(0, 0.2)
    model = model.to(dtype).eval()
    model.save_pretrained(folder, **({'max_shard_size': shard} if shard else {}))
    return model


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def logits_of_both(hf, folder, idx, **overrides):
    ours = GPT.from_pretrained(str(folder), **overrides).eval()
    with torch.no_grad():
        return ours(idx, targets=idx)[0], hf.float()(idx).logits


@pytest.mark.parametrize('name', MODELS)
def test_logits_equal_transformers(tmp_path, name):
    arch, config = MODELS[name]
    hf = save_model(tmp_path, arch, **config)
    idx = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(1))  # past the original 32 positions
    ours, theirs = logits_of_both(hf, tmp_path, idx, attn_mask='causal', attn_impl='sdpa')
    assert relative_error(ours, theirs) <= 1e-4
    for impl in ('reference', 'triton'):  # every attention path, grouped-query attention included
        assert relative_error(logits_of_both(hf, tmp_path, idx, attn_impl=impl)[0], theirs) <= 1e-4
    stable, _ = logits_of_both(hf, tmp_path, idx, attn_mask='stablemask')  # parameter-free: the same weights
    assert relative_error(stable, theirs) > 1e-3


def test_sharded_bf16_weights_and_the_older_config_form(tmp_path):
    """model.safetensors.index.json with several shards, bf16 weights (loaded as float32), and a
    config.json in the Hub's older form (rope_theta and rope_scaling, not rope_parameters)."""
    hf = save_model(tmp_path, 'Llama', dtype=torch.bfloat16, shard='40KB', num_attention_heads=4, num_key_value_heads=2,
                    rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    assert os.path.exists(tmp_path / 'model.safetensors.index.json') and len(list(tmp_path.glob('*.safetensors'))) > 2
    config = json.loads((tmp_path / 'config.json').read_text())
    rope = config.pop('rope_parameters')
    config.update(rope_theta=rope.pop('rope_theta'), rope_scaling=rope)
    (tmp_path / 'config.json').write_text(json.dumps(config))
    idx = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(2))
    ours, theirs = logits_of_both(hf, tmp_path, idx)
    assert relative_error(ours, theirs) <= 1e-4
    assert next(GPT.from_pretrained(str(tmp_path)).parameters()).dtype == torch.float32


@pytest.mark.parametrize('change,message', [
    (dict(architectures=['GPT2LMHeadModel']), 'GPT2LMHeadModel is not supported (only LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)'),
    (dict(architectures=['MistralForCausalLM'], sliding_window=16), 'a sliding window of 16 is not supported'),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 2.0, 'rope_theta': 10000.0}), 'rope_type=yarn is not supported'),
    (dict(attention_bias=True), 'attention_bias=True is not supported'),
    (dict(hidden_act='gelu'), 'hidden_act=gelu is not supported'),
])
def test_unsupported_configurations_are_refused(tmp_path, change, message):
    save_model(tmp_path, 'Llama', num_attention_heads=2)
    config = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=re.escape(message)):
        GPT.from_pretrained(str(tmp_path))
    result = run_script('sample.py', f'--init_from={tmp_path}', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0 and message in result.stderr


def test_pickled_weights_are_refused(tmp_path):
    save_model(tmp_path, 'Llama', num_attention_heads=2)
    (tmp_path / 'model.safetensors').rename(tmp_path / 'pytorch_model.bin')
    with pytest.raises(ValueError, match='only a pickled pytorch_model.bin, refused as loading it could run code'):
        GPT.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# the scripts on a Hugging Face folder: prepare_data.py, train.py, sample.py, experiments.py


def train_tokenizer(folder, vocab_size):
    """A byte-level BPE tokenizer.json (GPT-2's kind), trained on pydoc's text, with <|endoftext|>."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((topics[k] for k in sorted(topics)), trainer)
    tokenizer.save(str(folder / 'tokenizer.json'))
    return tokenizer


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """A small random Llama with GQA and its own trained tokenizer.json, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp('work') / 'tiny-llama'
    folder.mkdir()
    tokenizer = train_tokenizer(folder, 400)
    save_model(folder, 'Llama', vocab_size=tokenizer.get_vocab_size(), num_attention_heads=4, num_key_value_heads=2,
               eos_token_id=tokenizer.token_to_id('<|endoftext|>'))
    return folder


def test_prepare_with_its_tokenizer(hf_folder, tmp_path):
    """--tokenizer=<folder>: its tokenizer.json on every document whole, then its end-of-sequence token."""
    docs = ['A first document, with ünïcode.\n' * 40, 'def f(x):\n    return x * 2\n' * 30, 'ends without a newline']
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    (tmp_path / 'val.txt').write_text('held out ' * 50)
    run_script('prepare_data.py', '--input', tmp_path / 'in', '--val_input', tmp_path / 'val.txt', f'--tokenizer={hf_folder}', cwd=tmp_path)
    folder = tmp_path / 'data' / 'in_tiny-llama'
    meta = json.loads((folder / 'meta.json').read_text())
    assert meta['tokenizer'] == 'hf' and meta['tokenizer_path'] == str(hf_folder) and meta['vocab_size'] == 400
    tokenizer = tokenizers.Tokenizer.from_file(str(hf_folder / 'tokenizer.json'))
    eos = tokenizer.token_to_id('<|endoftext|>')
    expected = [t for d in docs for t in tokenizer.encode(d, add_special_tokens=False).ids + [eos]]
    assert np.fromfile(folder / 'train.bin', dtype=meta['dtype']).tolist() == expected


def test_end_of_sequence_from_tokenizer_config(hf_folder, tmp_path):
    """Without eos_token_id in config.json, tokenizer_config.json's eos_token names the token that ends
    a document: the same for the dataset prepare_data.py writes and for the folder's checkpoint."""
    folder = tmp_path / 'no-eos-id'
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / 'config.json').read_text())
    eos = config.pop('eos_token_id')
    (folder / 'config.json').write_text(json.dumps(config))
    from prepare_data import PrepareError, hf_tokenizer_meta
    with pytest.raises(PrepareError, match='names no end-of-sequence token'):
        hf_tokenizer_meta(str(folder))
    (folder / 'tokenizer_config.json').write_text(json.dumps({'eos_token': {'content': '<|endoftext|>'}}))
    assert hf_tokenizer_meta(str(folder))['eot_token'] == eos
    from model import load_checkpoint
    assert load_checkpoint(str(folder))['meta']['eot_token'] == eos


def test_fine_tune_with_stablemask_then_sample(hf_folder, tmp_path):
    run_script('prepare_data.py', f'--tokenizer={hf_folder}', cwd=tmp_path)  # pydoc's text, with the model's tokenizer
    common = ['--block_size=64', '--batch_size=4', '--max_iters=6', '--eval_interval=6', '--eval_iters=2', '--device=cpu']
    result = run_script('train.py', f'--init_from={hf_folder}', '--dataset=pydoc_tiny-llama', '--attn_mask=stablemask',
                        '--out_dir=out-ft', *common, cwd=tmp_path)
    assert f'fine-tuning {hf_folder}' in result.stdout and 'stablemask attention' in result.stdout
    checkpoint = torch.load(tmp_path / 'out-ft' / 'ckpt.pt', weights_only=True)
    assert checkpoint['model_args']['n_kv_head'] == 2 and checkpoint['model_args']['attn_mask'] == 'stablemask'
    assert checkpoint['meta']['tokenizer_path'] == str(hf_folder)
    # the model folder itself, and the fine-tuned checkpoint, which finds the tokenizer where it was
    for init in (hf_folder, tmp_path / 'out-ft'):
        out = run_script('sample.py', f'--init_from={init}', '--start=The ', '--num_samples=1', '--max_new_tokens=20', '--device=cpu',
                         cwd=tmp_path).stdout
        assert out.startswith('The ') and out.endswith('\n---------------\n') and len(out) > 30
    # moved: one line says where to point it
    moved = tmp_path / 'moved'
    shutil.copytree(hf_folder, moved)
    checkpoint['meta']['tokenizer_path'] = str(tmp_path / 'gone')
    torch.save(checkpoint, tmp_path / 'out-ft' / 'ckpt.pt')
    result = run_script('sample.py', '--init_from=out-ft', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and 'is not there now: pass --tokenizer=' in result.stderr
    run_script('sample.py', '--init_from=out-ft', f'--tokenizer={moved}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu', cwd=tmp_path)
    # data of another tokenizer cannot fine-tune it
    run_script('prepare_data.py', '--tokenizer=char', cwd=tmp_path)
    result = run_script('train.py', f'--init_from={hf_folder}', '--dataset=pydoc_char', '--out_dir=out-x', *common, cwd=tmp_path,
                        expect_ok=False)
    assert result.returncode == 1 and 'was trained on the hf tokenizer but data/pydoc_char is tokenized with char' in result.stderr


def test_sinks_before_and_after_a_stablemask_fine_tune(hf_folder, tmp_path):
    out = run_script('experiments.py', 'sinks', f'--init_from={hf_folder}', '--steps=3', '--plot=False', cwd=tmp_path).stdout
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines() if line.startswith('| ') and line[2].isdigit()]
    assert len(rows) == 2  # one per layer
    for layer, before, after, pseudo in rows:
        assert 0 <= float(before) <= 100 and 0 <= float(after) <= 100 and 0 < float(pseudo) < 100
