"""The layer-local fitter against a problem with a known answer."""

import torch
from torch import nn

from upcycle.train.layerwise import fit


def test_fits_a_linear_map_to_its_known_solution_and_touches_nothing_else():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    w_true = torch.randn(3, 8, generator=g)
    y = x @ w_true.T
    model = nn.Sequential(nn.Linear(8, 3, bias=False), nn.Linear(3, 3))
    other = [p.detach().clone() for p in model[1].parameters()]
    model[1].weight.requires_grad_(False)  # a flag the fitter must hand back as it found it
    model.eval()

    def loss(index):
        return (model[0](x[index]) - y[index]).pow(2).mean()

    losses = fit(
        [{"params": model[0].parameters(), "lr": 0.05}],
        loss,
        steps=400,
        rows=len(x),
        batch=256,
        generator=torch.Generator().manual_seed(1),
        model=model,
        train_mode=True,
    )
    assert len(losses) == 400 and losses[-1] < 1e-3 * losses[0]
    assert torch.allclose(model[0].weight, w_true, atol=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(other, model[1].parameters()))
    assert model[1].weight.requires_grad is False and model[1].bias.requires_grad is True
    assert not model.training and model[0].weight.grad is None


def test_same_seed_same_losses_and_a_loss_that_picks_its_own_data():
    def run(seed):
        torch.manual_seed(0)
        layer = nn.Linear(4, 1)
        x, y = torch.randn(512, 4), torch.randn(512, 1)
        return fit(
            [{"params": layer.parameters(), "lr": 0.01}],
            lambda i: (layer(x[i]) - y[i]).pow(2).mean(),
            steps=20,
            rows=512,
            batch=32,
            generator=torch.Generator().manual_seed(seed),
        )

    assert run(3) == run(3) and run(3) != run(4)
    steps_seen = []
    layer = nn.Linear(2, 1)
    fit(
        [{"params": layer.parameters(), "lr": 0.01}],
        lambda step: steps_seen.append(step) or layer(torch.ones(1, 2)).pow(2).sum(),
        steps=3,
    )
    assert steps_seen == [0, 1, 2]
