"""Search path for nnU-Net tools (nnUNet_extTrainer); see alseg_trainers.py."""
