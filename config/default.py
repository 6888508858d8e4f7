# The default run: nanoGPT's CPU shape (4 layers, 128 wide) made hybrid + top-p MoE, on bytes, in three stages
# on one laptop CPU in a few minutes. It learns Shakespeare's style, some Python, and arithmetic.
#   stage 1  broad    mostly Shakespeare, some code and arithmetic, short context; warmup, cosine to 60% of peak
#   stage 2  shift    the mixture shifts toward arithmetic and the context doubles
#   stage 3  anneal   fast linear decay on upsampled arithmetic (the "high-quality" data): the last quarter of steps
# python train.py config/default.py   then   python sample.py --out_dir=out/default --start="ROMEO:"
out_dir = "out/default"
preset = "nanogpt_4x128"
tokenizer = "byte"
block_size = 128
lr = 2e-3
beta2 = 0.99
eval_interval = 500
eval_iters = 8
arith_per_level = 100
log_interval = 10
ckpt_interval = 250
stages = [
    dict(name="broad", mixture={"shakespeare": 0.65, "code": 0.07, "arith": 0.28}, steps=800, seq_len=64,
         batch_size=16, warmup=50, lr_start=1.0, lr_end=0.6, decay="cosine"),
    dict(name="shift", mixture={"shakespeare": 0.25, "code": 0.05, "arith": 0.7}, steps=1100, seq_len=128,
         batch_size=8),
    dict(name="anneal", mixture={"arith": 0.85, "shakespeare": 0.12, "code": 0.03}, steps=600, seq_len=128,
         batch_size=8, lr_end=0.02, decay="linear"),
]
