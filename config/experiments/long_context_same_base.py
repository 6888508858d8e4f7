# Arm of experiment "long_context": extend to 128 bytes (the same 2048 tokens per step) with the RoPE base unchanged.
stages = _short + [dict(name="long", mixture=_mix, steps=250, seq_len=128, batch_size=16, lr_end=0.02)]
