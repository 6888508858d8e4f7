# Arm of experiment "routing": dynamic top-p. A token gets the fewest experts whose router probabilities reach
# top_p; the controller moves top_p so that the mean is 1.9 experts per token (<= top-2's compute).
router = dict(routing="top_p", target_experts=1.9)
