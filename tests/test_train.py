"""morph() and Manifold on a tiny MLP with random data (fast), plus bad input."""

import subprocess
import sys

import pytest
import torch

import morphkit as mk
from morphkit.errors import CheckpointError, ConfigError, TrainingError


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


CFG = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                     train=mk.TrainConfig(steps=4, eval_compressions=(0.0, 0.5)), samples=3)


@pytest.fixture(scope="module")
def trained():
    model = mk.build_model("mlp?hidden=[24,12]")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = mk.morph(model, _data(), example_inputs=torch.zeros(1, 1, 28, 28), config=CFG, eval_data=_data(1, 1),
                 progress=False)
    return model, before, m


def test_caller_model_untouched(trained):
    model, before, _ = trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sample_is_a_smaller_standard_model(trained):
    _, _, m = trained
    full, half = m.sample(1.0), m.sample(0.5)
    count = mk.export.count_params
    assert count(half) < count(full)
    assert half.layers[0].out_features == 12 and half.layers[1].out_features == 6
    assert half(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert half.morphkit_widths == m.width_map(0.5)
    assert set(m.info["final"]) == {"0", "0.5"} and "base_metrics" in m.info


def test_sampling_is_deterministic_and_averaging_changes_weights(trained):
    _, _, m = trained
    a, b = m.predict(0.5, samples=3, seed=1), m.predict(0.5, samples=3, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = m.predict(0.5, samples=1)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_morph_is_deterministic_for_a_seed(trained):
    model, _, m = trained
    again = mk.morph(model, _data(), example_inputs=torch.zeros(1, 1, 28, 28), config=CFG, progress=False)
    for (k, v), w in zip(m.inr.state_dict().items(), again.inr.state_dict().values()):
        assert torch.equal(v, w), k


def test_save_load_same_weights_in_a_new_process(trained, tmp_path):
    _, _, m = trained
    p = tmp_path / "m.morph.safetensors"
    m.save(p)
    live = m.sample(0.5)
    ref = mk.Manifold.load(p).sample(0.5)
    for k, v in live.state_dict().items():  # in memory vs reloaded: float32 round-off at most
        assert torch.allclose(v, ref.state_dict()[k], rtol=1e-5, atol=1e-7), k
    # same thread count as here: a float sum's order (and its last bits) depends on it
    code = (f"import morphkit as mk, torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"n = mk.Manifold.load({str(p)!r}).sample(0.5); "
            "print(repr(sum(float(t.double().sum()) for t in n.state_dict().values())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out.strip()) == sum(float(t.double().sum()) for t in ref.state_dict().values())
    exported = tmp_path / "w50.safetensors"
    mk.save_model(ref, exported)
    net = mk.load_model(exported)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), net.state_dict().values()))


def test_manifold_file_keeps_the_trained_base(trained, tmp_path):
    _, _, m = trained
    p = tmp_path / "m.morph.safetensors"
    m.save(p)
    loaded = mk.Manifold.load(p)
    assert m.base_is_trained and loaded.base_is_trained
    for k, v in m.base.state_dict().items():
        assert torch.equal(v, loaded.base.state_dict()[k]), k


@pytest.mark.parametrize("width", [0, -0.5, 1.5, float("nan"), "half", None, {99: 3}, {0: 0}])
def test_bad_widths(trained, width):
    with pytest.raises(ConfigError):
        trained[2].sample(width)


def test_bad_samples(trained):
    with pytest.raises(ConfigError, match="samples"):
        trained[2].sample(0.5, samples=0)


def test_manifold_for_another_model_and_corrupt_files(trained, tmp_path):
    _, _, m = trained
    p = tmp_path / "m.safetensors"
    m.save(p)
    with pytest.raises(CheckpointError, match="another model"):
        mk.Manifold.load(p, base=mk.build_model("lenet5"))
    data = p.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError):
        mk.Manifold.load(tmp_path / "t.safetensors")
    mk.save_model(mk.build_model("lenet5"), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="manifold"):
        mk.Manifold.load(tmp_path / "model.safetensors")


def test_nan_loss_stops_with_a_clear_error():
    def nan_loss(model, batch):
        return model(batch[0]).sum() * float("nan")

    with pytest.raises(TrainingError, match="step 0"):
        mk.morph(mk.build_model("mlp?hidden=[8,8]"), _data(1), example_inputs=torch.zeros(1, 1, 28, 28),
                 config=CFG, loss_fn=nan_loss, progress=False)


