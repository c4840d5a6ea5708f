"""The classical `baseline` features of every domain: shapes, determinism, fitted on the pool
only, no label read, and a logistic regression on them separating an easy two-class set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse
from sklearn.linear_model import LogisticRegression

from ssl_models.audio.features import InputSpec, encode_row, model_input
from ssl_models.core.config import DomainConfig, load_config
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from tests.conftest import write_params

BLOCKS = {
    "legal": {"module": "legal_text", "corpus": "corpus", "model": {"max_length": 16, "max_document_tokens": 16}},
    "audio": {"module": "audio", "corpus": "corpus", "pretrain": {"method": "tera"},
              "preprocess": {"input": "log_mel", "n_mels": 32, "clip_seconds": 0.5}},
    "audio_waveform": {"module": "audio", "corpus": "corpus", "pretrain": {"method": "wav2vec2"},
                       "model": {"backbone": "wav2vec2"},
                       "preprocess": {"input": "waveform", "n_mels": 32, "clip_seconds": 0.5}},
    "histo": {"module": "histopathology", "corpus": "corpus", "pretrain": {"method": "simclr"}},
    "medical": {"module": "medical3d", "corpus": "corpus", "pretrain": {"method": "mae"}},
}
DENSE = ("audio", "audio_waveform", "histo", "medical")


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DomainConfig, Domain]]:
    root = tmp_path_factory.mktemp("baseline_params")
    write_params(root, {"domains": BLOCKS})
    return {name: load_config(name, root / "params.yaml") for name in BLOCKS}


# --- synthetic two-class rows, in each domain's labeled-shard format --------------------------------

WORDS = {0: ["indemnify", "warranty", "merchantability", "fitness", "liability", "damages"],
         1: ["copyleft", "derivative", "distribute", "source", "modifications", "share"]}
FILLER = ["the", "software", "is", "provided", "and", "you", "may", "use", "it", "under", "these", "terms"]


def legal_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n):
        label = index % 2
        words = list(rng.choice(FILLER, 30)) + list(rng.choice(WORDS[label], 4))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": str(label), "split": "train", "group": str(index)})
    return rows


def tone(rng: np.random.Generator, label: int, seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    """Class 0: a low tone (150-300 Hz); class 1: a high one (1.5-3 kHz); loudness spread over
    40 dB in both, so the spectrum's shape, not its energy, tells them apart."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = rng.uniform(150, 300) if label == 0 else rng.uniform(1500, 3000)
    amplitude = 10 ** rng.uniform(-2, 0)
    wave = amplitude * (np.sin(2 * np.pi * pitch * t) + 0.02 * rng.standard_normal(len(t)))
    return wave.astype(np.float32)


def audio_rows_for(cfg: DomainConfig) -> Callable[[int, int], list[dict[str, Any]]]:
    spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)

    def rows(n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        out = []
        for index in range(n):
            steps = model_input(tone(rng, index % 2), spec)
            out.append({**encode_row(steps), "label": str(index % 2), "split": "train", "group": str(index)})
        return out

    return rows


STAINS = {0: (80, 60, 170), 1: (150, 95, 45)}  # haematoxylin blue-purple | DAB brown (RGB)


def stained_tile(rng: np.random.Generator, label: int, side: int = 32) -> bytes:
    pixels = np.array(STAINS[label]) + rng.normal(0, 25, (side, side, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8).tobytes()


def histo_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"pixels": [stained_tile(rng, index % 2)], "label": ("dab-low", "dab-high")[index % 2],
             "split": "train", "group": str(index), "source": "s", "x": 0, "y": 0} for index in range(n)]


def sphere_cube(rng: np.random.Generator, label: int, side: int = 16) -> np.ndarray:
    """Class 0: a small bright ball (radius 2-3 voxels); class 1: a large one (5-6), noisy."""
    radius = rng.uniform(2, 3) if label == 0 else rng.uniform(5, 6)
    centre = side / 2 + rng.uniform(-1, 1, 3)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), axis=-1)
    ball = np.linalg.norm(grid - centre, axis=-1) <= radius
    return np.clip(ball * rng.uniform(0.5, 0.9) + rng.normal(0, 0.02, ball.shape), 0, 1)


def medical_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n):
        cube = sphere_cube(rng, index % 2).astype(np.float16)
        rows.append({"sample_id": str(index), "image": cube.tobytes(), "shape": list(cube.shape),
                     "label": ("grey", "white")[index % 2], "split": "train", "group": str(index)})
    return rows


def rows_maker(name: str, cfg: DomainConfig) -> Callable[[int, int], list[dict[str, Any]]]:
    return {"legal": legal_rows, "histo": histo_rows, "medical": medical_rows}.get(name) or audio_rows_for(cfg)


