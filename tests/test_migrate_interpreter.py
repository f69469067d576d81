"""PyTorch graphs run by JAX: ``mlperf_tutor.migrate.export.translate`` against PyTorch itself.

User-style models (an MLP, a CNN with BatchNorm and dropout, a ResNet basic block, a Transformer
encoder layer, a custom forward with indexing, einsum, masking and gradient stops, and a zoo of
ops) and every workload's tiny PyTorch model: the loss within max-abs 1e-5 and every gradient
within relative 1e-4 of PyTorch's (DESIGN.md's bars), float32 on CPU, matmul precision pinned.
"""

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch", "jax")

import jax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mlperf_tutor import frameworks, workloads  # noqa: E402
from mlperf_tutor.core.parity import OUTPUT_ATOL, REL_ABS_FLOOR, STEP_RTOL, errors  # noqa: E402
from mlperf_tutor.migrate.export import translate  # noqa: E402
from mlperf_tutor.migrate.interpreter import OpError, UnsupportedOp  # noqa: E402

frameworks.get("jax").pin_precision()
frameworks.get("torch").pin_precision()


# --- helpers ---------------------------------------------------------------------------------


def as_torch(batch):
    return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


def compiled(fn, *args):
    # XLA's LLVM optimisation level does not change float32 results here and halves the
    # compile time of these one-shot graphs on 2 cores.
    options = {"xla_backend_optimization_level": 0}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)


def torch_run(model, loss_fn, batch, train=True):
    """Loss, gradients of the trainable parameters and buffers after one forward, on a copy."""
    model = copy.deepcopy(model).train(train)
    loss = loss_fn(model, as_torch(batch))
    loss.backward()
    grads = {
        n: p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return loss.item(), grads, {k: v.numpy() for k, v in model.named_buffers()}


def jax_run(t, batch, train=True, key=None):
    def loss(params, batch):
        return t.apply(params, t.buffers, t.frozen, batch, key, train=train)

    (value, new_buffers), grads = compiled(jax.value_and_grad(loss, has_aux=True), t.params, batch)
    return float(value), grads, new_buffers


def assert_gradients_match(got, want):
    assert set(got) == set(want)
    for name, value in want.items():
        max_abs, rel = errors(got[name], value)
        assert rel <= STEP_RTOL or max_abs <= REL_ABS_FLOOR, (name, rel, max_abs)


class Case:
    """One model translated once, run once by each framework (train mode)."""

    def __init__(self, model, loss_fn, batch):
        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.t = translate(model, loss_fn, batch)
        self.torch_loss, self.torch_grads, self.torch_buffers = torch_run(model, loss_fn, batch)
        self.jax_loss, self.jax_grads, self.jax_buffers = jax_run(self.t, batch)

    def check(self):
        assert abs(self.jax_loss - self.torch_loss) <= OUTPUT_ATOL, (self.jax_loss, self.torch_loss)
        assert_gradients_match(self.jax_grads, self.torch_grads)

    def check_eval(self):
        assert_eval_matches(self.model, self.loss_fn, self.batch, self.t)


def assert_eval_matches(model, loss_fn, batch, t):
    """Eval-mode loss within the bar of PyTorch's, and no buffer changed."""
    want = torch_run(model, loss_fn, batch, train=False)[0]
    got, new_buffers = compiled(
        lambda p, b: t.eval_apply(p, t.buffers, t.frozen, b), t.params, batch
    )
    assert abs(float(got) - want) <= OUTPUT_ATOL, (float(got), want)
    for name, value in t.buffers.items():
        np.testing.assert_array_equal(np.asarray(new_buffers[name]), value)


def ce(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def image_batch(seed, n=4, channels=3, size=8, classes=5):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, channels, size, size)).astype(np.float32),
        "y": rng.integers(0, classes, n).astype(np.int64),
    }


# --- user-style models -----------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x)), approximate="tanh"))


class Cnn(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, momentum=0.2)
        self.drop = nn.Dropout(p)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)  # (B, 8, 4, 4)
        x = F.adaptive_avg_pool2d(torch.tanh(self.conv2(self.drop(x))), 1).flatten(1)  # (B, 8)
        return self.head(x)


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016, https://arxiv.org/abs/1512.03385), downsampling."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.down(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = BasicBlock(3, 6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(F.avg_pool2d(self.block(x), 4).flatten(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, batch):
        h = self.layer(batch["x"], src_key_padding_mask=batch["pad"])  # (B, T, D)
        return F.cross_entropy(self.out(h).flatten(0, 1), batch["y"].flatten(), ignore_index=-1)


