# Arm of experiment "long_context": extend to 128 bytes with the RoPE base raised, Yi-Lightning's recipe. 4x the
# context, head size 16: the "NTK-aware" rule raises the base by 4^(16/14) = 4.9x, so 10000 -> 50000.
stages = _short + [dict(name="long", mixture=_mix, steps=250, seq_len=128, batch_size=16, lr_end=0.02,
                           rope_base=50000.0)]
