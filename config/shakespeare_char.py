# nanoGPT's shakespeare_char CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iters, lr 1e-3
# cosine to 1e-4, warmup 100), with hybrid attention (LLLG, window 32) and top-p MoE, for side-by-side
# comparison with nanoGPT's own run of that recipe: python -m tools.bench_nanogpt --nanogpt=PATH (docs/results.md).
out_dir = "out/shakespeare_char"
preset = "nanogpt_4x128"
lr = 1e-3
weight_decay = 0.1
beta2 = 0.99
eval_interval = 250
eval_iters = 20
log_interval = 10
ckpt_interval = 250
tokenizer = "char"                 # the 65 characters of the text, as nanoGPT
stages = [dict(name="main", mixture={"shakespeare": 1.0}, steps=2000, seq_len=64, batch_size=12,
               warmup=100, lr_start=1.0, lr_end=0.1, decay="cosine")]
