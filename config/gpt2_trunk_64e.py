# GPT-2-124M-class trunk with 64 fine-grained experts (2 shared), hybrid attention, for one or more GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_trunk_64e.py
# Tokens per optimizer step: batch_size * seq_len * grad_accum * GPUs = 16 * 1024 * 4 * 8 = 524,288 on 8 GPUs.
# Offline it trains on the local corpora; with a network, prepare FineWeb-Edu with data/text/prepare.py
# --name=fineweb --fineweb_docs=... and put it in the first stage's mixture.
out_dir = "out/gpt2_trunk_64e"
tokenizer = "gpt2"
preset = "gpt2_trunk_64e"
lr = 6e-4
eval_interval = 250
eval_iters = 20
log_interval = 10
ckpt_interval = 500
stages = [
    dict(name="broad", mixture={"shakespeare": 0.5, "code": 0.5}, steps=4000, seq_len=1024, batch_size=16,
         grad_accum=4, warmup=200, lr_start=1.0, lr_end=0.5, decay="cosine"),
    dict(name="reasoning", mixture={"shakespeare": 0.3, "code": 0.4, "arith": 0.3}, steps=2000, seq_len=1024,
         batch_size=16, grad_accum=4),
    dict(name="anneal", mixture={"arith": 0.5, "code": 0.3, "shakespeare": 0.2}, steps=1000, seq_len=1024,
         batch_size=16, grad_accum=4, lr_end=0.0),
]
