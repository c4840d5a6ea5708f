"""The text encoder: a BERT-style transformers model whose document embedding pools its
windows, the `bert` backbone that builds it for pretraining, and the encoders fine-tuning loads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import check_pretrained_loading
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder
from ssl_models.legal_text.vocab import initialise_added_embeddings

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()  # loading a small checkpoint takes milliseconds

CHARS_PER_TOKEN = 12


def resolve_checkpoint(cfg: DomainConfig) -> Path:
    """The Hugging Face checkpoint `model.base_checkpoint` on disk: a folder (relative to the
    project root), or `package:<importable module>/<subdir>` for weights shipped in a package."""
    reference = cfg.model.base_checkpoint
    if reference.startswith("package:"):
        module, _, subdir = reference[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise PipelineError(f"checkpoint {reference!r} (params.yaml domains.{cfg.name}): package {module!r} "
                                "is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / subdir
    else:
        path = cfg.resolve(reference)
    if not (path / "config.json").exists():
        raise PipelineError(f"checkpoint {reference!r} (params.yaml domains.{cfg.name}): no Hugging Face "
                            f"model folder (config.json) at {path}")
    return path


@dataclass(frozen=True)
class Pooling:
    """How a window's token features become its embedding: `mean` over the attention mask or
    the `cls` token, then L2-`normalize`d or not. Read from a checkpoint's sentence-transformers
    files (`modules.json`, `1_Pooling/config.json`), so a published sentence encoder such as
    all-MiniLM-L6-v2 embeds as it was trained to (mean pooling, then normalised); a plain
    Hugging Face folder pools by the mean."""

    mode: Literal["mean", "cls"] = "mean"
    normalize: bool = False

    @classmethod
    def read(cls, folder: Path) -> Pooling:
        modules_file = folder / "modules.json"
        if not modules_file.exists():
            return cls()
        modules = json.loads(modules_file.read_text())
        kinds = {entry["type"].rsplit(".", 1)[-1]: entry for entry in modules}
        mode = "mean"
        if "Pooling" in kinds:
            options = json.loads((folder / kinds["Pooling"]["path"] / "config.json").read_text())
            chosen = [key for key, on in options.items() if key.startswith("pooling_mode_") and on is True]
            modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
            if len(chosen) != 1 or chosen[0] not in modes:
                raise PipelineError(f"checkpoint {folder}: sentence-transformers pooling {chosen} is not supported "
                                    "(supported: one of mean tokens, cls token)")
            mode = modes[chosen[0]]
        return cls(mode, "Normalize" in kinds)

    def write(self, folder: Path, dim: int) -> None:
        """sentence-transformers' description of this pooling, so `SentenceTransformer(folder)`
        embeds as this encoder does (nothing written for plain mean pooling, its default)."""
        if self == Pooling():
            return
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": dim, "pooling_mode_mean_tokens": self.mode == "mean",
             "pooling_mode_cls_token": self.mode == "cls"}, indent=2))

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = mean_pool(hidden, attention_mask) if self.mode == "mean" else hidden[:, 0]
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


# What an exported folder's card gives to embed documents as the pipeline does (TextEncoder's
# collate and forward, with transformers and torch alone); `FOLDER` is the export's path. A
# document within `max_length` tokens is plain mean (or CLS) pooling, what sentence-transformers
# does with the folder's pooling files.
EXPORT_SNIPPET = '''import json, torch
from transformers import AutoModel, AutoTokenizer

settings = json.load(open(f"{FOLDER}/embedding.json"))
tokenizer = AutoTokenizer.from_pretrained(FOLDER)
model = AutoModel.from_pretrained(FOLDER).eval()

@torch.no_grad()
def embed(texts):
    """One embedding per text: its windows of max_length tokens (at most max_document_tokens in
    all) pooled each, then averaged with weights proportional to their tokens."""
    length, budget = settings["max_length"], settings["max_document_tokens"]
    texts = [t[: budget * settings["chars_per_token"]] for t in texts]
    enc = tokenizer(texts, truncation=True, max_length=length, padding=True,
                    return_overflowing_tokens=True, return_tensors="pt")
    doc, mask = enc["overflow_to_sample_mapping"], enc["attention_mask"]
    _, counts = doc.unique_consecutive(return_counts=True)
    keep = torch.arange(len(doc)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts) < max(1, budget // length)
    doc, mask = doc[keep], mask[keep]
    hidden = model(input_ids=enc["input_ids"][keep], attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0) if settings["pooling"] == "mean" else hidden[:, 0]
    if settings["normalize"]:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    weights = torch.zeros(len(texts), len(doc))
    weights[doc, torch.arange(len(doc))] = mask.sum(1).float()
    return (weights / weights.sum(1, keepdim=True).clamp(min=1.0)) @ pooled
'''


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


WINDOW_CACHE_TEXTS = 8192  # texts whose windows an encoder keeps (emptied when full): ~8 MB


class WindowCache(dict):
    """A text's digest -> its token windows. Shared by an encoder's copies (fine-tuning trains a deep copy):
    the windows depend on the tokenizer and lengths only, which a copy keeps."""

    def __deepcopy__(self, memo: dict[int, Any]) -> WindowCache:
        return self


class TextEncoder(Encoder):
    """A transformers base model whose document embedding pools its windows.

    A labeled text longer than `max_length` tokens is cut into windows of `max_length` tokens
    (each with the tokenizer's [CLS]/[SEP]), as many whole windows as `max_document_tokens`
    holds; every window of a batch goes through the model in one forward, each is pooled
    (`pooling`), and a document's embedding is the mean of its windows weighted by their tokens
    (with mean pooling: the mean over all the document's tokens), so fine-tuning's gradients
    reach every window. `max_document_tokens == max_length` keeps one window: the text cut at
    `max_length` tokens, as before windows.

    `masked_lm_head` is the MLM head of the masked LM the encoder was cut from, for the method
    that pretrains it; it is not part of the encoder (neither saved with it nor in its
    parameters), and None for encoders loaded to fine-tune."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 masked_lm_head: nn.Module | None = None, max_document_tokens: int | None = None,
                 pooling: Pooling = Pooling()) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_document_tokens = max(max_document_tokens or max_length, max_length)
        self.pooling = pooling
        self.dim = int(model.config.hidden_size)
        self.__dict__["masked_lm_head"] = masked_lm_head  # in __dict__: not registered as a submodule
        # whole windows only: `max_document_tokens` is a budget, not a length to fill
        self.windows_per_document = max(1, self.max_document_tokens // max_length)
        self.window_cache = WindowCache()
        # whether the weights are a base checkpoint's, pretraining continuing from them (build_bert
        # sets it): what self-distillation's frozen teacher is
        self.continues_checkpoint = False

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` of every window of the batch [windows, length], and
        `window_weights` [documents, windows]: the share of each document's tokens in each window."""
        # A fast tokenizer tokenizes the whole text before truncating; licenses and contracts
        # run to 100k characters, so cut first (no token spans more than CHARS_PER_TOKEN chars
        # on average in any vocabulary we ship).
        texts = [s["text"][: self.max_document_tokens * CHARS_PER_TOKEN] for s in samples]
        windows = self._windows(texts)
        document = torch.tensor([index for index, kept in enumerate(windows) for _ in kept], dtype=torch.long)
        ids = [window for kept in windows for window in kept]
        # padded to the batch's longest window, on the tokenizer's side: what padding=True gives
        length, pad = max(len(window) for window in ids), self.tokenizer.pad_token_id or 0
        left = self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, window in enumerate(ids):
            where = slice(length - len(window), length) if left else slice(0, len(window))
            input_ids[row, where] = torch.from_numpy(window)
            attention_mask[row, where] = 1
        weights = torch.zeros(len(samples), len(document))
        weights[document, torch.arange(len(document))] = attention_mask.sum(1).float()
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "window_weights": weights / weights.sum(1, keepdim=True).clamp(min=1.0)}

    def _windows(self, texts: list[str]) -> list[list[np.ndarray]]:
        """Each text's kept windows of token ids, [CLS]/[SEP] included (the tokenizer's overflow cuts
        a text into windows of max_length). A text is tokenized once while it stays in the cache:
        fine-tuning passes over the same texts epoch after epoch, and every probe embeds them again
        (tokenizing was ~8% of the legal fine-tuning stage). The cache holds at most
        WINDOW_CACHE_TEXTS texts (by digest, ids as int32: ~1 KB a text), so a stream of new texts
        (`embed` on a large folder) keeps memory flat."""
        keys = [hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest() for text in texts]
        missing = {key: text for key, text in zip(keys, texts) if key not in self.window_cache}
        if missing and len(self.window_cache) + len(missing) > WINDOW_CACHE_TEXTS:
            self.window_cache.clear()  # full: start again, with every text of this batch to tokenize
            missing = dict(zip(keys, texts))
        if missing:
            encoded = self.tokenizer(list(missing.values()), truncation=True, max_length=self.max_length,
                                     return_overflowing_tokens=True)
            per_text: list[list[np.ndarray]] = [[] for _ in missing]
            for window, index in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"]):
                if len(per_text[index]) < self.windows_per_document:  # whole windows within the budget
                    per_text[index].append(np.asarray(window, dtype=np.int32))
            self.window_cache.update(zip(missing, per_text))
        found = [self.window_cache[key] for key in keys]
        if len(self.window_cache) > WINDOW_CACHE_TEXTS:  # one batch larger than the cache: not kept
            self.window_cache.clear()
        return found

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        windows = self.pooling(hidden, batch["attention_mask"])
        # in float32 whatever the autocast: bf16 would round the token shares; a document of one
        # window gets its window's embedding exactly (a weight of 1, zeros elsewhere)
        with torch.autocast(windows.device.type, enabled=False):
            return batch["window_weights"].float() @ windows.float()

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token features [batch, length, dim] of packed blocks (no padding, so no attention mask)."""
        return self.model(input_ids=input_ids).last_hidden_state

    def save(self, out_dir: Path) -> None:
        """A folder that `AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained` read (and
        `sentence_transformers.SentenceTransformer`, pooling included)."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        _drop_loading_options(out_dir / "tokenizer_config.json")
        self.pooling.write(out_dir, self.dim)


# how the tokenizer was loaded, not what it is: transformers writes these loading kwargs into
# tokenizer_config.json (`local_files_only` from HF_HUB_OFFLINE), so the same weights would
# give other bytes in a process with other environment variables
LOADING_OPTIONS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "revision")


def _drop_loading_options(config_file: Path) -> None:
    if not config_file.exists():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if any(key in config for key in LOADING_OPTIONS):
        for key in LOADING_OPTIONS:
            config.pop(key, None)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                               encoding="utf-8")


def build_bert(cfg: DomainConfig, shards_dir: Path) -> TextEncoder:
    """Backbone `bert`: `model.base_checkpoint`'s masked LM, or a BERT from scratch sized by
    the model section, cut into the encoder and its MLM head (the output projection stays
    tied to the input embeddings, as in BERT)."""
    tokenizer = AutoTokenizer.from_pretrained(shards_dir / "tokenizer")
    model_cfg = cfg.model
    pooling = Pooling()
    if model_cfg.base_checkpoint:
        checkpoint = resolve_checkpoint(cfg)
        # float32 master weights whatever dtype the checkpoint was published in (autocast does bf16)
        masked_lm, loading = AutoModelForMaskedLM.from_pretrained(
            checkpoint, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
        # strict on the encoder; a sentence encoder's checkpoint (MiniLM) has no MLM head: it starts new
        check_pretrained_loading(masked_lm, loading, checkpoint, f"a {type(masked_lm).__name__} of its config.json",
                                 "give a Hugging Face folder whose weights match its config.json")
        pooling = Pooling.read(checkpoint)  # a sentence encoder's pooling, kept through continued pretraining
        # the words preprocess.extend_vocabulary added: new rows, each the mean of its pieces'
        initialise_added_embeddings(masked_lm, tokenizer, AutoTokenizer.from_pretrained(checkpoint))
        if masked_lm.config.vocab_size < len(tokenizer):
            raise PipelineError("the base checkpoint's vocabulary is smaller than the tokenizer's; with "
                                "model.base_checkpoint set, use preprocess.tokenizer: base")
    else:
        masked_lm = BertForMaskedLM(BertConfig(
            vocab_size=len(tokenizer), hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads, intermediate_size=model_cfg.intermediate_size,
            max_position_embeddings=max(512, model_cfg.max_length, cfg.preprocess.block_size),
            hidden_dropout_prob=model_cfg.dropout, attention_probs_dropout_prob=model_cfg.dropout,
            pad_token_id=tokenizer.pad_token_id))
    heads = [module for name, module in masked_lm.named_children() if name != masked_lm.base_model_prefix]
    if len(heads) != 1:
        raise PipelineError(f"backbone bert needs a BERT-style masked LM (a base model and one MLM head); "
                            f"the base checkpoint is a {type(masked_lm).__name__}")
    encoder = TextEncoder(masked_lm.base_model, tokenizer, model_cfg.max_length, masked_lm_head=heads[0],
                          max_document_tokens=model_cfg.max_document_tokens, pooling=pooling)
    encoder.continues_checkpoint = bool(model_cfg.base_checkpoint)
    return encoder


def load_text_encoder(source: Path, cfg: DomainConfig, weights: bool = True, strict: bool = False) -> TextEncoder:
    """The encoder in the Hugging Face folder `source` with its own tokenizer and pooling: its
    weights, or without `weights` its architecture randomly initialised (from the global generator).
    `strict`: every weight of the model from the folder, none left over (an export holds them all;
    a pretrained encoder lacks BERT's pooler, which MLM does not train)."""
    config = AutoConfig.from_pretrained(source)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and cfg.model.max_length > positions:
        raise PipelineError(f"params.yaml domains.{cfg.name}.model.max_length {cfg.model.max_length} is beyond "
                            f"the {positions} positions of the checkpoint at {source}: lower it")
    if not weights:
        model = AutoModel.from_config(config)
    else:  # float32 master weights to fine-tune
        model, loading = AutoModel.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
        if strict:
            from ssl_models.core.domain import require_exact_load

            require_exact_load(source, loading["missing_keys"], loading["unexpected_keys"])
    return TextEncoder(model, AutoTokenizer.from_pretrained(source), cfg.model.max_length,
                       max_document_tokens=cfg.model.max_document_tokens, pooling=Pooling.read(source))
