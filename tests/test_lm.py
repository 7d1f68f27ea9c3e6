"""The decoder-only language model zoo entry (issue 18) and its offline byte corpus.

* unmasked it computes what the same network built from Flax's own layers computes;
* it is causal: a later token never changes an earlier position's logits;
* its table (residual stream, each block's heads and MLP neurons), masked == shrunk,
  `cost.count` against a hand count;
* the Python-stdlib corpus: deterministic byte sequences, split by file.
"""
import os
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.data import DataError, load_python_stdlib
from jaxcompress.data.text import python_files
from jaxcompress.models import DecoderLM, create_model, describe, get_spec
from jaxcompress.models.table import UnsupportedModelError
from jaxcompress.pruning import shrink
from jaxcompress.pruning.criteria import channel_scores, masks_from_scores, prunable_groups, snip_saliency
from test_transformer import _numpy_variables, _one_line, _random_group_masks  # tests/ is on sys.path

D, HEADS, MLP, HEAD_DIM, SEQ, VOCAB = 12, (3, 2), (20, 16), 4, 8, 13


class FlaxLM(nn.Module):
    """`DecoderLM` written with Flax's own layers (same parameter names and shapes)."""

    widths: tuple
    vocab_size: int
    seq_len: int
    head_dim: int

    @nn.compact
    def __call__(self, tokens):
        dim, depth = self.widths[0], (len(self.widths) - 1) // 2
        embed = nn.Embed(self.vocab_size, dim, name="tok_embed")
        x = embed(tokens) + nn.Embed(self.seq_len, dim, name="pos_embed")(jnp.arange(tokens.shape[1]))
        for i in range(depth):
            h, m = self.widths[1 + i], self.widths[1 + depth + i]
            y = nn.MultiHeadDotProductAttention(num_heads=h, qkv_features=h * self.head_dim, out_features=dim,
                                                name=f"block{i}_attn")(nn.RMSNorm(name=f"block{i}_norm1")(x),
                                                                       mask=nn.make_causal_mask(tokens))
            x = x + y
            y = nn.gelu(nn.Dense(m, name=f"block{i}_fc1")(nn.RMSNorm(name=f"block{i}_norm2")(x)))
            x = x + nn.Dense(dim, name=f"block{i}_fc2")(y)
        return embed.attend(nn.RMSNorm(name="final_norm")(x))


def _tokens(seed, shape=(2, SEQ)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@pytest.fixture(scope="module")
def lm(zoo):
    """A small LM, its table, random variables (numpy), tokens and one jitted forward pass per
    model width (masks are data: no recompiles)."""
    model = DecoderLM(widths=(D,) + HEADS + MLP, vocab_size=VOCAB, seq_len=SEQ, head_dim=HEAD_DIM)
    table = describe(model, (SEQ,), jnp.int32)
    x = _tokens(1)
    cache = {}

    def forward(model, variables, x):
        key = (model.widths, tuple(sorted(variables)))
        if key not in cache:
            cache[key] = zoo.jit(model.apply)
        return cache[key](variables, x)

    return model, table, _numpy_variables(model, x), x, forward


def test_unmasked_lm_is_the_flax_network(lm, zoo):
    model, _, variables, x, forward = lm
    ref = FlaxLM(widths=model.widths, vocab_size=VOCAB, seq_len=SEQ, head_dim=HEAD_DIM)
    ref_shapes = jax.eval_shape(lambda: ref.init(jax.random.key(0), x))
    assert set(ref_shapes) == {"params"}
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), variables["params"], ref_shapes["params"])
    y_ref = zoo.jit(ref.apply)({"params": variables["params"]}, x)
    assert y_ref.shape == (2, SEQ, VOCAB)
    np.testing.assert_array_equal(forward(model, {"params": variables["params"]}, x), y_ref)
    np.testing.assert_allclose(forward(model, variables, x), y_ref, rtol=1e-6, atol=1e-6)  # all-ones masks


def test_lm_is_causal(lm):
    model, _, variables, x, forward = lm
    y = forward(model, variables, x)
    t = 5
    changed = x.at[:, t].set((x[:, t] + 1) % VOCAB)
    y2 = forward(model, variables, changed)
    np.testing.assert_array_equal(y2[:, :t], y[:, :t])
    assert np.abs(y2[:, t:] - y[:, t:]).min(axis=-1).max() > 0  # later positions see it
    # a shorter sequence: the first positions of the same computation
    y_short = jax.jit(model.apply)(variables, x[:, :t])
    np.testing.assert_allclose(y_short, y[:, :t], rtol=1e-5, atol=1e-5)


