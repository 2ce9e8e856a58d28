import subprocess
import sys

import pytest
import torch
from torch import nn

from distml.optim import Adam


def two_nets(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    twin.load_state_dict(net.state_dict())
    return net, twin


def train(net, optimizer, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()


def groups(net, lrs=(1e-2, 3e-3)):
    return [{"params": net[0].parameters(), "lr": lrs[0]}, {"params": net[2].parameters(), "lr": lrs[1]}]


@pytest.mark.parametrize("fused", [True, False])
def test_steps_match_torch_adam_with_two_learning_rates(fused):
    net, twin = two_nets()
    ours = Adam(groups(net))
    ours.fused = fused  # False: the plain update used on devices without the fused kernel
    reference = torch.optim.Adam(groups(twin))
    train(net, ours, 25)
    train(twin, reference, 25)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert p.abs().sum() > 0 and not torch.equal(p, two_nets()[0][2].bias)  # the weights really moved


def test_state_dict_round_trip_continues_exactly():
    net, twin = two_nets()
    first = Adam(net.parameters(), lr=1e-2)
    train(net, first, 5)
    twin.load_state_dict(net.state_dict())
    second = Adam(twin.parameters(), lr=5.0)  # the saved lr replaces this one
    second.load_state_dict(first.state_dict())
    assert second.param_groups[0]["lr"] == 1e-2
    train(net, first, 5, seed=7)
    train(twin, second, 5, seed=7)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert float(first.state_dict()["state"][0]["step"]) == 10


def test_a_state_dict_of_another_shape_is_refused():
    net, _ = two_nets()
    saved = Adam(groups(net)).state_dict()
    with pytest.raises(ValueError, match="groups"):
        Adam(net.parameters()).load_state_dict(saved)


def test_building_and_stepping_it_does_not_import_torch_dynamo():
    code = (
        "import sys, torch\n"
        "from distml.optim import Adam\n"
        "m = torch.nn.Linear(3, 3); o = Adam(m.parameters())\n"
        "m(torch.ones(2, 3)).sum().backward(); o.step(); o.zero_grad(); o.load_state_dict(o.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
