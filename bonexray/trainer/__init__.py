"""Training DenseNet-169 on MURA-layout data (needs the train extra: torch, torchvision)."""
