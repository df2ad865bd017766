"""More ``nki.isa`` instructions of the NKI 0.6 surface: scans, cross-partition shuffles,
range selection and nonzero compaction.

Each follows its docstring in the SDK's API stub (``aws-neuron-sdk: nki/api/nki/isa/__init__.py``);
docs/simulator.md quotes the rules.  ``isa`` re-exports these names, so kernels call them as
``nisa.tensor_tensor_scan`` etc.
"""
from __future__ import annotations

import numpy as np

from . import dtypes as dt
from . import ops
from .context import current
from .errors import DtypeError, PartitionMismatchError, ShapeMismatchError, UninitializedReadError, \
    UnsupportedError
from .isa import (_bytes, _in, _not_both_psum, _raw, _same_free, _same_partitions, _scalar_operand,
                  _store, _vals, fp32, reduce_cmd, _vector_accumulator)
from .memory import runtime_int


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """Per partition: ``r[0] = op1(op0(data0[0], initial), data1[0])``,
    ``r[i] = op1(op0(data0[i], r[i-1]), data1[i])`` on VectorE, in fp32 (free dims flattened).

    ``initial``: an fp32 number or a tile with one element per partition.  ``reverse0`` makes
    ``data0`` the rhs of ``op0``; ``reverse1`` makes ``data1`` the lhs of ``op1``.
    """
    instr = "tensor_tensor_scan"
    ctx = current("nisa.tensor_tensor_scan")
    alu0, alu1 = ops.alu(op0, instr, "op0"), ops.alu(op1, instr, "op1")
    for operand, alu in (("op0", alu0), ("op1", alu1)):
        if alu.kind != "arith":
            raise UnsupportedError(f"{instr}: {operand} nl.{alu.name} is not a binary arithmetic operator")
    data0, data1, dst = _in(instr, "data0", data0), _in(instr, "data1", data1), _in(instr, "dst", dst)
    p = _same_partitions(instr, data0=data0, data1=data1, dst=dst)
    _same_free(instr, "data0", data0, "data1", data1)
    _same_free(instr, "dst", dst, "data0", data0)
    _not_both_psum(instr, "data0", data0, "data1", data1)
    a, b = _vals(data0, instr, "data0"), _vals(data1, instr, "data1")
    state = np.broadcast_to(np.asarray(_scalar_operand(instr, "initial", initial, p, require_fp32=False),
                                       np.float32), (p, 1)).reshape(p)
    out = np.empty_like(a)
    with np.errstate(all="ignore"):
        for i in range(a.shape[1]):        # a true recurrence: one vectorised step per column
            x = alu0.fn(state, a[:, i]) if reverse0 else alu0.fn(a[:, i], state)
            state = (alu1.fn(b[:, i], x) if reverse1 else alu1.fn(x, b[:, i])).astype(np.float32)
            out[:, i] = state
    _store(dst, out, instr)
    ctx.cost.compute("VectorE", instr, p, data0.free_size, _bytes(data0, data1, dst),
                     cycles_per_element=ctx.config.model.vector_two_input_cycles_per_elem)


QUADRANT = 32
SHUFFLE_KEEP = 255


