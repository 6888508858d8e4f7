# The default run: a tiny hybrid-attention top-p MoE trained in three stages on CPU in a few minutes.
#   stage 1  shakespeare                 warmup, then cosine decay to half the peak lr (broad data)
#   stage 2  shakespeare + code + arith  the mixture shifts toward code and arithmetic, the context doubles
#   stage 3  arith-heavy                 fast linear decay on upsampled "high-quality" data (12.5% of steps)
# python train.py config/default.py   then   python sample.py --out_dir=out/default
out_dir = "out/default"
preset = "tiny"
lr = 2e-3
eval_interval = 60
eval_iters = 4
arith_problems = 60
ckpt_interval = 40
log_interval = 5
stages = [
    dict(name="broad", mixture={"shakespeare": 1.0}, steps=120, seq_len=64, batch_size=16,
         warmup=20, lr_start=1.0, lr_end=0.5, decay="cosine"),
    dict(name="shift", mixture={"shakespeare": 0.5, "code": 0.3, "arith": 0.2}, steps=90, seq_len=128,
         batch_size=8),
    dict(name="anneal", mixture={"arith": 0.7, "shakespeare": 0.15, "code": 0.15}, steps=30, seq_len=128,
         batch_size=8, lr_end=0.02, decay="linear"),
]
