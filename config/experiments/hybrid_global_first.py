# Arm of experiment "hybrid": the same layers in another order, the global layer first: GLLL GLLL, the second global
# layer reusing the first's K/V (GLLLSLLL). The same KV cache as LLLGLLLS.
attn_pattern = "GLLL"
share_kv = True
