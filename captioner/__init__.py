"""captioner: CLIP-prefix image captioning on Lightning + Hydra."""
