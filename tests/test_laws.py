"""Conservation laws derived from the Spec: counts match theory, every law is orthogonal to the loss gradient
(Noether residual at round-off, float64), one SGD step moves each quadratic law exactly by eta^2 h(g), and
non-laws (controls) fail both checks."""

from __future__ import annotations

import pytest
import torch

from symm.evaluate import functional, state_dict_of
from symm.laws import count_laws, law_families, law_values, law_vector
from symm.models import CNNConfig, MLPConfig, ResidualCNNConfig, ResidualMLPConfig, TransformerConfig, build_model, spec_for

ENTRIES = {
    "mlp-relu": MLPConfig((64, 32, 32, 10), "relu"),
    "mlp-leaky": MLPConfig((64, 16, 16, 10), "leaky_relu"),
    "mlp-swiglu": MLPConfig((64, 16, 16, 10), "swiglu"),
    "cnn-bn-relu": CNNConfig(norm="batch"),
    "cnn-gn-relu": CNNConfig(norm="group"),
    "cnn-none-relu": CNNConfig(norm="none"),
    "resmlp": ResidualMLPConfig(),
    "rescnn": ResidualCNNConfig(),
    "lm-none-gqa": TransformerConfig(pe="none", n_kv_heads=2),
    "lm-sinusoidal-relu": TransformerConfig(pe="sinusoidal", n_kv_heads=2, ffn="relu"),
    "lm-learned-bias": TransformerConfig(pe="learned", attn_bias=True, ffn="gelu"),
    "lm-rope-half": TransformerConfig(pe="rope", n_kv_heads=2, norm="rms", tied=True),
    "lm-rope-interleaved": TransformerConfig(pe="rope", rope_layout="interleaved", n_kv_heads=1),
    "moe-dense-bias": TransformerConfig(ffn="moe", gating="dense", router_bias=True),
    "moe-topk-shared": TransformerConfig(ffn="moe", gating="topk", shared_expert=True),
    "moe-sigmoid": TransformerConfig(ffn="moe", gating="sigmoid"),
}


def _setup(config, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config).double().eval()
    params = state_dict_of(model)
    gen = torch.Generator().manual_seed(seed + 1)
    for k, v in params.items():  # move norms and BatchNorm statistics off their symmetric defaults
        if "running_var" in k:
            params[k] = v + torch.rand(v.shape, generator=gen, dtype=v.dtype)
        elif torch.is_floating_point(v) and ("norm" in k or "running_mean" in k):
            params[k] = v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    if isinstance(config, TransformerConfig):
        x = torch.randint(0, config.vocab_size, (3, 12), generator=gen)
    elif isinstance(config, (CNNConfig, ResidualCNNConfig)):
        x = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    else:
        x = torch.randn(16, config.sizes[0] if hasattr(config, "sizes") else config.d_in, generator=gen, dtype=torch.float64)
    f = functional(model)
    weights = torch.randn(f(params, x).shape, generator=gen, dtype=torch.float64)

    def loss(p):
        return (f(p, x).double().tanh() * weights).sum()

    loss.trainable = frozenset(n for n, _ in model.named_parameters())  # buffers (BatchNorm statistics) are not trained
    return spec_for(model), params, loss


def _grads(fn, params, trainable):
    leaves = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in params.items()}
    value = fn(leaves)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads)}


def _dot(a, b):
    return sum(float((a[k] * b[k]).sum()) for k in a)


def _norm(a):
    return _dot(a, a) ** 0.5


