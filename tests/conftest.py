import torch

# Tiny models: one thread avoids oversubscribing the CI machine's 2 cores.
torch.set_num_threads(1)
