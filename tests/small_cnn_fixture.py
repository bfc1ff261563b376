"""Writes small Small CNN Zoo folders in the exact published format (a helper for the tests, not a test module).

Runs are trained briefly in TensorFlow layout (HWIO kernels, dense kernel (in, out), NHWC images) on scikit-learn's
digits upsampled to 28x28, and every row's recorded accuracy and loss comes from an independent numpy implementation
of the TF forward pass (VALID padding, stride 2, activation, mean over H and W, dense). Nothing here imports symm.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

#: checkpoints of a run, in the (string) order the published files store them
EPOCH_ORDER = (0, 1, 2, 20, 3, 40, 60, 80, 86)
N_TRAIN = 1200  # digits[:1200] train (minibatches of BATCH, one step per 'epoch')
N_TEST = 400  # digits[-400:] test: the recorded test accuracy / loss
N_TRAIN_METRICS = 200  # the recorded train accuracy / loss use the first 200 training images (cheaper)
BATCH = 64

#: (varname, start, end, TF shape), exactly the published layout.csv
LAYOUT = (
    ("sequential/conv2d/bias:0", 0, 16, (16,)),
    ("sequential/conv2d/kernel:0", 16, 160, (3, 3, 1, 16)),
    ("sequential/conv2d_1/bias:0", 160, 176, (16,)),
    ("sequential/conv2d_1/kernel:0", 176, 2480, (3, 3, 16, 16)),
    ("sequential/conv2d_2/bias:0", 2480, 2496, (16,)),
    ("sequential/conv2d_2/kernel:0", 2496, 4800, (3, 3, 16, 16)),
    ("sequential/dense/bias:0", 4800, 4810, (10,)),
    ("sequential/dense/kernel:0", 4810, 4970, (16, 10)),
)
LAYOUT_CSV = "varname,start_idx,end_idx,size,shape\n" + "".join(
    f'{name},{start},{end},{end - start},"{shape}"\n' for name, start, end, shape in LAYOUT
)
CONFIG_KEYS = (
    "activation", "b_init", "dataset", "dnn_architecture", "dropout", "epochs", "epochs_between_checkpoints",
    "init_std", "l2reg", "learning_rate", "num_layers", "num_units", "optimizer", "random_seed", "train_fraction", "w_init",
)


def digits_nhwc() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, each 8x8 pixel repeated 3x3 and padded by 2: (1797, 28, 28, 1) in [0, 1], labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    up = np.kron(d.images / 16.0, np.ones((1, 3, 3)))
    x = np.pad(up, ((0, 0), (2, 2), (2, 2)))[..., None]
    return x.astype(np.float32), d.target.astype(np.int64)


# ---- the TF forward pass, twice: numpy (records the metrics) and torch (only to train) ------------------------
def _conv_nhwc(x, kernel, bias, concat):
    """VALID, stride 2: out[n, i, j, o] = sum_{dy, dx, c} x[n, 2i + dy, 2j + dx, c] kernel[dy, dx, c, o] + bias[o]."""
    oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    patches = [x[:, dy : dy + 2 * oh - 1 : 2, dx : dx + 2 * ow - 1 : 2, :] for dy in range(3) for dx in range(3)]
    cols = concat(patches, -1).reshape(-1, 9 * x.shape[3])  # (n * oh * ow, 9 c) in (dy, dx, c) order, like the kernel
    out = cols @ kernel.reshape(9 * x.shape[3], -1) + bias
    return out.reshape(x.shape[0], oh, ow, -1)


def numpy_forward(params: dict[str, np.ndarray], x: np.ndarray, activation: str) -> np.ndarray:
    """Logits (float64) of NHWC images under TF-layout parameters keyed by TF variable name."""
    act = {"relu": lambda v: np.maximum(v, 0.0), "tanh": np.tanh}[activation]
    h = x.astype(np.float64)
    for scope in ("conv2d", "conv2d_1", "conv2d_2"):
        k = params[f"sequential/{scope}/kernel:0"].astype(np.float64)
        b = params[f"sequential/{scope}/bias:0"].astype(np.float64)
        h = act(_conv_nhwc(h, k, b, np.concatenate))
    pooled = h.mean(axis=(1, 2))
    return pooled @ params["sequential/dense/kernel:0"].astype(np.float64) + params["sequential/dense/bias:0"].astype(np.float64)


def _torch_forward(params: dict[str, torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    act = torch.relu if activation == "relu" else torch.tanh
    h = x
    for scope in ("conv2d", "conv2d_1", "conv2d_2"):
        h = act(_conv_nhwc(h, params[f"sequential/{scope}/kernel:0"], params[f"sequential/{scope}/bias:0"], torch.cat))
    return h.mean(dim=(1, 2)) @ params["sequential/dense/kernel:0"] + params["sequential/dense/bias:0"]


def _metrics(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, activation: str) -> tuple[float, float, np.ndarray]:
    """(accuracy, mean cross-entropy, predictions) from the numpy forward pass."""
    logits = numpy_forward(params, x, activation)
    z = logits - logits.max(axis=1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))
    pred = logits.argmax(axis=1)
    return float(np.mean(pred == y)), loss, pred


# ---- runs ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    config: dict[str, object]
    checkpoints: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # epoch -> TF params (float32)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    predictions: dict[int, np.ndarray] = field(default_factory=dict)  # epoch -> test-set predictions


def _run_config(rng: np.random.Generator, activation: str) -> dict[str, object]:
    return {
        "activation": activation, "b_init": "zeros", "dataset": "mnist", "dnn_architecture": "cnn",
        "dropout": float(rng.uniform(0, 0.2)), "epochs": 86, "epochs_between_checkpoints": 20,
        "init_std": float(rng.uniform(0.15, 0.5)), "l2reg": float(10 ** rng.uniform(-8, -4)),
        "learning_rate": float(10 ** rng.uniform(-2.3, -1.7)), "num_layers": 3, "num_units": 16, "optimizer": "adam",
        "random_seed": 0, "train_fraction": float(rng.choice([0.1, 0.25, 0.5, 1.0])), "w_init": "RandomNormal",
    }


def _init_params(gen: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, _, _, shape in LAYOUT:
        scale = 0.0 if name.endswith("bias:0") else std
        out[name] = (scale * torch.randn(shape, generator=gen)).requires_grad_(True)
    return out


def train_run(config: dict[str, object], seed: int, x: np.ndarray, y: np.ndarray) -> Run:
    """One run: one Adam step on a minibatch per 'epoch', a checkpoint (params + numpy-forward metrics) at each epoch."""
    gen = torch.Generator().manual_seed(seed)
    params = _init_params(gen, float(config["init_std"]))
    opt = torch.optim.Adam(params.values(), lr=float(config["learning_rate"]))
    xt, yt = torch.from_numpy(x[:N_TRAIN]), torch.from_numpy(y[:N_TRAIN])
    run, act = Run(dict(config)), str(config["activation"])
    for epoch in range(max(EPOCH_ORDER) + 1):
        if epoch in EPOCH_ORDER:
            tf = {k: v.detach().numpy().astype(np.float32).copy() for k, v in params.items()}
            run.checkpoints[epoch] = tf
            test_acc, test_loss, pred = _metrics(tf, x[-N_TEST:], y[-N_TEST:], act)
            train_acc, train_loss, _ = _metrics(tf, x[:N_TRAIN_METRICS], y[:N_TRAIN_METRICS], act)
            run.metrics[epoch] = {"test_accuracy": test_acc, "test_loss": test_loss, "train_accuracy": train_acc, "train_loss": train_loss}
            run.predictions[epoch] = pred
        batch = torch.randint(0, N_TRAIN, (BATCH,), generator=gen)
        loss = torch.nn.functional.cross_entropy(_torch_forward(params, xt[batch], act), yt[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return run


def make_runs(activations: tuple[str, ...] = ("relu", "tanh", "relu", "tanh", "relu", "relu"), seed: int = 0,
              duplicate_config: tuple[int, int] | None = (4, 5)) -> list[Run]:
    """Trained runs; ``duplicate_config=(i, j)`` gives run j the hyperparameters of run i (consecutive look-alikes)."""
    x, y = digits_nhwc()
    rng = np.random.default_rng(seed)
    configs = [_run_config(rng, a) for a in activations]
    if duplicate_config is not None:
        i, j = duplicate_config
        configs[j] = dict(configs[i])
    from threadpoolctl import threadpool_limits  # ships with scikit-learn

    with threadpool_limits(1):  # many small matmuls: one BLAS thread is faster on shared cores
        return [train_run(c, seed * 1000 + k, x, y) for k, c in enumerate(configs)]


# ---- the published files ---------------------------------------------------------------------------------------
def flatten(params: dict[str, np.ndarray]) -> np.ndarray:
    """One row of weights.npy: each TF variable flattened in C order into its layout slice."""
    row = np.zeros(LAYOUT[-1][2], dtype=np.float32)
    for name, start, end, shape in LAYOUT:
        assert params[name].shape == shape
        row[start:end] = params[name].reshape(-1)
    return row


@dataclass
class Written:
    folder: Path
    runs: list[Run]  # the runs written, in file order
    epochs: list[int]  # per weights row
    run_index: list[int]  # per weights row: index into ``runs``
    predictions: np.ndarray  # (rows, n_test) numpy-forward predictions


def write_zoo(folder: Path, runs: list[Run], drop_runs: tuple[int, ...] = ()) -> Written:
    """``weights.npy``, ``layout.csv`` and ``metrics.csv.gz`` of ``runs`` (minus ``drop_runs``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = [r for k, r in enumerate(runs) if k not in drop_runs]
    rows, epochs, run_index, preds, lines = [], [], [], [], []
    for k, run in enumerate(kept):
        for epoch in EPOCH_ORDER:
            m = run.metrics[epoch]
            lines.append([len(rows)] + [run.config[c] for c in CONFIG_KEYS]
                         + [epoch, m["test_accuracy"], m["test_loss"], m["train_accuracy"], m["train_loss"], epoch == 86])
            rows.append(flatten(run.checkpoints[epoch]))
            epochs.append(epoch)
            run_index.append(k)
            preds.append(run.predictions[epoch])
    np.save(folder / "weights.npy", np.stack(rows))
    (folder / "layout.csv").write_text(LAYOUT_CSV)
    header = [""] + [f"config.{c}" for c in CONFIG_KEYS] + ["step", "test_accuracy", "test_loss", "train_accuracy", "train_loss", "laststep"]
    with gzip.open(folder / "metrics.csv.gz", "wt", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows([[repr(v) if isinstance(v, float) else v for v in line] for line in lines])
    return Written(folder, kept, epochs, run_index, np.stack(preds))


def write_split_csv(path: Path, n_rows: int, seed: int = 0) -> np.ndarray:
    """A published-style split file: a stray ``0`` line, then a permutation of the rows (returned)."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    path.write_text("0\n" + "".join(f"{i}\n" for i in perm))
    return perm
