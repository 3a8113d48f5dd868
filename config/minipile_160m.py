# The paper's MiniPile recipe (README, Pretraining) with its 160M model; the ablations' setting.
# python prepare_data.py minipile && torchrun --standalone --nproc_per_node=8 train.py config/minipile_160m.py
# (prepare_data.py downloads MiniPile's parquet files, 6 GB; --input takes a local copy)
out_dir = 'out-minipile-160m'
dataset = 'minipile'
eval_interval = 1000
eval_iters = 100

n_layer = 12  # model.PRESETS['160M']
n_head = 12
n_embd = 768
block_size = 1024  # the paper uses 512 and 1024
batch_size = 16
gradient_accumulation_steps = 8  # 128 sequences per step

learning_rate = 4e-4
max_iters = 11000  # not given in the spec: about one epoch of MiniPile's 1.4B tokens at 128 x 1024 per step
weight_decay = 0.1
beta1, beta2 = 0.9, 0.98
grad_clip = 1.0
dropout = 0.0
lr_schedule = 'cosine'
warmup_iters = 4000
min_lr = 4e-5
