# A small character-level model of Tiny Shakespeare, sized for a CPU (a few minutes a thousand steps).
# python prepare_data.py shakespeare --tokenizer=char && python train.py config/train_shakespeare_char.py
# On a GPU, try nanoGPT's baby GPT: --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=64 --dropout=0.2
out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 50
log_interval = 10

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32

learning_rate = 2e-3
max_iters = 2000
warmup_iters = 100
min_lr = 2e-4
