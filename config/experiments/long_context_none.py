# Arm of experiment "long_context": no extension. The last stage stays at 32 bytes (the same tokens as the other
# arms' extension stage); the model meets 128-byte sequences only at evaluation. This is the base file's own stage
# list, so this arm file changes nothing: it names the arm.
