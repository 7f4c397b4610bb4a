"""The LightGBM member."""

from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np


@dataclass
class _LightGBM:
    booster: lgb.Booster
    kind: str = "lightgbm"

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return self.booster.predict(weights)

    def save(self, directory: Path) -> None:
        self.booster.save_model(directory / "model.txt")

    @classmethod
    def load(cls, directory: Path) -> "_LightGBM":
        text = (directory / "model.txt").read_text()
        # LightGBM aborts the whole process (C++ terminate) on some truncated files
        if "end of trees" not in text:
            raise ValueError(f"{directory / 'model.txt'} is incomplete (no 'end of trees')")
        return cls(lgb.Booster(model_str=text))