def test_forward_failure_and_bad_inputs():
    with pytest.raises(mk.UnsupportedModelError, match="forward fails"):
        mk.morph(mk.build_model("lenet5"), _data(1), example_inputs=torch.zeros(1, 3, 5, 5), config=CFG,
                 progress=False)
    with pytest.raises(ConfigError, match="example_inputs"):
        mk.morph(mk.build_model("lenet5"), _data(1), example_inputs="x", config=CFG, progress=False)


def test_pure_inr_option_trains():
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4, residual=False),
                         train=mk.TrainConfig(steps=2), samples=2)
    m = mk.morph(mk.build_model("mlp?hidden=[8,8]"), _data(2), example_inputs=torch.zeros(1, 1, 28, 28),
                 config=cfg, progress=False)
    assert not m.inr.residual and m.sample(0.5)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("inr_kw", [{"precision": "bfloat16"}, {"base_noise": False},
                                    {"resample": "area", "train_base": True}])
def test_inr_options_train_save_and_load(inr_kw, tmp_path):
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4, **inr_kw),
                         train=mk.TrainConfig(steps=3), samples=3)
    m = mk.morph(mk.build_model("mlp?hidden=[8,8]"), _data(2), example_inputs=torch.zeros(1, 1, 28, 28),
                 config=cfg, progress=False)
    m.save(tmp_path / "m.safetensors")
    back = mk.Manifold.load(tmp_path / "m.safetensors")
    assert back.config.inr == cfg.inr
    a, b = m.predict(0.5, seed=1), back.predict(0.5, seed=1)
    for k in a:  # (base_noise=False can differ in the last bit: summation order of the K draws)
        assert a[k].dtype == torch.float32 and torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9), k


def test_ema_update_is_the_decayed_average_with_warm_up():
    from morphkit.train import _ema_update

    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    _ema_update(ema, model, 0.995, step=10_000)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.995 * b + 0.005 * m, atol=1e-7)
    _ema_update(ema, model, 0.995, step=0)  # warm-up: decay min(0.995, 1/10)
    _ema_update(ema, model, 0.0, step=5)  # no EMA: a copy
    assert all(torch.equal(e, m) for e, m in zip(ema.parameters(), model.parameters()))


def test_reconstruction_is_zero_at_the_base_and_unbiased_over_tensor_subsets():
    from morphkit.train import _recon_loss

    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    man = mk.morph(mk.build_model("lenet5"), [(x, torch.randint(0, 10, (8,)))], example_inputs=x[:1],
                   config=mk.MorphConfig(train=mk.TrainConfig(steps=1, lr=1e-12)), progress=False)
    inr, b = man.inr, man.builder
    table = b.table(b.full())
    state = man.base.state_dict()
    targets = [b.to_rows(k, table, state[lt.name].float()) for k, lt in enumerate(b.layouts)]
    norms = [t.pow(2).mean() for t in targets]
    gen = torch.Generator().manual_seed(0)

    def loss(fraction: float) -> float:
        with torch.no_grad():
            return float(_recon_loss(inr, table, targets, norms, fraction, 0.0, gen, torch.device("cpu")))

    assert loss(1.0) < 1e-8 and loss(0.25) < 1e-8  # the residual INR starts at the base
    j = [lt.name for lt in b.layouts].index("conv2.weight")
    with torch.no_grad():
        getattr(inr, f"grid{j}").add_(0.5 * b.layouts[j].scale)  # only conv2's weights are off
    full = loss(1.0)
    assert full > 0
    one = 1 / len(targets)  # one tensor per draw: nonzero only when conv2 is drawn
    draws = [loss(one) for _ in range(400)]
    assert 0 < sum(d > 0 for d in draws) < 400
    assert abs(sum(draws) / len(draws) - full) < 0.25 * full  # the average over draws estimates the full loss


