# Arm of experiment "routing": top-p at Huang et al.'s fixed p = 0.4 with their balance loss, and no controller:
# nothing holds the experts per token at one mean, so layers, corpora and tokens are free to differ.
router = dict(routing="top_p", top_p=0.4)
