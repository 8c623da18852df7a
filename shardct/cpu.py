# CPU-level helpers for kernels that numba does not offer: a cache prefetch hint and
# unaligned little-endian loads from a byte buffer (LLVM intrinsics emitted through
# numba's extension API), the decorator for batch kernels compiled without NRT, and
# table memory on huge pages. They change speed, never results.
"""Memory hints and loads for kernels.

``prefetch(a, i)`` asks the CPU to bring the cache line holding ``a[i]`` (first element of
row ``i`` for a 2-D array) into every cache level. It never faults and has no effect on
values, so an index that is stale, or past the end, costs only a wasted hint; callers
still keep indices in range.

``load64(buf, pos)`` / ``load32`` / ``load16`` read 8/4/2 bytes of a uint8 array at any
byte offset as one little-endian machine load (x86 and arm64 allow unaligned loads).
Precondition: ``pos + width <= buf.shape[0]`` and ``buf`` is C-contiguous; no bounds check.

``table_bytes(n)`` is ``n`` zeroed bytes on a cache-line boundary; from 2 MiB on they are
anonymous memory 2 MiB-aligned and advised for transparent huge pages, so a lookup that
misses cache does not also miss the TLB (a random load over 4 MiB: 128 -> 34 ns here).
"""
from __future__ import annotations

import mmap

import numpy as np

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8P = ir.IntType(8).as_pointer()


def _element_ptr(context, builder, aryty, ary_val, idx_val, idx_ty):
    ary = context.make_array(aryty)(context, builder, ary_val)
    i = context.cast(builder, idx_val, idx_ty, types.intp)
    zero = context.get_constant(types.intp, 0)
    return cgutils.get_item_pointer2(context, builder, ary.data,
                                     cgutils.unpack_tuple(builder, ary.shape),
                                     cgutils.unpack_tuple(builder, ary.strides),
                                     aryty.layout, [i] + [zero] * (aryty.ndim - 1),
                                     wraparound=False, boundscheck=False)


@intrinsic
def prefetch(typingctx, arr, idx):
    """Prefetch the line of arr[idx] (row idx of a 2-D array) for reading."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_ptr(context, builder, signature.args[0], args[0], args[1],
                           signature.args[1])
        fnty = ir.FunctionType(ir.VoidType(), [_I8P, ir.IntType(32), ir.IntType(32),
                                               ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        i32 = ir.IntType(32)
        # rw = 0 (read), locality = 3 (keep in all levels), cache type = 1 (data)
        builder.call(fn, [builder.bitcast(ptr, _I8P), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


def _loader(bits, result):
    @intrinsic
    def load(typingctx, buf, pos):
        if not isinstance(buf, types.Array) or buf.dtype != types.uint8:
            return None

        def codegen(context, builder, signature, args):
            ptr = _element_ptr(context, builder, signature.args[0], args[0], args[1],
                               signature.args[1])
            ity = ir.IntType(bits)
            v = builder.load(builder.bitcast(ptr, ity.as_pointer()), align=1)
            return builder.zext(v, ir.IntType(64)) if bits < 64 else v

        return result(buf, pos), codegen
    return load


load64 = _loader(64, types.uint64)
load32 = _loader(32, types.int64)
load16 = _loader(16, types.int64)


def kernel(fn=None, **options):
    """``numba.njit(cache=True)`` for batch kernels that allocate nothing, compiled
    without numba's reference counting (NRT). Inlined helpers that take arrays otherwise
    leave an atomic incref/decref pair per call per packet, which cost 35 -> 22 ns per
    packet in the parser alone. A kernel that tries to allocate an array fails to
    compile, loudly. Arrays passed in stay owned by the caller for the call's duration."""
    options.setdefault("cache", True)
    options["_nrt"] = False
    jit = numba.njit(**options)
    return jit if fn is None else jit(fn)


HUGE_PAGE = 2 << 20


def table_bytes(nbytes: int) -> np.ndarray:
    """``nbytes`` zeroed bytes, 64-byte aligned; huge-page backed where the OS allows
    (THP "madvise" or "always"). The array keeps its memory alive (its base)."""
    if nbytes < HUGE_PAGE:
        raw = np.zeros(nbytes + 64, dtype=np.uint8)
        skip = -raw.ctypes.data % 64
        return raw[skip:skip + nbytes]
    m = mmap.mmap(-1, nbytes + HUGE_PAGE)     # anonymous, zero-filled by the kernel
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:     # THP "never" or unsupported: ordinary pages, same values
            pass
    raw = np.frombuffer(m, dtype=np.uint8)
    skip = -raw.ctypes.data % HUGE_PAGE
    return raw[skip:skip + nbytes]
