"""Tests of the training engine, its minibatches, devices and schedules."""

import math
import warnings

import pytest
import torch
from torch import nn

from neurovae.training import (
    Constant,
    Cyclical,
    DivergenceError,
    Engine,
    EngineConfig,
    Hook,
    Linear,
    TensorBatches,
    autocast,
    local_rng,
    make_scaler,
    make_schedule,
    resolve_device,
)

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------
# tiny modules following the engine's protocol
# ---------------------------------------------------------------------------
class Regression(nn.Module):
    """Least squares with one extra logged term."""

    def __init__(self, n_features=3):
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, batch):
        x, y = batch
        err = self.linear(x).squeeze(1) - y
        return {"loss": err.pow(2).mean(), "mae": err.abs().mean()}


class Quadratic(nn.Module):
    """``loss = mean((x - w) ** 2)``: the optimum is ``w = mean(x)``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return {"loss": (batch[0] - self.w).pow(2).mean()}


class DriftingValidation(nn.Module):
    """Training pulls ``w`` from 0 towards 3; validation measures it against 1.

    The validation loss falls until ``w`` passes 1 and rises after: an
    engineered overfitting curve.
    """

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        target = 3.0 if self.training else 1.0
        return {"loss": (self.w - target).pow(2).sum() + 0 * batch[0].sum()}


class SometimesNaN(Quadratic):
    """Quadratic whose loss is NaN on every ``period``-th training step."""

    def __init__(self, period):
        super().__init__()
        self.period = period
        self.calls = 0

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            self.calls += 1
            if self.calls % self.period == 0:
                out["loss"] = out["loss"] * float("nan")
        return out


class Recorder(Hook):
    """Keep a copy of the weights and the logs at the end of every epoch."""

    def __init__(self):
        self.states, self.logs, self.begun = [], [], []

    def on_epoch_begin(self, engine):
        self.begun.append(engine.epoch)

    def on_epoch_end(self, engine, logs):
        self.states.append(
            {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        )
        self.logs.append(dict(logs))


def regression_data(n=64, n_features=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_features, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return x, y


def batches(tensors, batch_size, seed=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return TensorBatches(
        tensors, batch_size, shuffle=seed is not None, generator=generator
    )


def seeded(cls, *args, seed=0):
    with local_rng(seed):
        return cls(*args)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# TensorBatches
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_tensor_batches_cover_every_sample_once(shuffle):
    x = torch.arange(10.0)
    data = TensorBatches(
        (x, 2 * x),
        batch_size=4,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(data) == 3
    for _ in range(2):  # every pass, not just the first
        seen = list(data)
        assert [b[0].shape[0] for b in seen] == [4, 4, 2]  # partial last batch
        xs = torch.cat([b[0] for b in seen])
        assert sorted(xs.tolist()) == x.tolist()
        for bx, by in seen:  # aligned tensors stay aligned
            assert torch.equal(by, 2 * bx)


def test_tensor_batches_seeded_shuffle():
    x = torch.arange(20.0)

    def orders(seed, n_passes=2):
        data = batches((x,), 5, seed=seed)
        return [torch.cat([b[0] for b in data]).tolist() for _ in range(n_passes)]

    first = orders(0)
    assert first == orders(0)
    assert first != orders(1)
    assert first[0] != first[1]  # a fresh permutation every pass
    assert first[0] != x.tolist()


def test_engine_seeded_shuffling_is_deterministic():
    x, y = regression_data(n=32)

    def train(seed):
        module = seeded(Regression)
        config = EngineConfig(max_iter=3, learning_rate_init=0.05)
        Engine(module, config, CPU).fit(batches((x, y), 4, seed=seed))
        return module.state_dict()

    assert states_equal(train(0), train(0))
    assert not states_equal(train(0), train(1))


# ---------------------------------------------------------------------------
# training, optimisers and history
# ---------------------------------------------------------------------------
def test_loss_falls_and_history_has_every_term():
    x, y = regression_data()
    module = seeded(Regression)
    config = EngineConfig(max_iter=30, learning_rate_init=0.05)
    result = Engine(module, config, CPU).fit(batches((x, y), 16, seed=0))
    history = result.history
    assert set(history) == {"loss", "mae", "time", "n_skipped"}
    assert all(len(v) == 30 for v in history.values())
    assert result.n_epochs == 30
    assert not result.stopped_early and not result.interrupted
    assert history["loss"][-1] < 0.05 * history["loss"][0]
    assert history["n_skipped"] == [0] * 30
    assert all(t > 0 for t in history["time"])


def test_history_has_val_terms_and_weighted_means():
    """Epoch logs are means over samples, so a partial last batch counts less."""

    class MeanOfX(Quadratic):
        def forward(self, batch):
            return {**super().forward(batch), "xmean": batch[0].mean()}

    x = torch.arange(10.0)
    train = batches((x,), 4, seed=0)  # batches of 4, 4 and 2
    val = batches((x[:3] + 100,), 2)
    result = Engine(MeanOfX(), EngineConfig(max_iter=2), CPU).fit(train, val)
    history = result.history
    assert set(history) == {
        "loss",
        "xmean",
        "val_loss",
        "val_xmean",
        "time",
        "n_skipped",
    }
    assert history["xmean"] == pytest.approx([4.5, 4.5])
    assert history["val_xmean"] == pytest.approx([101.0, 101.0])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "adamax"])
def test_optimizers(optimizer):
    module = Quadratic()
    config = EngineConfig(max_iter=40, optimizer=optimizer, learning_rate_init=0.1)
    engine = Engine(module, config, CPU)
    assert type(engine.optimizer).__name__.lower() == optimizer
    engine.fit(batches((torch.full((8,), 3.0),), 4))
    assert module.w.item() == pytest.approx(3.0, abs=0.2)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'.*adamw"):
        Engine(Quadratic(), EngineConfig(max_iter=1, optimizer="lbfgs"), CPU)


def test_hooks_are_called_and_may_add_logs():
    class AddLog(Recorder):
        def on_epoch_end(self, engine, logs):
            super().on_epoch_end(engine, logs)
            logs["extra"] = 10.0 * engine.epoch

    hook = AddLog()
    engine = Engine(Quadratic(), EngineConfig(max_iter=3), CPU, hooks=[hook])
    result = engine.fit(batches((torch.ones(4),), 2))
    assert hook.begun == [0, 1, 2]
    assert result.history["extra"] == [0.0, 10.0, 20.0]


# ---------------------------------------------------------------------------
# early stopping
# ---------------------------------------------------------------------------
def test_early_stopping_restores_best_epoch():
    recorder = Recorder()
    config = EngineConfig(
        max_iter=100, learning_rate_init=0.1, early_stopping=True, n_iter_no_change=3
    )
    module = DriftingValidation()
    engine = Engine(module, config, CPU, hooks=[recorder])
    ones = (torch.ones(4),)
    result = engine.fit(batches(ones, 2), batches(ones, 4))

    val_loss = result.history["val_loss"]
    best = min(range(len(val_loss)), key=val_loss.__getitem__)
    assert result.stopped_early
    assert result.n_epochs < 100
    assert result.best_epoch == best
    assert result.n_epochs == best + 1 + config.n_iter_no_change
    assert val_loss[-1] > val_loss[best]
    # the weights are those of the best epoch, not of the last one
    assert states_equal(module.state_dict(), recorder.states[best])
    assert not states_equal(module.state_dict(), recorder.states[-1])


def test_early_stopping_needs_validation_data():
    engine = Engine(Quadratic(), EngineConfig(max_iter=2, early_stopping=True), CPU)
    with pytest.raises(ValueError, match="validation"):
        engine.fit(batches((torch.ones(4),), 2))


# ---------------------------------------------------------------------------
# non-finite losses and gradients, clipping
# ---------------------------------------------------------------------------
def test_nan_steps_are_skipped_and_counted():
    module = SometimesNaN(period=3)
    data = batches((torch.full((12,), 3.0),), 2)  # 6 steps per epoch
    config = EngineConfig(max_iter=20, learning_rate_init=0.1)
    result = Engine(module, config, CPU).fit(data)
    assert result.history["n_skipped"] == [2] * 20
    assert all(math.isfinite(v) for v in result.history["loss"])
    assert module.w.item() == pytest.approx(3.0, abs=0.2)


def test_nan_loss_is_skipped_whatever_the_key_order():
    """The ``"loss"`` entry decides, even when it is not the first key."""

    class LossLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, batch):
            self.calls += 1
            loss = (batch[0] - self.w).pow(2).mean()
            if self.calls == 1:
                loss = loss * float("nan")
            return {"recon": loss.detach() * 0, "loss": loss}

    module = LossLast()
    result = Engine(module, EngineConfig(max_iter=1), CPU).fit(
        batches((torch.ones(4),), 2)
    )
    assert result.history["n_skipped"] == [1]
    assert math.isfinite(module.w.item())


@pytest.mark.parametrize(
    "n_samples, max_consecutive_skips, detail",
    [(4, 20, "every step of epoch 1"), (20, 3, "3 consecutive steps")],
)
def test_persistent_nan_raises(n_samples, max_consecutive_skips, detail):
    module = SometimesNaN(period=1)
    config = EngineConfig(
        max_iter=5, max_consecutive_skips=max_consecutive_skips, name="TinyVAE"
    )
    engine = Engine(module, config, CPU)
    with pytest.raises(DivergenceError) as excinfo:
        engine.fit(batches((torch.ones(n_samples),), 2))
    message = str(excinfo.value)
    assert detail in message
    for word in ("TinyVAE.fit", "learning_rate_init", "max_grad_norm"):
        assert word in message
    assert module.w.item() == 0.0  # no NaN reached the weights


def test_non_finite_gradient_is_skipped_with_max_grad_norm():
    class InfGradient(Quadratic):
        """A finite loss whose gradient is infinite on every other step."""

        calls = 0

        def forward(self, batch):
            self.calls += 1
            w = self.w * 1.0
            if self.calls % 2 == 0:
                w.register_hook(lambda g: torch.full_like(g, math.inf))
            return {"loss": (batch[0] - w).pow(2).mean()}

    module = InfGradient()
    config = EngineConfig(max_iter=3, max_grad_norm=1.0)
    result = Engine(module, config, CPU).fit(batches((torch.ones(8),), 2))
    assert result.history["n_skipped"] == [2, 2, 2]
    assert math.isfinite(module.w.item())
    assert module.w.item() != 0.0  # the finite steps were taken


class SqrtAbs(Quadratic):
    """sqrt(|w|) at w = 0: the loss is finite (0) but its gradient is not."""

    def forward(self, batch):
        return {"loss": self.w.abs().sqrt().sum() + 0 * batch[0].sum()}


def test_infinite_gradient_is_skipped_with_clipping():
    module = SqrtAbs()
    config = EngineConfig(max_iter=1, max_grad_norm=1.0, max_consecutive_skips=3)
    with pytest.raises(DivergenceError, match="non-finite loss or gradient"):
        Engine(module, config, CPU).fit(batches((torch.ones(8),), 2))
    assert module.w.item() == 0.0  # the infinite gradient never reached w


def test_infinite_gradient_without_clipping_stops_with_advice():
    # unchecked, the step makes w NaN; the NaN losses that follow are skipped
    # and the run stops with an error that names max_grad_norm
    module = SqrtAbs()
    config = EngineConfig(max_iter=3, max_consecutive_skips=3)
    with pytest.raises(DivergenceError, match="max_grad_norm"):
        Engine(module, config, CPU).fit(batches((torch.ones(8),), 2))


def test_validation_loss_is_deterministic():
    # a VAE's validation loss uses fixed posterior noise in eval mode: the
    # same weights give the same figure, whatever was drawn in training
    from neurovae.nn import GaussianLatent, VAEModule, make_backbone, make_likelihood

    with local_rng(0):
        enc, dec = make_backbone("mlp", (5,), 2, hidden_layer_sizes=(8,))
        module = VAEModule(
            enc, dec, GaussianLatent(8, 2), make_likelihood("gaussian", (5,))
        )
    engine = Engine(module, EngineConfig(max_iter=1), CPU)
    val = batches((torch.randn(12, 5, generator=torch.Generator().manual_seed(1)),), 5)
    first = engine.evaluate(val)
    torch.randn(100)  # move the global generator on
    assert engine.evaluate(val) == first


def test_validation_without_early_stopping_keeps_the_last_epoch():
    recorder = Recorder()
    module = DriftingValidation()
    config = EngineConfig(max_iter=12, learning_rate_init=0.2, optimizer="sgd")
    data = batches((torch.zeros(4),), 4)
    result = Engine(module, config, CPU, hooks=[recorder]).fit(data, data)
    val_loss = result.history["val_loss"]
    assert int(torch.tensor(val_loss).argmin()) < 11  # the curve has turned up
    assert result.best_epoch == 11
    assert states_equal(module.state_dict(), recorder.states[-1])


def test_keyboard_interrupt_in_the_first_epoch_propagates():
    class Interrupt(Hook):
        def after_step(self, engine, batch, outputs):
            raise KeyboardInterrupt

    config = EngineConfig(max_iter=3)
    engine = Engine(Quadratic(), config, CPU, hooks=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        engine.fit(batches((torch.ones(8),), 4))


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_gradient_clipping_bounds_the_update(max_grad_norm):
    class GradNorms(Hook):
        def __init__(self):
            self.norms = []

        def after_step(self, engine, batch, outputs):
            grads = [p.grad.flatten() for p in engine.module.parameters()]
            self.norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())

    x, y = regression_data(n=8)
    module = seeded(Regression)
    before = torch.cat([p.detach().flatten() for p in module.parameters()])
    hook = GradNorms()
    lr = 0.01
    config = EngineConfig(
        max_iter=1, optimizer="sgd", learning_rate_init=lr, max_grad_norm=max_grad_norm
    )
    Engine(module, config, CPU, hooks=[hook]).fit(batches((x, 1000 * y), 8))
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    step = torch.linalg.vector_norm(after - before).item()
    (norm,) = hook.norms
    if max_grad_norm is None:
        assert norm > 100.0  # the problem really has a large gradient
        assert step > 1.0
    else:
        assert norm == pytest.approx(max_grad_norm, rel=1e-4)
        # one Nesterov step from zero momentum moves by lr * 1.9 * gradient
        assert step == pytest.approx(lr * 1.9 * max_grad_norm, rel=1e-4)


# ---------------------------------------------------------------------------
# KeyboardInterrupt
# ---------------------------------------------------------------------------
def test_keyboard_interrupt_keeps_last_completed_epoch():
    class Interrupt(Hook):
        def after_step(self, engine, batch, outputs):
            if engine.epoch == 2:
                self.state = {
                    k: v.detach().clone() for k, v in engine.module.state_dict().items()
                }
                raise KeyboardInterrupt

    recorder, interrupt = Recorder(), Interrupt()
    x, y = regression_data(n=16)
    module = seeded(Regression)
    config = EngineConfig(max_iter=10, learning_rate_init=0.05, name="TinyVAE")
    engine = Engine(module, config, CPU, hooks=[recorder, interrupt])
    with pytest.warns(UserWarning, match="TinyVAE.fit was interrupted.*epoch 2"):
        result = engine.fit(batches((x, y), 4, seed=0))
    assert result.interrupted
    assert result.n_epochs == 2
    assert result.best_epoch == 1
    assert len(result.history["loss"]) == 2
    assert states_equal(module.state_dict(), recorder.states[1])
    assert not states_equal(module.state_dict(), interrupt.state)


# ---------------------------------------------------------------------------
# schedules in the engine, warm start
# ---------------------------------------------------------------------------
class BetaRecorder(Quadratic):
    """Record ``(training, beta)`` at every call."""

    def __init__(self):
        super().__init__()
        self.beta = None
        self.seen = []

    def forward(self, batch):
        self.seen.append((self.training, self.beta))
        return super().forward(batch)


def test_schedules_per_step_and_final_for_validation():
    module = BetaRecorder()
    schedules = {"beta": Linear(1.0, warmup_iter=4)}
    engine = Engine(module, EngineConfig(max_iter=2), CPU, schedules=schedules)
    result = engine.fit(batches((torch.ones(8),), 2), batches((torch.ones(2),), 2))
    train = [beta for training, beta in module.seen if training]
    val = [beta for training, beta in module.seen if not training]
    assert train == pytest.approx([(e + i / 4) / 4 for e in range(2) for i in range(4)])
    assert val == [1.0, 1.0]
    # the history logs the value of each epoch's last training step
    assert result.history["beta"] == pytest.approx([0.1875, 0.4375])
    assert module.beta == 1.0


def test_warm_start_continues_schedules_and_history(capsys):
    schedules = {"beta": Linear(1.0, warmup_iter=4)}
    data = batches((torch.ones(8),), 2)
    module = BetaRecorder()
    first = Engine(module, EngineConfig(max_iter=2), CPU, schedules=schedules)
    history = first.fit(data).history
    module.seen.clear()
    config = EngineConfig(max_iter=2, verbose=2, name="TinyVAE")
    second = Engine(module, config, CPU, schedules=schedules)
    result = second.fit(data, history=history, start_epoch=2)
    assert result.history is history
    assert result.n_epochs == 2
    assert all(len(v) == 4 for v in history.values())
    assert module.seen[0][1] == pytest.approx(0.5)  # progress 2 of 4 epochs
    assert history["beta"] == pytest.approx([0.1875, 0.4375, 0.6875, 0.9375])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "[TinyVAE.fit] epoch 3/4",
        "[TinyVAE.fit] epoch 4/4",
    ]


# ---------------------------------------------------------------------------
# verbosity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_verbose(verbose, capsys):
    config = EngineConfig(max_iter=3, verbose=verbose, name="TinyVAE")
    Engine(Quadratic(), config, CPU).fit(
        batches((torch.ones(4),), 2), batches((torch.ones(2),), 2)
    )
    captured = capsys.readouterr()
    if verbose == 0:
        assert captured.out == "" and captured.err == ""
    elif verbose == 1:
        assert captured.out == ""
        assert "TinyVAE.fit" in captured.err
        assert "3/3" in captured.err  # a tqdm bar that reached its end
    else:
        lines = captured.out.splitlines()
        assert len(lines) == 3
        for epoch, line in enumerate(lines, 1):
            assert line.startswith(f"[TinyVAE.fit] epoch {epoch}/3: loss=")
            assert "val_loss=" in line
        assert "TinyVAE" not in captured.err


# ---------------------------------------------------------------------------
# precision, devices, random state
# ---------------------------------------------------------------------------
def test_bf16_trains_on_cpu():
    x, y = regression_data()
    module = seeded(Regression)
    config = EngineConfig(max_iter=8, learning_rate_init=0.1, precision="bf16")
    result = Engine(module, config, CPU).fit(batches((x, y), 32, seed=0))
    assert module.linear.weight.dtype == torch.float32
    assert result.history["loss"][-1] < 0.2 * result.history["loss"][0]


def test_unknown_precision():
    engine = Engine(Quadratic(), EngineConfig(max_iter=1, precision="fp8"), CPU)
    with pytest.raises(ValueError, match="precision.*'fp8'"):
        engine.fit(batches((torch.ones(4),), 2))


# ---------------------------------------------------------------------------
# float16 with a gradient scaler: its logic, run on the CPU with a CPU scaler
# ---------------------------------------------------------------------------
class OverflowOn(Quadratic):
    """Quadratic whose gradient is infinite (its loss finite) on the training
    steps listed in ``steps``, or on every step when ``steps`` is None."""

    def __init__(self, steps=None):
        super().__init__()
        self.steps = steps
        self.calls = 0

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            if self.steps is None or self.calls in self.steps:
                out["loss"] = _InfiniteGradient.apply(out["loss"])
            self.calls += 1
        return out


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def cpu_scaler(scale=2.0**16, growth_interval=2000):
    return torch.amp.GradScaler(
        "cpu", init_scale=scale, growth_interval=growth_interval
    )


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_scaled_steps_follow_the_unscaled_ones(max_grad_norm):
    # the scaled backward pass, unscaled before clipping and stepping, makes
    # the updates of plain float32 training (a scale of 2**20 would clip to
    # nothing if clipping saw the scaled gradients)
    x, y = regression_data()
    runs = []
    for scaler in (None, cpu_scaler(2.0**20, growth_interval=3)):
        module = seeded(Regression)
        config = EngineConfig(
            max_iter=4, learning_rate_init=0.05, max_grad_norm=max_grad_norm
        )
        engine = Engine(module, config, CPU, scaler=scaler)
        result = engine.fit(batches((x, y), 16, seed=0))
        runs.append((module.state_dict(), result.history))
    (plain, plain_history), (scaled, scaled_history) = runs
    for key in plain:
        torch.testing.assert_close(scaled[key], plain[key], rtol=1e-6, atol=1e-7)
    assert scaled_history["n_skipped_scaler"] == [0, 0, 0, 0]
    assert "n_skipped_scaler" not in plain_history
    assert scaled_history["n_skipped"] == plain_history["n_skipped"] == [0] * 4


def test_scaler_overflow_is_skipped_and_halves_the_scale():
    module = seeded(OverflowOn, {1})
    scaler = cpu_scaler()
    config = EngineConfig(max_iter=1, learning_rate_init=0.1, ema_decay=0.5)
    engine = Engine(module, config, CPU, scaler=scaler)
    result = engine.fit(batches((torch.full((8,), 3.0),), 2))  # 4 steps
    assert scaler.get_scale() == 2.0**15
    assert result.history["n_skipped_scaler"] == [1]
    assert result.history["n_skipped"] == [0]
    state = engine.optimizer.state_dict()["state"]
    assert int(state[0]["step"]) == 3  # the optimiser stepped 3 times of 4
    assert torch.isfinite(module.w).all()
    # the skipped step's finite loss is logged with the others
    assert math.isfinite(result.history["loss"][0])


def test_scaler_calibration_is_no_divergence():
    # 6 overflows in a row (the scale falls from 2**16 to 2**10) with
    # max_consecutive_skips=2: the scaler calibrating, not a divergence
    module = seeded(OverflowOn, set(range(6)))
    scaler = cpu_scaler()
    config = EngineConfig(max_iter=2, learning_rate_init=0.1, max_consecutive_skips=2)
    result = Engine(module, config, CPU, scaler=scaler).fit(
        batches((torch.full((8,), 3.0),), 2)
    )
    assert result.history["n_skipped_scaler"] == [4, 2]
    assert result.history["n_skipped"] == [0, 0]
    assert scaler.get_scale() == 2.0**10


def test_overflow_at_a_scale_of_one_is_a_divergence():
    # the scale halves to 1, then the gradients overflow by themselves
    module = seeded(OverflowOn, None)
    scaler = cpu_scaler(4.0)
    config = EngineConfig(max_iter=5, max_consecutive_skips=3, precision="32")
    with pytest.raises(DivergenceError, match="3 consecutive steps"):
        Engine(module, config, CPU, scaler=scaler).fit(batches((torch.ones(8),), 1))
    assert module.calls == 2 + 3  # 4 -> 2 -> 1: two scaler skips, then three
    assert scaler.get_scale() <= 1.0


def test_scaler_leaves_non_finite_losses_to_the_engine():
    module = seeded(SometimesNaN, 3)
    scaler = cpu_scaler()
    config = EngineConfig(max_iter=2, learning_rate_init=0.1)
    result = Engine(module, config, CPU, scaler=scaler).fit(
        batches((torch.full((8,), 3.0),), 2)
    )
    assert sum(result.history["n_skipped"]) > 0
    assert result.history["n_skipped_scaler"] == [0, 0]


def test_precision_16_needs_cuda():
    config = EngineConfig(max_iter=1, precision="16")
    with pytest.raises(ValueError, match="'16' needs a CUDA device; use 'bf16' on CPU"):
        Engine(Quadratic(), config, CPU)
    assert make_scaler(CPU, "32") is None and make_scaler(CPU, "bf16") is None
    with autocast(CPU, "16"):  # inference on a CPU runs in float32
        assert nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_trains_on_cuda():
    cuda = torch.device("cuda")
    x, y = regression_data()
    module = seeded(Regression).to(cuda)
    config = EngineConfig(
        max_iter=8, learning_rate_init=0.1, precision="16", max_grad_norm=10.0
    )
    engine = Engine(module, config, cuda)
    assert isinstance(engine.scaler, torch.amp.GradScaler)
    with autocast(cuda, "16"):
        assert module(((x.to(cuda)), y.to(cuda)))["loss"].isfinite()
        assert module.linear(x.to(cuda)).dtype == torch.float16
    result = engine.fit(batches((x.to(cuda), y.to(cuda)), 32, seed=0))
    assert module.linear.weight.dtype == torch.float32
    assert result.history["loss"][-1] < 0.2 * result.history["loss"][0]
    assert sum(result.history["n_skipped"]) == 0
    assert "n_skipped_scaler" in result.history


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_without_cuda():
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    assert resolve_device(CPU) == CPU
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "banana", "cpu:x", ""])
def test_resolve_device_garbage(device):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu'"):
        resolve_device(device)


def test_local_rng_is_reproducible_and_leaves_global_state():
    before = torch.get_rng_state()
    with local_rng(3):
        a = torch.randn(5)
    with local_rng(3):
        b = torch.randn(5)
    with local_rng(4):
        c = torch.randn(5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------
def test_constant():
    s = Constant(2.5)
    assert s.final == 2.5
    assert [s(p) for p in (0.0, 3.3, 1e6)] == [2.5, 2.5, 2.5]


def test_linear():
    s = Linear(4.0, warmup_iter=10)
    assert s.final == 4.0
    values = [s(p) for p in (-1.0, 0.0, 2.5, 5.0, 10.0, 11.0, 100.0)]
    assert values == pytest.approx([0.0, 0.0, 1.0, 2.0, 4.0, 4.0, 4.0])
    ramp_from_one = Linear(3.0, warmup_iter=2, start=1.0)
    assert [ramp_from_one(p) for p in (0, 1, 2, 5)] == pytest.approx([1, 2, 3, 3])


@pytest.mark.parametrize("warmup_iter", [0, -1.0])
def test_linear_invalid_warmup(warmup_iter):
    with pytest.raises(ValueError, match="warmup_iter must be > 0"):
        Linear(1.0, warmup_iter=warmup_iter)


def test_cyclical():
    s = Cyclical(2.0, total_iter=20, n_cycles=2)  # cycles of 10 epochs
    assert s.final == 2.0
    # ramp over the first half of each cycle, plateau over the second
    first = [s(p) for p in (0.0, 1.0, 2.5, 5.0, 7.0, 9.9)]
    assert first == pytest.approx([0.0, 0.4, 1.0, 2.0, 2.0, 2.0])
    second = [s(p) for p in (10.0, 11.0, 12.5, 15.0, 19.9)]
    assert second == pytest.approx([0.0, 0.4, 1.0, 2.0, 2.0])
    short_ramp = Cyclical(1.0, total_iter=8, n_cycles=1, ratio=0.25)
    assert [short_ramp(p) for p in (1.0, 2.0, 7.0)] == pytest.approx([0.5, 1, 1])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_iter=0, n_cycles=2),
        dict(total_iter=10, n_cycles=0),
        dict(total_iter=10, n_cycles=2, ratio=0.0),
        dict(total_iter=10, n_cycles=2, ratio=1.5),
    ],
)
def test_cyclical_invalid(kwargs):
    with pytest.raises(ValueError, match="Cyclical needs"):
        Cyclical(1.0, **kwargs)


def test_make_schedule():
    assert isinstance(make_schedule("constant", 2.0), Constant)
    linear = make_schedule("linear", 2.0, warmup_iter=4)
    assert isinstance(linear, Linear) and linear(1.0) == 0.5
    cyclical = make_schedule("cyclical", 1.0, total_iter=8, n_cycles=2)
    assert isinstance(cyclical, Cyclical) and cyclical(5.0) == 0.5
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        make_schedule("cosine", 1.0)
    with pytest.raises(ValueError, match="warmup_iter"):
        make_schedule("linear", 1.0)
    with pytest.raises(ValueError, match="total_iter"):
        make_schedule("cyclical", 1.0)


def test_no_warning_in_a_clean_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(Quadratic(), EngineConfig(max_iter=2), CPU).fit(
            batches((torch.ones(4),), 2)
        )


# ---------------------------------------------------------------------------
# group-balanced batches
# ---------------------------------------------------------------------------
def test_balanced_batches_draw_every_group_at_the_same_rate():
    groups = torch.tensor([0] * 10 + [1] * 3)
    batches = TensorBatches(
        (torch.arange(13),),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        groups=groups,
    )
    assert len(batches) == 3  # one pass over the 10 samples of the larger group
    for _ in range(2):  # two passes, fresh orders
        seen = [b[0] for b in batches]
        assert [len(b) for b in seen] == [8, 8, 4]
        for b in seen:
            n = len(b) // 2
            assert (groups[b[:n]] == 0).all() and (groups[b[n:]] == 1).all()
        large = torch.cat([b[: len(b) // 2] for b in seen])
        assert sorted(large.tolist()) == list(range(10))  # each exactly once
        small = torch.cat([b[len(b) // 2 :] for b in seen])
        # the small group is cycled through: every sample before any repeats
        assert set(small[:3].tolist()) == set(small[3:6].tolist()) == {10, 11, 12}
    # unshuffled passes (validation) ignore the groups
    plain = TensorBatches((torch.arange(13),), 4, shuffle=False, groups=groups)
    assert [b[0].tolist() for b in plain][0] == [0, 1, 2, 3]


def test_dataset_batches_with_groups_match_tensor_batches():
    from torch.utils.data import TensorDataset

    from neurovae.training import DatasetBatches

    groups = torch.tensor([0, 1] * 3 + [0] * 5)
    data = torch.arange(11.0)
    kw = dict(batch_size=3, shuffle=True, groups=groups)
    a = TensorBatches((data,), generator=torch.Generator().manual_seed(1), **kw)
    b = DatasetBatches(
        TensorDataset(data), generator=torch.Generator().manual_seed(1), **kw
    )
    assert len(a) == len(b)
    for _ in range(2):
        assert [x[0].tolist() for x in a] == [x[0].tolist() for x in b]


# ---------------------------------------------------------------------------
# the discriminator hook
# ---------------------------------------------------------------------------
class WithCritic(nn.Module):
    """A regression whose critic learns to predict the (detached) residual."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.discriminator = nn.Linear(3, 1)
        self.stash = None

    def forward(self, batch):
        x, y = batch
        err = self.linear(x).squeeze(1) - y
        # the critic's output enters the model's loss: its gradient reaches
        # the critic's weights, which the engine must not step
        penalty = self.discriminator(x).mean()
        if self.training:
            self.stash = (x.detach(), err.detach())
        return {"loss": err.pow(2).mean() + 0.1 * penalty}

    def discriminator_loss(self):
        x, err = self.stash
        return (self.discriminator(x).squeeze(1) - err).pow(2).mean()


