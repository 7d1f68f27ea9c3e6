"""Packed integer export of a quantized network, and a loader back to a runnable Flax model.

File format (`jaxcompress.packed/1`): an uncompressed `.npz` with two arrays,

* `payload` (uint8): every stored byte of the network, layer after layer, exactly
  the bytes `jaxcompress.cost.summarize(..., quantizer=...)` counts
  (`jaxcompress.quant.size`): bit-packed weight codes (Deep-Compression CSR
  relative indices for element-pruned layers), float32 scales (+ uint8 zero
  points) or codebooks, float32 biases, activation clip values, BatchNorm as
  two float32 per channel (scale and shift folded with the running statistics),
  then every other parameter (LayerNorm / RMSNorm scales, embeddings) as float32.
  A kernel is stored as an (inputs, outputs) matrix: an attention projection's
  (heads, head_dim) outputs are one axis, one scale each;
* `meta` (uint8, UTF-8 JSON): the zoo model name, its widths (so the loader
  rebuilds the shrunk network), input shape and normalisation, the weight
  quantizer, per layer its shape, bit widths, storage format and the offsets of
  its segments in `payload`, the sha256 of `payload` (`payload_sha256`) and of the
  metadata itself (`meta_sha256`, of its canonical JSON without that key).

`read_packed` verifies both checksums (and the zip's CRCs): a damaged file is one
`PackedFileError` line; a file written before checksums loads unchecked.

So `file size = payload bytes (== accounting) + meta bytes + npz/npy headers`, and
`load_packed` returns `(model, variables)` whose outputs equal the fake-quantized
network's (`fold_batchnorm` applied) exactly: the loader decodes with the same
functions the fake quantization uses. Everything here is hand-written: no library
packs mixed bit widths with relative indices.
"""
from __future__ import annotations

import io
import json
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress import files
from jaxcompress.models import create_model
from jaxcompress.quant import pack, size
from jaxcompress.quant.quantizers import FLOAT_BITS, WeightQuantizer, decode_weight, encode_weight
from jaxcompress.storage import canonical_json, sha256_hex

EXPORT_FORMAT = "jaxcompress.packed/1"


class PackedFileError(ValueError):
    """A packed file that cannot be read back as written (corrupt, truncated, not one)."""


def _meta_sha256(meta: Mapping) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return sha256_hex(canonical_json(body))

# One compiled program per layer shape (instead of one per primitive and shape, eagerly).
_encode = jax.jit(encode_weight, static_argnames=("quantizer",))
_decode = jax.jit(decode_weight, static_argnames=("quantizer",))


# ------------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------------

def norm_epsilons(model: nn.Module, input_shape) -> dict[str, float]:
    """{BatchNorm path: epsilon} of `model` (found by tracing it abstractly)."""
    found: dict[str, float] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            found["/".join(context.module.path)] = float(context.module.epsilon)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    return found


def folded_variance(epsilon: float) -> np.float32:
    """A float32 v with v + epsilon == 1 exactly in float32 (so rsqrt(v + eps) == 1)."""
    eps = np.float32(epsilon)
    v = np.float32(1.0) - eps
    for _ in range(8):
        s = np.float32(v + eps)
        if s == np.float32(1.0):
            return v
        v = np.nextafter(v, np.float32(-np.inf) if s > 1 else np.float32(np.inf), dtype=np.float32)
    return v


def fold_batchnorm(variables: Mapping, epsilons: Mapping[str, float]) -> dict:
    """Inference BatchNorm as y = x * a + b: scale <- a = scale * rsqrt(var + eps),
    bias <- b = bias - mean * a, mean <- 0, var <- `folded_variance(eps)`. The network's
    eval-mode outputs are unchanged up to float rounding."""
    params = dict(traverse_util.flatten_dict(dict(variables["params"])))
    stats = dict(traverse_util.flatten_dict(dict(variables.get("batch_stats", {}))))
    for path, eps in epsilons.items():
        key = tuple(path.split("/"))
        mean, var = stats[key + ("mean",)], stats[key + ("var",)]
        a = jax.lax.rsqrt(jnp.asarray(var, jnp.float32) + eps) * params[key + ("scale",)]
        params[key + ("bias",)] = params[key + ("bias",)] - mean * a
        params[key + ("scale",)] = a
        stats[key + ("mean",)] = jnp.zeros_like(mean)
        stats[key + ("var",)] = jnp.full_like(var, folded_variance(eps))
    out = dict(variables)
    out["params"] = traverse_util.unflatten_dict(params)
    if stats:
        out["batch_stats"] = traverse_util.unflatten_dict(stats)
    return out


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self):
        self.parts: list[np.ndarray] = []
        self.offset = 0

    def add(self, name: str, data: np.ndarray, record: dict) -> None:
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        record.setdefault("segments", []).append([name, self.offset, int(data.size)])
        self.parts.append(data)
        self.offset += int(data.size)

    def bytes(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint8)


