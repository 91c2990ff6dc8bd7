"""What a quantized model stores, whatever it computes in: the paper's accounting counts unquantized
weights, and each group's scale and zero, in 16 bits."""
import torch

STORAGE_DTYPE = torch.bfloat16
