"""LawTrackerCallback on a real Hugging Face ``Trainer`` run (tiny random-init Llama, GQA + RoPE, float64, CPU).

Plain SGD under a linear warmup/decay schedule, global-norm clipping that is active and gradient accumulation:
every law's residual against the exact discrete step stays at round-off (so the tracker saw the clipped gradient
and the learning rate each step used); AdamW is reported broken by the optimizer from the measured numbers; the
report is published all-or-nothing.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch

from hf_models import VOCAB, build
from symm.data import byte_tokens
from symm.errors import UsageError
from symm.laws_hf import LawTrackerCallback, write_report
from symm.publish import FAULT_ENV, STAGE_PREFIX

STEPS = 10
MAX_GRAD_NORM = 0.1  # below every step's gradient norm here: clipping is active on every step
SGD_VERDICTS = {"conserved", "drift explained by discrete steps"}


class _Windows(torch.utils.data.Dataset):
    """Byte windows of the bundled Shakespeare plays as causal-LM examples."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """The Trainer must not reach the network (no hub, no reporting integrations)."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access during a Trainer run")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _train(out, optim: str, lr: float, every: int = 1, accumulate: int = 1, model=None, steps: int = STEPS,
           max_grad_norm: float = MAX_GRAD_NORM):
    """Train a tiny model (default: float64 Llama) for ``steps`` optimizer steps with the callback; returns
    (trainer, callback)."""
    from transformers import Trainer, TrainingArguments

    windows = byte_tokens(vocab_size=VOCAB, seq_len=16, n_train=8 * steps * accumulate, n_test=4).train
    model = build("llama-gqa-tied").double().train() if model is None else model
    args = TrainingArguments(
        output_dir=str(out.parent / "trainer"), use_cpu=True, report_to=[], push_to_hub=False, save_strategy="no",
        optim=optim, learning_rate=lr, lr_scheduler_type="linear", warmup_steps=3, max_grad_norm=max_grad_norm,
        weight_decay=0.0, per_device_train_batch_size=8, gradient_accumulation_steps=accumulate, max_steps=steps,
        logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    callback = LawTrackerCallback(every=every, out=out)
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(windows), callbacks=[callback])
    trainer.train()
    return trainer, callback


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sgd") / "laws"
    trainer, callback = _train(out, "sgd", 0.3, accumulate=2)
    return trainer, callback, out


def test_sgd_trainer_run_matches_the_exact_prediction(sgd_run):
    trainer, callback, _ = sgd_run
    tracker = callback.tracker
    assert [r.step for r in tracker.records] == list(range(1, STEPS + 1))
    assert float(tracker.residuals().abs().max()) <= 1e-9
    assert float(tracker.relative_drifts().abs().max()) > 1e-8  # the laws moved: the check is not vacuous
    assert max(r.noether for r in tracker.records) <= 1e-10
    assert {f["verdict"] for f in callback.report["families"]} <= SGD_VERDICTS
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len({round(e["learning_rate"], 12) for e in steps}) >= 5  # warmup from 0, then linear decay
    assert min(e["grad_norm"] for e in steps) > MAX_GRAD_NORM  # clipping active on every step


def test_the_tracker_predicts_with_the_clipped_gradient(sgd_run):
    """With the unclipped gradient the prediction lr^2 h(g) would be off by 1/c^2 (c the clip factor): far from
    round-off. So the round-off residual above means the hooks saw the gradient after clipping."""
    trainer, callback, _ = sgd_run
    tracker = callback.tracker
    norms = [e["grad_norm"] for e in trainer.state.log_history if "loss" in e]
    worst = 0.0
    for record, norm in zip(tracker.records, norms):
        c = min(1.0, MAX_GRAD_NORM / (norm + 1e-6))
        unclipped = torch.where(tracker.linear, record.predicted, record.predicted / c**2)
        worst = max(worst, float(((record.drift - unclipped) / record.scale).abs().max()))
    assert worst > 1e-8
    assert worst > 1e4 * float(tracker.residuals().abs().max())


