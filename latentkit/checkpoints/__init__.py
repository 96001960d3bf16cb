"""Model files: the key maps between original single-file checkpoints and latentkit's modules
(`latentkit.checkpoints.keys`)."""