def test_base_jitter_trains_deterministically_and_samples_exact_cells():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    data = [(x, torch.randint(0, 10, (16,)))]
    model = mk.build_model("lenet5")
    cfg = mk.MorphConfig(train=mk.TrainConfig(steps=3, base_jitter=0.75, compression=(0.4, 0.5)))
    runs = [mk.morph(model, data, example_inputs=x[:1], config=cfg, progress=False) for _ in range(2)]
    a, b = (m.inr.state_dict() for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same jittered merges
    plain = mk.morph(model, data, example_inputs=x[:1], progress=False,
                     config=mk.MorphConfig(train=mk.TrainConfig(steps=3, compression=(0.4, 0.5))))
    assert any(not torch.equal(a[k], plain.inr.state_dict()[k]) for k in a)  # the jitter changed training
    w1, w2 = runs[0].predict(0.5, samples=2), runs[0].predict(0.5, samples=2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # sampling reads exact cells: no jitter there


@pytest.mark.parametrize("entry", ["morph", "fit"])
def test_training_leaves_the_callers_global_rng_alone(entry):
    # morph() and fit() seed torch's global generator for determinism; the caller's stream must not move
    model = mk.build_model("mlp?hidden=[24,12]")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    if entry == "morph":
        cfg = mk.MorphConfig(inr=CFG.inr, train=mk.TrainConfig(steps=2, eval_compressions=(0.0,), seed=7))
        mk.morph(model, _data(2), example_inputs=torch.zeros(1, 1, 28, 28), config=cfg, progress=False)
    else:
        mk.fit(model, _data(2), epochs=1, seed=7, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_fit_bf16_trains_conv_nets_and_returns_plain_float32_weights(tmp_path):
    # bf16 autocast + channels-last: the result must be a normal fp32, contiguous model that saves and learns
    model = mk.build_model("lenet5")
    data = _data(6)
    plain, h32 = mk.fit(model, data, epochs=3, optimizer="adam", lr=2e-3, progress=False)
    net, h16 = mk.fit(model, data, epochs=3, optimizer="adam", lr=2e-3, precision="bf16", progress=False)
    assert h16.train_loss[-1] < h16.train_loss[0]  # it learns
    assert abs(h16.train_loss[-1] - h32.train_loss[-1]) < 0.25 * h32.train_loss[0]  # and like fp32 does
    for k, v in net.state_dict().items():
        assert v.dtype == plain.state_dict()[k].dtype and v.is_contiguous(), k
    again, _ = mk.fit(model, data, epochs=3, optimizer="adam", lr=2e-3, precision="bf16", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    mk.save_model(net, tmp_path / "bf16.safetensors")
    x = data[0][0]
    assert torch.allclose(mk.load_model(tmp_path / "bf16.safetensors")(x), net(x))


def test_fit_rejects_an_unknown_precision():
    with pytest.raises(ConfigError, match="precision"):
        mk.fit(mk.build_model("lenet5"), _data(1), epochs=1, precision="fp16", progress=False)


def test_recalibrate_bn_restores_its_modules_and_rejects_empty_data():
    from morphkit.manifold import recalibrate_bn

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3)).eval()
    net[1].weight.data.fill_(2.0)
    x = torch.randn(8, 1, 6, 6) * 3 + 1
    assert recalibrate_bn(net, [(x, None)]) == 1
    bn = net[1]
    assert not bn.training and bn.momentum == 0.3  # mode and momentum restored
    pre = net[0](x).transpose(0, 1).reshape(4, -1)
    assert torch.allclose(bn.running_mean, pre.mean(1), atol=1e-5)  # the statistics of the data seen
    with pytest.raises(ConfigError, match="no batch"):
        recalibrate_bn(net, [])
    assert not bn.training and bn.momentum == 0.3


def test_fit_keeps_folded_batchnorms_as_identities():
    # fit() sets train mode each epoch; a folded BN in train mode would normalise with batch statistics and
    # overwrite its (0, 1) running statistics, silently changing the fused network's function
    torch.manual_seed(0)
    net = mk.build_model("resnet20")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fused = mk.fuse_bn(net.eval())
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    tuned, _ = mk.fit(fused, data, epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0, progress=False)
    buffers = {k: v for k, v in fused.state_dict().items() if "running" in k}
    assert buffers and all(torch.equal(tuned.state_dict()[k], v) for k, v in buffers.items())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(tuned(x), fused(x), atol=1e-5)


def test_sampled_custom_model_saves_and_loads_with_its_base(tmp_path):
    # the export path of a user's own class: load_model(base=...) must resize it without a registry input shape
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 5)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.conv(x).relu().mean((2, 3)))

    cfg = mk.MorphConfig(inr=CFG.inr, train=mk.TrainConfig(steps=2, eval_compressions=(0.0,)))
    man = mk.morph(Net(), _data(1), example_inputs=torch.zeros(1, 1, 28, 28), config=cfg, progress=False)
    small = man.sample(0.5, samples=1)
    mk.save_model(small, tmp_path / "small.safetensors")
    back = mk.load_model(tmp_path / "small.safetensors", base=Net())
    x = _data(1, 3)[0][0]
    assert back.conv.out_channels == 4 and torch.equal(back(x), small(x))