def test_trainer_logs_carry_a_per_family_summary(sgd_run):
    trainer, callback, _ = sgd_run
    factors = [f["factor"] for f in callback.report["families"]]
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == STEPS
    for entry in steps:
        assert entry["laws/max_residual"] <= 1e-9 and entry["laws/noether"] <= 1e-10
        for factor in factors:
            assert entry[f"laws/{factor}/max_residual"] <= entry["laws/max_residual"]
            assert f"laws/{factor}/max_drift" in entry


def test_report_json_and_plot_are_published(sgd_run):
    _, callback, out = sgd_run
    assert sorted(p.name for p in out.iterdir()) == ["laws.png", "report.json"]
    assert not any(p.name.startswith(STAGE_PREFIX) for p in out.parent.iterdir())
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(callback.report))
    assert (out / "laws.png").stat().st_size > 1000
    assert report["dtype"] == "float64" and report["optimizer"] == "SGD" and report["max_grad_norm"] == MAX_GRAD_NORM
    assert report["n_laws"] == sum(f["laws"] for f in report["families"]) > 0
    assert {f["kind"] for f in report["families"]} == {"positive-scaling", "general-linear", "rotation-scaling"}
    for fam in report["families"]:
        per_law = report["laws"][fam["factor"]]
        assert len(per_law["drift"]) == len(per_law["predicted"]) == len(per_law["residual"]) == fam["laws"]
        assert fam["max_residual"] <= 1e-9 and fam["noether"] <= 1e-10


def test_adamw_is_reported_broken_by_the_optimizer(tmp_path):
    _, callback = _train(tmp_path / "laws", "adamw_torch", 1e-2, every=2)
    tracker = callback.tracker
    assert [r.step for r in tracker.records] == [2, 4, 6, 8, 10]
    assert float(tracker.residuals().abs().max()) > 1e-6
    assert max(r.noether for r in tracker.records) <= 1e-10  # the model symmetry itself holds
    families = json.loads((tmp_path / "laws" / "report.json").read_text())["families"]
    assert families and all(f["verdict"] == "broken by the optimizer" and f["max_residual"] > 1e-6 for f in families)


@pytest.mark.parametrize("name", ["gpt2", "mixtral"])
def test_other_families_under_sgd(tmp_path, name):
    """GPT-2 in float64; Mixtral in float32 (its grouped expert matmul refuses float64), where a step rounds at
    ~1e-7 relative: the default tolerance follows the dtype and the verdicts stay SGD's. Larger steps than above, so
    that float32 drift stands well above float32 round-off."""
    dtype = torch.float32 if name == "mixtral" else torch.float64
    _, callback = _train(tmp_path / "laws", "sgd", 2.0, model=build(name).to(dtype).train(), steps=5, max_grad_norm=1.0)
    report, tracker = callback.report, callback.tracker
    assert report["dtype"] == str(dtype).removeprefix("torch.") and report["tol"] == (1e-6 if name == "mixtral" else 1e-9)
    assert float(tracker.residuals().abs().max()) <= report["tol"]
    assert float(tracker.relative_drifts().abs().max()) > 1e3 * float(tracker.residuals().abs().max())
    assert max(r.noether for r in tracker.records) <= (1e-5 if name == "mixtral" else 1e-10)
    assert {f["verdict"] for f in report["families"]} <= SGD_VERDICTS


def test_report_is_all_or_nothing(sgd_run, tmp_path, monkeypatch):
    """A failure while publishing leaves no report (fresh folder) or the previous complete one (existing folder)."""
    _, callback, out = sgd_run
    fresh = tmp_path / "fresh"
    monkeypatch.setenv(FAULT_ENV, "publish:enospc")
    with pytest.raises(OSError):
        _train(fresh, "sgd", 0.3)
    assert not fresh.exists()
    assert not any(p.name.startswith(STAGE_PREFIX) for p in tmp_path.iterdir())

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    report = dict(callback.report, final_loss=-1.0)
    monkeypatch.setenv(FAULT_ENV, "publish-partial:enospc")  # after the first of the two entries moved in
    with pytest.raises(OSError):
        write_report(out, report, callback.tracker)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_output_that_is_a_file_is_refused_before_training(tmp_path):
    file = tmp_path / "laws"
    file.write_text("x")
    model = build("llama-gqa-tied").double().train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError):
        _train(file, "sgd", 0.3, model=model)
    assert file.read_text() == "x"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
