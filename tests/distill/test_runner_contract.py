"""distill() on user models: the calibration loader's contract, slice groups, shared modules, positional block
arguments, reruns on other data, the caller's training flags, and spill folders. Tiny MLPs, a few steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distill.runner as runner
from distill.capture import FeatureStore, capture_features
from distill.runner import distill
from distill.slices import EXTRA_ARGS, SliceSpec, make_slices, run_slice
from distill.train_slice import SliceTrainConfig

CFG = SliceTrainConfig(max_steps=4, eval_every=2, batch_size=16)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1, self.fc2 = nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64)
        self.act2, self.fc3, self.head = nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.fc3(self.act2(self.fc2(self.act1(self.fc1(x))))))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def data(n: int = 6, bs: int = 16, seed: int = 1, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(bs, 32, generator=g) for _ in range(n)]


def run(model, loader, tmp, **kw):
    kw = {"slices": ["fc1", "fc2", "fc3"], "ratio": 2.0, "config": CFG, "progress": False, **kw}
    return distill(model, loader, out_dir=tmp, **kw)


# 1. A loader that reshuffles would pair student inputs with the wrong teacher targets.
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_shuffling_dataloader_is_refused(tmp_path, mode):
    x = torch.cat(data())
    dl = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match="same batches in the same order every pass: use shuffle=False"):
        run(mlp(), dl, tmp_path, mode=mode)


class Reshuffles:
    """Re-iterable, but each pass yields the batches in another order (not a DataLoader: caught on the re-read)."""

    def __init__(self, batches):
        self.batches, self.n = batches, 0

    def __iter__(self):
        self.n += 1
        perm = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.n))
        return iter([self.batches[i] for i in perm.tolist()])


def test_reshuffling_iterable_is_refused_on_reread(tmp_path):
    with pytest.raises(ValueError, match=r"use shuffle=False; the pass for slice 'fc2' \(sequential mode\)"):
        run(mlp(), Reshuffles(data()), tmp_path, mode="sequential")


# 8. A one-shot iterator cannot be read again.
def test_one_shot_iterator(tmp_path):
    with pytest.raises(ValueError, match="one-shot iterator.*a list of batches or a DataLoader"):
        run(mlp(), iter(data()), tmp_path / "s", mode="sequential")
    res = run(mlp(), iter(data()), tmp_path / "p", mode="parallel")  # read once: fine
    assert sorted(res.trained) == ["fc1", "fc2", "fc3"]


# 2. Groups must be consecutive siblings, in order.
@pytest.mark.parametrize(
    "group, match",
    [
        ("fc1+fc3", r"'fc1\+fc3'.*skip act1, fc2, act2"),
        ("fc2+act1+fc1", r"'fc2\+act1\+fc1'.*not in the order.*fc1\+act1\+fc2"),
        ("seq.0+seq.2", r"skip seq.1"),
        ("fc1+seq.0", r"must share one parent"),
    ],
)
def test_group_must_be_consecutive_siblings(group, match):
    model = MLP()
    model.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=match):
        make_slices(model, [group])
    assert make_slices(model, ["fc1+act1+fc2", "seq.0+seq.1"])  # consecutive groups are fine


# 9. A shared module (or tied parameter) would be untied in the student.
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.inp = nn.Linear(8, 8), nn.Linear(8, 8)
        self.enc1, self.enc2 = nn.Sequential(self.proj, nn.ReLU()), nn.Sequential(self.proj, nn.ReLU())
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(self.enc2(self.enc1(self.inp(x)))))


@pytest.mark.parametrize(
    "name, match",
    [
        ("enc1", r"'enc1.0' is shared with proj, enc2.0"),
        ("proj", r"'proj' is shared with enc1.0, enc2.0"),
        ("enc2.0", r"'enc2.0' is shared: the same module is also proj, enc1.0"),
        ("a", r"parameter a.weight is tied to b.weight"),
    ],
)
def test_shared_modules_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        make_slices(Tied(), [name])
    assert make_slices(Tied(), ["inp", "enc1.1"])


# 3. Extra positional arguments of a slice's first module are replayed.
class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x, gate=None):
        y = self.lin(x)
        return y * gate if gate is not None else y


class TwoIn(nn.Module):
    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.ea, self.eb, self.block, self.head = nn.Linear(32, 32), nn.Linear(16, 32), Gated(), nn.Linear(32, 4)

    def forward(self, a, b):
        g = torch.sigmoid(self.eb(b))
        return self.head(self.block(self.ea(a), gate=g) if self.keyword else self.block(self.ea(a), g))


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_positional_gate_is_replayed(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    batches = [{"a": torch.randn(8, 32, generator=g), "b": torch.randn(8, 16, generator=g)} for _ in range(4)]
    losses = []
    for keyword in (True, False):
        torch.manual_seed(0)
        t = TwoIn(keyword).eval()
        res = run(t, batches, tmp_path / str(keyword), slices=["ea", "block"], ratio=1.5, mode=mode)
        losses.append(res.slices["block"].init_loss)
    assert losses[0] == losses[1]  # the gate given positionally is replayed exactly as the keyword one


class Star(nn.Module):
    def forward(self, x, *gates):
        return x * gates[0] + gates[1]


def test_positional_args_without_names_are_replayed():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = Star()

        def forward(self, x):
            return self.s(x, torch.full_like(x, 2.0), 1.5)

    x = torch.randn(4, 3)
    store = capture_features(M(), [SliceSpec("s", ("s",))], [x], progress=False)["s"]
    (xi, y, kw) = next(store.chunks())
    assert EXTRA_ARGS in kw and kw[EXTRA_ARGS][1] == 1.5
    torch.testing.assert_close(run_slice([Star()], xi, kw), y)


# 4. A rerun with other calibration data does not reuse the slices; the same data resumes.
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_rerun_with_other_data(tmp_path, mode):
    run(mlp(), data(), tmp_path, mode=mode)
    with pytest.raises(ValueError, match=r"holds the slices of another run \(the calibration data differ"):
        run(mlp(), data(seed=7, scale=10.0), tmp_path, mode=mode)
    res = run(mlp(), data(), tmp_path, mode=mode)
    assert sorted(res.resumed) == ["fc1", "fc2", "fc3"] and not res.trained


# 5. The caller's model keeps its training flags.
def test_training_flags_restored(tmp_path):
    t = mlp().train()
    t.fc2.eval()  # mixed flags survive too
    run(t, data(), tmp_path, mode="sequential")
    assert t.training and t.fc1.training and not t.fc2.training


# 6. Spilled features are removed once the slices are trained.
@pytest.mark.parametrize("mode, slices", [("parallel", ["fc1", "fc2"]), ("sequential", ["fc1", "fc2", "fc3"])])
def test_spill_folders_removed(tmp_path, monkeypatch, mode, slices):
    real, shards = runner.train_slice, []

    def spy(container, spec, store, **kw):
        shards.append(store.num_shards)
        return real(container, spec, store, **kw)

    monkeypatch.setattr(runner, "train_slice", spy)
    run(mlp(), data(), tmp_path, mode=mode, slices=slices, memory_budget_bytes=4096)
    assert shards and all(n > 0 for n in shards)  # the features were spilled while training
    assert not (tmp_path / "features").exists()


# 7. Spilling keeps the training batch size.
def test_spilled_batches_span_shards(tmp_path):
    store = FeatureStore(tmp_path, memory_budget_bytes=1)  # one 4-sample chunk per shard
    for i in range(10):
        store.add(torch.full((4, 2), float(i)), torch.zeros(4, 2))
    assert store.num_shards == 10
    sizes = [len(x) for x, _, _ in store.batches(16, torch.Generator().manual_seed(0))]
    assert sizes == [16, 16, 8]