def probe_accuracy(x_pool: Any, pool: list[dict[str, Any]], x_test: Any, test: list[dict[str, Any]]) -> float:
    """A logistic regression fitted on the pool's features and labels, scored on the test rows."""
    model = LogisticRegression(max_iter=2000).fit(x_pool, [row["label"] for row in pool])
    return float(np.mean(model.predict(x_test) == np.array([row["label"] for row in test])))


def dense(matrix: Any) -> np.ndarray:
    return matrix.toarray() if scipy.sparse.issparse(matrix) else np.asarray(matrix)


# --- behaviour every domain shares ----------------------------------------------------------------

@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_domain_offers_the_baseline_init(name: str, configs: dict) -> None:
    cfg, domain = configs[name]
    assert domain.has_baseline()
    assert "baseline" in domain.available_inits(cfg)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_features_have_one_row_per_sample_and_are_deterministic(name: str, configs: dict) -> None:
    cfg, domain = configs[name]
    make = rows_maker(name, cfg)
    pool, test = make(24, seed=0), make(10, seed=1)
    x_pool, x_test = domain.baseline_features(cfg, pool, test)
    assert x_pool.shape[0] == 24 and x_test.shape[0] == 10
    assert x_pool.shape[1] == x_test.shape[1] > 0
    if name == "legal":
        assert scipy.sparse.issparse(x_pool) and scipy.sparse.issparse(x_test)
    else:
        assert isinstance(x_pool, np.ndarray) and x_pool.dtype == np.float32 and x_test.dtype == np.float32
    assert np.isfinite(dense(x_pool)).all() and np.isfinite(dense(x_test)).all()
    assert dense(x_pool).std(axis=0).max() > 0  # the features vary between samples
    again_pool, again_test = domain.baseline_features(cfg, pool, test)
    assert np.array_equal(dense(again_pool), dense(x_pool)) and np.array_equal(dense(again_test), dense(x_test))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_nothing_is_fitted_on_the_test_rows(name: str, configs: dict) -> None:
    """Other test rows change neither the pool's features nor a test row's own."""
    cfg, domain = configs[name]
    make = rows_maker(name, cfg)
    pool, test, other_test = make(24, seed=0), make(10, seed=1), make(16, seed=2)
    x_pool, x_test = domain.baseline_features(cfg, pool, test)
    other_pool, x_other = domain.baseline_features(cfg, pool, other_test)
    assert np.array_equal(dense(x_pool), dense(other_pool))
    assert x_other.shape[1] == x_test.shape[1]
    _, x_mixed = domain.baseline_features(cfg, pool, [other_test[0], test[3]])
    assert np.allclose(dense(x_mixed), dense(x_other[[0]]).tolist() + dense(x_test[[3]]).tolist(), atol=1e-6)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_no_label_is_read(name: str, configs: dict) -> None:
    cfg, domain = configs[name]
    make = rows_maker(name, cfg)
    pool, test = make(24, seed=0), make(10, seed=1)
    with_labels = domain.baseline_features(cfg, pool, test)
    unlabeled = [[{k: v for k, v in row.items() if k != "label"} for row in rows] for rows in (pool, test)]
    without_labels = domain.baseline_features(cfg, *unlabeled)
    for a, b in zip(with_labels, without_labels):
        assert np.array_equal(dense(a), dense(b))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_logistic_regression_on_the_features_separates_an_easy_two_class_set(name: str, configs: dict) -> None:
    cfg, domain = configs[name]
    make = rows_maker(name, cfg)
    pool, test = make(40, seed=0), make(30, seed=1)
    x_pool, x_test = domain.baseline_features(cfg, pool, test)
    assert probe_accuracy(x_pool, pool, x_test, test) >= 0.9  # chance: 0.5


@pytest.mark.parametrize("name", list(BLOCKS))
def test_an_empty_pool_is_one_clear_error(name: str, configs: dict) -> None:
    cfg, domain = configs[name]
    with pytest.raises(PipelineError, match="pool"):
        domain.baseline_features(cfg, [], rows_maker(name, cfg)(4, seed=1))


# --- per-domain behaviour --------------------------------------------------------------------------

def test_legal_a_word_only_in_the_test_rows_gets_no_column(configs: dict) -> None:
    cfg, domain = configs["legal"]
    pool, test = legal_rows(24, seed=0), legal_rows(4, seed=1)
    novel = [{**row, "text": row["text"] + " zyxwvut qwertyuiop zyxwvut"} for row in test]
    x_pool, x_test = domain.baseline_features(cfg, pool, test)
    novel_pool, x_novel = domain.baseline_features(cfg, pool, novel)
    assert x_novel.shape == x_test.shape and (novel_pool != x_pool).nnz == 0
    assert (x_novel != x_test).nnz == 0  # the unseen words (and pairs) are dropped, nothing else changes