def test_discriminator_hook_trains_the_critic_with_its_own_optimiser():
    from neurovae.training import DiscriminatorHook

    regression = batches(regression_data(), 16, seed=0)
    module = WithCritic()
    hook = DiscriminatorHook(learning_rate=0.05)
    engine = Engine(
        module, EngineConfig(max_iter=30, learning_rate_init=0.05), CPU, hooks=[hook]
    )
    main = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert main == {id(p) for p in module.linear.parameters()}
    before = module.discriminator.weight.detach().clone()
    result = engine.fit(regression)
    losses = result.history["discriminator"]
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert not torch.equal(before, module.discriminator.weight)
    # the critic's loss sees detached inputs: no gradient reaches the model
    module.train()
    module(next(iter(regression)))
    module.zero_grad(set_to_none=True)
    module.discriminator_loss().backward()
    assert all(p.grad is None for p in module.linear.parameters())


# ---------------------------------------------------------------------------
# skipping large updates, moving average of the weights
# ---------------------------------------------------------------------------
def test_updates_above_skip_threshold_are_skipped_and_counted():
    x, y = regression_data(n=64)
    y = y.clone()
    y[48:] *= 1e4  # the last batch (unshuffled) has a huge gradient
    module = Regression()
    config = EngineConfig(max_iter=2, learning_rate_init=0.01, skip_threshold=1e3)
    result = Engine(module, config, CPU).fit(batches((x, y), 16))
    assert result.history["n_skipped"] == [1, 1]
    assert result.history["n_skipped_large"] == [1, 1]
    # the same run on the first three batches only gives the same weights
    torch.manual_seed(0)
    a = Regression()
    torch.manual_seed(0)
    b = Regression()
    Engine(a, config, CPU).fit(batches((x, y), 16))
    Engine(b, config, CPU).fit(batches((x[:48], y[:48]), 16))
    assert torch.equal(a.linear.weight, b.linear.weight)


