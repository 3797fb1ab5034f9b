"""Recipes: one TOML file per model, read into validated dataclasses.

A recipe is a name shipped in `tinylm/recipes/` or a path to the user's own TOML file. `--set section.key=value`
overrides any field. Every problem (unknown key, wrong type, impossible shape) raises TinylmError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

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
        _require(math.isfinite(self.temperature) and self.temperature >= 0,
                 f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        _require(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        _require(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

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
_HUB_NAME = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.+-]*")
TOP_LEVEL_KEYS = ("name", "source", "notes")


def recipe_names() -> list[str]:
    folder = resources.files("tinylm") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def recipe_text(name_or_path: str) -> str:
    """The TOML text of a shipped recipe name or a path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if path.is_dir():
            raise TinylmError(f"recipe {name_or_path} is a directory: give a recipe name or a .toml file")
        if not path.is_file():
            raise TinylmError(f"recipe file not found: {name_or_path}")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TinylmError(f"cannot read recipe {name_or_path}: {exc}") from None
    if name_or_path not in recipe_names():
        raise TinylmError(f"unknown recipe '{name_or_path}' (known: {', '.join(recipe_names())}; or give a .toml path)")
    return (resources.files("tinylm") / "recipes" / f"{name_or_path}.toml").read_text(encoding="utf-8")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    return recipe_from_toml(recipe_text(name_or_path), overrides, origin=name_or_path)


def recipe_from_toml(text: str, overrides: list[str] | tuple[str, ...] = (), origin: str = "recipe") -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TinylmError(f"{origin}: malformed TOML: {exc}") from None
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, origin)


