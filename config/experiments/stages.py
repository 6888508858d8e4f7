# Experiment "stages" (python -m tools.experiment stages): three stages vs one stage with the same tokens and peak
# lr. The three-stage arm is the quickstart run itself (config/default.py); this file is the one-stage arm:
#   python train.py config/default.py config/experiments/stages.py
# Its mixture is the token-weighted average of the three stages' mixtures (800, 1100 and 600 steps of 1024
# tokens each): shakespeare (800*.65 + 1100*.25 + 600*.12)/2500 = .3468, code (56 + 55 + 18)/2500 = .052,
# arith (224 + 770 + 510)/2500 = .602. Warmup as stage 1, then one cosine from peak to the same end (2%).
out_dir = "out/stages_one"
stages = [dict(name="one", mixture={"shakespeare": 0.3468, "code": 0.0516, "arith": 0.6016}, steps=2500,
               seq_len=128, batch_size=8, warmup=50, lr_start=1.0, lr_end=0.02, decay="cosine")]
