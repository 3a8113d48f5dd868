# The offline quickstart: a small character model of the help text that ships with Python.
# python prepare_data.py --tokenizer=char && python train.py config/train_pydoc_char.py
# About 2 minutes on 2 CPU cores.
out_dir = 'out-pydoc-char'
dataset = 'pydoc_char'
eval_interval = 100
eval_iters = 20
log_interval = 10

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16

learning_rate = 2e-3
max_iters = 500
warmup_iters = 50
min_lr = 2e-4
