# Experiment "long_context" (python -m tools.experiment long_context): train at 32 bytes, then extend to 128. This file
# is what the arms share (the model, and the stages at 32); the arm file that follows it sets the last stage:
#   python train.py config/experiments/long_context.py config/experiments/long_context_raised_base.py
# Every layer global, so that every layer meets the new distances; dense MLPs. The recall corpus asks for values
# from 2 to 125 bytes back: at 32 bytes the model learns to fetch from as far as 31, and the question is whether
# it fetches from 32-127 at 128, with the RoPE base kept, raised, or without ever training there.
preset = "tiny_8x64"
n_dense_layers = 8
attn_pattern = "G"
share_kv = False
window = 32                        # (no local layer uses it: it sets the log's recall buckets at 32 and 128)
block_size = 128
init_std = 0.125                   # about 1/sqrt(64), as in experiment "hybrid"
tokenizer = "byte"
lr = 3e-3
beta2 = 0.99
eval_interval = 400
eval_iters = 8
eval_seq_len = 128
eval_batch_size = 16
arith_per_level = 0
log_interval = 20
ckpt_interval = 400
# As in experiment "hybrid", a first stage heavy in recall, then the broad mixture.
_mix = {"shakespeare": 0.45, "code": 0.2, "recall": 0.35}
_short = [dict(name="recall_first", mixture={"recall": 0.7, "shakespeare": 0.3}, steps=300, seq_len=32, batch_size=64,
               warmup=40, lr_end=0.7, decay="cosine"),
          dict(name="short", mixture=_mix, steps=400, seq_len=32, batch_size=64, lr_end=0.3, decay="cosine")]
stages = _short + [dict(name="more_short", mixture=_mix, steps=250, seq_len=32, batch_size=64, lr_end=0.02)]
