"""Models: ResNet20 (the CAS classifier) and class-conditional Stable Diffusion."""
