"""The lab: what built latentkit's shapes model, kept out of the SDK's import path.

- `latentkit.lab.shapes`: the procedural shapes dataset (captions, rendering, held-out split);
- `latentkit.lab.evaluation`: geometric prompt-adherence scoring of shapes images;
- `latentkit.lab.training`: losses and loops to train a latent diffusion model from scratch;
- ``python -m latentkit.lab eval`` (the ``latentkit-lab`` command): sampler quality on a
  shapes model.

The lab imports the SDK; the SDK (``latentkit``, its ``latentkit`` command) never imports the
lab, so generation does not load training code or the lab's dependencies (``pip install
latentkit[lab]``).
"""