class Custom(nn.Module):
    """Indexing, einsum, masking, a detached branch, a no_grad region, tied weights and a
    non-persistent buffer; returns a loss term and logits for the loss function to finish."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        self.proj = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.tokens = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.tokens.weight  # tied: one parameter, gradients summed
        self.register_buffer("temperature", torch.tensor(2.0), persistent=False)

    def forward(self, batch):
        ids = batch["ids"]  # (B, T)
        x = self.embed(ids)  # (B, T, D)
        q = self.proj(x)
        scores = torch.einsum("btd,bsd->bts", q, x) * self.scale / self.temperature
        scores = scores.masked_fill(ids[:, None, :] == 0, -1e9)
        out = torch.einsum("bts,bsd->btd", scores.softmax(-1), x)
        first = out[torch.arange(ids.shape[0]), batch["pick"]]  # (B, D): advanced indexing
        baseline = q.detach().mean()  # no gradient through the baseline
        with torch.no_grad():
            norm = self.proj.weight.norm()  # a constant for the gradient
        term = (first - baseline).square().mean() / norm + out[:, 1:, ::2].abs().mean()
        return term, self.head(out + self.tokens(ids))  # (), (B, T, V)


CLASS_WEIGHT = torch.linspace(0.5, 1.5, 11)  # a tensor the loss function closes over


def custom_loss(model, batch):
    term, logits = model(batch)
    return term + F.cross_entropy(logits.flatten(0, 1), batch["ids"].flatten(), CLASS_WEIGHT)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    batch = {"x": rng.standard_normal((4, 6)).astype(np.float32), "y": np.array([0, 3, 1, 4])}
    return Case(Mlp(), ce, batch)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return Case(Cnn(p=0.0), ce, image_batch(2))


@pytest.fixture(scope="module")
def cnn_dropout():
    torch.manual_seed(0)
    model = Cnn(p=0.5)
    batch = image_batch(2)
    return model, translate(model, ce, batch), batch


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return Case(ResNet(), ce, image_batch(3))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, (2, 5))
    y[1, 3:] = -1
    batch = {
        "x": rng.standard_normal((2, 5, 16)).astype(np.float32),
        "pad": np.array([[False] * 5, [False] * 3 + [True] * 2]),
        "y": y,
    }
    return Case(Encoder(), lambda m, b: m(b), batch)


@pytest.fixture(scope="module")
def custom():
    torch.manual_seed(0)
    batch = {"ids": np.array([[3, 5, 0, 0], [1, 2, 9, 10]]), "pick": np.array([1, 3])}
    return Case(Custom(), custom_loss, batch)


def test_mlp_loss_and_gradients_match_torch(mlp):
    mlp.check()
    assert list(mlp.t.params) == list(mlp.model.state_dict())  # state_dict names and order
    assert mlp.t.buffers == {} and mlp.t.frozen == {}


def test_cnn_train_loss_gradients_and_running_statistics_match_torch(cnn):
    cnn.check()
    assert list(cnn.t.buffers) == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    for name in ("bn.running_mean", "bn.running_var"):
        assert errors(cnn.jax_buffers[name], cnn.torch_buffers[name])[0] <= 1e-6, name
        assert not np.allclose(cnn.jax_buffers[name], cnn.t.buffers[name])  # they did move
    assert int(cnn.jax_buffers["bn.num_batches_tracked"]) == 1


def test_cnn_with_dropout_eval_mode_matches_torch(cnn_dropout):
    model, t, batch = cnn_dropout
    assert_eval_matches(model, ce, batch, t)


def test_dropout_draws_from_the_key_and_needs_one(cnn_dropout):
    _, t, batch = cnn_dropout
    step = jax.jit(lambda key: t.apply(t.params, t.buffers, t.frozen, batch, key)[0])
    a, b = step(jax.random.key(0)), step(jax.random.key(1))
    assert float(a) != float(b) and float(step(jax.random.key(0))) == float(a)
    eval_loss = float(t.eval_apply(t.params, t.buffers, t.frozen, batch)[0])
    assert eval_loss not in (float(a), float(b))  # eval mode: no dropout, no key needed
    with pytest.raises(OpError, match="native_dropout.*pass a jax.random key"):
        t.apply(t.params, t.buffers, t.frozen, batch)


def test_resnet_block_matches_torch(resnet):
    resnet.check()
    resnet.check_eval()
    assert len(resnet.t.buffers) == 9  # three BatchNorms


def test_transformer_encoder_layer_matches_torch(encoder):
    encoder.check()
    encoder.check_eval()
    assert "aten.scaled_dot_product_attention.default" in encoder.t.ops()  # kept whole


def test_custom_forward_with_indexing_einsum_masking_and_gradient_stops(custom):
    custom.check()
    assert np.abs(custom.jax_grads["embed.weight"][0]).max() == 0  # the padding row
    # state_dict order; the tied head.weight is tokens.weight, named once
    assert list(custom.t.params) == [
        "scale",
        "embed.weight",
        "proj.weight",
        "proj.bias",
        "tokens.weight",
    ]
    assert custom.t.buffers == {}  # the non-persistent buffer is a constant of the graph


def test_translate_leaves_the_model_as_it_was(cnn_dropout):
    model, _, batch = cnn_dropout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    translate(model, ce, batch)
    assert not model.training and not model.bn.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    model.train()


def test_batch_is_read_by_name_and_checked_for_shape(mlp):
    t = mlp.t
    reordered = {"y": mlp.batch["y"], "x": mlp.batch["x"]}
    loss = float(t.apply(t.params, t.buffers, t.frozen, reordered)[0])
    assert abs(loss - mlp.jax_loss) <= OUTPUT_ATOL
    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(2, 6\)"):
        t.apply(t.params, t.buffers, t.frozen, {"x": mlp.batch["x"][:2], "y": mlp.batch["y"]})


# --- a zoo of ops in one graph ---------------------------------------------------------------


class Zoo(nn.Module):
    """One use of many ops, each term scaled to order one, summed into the loss."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.conv_t = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.conv1d = nn.Conv1d(1, 2, 3, dilation=2, padding=2)
        self.gn = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(12, 6, padding_idx=0)
        self.bag_mean = nn.EmbeddingBag(12, 6, mode="mean")
        self.bag_max = nn.EmbeddingBag(12, 6, mode="max")

    def forward(self, b):
        x = self.lin(b["x"])  # (3, 6)
        ids, img = b["ids"], b["img"]  # (3, 4), (3, 4, 5, 5)
        idx = ids[:, :2] % 6
        z = x.clone()
        z[:, 0] = 1.0
        z[ids[:, 0] % 3, 1] += 2.0
        h = self.gn(self.conv_t(img))  # (3, 4, 10, 10)
        q, k = x.view(3, 2, 1, 3).expand(3, 2, 4, 3), x.view(3, 1, 2, 3)
        activations = [
            F.silu(x),
            F.mish(x),
            F.softplus(x, beta=2),
            F.elu(x),
            F.leaky_relu(x, 0.2),
            F.hardtanh(x, -0.5, 0.5),
            F.logsigmoid(x),
            torch.erf(x),
            F.gelu(x),
        ]
        arithmetic = [
            x.clamp(-0.3, 0.4),
            torch.where(x > 0, x, 0.1 * x),
            x.pow(3),
            x.abs().pow(1.5),
            torch.rsqrt(x.abs() + 1),
            torch.atan2(x, x.flip(1) + 2),
            torch.remainder(x, 0.3),
            torch.div(x, 0.7, rounding_mode="floor"),
            x.masked_fill(x < 0, -1),
            torch.arange(6.0) * 0.1 + x,
            torch.full_like(x, 2.0) * x,
        ]
        reductions = [
            x.var(1, keepdim=True),
            x.std(0),
            torch.logsumexp(x, 1),
            x.norm(dim=1),
            x.amax(1),
            x.min(1).values,
            x.cumsum(1),
            x.softmax(0),
            F.log_softmax(x, 1),
            x.argmax(1).float(),
            torch.topk(x, 2, 1).values,
            torch.sort(x, 1, descending=True).values,
        ]
        indexing = [
            x.gather(1, idx),
            x[:, [0, 2]],
            x[ids[:, 0] % 3],
            x[1:, ::2],
            z,
            x.index_select(1, torch.tensor([1, 3])),
            x.scatter(1, idx, 0.0),
            torch.zeros(3, 6).scatter_add(1, idx, x[:, :2]),
        ]
        shapes = [
            torch.cat([x, 2 * x], 1),
            torch.stack([x, -x]),
            *x.chunk(3, 1),
            *x.split([2, 4], 1),
            *x.unbind(0),
            x.repeat(2, 1),
            x.repeat_interleave(2, dim=0),
            x.roll(2, 1),
            F.pad(x, (1, 2), value=0.5),
            torch.tril(x[:, :3]),
            torch.triu(x[:, 3:], 1),
        ]
        products = [
            x @ x.T,
            torch.einsum("bi,bj->bij", x, x),
            torch.baddbmm(x[:, :, None], x[:, :, None], x[:, None, :2]),
            F.scaled_dot_product_attention(q, k, k, attn_mask=b["mask"], enable_gqa=True),
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True),
        ]
        layers = [
            F.normalize(x, dim=1),
            F.layer_norm(x, (6,)),
            self.conv1d(x[:, None]),
            h,
            F.max_pool2d(h, 3, 2, 1, ceil_mode=True),
            F.avg_pool2d(h, 3, 2, 1, ceil_mode=True),
            F.avg_pool2d(h, 3, 2, 1, count_include_pad=False),
            F.adaptive_avg_pool2d(h, (3, 4)),
            F.interpolate(img, scale_factor=2, mode="nearest"),
            F.interpolate(img, size=(7, 4), mode="bilinear", align_corners=False),
            self.emb(ids),
            self.bag_mean(ids.flatten(), b["offsets"]),
            self.bag_max(ids),
        ]
        logits, y, p = x[:, :5], b["y"], (z > 0.5).float()
        losses = [
            F.cross_entropy(logits, y, ignore_index=1, label_smoothing=0.1),
            F.nll_loss(F.log_softmax(logits, 1), y, reduction="sum"),
            F.mse_loss(x, z),
            F.l1_loss(x, z),
            F.smooth_l1_loss(x, z),
            F.kl_div(F.log_softmax(x, 1), x.softmax(0), reduction="batchmean"),
            F.binary_cross_entropy_with_logits(x, p, pos_weight=torch.full((6,), 2.0)),
            F.binary_cross_entropy(torch.sigmoid(x), z.sigmoid()),
        ]
        terms = activations + arithmetic + reductions + indexing + shapes + products + layers
        return sum(t.float().square().mean() for t in terms) / len(terms) + sum(losses)


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    batch = {
        "x": rng.standard_normal((3, 6)).astype(np.float32),
        "ids": rng.integers(0, 12, (3, 4)),
        "img": rng.standard_normal((3, 4, 5, 5)).astype(np.float32),
        "offsets": np.array([0, 5, 7]),
        "mask": rng.random((3, 2, 4, 2)) > 0.3,
        "y": np.array([0, 1, 4]),
    }
    batch["ids"][0, :2] = 0  # padding_idx
    return Case(Zoo(), lambda m, b: m(b), batch)