def test_lm_bad_input_is_one_line_error(lm):
    model, _, variables, x, _ = lm
    with pytest.raises(ValueError) as excinfo:
        model.apply(variables, x.astype(jnp.float32))
    assert "DecoderLM takes integer token ids of shape (batch, tokens <= 8), got float32" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        model.apply(variables, jnp.zeros((1, SEQ + 1), jnp.int32))
    assert "got int32 of shape (1, 9)" in _one_line(excinfo)
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(model, (SEQ,))  # float probe
    assert "DecoderLM takes integer token ids" in _one_line(excinfo)
    with pytest.raises(ValueError, match="an odd number >= 3 of entries, got 2"):
        DecoderLM(widths=(8, 2)).init(jax.random.key(0), x)


def test_lm_table(lm):
    _, table, _, _, _ = lm
    assert table.group_names == ("block0_attn/out", "block0_attn/query", "block1_attn/query", "block0_fc1",
                                 "block1_fc1")
    # the residual stream: both embeddings (the tied output layer too), attention and MLP outputs, every norm
    assert {"/".join(p[:-1]) for p in table.mask_paths(0)} == {"tok_embed", "pos_embed", "final_norm"} | {
        f"block{i}_{k}" for i in range(2) for k in ("norm1", "norm2", "attn/out", "fc2")}
    for i in range(2):  # each block's heads (query, key and value tied), each block's MLP neurons
        assert {"/".join(p[:-1]) for p in table.mask_paths(1 + i)} == {f"block{i}_attn/{k}"
                                                                       for k in ("query", "key", "value")}
        assert {"/".join(p[:-1]) for p in table.mask_paths(3 + i)} == {f"block{i}_fc1"}
    assert [(a.path, a.heads_group, a.head_dim, a.q_rows, a.kv_len) for a in table.attention] == [
        ("block0_attn", 1, HEAD_DIM, SEQ, SEQ), ("block1_attn", 2, HEAD_DIM, SEQ, SEQ)]
    assert prunable_groups(table, "inner") == [1, 2, 3, 4]  # heads and MLP neurons; the stream needs 'all'
    assert prunable_groups(table, "all") == [0, 1, 2, 3, 4]
    assert table.embeddings == (("tok_embed", 0), ("pos_embed", 0))
    assert [(p, kind, g) for p, kind, g in table.norms] == [(f"block{i}_norm{j}", "rms", 0) for i in range(2)
                                                            for j in (1, 2)] + [("final_norm", "rms", 0)]


def _hand_count(d, heads, mlp, hd=HEAD_DIM, tokens=SEQ, seq_len=SEQ, vocab=VOCAB):
    """Attention scores and values are counted over all tokens x tokens (the causal mask
    zeroes half of them, the product is still computed)."""
    params = vocab * d + seq_len * d + d       # tied token embedding, position embedding, final RMSNorm
    macs = tokens * d * vocab                  # tied output: logits = h @ embedding.T
    for h, m in zip(heads, mlp):
        params += 2 * d                                       # two RMSNorms (scale only)
        params += 3 * (d * h * hd + h * hd) + h * hd * d + d  # query, key, value, out
        params += d * m + m + m * d + d                       # MLP
        macs += tokens * (3 * d * h * hd + h * hd * d)        # projections
        macs += 2 * h * tokens * tokens * hd                  # q.k scores and weighted values
        macs += tokens * 2 * d * m
    return params, macs


def test_lm_cost_count_by_hand(lm):
    _, table, variables, _, _ = lm
    params, macs = _hand_count(D, HEADS, MLP)
    assert params == sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    counted = cost.count(table)
    assert (float(counted["params"]), float(counted["macs"])) == (params, macs)
    smaller = (7, 1, 2, 9, 5)
    counted = jax.jit(lambda w: cost.count(table, w))(jnp.asarray(smaller, jnp.float32))
    assert (float(counted["params"]), float(counted["macs"])) == _hand_count(7, (1, 2), (9, 5))


