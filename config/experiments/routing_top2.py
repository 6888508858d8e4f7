# Arm of experiment "routing": every token gets exactly its 2 most probable routed experts (+ the shared one).
router = dict(routing="top_k", top_k=2)
