import math

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from distml.scores import macro_scores
from distml.train import TrainSettings, batches, confusion_matrix, evaluate, fit, lr_factors, new_state


def blobs(n=300, seed=0):
    """Ten well-separated clusters in 784 dimensions: any working loop learns them in an epoch."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    centers = rng.normal(0, 3, (10, 784))
    x = centers[y] + rng.normal(0, 1, (n, 784))
    return torch.tensor(x, dtype=torch.float32).view(n, 1, 28, 28), torch.tensor(y)


def test_fit_learns_and_reports_every_epoch():
    x, y = blobs()
    settings = TrainSettings(model="mlp", epochs=3, batch_size=32, lr=1e-3, seed=0)
    state = new_state(settings, stream=0)
    records = []
    metrics = fit(
        state, settings, x, y, torch.arange(0, 240), torch.arange(240, 300), on_epoch=lambda s, r: records.append(r)
    )
    assert [r.epoch for r in records] == [1, 2, 3]
    assert records[-1].train_loss < records[0].train_loss
    assert metrics.accuracy > 0.9
    assert metrics.confusion.sum() == 60


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resuming_from_a_saved_state_gives_the_same_model_as_training_straight_through(schedule):
    x, y = blobs()
    settings = TrainSettings(model="mlp", epochs=2, batch_size=16, lr=1e-3, seed=3, lr_schedule=schedule)
    straight = new_state(settings, stream=1)
    fit(straight, settings, x, y, torch.arange(240), torch.arange(240, 300))

    class Killed(Exception):
        pass

    def killed_after_epoch_one(state, record):
        raise Killed  # after on_epoch has seen the state: where a trainer checkpoints

    first = new_state(settings, stream=1)
    with pytest.raises(Killed):
        fit(first, settings, x, y, torch.arange(240), torch.arange(240, 300), on_epoch=killed_after_epoch_one)
    saved = first.state_dict()
    resumed = new_state(settings, stream=1)
    resumed.load_state_dict(saved)
    fit(resumed, settings, x, y, torch.arange(240), torch.arange(240, 300))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert resumed.epochs_done == 2


def test_streams_differ_and_seeds_repeat():
    settings = TrainSettings(seed=5)
    a, b, c = new_state(settings, 0), new_state(settings, 1), new_state(settings, 0)
    first = next(a.model.parameters())
    assert not torch.equal(first, next(b.model.parameters()))
    assert torch.equal(first, next(c.model.parameters()))


def test_batches_cover_the_indices_and_shard_evenly():
    x = torch.arange(103).float().view(103, 1)
    y = torch.arange(103)
    index = torch.arange(3, 103)
    seen = torch.cat([yb for _, yb in batches(x, y, index, 16, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(3, 103))
    shards = [
        torch.cat([yb for _, yb in batches(x, y, index, 8, torch.Generator().manual_seed(0), rank, 3)])
        for rank in range(3)
    ]
    assert [len(s) for s in shards] == [33, 33, 33]  # equal steps on every rank, or DDP hangs
    assert len(set(torch.cat(shards).tolist())) == 99


def test_macro_scores_match_scikit_learn():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 10, 500)
    predicted = np.where(rng.random(500) < 0.7, truth, rng.integers(0, 10, 500))
    predicted[predicted == 3] = 4  # class 3 never predicted: precision 0, as sklearn's zero_division=0
    confusion = confusion_matrix(torch.tensor(truth), torch.tensor(predicted), 10)
    assert confusion.sum() == 500 and confusion[:, 3].sum() == 0
    ours = macro_scores(confusion)
    theirs = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)[:3]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_evaluate_loss_and_accuracy_are_exact():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    metrics = evaluate(model, x, y, num_classes=2)
    assert metrics.accuracy == pytest.approx(2 / 3)
    expected = torch.nn.functional.cross_entropy(x, y).item()
    assert metrics.loss == pytest.approx(expected)
    assert metrics.confusion.tolist() == [[1, 0], [1, 1]]


def test_stacked_models_start_as_the_single_ones_and_unstack_back():
    from distml.models import StackedMLP
    from distml.train import new_group_state

    settings = TrainSettings(seed=2)
    group = new_group_state(settings, streams=[4, 9])
    for stream, unstacked in zip([4, 9], group.model.unstack(), strict=True):
        single = new_state(settings, stream).model
        for a, b in zip(single.parameters(), unstacked.parameters(), strict=True):
            assert torch.equal(a, b)
    x = torch.randn(2, 5, 1, 28, 28)
    singles = group.model.unstack()
    torch.testing.assert_close(group.model(x), torch.stack([singles[g](x[g]) for g in range(2)]))
    assert isinstance(group.model, StackedMLP) and group.model.size == 2


def test_a_group_trains_each_model_as_it_would_train_alone():
    """With fold sizes a multiple of the batch size, stacking changes nothing but the speed."""
    from distml.train import fit_group, new_group_state

    x, y = blobs(n=320)
    settings = TrainSettings(model="mlp", epochs=2, batch_size=32, lr=1e-3, seed=1)
    train = [torch.arange(0, 256), torch.arange(64, 320)]
    val = [torch.arange(256, 320), torch.arange(0, 64)]
    group = new_group_state(settings, streams=[0, 1])
    group_metrics = fit_group(group, settings, x, y, train, val)
    for g in range(2):
        alone = new_state(settings, stream=g)
        metrics = fit(alone, settings, x, y, train[g], val[g])
        for a, b in zip(alone.model.parameters(), group.model.unstack()[g].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert group_metrics[g].accuracy == pytest.approx(metrics.accuracy)
        assert group.histories[g][-1].train_loss == pytest.approx(alone.history[-1].train_loss, rel=1e-4)


def test_group_batches_give_every_model_full_batches():
    from distml.train import group_batches

    x = torch.arange(100).float().view(100, 1)
    y = torch.arange(100)
    indices = [torch.arange(0, 50), torch.arange(50, 97)]
    steps = list(group_batches(x, y, indices, 10, [torch.Generator().manual_seed(i) for i in range(2)]))
    assert len(steps) == 5 and all(yb.shape == (2, 10) for _, yb in steps)
    second = torch.cat([yb[1] for _, yb in steps])
    assert set(second.tolist()) == set(range(50, 97))  # all of its 47 images, 3 of them twice


def test_cosine_schedule_decays_from_lr_to_near_zero_across_epochs():
    assert lr_factors("constant", 1, 10, 3) is None
    steps = [f for epoch in (1, 2, 3) for f in lr_factors("cosine", epoch, 10, 3)]
    assert len(steps) == 30 and steps[0] == 1.0
    assert all(a > b for a, b in zip(steps[:-1], steps[1:], strict=True))  # strictly decreasing
    assert steps[15] == pytest.approx(0.5)  # half way, half the rate
    assert 0 < steps[-1] < 0.01


def test_fit_with_cosine_ends_at_a_tiny_rate_and_still_learns():
    x, y = blobs()
    settings = TrainSettings(model="mlp", epochs=2, batch_size=32, lr=1e-2, seed=0, lr_schedule="cosine")
    state = new_state(settings, stream=0)
    metrics = fit(state, settings, x, y, torch.arange(240), torch.arange(240, 300))
    group = state.optimizer.param_groups[0]
    assert group["initial_lr"] == 1e-2 and 0 < group["lr"] < 1e-4  # 16 steps: the last is cos-close to zero
    assert metrics.accuracy > 0.9


def test_a_users_optimizer_and_loss_factories_train_and_follow_the_rate_schedule():
    """optimizer(params, lr) and loss() from a user: SGD with momentum and a label-smoothed loss train the MLP, the
    cosine schedule scales the user's optimizer too, and its state round-trips through a checkpoint."""
    import torch
    from torch import nn

    from distml.optim import Scheduled

    torch.manual_seed(0)
    from distml.models import MLP

    x = torch.randn(512, 8)
    y = (x[:, :4].sum(1) > 0).long()  # four of eight features decide: learnable in a few epochs
    settings = TrainSettings(model="mlp", epochs=6, batch_size=32, lr=0.05, seed=0, lr_schedule="cosine")
    made = []

    def sgd(params, lr):
        made.append(lr)
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    build = lambda: MLP(num_classes=2, input_shape=(8,))  # noqa: E731
    state = new_state(settings, 0, build=build, optimizer=sgd, loss=lambda: nn.CrossEntropyLoss(label_smoothing=0.1))
    assert isinstance(state.optimizer, Scheduled) and made == [0.05]
    assert isinstance(state.loss, nn.CrossEntropyLoss)
    index = torch.arange(512)
    metrics = fit(state, settings, x, y, index[:400], index[400:])
    assert metrics.accuracy > 0.7  # chance is about 0.5
    assert state.optimizer.param_groups[0]["lr"] < 0.05 * 0.1  # the cosine schedule reached the user's SGD
    assert state.history[0].train_loss > state.history[-1].train_loss
    saved = state.state_dict()
    again = new_state(settings, 0, build=build, optimizer=sgd, loss=lambda: nn.CrossEntropyLoss(label_smoothing=0.1))
    again.load_state_dict(saved)
    assert again.optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        saved["optimizer"]["state"][0]["momentum_buffer"]
    )