def test_zoo_lm_cost_by_hand(zoo):
    spec = get_spec("lm")
    assert spec.input_shape == (128,) and spec.input_dtype == "int32"
    model = create_model("lm", 256)  # num_classes: the vocabulary
    assert (model.vocab_size, model.seq_len, model.head_dim) == (256, 128, 32)
    table = zoo.table("lm")  # describe(create_model("lm", zoo.num_classes("lm")), (128,), "int32")
    assert table.widths == (128,) + (4,) * 4 + (512,) * 4
    counted = cost.count(table)
    expected = _hand_count(128, (4,) * 4, (512,) * 4, hd=32, tokens=128, seq_len=128, vocab=zoo.num_classes("lm"))
    assert (float(counted["params"]), float(counted["macs"])) == expected


def test_lm_masked_equals_shrunk(lm):
    """Random masks on every group: the residual stream, the heads and the MLP neurons."""
    model, table, variables, x, forward = lm
    gms = _random_group_masks(table, seed=3)
    assert all(0 < g.sum() < g.size for g in gms)
    masked = {**variables, "masks": table.layer_masks(gms, variables["masks"])}
    small_model, small_vars = shrink(table, masked)
    kept = [int(g.sum()) for g in gms]
    assert small_model.widths == tuple(kept) and isinstance(small_model, DecoderLM)
    assert small_vars["params"]["tok_embed"]["embedding"].shape == (VOCAB, kept[0])
    assert small_vars["params"]["block1_attn"]["out"]["kernel"].shape == (kept[2], HEAD_DIM, kept[0])
    y = forward(model, masked, x)
    np.testing.assert_allclose(y, forward(small_model, small_vars, x), rtol=1e-5, atol=1e-5)
    assert np.abs(y - forward(model, variables, x)).max() > 1e-3  # the masks did something
    small_table = describe(small_model, (SEQ,), jnp.int32)
    assert float(cost.count(table, kept)["params"]) == sum(leaf.size for leaf in jax.tree.leaves(small_vars["params"]))
    assert float(cost.count(small_table)["macs"]) == float(cost.count(table, kept)["macs"])


def test_lm_magnitude_scores_prune_heads_and_mlp_neurons(lm):
    model, table, variables, x, forward = lm
    flat = traverse_util.flatten_dict(variables["params"])
    l2 = channel_scores(table, variables, "l2")
    assert [s.shape for s in l2] == [(w,) for w in table.widths]
    qkv = [np.asarray(flat[("block1_attn", k, "kernel")]) for k in ("query", "key", "value")]
    np.testing.assert_allclose(l2[2], sum(np.sqrt((k ** 2).sum(axis=(0, 2))) for k in qkv), rtol=1e-5)
    counts = [D, 2, 1, 14, 12]  # about 30% of the MLP neurons, a head per block
    masks = table.layer_masks(masks_from_scores(l2, counts), variables["masks"])
    small_model, small_vars = shrink(table, {**variables, "masks": masks})
    assert small_model.widths == tuple(counts)
    np.testing.assert_allclose(forward(model, {**variables, "masks": masks}, x), forward(small_model, small_vars, x),
                               rtol=1e-5, atol=1e-5)


def test_lm_snip_is_the_per_token_loss_gradient_by_hand(lm):
    """SNIP with (batch, tokens) targets: |dL/dm| at all-ones element masks m on every
    kernel (= |g * w|), summed per head over query, key and value and per MLP neuron, L
    the mean cross-entropy over every token, computed here without the library's loss."""
    model, table, variables, x, _ = lm
    y = _tokens(2)  # next-token targets, one per position
    snip = channel_scores(table, variables, "snip", batch=(x, y))
    flat = traverse_util.flatten_dict(variables["params"])
    ones = {"/".join(p[:-1]): jnp.ones_like(v) for p, v in flat.items() if p[-1] == "kernel"}

    def loss(kernel_masks):
        masks = {**traverse_util.flatten_dict(variables["masks"]),
                 **{tuple(k.split("/")) + ("kernel",): m for k, m in kernel_masks.items()}}
        logits = model.apply({**variables, "masks": traverse_util.unflatten_dict(masks)}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1))

    g = {k: np.abs(np.asarray(v)) for k, v in jax.jit(jax.grad(loss))(ones).items()}
    for i in range(2):
        heads = sum(g[f"block{i}_attn/{k}"].sum(axis=(0, 2)) for k in ("query", "key", "value"))
        np.testing.assert_allclose(snip[1 + i], heads, rtol=1e-4)
        np.testing.assert_allclose(snip[3 + i], g[f"block{i}_fc1"].sum(axis=0), rtol=1e-4)
    assert all(np.all(np.isfinite(s)) and np.all(s > 0) for s in snip[1:])
    with pytest.raises(ValueError, match=r"labels of shape \(2,\) do not label the logits of shape \(2, 8, 13\)"):
        channel_scores(table, variables, "snip", batch=(x, y[:, 0]))