def test_legal_reads_whole_texts_past_max_length(configs: dict) -> None:
    """Two texts that differ only after thousands of words (max_length is 16 tokens) differ."""
    cfg, domain = configs["legal"]
    long_start = " ".join(FILLER * 300)
    pool = legal_rows(24, seed=0) + [{"text": f"{long_start} {w} {w}"} for w in ("copyleft", "indemnify")]
    _, x_test = domain.baseline_features(cfg, pool, [{"text": f"{long_start} copyleft"},
                                                     {"text": f"{long_start} indemnify"}])
    assert (x_test[0] != x_test[1]).nnz > 0


def test_legal_a_tiny_pool_keeps_words_seen_once(configs: dict) -> None:
    """Three texts sharing no word: min_df=2 would leave no vocabulary at all."""
    cfg, domain = configs["legal"]
    pool = [{"text": "alpha beta"}, {"text": "gamma delta"}, {"text": "epsilon zeta"}]
    x_pool, x_test = domain.baseline_features(cfg, pool, [{"text": "gamma delta eta"}])
    assert x_pool.shape == (3, 9)  # 6 words + 3 word pairs
    assert x_test.nnz == 3  # gamma, delta, "gamma delta"


def test_histo_texture_alone_separates_tiles_of_one_colour(configs: dict) -> None:
    """Same mean colour and stain, different texture: fine-grained noise vs smooth blobs."""
    from scipy.ndimage import gaussian_filter

    cfg, domain = configs["histo"]

    def rows(n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        out = []
        for index in range(n):
            noise = rng.normal(0, 1, (32, 32, 1))
            if index % 2:
                noise = gaussian_filter(noise, sigma=(3, 3, 0))
                noise /= noise.std()
            pixels = np.clip(np.array(STAINS[0]) + 30 * noise, 0, 255).astype(np.uint8)
            out.append({"pixels": [pixels.tobytes()], "label": str(index % 2)})
        return out

    pool, test = rows(40, seed=0), rows(30, seed=1)
    x_pool, x_test = domain.baseline_features(cfg, pool, test)
    assert probe_accuracy(x_pool, pool, x_test, test) >= 0.9  # chance: 0.5


def test_histo_a_slide_bag_is_the_mean_of_its_tiles(configs: dict) -> None:
    """labeled_unit: slide rows hold several tiles; their features are the tiles' mean."""
    from skimage.data import immunohistochemistry

    cfg, domain = configs["histo"]
    image = immunohistochemistry()
    tiles = [image[y:y + 32, x:x + 32].tobytes() for y, x in ((40, 20), (200, 300), (350, 120))]
    pool = [{"pixels": [image[y:y + 32, x:x + 32].tobytes() for x in (0, 64, 128)]} for y in range(0, 480, 40)]
    _, singles = domain.baseline_features(cfg, pool, [{"pixels": [tile]} for tile in tiles])
    _, bag = domain.baseline_features(cfg, pool, [{"pixels": tiles}, {"pixels": tiles[:1] * 2}])
    assert np.allclose(bag[0], singles.mean(axis=0), atol=1e-5)
    assert np.allclose(bag[1], singles[0], atol=1e-6)
    assert not np.allclose(singles[0], singles[1])


def test_medical_an_empty_foreground_still_gives_finite_features(configs: dict) -> None:
    cfg, domain = configs["medical"]
    blank = np.zeros((16, 16, 16), dtype=np.float16)
    _, x_test = domain.baseline_features(cfg, medical_rows(12, seed=0),
                                         [{"image": blank.tobytes(), "shape": [16, 16, 16]}])
    assert x_test.shape[0] == 1 and np.isfinite(x_test).all()


def test_medical_a_cube_that_does_not_match_its_shape_is_one_clear_error(configs: dict) -> None:
    cfg, domain = configs["medical"]
    broken = {"image": np.zeros(100, dtype=np.float16).tobytes(), "shape": [16, 16, 16]}
    with pytest.raises(PipelineError, match="re-run preprocess"):
        domain.baseline_features(cfg, medical_rows(6, seed=0), [broken])


def test_audio_waveform_and_log_mel_rows_give_the_same_statistics(configs: dict) -> None:
    """A waveform row is turned into the log-mel frames a log_mel shard would hold."""
    mel_cfg, domain = configs["audio"]
    wave_cfg, _ = configs["audio_waveform"]
    mel_spec = InputSpec.from_config(mel_cfg.ingest, mel_cfg.preprocess)
    rng = np.random.default_rng(0)
    clips = [tone(rng, index % 2) for index in range(12)]
    as_mel = [encode_row(model_input(clip, mel_spec)) for clip in clips]
    as_wave = [encode_row(clip.reshape(-1, 1)) for clip in clips]
    mel_pool, _ = domain.baseline_features(mel_cfg, as_mel, [])
    wave_pool, _ = domain.baseline_features(wave_cfg, as_wave, [])
    assert mel_pool.shape == wave_pool.shape
    # float16 storage of the log-mel frames is the only difference
    assert np.corrcoef(mel_pool.ravel(), wave_pool.ravel())[0, 1] > 0.99
