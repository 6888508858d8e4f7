# Arm of experiment "routing": dynamic top-p held at 1.9 experts per token by the controller, as the top_p arm,
# with the experts balanced by the loss-free bias (DeepSeek-V3's rate, 1e-3) instead of the balance loss.
router = dict(routing="top_p", target_experts=1.9, balance_loss=0.0, bias_rate=1e-3)
