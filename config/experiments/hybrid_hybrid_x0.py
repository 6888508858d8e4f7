# Arm of experiment "hybrid": Yi-Lightning's layout (LLLG LLLG, the second global layer reusing the first's K/V), whose
# global layers read the token embeddings beside the stream (global_x0): the remedy of docs/experiments.md, 1b.
attn_pattern = "LLLG"
share_kv = True
global_x0 = True
