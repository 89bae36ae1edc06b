"""The model: everything that imports torch.

- the networks: ``text`` (the word-level text encoder and its layout head), ``autoencoder`` (the KL
  autoencoder between pixels and latents) and ``unet`` (the denoiser with self- and
  cross-attention);
- the diffusion itself: ``schedule`` (β_t, ᾱ_t and the forward process q(x_t | x0)) and
  ``samplers`` (DDPM, DDIM, DPM-Solver++ over one ``denoise`` callable);
- ``pipeline`` (``LatentDiffusion``: text → latents → pixels, batched, one seed per image),
  ``checkpoint`` (safetensors plus JSON, never pickles), ``preview`` and ``sample_grid``;
- ``data`` (the captioned shapes renderer and image folders), ``training`` (the training loops
  and their configs) and ``eval`` (``dq eval``: the classifier, FID and the report).

It may import ``core.runtime`` and nothing else of ``core``: it knows nothing of jobs, queues or
records, so it can be trained, sampled and evaluated on its own. Only it and ``worker`` import
torch.
"""
