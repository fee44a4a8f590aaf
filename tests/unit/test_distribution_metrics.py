"""FID, KID, Inception Score and precision/recall: formulas against closed forms and reference
implementations (torchmetrics, torch-fidelity), the metrics, the reference cache, and the real
Inception loading path with a weight file built in the test (no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unfog.errors import ConfigError, DataError
from unfog.protocols import Metric
from unfog_metrics import distribution as D
from unfog_metrics.features import (
    INCEPTION_FILE,
    INCEPTION_URL,
    FeatureExtractor,
    _import_inception,
    extractor_from,
    inception_cache_path,
    inception_preprocess,
    module_extractor,
)
from unfog_metrics.reference import cache_root, load_reference_file, reference_features


def _net(dim: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, dim))
    net.num_features = dim  # what torchmetrics reads from a custom feature module
    return net


def _images(n: int, seed: int, shift: float = 0.0, c: int = 3, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, size, size, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


class TinyImages(torch.utils.data.Dataset):
    """Items {"x": 3×8×8 image in [-1, 1], "label"}, as unfog datasets give them."""

    data_shape = (3, 8, 8)
    data_range = (-1.0, 1.0)
    num_classes = 2

    def __init__(self, n: int = 30, seed: int = 0) -> None:
        self.x = _images(n, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": i % 2}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UNFOG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- formulas ------------------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(50, 8))
    mu, sigma = D.feature_statistics(f)
    assert D.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    rot, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    s1, s2 = rot @ np.diag(a) @ rot.T, rot @ np.diag(b) @ rot.T  # commuting: tr√(S1S2) = Σ√(ab)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert D.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # non-commuting covariances: against scipy's general matrix square root
    from scipy import linalg

    c1, c2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = c1 @ c1.T + 0.1 * np.eye(4), c2 @ c2.T + 0.1 * np.eye(4)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert D.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # singular covariances (fewer samples than dimensions) stay finite and non-negative
    f, g = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    value = D.frechet_distance(*D.feature_statistics(f), *D.feature_statistics(g))
    assert np.isfinite(value) and value > 0
    with pytest.raises(DataError, match="same extractor"):
        D.frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def test_fid_metric_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = _net()
    real, fake = _images(40, 0), _images(40, 1, shift=0.3)
    ours = D.FID(extractor=module_extractor(net, "tiny"), device="cpu")
    ours.update(generated=fake, real=real)
    theirs = FrechetInceptionDistance(feature=net, normalize=True)
    theirs.update(real, real=True)
    theirs.update(fake, real=False)
    expected = float(theirs.compute())
    assert expected > 0.01
    assert ours.compute()["fid"] == pytest.approx(expected, rel=1e-3)


def _mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")
def test_kid_formula_and_torchmetrics():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1, size=(5, 3))
    assert D.polynomial_mmd2(x, y) == pytest.approx(_mmd2_by_loops(x, y), rel=1e-12)
    # subsets as large as the sets: every subset is the whole set (up to order), std 0
    mean, std = D.kernel_inception_distance(x, y, subsets=4, subset_size=100)
    assert mean == pytest.approx(_mmd2_by_loops(x, y), rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)

    from torchmetrics.image.kid import KernelInceptionDistance

    net = _net(dim=5)
    real, fake = _images(30, 3), _images(30, 4, shift=0.2)
    ours = D.KID(extractor=module_extractor(net, "tiny"), device="cpu", subsets=3, subset_size=30)
    ours.update(generated=fake, real=real)
    theirs = KernelInceptionDistance(feature=net, subsets=1, subset_size=30)
    theirs.update(real, real=True)
    theirs.update(fake, real=False)
    result = ours.compute()
    assert result["kid"] == pytest.approx(float(theirs.compute()[0]), rel=1e-4, abs=1e-9)
    assert result["kid_std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_are_seeded():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 4)), rng.normal(size=(40, 4))
    a = D.kernel_inception_distance(x, y, subsets=5, subset_size=10, seed=1)
    assert a == D.kernel_inception_distance(x, y, subsets=5, subset_size=10, seed=1)
    assert a != D.kernel_inception_distance(x, y, subsets=5, subset_size=10, seed=2) and a[1] > 0


def test_inception_score_closed_forms_and_torch_fidelity():
    assert D.inception_score(np.zeros((20, 7)), splits=4) == pytest.approx((1.0, 0.0))
    one_hot = 100.0 * np.eye(6)
    assert D.inception_score(one_hot, splits=1)[0] == pytest.approx(6.0, rel=1e-6)
    assert D.inception_score(one_hot, splits=50)[0] == pytest.approx(1.0)  # splits capped at N: one per part
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(23, 9, generator=torch.Generator().manual_seed(0)) * 3
    theirs = isc_features_to_metric(logits, splits=3, shuffle=True, rng_seed=2020)
    mean, std = D.inception_score(logits.numpy(), splits=3)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-8)


def test_precision_recall_closed_forms_and_torch_fidelity():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 5))
    assert D.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert D.precision_recall(x, x + 100.0) == (0.0, 0.0)
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = rng.normal(size=(40, 5)), rng.normal(0.7, 1.3, size=(35, 5))
    expected = calculate_precision_recall_full(torch.tensor(fake), torch.tensor(real), 3)
    # torch-fidelity's shares are float32 means
    assert D.precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected, abs=1e-6)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    with pytest.raises(DataError, match="more than k=3"):
        D.precision_recall(real[:3], fake)


# --- metrics -------------------------------------------------------------------------------------


def _metrics(extractor: FeatureExtractor) -> list:
    return [D.FID(extractor=extractor, device="cpu"), D.KID(extractor=extractor, device="cpu", subsets=5),
            D.PrecisionRecall(extractor=extractor, device="cpu")]


def test_metrics_with_real_update_are_reproducible_and_json_protocols():
    ex = module_extractor(_net(), "tiny", logits_module=_net(dim=4, seed=1))
    real, fake = _images(24, 5), _images(24, 6, shift=0.4)
    metrics = [*_metrics(ex), D.InceptionScore(extractor=ex, device="cpu", splits=3)]
    for m in metrics:
        assert isinstance(m, Metric)
        m.update(generated=fake[:12], real=real[:12])
        m.update(generated=fake[12:], real=real[12:])
        result = m.compute()
        assert result and all(isinstance(v, float) and np.isfinite(v) for v in result.values())
        m.reset()
        m.update(generated=fake, real=real)
        assert m.compute() == result
        proto = json.loads(json.dumps(m.protocol()))
        assert proto["metric"] == m.name and proto["num_generated"] == 24
        assert proto["feature_extractor"]["weights_sha256"] == ex.weights_sha256
        assert proto["reference"] == (None if m.name == "inception_score" else {"source": "real", "num": 24})
    assert not hasattr(metrics[3], "set_reference")  # the score needs no reference: nothing to compute
    assert set(metrics[1].compute()) == {"kid", "kid_std"}
    assert set(metrics[3].compute()) == {"inception_score", "inception_score_std"}
    precision, recall = metrics[2].compute().values()
    assert 0 <= precision <= 1 and 0 <= recall <= 1


def test_metrics_refuse_points_missing_references_and_bad_arguments():
    ex = module_extractor(_net(), "tiny")
    for m in _metrics(ex):
        with pytest.raises(DataError, match="sliced_wasserstein.*mmd"):
            m.update(generated=torch.randn(10, 2))
        m.update(generated=_images(8, 0))
        with pytest.raises(DataError, match="set_reference.*real=.*reference="):
            m.compute()
    with pytest.raises(ConfigError, match="no class logits"):
        D.InceptionScore(extractor=ex).update(generated=_images(4, 0))
    with pytest.raises(ConfigError, match="subsets"):
        D.KID(extractor=ex, subsets=0)
    with pytest.raises(ConfigError, match="weights"):
        D.FID(extractor=ex, weights="x.pth")
    with pytest.raises(ConfigError, match="unfog train-classifier"):
        extractor_from("classifier", None)
    with pytest.raises(ConfigError, match="'inception', 'classifier'"):
        extractor_from("clip", None)


def test_greyscale_images_of_any_size_work():
    net = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten())
    m = D.FID(extractor=module_extractor(net, "pool"), device="cpu")
    m.update(generated=_images(12, 0, c=1, size=5), real=_images(12, 1, c=1, size=5))
    assert m.compute()["fid"] > 0


def test_set_reference_is_cached_by_hash_and_survives_reset(cache):
    ex = module_extractor(_net(), "tiny")
    data, config = TinyImages(30), {"_name_": "tiny", "n": 30}
    first = D.FID(extractor=ex, device="cpu", reference_samples=20)
    first.set_reference(data, config)
    proto = first.protocol()["reference"]
    assert proto["source"] == "dataset" and proto["cached"] is False and proto["num"] == 20
    path = cache_root() / "reference" / f"{proto['key']}.npz"
    assert path.is_file() and path.with_suffix(".json").is_file() and cache_root() == cache
    assert proto["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert proto["dataset_config"] == config

    second = D.FID(extractor=ex, device="cpu", reference_samples=20)
    second.set_reference(data, config)
    again = second.protocol()["reference"]
    assert again["cached"] is True and again["key"] == proto["key"] and again["sha256"] == proto["sha256"]

    fake = _images(16, 9, shift=0.3)
    for m in (first, second):
        m.update(generated=fake)
    assert first.compute() == second.compute()
    first.reset()
    first.update(generated=fake)
    assert first.compute() == second.compute()  # reset keeps the reference

    pr = D.PrecisionRecall(extractor=ex, device="cpu", reference_samples=100)  # all 30 items
    pr.set_reference(data, config)
    pr.update(generated=data.x[:10])  # real items are inside the real manifold
    assert pr.compute()["precision"] == 1.0 and pr.compute() == pr.compute()


def test_reference_key_depends_on_extractor_config_and_count(cache):
    data, config = TinyImages(12), {"_name_": "tiny", "n": 12}
    a, b = module_extractor(_net(seed=0), "tiny"), module_extractor(_net(seed=1), "tiny")
    ref = reference_features(a, data, config, 8)
    assert not ref.cached and ref.features.shape == (8, 6) and ref.features.dtype == np.float32
    same = reference_features(a, data, config, 8)
    assert same.cached and same.sha256 == ref.sha256 and np.array_equal(same.features, ref.features)
    assert reference_features(b, data, config, 8).key != ref.key
    assert reference_features(a, data, {**config, "n": 13}, 8).key != ref.key
    every = reference_features(a, data, config, 100)  # more than the dataset: all items
    assert every.key != ref.key and every.num == 12
    assert len(list((cache / "reference").glob("*.npz"))) == 4


def test_set_reference_refuses_point_datasets(cache):
    class Points(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": torch.zeros(2)}

    with pytest.raises(DataError, match="sliced_wasserstein"):
        D.KID(extractor=module_extractor(_net(), "tiny")).set_reference(Points(), {"_name_": "toy2d"})


def test_reference_files(tmp_path):
    ex = module_extractor(_net(), "tiny")
    real, fake = _images(20, 0), _images(20, 1, shift=0.3)
    feats = ex.features(real).numpy()
    np.savez(tmp_path / "feats.npz", features=feats)
    mu, sigma = D.feature_statistics(feats)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    direct = D.FID(extractor=ex, device="cpu")
    direct.update(generated=fake, real=real)
    for name in ("feats.npz", "stats.npz"):
        m = D.FID(extractor=ex, device="cpu", reference=str(tmp_path / name))
        m.update(generated=fake)
        assert m.compute()["fid"] == pytest.approx(direct.compute()["fid"], rel=1e-5)
        ref = m.protocol()["reference"]
        assert ref["source"] == str(tmp_path / name)
        assert ref["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    kid = D.KID(extractor=ex, device="cpu", reference=str(tmp_path / "stats.npz"))
    kid.update(generated=fake)
    with pytest.raises(DataError, match="only 'mu' and 'sigma'"):
        kid.compute()
    with pytest.raises(DataError, match="does not exist"):
        load_reference_file(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", something=feats)
    with pytest.raises(DataError, match="expected 'features'"):
        load_reference_file(tmp_path / "other.npz")


# --- Inception through torch-fidelity ------------------------------------------------------------


def _no_download(*args, **kwargs):
    raise AssertionError("tried to download")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's Inception-v3 state dict with random (variance-keeping) weights, built offline."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("x", ["2048"])
    finally:
        mp.undo()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_loads_a_weight_file_and_extracts(inception_file, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", _no_download)
    ex = extractor_from("inception", weights=str(inception_file), device="cpu")
    assert isinstance(ex, FeatureExtractor)
    images = _images(2, 0, size=8)
    features = ex.features(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64 and torch.isfinite(features).all()
    assert features.std() > 0 and not torch.allclose(features[0], features[1])
    logits = ex.logits(images[1:])
    assert logits.shape == (1, 1008) and torch.isfinite(logits).all()
    info = json.loads(json.dumps(ex.describe()))
    assert info["weights_sha256"] == hashlib.sha256(inception_file.read_bytes()).hexdigest() == ex.weights_sha256
    assert info["name"] == "inception-v3-compat" and info["feature_dim"] == 2048
    with pytest.raises(DataError, match="C = 1 or 3"):
        ex.features(torch.zeros(1, 2, 8, 8))


def test_inception_preprocessing_rounds_to_uint8_rgb():
    grey = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.5, float("nan")]).reshape(1, 1, 2, 3)
    out = inception_preprocess(grey)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 3)
    assert out[0, 0].flatten().tolist() == [0, 64, 128, 255, 255, 128]  # round((x + 1)·127.5), NaN → 0
    assert torch.equal(out, inception_preprocess(grey.repeat(1, 3, 1, 1)))


def test_inception_weights_from_the_torch_hub_cache_or_a_clear_error(inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        D.FID(device="cpu")
    assert INCEPTION_URL in str(err.value) and str(inception_cache_path()) in str(err.value)
    assert "extractor_weights=" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        extractor_from("inception", weights=str(tmp_path / "nowhere.pth"))
    inception_cache_path().parent.mkdir(parents=True)
    inception_cache_path().symlink_to(inception_file)
    assert extractor_from("inception", device="cpu").weights_sha256 == file_sha(inception_file)
    assert extractor_from("inception", weights=str(inception_file.parent), device="cpu").path == inception_file


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inception_refuses_wrong_files_and_missing_torch_fidelity(tmp_path, monkeypatch):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not hold torch-fidelity's Inception"):
        extractor_from("inception", weights=str(tmp_path / "other.pth"), device="cpu")
    torch.save({"fc": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # not a plain state dict
    with pytest.raises(ConfigError, match="not a loadable PyTorch state dict"):
        extractor_from("inception", weights=str(tmp_path / "pickled.pth"), device="cpu")
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ConfigError, match=r"pip install 'unfog\[eval\]'"):
        _import_inception()
