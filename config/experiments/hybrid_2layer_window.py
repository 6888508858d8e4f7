# Arm of experiment "hybrid_2layer": LG with a window per stage, 1 for the first 600 steps, then the target 8. At
# window 1 a local layer sees only its own position, so nothing near can be answered without the global layer, and
# the lookup must start there; the question is whether it survives the window's opening. The one stage of the other
# arms split in two at step 600: the same steps, mixture and peak; the lr at the split is the one-stage cosine's
# there (0.4335 of peak), reached by two cosines instead of one.
_one = stages[0]
stages = [dict(_one, name="window_1", steps=600, window=1, lr_end=0.4335),
          dict(_one, name="window_8", steps=400, warmup=0, window=8)]
