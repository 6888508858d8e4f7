# Experiment "long_context" (python experiment.py long_context): train at 128 tokens, then extend to 512.
# This file is what the arms share (the model, and the first stage at 128); the arm file that follows it
# sets the second stage:
#   python train.py config/experiments/long_context.py config/experiments/long_context_raised_base.py
# The hybrid model of experiment "hybrid" (8 layers, LLLG with shared K/V, dense MLPs), window 64: the local
# layers never look further back than in the first stage, so only the two global layers meet new distances.
preset = "tiny_8x64"
n_dense_layers = 8
block_size = 512
window = 64
tokenizer = "byte"
lr = 3e-3
beta2 = 0.99
eval_interval = 400
eval_iters = 8
eval_seq_len = 512
eval_batch_size = 4
arith_per_level = 0
log_interval = 20
ckpt_interval = 400
_short = dict(name="short", mixture={"shakespeare": 0.7, "code": 0.3}, steps=600, seq_len=128, batch_size=16,
              warmup=40, lr_end=0.3, decay="cosine")
stages = [_short, dict(name="more_short", mixture={"shakespeare": 0.7, "code": 0.3}, steps=250, seq_len=128,
                       batch_size=16, lr_end=0.02)]