def _np_mask(flat_masks, key, shape, out_ndim: int = 1) -> np.ndarray | None:
    """numpy twin of `qat.weight_mask` (0/1 products are exact in any order)."""
    km, cm = flat_masks.get(key + ("kernel",)), flat_masks.get(key + ("channel",))
    if km is None and cm is None:
        return None
    mask = np.ones(shape, np.float32)
    if km is not None:
        mask = mask * np.asarray(jax.device_get(km), np.float32)
    if cm is not None:
        cm = np.asarray(jax.device_get(cm), np.float32)
        mask = mask * cm.reshape(cm.shape + (1,) * (out_ndim - 1))
    return mask


def _f32(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32).astype("<f4")


def export_packed(path: str, table, variables: Mapping, *, model_name: str, num_classes: int,
                  quantizer: WeightQuantizer | None = None, index_bits: Mapping[str, int] | None = None,
                  input_mean=None, input_std=None) -> dict:
    """Writes the packed file for the network of `table` (a shrunk network: channel masks
    all ones) with `variables` (params, batch_stats, masks, quant). Returns
    {file_bytes, payload_bytes, meta_bytes, layers: [...]}."""
    quantizer = quantizer or WeightQuantizer()
    index_bits = {**size.DEFAULT_INDEX_BITS, **(index_bits or {})}
    masks = variables.get("masks") or {}
    if masks and any(not bool(np.all(np.asarray(m) > 0)) for m in table.group_masks(masks)):
        raise ValueError("export_packed needs a physically shrunk network (every channel mask all ones); "
                         "call jaxcompress.pruning.shrink first")
    epsilons = norm_epsilons(table.model, table.input_shape)
    folded = fold_batchnorm(variables, epsilons)
    flat_p = traverse_util.flatten_dict(dict(folded["params"]))
    flat_m = traverse_util.flatten_dict(dict(masks))
    flat_q = traverse_util.flatten_dict(dict(variables.get("quant") or {}))
    payload = _Payload()
    records = []
    for layer in table.layers:
        key = tuple(layer.path.split("/"))
        kernel = np.asarray(jax.device_get(flat_p[key + ("kernel",)]), np.float32)
        bits_w = int(float(flat_q.get(key + ("bits_w",), FLOAT_BITS)))
        bits_a = int(float(flat_q.get(key + ("bits_a",), FLOAT_BITS)))
        has_range = key + ("range_a",) in flat_q and bits_a < FLOAT_BITS
        mask = _np_mask(flat_m, key, kernel.shape, layer.out_ndim)
        # stored as an (inputs, outputs) matrix: a projection's (heads, head_dim) outputs are one axis
        cout = int(np.prod(kernel.shape[kernel.ndim - layer.out_ndim:]))
        matrix = lambda a: None if a is None else np.asarray(jax.device_get(a)).reshape(-1, cout)
        kernel, mask, km = matrix(kernel), matrix(mask), matrix(flat_m.get(key + ("kernel",)))
        keep_flat = size.channel_major(km > 0) if km is not None else None
        expected = size.layer_storage(int(kernel.size), cout, bits_w, quantizer, keep_flat=keep_flat,
                                      index_bits=index_bits[layer.kind], use_bias=layer.use_bias,
                                      activation_range=has_range)
        rec = dict(path=layer.path, kind=layer.kind, shape=list(np.shape(flat_p[key + ("kernel",)])),
                   out_ndim=layer.out_ndim, bits_w=bits_w, bits_a=bits_a,
                   format=expected.format, entries=expected.entries, index_bits=index_bits[layer.kind],
                   use_bias=layer.use_bias, range_a=has_range)
        start = payload.offset
        w = kernel if mask is None else kernel * mask
        if bits_w >= FLOAT_BITS:
            codes = size.channel_major(_f32(w).view(np.uint32))
            width = FLOAT_BITS
            side = {}
        else:
            enc = _encode(jnp.asarray(w), jnp.float32(bits_w), quantizer, None if mask is None else jnp.asarray(mask),
                          matrix(flat_q.get(key + ("assign_w",))))
            codes = size.channel_major(np.asarray(jax.device_get(enc["codes"])).astype(np.int64))
            width = bits_w
            side = enc
        if expected.format == "sparse":
            gaps, source = size.sparse_layout(keep_flat, index_bits[layer.kind])
            codes = np.where(source >= 0, codes[np.maximum(source, 0)], 0)
            payload.add("codes", pack.pack_bits(codes, width), rec)
            payload.add("gaps", pack.pack_bits(gaps, index_bits[layer.kind]), rec)
        else:
            payload.add("codes", pack.pack_bits(codes, width), rec)
        if quantizer.scheme == "kmeans" and bits_w < FLOAT_BITS:
            payload.add("codebook", _f32(side["codebook"])[:2 ** bits_w], rec)
        elif bits_w < FLOAT_BITS:
            payload.add("scale", _f32(side["scale"]).reshape(-1), rec)
            if "zero_point" in side:
                payload.add("zero_point", np.asarray(jax.device_get(side["zero_point"])).astype(np.uint8).reshape(-1),
                            rec)
        if layer.use_bias:
            payload.add("bias", _f32(flat_p[key + ("bias",)]).reshape(-1), rec)
        if has_range:
            payload.add("range_a", _f32(flat_q[key + ("range_a",)]).reshape(1), rec)
        if payload.offset - start != expected.total:
            raise RuntimeError(f"export of {layer.path}: wrote {payload.offset - start} bytes, accounting says "
                               f"{expected.total}")
        records.append(rec)
    norms = []
    for norm_path, eps in epsilons.items():
        key = tuple(norm_path.split("/"))
        rec = dict(path=norm_path, channels=int(np.asarray(flat_p[key + ("scale",)]).size),
                   var=float(folded_variance(eps)))
        payload.add("scale", _f32(flat_p[key + ("scale",)]), rec)
        payload.add("bias", _f32(flat_p[key + ("bias",)]), rec)
        norms.append(rec)
    stored = {tuple(r["path"].split("/")) + (leaf,) for r in records for leaf in ("kernel", "bias")}
    stored |= {tuple(r["path"].split("/")) + (leaf,) for r in norms for leaf in ("scale", "bias")}
    others = []  # every other parameter (LayerNorm / RMSNorm scales, embeddings), float32 as it is
    for key in sorted(k for k in flat_p if k not in stored):
        rec = dict(path="/".join(key), shape=list(np.shape(flat_p[key])))
        payload.add("value", _f32(flat_p[key]).reshape(-1), rec)
        others.append(rec)
    data = payload.bytes()
    meta = dict(format=EXPORT_FORMAT, model=model_name, num_classes=int(num_classes),
                widths=[int(w) for w in table.widths], input_shape=[int(s) for s in table.input_shape],
                input_mean=None if input_mean is None else np.asarray(input_mean, np.float64).tolist(),
                input_std=None if input_std is None else np.asarray(input_std, np.float64).tolist(),
                weight_quantizer=quantizer.to_dict(), layers=records, norms=norms, params=others,
                payload_bytes=int(data.size),
                payload_sha256=sha256_hex(data.tobytes()))
    meta["meta_sha256"] = _meta_sha256(meta)
    meta_bytes = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, payload=data, meta=meta_bytes)
    files.write_atomic(path, buffer.getvalue())
    return dict(path=path, file_bytes=len(buffer.getvalue()), payload_bytes=int(data.size),
                meta_bytes=int(meta_bytes.size), layers=records)


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------