def test_skip_threshold_sees_the_norm_before_clipping():
    x, y = regression_data(n=64)
    config = EngineConfig(max_iter=1, max_grad_norm=0.01, skip_threshold=1e6)
    result = Engine(Regression(), config, CPU).fit(batches((x, y), 16))
    assert result.history["n_skipped"] == [0]  # clipped, not skipped
    config = EngineConfig(max_iter=1, max_grad_norm=1e6, skip_threshold=1e-9)
    with pytest.raises(DivergenceError, match="every step of epoch 1.*skip_threshold"):
        Engine(Regression(), config, CPU).fit(batches((x, y), 16))


def test_skip_warmup_lets_the_first_steps_through():
    x, y = regression_data(n=64)

    def config(warmup):  # 4 steps per epoch; every step's norm is above 1e-9
        return EngineConfig(
            max_iter=2, max_grad_norm=1e6, skip_threshold=1e-9, skip_warmup=warmup
        )

    # the warm-up counts steps across epochs: 4 in epoch 1, then 2 of epoch 2
    module = Regression()
    before = module.linear.weight.detach().clone()
    result = Engine(module, config(6), CPU).fit(batches((x, y), 16))
    assert result.history["n_skipped_large"] == [0, 2]
    assert not torch.equal(module.linear.weight, before)
    with pytest.raises(DivergenceError, match="every step of epoch 2"):
        Engine(Regression(), config(4), CPU).fit(batches((x, y), 16))


def test_moving_average_of_the_weights():
    x, y = regression_data(n=32)
    decay = 0.9
    torch.manual_seed(0)
    module = Regression()
    expected = [p.detach().clone() for p in module.parameters()]
    raw = Regression()
    raw.load_state_dict(module.state_dict())
    config = EngineConfig(max_iter=3, optimizer="sgd", learning_rate_init=0.05)
    # the raw trajectory, step by step, averaged by hand
    engine = Engine(raw, config, CPU)
    for _ in range(3):
        for batch in batches((x, y), 8):
            engine.optimizer.zero_grad()
            raw(batch)["loss"].backward()
            engine.optimizer.step()
            for e, p in zip(expected, raw.parameters()):
                e.mul_(decay).add_((1 - decay) * p.detach())
    ema = Engine(module, EngineConfig(**{**config.__dict__, "ema_decay": decay}), CPU)
    result = ema.fit(batches((x, y), 8), val=batches((x, y), 8))
    for e, p in zip(expected, module.parameters()):
        torch.testing.assert_close(p, e)  # the module holds the average
    # validation evaluated the averaged weights
    last = Engine(module, config, CPU).evaluate(batches((x, y), 8))
    assert result.history["val_loss"][-1] == pytest.approx(last["loss"])
