"""Qwen-VL processors for images only (private): they work where torchvision cannot be installed.

transformers builds a Qwen-VL processor with a video processor, which needs torchvision; these
subclasses leave it out. They live at module level so that a saved pipeline or checkpoint can
name them (diffusers records a component's class by its module path) and load them back.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import ProcessorMixin

__all__ = ["ImageOnlyQwen2VLProcessor", "ImageOnlyQwen2_5_VLProcessor", "image_only_processor"]

_ = ProcessorMixin  # diffusers finds a custom component's loading method by this name here


def _image_only(base: Any) -> Any:
    class ImageOnly(base):  # type: ignore[misc]
        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            chat_template: Any = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{base.__name__}"
    ImageOnly.__module__ = __name__
    ImageOnly.__doc__ = f"``{base.__name__}`` without a video processor (no torchvision needed)."
    return ImageOnly


ImageOnlyQwen2VLProcessor: Any = _image_only(transformers.Qwen2VLProcessor)
ImageOnlyQwen2_5_VLProcessor: Any = _image_only(transformers.Qwen2_5_VLProcessor)


def image_only_processor(model_type: str) -> Any:
    """The image-only processor class for a Qwen-VL ``model_type``."""
    return ImageOnlyQwen2VLProcessor if model_type == "qwen2_vl" else ImageOnlyQwen2_5_VLProcessor
