# Arm of experiment "long_context": extend to 512 tokens (the same 2048 tokens per step) with RoPE base unchanged.
stages = [_short, dict(name="long", mixture={"shakespeare": 0.7, "code": 0.3}, steps=250, seq_len=512,
                       batch_size=4, lr_end=0.02)]
