# Arm of experiment "hybrid": Yi-Lightning's layout, LLLG LLLG; the second global layer reuses the first's K/V.
attn_pattern = "LLLG"
share_kv = True
