# Experiment "hybrid_2layer" (python -m tools.experiment hybrid_2layer): why a global layer placed after a local one
# does not learn to look a token up, at the smallest scale that shows it. Two layers, 64 wide, dense MLPs, window 8 in
# 128 positions, one stage of the recall-heavy mixture; the arms set the layout on the command line (GG, GL, LG) and
# LG's remedies: its global layer also reading the token embeddings (global_x0), a window of 1 first (the next file),
# both, a learned mix of the embeddings into every block (x0_mix), and an attention-only first block (n_attn_only).
preset = "tiny_8x64"
n_layer = 2
n_dense_layers = 2
share_kv = False
block_size = 128
window = 8
init_std = 0.125                   # about 1/sqrt(64), as in the hybrid experiment
tokenizer = "byte"
lr = 3e-3
beta2 = 0.99
eval_interval = 125
eval_iters = 4
eval_batch_size = 16
arith_per_level = 0
log_interval = 25
ckpt_interval = 250
stages = [dict(name="recall_mix", mixture={"recall": 0.7, "shakespeare": 0.3}, steps=1000, seq_len=128,
               batch_size=16, warmup=40, lr_end=0.1, decay="cosine")]
