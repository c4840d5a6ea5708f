"""The three protocols that measure an encoder on a few labels: linear probe, kNN, fine-tune."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import get_cosine_schedule_with_warmup

from ssl_models.core.config import FinetuneConfig
from ssl_models.core.device import autocast, move
from ssl_models.core.modules import Encoder


@torch.no_grad()
def embed_rows(encoder: Encoder, rows: list[dict[str, Any]], batch_size: int = 64,
               precision: str = "auto") -> np.ndarray:
    """Frozen features of `rows`, on the encoder's device (autocast per `precision`), as float32 on the CPU."""
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = []
    for i in range(0, len(rows), batch_size):
        with autocast(device, precision):
            chunks.append(encoder(move(encoder.collate(rows[i:i + batch_size]), device)).float().cpu())
    return torch.cat(chunks).numpy()


def scores(y_true: list[str], y_pred: list[str], probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """macro-F1 and accuracy of the predictions; AUROC of the class probabilities (one-vs-rest
    macro average beyond two classes), when every class occurs in the test set."""
    result = {"macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
              "accuracy": float(accuracy_score(y_true, y_pred))}
    if set(y_true) == set(classes):
        if len(classes) == 2:
            result["auroc"] = float(roc_auc_score([y == classes[1] for y in y_true], probabilities[:, 1]))
        else:
            result["auroc"] = float(roc_auc_score(y_true, probabilities, multi_class="ovr", labels=classes))
    return result


def _spread(model_classes: list[str], probabilities: np.ndarray, classes: list[str]) -> np.ndarray:
    """Probabilities over the subset's classes -> columns of all `classes` (0 for absent ones)."""
    full = np.zeros((len(probabilities), len(classes)))
    for column, label in enumerate(model_classes):
        full[:, classes.index(label)] = probabilities[:, column]
    return full


def fit_linear_probe(train_x: np.ndarray, train_y: list[str], c: float, seed: int):
    """Logistic regression on standardised frozen features (None when only one class)."""
    if len(set(train_y)) < 2:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500, random_state=seed))
    return probe.fit(train_x, train_y)


def linear_probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, c: float, seed: int,
                 classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Test predictions and class probabilities (columns in `classes` order)."""
    probe = fit_linear_probe(train_x, train_y, c, seed)
    if probe is None:
        return [train_y[0]] * len(test_x), _spread([train_y[0]], np.ones((len(test_x), 1)), classes)
    return list(probe.predict(test_x)), _spread(list(probe.classes_), probe.predict_proba(test_x), classes)


def head_from_probe(probe, dim: int, classes: list[str]) -> torch.nn.Linear:
    """A linear head that computes the fitted probe's logits on raw features (the scaler folded
    in), for LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained Features and
    Underperform Out-of-Distribution", ICLR 2022. Classes absent from the subset start low."""
    head = torch.nn.Linear(dim, len(classes))
    if probe is None:
        return head
    scaler, logistic = probe[0], probe[-1]
    weight = logistic.coef_ / scaler.scale_
    bias = logistic.intercept_ - weight @ scaler.mean_
    if len(logistic.classes_) == 2:  # sklearn keeps one row for two classes
        weight, bias = np.stack([-weight[0] / 2, weight[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(float(bias.min()) - 5.0)
        for row, label in enumerate(logistic.classes_):
            head.weight[classes.index(label)] = torch.as_tensor(weight[row], dtype=torch.float32)
            head.bias[classes.index(label)] = float(bias[row])
    return head


def knn_probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, neighbors: int,
              classes: list[str]) -> tuple[list[str], np.ndarray]:
    knn = KNeighborsClassifier(n_neighbors=min(neighbors, len(train_y)), metric="cosine").fit(train_x, train_y)
    return list(knn.predict(test_x)), _spread(list(knn.classes_), knn.predict_proba(test_x), classes)


def finetune_steps(cfg: FinetuneConfig, n_train: int) -> int:
    """`cfg.epochs` passes over the subset in batches of `cfg.batch_size`, capped at `cfg.max_steps`."""
    return max(1, min(cfg.max_steps, math.ceil(cfg.epochs * n_train / cfg.batch_size)))


def finetune_encoder(encoder: Encoder, train_rows: list[dict[str, Any]], train_y: list[str],
                     test_rows: list[dict[str, Any]], classes: list[str], cfg: FinetuneConfig,
                     seed: int, head: torch.nn.Linear) -> tuple[list[str], np.ndarray, Encoder, torch.nn.Linear]:
    """Train a copy of the encoder and `head` (a copy of it) for `cfg.steps` steps, the same
    budget for every initialisation; returns test predictions, probabilities and the trained modules."""
    torch.manual_seed(seed)
    device = next(encoder.parameters()).device
    model = copy.deepcopy(encoder)
    head = copy.deepcopy(head).to(device)
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": cfg.learning_rate},
                                   {"params": head.parameters(), "lr": cfg.head_learning_rate}])
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, finetune_steps(cfg, len(train_rows)) // 10),
                                                finetune_steps(cfg, len(train_rows)))
    targets = torch.tensor([classes.index(y) for y in train_y], device=device)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    for _ in range(finetune_steps(cfg, len(train_rows))):
        while len(order) < cfg.batch_size:  # fresh permutations, also when the subset is smaller than a batch
            order += torch.randperm(len(train_rows), generator=generator).tolist()
        batch_ids, order = order[:cfg.batch_size], order[cfg.batch_size:]
        with autocast(device, cfg.precision):
            logits = head(model(move(model.collate([train_rows[i] for i in batch_ids]), device)))
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[batch_ids])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        features = torch.from_numpy(embed_rows(model, test_rows, precision=cfg.precision)).to(device)
        probabilities = torch.softmax(head(features).float(), dim=1).cpu()
    predictions = probabilities.argmax(dim=1).tolist()
    return [classes[i] for i in predictions], probabilities.numpy(), model, head
