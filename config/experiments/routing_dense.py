# Arm of experiment "routing": every layer a dense SwiGLU of 774 hidden units, as wide as the MoE arms' 8 routed
# + 1 shared experts together: the same total parameters, all of them active for every token.
n_dense_layers = 4