def test_snip_classifier_loss_unchanged():
    """(batch,) labels of (batch, classes) logits: the mean cross-entropy of before."""
    rng = np.random.default_rng(0)
    w, x = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((5, 4), (6, 5)))
    labels = jnp.asarray([0, 3, 1, 1, 2, 3])
    apply = lambda v, x, train: x @ v["params"]["w"]  # noqa: E731
    loss = lambda w: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x @ w), labels[:, None], axis=-1))  # noqa: E731
    np.testing.assert_allclose(snip_saliency(apply, {"params": {"w": w}}, x, labels)["w"],
                               np.abs(jax.grad(loss)(w) * w), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# The corpus: the Python standard library's source as bytes.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return load_python_stdlib(seq_len=64)


def test_stdlib_corpus_shapes_bytes_and_determinism(corpus):
    assert corpus.name == "python_stdlib" and corpus.vocab_size == 256 and corpus.seq_len == 64
    for split in (corpus.train, corpus.test):
        assert split.dtype == np.uint8 and split.ndim == 2 and split.shape[1] == 65 and split.shape[0] > 100
    assert corpus.train.shape[0] > 5 * corpus.test.shape[0]  # about 10% of the files are test files
    assert corpus.train.max() > 127  # non-ASCII UTF-8 bytes occur: the whole byte range is in use
    # the first train sequence is the start of the first train file (files in sorted path order)
    root = sysconfig.get_paths()["stdlib"]
    assert list(corpus.train_files) == sorted(corpus.train_files)
    with open(os.path.join(root, corpus.train_files[0]), "rb") as f:
        first = f.read()
    n = min(len(first), 65)
    assert bytes(corpus.train[0, :n]) == first[:n]
    again = load_python_stdlib(seq_len=64)
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.test, corpus.test)
    assert (again.train_files, again.test_files) == (corpus.train_files, corpus.test_files)


def test_stdlib_corpus_split_by_file(corpus):
    train, test = set(corpus.train_files), set(corpus.test_files)
    assert train and test and not train & test
    files = python_files(sysconfig.get_paths()["stdlib"])
    assert train | test == set(files) and "os.py" in files
    assert not any("site-packages" in f or "dist-packages" in f for f in files)


def test_corpus_on_a_folder_and_bad_input(tmp_path):
    for name in ("a.py", "b.py", "pkg/c.py", "site-packages/third_party.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode() * 40)
    (tmp_path / "notes.txt").write_text("not python")
    assert python_files(str(tmp_path)) == ["a.py", "b.py", "pkg/c.py"]
    c = load_python_stdlib(seq_len=9, test_fraction=0.5, root=str(tmp_path))
    assert sorted(c.train_files + c.test_files) == ["a.py", "b.py", "pkg/c.py"]
    text = b"".join((tmp_path / f).read_bytes() for f in c.test_files)
    assert bytes(c.test.reshape(-1)) == text[:len(text) // 10 * 10]
    for bad in (1, 0, True, 2.5, "8"):
        with pytest.raises(DataError) as excinfo:
            load_python_stdlib(seq_len=bad, root=str(tmp_path))
        assert "seq_len must be an int >= 2" in _one_line(excinfo)
    for bad in (0, 1, -0.1, None):
        with pytest.raises(DataError) as excinfo:
            load_python_stdlib(test_fraction=bad, root=str(tmp_path))
        assert "test_fraction must be a number strictly between 0 and 1" in _one_line(excinfo)
    with pytest.raises(DataError) as excinfo:
        load_python_stdlib(seq_len=10_000, test_fraction=0.5, root=str(tmp_path))
    assert "less than one sequence of 10001 tokens" in _one_line(excinfo)


def test_jobs_refuse_the_language_model_in_one_line():
    from configs import quickstart
    from jaxcompress.errors import ConfigError
    from jaxcompress.train import setup_experiment
    c = quickstart.get_config()
    c.model.name = "lm"
    with pytest.raises(ConfigError) as excinfo:
        setup_experiment(c)  # before any data is loaded
    assert "model.name='lm' is a language model (token-id inputs)" in _one_line(excinfo)
