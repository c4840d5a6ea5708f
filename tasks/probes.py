"""The protocols that measure an encoder on a few labels: linear probe, kNN, fine-tune (and over
bags of instances, attention-based MIL: `tasks.mil`); the probe's regularisation chosen inside the
labeled subset, and 2D views of frozen features."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import accuracy_score, f1_score, make_scorer, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from threadpoolctl import threadpool_limits
from transformers import get_cosine_schedule_with_warmup

from ssl_models.core.config import FinetuneConfig, epoch_steps
from ssl_models.core.device import autocast, fused_adamw, move
from ssl_models.core.modules import Encoder

# The probe's folds are drawn with this fixed seed, so the chosen C depends on the subset alone:
# identical subsets (every seed at 100%) choose the same C, and the choice is computed once.
CV_SEED = 0
MAX_ITER = 500  # lbfgs iterations of a probe fit


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """The probes' matrices are small (subset x feature dim): one BLAS thread fits them as fast
    as several, never competes with torch's threads for the cores (measured 20-40x slower with
    2 threads on 2 busy cores), and gives the same floats in every process of a parallel run."""
    with threadpool_limits(1):
        yield


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


class SubsetColumns(TransformerMixin, BaseEstimator):
    """Keep the sparse columns that are non-zero in some training row. A TF-IDF vocabulary is
    fitted on the whole labeled pool (~95k words and pairs on the legal default), a subset of
    22 texts uses a few thousand of them: the others' weights stay exactly 0 under L2 (no data
    gradient), but lbfgs still carries them in every update (measured: 19 s of a 1% probe fit,
    95% of it in the optimizer's own bookkeeping). Dropping them changes no prediction."""

    def fit(self, x: Any, y: Any = None) -> SubsetColumns:
        columns = np.flatnonzero(sparse.csc_matrix(x).getnnz(axis=0))
        self.columns_ = columns if columns.size else np.arange(min(1, x.shape[1]))
        return self

    def transform(self, x: Any) -> Any:
        return sparse.csr_matrix(x)[:, self.columns_]


def _probe_pipeline(features: Any, logistic: LogisticRegression | LogisticRegressionCV) -> Pipeline:
    """`logistic` on standardised features; on sparse ones (TF-IDF, rows already l2-normalised)
    without scaling, on the columns the training rows use: centring would densify them, and
    dividing by a rare term's small standard deviation would blow it up. (lbfgs is
    deterministic: no random_state to pass.)"""
    if sparse.issparse(features):
        return make_pipeline(SubsetColumns(), logistic)
    return make_pipeline(StandardScaler(), logistic)


def fit_linear_probe(train_x: Any, train_y: list[str], c: float,
                     class_weight: Literal["balanced"] | None = "balanced") -> Pipeline | None:
    """Logistic regression with inverse regularisation `c` and `class_weight` on frozen features
    (dense: standardised; sparse: as they are), or None when the subset holds one class only."""
    if len(set(train_y)) < 2:
        return None
    logistic = LogisticRegression(C=c, class_weight=class_weight, max_iter=MAX_ITER)
    with one_blas_thread():
        return _probe_pipeline(train_x, logistic).fit(train_x, train_y)


@dataclass(frozen=True)
class ChosenC:
    """The probe's inverse regularisation and how it was chosen: `cv` (stratified k-fold
    macro-F1 inside the labeled subset, k in `folds`), `default` (the grid's middle value: some
    class has fewer examples than `cv_folds`, `folds` then the k that would have fitted) or
    `fixed` (finetune.linear_c is a number)."""

    c: float
    chosen_by: Literal["cv", "default", "fixed"]
    folds: int = 0


def default_c(grid: list[float]) -> float:
    """The grid's middle value (the lower of the two middle ones for an even grid): with
    [0.01, 0.1, 1, 10, 100] that is 1, scikit-learn's default, what a practitioner fits first."""
    ordered = sorted(grid)
    return ordered[(len(ordered) - 1) // 2]


def _macro_f1(y_true: Any, y_pred: Any, labels: Any = None) -> float:
    """The search's score: macro-F1 over the subset's classes (`labels`, which scikit-learn's
    path passes), 0 for a class never predicted. No `pos_label` argument: scikit-learn would
    set one for two classes, which macro averaging ignores (with a warning)."""
    return f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)


def fit_chosen_probe(train_x: Any, train_y: list[str], settings: FinetuneConfig) -> tuple[ChosenC, Pipeline | None]:
    """The probe, with C `finetune.linear_c`, or with `cv` a C of `linear_c_grid` chosen by
    stratified k-fold cross-validation (macro-F1) inside the labeled subset, refitted on the
    whole subset; the test set is never seen here. k = min(cv_folds, smallest count among
    classes of two or more examples); with k below `cv_folds`, the grid's middle value
    (`default_c`). None for the probe when the subset holds one class (no C applies).

    The search starts from the grid's middle value, scikit-learn's default C=1 (what a
    practitioner fits first), and moves to the C of the best mean only when that C beats it
    on the same folds by more than the standard error of the paired fold differences (the
    one-standard-error rule, Hastie et al., ESL 7.10, anchored at the default). Macro-F1 over
    a handful of rare-class rows per fold is noisy: the bare arg-max chose C=0.1 on a
    synthetic imbalanced set where it scored 0.62 on held-out rows against C=1's 0.82."""
    if len(set(train_y)) < 2:
        return ChosenC(default_c(settings.linear_c_grid), "default"), None
    weight = settings.class_weight
    if settings.linear_c != "cv":
        return ChosenC(float(settings.linear_c), "fixed"), fit_linear_probe(train_x, train_y,
                                                                             float(settings.linear_c), weight)
    # k from the classes that can be split at all: a class of one example (common at 1-10% of a
    # long-tailed label set) sits in one validation fold and is simply absent from the other folds'
    splittable = [count for count in Counter(train_y).values() if count >= 2]
    folds = min(settings.cv_folds, min(splittable)) if splittable else 0
    c = default_c(settings.linear_c_grid)
    if folds < settings.cv_folds:
        # too few examples of some class for the configured folds: a spread estimated from 2-4 fold
        # differences is no evidence against the default (on the legal default at 1%, 3 folds moved
        # 3 of 5 seeds to C=10 and the baseline scored 0.262 against the default's 0.308)
        return ChosenC(c, "default", folds), fit_linear_probe(train_x, train_y, c, weight)
    # scikit-learn's regularisation path: per fold one lbfgs run warm-started along the ascending
    # grid, every (fold, C) scored. The scaler sees the whole subset: it reads no labels.
    grid = sorted(settings.linear_c_grid)
    search = LogisticRegressionCV(
        Cs=grid, cv=StratifiedKFold(folds, shuffle=True, random_state=CV_SEED), refit=False,
        scoring=make_scorer(_macro_f1), max_iter=MAX_ITER, class_weight=weight,
        l1_ratios=(0.0,), use_legacy_attributes=False)  # plain L2, and scikit-learn 1.10's attributes
    with one_blas_thread(), warnings.catch_warnings():
        # "the least populated class has only 1 member": expected for the singleton classes above
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        # labels as indices: scikit-learn 1.10's search fails on balanced weights of digit-string labels
        # ("The classes, [0, 1, 2], are not in class_weight"); the scores do not depend on the names
        _probe_pipeline(train_x, search).fit(train_x, np.unique(train_y, return_inverse=True)[1])
    fold_scores = np.asarray(search.scores_).reshape(folds, len(grid))  # (fold, C ascending)
    best = int(np.argmax(fold_scores.mean(axis=0)))  # the first maximum: the smaller C among equals
    gains = fold_scores[:, best] - fold_scores[:, grid.index(c)]
    if gains.mean() > gains.std(ddof=1) / np.sqrt(folds):
        c = grid[best]
    return ChosenC(c, "cv", folds), fit_linear_probe(train_x, train_y, c, weight)


def probe_predictions(probe: Pipeline | None, train_y: list[str], test_x: Any,
                      classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Test predictions and class probabilities (columns in `classes` order) of a fitted probe;
    without one (a one-class subset) every test row gets that class."""
    if probe is None:
        return [train_y[0]] * test_x.shape[0], _spread([train_y[0]], np.ones((test_x.shape[0], 1)), classes)
    with one_blas_thread():
        return list(probe.predict(test_x)), _spread(list(probe.classes_), probe.predict_proba(test_x), classes)


def head_from_probe(probe: Pipeline | None, dim: int, classes: list[str]) -> torch.nn.Linear:
    """A linear head that computes the fitted probe's logits on raw features (the scaler folded
    in), for LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained Features and
    Underperform Out-of-Distribution", ICLR 2022. Classes absent from the subset start low."""
    head = torch.nn.Linear(dim, len(classes))
    if probe is None:
        return head
    logistic = probe[-1]
    scale, mean = ((probe[0].scale_, probe[0].mean_) if isinstance(probe[0], StandardScaler)
                   else (np.ones(dim), np.zeros(dim)))
    coef = logistic.coef_
    if isinstance(probe[0], SubsetColumns):  # the dropped columns' weights are 0
        coef = np.zeros((coef.shape[0], dim))
        coef[:, probe[0].columns_] = logistic.coef_
    weight = coef / scale
    bias = logistic.intercept_ - weight @ mean
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
    with one_blas_thread():
        knn = KNeighborsClassifier(n_neighbors=min(neighbors, len(train_y)), metric="cosine").fit(train_x, train_y)
        return list(knn.predict(test_x)), _spread(list(knn.classes_), knn.predict_proba(test_x), classes)


def project_2d(features: Any) -> tuple[list[list[float]], str]:
    """Rows of `features` projected onto their first two principal axes (sklearn's PCA; for
    sparse features TruncatedSVD, which needs no centring), rounded to 5 decimals, and the
    method's name. Fewer than two rows or columns: zeros fill the missing axes."""
    rows, columns = features.shape
    components = min(2, rows - 1, columns)
    coordinates = np.zeros((rows, 2))
    method = "truncated_svd" if sparse.issparse(features) else "pca"
    if components >= 1:
        projector = (TruncatedSVD(components, random_state=0) if sparse.issparse(features)
                     else PCA(components, random_state=0))
        with one_blas_thread():
            coordinates[:, :components] = projector.fit_transform(features)
    return np.round(coordinates, 5).tolist(), method


def finetune_steps(cfg: FinetuneConfig, n_train: int) -> int:
    """`cfg.epochs` passes over the subset in batches of `cfg.batch_size`, capped at `cfg.max_steps`."""
    return epoch_steps(cfg.epochs, n_train, cfg.batch_size, cfg.max_steps)


def class_weights(train_y: list[str], classes: list[str], class_weight: Literal["balanced"] | None) -> torch.Tensor:
    """Per-class loss weights in `classes` order: with `balanced`, scikit-learn's
    n / (classes in the subset x the class's count), the weights its probes use (absent classes
    0: they have no rows); otherwise ones."""
    if class_weight != "balanced":
        return torch.ones(len(classes))
    present = sorted(set(train_y))
    weights = dict(zip(present, compute_class_weight("balanced", classes=np.array(present), y=np.array(train_y))))
    return torch.tensor([weights.get(label, 0.0) for label in classes], dtype=torch.float32)


def shuffled_batches(count: int, batch_size: int, seed: int, steps: int) -> Iterator[list[int]]:
    """`steps` batches of indices into `count` training items: consecutive seeded permutations cut
    into batches (fresh ones also when the subset is smaller than a batch). Fine-tuning and ABMIL draw
    their batches so."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(count, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def train_class_weighted(optimizer: torch.optim.Optimizer, steps: int, train_y: list[str], classes: list[str],
                         cfg: FinetuneConfig, seed: int, device: torch.device,
                         logits_of: Callable[[list[int]], torch.Tensor],
                         precision: str | None = None) -> None:
    """`steps` optimizer steps of cross-entropy weighted by `cfg.class_weight`, on `shuffled_batches` of
    the training items (`logits_of(batch_ids)` gives their logits; under `autocast` at `precision`
    when given), a cosine schedule with a tenth of the steps as warm-up: fine-tuning's loop, and ABMIL's."""
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    targets = torch.tensor([classes.index(y) for y in train_y], device=device)
    weight = class_weights(train_y, classes, cfg.class_weight).to(device)
    for batch_ids in shuffled_batches(len(train_y), cfg.batch_size, seed, steps):
        with autocast(device, precision) if precision is not None else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(logits_of(batch_ids).float(), targets[batch_ids], weight=weight)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def finetune_encoder(encoder: Encoder, train_rows: list[dict[str, Any]], train_y: list[str],
                     test_rows: list[dict[str, Any]], classes: list[str], cfg: FinetuneConfig,
                     seed: int, head: torch.nn.Linear) -> tuple[list[str], np.ndarray, Encoder, torch.nn.Linear]:
    """Train a copy of the encoder and `head` (a copy of it) for `finetune_steps(cfg, len(train_rows))`
    steps, the same rule for every initialisation; returns test predictions, probabilities and
    the trained modules."""
    torch.manual_seed(seed)
    device = next(encoder.parameters()).device
    model = copy.deepcopy(encoder)
    head = copy.deepcopy(head).to(device)
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": cfg.learning_rate},
                                   {"params": head.parameters(), "lr": cfg.head_learning_rate}],
                                  fused=fused_adamw(device))
    model.train()
    train_class_weighted(optimizer, finetune_steps(cfg, len(train_rows)), train_y, classes, cfg, seed, device,
                         lambda ids: head(model(move(model.collate([train_rows[i] for i in ids]), device))),
                         precision=cfg.precision)
    model.eval()
    with torch.no_grad():
        features = torch.from_numpy(embed_rows(model, test_rows, precision=cfg.precision)).to(device)
        probabilities = torch.softmax(head(features).float(), dim=1).cpu()
    predictions = probabilities.argmax(dim=1).tolist()
    return [classes[i] for i in predictions], probabilities.numpy(), model, head