def nc_stream_shuffle(dst, src, shuffle_mask, name=None):
    """Cross-partition move within each 32-partition quadrant on VectorE:
    ``dst[q*32 + i] = src[q*32 + shuffle_mask[i]]``; ``255`` leaves ``dst`` partition ``i`` as is.

    SBUF or PSUM on both sides; same dtype and elements per partition; in place allowed.  With
    ``A = ceil(max(P_src, P_dst) / 32) * 32`` active partitions the start partition of both views
    must be 0 (A = 96/128), 0/64 (A = 64) or 0/32/64/96 (A = 32).
    """
    instr = "nc_stream_shuffle"
    ctx = current("nisa.nc_stream_shuffle")
    src, dst = _in(instr, "src", src), _in(instr, "dst", dst)
    if dst.dtype != src.dtype:
        raise DtypeError(f"{instr}: dst dtype {dst.dtype} must equal src dtype {src.dtype}")
    _same_free(instr, "dst", dst, "src", src)
    mask = [int(m) for m in shuffle_mask]
    if len(mask) != QUADRANT or any(not (0 <= m < QUADRANT or m == SHUFFLE_KEEP) for m in mask):
        raise ShapeMismatchError(f"{instr}: shuffle_mask must hold 32 entries in [0, 32) or 255, got {mask}")
    active = -(-max(src.partitions, dst.partitions) // QUADRANT) * QUADRANT
    allowed = {32: (0, 32, 64, 96), 64: (0, 64)}.get(active, (0,))
    for operand, t in (("src", src), ("dst", dst)):
        start = t.start_partition
        if start not in allowed:
            raise PartitionMismatchError(
                f"{instr}: {operand} {t.describe()} starts at partition {start}; with {active} active "
                f"partitions the start partition must be one of {list(allowed)}")
    rows = np.array([(i // QUADRANT) * QUADRANT + mask[i % QUADRANT] for i in range(dst.partitions)])
    moved = np.array([mask[i % QUADRANT] != SHUFFLE_KEEP for i in range(dst.partitions)])
    if (rows[moved] >= src.partitions).any():
        i = int(np.argmax(moved & (rows >= src.partitions)))
        raise ShapeMismatchError(f"{instr}: dst partition {i} reads src partition {rows[i]}, but src "
                                 f"{src.describe()} has {src.partitions}")
    values = _raw(src, instr, "src")[np.where(moved, rows, 0)]     # read all before writing (in place)
    keep = np.broadcast_to(moved[:, None], values.shape).reshape(dst.shape)
    dst.write(values.reshape(dst.shape), instr, mask=keep)
    ctx.cost.compute("VectorE", instr, dst.partitions, dst.free_size, _bytes(src, dst))


_RANGE_COMPARES = ("equal", "less", "less_equal", "greater", "greater_equal")


def range_select(dst, on_true_tile, comp_op0, comp_op1, bound0, bound1, reduce_cmd=reduce_cmd.reset_reduce,
                 reduce_res=None, reduce_op=None, range_start=0, on_false_value=fp32.min, name=None):
    """``dst = on_true_tile`` where ``comp_op0(range_start + j, bound0) and comp_op1(range_start + j,
    bound1)`` (j the free index), else ``on_false_value`` (must be FP32_MIN); the per-partition max of
    the result goes through the VectorE accumulator (``reduce_cmd``) into ``reduce_res``."""
    instr = "range_select"
    ctx = current("nisa.range_select")
    dst, on_true_tile = _in(instr, "dst", dst), _in(instr, "on_true_tile", on_true_tile)
    bound0, bound1 = _in(instr, "bound0", bound0), _in(instr, "bound1", bound1)
    p = _same_partitions(instr, dst=dst, on_true_tile=on_true_tile, bound0=bound0, bound1=bound1)
    _same_free(instr, "dst", dst, "on_true_tile", on_true_tile)
    cmp0, cmp1 = ops.alu(comp_op0, instr, "comp_op0"), ops.alu(comp_op1, instr, "comp_op1")
    for operand, alu in (("comp_op0", cmp0), ("comp_op1", cmp1)):
        if alu.name not in _RANGE_COMPARES:
            raise UnsupportedError(f"{instr}: {operand} must be one of nl.{', nl.'.join(_RANGE_COMPARES)}")
    if reduce_op is not None and ops.alu(reduce_op, instr, "reduce_op").name != "maximum":
        raise UnsupportedError(f"{instr}: reduce_op must be nl.maximum (the only supported reduction)")
    if not dt.is_float(on_true_tile.dtype):
        raise DtypeError(f"{instr}: on_true_tile {on_true_tile.describe()} must have a float dtype")
    for operand, t in (("bound0", bound0), ("bound1", bound1)):
        if t.free_size != 1 or t.dtype != dt.float32:
            raise DtypeError(f"{instr}: {operand} {t.describe()} must be float32 with one element per partition")
    if np.float32(on_false_value) != np.float32(fp32.min):
        raise UnsupportedError(f"{instr}: on_false_value must be FP32_MIN (nl.fp32.min, -3.4028235e+38) "
                               f"on hardware, got {on_false_value!r}")
    if not isinstance(range_start, (int, np.integer)):
        raise TypeError(f"{instr}: range_start must be a compile-time integer, got {range_start!r}")
    index = (np.float32(range_start) + np.arange(dst.free_size, dtype=np.float32))[None, :]
    keep = (cmp0.fn(index, _vals(bound0, instr, "bound0")) != 0) & \
        (cmp1.fn(index, _vals(bound1, instr, "bound1")) != 0)
    values = np.where(keep, _vals(on_true_tile, instr, "on_true_tile"), np.float32(fp32.min)).astype(np.float32)
    _store(dst, values, instr)
    acc = _vector_accumulator(ctx)
    row_max = values.max(axis=1)
    rc = type(reduce_cmd)
    if reduce_cmd in (rc.reset_reduce, rc.reset):
        acc["value"][:p], acc["valid"][:p] = (row_max if reduce_cmd is rc.reset_reduce else fp32.min), True
    elif reduce_cmd is rc.reduce:
        if not acc["valid"][:p].all():
            raise UninitializedReadError(f"{instr}: reduce_cmd=reduce reads VectorE accumulators 0..{p - 1} "
                                         f"that were never reset; start with reduce_cmd=reset_reduce")
        acc["value"][:p] = np.maximum(acc["value"][:p], row_max)
    elif reduce_cmd is not rc.idle:
        raise UnsupportedError(f"{instr}: reduce_cmd={reduce_cmd!r} is not supported")
    if reduce_res is not None:
        reduce_res = _in(instr, "reduce_res", reduce_res)
        if reduce_res.partitions != p or reduce_res.free_size != 1:
            raise ShapeMismatchError(f"{instr}: reduce_res {reduce_res.describe()} must be [{p}, 1]")
        _store(reduce_res, acc["value"][:p].reshape(p, 1), instr)
    ctx.cost.compute("VectorE", instr, p, dst.free_size, _bytes(dst, on_true_tile, reduce_res))


GPSIMD_LANE_STRIDE = 16     # each of the 8 GpSimd cores reads and writes its partition 0 of 16


def nonzero_with_count(dst, src, index_offset=0, padding_val=-1, name=None):
    """Per partition 0, 16, ..., 112 of the tiles: indices (+ ``index_offset``) of the nonzero
    elements of ``src``, then ``padding_val``, then the count, into ``dst`` (one more element per
    partition than ``src``).  Other partitions of ``dst`` are untouched.  GpSimd, SBUF only;
    ``src`` float32 or int32, ``dst`` int32."""
    instr = "nonzero_with_count"
    ctx = current("nisa.nonzero_with_count")
    src, dst = _in(instr, "src", src, ("sbuf",)), _in(instr, "dst", dst, ("sbuf",))
    p = _same_partitions(instr, dst=dst, src=src)
    if src.dtype not in (dt.float32, dt.int32):
        raise DtypeError(f"{instr}: src {src.describe()} must be float32 or int32")
    if dst.dtype != dt.int32:
        raise DtypeError(f"{instr}: dst {dst.describe()} must be int32")
    if dst.free_size != src.free_size + 1:
        raise ShapeMismatchError(f"{instr}: dst {dst.describe()} must hold one more element per partition "
                                 f"than src {src.describe()} (the count)")
    offset = runtime_int(index_offset, f"{instr} index_offset")
    pad = runtime_int(padding_val, f"{instr} padding_val")
    for what, v in (("index_offset", offset), ("padding_val", pad)):
        if not np.iinfo(np.int32).min <= v <= np.iinfo(np.int32).max:
            raise DtypeError(f"{instr}: {what}={v} is not an int32")
    lanes = np.arange(0, p, GPSIMD_LANE_STRIDE)
    rows = _raw(src, instr, "src")[lanes]
    nonzero = rows != 0
    counts = nonzero.sum(axis=1)
    # Stable order: nonzero positions first (ascending), then padding.
    order = np.argsort(~nonzero, axis=1, kind="stable")
    width = src.free_size
    out = np.where(np.arange(width)[None, :] < counts[:, None], order + offset, pad)
    full = np.zeros((p, width + 1), np.int64)
    full[lanes, :width] = out
    full[lanes, width] = counts
    mask = np.zeros((p, width + 1), bool)
    mask[lanes] = True
    dst.write(full.reshape(dst.shape), instr, mask=mask.reshape(dst.shape))
    ctx.cost.compute("GpSimd", instr, p, src.free_size, _bytes(src, dst))


def _neuroncore_v4_only(api: str):
    def instruction(*args, **kwargs):
        current(f"nisa.{api}")
        raise UnsupportedError(f"nisa.{api} is available only on NeuronCore-v4 (trn3) and newer (NKI API "
                               f"docs); the simulated target is Trainium2 (NeuronCore-v3, nc_version.gen3)")
    instruction.__name__ = api
    instruction.__doc__ = f"``nisa.{api}``: NeuronCore-v4 only; raises on the simulated Trainium2."
    return instruction


nc_matmul_mx = _neuroncore_v4_only("nc_matmul_mx")
quantize_mx = _neuroncore_v4_only("quantize_mx")

__all__ = ["tensor_tensor_scan", "nc_stream_shuffle", "range_select", "nonzero_with_count", "nc_matmul_mx",
           "quantize_mx"]
