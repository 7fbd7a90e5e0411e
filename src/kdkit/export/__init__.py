"""Ship a finished run's student: export it verified against PyTorch, predict with it, load it as a plain module.

* :mod:`~kdkit.export.source` -- a run folder's deployed network, rebuilt from its recipe and a checkpoint;
* :mod:`~kdkit.export.network` -- :func:`load_deployed`: that network taking raw images;
* :mod:`~kdkit.export.formats` -- the format contract and :data:`FORMATS`; one module per format
  (:mod:`~kdkit.export.onnx_format`, :mod:`~kdkit.export.torchscript_format`,
  :mod:`~kdkit.export.safetensors_format`);
* :mod:`~kdkit.export.verify` -- an export against PyTorch on the run's test images;
* :mod:`~kdkit.export.timing` -- its latency against PyTorch eager;
* :mod:`~kdkit.export.card` -- ``model_card.md``;
* :mod:`~kdkit.export.run` -- ``kdkit export``: all of the above, in order;
* :mod:`~kdkit.export.images`, :mod:`~kdkit.export.predict` -- ``kdkit predict`` on image files.

ONNX needs the ``export`` extra (``pip install 'kdkit[export]'``: onnx, onnxruntime); TorchScript and safetensors
need nothing beyond kdkit's dependencies.
"""

from kdkit.export import onnx_format, safetensors_format, torchscript_format  # noqa: F401 - register the formats
from kdkit.export.formats import FORMATS, Exported, ExportFormat, register_format
from kdkit.export.network import RawImages, load_deployed
from kdkit.export.predict import open_predictor, predict
from kdkit.export.run import ExportResult, export_run
from kdkit.export.source import DeployedRun, open_run

__all__ = ["FORMATS", "DeployedRun", "ExportFormat", "ExportResult", "Exported", "RawImages", "export_run",
           "load_deployed", "open_predictor", "open_run", "predict", "register_format"]
