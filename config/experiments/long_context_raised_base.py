# Arm of experiment "long_context": extend to 512 tokens with the RoPE base raised, Yi-Lightning's recipe. 4x
# the context, head size 16: the "NTK-aware" rule raises the base by 4^(16/14) = 4.9x, so 10000 -> 50000.
stages = [_short, dict(name="long", mixture={"shakespeare": 0.7, "code": 0.3}, steps=250, seq_len=512,
                       batch_size=4, lr_end=0.02, rope_base=50000.0)]
