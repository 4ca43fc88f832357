"""The labeler's closed-set scoring on a model that is still training (validation inside training).

``llamafactory_ext`` does not import the labeler's code, so ``run_training`` receives this
function from its callers (``lancetag train``, the demo) and calls it in the training process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lance_io.augment import ImageViews
from lance_io.image_size import ImagePixels


def transformers_labeler(
    model: Any, model_path: str, batch_size: int, views: ImageViews | None = None, pixels: ImagePixels | None = None
) -> Callable[..., Any]:
    """Return a ``label(images, task)`` that answers with ``model`` as the transformers backend does.

    The processor comes from ``model_path`` (the base model the run trains), as the labeler later
    loads it from the fine-tuned folder; the model stays where and as it is (the caller switches
    it to eval mode around each evaluation). ``views``: the views of each image it averages
    (None: the image only, whatever ``model_path`` says). ``pixels``: the run's image size, which
    images are resized to as training resizes them (the labeler later reads it from the lineage).
    """
    from transformers import AutoProcessor

    from serve_apps.backends.base import BackendConfig
    from serve_apps.backends.transformers_backend import TransformersBackend

    processor = AutoProcessor.from_pretrained(model_path)
    backend = TransformersBackend.around(model, processor, BackendConfig(model=model_path, batch_size=batch_size))
    backend.views, backend.image_pixels = views, pixels
    return backend.label
