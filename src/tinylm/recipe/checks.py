"""Impossible recipes refused once, at the edge, with the field named."""

from __future__ import annotations

from tinylm.recipe.sections import HUB_NAME, Recipe, TrainConfig, require, require_choice


def validate(recipe: Recipe) -> None:
    """Reject impossible configurations once, at the edge, with the field named."""
    m, t, d, tr = recipe.model, recipe.tokenizer, recipe.data, recipe.train
    require_choice(m.arch, ("llama", "mixer"), "model.arch")
    for name in ("n_layers", "dim", "n_heads", "context_length", "vocab_size", "multiple_of", "hyper_dim"):
        require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    for name in ("hidden_dim", "n_kv_heads", "head_dim"):
        require(getattr(m, name) >= 0, f"model.{name} must be >= 0, got {getattr(m, name)}")
    require_choice(m.unembedding, ("tied", "untied", "pinv"), "model.unembedding")
    require_choice(m.rope_scaling, ("none", "linear", "ntk"), "model.rope_scaling")
    require_choice(m.embedding_rotary, ("quirk", "standard", "none"), "model.embedding_rotary")
    require(m.rope_theta > 0, f"model.rope_theta must be positive, got {m.rope_theta}")
    require(m.rope_scaling_factor >= 1.0, f"model.rope_scaling_factor must be >= 1, got {m.rope_scaling_factor}")
    require(m.norm_eps > 0, f"model.norm_eps must be positive, got {m.norm_eps}")
    require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.arch == "llama":
        if not m.head_dim:
            require(m.dim % m.n_heads == 0, f"model.n_heads ({m.n_heads}) must divide model.dim ({m.dim}) "
                     "or model.head_dim must be set")
        require(m.resolved_head_dim() % 2 == 0, f"model head_dim must be even for RoPE, got {m.resolved_head_dim()}")
        require(m.n_heads % m.resolved_kv_heads() == 0,
                 f"model.n_kv_heads ({m.resolved_kv_heads()}) must divide model.n_heads ({m.n_heads})")
    else:
        require(m.dim % 2 == 0, f"model.dim must be even for the mixer's rotary transform, got {m.dim}")
        require(m.unembedding == "tied", "model.unembedding: MicroMixer's head is tied to its embedding")
        require(not m.zero_init_projections, "model.zero_init_projections is for LLaMA-style models")

    require_choice(t.kind, ("bytes", "bpe", "chars", "gpt2"), "tokenizer.kind")
    require(t.vocab_size > 0, f"tokenizer.vocab_size must be positive, got {t.vocab_size}")
    require(t.train_stories >= 0, f"tokenizer.train_stories must be >= 0, got {t.train_stories}")
    require(len(set(t.special_tokens)) == len(t.special_tokens), "tokenizer.special_tokens has duplicates")
    for role in ("bos", "eos", "sink"):
        token = getattr(t, role)
        require(not token or token in t.special_tokens,
                 f"tokenizer.{role} '{token}' must be one of tokenizer.special_tokens")
    require(t.vocab_size <= m.vocab_size,
             f"tokenizer.vocab_size ({t.vocab_size}) exceeds model.vocab_size ({m.vocab_size})")
    require(d.paths or d.hub_dataset, "data.paths is empty and data.hub_dataset is not set")
    require(d.max_stories >= 0, f"data.max_stories must be >= 0, got {d.max_stories}")
    require(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    require_choice(d.framing, ("bos", "eos", "sink_bos", "none"), "data.framing")
    if d.framing in ("bos", "sink_bos"):
        require(bool(t.bos), f"data.framing '{d.framing}' needs tokenizer.bos")
    if d.framing == "sink_bos":
        require(bool(t.sink), "data.framing 'sink_bos' needs tokenizer.sink")
    if d.framing == "eos":
        require(bool(t.eos), "data.framing 'eos' needs tokenizer.eos")

    _validate_train(tr)
    _validate_session(recipe)


def _validate_train(tr: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval", "eval_batches",
                 "checkpoint_interval", "keep_last"):
        require(getattr(tr, name) > 0, f"train.{name} must be positive, got {getattr(tr, name)}")
    require(tr.lr > 0, f"train.lr must be positive, got {tr.lr}")
    require(0 <= tr.min_lr <= tr.lr, f"train.min_lr must be in [0, train.lr], got {tr.min_lr}")
    require(tr.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {tr.warmup_steps}")
    require_choice(tr.schedule, ("cosine", "wsd", "onecycle", "constant"), "train.schedule")
    require(0 < tr.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {tr.decay_fraction}")
    require_choice(tr.optimizer, ("adamw", "muon"), "train.optimizer")
    for name in ("embedding_lr", "head_lr", "matrix_lr"):
        require(getattr(tr, name) >= 0, f"train.{name} must be >= 0 (0 = train.lr), got {getattr(tr, name)}")
    require(0 <= tr.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {tr.muon_momentum}")
    require(tr.weight_decay >= 0, f"train.weight_decay must be >= 0, got {tr.weight_decay}")
    require(0 <= tr.beta1 < 1 and 0 <= tr.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    require(tr.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {tr.grad_clip}")
    require_choice(tr.device, ("auto", "cpu", "cuda"), "train.device")
    require_choice(tr.dtype, ("auto", "float32", "bfloat16"), "train.dtype")


def _validate_session(recipe: Recipe) -> None:  # a run's time budget, where it reports, what its card tells the hub
    require(recipe.train.max_minutes >= 0, f"train.max_minutes must be >= 0, got {recipe.train.max_minutes}")
    for name in recipe.train.report_to:
        require_choice(name, ("tensorboard", "wandb", "trackio"), "train.report_to")
    for key, names in (("license", [recipe.card.license]), ("datasets", recipe.card.datasets)):
        require(all(HUB_NAME.fullmatch(n) for n in names), f"card.{key} takes hub ids, got {names}")
