# The paper's WikiText-103 recipe (README, Pretraining) with its 160M model.
# python prepare_data.py wikitext103 && torchrun --standalone --nproc_per_node=8 train.py config/wikitext103_160m.py
out_dir = 'out-wikitext103-160m'
dataset = 'wikitext103'
eval_interval = 1000
eval_iters = 100

n_layer = 12  # model.PRESETS['160M']
n_head = 12
n_embd = 768
block_size = 512
batch_size = 16
gradient_accumulation_steps = 4  # 64 sequences per step, however many processes share them

learning_rate = 6e-4
max_iters = 50000
weight_decay = 0.01
beta1, beta2 = 0.9, 0.98
grad_clip = 1.0
dropout = 0.0
lr_schedule = 'linear'
warmup_iters = 4000
min_lr = 0.0
