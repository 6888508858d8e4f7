# Experiment "hybrid" (python experiment.py hybrid): does 3 local : 1 global attention with shared K/V lose
# quality against all-global attention? This file is what both arms share; the arm file that follows it on
# the command line sets the attention. Run one arm alone:
#   python train.py config/experiments/hybrid.py config/experiments/hybrid_all_global.py
# 8 layers so that LLLG holds two global layers to pair; dense MLPs, so that attention is the only difference.
preset = "tiny_8x64"
n_dense_layers = 8
block_size = 256
window = 64                        # at seq_len 256 a local layer sees a quarter of the context
tokenizer = "byte"
lr = 3e-3
beta2 = 0.99
eval_interval = 200
eval_iters = 8
eval_batch_size = 8
arith_per_level = 0
log_interval = 20
ckpt_interval = 200
stages = [dict(name="main", mixture={"shakespeare": 0.6, "code": 0.2, "arith": 0.2}, steps=1200, seq_len=256,
               batch_size=8, warmup=40, lr_end=0.05, decay="cosine")]