def test_op_zoo_loss_and_gradients_match_torch(zoo):
    zoo.check()
    assert len(zoo.t.ops()) >= 70


# --- the workloads' PyTorch models -----------------------------------------------------------

WORKLOADS = ["bert", "gpt3", "gptj", "dlrm_dcnv2", "llama2_70b_lora", "stable_diffusion", "toy"]


@pytest.fixture(scope="module", params=WORKLOADS)
def workload(request):
    wl = workloads.get(request.param)
    # GPT-3's tiny preset trains on 2048 tokens; 64 exercise the same graph.
    overrides = {"seq_len": 64} if request.param == "gpt3" else {}
    cfg = wl.deterministic(wl.config("tiny", **overrides))
    tree = wl.parity_weights(cfg, seed=0)  # stable_diffusion: no zero output layers
    rng = np.random.default_rng(0)
    for name in tree:  # LoRA's B starts at zero, which makes A's gradient zero: not a test
        if name.endswith("lora_b.weight"):
            tree[name] = (0.02 * rng.standard_normal(tree[name].shape)).astype(np.float32)
    model = wl.build("torch", cfg, weights=tree)
    return request.param, Case(model, lambda m, b: m(b)["loss"], wl.synthetic_batch(cfg, 2, 0))


def test_workload_loss_and_gradients_match_torch(workload):
    name, case = workload
    case.check()
    trainable = {n for n, p in case.model.named_parameters() if p.requires_grad}
    assert set(case.t.params) == trainable
    if name == "llama2_70b_lora":
        assert case.t.frozen and all("lora_" in n for n in case.t.params)


# --- unsupported ops -------------------------------------------------------------------------


class Bessel(nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x).sum()  # no JAX translation in the op table


def test_unsupported_op_names_the_op_and_the_line():
    with pytest.raises(UnsupportedOp) as raised:
        translate(Bessel(), lambda m, b: m(b["x"]), {"x": np.ones(3, np.float32)})
    message = str(raised.value)
    assert "aten.special_bessel_j0.default" in message
    assert f"{__file__}:{Bessel.forward.__code__.co_firstlineno + 1}" in message
    assert "torch.special.bessel_j0(x)" in message and "register" in message
    assert isinstance(raised.value, NotImplementedError)
