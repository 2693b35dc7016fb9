"""A medfed model package as an MLflow model, for `mlflow models predict` and `serve`.

The MLflow model wraps the package (`federation.modelpack`) and runs the network on
arrays already preprocessed as the task does (e.g. seg2d: slices windowed to [0, 1] and
resized, shape (N, 1, S, S)). It returns probabilities: per pixel for segmentation
(sigmoid), per class for classification (softmax). Whole DICOM series go through
`medfed site predict`, which also writes DICOM results.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from federation import __version__
from federation.modelpack import PACKAGE_FILE, ModelPackage

__all__ = ["MedfedModel", "save_mlflow_model", "signature"]


class MedfedModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """The package's network behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        """Build the network from the package among the model's artifacts."""
        self.package = ModelPackage.load(Path(context.artifacts["package"]))
        self.network = self.package.build()

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> Any:
        """Probabilities for a batch of preprocessed arrays (N, channels, ...).

        `np.ndarray` is a hint MLflow takes as is; the schema is `signature`'s.
        """
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            logits = self.network(batch)
        if self.package.model.out_channels == 1:
            return torch.sigmoid(logits).numpy()
        return torch.softmax(logits, dim=1).numpy()


def signature(package: ModelPackage) -> Any:
    """The model's input and output tensors: float32, any batch and spatial size.

    Segmentation returns a map per pixel (N, out_channels, ...), classification one
    probability per class (N, classes).
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from federation.tasks import get_task

    model = package.model
    spatial = (-1,) * model.spatial_dims
    out: tuple[int, ...] = (-1, model.out_channels)
    if get_task(package.task.name).segment is not None:
        out += spatial
    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, model.in_channels, *spatial))]),
        outputs=Schema([TensorSpec(f32, out)]),
    )


def save_mlflow_model(package: Path, folder: Path) -> Path:
    """Write the MLflow model of `package` into `folder` (which must not exist)."""
    with warnings.catch_warnings():  # it asks for an input example: the signature says it all
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(
            path=str(folder),
            python_model=MedfedModel(),
            artifacts={"package": str(package)},
            signature=signature(ModelPackage.load(package)),
            pip_requirements=[f"medfed=={__version__}"],
        )
    return folder / "artifacts" / PACKAGE_FILE
