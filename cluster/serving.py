"""The code of a registered task model, as MLflow's "models from code": `mlflow models serve -m
models:/<name>/<version>` runs this file (cluster.tracking.save_pyfunc copies it into the model), which declares
the model with `mlflow.models.set_model`, so serving unpickles nothing. Nothing imports this module.

Input: uint8 RGB images (N, H, W, 3) at the model's size; output: one row per image, the class name and its
probability, then every class's probability (p_<class>).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np

MODEL = "model"  # the artifact name of the exported folder inside the pyfunc model


class TaskClassifier(mlflow.pyfunc.PythonModel):
    """Preprocessing (uint8 -> [0, 1] -> mean/std of model.json), the exported ViT, softmax over its classes."""

    def load_context(self, context: Any) -> None:
        import torch

        from vitpipe.models.deploy import load

        folder = Path(context.artifacts[MODEL])
        self.model = load(folder)
        config = json.loads((folder / "model.json").read_text())
        self.classes = list(config["classes"])
        pre = config["preprocess"]
        self.size = int(pre["img_size"])
        self.mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["std"]).view(1, 3, 1, 1)

    def predict(self, context, model_input, params=None):  # untyped: the signature is explicit (save_pyfunc)
        import pandas as pd
        import torch

        images = np.asarray(model_input)
        if images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected uint8 RGB images of shape (N, {self.size}, {self.size}, 3), "
                             f"got {images.shape}")
        # as the stage measured it, to the bit: x / (255 std) - mean / std (uint8 / 127.5 - 1 for mean = std =
        # 0.5), on a contiguous NCHW tensor. ToMe's token matching is discrete: a last-bit difference in the
        # input (another rounding, a channels-last layout) can merge other tokens and change a prediction.
        x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            probs = self.model(x.div(255.0 * self.std).sub(self.mean / self.std)).softmax(-1).numpy()
        best = probs.argmax(1)
        frame = pd.DataFrame({"label": [self.classes[i] for i in best], "probability": probs.max(1)})
        for i, name in enumerate(self.classes):
            frame[f"p_{name}"] = probs[:, i]
        return frame


mlflow.models.set_model(TaskClassifier())
