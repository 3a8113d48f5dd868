# The paper's MiniPile recipe (README, Pretraining) with its 400M model, which counts 308M
# parameters as we build it (untied GPT-2 embeddings, LLaMA's SwiGLU width).
# python prepare_data.py minipile && torchrun --standalone --nproc_per_node=8 train.py config/minipile_400m.py
out_dir = 'out-minipile-400m'
dataset = 'minipile'
eval_interval = 1000
eval_iters = 100

n_layer = 16  # model.PRESETS['400M']
n_head = 16
n_embd = 1024
block_size = 1024  # the paper uses 512 and 1024
batch_size = 8
gradient_accumulation_steps = 16  # 128 sequences per step

learning_rate = 4e-4
max_iters = 11000  # not given in the spec: about one epoch of MiniPile's 1.4B tokens at 128 x 1024 per step
weight_decay = 0.1
beta1, beta2 = 0.9, 0.98
grad_clip = 1.0
dropout = 0.0
lr_schedule = 'cosine'
warmup_iters = 4000
min_lr = 4e-5
