"""A recipe's sections as dataclasses: what each field means and its default."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from tinylm.errors import TinylmError


@dataclass
class ModelConfig:
    arch: str = "llama"  # "llama" (LLaMA-style decoder) or "mixer" (MicroMixer)
    n_layers: int = 4
    dim: int = 128  # residual width (MicroMixer: H)
    hidden_dim: int = 0  # SwiGLU width (MicroMixer: channel-MLP width C); 0 = llama2.c's rule from multiple_of
    multiple_of: int = 32
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (multi-head attention)
    head_dim: int = 0  # 0 = dim // n_heads
    context_length: int = 256
    vocab_size: int = 4096  # room for the default tokenizer's ids
    unembedding: str = "tied"  # "tied", "untied" or "pinv" (logits = h @ pinv(E), simpler-llama)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "none", "linear" or "ntk" (context extension)
    rope_scaling_factor: float = 1.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    w1_bias: bool = False  # a bias on the SwiGLU gate (simpler-llama)
    zero_init_projections: bool = False  # LLaMA: each block's output projections (wo, w2) start at zero
    hyper_dim: int = 64  # MicroMixer hypernetwork width
    embedding_rotary: str = "quirk"  # MicroMixer position transform: "quirk" (the original's), "standard" or "none"

    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_hidden_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        # llama2.c: hidden = multiple_of * ceil(int(2 * 4 * dim / 3) / multiple_of)
        return self.multiple_of * math.ceil(int(2 * 4 * self.dim / 3) / self.multiple_of)


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bytes", "bpe", "chars" or "gpt2"
    vocab_size: int = 4096  # including special tokens
    special_tokens: list[str] = field(default_factory=lambda: ["<s>", "</s>"])
    bos: str = "<s>"  # "" = no BOS
    eos: str = "</s>"  # "" = no EOS
    sink: str = ""  # attention-sink token placed before BOS (Aurelius-10M: "<sink>")
    suffix_space: bool = False  # a word carries its trailing space ("once ", "upon ")
    trailing_space_normalizer: bool = False  # every text ends in exactly one space
    ranks_path: str = ""  # GPT-2 ranks file; "" = ../shared/data/gpt2/gpt2.tiktoken or $TINYLM_GPT2_RANKS
    unknown: str = "<unk>"  # character vocabularies: the symbol for characters outside the vocabulary
    train_stories: int = 0  # bpe/chars learn from a seeded sample of this many training stories; 0 = all of them


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=lambda: ["../shared/data/tinystories/*.txt.gz"])
    hub_dataset: str = ""  # e.g. "roneneldan/TinyStories"; used when paths is empty
    hub_files: list[str] = field(default_factory=list)
    max_stories: int = 0  # 0 = all
    val_fraction: float = 0.05
    split_seed: int = 1337
    framing: str = "bos"  # "bos": BOS before each story; "eos": EOS after; "sink_bos": <sink> <s> at each block start;
    # "none": stories joined by a blank line (byte models with no special ids)


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (warmup + cosine to min_lr), "wsd" (warmup, stable, decay), "onecycle",
    # "constant"
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps, in which the rate falls linearly to min_lr
    optimizer: str = "adamw"  # "adamw", or "muon" (Muon for hidden matrices, AdamW for the rest)
    embedding_lr: float = 0.0  # peak rate of the token embedding (and a tied head); 0 = lr
    head_lr: float = 0.0  # peak rate of an untied output matrix; 0 = lr
    matrix_lr: float = 0.0  # peak rate of the hidden matrices (with "muon" on AdamW's scale too); 0 = lr
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 20  # batches per periodic estimate; `tinylm eval` always uses the whole split
    checkpoint_interval: int = 200
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"  # "auto", "cpu", "cuda"
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "float32", "bfloat16"
    compile: bool = False
    max_minutes: float = 0.0  # 0 = no wall-clock budget
    report_to: list[str] = field(default_factory=list)  # trackers besides metrics.jsonl: tensorboard, wandb, trackio


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen: one frozen object, checked when it is made, that recipes, the command line,
    `generate` and the server all pass around. `with_changes` gives a checked copy."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self):
        require(math.isfinite(self.temperature) and self.temperature >= 0,
                 f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        require(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def with_changes(self, **changes) -> Sampling:
        """A copy with the given settings changed (None leaves a setting as it is), checked again."""
        kept = {f.name: getattr(self, f.name) for f in fields(Sampling)}
        return Sampling(**{**kept, **{k: v for k, v in changes.items() if v is not None}})


@dataclass(frozen=True)
class SampleConfig(Sampling):
    """The recipe's [sample] section: its sampling settings and the prompts of the model card's stories."""

    prompts: list[str] = field(default_factory=lambda: ["Once upon a time", "Lily and Ben", "The little dog"])

    @property
    def settings(self) -> Sampling:
        return Sampling().with_changes(**{f.name: getattr(self, f.name) for f in fields(Sampling)})


@dataclass
class CardConfig:  # the model card's hub metadata
    license: str = "mit"  # a hub license id, e.g. mit, apache-2.0, cc-by-4.0
    datasets: list[str] = field(default_factory=lambda: ["roneneldan/TinyStories"])  # hub ids of the data's source


@dataclass
class Recipe:
    name: str = "custom"
    source: str = ""  # the published model this recipe reproduces
    notes: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    card: CardConfig = field(default_factory=CardConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "tokenizer": TokenizerConfig, "data": DataConfig, "train": TrainConfig,
            "sample": SampleConfig, "card": CardConfig}
HUB_NAME = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.+-]*")
TOP_LEVEL_KEYS = ("name", "source", "notes")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise TinylmError(message)


def require_choice(value: str, options: tuple[str, ...], where: str) -> None:
    require(value in options, f"{where} must be one of {', '.join(options)}, got '{value}'")