def read_packed(path: str) -> tuple[np.ndarray, dict]:
    """(payload, meta) of a packed file, its checksums verified (module docstring)."""
    try:
        with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as z:
            if "payload" not in z or "meta" not in z:
                raise PackedFileError(f"{path} is not a jaxcompress packed file (needs 'payload' and 'meta')")
            payload, meta = np.asarray(z["payload"]), json.loads(bytes(np.asarray(z["meta"])).decode())
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except PackedFileError:
        raise
    except Exception as e:  # zipfile, numpy's header parser and json fail in many ways on damaged bytes
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise PackedFileError(f"cannot read the packed file {path} ({type(e).__name__}: {first}); it is corrupt "
                              f"or not a packed file: export it again") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise PackedFileError(f"{path}: unknown format {meta.get('format')!r}, expected {EXPORT_FORMAT}")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_sha256(meta):
        raise PackedFileError(f"{path} is corrupt: its metadata does not match its sha256; export it again")
    if "payload_sha256" in meta and (payload.dtype != np.uint8 or payload.ndim != 1
                                     or sha256_hex(payload.tobytes()) != meta["payload_sha256"]):
        raise PackedFileError(f"{path} is corrupt: its payload does not match its sha256; export it again")
    return payload, meta


def _segments(payload: np.ndarray, rec: dict) -> dict[str, np.ndarray]:
    return {name: payload[off:off + n] for name, off, n in rec["segments"]}


