"""Learning-rate schedules and the optimizers a recipe asks for: llama2.c's parameter groups, Muon's groups and rates,
and the shape-batched Muon against torch's."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tinylm.models import build_model
from tinylm.recipe import TrainConfig, load_recipe
from tinylm.train.optimizer import ShapeBatchedMuon, build_optimizer
from tinylm.train.schedule import learning_rate


# ------------------------------------------------------------------------------------------------------ schedules
def test_cosine_schedule_at_key_steps():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, schedule="cosine")
    assert learning_rate(0, t) == pytest.approx(1e-4)  # 1/10 of the way up: update 0 already moves
    assert learning_rate(4, t) == pytest.approx(5e-4)
    assert learning_rate(9, t) == pytest.approx(1e-3)  # peak reached at the end of warmup
    assert learning_rate(10, t) == pytest.approx(1e-3)
    assert learning_rate(60, t) == pytest.approx(5.5e-4)  # half way down: (lr + min_lr) / 2
    assert learning_rate(35, t) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert learning_rate(110, t) == pytest.approx(1e-4)
    assert learning_rate(500, t) == pytest.approx(1e-4)


def test_wsd_schedule_warms_up_holds_then_falls_linearly():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.5)
    assert learning_rate(0, t) == pytest.approx(1e-4)
    assert learning_rate(9, t) == learning_rate(10, t) == learning_rate(54, t) == pytest.approx(1e-3)
    assert learning_rate(55, t) == pytest.approx(1e-3)  # the decay starts at update 110 - 55
    assert learning_rate(60, t) == pytest.approx(1e-3 - 0.9e-3 * 5 / 55)
    assert learning_rate(109, t) == pytest.approx(1e-4 + 0.9e-3 / 55)
    assert learning_rate(110, t) == learning_rate(400, t) == pytest.approx(1e-4)
    rates = [learning_rate(s, t) for s in range(55, 111)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))


def test_constant_schedule():
    t = TrainConfig(lr=2e-3, warmup_steps=4, max_steps=50, schedule="constant")
    assert [learning_rate(s, t) for s in (0, 1, 3, 4, 49)] == pytest.approx([5e-4, 1e-3, 2e-3, 2e-3, 2e-3])


@pytest.mark.parametrize("warmup,min_lr", [(30, 0.0), (2, 0.0), (0, 0.0), (25, 1e-5)])
def test_onecycle_matches_torch(warmup, min_lr):
    total, lr = 100, 5e-4
    t = TrainConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, max_steps=total, schedule="onecycle")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    final_div = 1e4 if min_lr == 0 else lr / 25 / min_lr
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=warmup / total,
                                                cycle_momentum=False, final_div_factor=final_div)
    for step in range(total):
        assert learning_rate(step, t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step() if step < total - 1 else None


def test_onecycle_with_a_one_step_rise_starts_at_the_peak():
    # torch divides by zero here; we start at the peak and anneal from there
    t = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=11, schedule="onecycle")
    assert learning_rate(0, t) == 1e-3 and learning_rate(10, t) == pytest.approx(1e-3 / 25 / 1e4)


# ------------------------------------------------------------------------------------------------- optimizer
def test_parameter_groups_like_llama2c(capsys):
    recipe = load_recipe("simpler-llama-834k")
    optimizer = build_optimizer(build_model(recipe.model), recipe.train)
    out = capsys.readouterr().out
    assert "num decayed parameter tensors: 29, with 832,128 parameters" in out  # simpler-llama's published split
    assert "num non-decayed parameter tensors: 13, with 2,516 parameters" in out
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["betas"] == (0.9, 0.99)


def test_muon_takes_the_hidden_matrices_and_each_role_keeps_its_rate(capsys):
    recipe = load_recipe("llama2c-260k", ['model.unembedding="untied"', "train.optimizer=muon", "train.lr=1e-3",
                                          "train.embedding_lr=5e-3", "train.head_lr=2e-4", "train.matrix_lr=3e-3"])
    model = build_model(recipe.model)
    optimizer = build_optimizer(model, recipe.train)
    out = capsys.readouterr().out  # llama2.c's lines stay; Muon's line follows them
    assert "num decayed parameter tensors: 37" in out  # 7 matrices in each of 5 blocks, the embedding, the head
    assert "muon for 35 hidden matrices" in out
    muon = optimizer.parts["muon"]
    assert isinstance(muon, torch.optim.Muon) and isinstance(optimizer.parts["adamw"], torch.optim.AdamW)
    hidden = {id(p) for layer in model.layers for p in layer.parameters() if p.dim() == 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == hidden
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert rate[id(model.tok_embeddings.weight)] == (5e-3, 0.1)
    assert rate[id(model.output.weight)] == (2e-4, 0.1)
    assert rate[id(model.layers[0].attention.wq.weight)] == (3e-3, 0.1)
    assert rate[id(model.norm.weight)] == (1e-3, 0.0)
    assert len(rate) == len(list(model.parameters()))
    optimizer.set_lr_scale(0.5)
    assert {g["lr"] for g in optimizer.param_groups} == {2.5e-3, 1e-4, 1.5e-3, 5e-4}


def test_shape_batched_muon_updates_bitwise_as_torch_muon():
    """Muon's Newton-Schulz products batched by shape change nothing: after a few steps the weights are
    torch.optim.Muon's bit for bit (square, tall and wide matrices), and the state loads into torch's optimizer."""
    recipe = load_recipe("tinystories-demo", ["model.n_layers=2"])
    torch.manual_seed(0)
    ours_model = build_model(recipe.model)
    torch_model, start = copy.deepcopy(ours_model), copy.deepcopy(ours_model)

    def hidden(model):
        return [p for layer in model.layers for p in layer.parameters() if p.dim() == 2]

    settings = {"lr": 6e-3, "weight_decay": 0.1, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"}
    ours = ShapeBatchedMuon(hidden(ours_model), **settings)
    reference = torch.optim.Muon(hidden(torch_model), **settings)
    ids = torch.randint(0, recipe.model.vocab_size, (2, 32))
    for _ in range(3):
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            optimizer.zero_grad()
            model(ids, ids)[1].backward()
            optimizer.step()
    assert {p.shape[0] > p.shape[1] for p in hidden(ours_model)} == {True, False}
    assert all(torch.equal(a, b) for a, b in zip(hidden(ours_model), hidden(torch_model), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(hidden(ours_model), hidden(start), strict=True))  # it trained
    reference.load_state_dict(ours.state_dict())
