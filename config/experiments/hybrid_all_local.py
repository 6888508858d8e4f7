# Arm of experiment "hybrid": every layer attends to the last 8 positions only, with its own K/V.
attn_pattern = "L"
share_kv = False