def test_fold_rows_merges_cells_with_box_filters_and_composes_when_cells_nest():
    from morphkit.manifold import fold_rows

    rows = torch.randn(8 * 6, 3, generator=torch.Generator().manual_seed(0))
    out = fold_rows(rows, (8, 6), (4, 3))
    grid = rows.view(8, 6, 3)
    want = grid.view(4, 2, 3, 2, 3).mean((1, 3))  # every 2 x 2 block of cells averaged
    assert torch.allclose(out.view(4, 3, 3), want, atol=1e-6)
    assert torch.allclose(fold_rows(fold_rows(rows, (8, 6), (4, 3)), (4, 3), (2, 1)),
                          fold_rows(rows, (8, 6), (2, 1)), atol=1e-6)  # 8 -> 4 -> 2 is 8 -> 2
    assert torch.equal(fold_rows(rows, (8, 6), (8, 6)), rows)


def test_unseen_fold_builds_widths_below_the_trained_range_from_trained_ones(trained):
    _, _, m = trained
    lo, hi = m.config.train.compression
    inside, below = 1 - hi, (1 - hi) / 2
    assert m.fold_sources(m.width_map(inside)) == []
    sources = m.fold_sources(m.width_map(below))
    assert len(sources) == 4
    target = m.width_map(below)
    for src in sources:  # each source is a trained width map, never narrower than the target
        assert all(src[c.id] >= target[c.id] for c in m.cliques)
        assert all(c.fixed or src[c.id] >= c.channels_for(1 - hi) for c in m.cliques)
    a, b = m.predict(inside, samples=2, unseen="fold"), m.predict(inside, samples=2, unseen="inr")
    assert all(torch.equal(a[k], b[k]) for k in a)  # in range: the same predictions
    f, d = m.sample(below, samples=2, unseen="fold"), m.sample(below, samples=2, unseen="inr")
    assert [p.shape for p in f.parameters()] == [p.shape for p in d.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(f.parameters(), d.parameters()))
    again = m.sample(below, samples=2, unseen="fold")
    assert all(torch.equal(p, q) for p, q in zip(f.parameters(), again.parameters()))
    # folded = the mean over sources of each source's rows merged down (checked on one predicted tensor)
    from morphkit.manifold import fold_rows

    k = 0
    lt = m.layouts[k]
    t_table = m.builder.table(target)
    want = torch.stack([fold_rows(m.builder.to_rows(k, m.builder.table(s), m.predict(s, samples=2)[lt.name])
                                  / m.builder.table(s).fan_in[k], m.builder.table(s).cells[k], t_table.cells[k])
                        for s in sources]).mean(0)
    got = m.builder.to_rows(k, t_table, f.state_dict()[lt.name]) / t_table.fan_in[k]
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ConfigError, match="unseen"):
        m.sample(below, unseen="extrapolate")


def test_morph_stages_run_by_hand_give_morphs_manifold(trained):
    """morph() is its named stages in order: running them by hand gives the same INR, bit for bit."""
    from morphkit import train as T
    from morphkit.fit import default_loss

    model, _, m = trained
    x = torch.zeros(1, 1, 28, 28)
    torch.manual_seed(CFG.train.seed)
    manifold, state_dict = T._new_manifold(model, (x,), _data(), CFG, None, rank=0, world=1)
    run = T._start_training(manifold, state_dict, _data(), CFG, default_loss(model), False, T._Checkpoint(),
                            torch.device("cpu"), rank=0, world=1)
    assert run.steps == CFG.train.steps and run.state.step == 0
    seconds, times = T._train_steps(run, manifold, _data(), None, T._Checkpoint(), 100, False, None)
    assert run.state.step == CFG.train.steps and len(times) == CFG.train.steps and seconds > 0
    out = T._finish(manifold, run, None, 0.0, seconds, times)
    assert out.info["steps"] == CFG.train.steps and "final" not in out.info
    for (k, v), w in zip(m.inr.state_dict().items(), out.inr.state_dict().values()):
        assert torch.equal(v, w), k


def test_width_plans_are_cached_per_map_and_bounded(trained, monkeypatch):
    from morphkit import train as T

    _, _, m = trained
    monkeypatch.setattr(T, "PLAN_CACHE", 2)
    plans = T._Plans(m, torch.device("cpu"))
    maps = [m.width_map(w) for w in (1.0, 0.5, 0.25)]
    first = plans(maps[0])
    assert plans(dict(reversed(list(maps[0].items())))) is first  # keyed by the map, not its order
    assert first.template.layers[0].out_features == 24
    plans(maps[1])
    plans(maps[2])  # the least recently used (maps[0]) is dropped
    assert plans(maps[0]) is not first
