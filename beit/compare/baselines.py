"""The classifiers that need no fine-tuning: kNN and logistic regression (scikit-learn) on the
pretrained encoder's features, and logistic regression on the pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_encoder(weights: str):
    """The pretrained ``BeitPretrainModel`` saved by ``beit pretrain`` (weights + the JSON beside them)."""
    from beit.checkpoints.checkpointing import load_weights
    from beit.modeling.mim import BeitPretrainModel
    state, meta = load_weights(weights)
    if not meta or "model" not in meta:
        raise ValueError(f"{weights}: no model config beside the weights (expected "
                         f"{Path(weights).with_suffix('.json')})")
    model = BeitPretrainModel(**meta["model"])
    model.load_state_dict(state)
    return model.eval()


def pixels_of(images: torch.Tensor) -> np.ndarray:
    """uint8 images [N, 3, S, S] -> float features in [0, 1]; one channel when every image is grey
    (three copies of a channel would only change the regulariser's weight)."""
    x = images.numpy().astype(np.float32) / 255.0
    if (x[:, 0] == x[:, 1]).all() and (x[:, 0] == x[:, 2]).all():
        x = x[:, :1]
    return x.reshape(len(x), -1)


def logistic_regression(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 (%) of a standardised, L2-regularised (C=1) multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(train_x, train_y)
    return 100.0 * float(clf.score(test_x, test_y))


def feature_baselines(weights: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                      k: int) -> dict:
    """kNN and logistic regression on the pretrained encoder's l2-normalised mean-pooled patch features."""
    from beit.engines.knn import encoder_features, knn_predict
    model = load_encoder(weights)
    with torch.inference_mode():
        ftr = encoder_features(model, train[0], "cpu")
        fte = encoder_features(model, test[0], "cpu")
    pred = knn_predict(ftr, train[1], fte, k=k, num_classes=int(max(train[1].max(), test[1].max())) + 1)
    return {"knn": 100.0 * float((pred == test[1]).double().mean()),
            "logreg_features": logistic_regression(ftr.numpy(), train[1].numpy(), fte.numpy(), test[1].numpy())}
