"""Evaluation of a text-to-image model on the shapes data: ``dq eval``.

- :mod:`.classifier`: the attribute classifier, which reads an image back into its scene (the
  judge of prompt adherence) and whose penultimate layer is the feature network of FID. It
  stands in for Inception, whose weights cannot be downloaded here.
- :mod:`.train_classifier`: ``dq train classifier``.
- :mod:`.fid`: Gaussian statistics of features and the Fréchet distance (numpy only).
- :mod:`.scenes`: the evaluation prompts and the real images they are measured against.
- :mod:`.evaluate`: the evaluation itself (default settings, sampler and guidance sweeps).
- :mod:`.editing`: its image-editing rows (image-to-image at each strength, inpainting).
- :mod:`.common`: adherence counts, image seeds and images as tensors, which those share.
- :mod:`.report`: the markdown report.
"""

from pathlib import Path

DEFAULT_CLASSIFIER = Path(__file__).resolve().parent / "default_classifier"
"""The shipped classifier checkpoint, trained by ``dq train classifier`` from
``configs/classifier.toml``."""
