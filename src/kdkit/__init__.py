"""kdkit: knowledge distillation for PyTorch -- models with taps, composable losses, one engine.

Quick use::

    import kdkit
    data = kdkit.load_dataset("fashion_mnist")
    teacher = kdkit.build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=28)
"""

__version__ = "0.1.0"

from kdkit.errors import KdkitError, TrainingDiverged

__all__ = ["KdkitError", "TrainingDiverged", "__version__"]