def _noether(spec, params, loss, coefficients) -> float:
    """|<grad(c . h), grad L>| / (||grad(c . h)|| ||grad L||)."""
    gl = _grads(loss, params, loss.trainable)
    gh = _grads(lambda p: (law_vector(spec, p) * coefficients).sum(), params, loss.trainable)
    return abs(_dot(gh, gl)) / max(_norm(gh) * _norm(gl), 1e-300)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_every_law_is_orthogonal_to_the_loss_gradient(name):
    spec, params, loss = _setup(ENTRIES[name])
    n = count_laws(spec)
    if n == 0:
        pytest.fail(f"{name}: expected laws")
    gen = torch.Generator().manual_seed(7)
    for fam_index, fam in enumerate(law_families(spec)):  # each family on its own, random combination of its laws
        mask = torch.cat([torch.full((f.count,), float(i == fam_index), dtype=torch.float64) for i, f in enumerate(law_families(spec))])
        c = mask * torch.randn(n, generator=gen, dtype=torch.float64)
        residual = _noether(spec, params, loss, c)
        assert residual <= 1e-10, f"{name}: family {fam.factor} ({fam.kind}) Noether residual {residual:.2e}"


@pytest.mark.parametrize("name", ["mlp-relu", "lm-rope-half", "lm-none-gqa", "moe-dense-bias", "cnn-bn-relu"])
def test_one_sgd_step_moves_each_law_exactly(name):
    """h(theta - eta g) = h(theta) + eta^2 h(g) for quadratic laws; linear laws unchanged (their h(g) is 0)."""
    spec, params, loss = _setup(ENTRIES[name])
    g = _grads(loss, params, loss.trainable)
    eta = 0.37
    stepped = {k: (v - eta * g[k] if k in g else v) for k, v in params.items()}
    before, after, of_g = law_values(spec, params), law_values(spec, stepped), law_values(spec, {**params, **g})
    scale = sum(float(v.double().pow(2).sum()) for k, v in params.items() if k in g)
    for fam in law_families(spec):
        predicted = before[fam.factor] + (0 if fam.linear else eta**2 * of_g[fam.factor])
        residual = float((after[fam.factor] - predicted).abs().max()) / scale
        assert residual <= 1e-13, f"{name}: {fam.factor} residual {residual:.2e}"
        moved = float((after[fam.factor] - before[fam.factor]).abs().max()) / scale
        if not fam.linear:
            assert moved > 1e3 * max(residual, 1e-18), f"{name}: {fam.factor} did not move at all, the check is vacuous"


def _config_dims(c: TransformerConfig) -> tuple[int, int, int]:
    heads = c.n_heads
    kv = c.n_kv_heads or heads
    return kv, c.d_model // heads, c.n_layers


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mlp-relu", 32 + 32),
        ("mlp-swiglu", 16 + 16),  # up row vs down column per hidden unit; the gate enters no law
        ("cnn-none-relu", sum(CNNConfig().widths)),
    ],
)
def test_law_counts_dense(name, expected):
    spec, _, _ = _setup(ENTRIES[name])
    assert count_laws(spec) == expected


