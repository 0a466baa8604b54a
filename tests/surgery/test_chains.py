"""Prunable chains: found where only channel-wise steps lie between two layers, refused where
anything else reads the channels; pruning is exact for the channels kept and replays from a
recipe."""

import torch
from torch import nn
from torch.nn import functional as F

from decouple.surgery.bn_fold import fold_batchnorm_
from decouple.surgery.chains import find_chains, prune_chain_, pruned_chains
from decouple.surgery.recipe import apply_recipe_, recipe_of_model


class Inverted(nn.Module):
    """1×1 expand → BN → ReLU6 → depthwise 3×3 → ReLU6 → 1×1 project, optionally residual;
    then a pooled linear head."""

    def __init__(self, residual=False):
        super().__init__()
        self.residual = residual
        self.expand = nn.Conv2d(4, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.project = nn.Conv2d(12, 4, 1)
        self.head = nn.Conv2d(4, 10, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        h = self.project(F.relu6(self.dw(F.relu6(self.bn(self.expand(x))))))
        if self.residual:
            h = h + x
        h = self.pool(torch.relu(self.head(h)))
        return self.fc(torch.flatten(h, 1))


def net(residual=False):
    torch.manual_seed(0)
    model = Inverted(residual).eval()
    with torch.no_grad():  # BN statistics that matter
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


X = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def test_chains_through_channel_wise_steps_and_a_global_pool():
    chains = {c.producer: c for c in find_chains(net())}
    assert set(chains) == {"expand", "head"}
    assert chains["expand"].mids == ("bn", "dw") and chains["expand"].consumer == "project"
    assert chains["head"].consumer == "fc" and chains["head"].width == 10
    assert not chains["expand"].joins_sum
    residual = {c.producer: c for c in find_chains(net(residual=True))}
    assert residual["expand"].joins_sum


def test_no_chain_where_other_things_read_the_channels():
    class Forked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 6, 1)
            self.c = nn.Conv2d(6, 6, 3)
            self.d = nn.Linear(6 * 4 * 4, 2)

        def forward(self, x):
            h = self.a(x)
            y = self.b(torch.relu(h)) + h  # h read twice
            z = self.c(y)  # a 3×3 consumer
            return self.d(torch.flatten(z, 1))  # flatten with no global pool: channels mix

    assert find_chains(Forked()) == []


def test_pruning_every_channel_in_any_order_is_exact():
    model = net()
    want = model(X)
    for chain in find_chains(model):
        prune_chain_(model, chain, torch.randperm(chain.width))
    assert torch.allclose(model(X), want, atol=1e-5)


def test_pruned_consumer_keeps_its_own_columns():
    """Dropping channels equals zeroing the consumer's columns for them in the original."""
    model = net()
    chain = next(c for c in find_chains(model) if c.producer == "expand")
    keep = [0, 3, 4, 9]
    zeroed = net()
    with torch.no_grad():
        drop = [j for j in range(12) if j not in keep]
        zeroed.project.weight[:, drop] = 0
    prune_chain_(model, chain, keep)
    assert model.expand.out_channels == 4 and model.dw.groups == 4 and model.bn.num_features == 4
    assert torch.allclose(model(X), zeroed(X), atol=1e-5)


def test_given_weights_go_into_the_consumer():
    model = net()
    chain = next(c for c in find_chains(model) if c.producer == "head")
    w, b = torch.randn(3, 2), torch.randn(3)
    prune_chain_(model, chain, [7, 2], w, b)
    assert torch.equal(model.fc.weight, w) and torch.equal(model.fc.bias, b)


def test_a_pruned_model_replays_from_its_recipe():
    model = net()
    fold_batchnorm_(model)
    for chain in find_chains(model):
        prune_chain_(model, chain, list(range(0, chain.width, 2)))
    recipe = recipe_of_model(model)
    assert set(recipe["pruned"]) == set(pruned_chains(model)) == {"expand", "head"}
    assert recipe["pruned"]["expand"] == {"width": 6, "mids": ["dw"], "consumer": "project"}
    fresh = apply_recipe_(net(), recipe)
    fresh.load_state_dict(model.state_dict())  # strict: every shape matches
    assert torch.allclose(fresh(X), model(X), atol=1e-6)
    apply_recipe_(fresh, recipe)  # replayed twice: nothing changes
    assert torch.allclose(fresh(X), model(X), atol=1e-6)
