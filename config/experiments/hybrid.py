# Experiment "hybrid" (python -m tools.experiment hybrid): does 3 local : 1 global attention with shared K/V recall as
# far as all-global attention, with and without its global layers reading the token embeddings (global_x0), and with
# the global layer first? What does each cost in quality? (800 steps per arm.)
# This file is what the arms share; the arm file that follows it on the command line sets the attention:
#   python train.py config/experiments/hybrid.py config/experiments/hybrid_all_global.py
# 8 layers so that LLLG holds two global layers to pair; dense MLPs, so that attention is the only difference.
# A window of 8 in 128 positions: a local layer sees 8 bytes, 8 local layers in a row at most 64 (their reach),
# so the recall corpus's gaps (2 to 125 bytes) fall within the window, 1-4 windows, up to the reach, and beyond.
preset = "tiny_8x64"
n_dense_layers = 8
block_size = 128
window = 8
init_std = 0.125                   # about 1/sqrt(64): at GPT-2's 0.02 no lookup by content forms in these minutes
tokenizer = "byte"
lr = 3e-3
beta2 = 0.99
eval_interval = 250
eval_iters = 4
eval_batch_size = 16
arith_per_level = 0
log_interval = 20
ckpt_interval = 250
# A first stage heavy in recall, then the broad mixture: all-global recalls twice as far by the end, measured
# against the broad mixture alone (docs/experiments.md). Every arm trains the same stages.
_broad = {"shakespeare": 0.35, "code": 0.15, "arith": 0.1, "recall": 0.4}
stages = [dict(name="recall_first", mixture={"recall": 0.7, "shakespeare": 0.3}, steps=300, seq_len=128,
               batch_size=16, warmup=40, lr_end=0.7, decay="cosine"),
          dict(name="broad", mixture=_broad, steps=500, seq_len=128, batch_size=16, lr_end=0.05, decay="cosine")]
