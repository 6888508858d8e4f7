# Arm of experiment "long_context": no extension. The second stage stays at 128 tokens (the same tokens as the
# other arms' extension stage); the model meets 512-token sequences only at evaluation. This is the base file's
# own stage list, so this arm file changes nothing: it names the arm.
