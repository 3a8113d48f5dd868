# The paper's largest run (README, Pretraining): 1.4B parameters on the Pile, 25B tokens.
# Paper: perplexity 10.7 (RoPE baseline) vs 10.4 (StableMask). With the Pile's .jsonl.zst files at hand:
# python prepare_data.py pile --input pile/train/ --val_input pile/val.jsonl.zst && torchrun --nnodes=... train.py config/pile_1.4b.py
out_dir = 'out-pile-1.4b'
dataset = 'pile'
eval_interval = 2000
eval_iters = 100

n_layer = 24  # model.PRESETS['1.4B']
n_head = 16
n_embd = 2048
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 16  # 128 sequences per step

learning_rate = 2e-4
max_iters = 200000
weight_decay = 0.1  # not given in the spec
beta1, beta2 = 0.9, 0.98
grad_clip = 1.0
dropout = 0.0
lr_schedule = 'cosine'
warmup_iters = 4000
min_lr = 2e-5
compile = True