def recipe_from_dict(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    recipe = Recipe()
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise TinylmError(f"{origin}: [{key}] must be a table")
            setattr(recipe, key, _fill(SECTIONS[key], value, f"{origin}: {key}"))
        elif key in TOP_LEVEL_KEYS:
            if not isinstance(value, str):
                raise TinylmError(f"{origin}: {key} must be a string")
            setattr(recipe, key, value)
        else:
            raise TinylmError(f"{origin}: unknown key {_shown(key, quoted=True)} (sections: {', '.join(SECTIONS)})")
    validate(recipe)
    return recipe


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as TOML, falling back to a plain string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise TinylmError(f"--set expects section.key=value, got '{item}'")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in SECTIONS:
        raise TinylmError(f"--set {_shown(dotted)}: unknown section {_shown(section, quoted=True)} "
                          f"(sections: {', '.join(SECTIONS)})")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    raw.setdefault(section, {})[key.strip()] = value


def differences(saved: Recipe, wanted: Recipe, sections: tuple[str, ...]) -> list[str]:
    """'section.key (saved value, now wanted value)' for each field of `sections` that differs."""
    return [f"{name}.{f.name} ({getattr(getattr(saved, name), f.name)!r} in the run, "
            f"{getattr(getattr(wanted, name), f.name)!r} now)"
            for name in sections for f in fields(SECTIONS[name])
            if getattr(getattr(saved, name), f.name) != getattr(getattr(wanted, name), f.name)]


def _shown(text: str, quoted: bool = False) -> str:
    """A name from the user's input as it can stand in a one-line message (newlines and the like escaped)."""
    if not text.isprintable():
        return repr(text)
    return f"'{text}'" if quoted else text


def _fill(cls, values: dict[str, Any], where: str):
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise TinylmError(f"{where}.{_shown(key)}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TinylmError as exc:  # a section that checks itself (sampling): name the section
        raise TinylmError(f"{where}.{exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if get_origin(hint) is list:
        (item_type,) = get_args(hint)
        if isinstance(value, str):  # --set data.paths=/path/file.gz: a list of one
            value = [value]
        if not isinstance(value, list):
            raise TinylmError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise TinylmError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TinylmError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TinylmError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TinylmError(f"{where}: expected a string, got {value!r}")
        if any("\ud800" <= ch <= "\udfff" for ch in value):  # undecodable bytes on a command line
            raise TinylmError(f"{where}: not valid text (it holds bytes that are not UTF-8)")
        return value
    raise AssertionError(f"unhandled type {hint} at {where}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TinylmError(message)


def _choice(value: str, options: tuple[str, ...], where: str) -> None:
    _require(value in options, f"{where} must be one of {', '.join(options)}, got '{value}'")


def validate(recipe: Recipe) -> None:
    """Reject impossible configurations once, at the edge, with the field named."""
    m, t, d, tr = recipe.model, recipe.tokenizer, recipe.data, recipe.train
    _choice(m.arch, ("llama", "mixer"), "model.arch")
    for name in ("n_layers", "dim", "n_heads", "context_length", "vocab_size", "multiple_of", "hyper_dim"):
        _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    for name in ("hidden_dim", "n_kv_heads", "head_dim"):
        _require(getattr(m, name) >= 0, f"model.{name} must be >= 0, got {getattr(m, name)}")
    _choice(m.unembedding, ("tied", "untied", "pinv"), "model.unembedding")
    _choice(m.rope_scaling, ("none", "linear", "ntk"), "model.rope_scaling")
    _choice(m.embedding_rotary, ("quirk", "standard", "none"), "model.embedding_rotary")
    _require(m.rope_theta > 0, f"model.rope_theta must be positive, got {m.rope_theta}")
    _require(m.rope_scaling_factor >= 1.0, f"model.rope_scaling_factor must be >= 1, got {m.rope_scaling_factor}")
    _require(m.norm_eps > 0, f"model.norm_eps must be positive, got {m.norm_eps}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.arch == "llama":
        if not m.head_dim:
            _require(m.dim % m.n_heads == 0, f"model.n_heads ({m.n_heads}) must divide model.dim ({m.dim}) "
                     "or model.head_dim must be set")
        _require(m.resolved_head_dim() % 2 == 0, f"model head_dim must be even for RoPE, got {m.resolved_head_dim()}")
        _require(m.n_heads % m.resolved_kv_heads() == 0,
                 f"model.n_kv_heads ({m.resolved_kv_heads()}) must divide model.n_heads ({m.n_heads})")
    else:
        _require(m.dim % 2 == 0, f"model.dim must be even for the mixer's rotary transform, got {m.dim}")
        _require(m.unembedding == "tied", "model.unembedding: MicroMixer's head is tied to its embedding")
        _require(not m.zero_init_projections, "model.zero_init_projections is for LLaMA-style models")

    _choice(t.kind, ("bytes", "bpe", "chars", "gpt2"), "tokenizer.kind")
    _require(t.vocab_size > 0, f"tokenizer.vocab_size must be positive, got {t.vocab_size}")
    _require(t.train_stories >= 0, f"tokenizer.train_stories must be >= 0, got {t.train_stories}")
    _require(len(set(t.special_tokens)) == len(t.special_tokens), "tokenizer.special_tokens has duplicates")
    for role in ("bos", "eos", "sink"):
        token = getattr(t, role)
        _require(not token or token in t.special_tokens,
                 f"tokenizer.{role} '{token}' must be one of tokenizer.special_tokens")
    _require(t.vocab_size <= m.vocab_size,
             f"tokenizer.vocab_size ({t.vocab_size}) exceeds model.vocab_size ({m.vocab_size})")
    _require(d.paths or d.hub_dataset, "data.paths is empty and data.hub_dataset is not set")
    _require(d.max_stories >= 0, f"data.max_stories must be >= 0, got {d.max_stories}")
    _require(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _choice(d.framing, ("bos", "eos", "sink_bos", "none"), "data.framing")
    if d.framing in ("bos", "sink_bos"):
        _require(bool(t.bos), f"data.framing '{d.framing}' needs tokenizer.bos")
    if d.framing == "sink_bos":
        _require(bool(t.sink), "data.framing 'sink_bos' needs tokenizer.sink")
    if d.framing == "eos":
        _require(bool(t.eos), "data.framing 'eos' needs tokenizer.eos")

    _validate_train(tr)
    _validate_session(recipe)


def _validate_train(tr: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval", "eval_batches",
                 "checkpoint_interval", "keep_last"):
        _require(getattr(tr, name) > 0, f"train.{name} must be positive, got {getattr(tr, name)}")
    _require(tr.lr > 0, f"train.lr must be positive, got {tr.lr}")
    _require(0 <= tr.min_lr <= tr.lr, f"train.min_lr must be in [0, train.lr], got {tr.min_lr}")
    _require(tr.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {tr.warmup_steps}")
    _choice(tr.schedule, ("cosine", "wsd", "onecycle", "constant"), "train.schedule")
    _require(0 < tr.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {tr.decay_fraction}")
    _choice(tr.optimizer, ("adamw", "muon"), "train.optimizer")
    for name in ("embedding_lr", "head_lr", "matrix_lr"):
        _require(getattr(tr, name) >= 0, f"train.{name} must be >= 0 (0 = train.lr), got {getattr(tr, name)}")
    _require(0 <= tr.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {tr.muon_momentum}")
    _require(tr.weight_decay >= 0, f"train.weight_decay must be >= 0, got {tr.weight_decay}")
    _require(0 <= tr.beta1 < 1 and 0 <= tr.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    _require(tr.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {tr.grad_clip}")
    _choice(tr.device, ("auto", "cpu", "cuda"), "train.device")
    _choice(tr.dtype, ("auto", "float32", "bfloat16"), "train.dtype")


def _validate_session(recipe: Recipe) -> None:  # a run's time budget, where it reports, what its card tells the hub
    _require(recipe.train.max_minutes >= 0, f"train.max_minutes must be >= 0, got {recipe.train.max_minutes}")
    for name in recipe.train.report_to:
        _choice(name, ("tensorboard", "wandb", "trackio"), "train.report_to")
    for key, names in (("license", [recipe.card.license]), ("datasets", recipe.card.datasets)):
        _require(all(_HUB_NAME.fullmatch(n) for n in names), f"card.{key} takes hub ids, got {names}")


def recipe_to_toml(recipe: Recipe) -> str:
    """Serialise a resolved recipe (written into each run directory as recipe.toml)."""
    lines = [f"{key} = {_toml_value(getattr(recipe, key))}" for key in TOP_LEVEL_KEYS]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key, value in dataclasses.asdict(getattr(recipe, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    escaped = "".join(ch if ch.isprintable() or ch in "\\" else _toml_escape(ord(ch)) for ch in escaped)
    return f'"{escaped}"'


def _toml_escape(code: int) -> str:
    """\\uXXXX holds four hex digits; a character beyond U+FFFF needs \\UXXXXXXXX."""
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
