"""Models stage: MONAI image encoders, Hugging Face report encoders, fusion kinds, the full model.

Models know nothing of files beyond their own folder format, nor of MLflow or Captum. Swappable parts
are chosen by name from small registries that user code can extend at run time:

    >>> from clinfuse.models import list_image_encoders, list_fusions
    >>> "densenet121" in list_image_encoders() and "attention" in list_fusions()
    True
"""

from .fusion import list_fusions, register_fusion
from .image import list_image_encoders, register_image_encoder
from .model import MODEL_FORMAT, FusionModel, build_model, load_model, probabilities, save_model

__all__ = ["FusionModel", "build_model", "save_model", "load_model", "probabilities", "MODEL_FORMAT",
           "list_image_encoders", "register_image_encoder", "list_fusions", "register_fusion"]