def decode_kernel(payload: np.ndarray, rec: dict, quantizer: WeightQuantizer) -> jax.Array:
    """The dequantized float32 kernel of one layer record."""
    seg = _segments(payload, rec)
    shape = tuple(rec["shape"])
    cout = int(np.prod(shape[len(shape) - rec.get("out_ndim", 1):]))  # stored as an (inputs, outputs) matrix
    n, bits = int(np.prod(shape)), rec["bits_w"]
    width = FLOAT_BITS if bits >= FLOAT_BITS else bits
    codes = pack.unpack_bits(seg["codes"], width, rec["entries"])
    if rec["format"] == "sparse":
        positions, real = size.sparse_positions(pack.unpack_bits(seg["gaps"], rec["index_bits"], rec["entries"]),
                                                rec["index_bits"])
        codes = codes[real]
    else:
        positions = np.arange(n)
    if bits >= FLOAT_BITS:
        values = jnp.asarray(codes.astype(np.uint32).view(np.float32))
    else:
        side = {"codes": codes.astype(np.int64)}
        if "codebook" in seg:
            book = np.zeros(2 ** 8, np.float32)
            book[:2 ** bits] = seg["codebook"].view("<f4")
            side["codebook"] = book
        else:
            channel = positions // (n // cout)
            scale = seg["scale"].view("<f4")
            side["scale"] = scale[channel] if scale.size > 1 else scale[0]
            if "zero_point" in seg:
                zp = seg["zero_point"]
                side["zero_point"] = zp[channel] if zp.size > 1 else zp[0]
        values = np.asarray(_decode(side, jnp.float32(bits), quantizer))
    flat = np.zeros((n,), np.float32)
    flat[positions] = values
    return jnp.asarray(size.from_channel_major(flat, (n // cout, cout)).reshape(shape))


def load_packed(path: str, model: nn.Module | None = None) -> tuple[nn.Module, dict, dict]:
    """Returns `(model, variables, meta)`: the zoo model rebuilt from the file's name and
    widths (or `model`), its dequantized float32 parameters, folded BatchNorm and the
    activation quantization (`quant`: bits_a, range_a). `model.apply(variables, x)` runs it."""
    payload, meta = read_packed(path)
    if model is None:
        model = create_model(meta["model"], meta["num_classes"], widths=tuple(meta["widths"]))
    quantizer = WeightQuantizer(**meta["weight_quantizer"])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *meta["input_shape"])),
                                               train=False))
    params, stats, quant = {}, {}, {}
    for rec in meta["layers"]:
        key = tuple(rec["path"].split("/"))
        params[key + ("kernel",)] = decode_kernel(payload, rec, quantizer)
        seg = _segments(payload, rec)
        if rec["use_bias"]:
            out_shape = tuple(rec["shape"][len(rec["shape"]) - rec.get("out_ndim", 1):])
            params[key + ("bias",)] = jnp.asarray(seg["bias"].view("<f4").reshape(out_shape))
        if rec["bits_a"] < FLOAT_BITS:
            quant[key + ("bits_a",)] = jnp.asarray(float(rec["bits_a"]), jnp.float32)
            if rec["range_a"]:
                quant[key + ("range_a",)] = jnp.asarray(seg["range_a"].view("<f4")[0])
    for rec in meta["norms"]:
        key = tuple(rec["path"].split("/"))
        seg = _segments(payload, rec)
        params[key + ("scale",)] = jnp.asarray(seg["scale"].view("<f4"))
        params[key + ("bias",)] = jnp.asarray(seg["bias"].view("<f4"))
        stats[key + ("mean",)] = jnp.zeros((rec["channels"],), jnp.float32)
        stats[key + ("var",)] = jnp.full((rec["channels"],), rec["var"], jnp.float32)
    for rec in meta.get("params", []):
        params[tuple(rec["path"].split("/"))] = jnp.asarray(
            _segments(payload, rec)["value"].view("<f4").reshape(rec["shape"]))
    want = traverse_util.flatten_dict(shapes["params"])
    missing = sorted("/".join(k) for k in set(want) - set(params))
    wrong = sorted("/".join(k) for k in want if k in params and tuple(params[k].shape) != tuple(want[k].shape))
    if missing or wrong:
        raise ValueError(f"{path} does not match the model: missing {missing}, wrong shapes {wrong}")
    variables = {"params": traverse_util.unflatten_dict(params)}
    if stats:
        variables["batch_stats"] = traverse_util.unflatten_dict(stats)
    if quant:
        variables["quant"] = traverse_util.unflatten_dict(quant)
    return model, variables, meta


def compare_outputs(apply_a, variables_a, apply_b, variables_b, x) -> dict:
    """Max |difference| of two networks' eval-mode outputs on x, and argmax agreement."""
    ya = np.asarray(jax.jit(lambda v, x: apply_a(v, x, train=False))(variables_a, x))
    yb = np.asarray(jax.jit(lambda v, x: apply_b(v, x, train=False))(variables_b, x))
    return dict(max_abs_diff=float(np.max(np.abs(ya - yb))) if ya.size else 0.0,
                max_abs_output=float(np.max(np.abs(ya))) if ya.size else 0.0,
                argmax_agreement=float(np.mean(ya.argmax(-1) == yb.argmax(-1))) if ya.size else 1.0)