@pytest.mark.parametrize("name", ["lm-none-gqa", "lm-rope-half", "lm-rope-interleaved", "lm-sinusoidal-relu"])
def test_law_counts_attention(name):
    config = ENTRIES[name]
    spec = spec_for(config)
    kv, dh, layers = _config_dims(config)
    qk = kv * (dh // 2 if config.pe == "rope" else dh * (dh + 1) // 2)
    vo = kv * dh * (dh + 1) // 2
    ffn = config.d_ff if config.ffn in ("relu", "swiglu") else 0
    assert count_laws(spec) == layers * (qk + vo + ffn)


def test_gelu_and_tanh_mlps_and_sigmoid_routers_have_no_invented_laws():
    assert count_laws(spec_for(MLPConfig((64, 32, 10), "gelu"))) == 0
    assert count_laws(spec_for(MLPConfig((64, 32, 10), "tanh"))) == 0
    sig = spec_for(ENTRIES["moe-sigmoid"])
    assert not any(fam.linear for fam in law_families(sig))  # no router translation law under sigmoid gating
    soft = spec_for(ENTRIES["moe-dense-bias"])
    assert sum(fam.count for fam in law_families(soft) if fam.linear) > 0


def test_control_a_gelu_units_balance_is_not_conserved():
    """The ReLU law evaluated on a GELU network (same shapes): large Noether residual (negative control)."""
    gelu = MLPConfig((64, 32, 32, 10), "gelu")
    _, params, loss = _setup(gelu)
    relu_spec = spec_for(MLPConfig((64, 32, 32, 10), "relu"))
    c = torch.randn(count_laws(relu_spec), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert _noether(relu_spec, params, loss, c) > 1e-3


def test_control_single_query_head_under_gqa_is_not_conserved():
    """With GQA only the KV group's sum over its query heads is a law, not one query head's Q^T Q - K^T K."""
    config = ENTRIES["lm-none-gqa"]
    spec, params, loss = _setup(config)
    kv, dh, _ = _config_dims(config)
    r = config.n_heads // kv
    q, k_name = "blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight"

    def one_head(p):
        qh = p[q].reshape(config.n_heads, dh, -1)[0]
        kh = p[k_name].reshape(kv, dh, -1)[0]
        return (qh @ qh.T - kh @ kh.T).sum()

    true_law = lambda p: law_vector(spec, p).sum()  # noqa: E731
    gl = _grads(loss, params, loss.trainable)
    for fn, small in ((one_head, False), (true_law, True)):
        gh = _grads(fn, params, loss.trainable)
        residual = abs(_dot(gh, gl)) / (_norm(gh) * _norm(gl))
        assert (residual <= 1e-10) == small, f"residual {residual:.2e} (r={r})"


HF_FLOAT32_ONLY = ("xglm", "mixtral", "qwen2-moe")  # their modeling code refuses float64 (mask fill, grouped_mm)


@pytest.mark.parametrize("name", list(__import__("hf_models").configs()))
def test_hf_laws_are_orthogonal_to_the_gradient_of_the_transformers_model(name):
    """Checked on the transformers model itself: float64 where its code allows (round-off 1e-12), else float32."""
    from torch.func import functional_call

    from hf_models import VOCAB, build
    from symm.adapters import spec_from_hf

    dtype = torch.float32 if name in HF_FLOAT32_ONLY else torch.float64
    model = build(name).to(dtype)
    spec = spec_from_hf(model)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=gen)
    weights = torch.randn(2, 10, model.config.vocab_size, generator=gen, dtype=torch.float64)

    def loss(p):  # tied keys are given separately; the spec moves both alike
        return (functional_call(model, p, (tokens,), strict=False, tie_weights=False).logits.double().tanh() * weights).sum()

    loss.trainable = frozenset(n for n, _ in model.named_parameters())
    c = torch.randn(count_laws(spec), generator=gen, dtype=torch.float64)
    assert count_laws(spec) > 0
    assert _noether(spec, params, loss, c) <= (1e-12 if dtype == torch.float64 else 1e-8)


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-gelu", "swiglu", "attention-rope", "attention-sinusoidal", "moe-softmax", "moe-sigmoid"])
def test_cli_laws_prints_the_count_for_reference_models(name, capsys):
    from symm.cli import main
    from symm.models.named import named_config

    assert main(["laws", name]) == 0
    out = capsys.readouterr().out
    assert f"conservation laws of gradient flow: {count_laws(spec_for(named_config(name)))} in total" in out
    assert ("translation" in out) == (name == "moe-softmax")  # the router translation law only under softmax gating


def test_cli_laws_on_a_state_dict_and_bad_names(tmp_path, capsys):
    from symm.cli import main
    from symm.io import save_state_dict

    path = save_state_dict(state_dict_of(build_model(MLPConfig((64, 8, 10), "relu"))), tmp_path / "m.safetensors")
    assert main(["laws", str(path)]) == 0 and "0 in total" in capsys.readouterr().out  # unknown activation: no laws
    assert main(["laws", str(path), "--activation", "relu"]) == 0 and "8 in total" in capsys.readouterr().out
    assert main(["laws", "no-such-model"]) == 2 and "known:" in capsys.readouterr().err
