# Arm of experiment "hybrid": every layer attends to the whole context, with its own K/V.
attn_pattern = "G"
share_kv = False