def test_a_loss_that_stops_being_finite_ends_the_fit_before_it_spoils_the_weights():
    from distml.train import Diverged

    x, y = blobs()
    settings = TrainSettings(model="mlp", epochs=2, batch_size=32, lr=1e30, seed=0)
    state = new_state(settings, stream=0)
    with pytest.raises(Diverged, match=r"^diverged at epoch 1 \(loss nan at lr 1e\+30\)$") as stopped:
        fit(state, settings, x, y, torch.arange(240), torch.arange(240, 300))
    assert stopped.value.divergence.epoch == 1 and stopped.value.divergence.lr == 1e30
    assert state.history == []
    assert all(torch.isfinite(p).all() for p in state.model.parameters())  # checked before the step's update


def test_a_model_that_diverges_later_keeps_the_epochs_before():
    from distml.train import Diverged

    x, y = blobs()
    settings = TrainSettings(model="mlp", epochs=3, batch_size=32, lr=1e-3, seed=0)
    state = new_state(settings, stream=0)

    def poison_after_epoch_one(state, record):
        if record.epoch == 1:
            with torch.no_grad():
                next(state.model.parameters()).fill_(math.inf)

    with pytest.raises(Diverged) as stopped:
        fit(state, settings, x, y, torch.arange(240), torch.arange(240, 300), on_epoch=poison_after_epoch_one)
    assert stopped.value.divergence.epoch == 2 and not math.isfinite(stopped.value.divergence.loss)
    assert [r.epoch for r in state.history] == [1] and math.isfinite(state.history[0].train_loss)


