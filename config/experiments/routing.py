# Experiment "routing" (python -m tools.experiment routing): dense MLP vs top-2 vs three top-p routers (held at 1.9
# experts per token with the balance loss or with the loss-free bias, and at a fixed p) at the same total
# parameters, 3 seeds each. This file is what the arms share; the arm file that follows it sets the feed-forward layers:
#   python train.py config/experiments/routing.py config/experiments/routing_top_p.py
# nanoGPT's CPU shape (4 layers, 128 wide). The MoE arms' layers 2-4 have 8 routed experts of hidden 86 + 1
# shared; the first layer is a dense SwiGLU as wide as those 9 experts together (9 x 86 = 774), so that the
# dense arm, 774 wide in every layer, has the same total parameters (less the MoE arms' three small routers).
preset = "nanogpt_4x128"
mlp_hidden = 774
expert_hidden = 86
block_size = 128
tokenizer = "byte"
lr = 2e-3
beta2 = 0.99
eval_interval = 300
eval_iters = 8
arith_per_level = 0
log_interval = 20
ckpt_interval = 300
stages = [dict(name="main", mixture={"shakespeare": 0.5, "code": 0.2, "arith": 0.3}, steps=800, seq_len=128,
               batch_size=8, warmup=50, lr_end=0.05, decay="cosine")]