def test_a_model_that_diverges_leaves_its_group_and_the_others_train_on_unchanged():
    """Poisoned after epoch 1, the stack's middle model leaves at epoch 2; the others end bit for bit as in a group
    where nothing diverged, and as they would alone."""
    from distml.train import Divergence, fit_group, new_group_state

    x, y = blobs(n=320)
    settings = TrainSettings(model="mlp", epochs=3, batch_size=32, lr=1e-3, seed=1)
    train = [torch.arange(0, 256), torch.arange(64, 320), torch.arange(32, 288)]
    val = [torch.arange(256, 320), torch.arange(0, 64), torch.arange(0, 32)]
    seen = []

    def poison_after_epoch_one(state, records):
        seen.append([record is not None for record in records])
        if records[0].epoch == 1:
            with torch.no_grad():
                state.model.weights[0][1].fill_(math.nan)

    group = new_group_state(settings, streams=[0, 1, 2])
    results = fit_group(group, settings, x, y, train, val, on_epoch=poison_after_epoch_one)
    clean = new_group_state(settings, streams=[0, 1, 2])
    clean_results = fit_group(clean, settings, x, y, train, val)

    assert isinstance(results[1], Divergence) and (results[1].epoch, results[1].lr) == (2, 1e-3)
    assert math.isnan(results[1].loss)
    assert group.diverged.keys() == {1} and len(group.histories[1]) == 1 and group.epochs_done == 3
    assert seen == [[True, True, True], [True, False, True], [True, False, True]]
    for g in (0, 2):
        assert (results[g].loss, results[g].accuracy) == (clean_results[g].loss, clean_results[g].accuracy)
        scores = [[(r.train_loss, r.val_loss) for r in state.histories[g]] for state in (group, clean)]
        assert scores[0] == scores[1]
        for a, b in zip(clean.model.unstack()[g].parameters(), group.model.unstack()[g].parameters(), strict=True):
            assert torch.equal(a, b)
    alone = new_state(settings, stream=2)
    fit(alone, settings, x, y, train[2], val[2])
    for a, b in zip(alone.model.parameters(), group.model.unstack()[2].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    again = new_group_state(settings, streams=[0, 1, 2])
    again.load_state_dict(group.state_dict())  # a checkpoint keeps who left, and where
    assert again.diverged.keys() == {1} and again.diverged[1].epoch == 2 and again.epochs_done == 3
